"""`vtkit rank`: rank measures, ranks.json, the spectra check and the CLI."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from sweepfile import TOKEN_COUNTS, write_sweep
from typer.testing import CliRunner

from vtkit.cache import spectra_dataset
from vtkit.cli.main import app
from vtkit.errors import DataError
from vtkit.progress import RecordingReporter
from vtkit.rank import (
    RankConfig,
    bootstrap_interval,
    bootstrap_weights,
    compute_ranks,
    correctness_table,
    dtype_warnings,
    effective_rank,
    effective_ranks,
    numerical_rank,
    numerical_ranks,
    singular_values_float64,
    spectra_difference,
    stable_rank,
    stable_ranks,
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
        spectra = f["spectra/attn_out/layer3/k40"]
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
        del f["spectra/attn_out/layer0/k300"]
    with pytest.raises(DataError, match="spectra/attn_out/layer0/k300"):
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


# ---------------------------------------------------------------------------------------------
# Every layer and tensor, several measures (sweep.h5 schema 3)


def _set_spectra(path, capture, layer, rows):
    """Replace every k's spectra of (capture, layer) with ``rows`` ([n_img, m], zero-padded or
    cut to each dataset's width)."""
    rows = np.asarray(rows, dtype=np.float32)
    with h5py.File(path, "r+") as f:
        for k in f["token_counts"][()]:
            dataset = f[spectra_dataset(capture, layer, int(k))]
            values = np.zeros(dataset.shape, dtype=np.float32)
            width = min(values.shape[1], rows.shape[1])
            values[:, :width] = rows[:, :width]
            dataset[...] = values


