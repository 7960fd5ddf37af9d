"""`vtkit rank`: rank definitions, ranks.json, the spectra check and the CLI."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from sweepfile import TOKEN_COUNTS, write_sweep
from typer.testing import CliRunner

from vtkit.cli.main import app
from vtkit.errors import DataError
from vtkit.progress import RecordingReporter
from vtkit.rank import (
    RankConfig,
    compute_ranks,
    effective_rank,
    effective_ranks,
    numerical_rank,
    numerical_ranks,
    singular_values_float64,
    spectra_difference,
)

runner = CliRunner()


def _low_rank(rng, rows=64, cols=48, rank=5, noise=1e-9):
    return (rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, cols))
            + noise * rng.standard_normal((rows, cols)))


def test_numerical_rank_threshold_semantics():
    s = np.linalg.svd(_low_rank(np.random.default_rng(0)), compute_uv=False)
    assert numerical_rank(s, 1e-3) == 5
    # Far below the noise: every tiny singular value counts.
    assert numerical_rank(s, 1e-12) == 48
    # Strictly above threshold * max: the largest value alone survives a cut just below 1.
    assert numerical_rank(np.array([4.0, 2.0, 1.0]), 0.5) == 1
    assert numerical_rank(np.array([4.0, 2.1, 1.0]), 0.5) == 2
    assert numerical_rank(np.zeros(7), 1e-3) == 0
    with pytest.raises(ValueError):
        numerical_rank(s, 1.5)


def test_float16_rounding_noise_is_rank_at_1e5_but_not_at_1e3():
    """Why the default is 1e-3 (docs/rank.md): float16 storage alone adds rank at 1e-5."""
    a = _low_rank(np.random.default_rng(1), rows=128, cols=512, noise=0.0)
    s = np.linalg.svd(a.astype(np.float16).astype(np.float64), compute_uv=False)
    assert numerical_rank(s, 1e-3) == 5
    assert numerical_rank(s, 1e-5) > 5


def test_effective_rank_of_known_spectra():
    assert effective_rank(np.ones(7)) == pytest.approx(7.0)
    assert effective_rank(np.array([3.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank(np.array([2.0, 2.0, 0.0, 0.0])) == pytest.approx(2.0)
    assert effective_rank(np.zeros(4)) == 0.0
    values = effective_ranks(np.array([[1.0, 1.0, 1.0], [5.0, 0.0, 0.0], [2.0, 1.0, 0.0]]))
    p = np.array([2.0, 1.0]) / 3.0
    np.testing.assert_allclose(values, [3.0, 1.0, np.exp(-(p * np.log(p)).sum())])


def test_vectorised_ranks_match_scalar_ones():
    rng = np.random.default_rng(2)
    spectra = np.sort(np.abs(rng.standard_normal((20, 30))) ** 6, axis=1)[:, ::-1]
    assert numerical_ranks(spectra, 1e-2).tolist() == [numerical_rank(s, 1e-2) for s in spectra]
    np.testing.assert_allclose(effective_ranks(spectra), [effective_rank(s) for s in spectra])


def test_spectra_difference():
    matrices = np.random.default_rng(3).standard_normal((2, 6, 10))
    exact = np.linalg.svd(matrices, compute_uv=False)
    assert spectra_difference(matrices, exact) < 1e-12
    tampered = exact.copy()
    tampered[1, 2] += 0.1 * exact[1, 0]
    assert spectra_difference(matrices, tampered) == pytest.approx(0.1)


def test_compute_ranks_writes_ranks_json(tmp_path):
    write_sweep(tmp_path, n_image=6, rank=5, hidden=32)
    reporter = RecordingReporter()
    result = compute_ranks(RankConfig(tmp_path), reporter)
    doc = json.loads((tmp_path / "ranks.json").read_text())
    assert result.path == tmp_path / "ranks.json"
    assert doc["token_counts"] == list(TOKEN_COUNTS)
    assert doc["meta"]["threshold"] == 1e-3
    assert doc["meta"]["n_image_questions"] == 6
    assert doc["meta"]["scorer"] == "l2" and doc["meta"]["model_id"] == "llava-tiny-hf"
    assert doc["meta"]["sweep_fingerprint"] == "sweep-0-l2"
    assert doc["meta"]["layers"] == [0, 3]
    assert doc["image_question_ids"] == [f"q{i:04d}" for i in range(6)]
    for layer in ("first_layer", "last_layer"):
        block = doc[layer]
        for key in ("numerical_rank_mean", "numerical_rank_std", "effective_rank_mean",
                    "effective_rank_std"):
            assert len(block[key]) == len(TOKEN_COUNTS)
        per_question = np.array(block["numerical_rank_per_question"])
        assert per_question.shape == (len(TOKEN_COUNTS), 6)
        # Rank-5 products stored through float16: rank 5 at the default threshold.
        assert (per_question == 5).all()
        assert block["numerical_rank_std"] == [0.0] * len(TOKEN_COUNTS)
        assert all(1.0 < e <= 5.0 for e in block["effective_rank_mean"])
    check = doc["spectra_check"]
    assert check["matrices_checked"] == 2 * 2 * len(TOKEN_COUNTS)
    # Stored spectra came from float32 SVD of the kept float16 matrices.
    assert check["max_relative_difference"] < 1e-5 and check["ok"]
    title, columns, rows = reporter.tables[0]
    assert columns[0] == "k" and [row[0] for row in rows] == list(TOKEN_COUNTS)


def test_threshold_changes_ranks_without_new_sweep(tmp_path):
    write_sweep(tmp_path, rank=5)
    low = compute_ranks(RankConfig(tmp_path, threshold=1e-12))
    doc = json.loads((tmp_path / "ranks.json").read_text())
    assert doc["meta"]["threshold"] == 1e-12
    # float16 rounding makes every k x 32 matrix full rank at 1e-12.
    assert low.layers["first_layer"].numerical[0].tolist() == [32] * 6
    assert low.layers["first_layer"].numerical[-1].tolist() == [20] * 6


def test_spectra_check_catches_a_tampered_spectrum(tmp_path):
    path = write_sweep(tmp_path)
    with h5py.File(path, "r+") as f:
        spectra = f["spectra/last_layer/k40"]
        values = spectra[()]
        values[1, 0] *= 1.5
        spectra[...] = values
    reporter = RecordingReporter()
    result = compute_ranks(RankConfig(tmp_path), reporter)
    assert result.spectra_check.max_relative_difference == pytest.approx(0.5, rel=1e-3)
    assert result.spectra_check.per_layer["first_layer"] < 1e-5
    assert not result.spectra_check.ok
    assert any(kind == "warn" and "do not match" in text for kind, text in reporter.messages)


def test_no_kept_matrices_means_nothing_checked(tmp_path):
    write_sweep(tmp_path, n_keep=0)
    check = compute_ranks(RankConfig(tmp_path)).spectra_check
    assert check.matrices_checked == 0 and check.max_relative_difference is None


def test_missing_incomplete_or_broken_sweep(tmp_path):
    with pytest.raises(DataError, match="sweep.h5.*vtkit sweep"):
        compute_ranks(RankConfig(tmp_path))
    write_sweep(tmp_path, complete=False)
    with pytest.raises(DataError, match="incomplete.*vtkit sweep"):
        compute_ranks(RankConfig(tmp_path))
    path = write_sweep(tmp_path)
    with h5py.File(path, "r+") as f:
        del f["spectra/first_layer/k300"]
    with pytest.raises(DataError, match="spectra/first_layer/k300"):
        compute_ranks(RankConfig(tmp_path))
    write_sweep(tmp_path, n_image=0, n_keep=0)
    with pytest.raises(DataError, match="no image questions"):
        compute_ranks(RankConfig(tmp_path))


def test_cli_rank(tmp_path):
    write_sweep(tmp_path)
    result = runner.invoke(app, ["rank", "--output-dir", str(tmp_path), "--threshold", "1e-2",
                                 "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["meta"]["threshold"] == 1e-2
    assert len(doc["first_layer"]["numerical_rank_mean"]) == len(TOKEN_COUNTS)
    assert "numerical_rank_per_question" not in doc["first_layer"]
    assert (tmp_path / "ranks.json").is_file()


@pytest.mark.parametrize("threshold", ["0", "1", "-0.1", "2"])
def test_cli_rank_rejects_bad_threshold(tmp_path, threshold):
    write_sweep(tmp_path)
    result = runner.invoke(app, ["rank", "--output-dir", str(tmp_path),
                                 f"--threshold={threshold}"])
    assert result.exit_code == 2
    assert "--threshold" in result.stderr


def test_cli_rank_missing_and_incomplete_sweep(tmp_path):
    result = runner.invoke(app, ["rank", "--output-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert result.stderr.startswith("error:") and "vtkit sweep" in result.stderr
    write_sweep(tmp_path, complete=False)
    result = runner.invoke(app, ["rank", "--output-dir", str(tmp_path)])
    assert result.exit_code == 1 and "incomplete" in result.stderr


def test_cli_rank_help():
    result = runner.invoke(app, ["rank", "--help"])
    assert result.exit_code == 0
    assert "--threshold" in result.stdout and "--output-dir" in result.stdout
    assert "vtkit rank" in result.stdout


@pytest.mark.parametrize("shape", [(3, 20, 50), (3, 50, 20)])
def test_float64_spectra_match_numpy_svd(shape):
    rng = np.random.default_rng(4)
    matrices = rng.standard_normal(shape[:2] + (4,)) @ rng.standard_normal((shape[0], 4, shape[2]))
    exact = np.linalg.svd(matrices, compute_uv=False)
    values = singular_values_float64(matrices)
    assert values.shape == exact.shape
    np.testing.assert_allclose(values, exact, rtol=0, atol=1e-7 * exact.max())
