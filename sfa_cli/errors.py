"""The one exception type for problems a user can fix."""

__all__ = ["SfaError", "NotApplicable"]


class SfaError(Exception):
    """A user-facing problem: bad input file, impossible option, size guard.

    The message is complete and fit to show as one line, and names the file
    when there is one. The CLI prints it as ``Error: <message>`` and exits 1.
    """


class NotApplicable(SfaError):
    """A method cannot run at this n or budget; the message says why in one line."""
