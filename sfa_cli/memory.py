"""Memory guards: estimate before a large allocation, refuse with a one-line reason.

Densifying a sparse matrix, forming a dense reconstruction or moving a large
array to the GPU can ask for more memory than the machine has; the operating
system then kills the process without a word. Callers estimate the bytes
first and call :func:`require_memory`, which raises :class:`SfaError` with the
estimate, the memory available and the option that avoids the allocation.

Example
-------
>>> from sfa_cli.memory import human_bytes, require_memory
>>> human_bytes(40_000_000_000)
'37.3 GiB'
>>> require_memory(10**18, "densifying big.mtx (n=1000000000)", "use --sampled", dtype="float32")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
sfa_cli.errors.SfaError: densifying big.mtx (n=1000000000) needs 888.2 PiB in float32; ... available; use --sampled
"""
from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

from sfa_cli.errors import SfaError

__all__ = ["available_bytes", "require_memory", "peak_rss_bytes", "peak_device_bytes", "human_bytes"]

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_bytes(n: float) -> str:
    """``n`` bytes in binary units with one decimal: ``'37.3 GiB'``, ``'512 B'``."""
    n = float(n)
    for unit in _UNITS:
        if abs(n) < 1024 or unit == _UNITS[-1]:
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_available() -> int | None:
    """Room left under a container's memory limit (cgroup v2, then v1); None without a limit."""
    pairs = (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    )
    for limit_path, usage_path in pairs:
        try:
            limit = Path(limit_path).read_text().strip()
            usage = int(Path(usage_path).read_text().strip())
        except (OSError, ValueError):
            continue
        # "max" (v2) or a huge number (v1) means no limit.
        if limit == "max" or int(limit) >= 1 << 60:
            return None
        return max(int(limit) - usage, 0)
    return None


def available_bytes(device="cpu") -> int:
    """Memory that can still be allocated, in bytes.

    On the CPU: MemAvailable from /proc/meminfo (what Linux can give without
    swapping), capped by a container's cgroup limit; elsewhere the free
    physical pages from ``os.sysconf``. On CUDA: the free memory of the device
    (``torch.cuda.mem_get_info``).
    """
    name = str(device)
    if name.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(name))[0])
    found = [b for b in (_meminfo_available(), _cgroup_available()) if b is not None]
    if not found:
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return 1 << 62  # unknown: do not refuse
    return int(min(found))


def require_memory(nbytes: float, what: str, hint: str, device="cpu", *, dtype: str | None = None) -> None:
    """Raise SfaError when ``nbytes`` exceed the memory available on ``device``.

    Parameters
    ----------
    nbytes : float
        The estimated size of the allocation.
    what : str
        What needs it, naming the file or size: ``"densifying data/big.mtx (n=100000)"``.
    hint : str
        The option that avoids it: ``"use --sampled"``.
    dtype : str, optional
        Named in the message after the estimate (``"needs 37.3 GiB in float32"``).

    The message reads ``"<what> needs <estimate>[ in <dtype>]; <available> available[ on <device>]; <hint>"``.
    """
    available = available_bytes(device)
    if nbytes <= available:
        return
    where = "" if str(device) == "cpu" else f" on {device}"
    in_dtype = f" in {dtype}" if dtype else ""
    raise SfaError(f"{what} needs {human_bytes(nbytes)}{in_dtype}; {human_bytes(available)} available{where}; {hint}")


def peak_rss_bytes() -> int:
    """The largest resident set size this process has had, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB, macOS bytes


def peak_device_bytes(device) -> int | None:
    """Peak memory torch allocated on a CUDA device (None for the CPU)."""
    if not str(device).startswith("cuda"):
        return None
    import torch

    return int(torch.cuda.max_memory_allocated(torch.device(str(device))))
