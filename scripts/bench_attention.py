"""Long-sequence benchmark: Chord sparse-factor mixing against a softmax Transformer.

Two synthetic tasks of the paper (Khalitov et al. 2022, section 5), at
sequence lengths 2^7 .. 2^12 on CPU (2^14 with a GPU):

* adding: every position holds a random value in [-1, 1] and a 0/1 marker;
  two positions are marked; the target is 0.5 + (v_1 + v_2) / 4 (the paper's
  scaling, in [0, 1]). An answer counts as wrong when it is 0.04 or more off
  (the paper's criterion); predicting the mean is wrong 85% of the time.
* order (temporal order): tokens a, b, c, d at random, except two positions
  holding X or Y; the class is the ordered pair (XX, XY, YX, YY). Chance: 75% error.

Both models are ``sfa_cli.nn.SequenceModel`` with the same embedding, width,
depth, feed-forward layer, pooling and head; they differ only in the token
mixer: ``ChordMixing`` (product of data-dependent Chord factors) or
``SoftmaxAttention`` (``torch.nn.functional.scaled_dot_product_attention``).
Each (task, length, model) is trained from the same seed for a fixed number
of Adam steps on freshly sampled batches and tested on a fixed test set.

Reported per run: test error (and MSE for adding), median time per training
batch (forward + backward + step), and memory: on CUDA the peak allocated
memory during training; on CPU the bytes of activations saved for backward
in one training forward (``sfa_cli.nn.SavedTensorBytes``), the allocator-free
measure of activation memory.

Example:
    python scripts/bench_attention.py                       # CPU default: ~9 min wall, 7 min CPU on 2 idle cores
    python scripts/bench_attention.py --lengths 128,256 --steps 100 --tasks adding
    python scripts/bench_attention.py --device cuda --lengths 128,256,512,1024,2048,4096,8192,16384
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sfa_cli.approximations.kernels import resolve_device
from sfa_cli.nn import SavedTensorBytes, SequenceModel

TASKS = ("adding", "order")
MODELS = ("chord", "softmax")
ADDING_TOLERANCE = 0.04


# ---------------------------------------------------------------- data

def _two_positions(batch: int, n: int, gen: torch.Generator):
    """Two distinct random positions per sequence, as (first, second) with first < second."""
    p1 = torch.randint(0, n, (batch,), generator=gen)
    p2 = (p1 + torch.randint(1, n, (batch,), generator=gen)) % n
    return torch.minimum(p1, p2), torch.maximum(p1, p2)


def adding_batch(batch: int, n: int, gen: torch.Generator):
    """x (batch, n, 2) = (value, marker) floats; y (batch,) = 0.5 + (v_first + v_second) / 4."""
    values = torch.rand(batch, n, generator=gen) * 2 - 1
    first, second = _two_positions(batch, n, gen)
    rows = torch.arange(batch)
    marker = torch.zeros(batch, n)
    marker[rows, first] = 1.0
    marker[rows, second] = 1.0
    y = 0.5 + (values[rows, first] + values[rows, second]) / 4
    return torch.stack([values, marker], dim=-1), y


def order_batch(batch: int, n: int, gen: torch.Generator):
    """x (batch, n) token ids (a, b, c, d = 0..3, X = 4, Y = 5); y (batch,) class 2 * [first is Y] + [second is Y]."""
    x = torch.randint(0, 4, (batch, n), generator=gen)
    first, second = _two_positions(batch, n, gen)
    s1 = torch.randint(0, 2, (batch,), generator=gen)
    s2 = torch.randint(0, 2, (batch,), generator=gen)
    rows = torch.arange(batch)
    x[rows, first] = 4 + s1
    x[rows, second] = 4 + s2
    return x, 2 * s1 + s2


BATCHES = {"adding": adding_batch, "order": order_batch}


def build_model(task: str, mixer: str, n: int, args, mixer_options: dict | None = None) -> SequenceModel:
    common = dict(mixer=mixer, dim=args.dim, depth=args.depth, max_len=n, pooling=args.pooling, mixer_options=mixer_options)
    if mixer == "chord":
        common["mixer_options"] = {"normalize": args.normalize, "residual": args.residual, **(mixer_options or {})}
    if task == "adding":
        return SequenceModel(1, in_features=2, positional=None, **common)
    return SequenceModel(4, vocab_size=6, positional="sinusoidal", **common)


def loss_fn(task: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if task == "adding":
        return F.mse_loss(out.squeeze(-1), y)
    return F.cross_entropy(out, y)


# ---------------------------------------------------------------- one run

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(task: str, mixer: str, n: int, steps: int, args, device, test_set) -> dict:
    torch.manual_seed(args.seed)
    model = build_model(task, mixer, n, args).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed + 1)
    make = BATCHES[task]
    times, losses = [], []
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    done, capped, error = 0, False, None
    model.train()
    try:
        for step in range(steps):
            x, y = make(args.batch, n, gen)
            x, y = x.to(device), y.to(device)
            _sync(device)
            t0 = time.perf_counter()
            loss = loss_fn(task, model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            _sync(device)
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())
            done = step + 1
            if args.max_seconds and time.perf_counter() - started > args.max_seconds and done < steps:
                capped = True
                break
    except RuntimeError as exc:  # out of memory is a result, not a crash of the benchmark
        error = str(exc).splitlines()[0][:200]
    train_seconds = time.perf_counter() - started
    row = {
        "task": task, "n": n, "model": mixer, "params": sum(p.numel() for p in model.parameters()),
        "steps": done, "steps_planned": steps, "time_capped": capped, "error_message": error,
        "train_seconds": round(train_seconds, 2),
        "sec_per_batch": statistics.median(times[2:] or times) if times else None,
        "final_train_loss": statistics.fmean(losses[-20:]) if losses else None,
    }
    if device.type == "cuda":
        row["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        x, _ = make(args.batch, n, torch.Generator().manual_seed(0))
        with SavedTensorBytes() as saved:
            out = model(x.to(device))
        del out
        row["saved_act_mb"] = saved.bytes / 2**20
    if error is None:
        row.update(evaluate(task, model, test_set, device, args.batch))
    return row


@torch.no_grad()
def evaluate(task: str, model, test_set, device, batch: int) -> dict:
    model.eval()
    x_all, y_all = test_set
    outs = [model(x_all[i:i + batch].to(device)).float().cpu() for i in range(0, len(y_all), batch)]
    out = torch.cat(outs)
    if task == "adding":
        pred = out.squeeze(-1)
        return {"test_error": float(((pred - y_all).abs() >= ADDING_TOLERANCE).float().mean()),
                "test_mse": float(((pred - y_all) ** 2).mean())}
    return {"test_error": float((out.argmax(-1) != y_all).float().mean()),
            "test_loss": float(F.cross_entropy(out, y_all))}


def explicit_attention_mb(task: str, n: int, args) -> float:
    """Saved-activation MiB of the same Transformer with the N x N softmax matrix formed explicitly.

    A reference for what O(N^2) attention memory would be (the fused kernel
    avoids it). Measured at batch 1 and scaled to --batch: saved activations
    are proportional to the batch.
    """
    torch.manual_seed(args.seed)
    model = build_model(task, "softmax", n, args, mixer_options={"fused": False})
    x, _ = BATCHES[task](1, n, torch.Generator().manual_seed(0))
    with SavedTensorBytes() as saved:
        out = model(x)
    del out
    return saved.bytes * args.batch / 2**20


# ---------------------------------------------------------------- main

def default_steps(n: int, steps: int | None) -> int:
    """Steps per length: the same for both models; fewer at the longest lengths to fit a CPU budget."""
    if steps is not None:
        return steps
    return {128: 600, 256: 600, 512: 300, 1024: 150, 2048: 50, 4096: 20}.get(n, 600 if n < 128 else 20)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[-1:]))
    p.add_argument("--tasks", default="adding,order", help="comma list of adding, order (default: both)")
    p.add_argument("--lengths", default=None,
                   help="comma list of sequence lengths (default 128..4096 on CPU, 128..16384 on CUDA)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps at every length (default: 600 up to N=256, then 300, 150, 50, 20 for 512..4096 and longer)")
    p.add_argument("--max-seconds", type=float, default=60.0,
                   help="stop a run's training after this many seconds (reported as time_capped; 0 = no cap)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--pooling", default="mean", choices=["mean", "max", "first"])
    p.add_argument("--normalize", default="softmax", choices=["softmax", "scale", "none"], help="ChordMixing row normalisation")
    p.add_argument("--residual", action="store_true", help="ChordMixing with the value added back after every factor")
    p.add_argument("--models", default="chord,softmax")
    p.add_argument("--test-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", default="bench_out/attention.json", help="JSON output path")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    tasks = [t for t in args.tasks.split(",") if t]
    models = [m for m in args.models.split(",") if m]
    for t in tasks:
        if t not in TASKS:
            sys.exit(f"unknown task {t!r}; choose from {', '.join(TASKS)}")
    for m in models:
        if m not in MODELS:
            sys.exit(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    if args.lengths:
        lengths = [int(s) for s in args.lengths.split(",")]
    else:
        lengths = [2**k for k in range(7, 15 if device.type == "cuda" else 13)]
    machine = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(),
    }
    print(f"# device {machine['device']} ({machine['device_name']}), torch {machine['torch']}, "
          f"{machine['torch_threads']} threads; batch {args.batch}, dim {args.dim}, depth {args.depth}, lr {args.lr}, "
          f"pooling {args.pooling}, chord normalize={args.normalize} residual={args.residual}", flush=True)
    rows = []
    t_all = time.perf_counter()
    for task in tasks:
        for n in lengths:
            steps = default_steps(n, args.steps)
            test_set = BATCHES[task](args.test_size, n, torch.Generator().manual_seed(10_000 + args.seed))
            ref_mb = explicit_attention_mb(task, n, args) if device.type == "cpu" else None
            for mixer in models:
                row = run_one(task, mixer, n, steps, args, device, test_set)
                row["explicit_softmax_saved_act_mb"] = ref_mb
                rows.append(row)
                print(_line(row), flush=True)
    total = time.perf_counter() - t_all
    print()
    print(render_table(rows, device))
    print(f"\ntotal wall time {total:.0f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "args": vars(args), "total_seconds": round(total, 1), "results": rows}, indent=2))
    print(f"wrote {out}")
    return 0


def _line(r: dict) -> str:
    err = "FAILED: " + r["error_message"] if r.get("error_message") else f"test error {r['test_error']:.3f}"
    cap = " (time cap)" if r["time_capped"] else ""
    return (f"  {r['task']:6s} N={r['n']:<6d} {r['model']:7s} steps {r['steps']}/{r['steps_planned']}{cap}  {err}  "
            f"{r['sec_per_batch'] * 1e3 if r['sec_per_batch'] else float('nan'):.0f} ms/batch")


def render_table(rows, device) -> str:
    mem = "peak MiB" if device.type == "cuda" else "saved act MiB"
    head = f"| task | N | model | params | steps | test error | {'test MSE' } | ms/batch | {mem} |"
    if device.type == "cpu":
        head += " explicit-softmax saved MiB |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        steps = f"{r['steps']}" + ("*" if r["time_capped"] else "")
        err = "fail" if r.get("error_message") else f"{r['test_error']:.3f}"
        mse = f"{r['test_mse']:.4f}" if "test_mse" in r else "-"
        ms = f"{r['sec_per_batch'] * 1e3:.0f}" if r["sec_per_batch"] else "-"
        m = r.get("peak_mem_mb", r.get("saved_act_mb"))
        line = f"| {r['task']} | {r['n']} | {r['model']} | {r['params']} | {steps} | {err} | {mse} | {ms} | {m:.1f} |"
        if device.type == "cpu":
            line += f" {r['explicit_softmax_saved_act_mb']:.1f} |"
        lines.append(line)
    lines.append("(* = training stopped by --max-seconds before the planned steps)")
    if device.type == "cpu":
        lines.append("saved act MiB: activations kept for backward by one training forward at the benchmark batch; "
                     "explicit-softmax: the same Transformer forming the N x N matrix (measured at batch 1, x batch)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
