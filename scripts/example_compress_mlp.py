#!/usr/bin/env python
"""Compress one layer of a trained network: the digits MLP, every sfa method at equal budget.

Trains a small MLP on scikit-learn's bundled digits (8 x 8 images, 10 classes;
standardized, a fixed stratified train/test split):

    64 -> 256 (Linear + ReLU) -> 256 x 256 hidden (Linear + ReLU) -> 10

with Adam, then replaces the 256 x 256 hidden layer by each method at equal
parameter budget: the weight W (``nn.Linear``'s, so the layer is ``x W^T + b``)
is approximated by the method (:func:`sfa_cli.run_method`), wrapped as
``FactorizedLinear.from_approximation(A_hat, bias=True)`` with the original bias
copied, and the network is evaluated right after the swap and again after a few
epochs of fine-tuning the whole network (Adam, a smaller step). Each method starts
from the same trained network.

The table gives, per method and budget: the layer's parameters (its bias not
counted) and the compression against the dense 65,536, the relative error
||W - A_hat||_F / ||W||_F, the test accuracy before and after fine-tuning, and the
forward latency of the layer alone (median of repeats, batch 256, one thread)
against the dense ``nn.Linear`` (timed right after it, under the same load). The dense row is the trained network itself,
fine-tuned for the same epochs at the same step (so the gain of fine-tuning alone is
visible). Everything runs on one torch thread by default (``--threads``). JSON goes
to ``--out``.

Usage:
    python scripts/example_compress_mlp.py                       # all methods, Chord budget and 10%
    python scripts/example_compress_mlp.py --methods chord,tsvd,topk --budget chord
    python scripts/example_compress_mlp.py --quick --methods tsvd,topk --out /tmp/mlp.json   # a smoke test

``--budget`` is a comma list: ``chord`` (the Chord budget of n = 256, 18,432
parameters), a fraction of n^2 (``0.1``) or a parameter count.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sfa_cli  # noqa: E402
from sfa_cli.approximations.patterns import chord_budget, resolve_budget  # noqa: E402
from sfa_cli.methods.registry import METHODS  # noqa: E402
from sfa_cli.nn import FactorizedLinear  # noqa: E402

HIDDEN = 256
DEFAULT_OUT = ROOT / "docs" / "bench" / "compress_mlp.json"


# -- data and model --------------------------------------------------------------------------

def load_data(seed: int, test_size: float = 0.2):
    """Digits, standardized with the training set's mean and deviation; float32 tensors."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    X, y = load_digits(return_X_y=True)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=test_size, random_state=seed, stratify=y)
    scaler = StandardScaler().fit(X_tr)
    as_x = lambda a: torch.from_numpy(scaler.transform(a).astype(np.float32))  # noqa: E731
    return as_x(X_tr), torch.from_numpy(y_tr), as_x(X_te), torch.from_numpy(y_te)


def make_model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 10))


#: Index of the square hidden layer in the Sequential.
LAYER = 2


def train(model: nn.Module, X, y, *, epochs: int, lr: float, batch: int, seed: int) -> None:
    """Adam on the cross-entropy, mini-batches in a seeded order."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(X), generator=gen).split(batch):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, X, y) -> float:
    model.eval()
    return float((model(X).argmax(1) == y).float().mean())


@torch.no_grad()
def hidden_input(model: nn.Sequential, X) -> torch.Tensor:
    """What the hidden layer sees: ReLU(first layer)."""
    return model[1](model[0](X))


# -- the swap --------------------------------------------------------------------------------

def swap_layer(linear: nn.Linear, A_hat) -> FactorizedLinear:
    """``FactorizedLinear`` of A_hat (approximating linear.weight) with linear's bias copied, in its dtype."""
    layer = FactorizedLinear.from_approximation(A_hat, bias=True, dtype=linear.weight.dtype)
    with torch.no_grad():
        layer.bias.copy_(linear.bias)
    return layer


