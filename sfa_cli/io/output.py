"""Writing: output paths checked before any work, and every file written atomically.

Everything sfa writes goes through :func:`atomic_output`: a temporary name in
the target directory, flushed and fsynced, then renamed, so an interrupted or
failed write (a full disk included) never leaves a file under the final name.
:func:`check_output` checks an output path before any work; :func:`save_matrix`
writes a matrix in the format of its extension.
"""
from __future__ import annotations

import contextlib
import gc
import gzip
import os
import re
import secrets
import stat
import sys
import traceback
from pathlib import Path

import numpy as np
import scipy.io
import scipy.sparse as sp

from sfa_cli.errors import SfaError, printable
from sfa_cli.memory import human_bytes
from sfa_cli.validation import as_csr
from sfa_cli.io.guards import SUPPORTED_EXTENSIONS, _extension, _file_kind, _short_reason
from sfa_cli.io.hdf5 import h5_output

def check_output(path, *, suffixes, force: bool, others=()) -> Path:
    """Check an output path before any work is done for it.

    Parameters
    ----------
    path : str or path-like
        Where the output will be written.
    suffixes : sequence of str or None
        The extensions its writer supports (``(".npz", ".h5", ".hdf5")``);
        None accepts any name.
    force : bool
        Whether an existing regular file may be replaced (``--force``).
    others : sequence of str or path-like or None
        The command's other outputs (None entries ignored): `path` must differ
        from each, so ``-o out.npz --report out.npz`` is refused.

    Returns
    -------
    pathlib.Path

    Raises
    ------
    SfaError
        Unsupported extension; missing directory (never created silently), not
        a directory or not writable; `path` is a directory, a FIFO or a device
        (refused even with force); it exists and not `force`; or it is also
        another output. The CLI shows it as one ``Error:`` line, exit 1.
    """
    raw = os.fspath(path)
    shown = printable(raw)
    if suffixes is not None and _extension(raw, suffixes) is None:
        raise SfaError(f"{shown}: unsupported output type; use {', '.join(suffixes)}")
    target = Path(raw)
    parent = target.parent
    if not parent.exists():
        raise SfaError(f"{shown}: directory {printable(parent)} does not exist (sfa does not create it)")
    if not parent.is_dir():
        raise SfaError(f"{shown}: {printable(parent)} is not a directory")
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise SfaError(f"{shown}: cannot write: {_short_reason(exc)}") from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise SfaError(f"{shown} is a directory; give a file name")
        if not stat.S_ISREG(st.st_mode):
            raise SfaError(f"{shown} is {_file_kind(st.st_mode)}; sfa writes regular files only")
        if not force:
            raise SfaError(f"{shown} exists; use --force to overwrite")
    _probe_directory(parent, shown)
    for other in others:
        if other is not None and _same_path(raw, os.fspath(other)):
            raise SfaError(f"{shown}: given for two outputs; give each output its own file")
    return target


def check_writable(path, force: bool) -> None:
    """Refuse to overwrite an existing file unless `force`, and never a directory or special file.

    :func:`check_output` without an extension check (kept for existing callers).

    Raises
    ------
    SfaError
        ``<path> exists; use --force to overwrite``, and the refusals of :func:`check_output`.
    """
    check_output(path, suffixes=None, force=force)