def test_stable_rank_of_known_spectra():
    assert stable_rank(np.array([2.0, 1.0, 1.0])) == pytest.approx(6 / 4)
    assert stable_rank(np.ones(9)) == pytest.approx(9.0)
    assert stable_rank(np.array([3.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert stable_rank(np.zeros(3)) == 0.0
    rng = np.random.default_rng(5)
    spectra = np.sort(np.abs(rng.standard_normal((10, 12))), axis=1)[:, ::-1]
    np.testing.assert_allclose(stable_ranks(spectra), [stable_rank(s) for s in spectra])
    # Never above the rank, never below 1 for a non-zero spectrum.
    assert ((stable_ranks(spectra) >= 1) & (stable_ranks(spectra) <= 12)).all()


def test_numerical_rank_at_several_thresholds(tmp_path):
    """A hand-built spectrum 1, 0.05, 0.005, 0.0005: rank 1, 2, 3, 4 at 1e-1 ... 1e-4."""
    path = write_sweep(tmp_path, n_image=3, n_keep=0)
    _set_spectra(path, "attn_out", 0, [[1.0, 0.05, 0.005, 0.0005]] * 3)
    result = compute_ranks(RankConfig(tmp_path, threshold=1e-2,
                                      more_thresholds=(1e-1, 1e-3, 1e-4)))
    doc = json.loads(result.path.read_text())
    assert doc["thresholds"] == [1e-2, 1e-1, 1e-3, 1e-4]
    assert doc["meta"]["threshold"] == 1e-2
    block = doc["measures"]["attn_out"]["0"]
    n_k = len(TOKEN_COUNTS)
    for name, rank in (("numerical_rank@0.1", 1), ("numerical_rank@0.01", 2),
                       ("numerical_rank@0.001", 3), ("numerical_rank@0.0001", 4)):
        assert block[name]["mean"] == [rank] * n_k and block[name]["std"] == [0.0] * n_k
    assert set(block) == {"numerical_rank@0.1", "numerical_rank@0.01", "numerical_rank@0.001",
                          "numerical_rank@0.0001", "effective_rank", "stable_rank"}
    # The headline (first) threshold drives the seed's curves and per_layer.
    assert doc["first_layer"]["numerical_rank_mean"] == [2.0] * n_k
    assert doc["per_layer"]["0"]["numerical_rank_mean"] == [2.0] * n_k
    s = np.array([1.0, 0.05, 0.005, 0.0005])
    np.testing.assert_allclose(block["stable_rank"]["mean"], (s ** 2).sum(), rtol=1e-6)
    np.testing.assert_allclose(block["effective_rank"]["mean"], effective_rank(s), rtol=1e-6)


def test_equal_spectra_give_effective_and_stable_rank_n(tmp_path):
    path = write_sweep(tmp_path, n_image=2, n_keep=0, layers=(0, 1, 2), num_layers=3)
    _set_spectra(path, "attn_out", 1, [[2.0] * 7, [2.0] * 7])
    block = compute_ranks(RankConfig(tmp_path)).measures["attn_out"][1].summaries
    np.testing.assert_allclose(block["effective_rank"]["mean"], 7.0, rtol=1e-6)
    np.testing.assert_allclose(block["stable_rank"]["mean"], 7.0, rtol=1e-6)
    assert block["numerical_rank@0.001"]["mean"] == [7.0] * len(TOKEN_COUNTS)


def test_measures_match_a_per_question_loop(tmp_path):
    """The vectorised per-(layer, k) blocks against scalar functions, question by question."""
    path = write_sweep(tmp_path, layers=(0, 1, 2, 3), captures=("attn_out", "hidden"), rank=4)
    doc = json.loads(compute_ranks(RankConfig(tmp_path, threshold=1e-3,
                                              more_thresholds=(1e-1,))).path.read_text())
    with h5py.File(path, "r") as f:
        for capture in ("attn_out", "hidden"):
            for layer in range(4):
                block = doc["measures"][capture][str(layer)]
                for i, k in enumerate(TOKEN_COUNTS):
                    spectra = f[spectra_dataset(capture, layer, k)][()]
                    expected = {
                        "numerical_rank@0.001": [numerical_rank(s, 1e-3) for s in spectra],
                        "numerical_rank@0.1": [numerical_rank(s, 1e-1) for s in spectra],
                        "effective_rank": [effective_rank(s) for s in spectra],
                        "stable_rank": [stable_rank(s) for s in spectra],
                    }
                    for name, values in expected.items():
                        assert block[name]["mean"][i] == pytest.approx(np.mean(values))
                        assert block[name]["std"][i] == pytest.approx(np.std(values))


def test_bootstrap_interval_contains_the_mean_and_is_seeded():
    rng = np.random.default_rng(6)
    values = rng.standard_normal((5, 40)) + np.arange(5)[:, None]
    weights = bootstrap_weights(40, samples=500, seed=3)
    low, high = bootstrap_interval(values, weights)
    mean = values.mean(axis=1)
    assert ((low < mean) & (mean < high)).all()
    # About 2 x 1.96 standard errors wide for unit-variance data.
    np.testing.assert_allclose(high - low, 2 * 1.96 * values.std(axis=1) / np.sqrt(40), rtol=0.3)
    again = bootstrap_interval(values, bootstrap_weights(40, samples=500, seed=3))
    other = bootstrap_interval(values, bootstrap_weights(40, samples=500, seed=4))
    np.testing.assert_array_equal(low, again[0])
    np.testing.assert_array_equal(high, again[1])
    assert not np.array_equal(low, other[0])
    # Each resample draws n items.
    assert (weights.sum(axis=1) == 40).all()


def test_ranks_json_intervals_are_seeded_and_bracket_the_mean(tmp_path):
    write_sweep(tmp_path, n_image=8, layers=(0, 1, 2, 3))
    first = json.loads(compute_ranks(RankConfig(tmp_path)).path.read_text())
    second = json.loads(compute_ranks(RankConfig(tmp_path)).path.read_text())
    reseeded = json.loads(compute_ranks(RankConfig(tmp_path, seed=9)).path.read_text())
    assert first["measures"] == second["measures"]
    assert first["meta"]["bootstrap_seed"] == 0 and reseeded["meta"]["bootstrap_seed"] == 9
    moved = 0
    for layer, block in first["measures"]["attn_out"].items():
        for name, summary in block.items():
            mean, low, high = (np.array(summary[key]) for key in ("mean", "ci95_low",
                                                                   "ci95_high"))
            assert (low <= mean + 1e-12).all() and (mean <= high + 1e-12).all()
            moved += summary != reseeded["measures"]["attn_out"][layer][name]
    assert moved  # another seed draws other resamples


def test_correctness_table_on_a_hand_built_correct(tmp_path):
    # Questions 0..3 have images (ranks 1, 2, 3, 4 at every k); 4 and 5 have none.
    correct = np.array([
        [True, True, True, True, False, False],    # k=576: all image questions right
        [True, False, True, False, True, True],    # k=300: right {1, 3}, wrong {2, 4}
        [False, False, False, True, True, True],   # k=40: right {4}, wrong {1, 2, 3}
        [False, False, False, False, True, True],  # k=20: all wrong
    ])
    path = write_sweep(tmp_path, n_questions=6, n_image=4, n_keep=0, correct=correct)
    _set_spectra(path, "attn_out", 3, [[1.0] * r + [1e-6] * (5 - r) for r in (1, 2, 3, 4)])
    doc = json.loads(compute_ranks(RankConfig(tmp_path)).path.read_text())
    table = doc["correctness"]["attn_out"]["3"]
    assert table["right_mean"] == [2.5, 2.0, 4.0, None]
    assert table["wrong_mean"] == [None, 3.0, 2.0, 2.5]
    assert table["n_right"] == [4, 2, 1, 0] and table["n_wrong"] == [0, 2, 3, 4]
    assert set(doc["correctness"]["attn_out"]) == {"0", "3"}


def test_correctness_table_function():
    table = correctness_table(np.array([[1.0, 2.0, 6.0]]), np.array([[True, False, True]]))
    assert table == {"right_mean": [3.5], "wrong_mean": [2.0], "n_right": [2], "n_wrong": [1]}


def test_per_layer_json_shape(tmp_path):
    """The exact shape of `per_layer` (held-out checks read it) and the other additions."""
    write_sweep(tmp_path, layers=(0, 1, 2, 3), captures=("attn_out", "attn_heads", "hidden"))
    result = runner.invoke(app, ["rank", "--output-dir", str(tmp_path), "--json",
                                 "--threshold", "1e-3,1e-2"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    stored = json.loads((tmp_path / "ranks.json").read_text())
    n_k = len(TOKEN_COUNTS)
    for doc in (printed, stored):
        assert doc["layers"] == [0, 1, 2, 3]
        assert doc["captures"] == ["attn_out", "attn_heads", "hidden"]
        assert doc["primary_capture"] == "attn_out"
        assert doc["thresholds"] == [1e-3, 1e-2] and doc["meta"]["threshold"] == 1e-3
        assert doc["warnings"] == []
        per_layer = doc["per_layer"]
        assert list(per_layer) == ["0", "1", "2", "3"]
        for layer, block in per_layer.items():
            assert list(block) == ["numerical_rank_mean", "effective_rank_mean",
                                   "stable_rank_mean"]
            assert all(len(v) == n_k and all(isinstance(x, float) for x in v)
                       for v in block.values())
            measures = doc["measures"]["attn_out"][layer]
            assert block["numerical_rank_mean"] == measures["numerical_rank@0.001"]["mean"]
            assert block["stable_rank_mean"] == measures["stable_rank"]["mean"]
        assert set(doc["measures"]) == set(doc["correctness"]) == set(doc["captures"])
        for capture in doc["captures"]:
            assert list(doc["measures"][capture]) == ["0", "1", "2", "3"]
            for block in doc["measures"][capture].values():
                assert list(block) == ["numerical_rank@0.001", "numerical_rank@0.01",
                                       "effective_rank", "stable_rank"]
                for summary in block.values():
                    assert list(summary) == ["mean", "std", "ci95_low", "ci95_high"]
                    assert all(len(v) == n_k for v in summary.values())
        # The seed's two curves: the smallest and the largest analysed layer.
        assert doc["first_layer"]["numerical_rank_mean"] == per_layer["0"]["numerical_rank_mean"]
        assert doc["last_layer"]["effective_rank_mean"] == per_layer["3"]["effective_rank_mean"]
    assert "numerical_rank_per_question" not in printed["first_layer"]
    assert printed["ranks_file"] == str(tmp_path / "ranks.json")


@pytest.mark.parametrize(("captures", "primary"), [
    (("attn_heads", "hidden"), "attn_heads"),
    (("attn_out", "hidden"), "attn_out"),
    (("hidden",), "hidden"),
])
def test_primary_capture(tmp_path, captures, primary):
    write_sweep(tmp_path, captures=captures, layers=(1, 2), num_layers=3)
    doc = json.loads(compute_ranks(RankConfig(tmp_path)).path.read_text())
    assert doc["primary_capture"] == primary
    assert list(doc["per_layer"]) == ["1", "2"]
    assert doc["first_layer"]["effective_rank_mean"] == \
        doc["measures"][primary]["1"]["effective_rank"]["mean"]


def test_one_analysed_layer_is_both_seed_curves(tmp_path):
    write_sweep(tmp_path, layers=(2,))
    doc = json.loads(compute_ranks(RankConfig(tmp_path)).path.read_text())
    assert doc["layers"] == [2] and doc["first_layer"] == doc["last_layer"]


def test_spectra_check_covers_every_tensor_and_layer(tmp_path):
    path = write_sweep(tmp_path, layers=(0, 1, 2, 3), captures=("attn_out", "hidden"))
    with h5py.File(path, "r+") as f:
        spectra = f[spectra_dataset("hidden", 2, 40)]
        values = spectra[()]
        values[0, 0] *= 1.5
        spectra[...] = values
    reporter = RecordingReporter()
    result = compute_ranks(RankConfig(tmp_path), reporter)
    check = result.spectra_check.to_json()
    assert check["matrices_checked"] == 2 * 4 * len(TOKEN_COUNTS) * 2
    assert check["per_capture_max_relative_difference"]["hidden"]["2"] == \
        pytest.approx(0.5, rel=1e-3)
    others = [v for capture, layers in check["per_capture_max_relative_difference"].items()
              for layer, v in layers.items() if (capture, layer) != ("hidden", "2")]
    assert len(others) == 7 and max(others) < 1e-5
    assert check["per_layer_max_relative_difference"]["first_layer"] < 1e-5
    assert not check["ok"]
    doc = json.loads(result.path.read_text())
    assert any("do not match" in w for w in doc["warnings"])


@pytest.mark.parametrize(("dtype", "thresholds", "warned"), [
    ("bfloat16", (1e-3,), [1e-3]),              # 1.25x the bf16 floor
    ("bfloat16", (1e-2, 2e-3, 3e-3), [2e-3]),
    ("torch.bfloat16", (1e-3,), [1e-3]),
    ("float16", (1e-3,), []),
    ("float16", (1e-3, 1e-4, 2e-4), [1e-4, 2e-4]),
    ("fp16", (1e-4,), [1e-4]),
    ("float32", (1e-3, 1e-6), []),
    (None, (1e-6,), []),
])
def test_dtype_warning(tmp_path, dtype, thresholds, warned):
    write_sweep(tmp_path, config={"dtype": dtype}, n_keep=0)
    reporter = RecordingReporter()
    result = compute_ranks(RankConfig(tmp_path, threshold=thresholds[0],
                                      more_thresholds=thresholds[1:]), reporter)
    doc = json.loads(result.path.read_text())
    assert len(doc["warnings"]) == len(warned)
    for warning, threshold in zip(doc["warnings"], warned, strict=True):
        assert f"threshold {threshold:g} " in warning and "rounding floor" in warning
    assert [text for kind, text in reporter.messages if kind == "warn"] == doc["warnings"]


def test_dtype_warning_falls_back_to_the_resolved_dtype(tmp_path):
    """A sweep run with the default --dtype stores None in its config; its inputs hold the
    dtype the model ran in."""
    path = write_sweep(tmp_path, config={"dtype": None}, n_keep=0)
    with h5py.File(path, "r+") as f:
        f.attrs["inputs"] = json.dumps({"dtype": "bfloat16"})
    doc = json.loads(compute_ranks(RankConfig(tmp_path)).path.read_text())
    assert doc["meta"]["dtype"] == "bfloat16" and len(doc["warnings"]) == 1
    assert dtype_warnings("bfloat16", (1e-3,)) == doc["warnings"]


def test_old_schema_is_refused_in_one_line(tmp_path):
    path = write_sweep(tmp_path)
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = 2
    with pytest.raises(DataError, match="schema version 2.*version 3.*vtkit sweep --force"):
        compute_ranks(RankConfig(tmp_path))
    result = runner.invoke(app, ["rank", "--output-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert result.stderr.startswith("error:") and result.stderr.count("\n") == 1
    assert "schema version 2" in result.stderr and not (tmp_path / "ranks.json").exists()


def test_missing_layer_attributes_are_refused(tmp_path):
    path = write_sweep(tmp_path)
    with h5py.File(path, "r+") as f:
        del f.attrs["captures"]
    with pytest.raises(DataError, match="'captures'"):
        compute_ranks(RankConfig(tmp_path))
    path = write_sweep(tmp_path)
    with h5py.File(path, "r+") as f:
        f.attrs["layers"] = np.array([], dtype=np.int64)
    with pytest.raises(DataError, match="'layers'"):
        compute_ranks(RankConfig(tmp_path))


@pytest.mark.parametrize("threshold", ["1e-3,abc", "1e-3,2", "1e-3,,1e-2", "1e-2,0.01"])
def test_cli_rank_rejects_bad_threshold_lists(tmp_path, threshold):
    write_sweep(tmp_path)
    result = runner.invoke(app, ["rank", "--output-dir", str(tmp_path),
                                 f"--threshold={threshold}"])
    assert result.exit_code == 2
    assert "--threshold" in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "ranks.json").exists()
