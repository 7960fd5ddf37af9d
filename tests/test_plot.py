"""`vtkit plot`: results JSON, normalisation, bootstrap band, figure files and the CLI."""

from __future__ import annotations

import json
import struct

import h5py
import numpy as np
import pytest
from sweepfile import TOKEN_COUNTS, write_sweep
from typer.testing import CliRunner

from vtkit.cli.main import app
from vtkit.errors import CacheMismatchError, DataError
from vtkit.plot import (
    MAX_LAYER_CURVES,
    NORMALIZED_SERIES,
    PlotConfig,
    _results_figure,
    accuracy_percent,
    bootstrap_accuracy_band,
    curve_layers,
    heatmap_matrix,
    make_plots,
    min_max_normalize,
)
from vtkit.progress import RecordingReporter
from vtkit.rank import RankConfig, compute_ranks

runner = CliRunner()

RAW_KEYS = ["token_counts", "accuracies", "img_accuracies", "first_layer_ranks",
            "last_layer_ranks", "first_layer_effective_ranks", "last_layer_effective_ranks"]


def _ranked_run(directory, **kwargs):
    write_sweep(directory, **kwargs)
    compute_ranks(RankConfig(directory))
    return directory


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _assert_pdf(path):
    data = path.read_bytes()
    assert data.startswith(b"%PDF-")
    assert data.rstrip().endswith(b"%%EOF")


@pytest.fixture(scope="module")
def plotted(tmp_path_factory):
    """One run plotted once (figures at 300 dpi take a moment), with a compare run."""
    run = _ranked_run(tmp_path_factory.mktemp("run"), n_questions=12, n_image=7)
    other = tmp_path_factory.mktemp("other") / "random-run"
    write_sweep(other, scorer="random", seed=1)
    reporter = RecordingReporter()
    result = make_plots(PlotConfig(run, compare=[other, run]), reporter)
    return run, result, reporter


def test_accuracy_percent():
    correct = np.array([[True, True, False, False], [True, False, False, False]])
    np.testing.assert_allclose(accuracy_percent(correct), [50.0, 25.0])
    np.testing.assert_allclose(accuracy_percent(correct, np.array([0, 1, 0, 0], bool)),
                               [100.0, 0.0])
    assert np.isnan(accuracy_percent(correct, np.zeros(4, bool))).all()


def test_min_max_normalize():
    values, constant = min_max_normalize(np.array([2.0, 4.0, 3.0]))
    np.testing.assert_allclose(values, [0.0, 1.0, 0.5])
    assert not constant
    values, constant = min_max_normalize(np.array([7.0, 7.0, 7.0]))
    assert constant and values.tolist() == [0.0, 0.0, 0.0]


def test_bootstrap_band_is_seeded_and_brackets_the_accuracy():
    rng = np.random.default_rng(0)
    correct = rng.random((5, 400)) < np.linspace(0.9, 0.3, 5)[:, None]
    low, high = bootstrap_accuracy_band(correct, samples=500, seed=3)
    again = bootstrap_accuracy_band(correct, samples=500, seed=3)
    np.testing.assert_array_equal(low, again[0])
    accuracy = accuracy_percent(correct)
    assert (low < accuracy).all() and (accuracy < high).all()
    # A binomial 95% interval on 400 questions is about +-2 * sqrt(p(1-p)/400): 3-5 points wide.
    assert ((high - low) > 2.0).all() and ((high - low) < 12.0).all()
    all_right = bootstrap_accuracy_band(np.ones((2, 50), bool), samples=100)
    assert all_right[0].tolist() == [100.0, 100.0] == all_right[1].tolist()


