"""A matrix is validated once, where it enters: one `sfa fit` or `sfa compare` of a memory-mapped
.npy reads the file for validation once (the reader's NaN/Inf scan), not once per function."""
import numpy as np
import pytest

from sfa_cli import validation
import sfa_cli.io as sfa_io


@pytest.fixture
def scans(monkeypatch):
    """Counts the full validation passes over memory-mapped matrices."""
    counted = []
    to_array, checked_memmap = validation._to_array_or_sparse, sfa_io._checked_memmap

    def counting_to_array(obj, name):  # as_square_matrix's first step, before np.asarray drops the map
        if isinstance(obj, np.memmap):
            counted.append(("as_square_matrix", name))
        return to_array(obj, name)

    def counting_memmap(A, shown):
        counted.append(("reader", shown))
        return checked_memmap(A, shown)

    monkeypatch.setattr(validation, "_to_array_or_sparse", counting_to_array)
    monkeypatch.setattr(sfa_io, "_checked_memmap", counting_memmap)  # load_matrix calls it
    return counted


@pytest.fixture
def mapped(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "A.npy"
    np.save(path, rng.standard_normal((48, 48)))
    return path


@pytest.mark.parametrize("command", [
    ["fit", "--max-iter", "5"],
    ["fit", "--sampled", "--epochs", "1"],
    ["fit", "--method", "monarch"],
    ["compare", "--max-iter", "5"],
])
def test_one_command_scans_a_memory_map_once(run_cli, mapped, tmp_path, scans, command):
    extra = ["-o", tmp_path / "F.npz"] if command[0] == "fit" else []
    result = run_cli(command[0], mapped, *command[1:], *extra)
    assert result.exit_code == 0, result.output
    assert [kind for kind, _ in scans] == ["reader"], scans


def test_the_public_functions_still_validate_what_they_are_given():
    from sfa_cli.methods.low_rank import truncated_svd
    from sfa_cli.metrics import relative_error
    from sfa_cli.errors import SfaError

    A = np.eye(4)
    A[1, 2] = np.nan
    for call in (lambda: truncated_svd(A, 16), lambda: relative_error(A, None)):
        with pytest.raises(SfaError, match="NaN"):
            call()
    assert truncated_svd.trusted.__name__ == "truncated_svd"