def _same_path(a: str, b: str) -> bool:
    """Whether two output names lead to the same file (links and ``..`` resolved)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _probe_directory(directory: Path, shown: str) -> None:
    """Create and remove a file in `directory`: the one honest test that writing there works."""
    probe = directory / f".sfa-probe-{secrets.token_hex(4)}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as exc:
        raise SfaError(f"{shown}: cannot write in {printable(directory)}: {_short_reason(exc)}") from None


@contextlib.contextmanager
def atomic_output(path, *, force: bool = True):
    """Write to a temporary file next to `path`; fsync it and move it onto `path` on success.

    The temporary name keeps the extension (``name.tmp-1a2b3c4d.npz``) so
    writers that dispatch on it work. On any failure (the body raising,
    KeyboardInterrupt, a full disk) the temporary (and any name a writer
    derived from it, such as ``np.save``'s added ``.npy``) is removed and
    nothing appears under `path`. The directory must exist.

    Parameters
    ----------
    path : str or path-like
        The final name.
    force : bool, default=True
        True replaces whatever `path` holds when the write completes. False
        commits with an exclusive link: if `path` appeared meanwhile (another
        run writing the same output), the write is refused and removed.

    Yields
    ------
    pathlib.Path
        The temporary path to write (not created yet).

    Raises
    ------
    SfaError
        The write failed (``out.npz: cannot write: [Errno 28] No space left
        on device``), the writer produced no file, or `path` exists and not `force`.
    """
    path = Path(path)
    shown = printable(path)
    if not path.parent.is_dir():
        raise SfaError(f"{shown}: directory {printable(path.parent)} does not exist (sfa does not create it)")
    suffix = _extension(path.name) or path.suffix
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    tmp = path.with_name(f"{stem}.tmp-{secrets.token_hex(4)}{suffix}")
    try:
        yield tmp
        if not tmp.is_file():
            raise SfaError(f"{shown}: the writer produced no file")
        _fsync(tmp)
        _commit(tmp, path, force, shown)
    except BaseException as exc:
        reason = _write_failure(exc)
        if reason is None:
            _remove_temporaries(tmp)
            raise
        _release_writer(exc)
        _remove_temporaries(tmp)
        raise SfaError(f"{shown}: cannot write: {reason}") from None


def _write_failure(exc: BaseException) -> str | None:
    """``'[Errno 28] No space left on device'`` for a failed write; None for other exceptions.

    HDF5 reports a failed write as a RuntimeError holding ``errno = 28`` in
    several lines of detail; the errno's own words replace them.
    """
    code = getattr(exc, "errno", None) if isinstance(exc, OSError) else None
    if isinstance(exc, RuntimeError):
        found = re.search(r"errno = (\d+)", str(exc))
        if found is None:
            return None
        code = int(found.group(1))
    elif not isinstance(exc, OSError):
        return None
    return f"[Errno {code}] {os.strerror(code)}" if code else _short_reason(exc)


def _release_writer(exc: BaseException) -> None:
    """Free what a failed writer still holds (h5py handles), its complaints kept off stderr.

    The writer's frames live on in the traceback; h5py objects freed later try
    to flush to the full disk and print "Exception ignored" lines. Freed here,
    while those complaints are dropped, the error stays one line.
    """
    previous = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    try:
        seen = set()
        while exc is not None and id(exc) not in seen:
            seen.add(id(exc))
            traceback.clear_frames(exc.__traceback__)
            exc.__traceback__ = None
            exc = exc.__context__
        gc.collect()
    finally:
        sys.unraisablehook = previous


def _fsync(path: Path) -> None:
    """Flush a file's data to the device (errors a write-back cache kept surface here)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, path: Path, force: bool, shown: str) -> None:
    """Move the finished temporary onto `path`: replacing it, or only if `path` does not exist."""
    if force:
        os.replace(tmp, path)
    else:
        try:
            os.link(tmp, path)  # atomic, and fails if `path` exists
        except FileExistsError:
            raise SfaError(f"{shown} exists (written meanwhile by another run?); use --force to overwrite") from None
        except OSError:  # no hard links here: claim the name exclusively, then replace the claim
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            except FileExistsError:
                raise SfaError(f"{shown} exists (written meanwhile by another run?); "
                               f"use --force to overwrite") from None
            os.replace(tmp, path)
        else:
            tmp.unlink()
    with contextlib.suppress(OSError):  # make the rename itself durable where the platform allows
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove_temporaries(tmp: Path) -> None:
    """Remove `tmp` and any file a writer named after it (``tmp.npy``); never raises."""
    with contextlib.suppress(OSError):
        for name in os.listdir(tmp.parent):
            if name.startswith(tmp.name):
                with contextlib.suppress(OSError):
                    os.unlink(tmp.parent / name)


def _require_disk(path: Path, nbytes: int) -> None:
    """Refuse before writing when the directory's filesystem has less than `nbytes` free."""
    try:
        st = os.statvfs(path.parent)
    except (OSError, AttributeError):
        return
    free = st.f_bavail * st.f_frsize
    if nbytes > free:
        raise SfaError(f"{printable(path)}: needs at least {human_bytes(nbytes)} of disk; "
                       f"{human_bytes(free)} free in {printable(path.parent)}")


def save_matrix(path, A, *, force: bool = True) -> None:
    """Write a dense or sparse matrix, atomically, in the format of its extension.

    Parameters
    ----------
    path : str or path-like
        ``.npz`` (dense: ``numpy.savez`` key ``A``; sparse: ``scipy.sparse.save_npz``),
        ``.npy`` (dense only), ``.mtx``/``.mtx.gz``, ``.h5``/``.hdf5`` (dataset
        ``A``, or CSR group ``A`` with data/indices/indptr and a ``shape``
        attribute) or ``.mat`` (variable ``A``).
    A : ndarray or scipy sparse matrix of shape (n, m)
    force : bool, default=True
        Passed to :func:`atomic_output`: False refuses when `path` exists at the end.
    """
    path = Path(path)
    ext = _extension(path)
    if ext is None:
        raise SfaError(
            f"{printable(path)}: unknown file type; sfa writes {', '.join(SUPPORTED_EXTENSIONS)}"
        )
    A = as_csr(A, printable(path)) if sp.issparse(A) else np.asarray(A)
    if ext == ".npy" and sp.issparse(A):
        raise SfaError(
            f"{printable(path)}: .npy holds dense arrays only; use .npz, .mtx or .h5 for a sparse matrix"
        )
    stored = A.data.nbytes + A.indices.nbytes + A.indptr.nbytes if sp.issparse(A) else A.nbytes
    _require_disk(path, 0 if ext == ".mtx.gz" else stored)
    with atomic_output(path, force=force) as tmp:
        _WRITERS[ext](tmp, A)


class _CountingWriter:
    """A binary file that counts the bytes it is given, so a short write can be caught."""

    def __init__(self, fh):
        self.fh, self.count = fh, 0

    def write(self, data) -> int:
        written = self.fh.write(data)
        self.count += len(data)
        return written

    def __getattr__(self, name):
        return getattr(self.fh, name)


def _write_npz(tmp: Path, A) -> None:
    """Dense: ``numpy.savez`` with key ``A``; sparse: ``scipy.sparse.save_npz``."""
    with open(tmp, "xb") as fh:  # Python file objects raise on a failed write
        if sp.issparse(A):
            sp.save_npz(fh, A)
        else:
            np.savez(fh, A=A)


def _write_npy(tmp: Path, A) -> None:
    """``numpy.save`` to exactly `tmp` (numpy would append ``.npy`` to a path)."""
    with open(tmp, "xb") as fh:
        np.save(fh, A)


def _write_mtx(tmp: Path, A) -> None:
    """Matrix Market (coordinate for sparse, array for dense), gzipped for ``.gz``.

    scipy's writer given a path ignores a full disk and reports success, so it
    writes through a Python file object, which raises, and the byte count is
    checked against the file.
    """
    with open(tmp, "xb") as raw:
        counting = _CountingWriter(raw)
        if tmp.name.lower().endswith(".gz"):
            with gzip.GzipFile(fileobj=counting, mode="wb") as fh:
                scipy.io.mmwrite(fh, A)
        else:
            scipy.io.mmwrite(counting, A)
        raw.flush()
        size = os.fstat(raw.fileno()).st_size
    if size != counting.count:
        raise OSError(f"wrote {size} of {counting.count} bytes")


def _write_h5(tmp: Path, A) -> None:
    """Dataset ``A``, or a CSR group ``A`` that :func:`load_matrix` and anndata read."""
    with h5_output(tmp) as f:
        if not sp.issparse(A):
            f.create_dataset("A", data=A)
            return
        group = f.create_group("A")
        for field in ("data", "indices", "indptr"):
            group.create_dataset(field, data=getattr(A, field))
        group.attrs["shape"] = np.asarray(A.shape, dtype=np.int64)
        group.attrs["encoding-type"] = "csr_matrix"


def _write_mat(tmp: Path, A) -> None:
    """Variable ``A`` of a MATLAB v5 file."""
    with open(tmp, "xb") as fh:
        scipy.io.savemat(fh, {"A": A})


_WRITERS = {
    ".npz": _write_npz,
    ".npy": _write_npy,
    ".mtx": _write_mtx,
    ".mtx.gz": _write_mtx,
    ".h5": _write_h5,
    ".hdf5": _write_h5,
    ".mat": _write_mat,
}
