"""Matrix Market reader (``.mtx`` and gzip-compressed ``.mtx.gz``): the header is checked before the body is read."""
from __future__ import annotations

import gzip
import io
import math

import scipy.io

from sfa_cli.errors import printable
from sfa_cli.memory import available_bytes, human_bytes
from sfa_cli.io.guards import (
    _HINT_NPY, _INFLATE_FREE, _INFLATE_RATIO, _check_sparse_claim, _describe, _entries, _no_key,
    _require_read_memory,
)

_MTX_HEADER_MAX = 1 << 20  # banner, comments and size line


class _MtxHeader:
    """What a Matrix Market header declares."""

    def __init__(self, layout: str, field: str, symmetry: str, sizes: list[int], raw: bytes):
        self.layout, self.field, self.symmetry, self.raw = layout, field, symmetry, raw
        self.length = len(raw)
        self.shape = tuple(sizes[:2])
        rows, cols = self.shape
        if layout == "coordinate":
            self.entries = sizes[2]
        elif symmetry == "general":
            self.entries = rows * cols
        else:  # array storage keeps one triangle (without the diagonal when skew)
            n = min(rows, cols)
            self.entries = n * (n + 1) // 2 - (n if symmetry == "skew-symmetric" else 0)

    def min_entry_bytes(self) -> int:
        """Fewest bytes one entry line can take ('1 1\\n', '1 1 1\\n', '1\\n', ...)."""
        values = {"pattern": 0, "complex": 2}.get(self.field, 1)
        indices = 2 if self.layout == "coordinate" else 0
        return 2 * (indices + values)


def _read_mtx_header(fh) -> _MtxHeader:
    """Parse the banner, comments and size line (reads at most _MTX_HEADER_MAX bytes)."""
    banner = fh.readline(_MTX_HEADER_MAX)
    words = banner.decode("ascii", "replace").lower().split()
    if len(words) != 5 or words[0] != "%%matrixmarket" or words[1] != "matrix":
        raise ValueError("the first line is not a '%%MatrixMarket matrix ...' banner")
    _, _, layout, field, symmetry = words
    if layout not in ("coordinate", "array"):
        raise ValueError(f"unknown layout {printable(layout)[:20]!r}")
    lines = [banner]
    while sum(map(len, lines)) < _MTX_HEADER_MAX:
        line = fh.readline(_MTX_HEADER_MAX)
        if not line:
            raise ValueError("no size line after the banner")
        lines.append(line)
        text = line.strip()
        if not text or text.startswith(b"%"):
            continue
        parts = text.split()
        expected = 3 if layout == "coordinate" else 2
        try:
            sizes = [int(p) for p in parts]
        except ValueError:
            sizes = []
        if len(sizes) != expected or min(sizes) < 0:
            raise ValueError(f"the size line is not {expected} non-negative integers")
        return _MtxHeader(layout, field, symmetry, sizes, b"".join(lines))
    raise ValueError("no size line in the first 1 MiB")


def _read_mtx(path: str, key: str | None, size: int):
    """A Matrix Market file (``.mtx`` or gzip-compressed ``.mtx.gz``), its header checked first."""
    _no_key(path, key, "a Matrix Market")
    shown = printable(path)
    compressed = path.lower().endswith(".gz")
    opener = gzip.open if compressed else open
    with opener(path, "rb") as fh:
        header = _read_mtx_header(fh)
        claim = f"the header declares {_describe(header.shape)} with {_entries(header.entries)}"
        body_min = header.entries * header.min_entry_bytes() - 1
        if not compressed and body_min > size - header.length:
            raise ValueError(f"{claim}, but only {size - header.length} bytes follow the header "
                             f"(an entry takes at least {header.min_entry_bytes()})")
        if header.layout == "coordinate":
            _check_sparse_claim("the header", header.shape, header.entries)
            stored = 1 if header.symmetry == "general" else 2
            # text + scipy's COO arrays + canonical CSR arrays, and the row pointers.
            estimate = size + 40 * stored * header.entries + 16 * (max(header.shape) + 1)
            hint = "a sparse file is read whole: free memory or use a machine with more"
        else:
            estimate = size + 16 * math.prod(header.shape)
            hint = _HINT_NPY
        # For .gz the text is unknown yet: its cap below keeps it within the estimate.
        _require_read_memory(shown, f"the {_describe(header.shape)} matrix with {_entries(header.entries)} its header declares",
                             estimate, hint)
        if compressed:
            cap = max(_MTX_HEADER_MAX, header.length + 256 * header.entries)
            cap = min(cap, max(_INFLATE_FREE, _INFLATE_RATIO * size), available_bytes() // 2)
            body = fh.read(cap + 1)
            if len(body) > cap:
                raise ValueError(f"decompresses to more than {human_bytes(cap)} ({claim})")
        else:
            body = fh.read()
    text = header.raw + body
    # scipy's fast_matrix_market parser (scipy >= 1.12) reads past its buffer
    # and can kill the interpreter (SIGSEGV) on a body holding NUL bytes, or
    # on a last line that does not end in a newline (a truncated file).
    if b"\x00" in text:
        raise ValueError("the file holds NUL bytes (binary or corrupt)")
    if not text.endswith(b"\n"):
        text += b"\n"
    return scipy.io.mmread(io.BytesIO(text))
