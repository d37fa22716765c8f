#!/usr/bin/env python
"""Fuzz sfa's readers: mutate valid files of every format and run the command line on each.

Builds small valid seed files (.npz dense and sparse, .npy, .mtx coordinate and
array, .mtx.gz, .h5 dataset and CSR group, .mat v5 plain and compressed, .mat
v7.3, and X vectors for ``apply``), mutates them (flipped, inserted and
truncated bytes; integers in text headers and binary words replaced by huge or
negative values; .npy headers given other shapes; the text inside .mtx.gz and
the members inside .npz mutated and repacked; a sparse index array of an .npz
or .h5 CSR group stored as floats), and runs ``sfa info``,
``sfa eval`` or ``sfa apply`` on each case with a time limit and a memory cap.

Each run is classified:

  crash      killed by a signal (a native crash: SIGSEGV, SIGABRT, ...)
  hang       still running at --timeout seconds
  traceback  "Traceback" on stderr
  generic    an error line showing an exception's class name (``Error: KeyError: ...``)
  unnamed    an error line that does not name the input file
  lines      more than one line on stderr (warnings included)
  memory     peak resident memory more than --memory-flag-mb above an empty run (sfa --version)
  lenient    exit 0 on a file that must be refused (sparse indices stored as floats, which
             scipy would truncate: 1.5 read as 1)
  refused    exit 1 with one ``Error:`` line naming the file (the wanted refusal)
  accepted   exit 0 (the mutation left a readable matrix)

By default each case runs in a child forked from this process after sfa is
imported and each command has run once on a valid file (so the children
import nothing; milliseconds a case, thousands in a minute or two); its peak memory
is measured from the child's resource usage against that of an empty forked
run (``sfa --version``), and its address space is capped (--memory-cap-mb) so a huge
allocation fails instead of swapping. --spawn runs ``python -m sfa_cli`` in a
fresh interpreter instead (the real entry point; about a second a case).

Prints a table and writes JSON (--out, default docs/bench/fuzz.json) with the
counts, the peak memory and up to --examples cases of every flagged class.

Usage:
    nice -n 10 python scripts/fuzz_inputs.py                       # 300 cases, info
    nice -n 10 python scripts/fuzz_inputs.py --cases 3000 --commands info,eval,apply
    python scripts/fuzz_inputs.py --cases 200 --spawn --timeout 60
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import random
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FLAGGED = ("crash", "hang", "traceback", "generic", "unnamed", "lines", "memory", "lenient")
CLASSES = FLAGGED + ("refused", "accepted")
GENERIC = re.compile(r"\b[A-Z][A-Za-z]*(Error|Exception|Warning)\b: |run with --debug")
HUGE = (0, 1, -1, 2**31 - 1, 2**31, 2**32 - 1, 2**40, 2**62, 10**7, 10**9)
HUGE_TEXT = ("0", "-1", "1", "2147483648", "10000000", "1000000000", "1000000000000", "99999999999999999999")


# ---------------------------------------------------------------------------
# Seeds
# ---------------------------------------------------------------------------

def write_seeds(directory: Path) -> dict[str, list[Path]]:
    """Valid small files of every format: {'matrix': [...], 'vector': [...], 'factors': [...]}."""
    import h5py
    import scipy.io as sio
    import scipy.sparse as sp

    from sfa_cli.methods.low_rank import truncated_svd

    rng = np.random.default_rng(0)
    n = 8
    dense = rng.standard_normal((n, n))
    sparse = sp.random(n, n, density=0.4, format="csr", random_state=0)
    matrices = []

    def add(name):
        path = directory / name
        matrices.append(path)
        return path

    np.savez(add("dense.npz"), A=dense, v=np.arange(3.0))
    sp.save_npz(add("sparse.npz"), sparse, compressed=False)
    sp.save_npz(add("sparse_z.npz"), sparse, compressed=True)
    np.save(add("dense.npy"), dense)
    np.save(add("dense32.npy"), dense.astype(np.float32))
    sio.mmwrite(add("sparse.mtx"), sparse)
    sio.mmwrite(add("dense.mtx"), dense)
    with gzip.open(add("sparse.mtx.gz"), "wb") as fh:
        sio.mmwrite(fh, sparse)
    with h5py.File(add("dense.h5"), "w") as f:
        f["A"] = dense
        f["labels"] = np.arange(n)
    with h5py.File(add("chunked.h5"), "w") as f:
        f.create_dataset("A", data=dense, chunks=(4, 4), compression="gzip")
    with h5py.File(add("csr.h5"), "w") as f:
        g = f.create_group("X")
        for field in ("data", "indices", "indptr"):
            g[field] = getattr(sparse, field)
        g.attrs["shape"] = sparse.shape
    sio.savemat(add("plain.mat"), {"A": dense, "name": "x"})
    sio.savemat(add("packed.mat"), {"A": dense, "S": sparse.tocsc()}, do_compression=True)
    path = add("v73.mat")
    with h5py.File(path, "w", userblock_size=512) as f:
        ds = f.create_dataset("A", data=dense.T)
        ds.attrs["MATLAB_class"] = np.bytes_("double")
    with open(path, "r+b") as fh:
        fh.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: fuzz HDF5 schema 1.00 .")
    vectors = []
    for name, X in (("x.npy", rng.standard_normal(n)), ("X.npy", rng.standard_normal((n, 3)))):
        np.save(directory / name, X)
        vectors.append(directory / name)
    factors = directory / "F.npz"
    truncated_svd(dense, 2 * n * 2).save(factors)
    return {"matrix": matrices, "vector": vectors, "factors": [factors]}


# ---------------------------------------------------------------------------
# Mutations: each takes (bytes, random.Random, file name) and returns (bytes, description)
# ---------------------------------------------------------------------------

def flip_bytes(data, rnd, name):
    data = bytearray(data)
    spots = [rnd.randrange(len(data)) for _ in range(rnd.randint(1, 8))] if data else []
    for i in spots:
        data[i] ^= rnd.randint(1, 255)
    return bytes(data), f"flip {len(spots)} bytes"


def flip_header_bytes(data, rnd, name):
    data = bytearray(data)
    head = min(len(data), 512)
    spots = [rnd.randrange(head) for _ in range(rnd.randint(1, 4))] if head else []
    for i in spots:
        data[i] ^= rnd.randint(1, 255)
    return bytes(data), f"flip {len(spots)} header bytes"


def truncate(data, rnd, name):
    cut = rnd.randrange(len(data)) if data else 0
    return data[:cut], f"truncate to {cut} of {len(data)} bytes"


def insert_bytes(data, rnd, name):
    at = rnd.randrange(len(data) + 1)
    extra = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 64)))
    return data[:at] + extra + data[at:], f"insert {len(extra)} bytes at {at}"


def huge_word(data, rnd, name):
    """Overwrite an aligned 4- or 8-byte word of the first 2 KiB with a huge or negative value."""
    size = rnd.choice((4, 8))
    limit = min(len(data), 2048) - size
    if limit <= 0:
        return data, "unchanged (too short)"
    at = rnd.randrange(0, limit) // size * size
    value = rnd.choice(HUGE)
    order = rnd.choice("<>")
    packed = struct.pack(order + ("q" if size == 8 else "i"), max(min(value, 2**(8 * size - 1) - 1), -2**(8 * size - 1)))
    return data[:at] + packed + data[at + size:], f"word {value} ({size} bytes {order}) at {at}"


def huge_number_text(data, rnd, name):
    """Replace one digit run of the first 4 KiB (a text header's sizes) by a huge or negative number."""
    runs = [m for m in re.finditer(rb"\d+", data[:4096])]
    if not runs:
        return data, "unchanged (no digits)"
    m = rnd.choice(runs)
    new = rnd.choice(HUGE_TEXT).encode()
    return data[:m.start()] + new + data[m.end():], f"number {m.group().decode()} -> {new.decode()} at {m.start()}"


def npy_shape(data, rnd, name):
    """Rewrite a .npy header with another shape (huge, empty, 1-D, 3-D), data kept."""
    try:
        fh = io.BytesIO(data)
        version = np.lib.format.read_magic(fh)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        _, fortran, dtype = reader(fh)
        body = data[fh.tell():]
    except Exception:  # noqa: BLE001 - not a valid header: mutate bytes instead
        return flip_header_bytes(data, rnd, name)
    shape = rnd.choice([(10**6, 10**6), (2**31, 2**31), (0, 0), (8,), (2, 2, 2), (3, 5), (10**9, 1), (65536, 65536)])
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": np.lib.format.dtype_to_descr(dtype),
                                               "fortran_order": fortran, "shape": shape})
    return out.getvalue() + body, f"npy shape -> {shape}"


