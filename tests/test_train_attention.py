"""scripts/train_attention.py: runs stop at the criterion or the budget, and resume as if never stopped."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_attention.py"


@pytest.fixture(scope="module")
def trainer():
    spec = importlib.util.spec_from_file_location("train_attention", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_attention"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


ARGS = ["--batch", "8", "--dim", "8", "--max-sequences", "96", "--eval-every", "32", "--test-size", "16",
        "--checkpoint-seconds", "1000"]


@pytest.mark.parametrize("model", ["chord", "softmax"])
def test_a_run_resumed_after_a_stop_ends_as_an_uninterrupted_one(trainer, tmp_path, model):
    def run(name, *extra):
        out = tmp_path / name
        rc = trainer.main(["run", "--task", "order", "--n", "16", "--model", model, *ARGS, "--run-dir", str(out / "runs"),
                           "--out-dir", str(out / "results"), *extra])
        return rc, out / "results" / f"order-n16-{model}-s0.json"

    rc, whole = run("whole")
    assert rc == 0
    row = json.loads(whole.read_text())
    assert row["sequences_seen"] == 96 and row["task"] == "order" and row["n"] == 16 and row["model"] == model
    assert [p["sequences"] for p in row["curve"]] == [32, 64, 96]
    assert {"test_error", "solved", "seconds", "ms_per_step", "peak_memory_bytes"} <= row.keys()

    rc, parts = run("parts", "--stop-after", "0")  # one step, then a checkpoint
    assert rc == 0 and not parts.exists()
    with pytest.raises(SystemExit, match="--resume"):
        run("parts")
    rc, parts = run("parts", "--resume")
    resumed = json.loads(parts.read_text())
    assert [p["test_error"] for p in resumed["curve"]] == [p["test_error"] for p in row["curve"]]
    assert resumed["steps"] == row["steps"]


def test_plan_lists_the_runs_of_issue_18(trainer, capsys, tmp_path):
    trainer.main(["plan", "--print", "--run-dir", str(tmp_path / "r"), "--out-dir", str(tmp_path / "o")])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 16 and all(line.endswith("to do") for line in lines)
    assert any(line.startswith("adding-n1024-chord-s1") for line in lines)
