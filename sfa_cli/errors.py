"""The one exception type for problems a user can fix, and safe text for messages."""

__all__ = ["SfaError", "NotApplicable", "printable"]

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text) -> str:
    """`text` with control, format and separator characters escaped, fit for one terminal line.

    File, member and dataset names come from the user's files; escaping them
    keeps a name such as ``"x\\nError: forged"`` or one holding ANSI escapes
    from printing a line of its own choosing. Printable characters (any
    script) are kept; the others become ``\\n``, ``\\x1b``, ``\\u202e``...
    """
    text = str(text)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


def _escape(ch: str) -> str:
    """Python-style escape of one non-printable character."""
    code = ord(ch)
    if ch in _ESCAPES:
        return _ESCAPES[ch]
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


class SfaError(Exception):
    """A user-facing problem: bad input file, impossible option, size guard.

    The message is complete and fit to show as one line, and names the file
    when there is one. The CLI prints it as ``Error: <message>`` and exits 1.
    Control characters in the message are escaped when it is built (see
    :func:`printable`), so no message can span two lines.
    """

    def __init__(self, message="", *args):
        super().__init__(printable(message), *args)


class NotApplicable(SfaError):
    """A method cannot run at this n or budget; the message says why in one line."""