def inside_gzip(data, rnd, name):
    try:
        text = gzip.decompress(data)
    except Exception:  # noqa: BLE001
        return flip_bytes(data, rnd, name)
    inner, what = rnd.choice((huge_number_text, flip_bytes, truncate))(text, rnd, name)
    return gzip.compress(inner), f"gzip inner: {what}"


def inside_zip(data, rnd, name):
    """Mutate one member of a zip archive and repack it (sizes in the directory then match)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = [(info, archive.read(info)) for info in archive.infolist()]
    except Exception:  # noqa: BLE001
        return flip_bytes(data, rnd, name)
    k = rnd.randrange(len(members))
    mutate = rnd.choice((npy_shape, flip_header_bytes, truncate, huge_word))
    new, what = mutate(members[k][1], rnd, name)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=rnd.choice((zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED))) as archive:
        for i, (info, body) in enumerate(members):
            archive.writestr(info.filename, new if i == k else body)
    return out.getvalue(), f"member {members[k][0].filename}: {what}"


_INDEX_ARRAYS = ("indices", "indptr", "row", "col")


def _as_floats(values, rnd):
    """An integer index array as float64 or float32: whole numbers, or one of them plus 0.5."""
    dtype = np.dtype(rnd.choice((np.float64, np.float32)))
    out = values.astype(dtype)
    if out.size and rnd.random() < 0.5:
        at = rnd.randrange(out.size)
        out[at] += 0.5
        return out, f"-> {dtype} (+0.5 at {at})"
    return out, f"-> {dtype} (whole numbers)"


def float_indices(data, rnd, name):
    """Store one sparse index array as floats: an .npz member (indices, indptr, row, col) or an .h5 CSR dataset.

    sfa must refuse the file (scipy.sparse would truncate 1.5 to 1 without a word); applied
    alone to a valid seed, so that exit 0 on it is flagged ``lenient``.
    """
    if name.endswith(".h5"):
        return _float_indices_h5(data, rnd, name)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = {info.filename: archive.read(info) for info in archive.infolist()}
    except Exception:  # noqa: BLE001
        return data, "unchanged (not a zip archive)"
    targets = [member for member in members if member.removesuffix(".npy") in _INDEX_ARRAYS]
    if not targets:
        return data, "unchanged (no sparse index member)"
    target = rnd.choice(targets)
    values, what = _as_floats(np.load(io.BytesIO(members[target]), allow_pickle=False), rnd)
    body = io.BytesIO()
    np.save(body, values)
    members[target] = body.getvalue()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=rnd.choice((zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED))) as archive:
        for member, content in members.items():
            archive.writestr(member, content)
    return out.getvalue(), f"float indices: member {target.removesuffix('.npy')} {what}"


def _float_indices_h5(data, rnd, name):
    """The .h5 file rebuilt in memory with one CSR group's indices or indptr stored as floats."""
    import h5py

    with h5py.File(io.BytesIO(data), "r") as src:
        groups = []
        src.visititems(lambda path, node: groups.append(path) if isinstance(node, h5py.Group)
                       and {"data", "indices", "indptr"} <= set(node) else None)
        if not groups:
            return data, "unchanged (no CSR group)"
        field = f"{rnd.choice(groups)}/{rnd.choice(('indices', 'indptr'))}"
        values, what = _as_floats(src[field][()], rnd)
        out = io.BytesIO()
        with h5py.File(out, "w") as dst:
            for key in src:
                src.copy(src[key], dst, name=key)
            del dst[field]
            dst[field] = values
    return out.getvalue(), f"float indices: /{field} {what}"