def test_json_files_have_the_keys_and_lengths(plotted):
    run, result, _ = plotted
    raw = json.loads((run / "raw_results.json").read_text())
    normalized = json.loads((run / "normalized_results.json").read_text())
    for key in RAW_KEYS:
        assert len(raw[key]) == len(TOKEN_COUNTS), key
    assert raw["token_counts"] == list(TOKEN_COUNTS)
    meta = raw["meta"]
    assert meta["model"] == "llava-tiny-hf" and meta["scorer"] == "l2"
    assert meta["threshold"] == 1e-3 and meta["random_init"] is False
    assert meta["n_questions"] == 12 and meta["n_image_questions"] == 7
    assert meta["sweep_fingerprint"] == "sweep-0-l2" and "vtkit_version" in meta
    # Rank-5 synthetic attention outputs: rank 5 at every k, for both layers.
    assert raw["first_layer_ranks"] == [5.0] * len(TOKEN_COUNTS)
    for key, value in raw.items():
        assert normalized[key] == value, key
    for normalized_key in NORMALIZED_SERIES.values():
        series = normalized[normalized_key]
        assert len(series) == len(TOKEN_COUNTS)
        assert min(series) >= 0.0 and max(series) <= 1.0
    accuracies = np.array(raw["accuracies"])
    expected = (accuracies - accuracies.min()) / (accuracies.max() - accuracies.min())
    np.testing.assert_allclose(normalized["normalized_accuracies"], expected)
    assert result.raw_results == raw


def test_constant_series_normalise_to_zeros_with_a_warning(plotted):
    run, result, reporter = plotted
    normalized = json.loads((run / "normalized_results.json").read_text())
    # Every question keeps rank 5 at every k in the synthetic sweep.
    assert normalized["normalized_first_layer_ranks"] == [0.0] * len(TOKEN_COUNTS)
    warnings = [text for kind, text in reporter.messages if kind == "warn"]
    assert any("first_layer_ranks" in text for text in warnings)
    assert "first_layer_ranks" in result.constant_series
    assert "accuracies" not in result.constant_series


def test_constant_accuracy_warns(tmp_path):
    run = _ranked_run(tmp_path, correct=np.ones((len(TOKEN_COUNTS), 10), bool))
    reporter = RecordingReporter()
    result = make_plots(PlotConfig(run, bootstrap_samples=50), reporter)
    normalized = json.loads((run / "normalized_results.json").read_text())
    assert normalized["accuracies"] == [100.0] * len(TOKEN_COUNTS)
    assert normalized["normalized_accuracies"] == [0.0] * len(TOKEN_COUNTS)
    assert {"accuracies", "img_accuracies"} <= set(result.constant_series)
    warnings = " ".join(text for kind, text in reporter.messages if kind == "warn")
    assert "accuracies" in warnings and "img_accuracies" in warnings


def test_figure_files_are_valid_png_and_pdf(plotted):
    run, result, _ = plotted
    for stem in ("pruning_experiment_results", "pruning_experiment_raw",
                 "pruning_experiment_compare"):
        # 10 x 6 inches at 300 dpi.
        assert _png_size(run / f"{stem}.png") == (3000, 1800)
        _assert_pdf(run / f"{stem}.pdf")
        assert run / f"{stem}.png" in result.files


def test_results_figure_axes(plotted):
    run, _, _ = plotted
    normalized = json.loads((run / "normalized_results.json").read_text())
    figure = _results_figure(normalized, "title (random weights)")
    axes = figure.axes[0]
    assert axes.get_xlim() == (576, 20)
    assert axes.get_ylim() == (0.0, 1.0)
    assert [line.get_color() for line in axes.get_lines()] == ["tab:blue", "tab:red", "tab:green"]
    assert [t.get_text() for t in axes.get_legend().get_texts()] == \
        ["Accuracy", "First-layer rank", "Last-layer rank"]


def test_missing_ranks_or_stale_ranks(tmp_path):
    write_sweep(tmp_path)
    with pytest.raises(DataError, match="ranks.json.*vtkit rank"):
        make_plots(PlotConfig(tmp_path))
    compute_ranks(RankConfig(tmp_path))
    write_sweep(tmp_path, seed=5)
    with pytest.raises(CacheMismatchError, match="another sweep.h5"):
        make_plots(PlotConfig(tmp_path))


def test_compare_with_a_missing_run(tmp_path):
    run = _ranked_run(tmp_path / "run")
    with pytest.raises(DataError, match="--compare .*nowhere"):
        make_plots(PlotConfig(run, compare=[tmp_path / "nowhere"], bootstrap_samples=10))