@torch.no_grad()
def latency_ms(layer: nn.Module, *, batch: int = 256, repeats: int = 50, warmup: int = 5) -> float:
    """Median milliseconds of one forward pass of ``layer`` on a (batch, 256) input, one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.randn(batch, HIDDEN, generator=torch.Generator().manual_seed(0))
        layer.eval()
        for _ in range(warmup):
            layer(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            layer(x)
            times.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(times)
    finally:
        torch.set_num_threads(threads)


def _budget_value(text: str):
    text = text.strip()
    if text == "chord":
        return None
    value = float(text)
    return value if value < 1 else int(value)


def run(args, keep: dict | None = None) -> dict:
    """The experiment; returns the report (what --out holds).

    With ``keep`` a dict, keep[(method, budget label)] gets the approximation, the
    swapped layer before fine-tuning (a copy), the hidden-layer test inputs and the
    trained bias, so a caller can check the swap against ``x @ A_hat.to_dense().T + b``.
    """
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    X_tr, y_tr, X_te, y_te = load_data(args.seed)
    model = make_model(args.seed)
    t0 = time.perf_counter()
    train(model, X_tr, y_tr, epochs=args.epochs, lr=args.lr, batch=args.batch, seed=args.seed)
    train_seconds = time.perf_counter() - t0
    base_acc = accuracy(model, X_te, y_te)
    dense_layer = model[LAYER]
    W = dense_layer.weight.detach().numpy().astype(np.float64)  # (out, in): the layer is x W^T + b
    W_norm = float(np.linalg.norm(W))
    x_hidden = hidden_input(model, X_te)
    repeats = args.repeats
    dense_ms = latency_ms(dense_layer, repeats=repeats)

    ft_lr = args.lr * args.finetune_lr_factor
    dense_ft = copy.deepcopy(model)
    train(dense_ft, X_tr, y_tr, epochs=args.finetune_epochs, lr=ft_lr, batch=args.batch, seed=args.seed + 1)
    rows = [{
        "method": "dense", "budget": None, "budget_params": HIDDEN * HIDDEN, "status": "ok",
        "params": HIDDEN * HIDDEN, "compression": 1.0, "rel_error": 0.0,
        "acc_before": base_acc, "acc_after": accuracy(dense_ft, X_te, y_te),
        "latency_ms": dense_ms, "latency_vs_dense": 1.0, "fit_seconds": 0.0, "finetune_seconds": None,
        "swap_max_abs_diff": 0.0, "note": "the trained nn.Linear; 'after' is the same fine-tuning",
    }]
    fit_options = {"max_iter": args.max_iter} if args.max_iter else None
    W_fit = W.astype(np.float32)  # the methods keep the input's dtype: that of the network
    for budget_text in args.budget.split(","):
        budget = resolve_budget(HIDDEN, _budget_value(budget_text))
        label = budget_text.strip()
        for name in args.methods.split(","):
            name = name.strip()
            row = {"method": name, "budget": label, "budget_params": budget}
            res = sfa_cli.run_method(W_fit, name, budget, seed=args.seed, fit_options=fit_options)
            row.update(status=res.status, fit_seconds=res.seconds, note=res.note)
            if res.status != "ok":
                rows.append(row)
                print(f"  {name:15s} {label:6s} {res.status}: {res.note}", flush=True)
                continue
            A_hat = res.approximation
            A = A_hat.to_dense().astype(np.float64)
            swapped = copy.deepcopy(model)
            layer = swap_layer(dense_layer, A_hat)
            swapped[LAYER] = layer
            with torch.no_grad():
                got = layer(x_hidden).double()
                want = x_hidden.double() @ torch.from_numpy(A).T + dense_layer.bias.double()
            if keep is not None:
                keep[name, label] = {"approximation": A_hat, "layer": copy.deepcopy(layer), "x": x_hidden.clone(),
                                     "bias": dense_layer.bias.detach().clone()}
            row.update(params=layer.params, compression=HIDDEN * HIDDEN / layer.params,
                       rel_error=float(np.linalg.norm(W - A)) / W_norm, rel_error_method=res.rel_error,
                       swap_max_abs_diff=float((got - want).abs().max()),
                       acc_before=accuracy(swapped, X_te, y_te), latency_ms=latency_ms(layer, repeats=repeats),
                       dense_latency_ms=latency_ms(dense_layer, repeats=repeats))  # next to it: the same load
            row["latency_vs_dense"] = row["latency_ms"] / row["dense_latency_ms"]
            t0 = time.perf_counter()
            train(swapped, X_tr, y_tr, epochs=args.finetune_epochs, lr=ft_lr, batch=args.batch, seed=args.seed + 1)
            row["finetune_seconds"] = time.perf_counter() - t0
            row["acc_after"] = accuracy(swapped, X_te, y_te)
            rows.append(row)
            print(f"  {name:15s} {label:6s} params {row['params']:6d}  rel.err {row['rel_error']:.3f}  "
                  f"acc {row['acc_before']:.3f} -> {row['acc_after']:.3f}  ({res.seconds:.1f} s fit)", flush=True)
    return {
        "command": " ".join(["python scripts/example_compress_mlp.py", *args.argv]),
        "config": {k: v for k, v in vars(args).items() if k not in ("argv", "out")},
        "model": f"64 -> {HIDDEN} -> {HIDDEN}x{HIDDEN} -> 10 (ReLU), Adam lr {args.lr}, batch {args.batch}",
        "data": {"dataset": "sklearn digits", "train": len(X_tr), "test": len(X_te)},
        "chord_budget": chord_budget(HIDDEN)["params"],
        "train_seconds": train_seconds,
        "seconds": time.perf_counter() - t_start,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "rows": rows,
    }


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def table(report: dict) -> str:
    """The report as a Markdown table."""
    head = ("| method | budget | params | compression | rel. error | acc. after swap | acc. after fine-tune "
            "| latency (ms) | vs dense |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | {r['budget']} = {r['budget_params']:,} | - | - | - | - | - | - | {r['status']} |")
            continue
        budget = f"{r['budget']} = {r['budget_params']:,}" if r["budget"] else "-"
        lines.append(f"| {r['method']} | {budget} | {r['params']:,} | {_fmt(r['compression'], '.1f')}x "
                     f"| {_fmt(r['rel_error'], '.3f')} | {100 * r['acc_before']:.1f}% | {100 * r['acc_after']:.1f}% "
                     f"| {_fmt(r['latency_ms'], '.3f')} | {_fmt(r['latency_vs_dense'], '.2f')}x |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=30, help="training epochs of the MLP (default 30)")
    p.add_argument("--finetune-epochs", type=int, default=5, help="fine-tuning epochs after the swap (default 5)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list of sfa methods (default: all)")
    p.add_argument("--budget", default="chord,0.1",
                   help="comma list: chord, a fraction of n^2, or a parameter count (default chord,0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam step of the training (default 1e-3)")
    p.add_argument("--finetune-lr-factor", type=float, default=0.3, help="fine-tuning step = lr x this (default 0.3)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--max-iter", type=int, default=None, help="max_iter of the iterative fits (default: theirs)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the training, the fits and the fine-tuning (default 1: this small network "
                        "trains 5-25x slower on two threads when another process shares the cores); the latency is "
                        "always measured on one thread")
    p.add_argument("--repeats", type=int, default=50, help="timed forward passes per layer (default 50)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke test: 2 epochs, 1 fine-tuning epoch, 20 iterations per fit, 5 timed passes")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON report (default {DEFAULT_OUT.relative_to(ROOT)})")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.epochs, args.finetune_epochs, args.repeats = 2, 1, 5
        args.max_iter = args.max_iter or 20
    unknown = [m for m in args.methods.split(",") if m.strip() not in METHODS]
    if unknown:
        p.error(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    return args


def main(argv=None, keep: dict | None = None) -> int:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    try:
        report = run(args, keep=keep)
    finally:
        torch.set_num_threads(threads)
    print()
    print(table(report))
    m = report["machine"]
    print(f"\n{m['cpus']} CPUs ({m['processor']}), torch {m['torch']}; training {report['train_seconds']:.1f} s, "
          f"total {report['seconds']:.1f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