GENERAL = (flip_bytes, flip_header_bytes, truncate, insert_bytes, huge_word)
BY_FORMAT = {
    ".npy": (npy_shape, npy_shape, huge_word),
    ".npz": (inside_zip, inside_zip, inside_zip),
    ".mtx": (huge_number_text, huge_number_text, huge_number_text),
    ".gz": (inside_gzip, inside_gzip, inside_gzip),
    ".h5": (huge_word, huge_word),
    ".mat": (huge_word, huge_word, huge_number_text),
}
# Mutations that turn a valid file into one sfa must refuse, applied alone to a valid seed
# (one case in MUST_REFUSE_SHARE for these formats): exit 0 on the result is flagged ``lenient``.
MUST_REFUSE = {
    ".npz": (float_indices,),
    ".h5": (float_indices,),
}
MUST_REFUSE_SHARE = 8


def mutate(data: bytes, rnd: random.Random, name: str) -> tuple[bytes, str, bool]:
    """One or two mutations, half of them aimed at the format's header; or one MUST_REFUSE mutation.

    Returns the bytes, what was done, and whether sfa must refuse the result.
    """
    suffix = Path(name).suffix
    if suffix in MUST_REFUSE and rnd.randrange(MUST_REFUSE_SHARE) == 0:
        data, what = rnd.choice(MUST_REFUSE[suffix])(data, rnd, name)
        return data, what, not what.startswith("unchanged")
    steps = []
    for _ in range(rnd.choice((1, 1, 2))):
        choices = GENERAL + BY_FORMAT.get(suffix, ())
        data, what = rnd.choice(choices)(data, rnd, name)
        steps.append(what)
    return data, "; ".join(steps), False


