"""scripts/example_compress_mlp.py: the digits MLP with its hidden layer swapped for each method (--quick)."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "example_compress_mlp.py"
METHODS = ("chord", "tsvd", "topk")


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("example_compress_mlp", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["example_compress_mlp"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick_run(example, tmp_path_factory):
    out = tmp_path_factory.mktemp("mlp") / "compress_mlp.json"
    keep = {}
    rc = example.main(["--quick", "--methods", ",".join(METHODS), "--budget", "chord", "--out", str(out)], keep=keep)
    assert rc == 0
    return json.loads(out.read_text()), keep


def test_the_report_has_a_finite_row_per_method_within_budget(quick_run):
    report, _ = quick_run
    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == {"dense", *METHODS}
    assert rows["dense"]["params"] == 256 * 256
    for name in METHODS:
        r = rows[name]
        assert r["status"] == "ok" and r["budget"] == "chord" and r["budget_params"] == report["chord_budget"] == 18432
        assert 0 < r["params"] <= r["budget_params"]
        assert r["compression"] == pytest.approx(65536 / r["params"])
        for key in ("rel_error", "acc_before", "acc_after", "latency_ms", "latency_vs_dense", "swap_max_abs_diff"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), (name, key, r[key])
        assert 0 <= r["acc_before"] <= 1 and 0 <= r["acc_after"] <= 1 and 0 <= r["rel_error"] <= 1
        assert r["rel_error"] == pytest.approx(r["rel_error_method"], rel=1e-6)
    assert report["machine"]["torch"] == torch.__version__


def test_each_swapped_layer_is_x_times_the_transposed_approximation_plus_the_bias(example, quick_run):
    report, keep = quick_run
    assert set(keep) == {(name, "chord") for name in METHODS}
    for (name, _), kept in keep.items():
        A_hat, layer, x = kept["approximation"], kept["layer"], kept["x"]
        assert layer.params == A_hat.params and layer.bias.shape == (256,)
        with torch.no_grad():
            got = layer(x).double()
        b = kept["bias"].double()  # the trained network's
        assert torch.equal(layer.bias.detach(), kept["bias"])
        want = x.double() @ torch.from_numpy(A_hat.to_dense().astype(np.float64)).T + b
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_the_bias_is_the_trained_layers(example):
    linear = torch.nn.Linear(256, 256)
    import sfa_cli

    A_hat = sfa_cli.top_k(linear.weight.detach().numpy(), 1000)
    layer = example.swap_layer(linear, A_hat)
    assert layer.dtype == torch.float32 and torch.equal(layer.bias, linear.bias)
    assert layer.bias.data_ptr() != linear.bias.data_ptr()  # copied, not shared