def test_cli_plot(tmp_path):
    run = _ranked_run(tmp_path / "run", random_init=True)
    result = runner.invoke(app, ["plot", "--output-dir", str(run), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["meta"]["random_init"] is True
    assert str(run / "pruning_experiment_results.png") in doc["files"]
    assert not (run / "pruning_experiment_compare.png").exists()


def test_cli_plot_errors(tmp_path):
    result = runner.invoke(app, ["plot", "--output-dir", str(tmp_path)])
    assert result.exit_code == 1 and "vtkit sweep" in result.stderr
    write_sweep(tmp_path, complete=False)
    result = runner.invoke(app, ["plot", "--output-dir", str(tmp_path)])
    assert result.exit_code == 1 and "incomplete" in result.stderr
    write_sweep(tmp_path)
    result = runner.invoke(app, ["plot", "--output-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert result.stderr.startswith("error:") and "vtkit rank" in result.stderr


def test_cli_plot_help():
    result = runner.invoke(app, ["plot", "--help"])
    assert result.exit_code == 0
    assert "--compare" in result.stdout and "--output-dir" in result.stdout
    assert "vtkit plot" in result.stdout


SETTINGS = {"conv_mode": "vicuna_v1", "single_pred_prompt": True, "question_file": None,
            "split": "test", "temperature": 0.0}


def test_compare_warns_once_for_each_difference(tmp_path):
    run = _ranked_run(tmp_path / "run", config=SETTINGS)
    other = tmp_path / "other"
    write_sweep(other, n_questions=8, model_id="llava-v1.5-7b", scorer="random",
                config={**SETTINGS, "conv_mode": "llava_v1", "temperature": 0.2})
    reporter = RecordingReporter()
    make_plots(PlotConfig(run, compare=[other], bootstrap_samples=10), reporter)
    warnings = [text for kind, text in reporter.messages if kind == "warn" and "differ" in text]
    assert len(warnings) == 4
    for warning, what in zip(warnings, ("questions", "template", "temperature", "model"),
                             strict=True):
        assert f"differ in {what}:" in warning and str(run) in warning and str(other) in warning
    assert "10 questions" in warnings[0] and "8 questions" in warnings[0]
    assert "llava_v1" in warnings[1] and "temperature 0.2" in warnings[2]


def test_compare_is_quiet_when_only_the_scorer_differs(tmp_path):
    from vtkit.plot import compare_differences, run_settings

    runs = [tmp_path / "l2", tmp_path / "random"]
    write_sweep(runs[0], config=SETTINGS)
    write_sweep(runs[1], scorer="random", seed=1, config=SETTINGS)
    assert compare_differences([(d, run_settings(d)) for d in runs]) == []
    # Same count, other ids; and another question file.
    write_sweep(runs[1], config={**SETTINGS, "question_file": "x/llava_test_QCM-LEA.json"})
    with h5py.File(runs[1] / "sweep.h5", "a") as f:
        del f["question_ids"]
        f.create_dataset("question_ids", data=[f"p{i}" for i in range(10)],
                         dtype=h5py.string_dtype())
    messages = compare_differences([(d, run_settings(d)) for d in runs])
    assert [m.split(":")[0] for m in messages] == ["the compared runs differ in questions",
                                                   "the compared runs differ in template"]
    assert "QCM-LEA" in messages[1] and "llava_test_CQM-A.json" in messages[1]


# ---------------------------------------------------------------------------------------------
# The depth figures (ranks.json with measures at more than two layers)

def _stats(mean):
    """A ranks.json measure block with a band 0.5 either side (null stays null)."""
    return {"mean": mean, "std": [None if v is None else 0.5 for v in mean],
            "ci95_low": [None if v is None else v - 0.5 for v in mean],
            "ci95_high": [None if v is None else v + 0.5 for v in mean]}


def _depth_doc(layers, token_counts=TOKEN_COUNTS, thresholds=(1e-3,)):
    """The contract's additions to ranks.json, with numerical rank min(k, 4 + layer)."""
    measures = {}
    for layer in layers:
        ranks = [float(min(k, 4 + layer)) for k in token_counts]
        measures[str(layer)] = {
            **{f"numerical_rank@{t:g}": _stats([r + i for r in ranks])
               for i, t in enumerate(thresholds)},
            "effective_rank": _stats([r / 2 for r in ranks]),
            "stable_rank": _stats([1.0 + layer / 10] * len(token_counts))}
    return {"thresholds": list(thresholds), "layers": list(layers), "captures": ["attn_out"],
            "primary_capture": "attn_out", "measures": {"attn_out": measures},
            "per_layer": {}, "correctness": {}, "warnings": []}


def _add_depth(run, layers, **kwargs):
    """Extend the run's ranks.json (today's, from `vtkit rank`) with the contract's additions."""
    path = run / "ranks.json"
    ranks = json.loads(path.read_text())
    ranks.update(_depth_doc(layers, ranks["token_counts"], **kwargs))
    path.write_text(json.dumps(ranks))
    return ranks


SEED_OUTPUTS = ("raw_results.json", "normalized_results.json", "pruning_experiment_results.png",
                "pruning_experiment_results.pdf", "pruning_experiment_raw.png",
                "pruning_experiment_raw.pdf")


@pytest.fixture(scope="module")
def depth_plotted(tmp_path_factory):
    """One run plotted from today's ranks.json, then from one with 6 layers and 2 thresholds;
    returns the seed's outputs of the first plot (bytes) too."""
    run = _ranked_run(tmp_path_factory.mktemp("depth"), n_questions=12, n_image=7)
    make_plots(PlotConfig(run, bootstrap_samples=50))
    before = {name: (run / name).read_bytes() for name in SEED_OUTPUTS}
    _add_depth(run, [0, 1, 2, 3, 4, 5], thresholds=(1e-3, 2.5e-4))
    reporter = RecordingReporter()
    result = make_plots(PlotConfig(run, bootstrap_samples=50), reporter)
    return run, result, reporter, before


def test_heatmap_matrix_normalises_each_layer_over_k():
    doc = {"token_counts": [576, 64, 20], "layers": [0, 2, 5, 7], "primary_capture": "attn_out",
           "measures": {"attn_out": {
               "0": {"m": _stats([10.0, 4.0, 2.0])},
               "2": {"m": _stats([3.0, 3.0, 3.0])},
               "5": {"m": _stats([None, 6.0, 2.0])},
               "7": {"m": _stats([None, None, None])}},
               "hidden": {str(layer): {"m": _stats([9.0, 8.0, 7.0])} for layer in (0, 2, 5, 7)}}}
    layers, k, raw = heatmap_matrix(doc, "m", normalised=False)
    assert layers == [0, 2, 5, 7] and k == [576, 64, 20]
    np.testing.assert_array_equal(raw, [[10, 4, 2], [3, 3, 3], [np.nan, 6, 2],
                                        [np.nan, np.nan, np.nan]])
    _, _, normalised = heatmap_matrix(doc, "m", normalised=True)
    # Per row: the largest value over k is 1, the smallest 0; a constant row is zeros; NaN stays.
    np.testing.assert_allclose(normalised, [[1.0, 0.25, 0.0], [0.0, 0.0, 0.0],
                                            [np.nan, 1.0, 0.0], [np.nan, np.nan, np.nan]])
    _, _, hidden = heatmap_matrix(doc, "m", normalised=True, capture="hidden")
    np.testing.assert_allclose(hidden, [[1.0, 0.5, 0.0]] * 4)


def test_curve_layers_keeps_the_first_and_last_evenly_spaced():
    assert curve_layers([3, 1, 2]) == [1, 2, 3]
    assert curve_layers(list(range(8))) == list(range(8))
    picked = curve_layers(list(range(32)))
    assert len(picked) == MAX_LAYER_CURVES == 8
    assert picked[0] == 0 and picked[-1] == 31
    assert max(np.diff(picked)) - min(np.diff(picked)) <= 1


def test_heatmap_file_names_are_safe_and_removed_with_the_figures(tmp_path):
    from vtkit import cache

    assert cache.heatmap_figure("numerical_rank@0.001") == "rank_heatmap_numerical_rank_1e-3"
    assert cache.heatmap_figure("numerical_rank@1e-05") == "rank_heatmap_numerical_rank_1e-5"
    assert cache.heatmap_figure("stable_rank") == "rank_heatmap_stable_rank"
    names = ["rank_heatmap_numerical_rank_2.5e-4.png", "rank_heatmap_stable_rank.pdf",
             "rank_by_layer.png", "rank_by_layer.pdf", "ranks.json"]
    for name in names:
        (tmp_path / name).write_text("x")
    gone = cache.remove_outputs(tmp_path, cache.STALE_AFTER_SWEEP)
    assert sorted(p.name for p in gone) == sorted(names)


def test_depth_figures_are_written(depth_plotted):
    run, result, reporter, _ = depth_plotted
    stems = ["rank_heatmap_numerical_rank_1e-3", "rank_heatmap_numerical_rank_2.5e-4",
             "rank_heatmap_effective_rank", "rank_heatmap_stable_rank"]
    for stem in stems:
        # 13 x 6 inches at 300 dpi: two panels side by side.
        assert _png_size(run / f"{stem}.png") == (3900, 1800)
        _assert_pdf(run / f"{stem}.pdf")
    assert _png_size(run / "rank_by_layer.png") == (3000, 1800)
    _assert_pdf(run / "rank_by_layer.pdf")
    depth = [run / f"{stem}.{ext}" for stem in [*stems, "rank_by_layer"] for ext in ("png", "pdf")]
    assert set(depth) <= set(result.figures) and set(result.figures) <= set(result.files)
    assert run / "pruning_experiment_raw.png" in result.figures
    assert run / "raw_results.json" not in result.figures
    wrote = {text for kind, text in reporter.messages if kind == "info"}
    assert {f"wrote {path}" for path in depth} <= wrote


def test_seed_outputs_are_unchanged_by_the_depth_measures(depth_plotted):
    run, result, _, before = depth_plotted
    for name, data in before.items():
        assert (run / name).read_bytes() == data, name
    assert "measures" not in result.raw_results and "layers" in result.raw_results["meta"]


def test_layer_curves_figure_draws_at_most_eight_layers(tmp_path):
    from vtkit.plot import _heatmap_figure, _layer_curves_figure

    ranks = {"token_counts": list(TOKEN_COUNTS), "meta": {"threshold": 1e-3},
             **_depth_doc(range(32))}
    axes = _layer_curves_figure(ranks, "title").axes[0]
    legend = axes.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == \
        [f"layer {layer}" for layer in curve_layers(list(range(32)))]
    assert "8 of 32" in legend.get_title().get_text()
    assert axes.get_xlim() == (576, 20)
    heatmap = _heatmap_figure(ranks, "numerical_rank@0.001", "title")
    normalised_axes, raw_axes = heatmap.axes[:2]
    assert "self-attention output" in heatmap.get_suptitle()
    assert [t.get_text() for t in normalised_axes.get_xticklabels()] == \
        [str(k) for k in TOKEN_COUNTS]
    assert normalised_axes.get_ylabel() == "Decoder layer index"
    np.testing.assert_allclose(raw_axes.images[0].get_array().filled(np.nan),
                               heatmap_matrix(ranks, "numerical_rank@0.001", False)[2])


def test_no_depth_figures_for_two_layers_and_stale_ones_go(tmp_path):
    run = _ranked_run(tmp_path)
    (run / "rank_heatmap_stable_rank.png").write_text("from an earlier all-layer plot")
    result = make_plots(PlotConfig(run, bootstrap_samples=10))
    assert not list(run.glob("rank_*"))
    assert sorted(p.name for p in result.figures) == sorted(SEED_OUTPUTS[2:])
    _add_depth(run, [0, 3])
    make_plots(PlotConfig(run, bootstrap_samples=10))
    assert not list(run.glob("rank_*"))


def test_malformed_measures_are_refused(tmp_path):
    run = _ranked_run(tmp_path)
    ranks = _add_depth(run, [0, 1, 2])
    del ranks["measures"]["attn_out"]["1"]
    (run / "ranks.json").write_text(json.dumps(ranks))
    with pytest.raises(DataError, match="ranks.json lacks '1'"):
        make_plots(PlotConfig(run, bootstrap_samples=10))
    ranks = _add_depth(run, [0, 1, 2])
    ranks["measures"]["attn_out"]["2"]["effective_rank"]["mean"] = [1.0]
    (run / "ranks.json").write_text(json.dumps(ranks))
    with pytest.raises(DataError, match="effective_rank/mean does not have one value per k"):
        make_plots(PlotConfig(run, bootstrap_samples=10))
    assert not list(run.glob("rank_*"))


def test_cli_plot_lists_the_figures(tmp_path):
    run = _ranked_run(tmp_path / "run")
    _add_depth(run, [0, 1, 2])
    result = runner.invoke(app, ["plot", "--output-dir", str(run), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert str(run / "rank_by_layer.png") in doc["figures"]
    assert str(run / "rank_heatmap_effective_rank.pdf") in doc["figures"]
    assert str(run / "raw_results.json") in doc["files"]
    assert "figures" not in json.loads((run / "raw_results.json").read_text())