# ---------------------------------------------------------------------------
# Running one case
# ---------------------------------------------------------------------------

def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


_FORK_BASE_MB = None


def run_forked(args: list[str], timeout: float, cap_mb: int, workdir: Path):
    """Run ``sfa ARGS`` in a forked child; (exit status, stderr, peak RSS MiB above an empty run, seconds).

    A forked child's peak counts only the pages it touches, so the baseline
    is the peak of an empty forked run (``sfa --version``), not the parent's size.
    """
    global _FORK_BASE_MB
    if _FORK_BASE_MB is None:
        _FORK_BASE_MB = 0.0
        _FORK_BASE_MB = float(np.median([_run_fork(["--version"], timeout, cap_mb, workdir)[2] for _ in range(3)]))
    code, stderr, peak, took = _run_fork(args, timeout, cap_mb, workdir)
    return code, stderr, peak - _FORK_BASE_MB, took


def _run_fork(args: list[str], timeout: float, cap_mb: int, workdir: Path):
    from sfa_cli.cli.commands import cli

    err_path = workdir / "stderr.txt"
    start_rss = 0
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:  # child
        code = 70
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(devnull, 1)
            os.dup2(err, 2)
            if cap_mb:
                cap = _status_kb("VmSize") * 1024 + cap_mb * 2**20
                resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
            try:
                cli.main(args=args, prog_name="sfa", standalone_mode=True)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - anything escaping click is what we look for
            import traceback

            traceback.print_exc()
            code = 71
        finally:
            sys.stderr.flush()
            os._exit(code)
    status, usage = None, None
    while time.monotonic() - started < timeout:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.005)
    else:
        os.kill(pid, signal.SIGKILL)
        _, status, usage = os.wait4(pid, 0)
        return None, err_path.read_text(errors="replace"), usage.ru_maxrss / 1024 - start_rss / 1024, timeout
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    return code, err_path.read_text(errors="replace"), usage.ru_maxrss / 1024 - start_rss / 1024, \
        time.monotonic() - started


_SPAWN_BASE_MB = None


def run_spawned(args: list[str], timeout: float, cap_mb: int, workdir: Path):
    """Run ``python -m sfa_cli ARGS`` in a fresh interpreter; peak RSS above an empty sfa run."""
    global _SPAWN_BASE_MB
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    with open(workdir / "stderr.txt", "w+b") as err:
        proc = subprocess.Popen([sys.executable, "-m", "sfa_cli", *args], stdout=subprocess.DEVNULL, stderr=err,
                                env=env)
        try:
            _, status, usage = _wait4_timeout(proc, timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, status, usage = os.wait4(proc.pid, 0)
            status = None
        err.seek(0)
        text = err.read().decode(errors="replace")
    if _SPAWN_BASE_MB is None:
        _SPAWN_BASE_MB = 0.0
        _, _, base, _ = run_spawned(["--version"], timeout, cap_mb, workdir)
        _SPAWN_BASE_MB = base
    peak = usage.ru_maxrss / 1024 - _SPAWN_BASE_MB
    if status is None:
        return None, text, peak, timeout
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    return code, text, peak, time.monotonic() - started


def _wait4_timeout(proc, timeout):
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = status
            return pid, status, usage
        time.sleep(0.01)
    raise subprocess.TimeoutExpired(proc.args, timeout)


def _warm_up(seeds: dict, work: Path) -> None:
    """Run each command once on a valid seed in this process, output discarded.

    The command line imports its libraries lazily; imported here, before the
    children fork, they are not imported again in every case.
    """
    from sfa_cli.cli.commands import cli

    factors, matrix, vector = (str(seeds[k][0]) for k in ("factors", "matrix", "vector"))
    saved = os.dup(1), os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        for args in (["info", matrix], ["eval", factors, matrix],
                     ["apply", factors, vector, "-o", str(work / "y.npy"), "--force"]):
            try:
                cli.main(args=args, prog_name="sfa", standalone_mode=False)
            except BaseException:  # noqa: BLE001 - a warm-up only
                pass
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def classify(code, stderr: str, peak_mb: float, shown_path: str, memory_flag_mb: float,
             must_refuse: bool = False) -> str:
    """The class of one run (the first flagged class that applies); `must_refuse`: exit 0 is ``lenient``."""
    lines = stderr.splitlines()
    errors = [line for line in lines if line.startswith("Error:")]
    if code is None:
        return "hang"
    if code < 0:
        return "crash"
    if "Traceback" in stderr:
        return "traceback"
    if any(GENERIC.search(line) for line in errors):
        return "generic"
    if any(shown_path not in line for line in errors):
        return "unnamed"
    if len(lines) > 1:
        return "lines"
    if peak_mb > memory_flag_mb:
        return "memory"
    if code == 0:
        return "lenient" if must_refuse else "accepted"
    return "refused" if errors else "unnamed"


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=300, help="mutated files to run (default 300)")
    parser.add_argument("--commands", default="info", help="comma-separated: info, eval, apply (default info)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds a case may run (default 30)")
    parser.add_argument("--memory-cap-mb", type=int, default=2048,
                        help="address space a forked case may add (default 2048; 0 = no cap)")
    parser.add_argument("--memory-flag-mb", type=float, default=300.0,
                        help="flag runs whose peak exceeds their start by this much (default 300)")
    parser.add_argument("--spawn", action="store_true", help="run python -m sfa_cli in a fresh process per case")
    parser.add_argument("--examples", type=int, default=8, help="cases kept per flagged class in the JSON")
    parser.add_argument("--keep", type=Path, default=None, help="copy flagged inputs into this directory")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "fuzz.json")
    opts = parser.parse_args(argv)
    commands = [c.strip() for c in opts.commands.split(",") if c.strip()]
    unknown = set(commands) - {"info", "eval", "apply"}
    if unknown:
        parser.error(f"unknown command(s) {', '.join(sorted(unknown))}; choose from info, eval, apply")
    rnd = random.Random(opts.seed)
    runner = run_spawned if opts.spawn else run_forked
    if not opts.spawn:
        import sfa_cli.cli.commands  # noqa: F401 - imported once, before the children fork

    with tempfile.TemporaryDirectory(prefix="sfa-fuzz-") as tmp:
        tmp = Path(tmp)
        seeds_dir, work = tmp / "seeds", tmp / "work"
        seeds_dir.mkdir()
        work.mkdir()
        seeds = write_seeds(seeds_dir)
        if not opts.spawn:
            _warm_up(seeds, work)
        counts = {cmd: dict.fromkeys(CLASSES, 0) for cmd in commands}
        examples = {cls: [] for cls in FLAGGED}
        peaks, seconds = [], []
        t0 = time.monotonic()
        for case in range(opts.cases):
            command = commands[case % len(commands)]
            pool = seeds["vector"] if command == "apply" else seeds["matrix"]
            seed_file = rnd.choice(pool)
            data, what, must_refuse = mutate(seed_file.read_bytes(), rnd, seed_file.name)
            target = work / f"case{case}_{seed_file.name}"
            target.write_bytes(data)
            factors = str(seeds["factors"][0])
            args = {"info": ["info", str(target)],
                    "eval": ["eval", factors, str(target)],
                    "apply": ["apply", factors, str(target), "-o", str(work / "y.npy"), "--force"]}[command]
            code, stderr, peak, took = runner(args, opts.timeout, opts.memory_cap_mb, work)
            kind = classify(code, stderr, peak, str(target), opts.memory_flag_mb, must_refuse)
            counts[command][kind] += 1
            peaks.append(peak)
            seconds.append(took)
            if kind in FLAGGED and len(examples[kind]) < opts.examples:
                examples[kind].append({"command": command, "seed": seed_file.name, "mutation": what,
                                       "exit": code, "peak_mb": round(peak, 1),
                                       "stderr": stderr.strip().splitlines()[-3:]})
            if kind in FLAGGED and opts.keep:
                opts.keep.mkdir(parents=True, exist_ok=True)
                shutil.copy(target, opts.keep / target.name)
            target.unlink()
        wall = time.monotonic() - t0

    print(f"{opts.cases} cases, {wall:.0f} s, {'spawned' if opts.spawn else 'forked'} runs, seed {opts.seed}")
    header = f"{'command':<8}" + "".join(f"{c:>10}" for c in CLASSES)
    print(header)
    for command, row in counts.items():
        print(f"{command:<8}" + "".join(f"{row[c]:>10}" for c in CLASSES))
    print(f"peak memory above an empty run: max {max(peaks):.1f} MiB, median {float(np.median(peaks)):.1f} MiB; "
          f"slowest case {max(seconds):.2f} s")
    for cls, cases in examples.items():
        for ex in cases[:3]:
            print(f"  {cls}: {ex['command']} {ex['seed']} [{ex['mutation']}] -> {ex['stderr'][-1:] or ex['exit']}")
    report = {
        "cases": opts.cases, "seed": opts.seed, "commands": commands, "mode": "spawn" if opts.spawn else "fork",
        "timeout_s": opts.timeout, "memory_cap_mb": opts.memory_cap_mb, "memory_flag_mb": opts.memory_flag_mb,
        "wall_s": round(wall, 1), "counts": counts,
        "flagged": sum(row[c] for row in counts.values() for c in FLAGGED),
        "peak_mb_max": round(max(peaks), 1), "peak_mb_median": round(float(np.median(peaks)), 1),
        "slowest_case_s": round(max(seconds), 2), "examples": examples,
    }
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {opts.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
