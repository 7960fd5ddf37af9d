"""Baselines and comparison: k = 0 through every stage, the random scorer over several seeds
(`--seeds`), and `vtkit compare` (its figure, table, intervals, equivalent tokens and FLOPs)."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from vtkit import defaults
from vtkit.cli.main import app
from vtkit.compare import CompareConfig, compare_runs, seed_summary
from vtkit.errors import UsageError
from vtkit.flops import LMShape, equivalent_tokens, prefill_flops
from vtkit.progress import RecordingReporter
from vtkit.sweep import check_tokens, parse_seeds

runner = CliRunner()


def _run(tiny_models, demo_scienceqa, out, *flags):
    result = runner.invoke(app, [
        "run", "--model-path", str(tiny_models["hf"]), "--base-dir", str(demo_scienceqa),
        "--num-samples", "8", "--max-new-tokens", "3", "--output-dir", str(out),
        "--device", "cpu", *flags])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def floor_run(tiny_models, demo_scienceqa, tmp_path_factory):
    """An l2 run whose grid holds k = 0."""
    return _run(tiny_models, demo_scienceqa, tmp_path_factory.mktemp("floor") / "l2",
                "--tokens", "576,64,0")


@pytest.fixture(scope="module")
def seeds_run(tiny_models, demo_scienceqa, tmp_path_factory):
    """The random scorer over seeds 0, 1 and 2."""
    return _run(tiny_models, demo_scienceqa, tmp_path_factory.mktemp("seeds") / "random",
                "--tokens", "576,64,20", "--scorer", "random", "--seeds", "0,1,2")


def _json(path):
    return json.loads(path.read_text())


# --------------------------------------------------------------------------------------------
# k = 0


def test_tokens_take_zero_but_not_negative():
    check_tokens([576, 64, 0], 576)
    with pytest.raises(UsageError, match=r"k=-1 is outside 0\.\.576"):
        check_tokens([576, -1], 576)


def test_k0_prompts_image_questions_without_visual_rows(floor_run, tiny_models):
    """An image question at k = 0 answers as its prompt with the placeholder's tokens cut out
    (prefix + suffix) answers through the plain text path."""
    from vtkit.data import select_questions
    from vtkit.generate import PreparedItem, prepare_items, run_batch
    from vtkit.model import load_model
    from vtkit.sweep import SweepConfig

    with h5py.File(floor_run / "sweep.h5") as f:
        assert f["token_counts"][:].tolist() == [576, 64, 0]
        spectra = [name for name in f["spectra/attn_out/layer0"]]
        answers = f["answers"].asstr()[:]
        has_image = f["has_image"][:]
        text_tokens = f["text_tokens"][:]
        config = json.loads(f.attrs["config"])
    assert spectra == ["k576", "k64"]       # nothing captured at k = 0
    model = load_model(str(tiny_models["hf"]), device="cpu")
    sweep_config = SweepConfig(model_path=config["model_path"], base_dir=config["base_dir"],
                               tokens=[0], num_samples=8, max_new_tokens=3)
    selection = select_questions(sweep_config.base_dir, None, None, "test", 8)
    items = prepare_items(selection.questions, model.tokenizer, sweep_config)
    assert text_tokens.tolist() == [it.text_length for it in items]
    image = [it for it in items if it.question.has_image]
    joined = [PreparedItem(it.index, it.question, it.prompt, it.prefix + it.suffix, [])
              for it in image]
    expected, _, _ = run_batch(model, joined, None, sweep_config, None, [0] * len(joined))
    assert answers[2][has_image].tolist() == expected
    lines = (floor_run / "answers" / "k0.jsonl").read_text().splitlines()
    assert [json.loads(line)["metadata"]["k"] for line in lines] == [0] * 8


def test_k0_has_no_rank_but_an_accuracy(floor_run):
    ranks = _json(floor_run / "ranks.json")
    assert ranks["token_counts"] == [576, 64, 0]
    assert ranks["unranked_token_counts"] == [0] and "no rank" in ranks["unranked_note"]
    for layer in ("first_layer", "last_layer"):
        assert ranks[layer]["numerical_rank_mean"][2] is None
        assert ranks[layer]["numerical_rank_per_question"][2] is None
        assert all(v > 0 for v in ranks[layer]["numerical_rank_mean"][:2])
    for by_layer in ranks["measures"]["attn_out"].values():
        for stats in by_layer.values():
            assert stats["mean"][2] is None and stats["ci95_low"][2] is None
    raw = _json(floor_run / "raw_results.json")
    assert raw["token_counts"] == [576, 64, 0]
    assert 0.0 <= raw["accuracies"][2] <= 100.0 and raw["accuracies_ci95_low"][2] is not None
    assert raw["first_layer_ranks"][2] is None


def test_k0_leaves_the_normalisation_of_the_swept_k_alone(floor_run):
    raw = _json(floor_run / "raw_results.json")
    normalized = _json(floor_run / "normalized_results.json")
    for key in ("accuracies", "first_layer_ranks"):
        swept = np.array(raw[key][:2], dtype=float)
        low, high = swept.min(), swept.max()
        expected = (swept - low) / (high - low) if high > low else np.zeros(2)
        assert np.allclose(normalized[f"normalized_{key}"][:2], expected)
    assert normalized["normalized_first_layer_ranks"][2] is None
    accuracy, low, high = raw["accuracies"][2], min(raw["accuracies"][:2]), max(
        raw["accuracies"][:2])
    if high > low:
        assert normalized["normalized_accuracies"][2] == pytest.approx(
            (accuracy - low) / (high - low))


# --------------------------------------------------------------------------------------------
# --seeds


def test_parse_seeds():
    assert parse_seeds("0,1,2") == [0, 1, 2]
    for bad in ("0,0", "a", "-1", ""):
        with pytest.raises(UsageError, match="--seeds"):
            parse_seeds(bad)


def test_seeds_make_one_complete_run_per_seed(seeds_run):
    assert (seeds_run / "features.h5").is_file()
    fingerprints = set()
    for seed in (0, 1, 2):
        run = seeds_run / f"seed{seed}"
        assert not (run / "features.h5").exists()
        for name in ("sweep.h5", "ranks.json", "raw_results.json", "answers/k20.jsonl"):
            assert (run / name).is_file(), name
        with h5py.File(run / "sweep.h5") as f:
            assert json.loads(f.attrs["config"])["seed"] == seed
            assert json.loads(f.attrs["inputs"])["seed"] == seed
            fingerprints.add(f.attrs["fingerprint"])
    assert len(fingerprints) == 3


def test_each_seed_keeps_its_own_random_tokens(seeds_run):
    """Seeds keep other tokens: their spectra at k = 20 differ (all 576 are the same set)."""
    spectra = []
    for seed in (0, 1):
        with h5py.File(seeds_run / f"seed{seed}" / "sweep.h5") as f:
            spectra.append((f["spectra/attn_out/layer0/k576"][:],
                            f["spectra/attn_out/layer0/k20"][:]))
    assert np.allclose(spectra[0][0], spectra[1][0], rtol=1e-4)
    assert not np.allclose(spectra[0][1], spectra[1][1], rtol=1e-4)


def test_seeds_resume_as_complete(seeds_run, tiny_models, demo_scienceqa):
    result = runner.invoke(app, [
        "sweep", "--model-path", str(tiny_models["hf"]), "--base-dir", str(demo_scienceqa),
        "--num-samples", "8", "--max-new-tokens", "3", "--output-dir", str(seeds_run),
        "--device", "cpu", "--tokens", "576,64,20", "--scorer", "random", "--seeds", "0,1,2"])
    assert result.exit_code == 0, result.output
    assert " ".join(result.output.split()).count("sweep is complete; nothing to do") == 3


@pytest.mark.parametrize("command", ["sweep", "run"])
def test_seeds_need_the_random_scorer(command, tmp_path):
    result = runner.invoke(app, [command, "--seeds", "0,1", "--output-dir", str(tmp_path / "o"),
                                 "--model-path", str(tmp_path)])
    assert result.exit_code != 0
    assert result.output.strip().splitlines() == [
        "error: --seeds: only the random scorer has seeds (--scorer random), not 'l2'"]


def test_seed_summary_by_hand():
    summary = seed_summary([np.array([50.0, 20.0]), np.array([70.0, 40.0]),
                            np.array([60.0, np.nan])])
    assert summary["mean"][0] == 60.0 and summary["min"][0] == 50.0
    assert summary["max"][0] == 70.0 and np.isnan(summary["mean"][1])


# --------------------------------------------------------------------------------------------
# vtkit compare


@pytest.fixture(scope="module")
def compared(floor_run, seeds_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("comparison")
    reporter = RecordingReporter()
    result = compare_runs(CompareConfig([floor_run, seeds_run], out), reporter)
    return result, reporter, out


def test_compare_writes_the_figure_and_table(compared):
    result, reporter, out = compared
    for name in ("comparison.png", "comparison.pdf", "comparison.md", "comparison.json"):
        assert (out / name).is_file()
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    document = _json(out / "comparison.json")
    assert [m["label"] for m in document["methods"]] == ["l2", "random (seeds 0,1,2)"]
    assert document["missing_token_counts"] == {"l2": [192, 128],
                                                "random (seeds 0,1,2)": [192, 128]}
    assert [(row["k"], row["method"]) for row in document["table"]] == [
        (576, "l2"), (576, "random (seeds 0,1,2)"), (64, "l2"), (64, "random (seeds 0,1,2)"),
        (0, "l2")]
    markdown = (out / "comparison.md").read_text()
    assert "| 64 | random (seeds 0,1,2) |" in markdown and "k = 192, 128" in markdown
    assert reporter.tables[0][0] == "Pruning methods compared"


def test_compare_table_is_each_runs_own_accuracy_and_interval(compared, floor_run):
    raw = _json(floor_run / "raw_results.json")
    rows = {row["k"]: row for row in compared[0].document["table"] if row["method"] == "l2"}
    for i, k in enumerate(raw["token_counts"]):
        assert rows[k]["accuracy"] == pytest.approx(raw["accuracies"][i])
        assert rows[k]["img_accuracy"] == pytest.approx(raw["img_accuracies"][i])
        assert rows[k]["accuracy_ci95_low"] == pytest.approx(raw["accuracies_ci95_low"][i])
        assert rows[k]["accuracy_ci95_high"] == pytest.approx(raw["accuracies_ci95_high"][i])
        assert rows[k]["equivalent_tokens"] == k     # a pre-LLM scorer: k in every layer


def test_compare_averages_the_seeds_with_a_band(compared, seeds_run):
    raws = [_json(seeds_run / f"seed{s}" / "raw_results.json") for s in (0, 1, 2)]
    method = compared[0].document["methods"][1]
    series = method["series"]
    assert method["seeds"] == [0, 1, 2]
    for key, raw_key in (("accuracy", "accuracies"), ("img_accuracy", "img_accuracies"),
                         ("first_layer_ranks", "first_layer_ranks")):
        per_seed = np.array([raw[raw_key] for raw in raws], dtype=float)
        assert np.allclose(series[key], per_seed.mean(axis=0))
        assert np.allclose(series[f"{key}_seed_min"], per_seed.min(axis=0))
        assert np.allclose(series[f"{key}_seed_max"], per_seed.max(axis=0))
    row = next(r for r in compared[0].document["table"]
               if r["k"] == 64 and r["method"].startswith("random"))
    assert row["accuracy"] == pytest.approx(np.mean([raw["accuracies"][1] for raw in raws]))
    assert row["accuracy_ci95_low"] <= row["accuracy"] <= row["accuracy_ci95_high"]


def test_compare_gives_equivalent_tokens_and_flops_of_in_llm_runs(floor_run, tiny_models,
                                                                  tmp_path, monkeypatch):
    """A run whose config says fastv at layer 2: layers 0-1 see all 576 visual tokens."""
    from transformers import LlavaConfig

    monkeypatch.setattr(defaults, "IN_LLM_SCORERS", ("fastv", "dart"), raising=False)
    run = tmp_path / "fastv"
    shutil.copytree(floor_run, run)
    with h5py.File(run / "sweep.h5", "r+") as f:
        config = json.loads(f.attrs["config"])
        f.attrs["config"] = json.dumps({**config, "scorer": "fastv", "prune_layer": 2})
        text_tokens = f["text_tokens"][:][f["has_image"][:]]
    result = compare_runs(CompareConfig([run], tmp_path / "out"), RecordingReporter())
    shape = LMShape.from_config(LlavaConfig.from_pretrained(tiny_models["hf"]).text_config)
    rows = {row["k"]: row for row in result.document["table"]}
    assert result.document["methods"][0]["label"] == "fastv (K=2)"
    for k in (576, 64):
        assert rows[k]["equivalent_tokens"] == pytest.approx(
            (2 * 576 + (shape.layers - 2) * k) / shape.layers)
        assert rows[k]["equivalent_tokens"] == equivalent_tokens(k, shape.layers, 2, 576)
        flops = [prefill_flops(shape, int(t), k, prune_layer=2, visual_before=576)
                 for t in text_tokens]
        assert rows[k]["flops_per_question"] == pytest.approx(np.mean(flops))
    # k = 0 is the floor: no visual token in any layer, the text alone.
    assert rows[0]["equivalent_tokens"] == 0.0
    assert rows[0]["flops_per_question"] == pytest.approx(
        np.mean([prefill_flops(shape, int(t), 0) for t in text_tokens]))
    # The layers before K see all 576 tokens: pruning at k costs more than k from the start.
    assert rows[64]["flops_per_question"] > np.mean(
        [prefill_flops(shape, int(t), 64) for t in text_tokens])


def test_compare_warns_about_runs_that_differ(floor_run, tmp_path):
    other = tmp_path / "sampled"
    shutil.copytree(floor_run, other)
    with h5py.File(other / "sweep.h5", "r+") as f:
        f.attrs["config"] = json.dumps({**json.loads(f.attrs["config"]), "temperature": 0.2})
    result = compare_runs(CompareConfig([floor_run, other], tmp_path / "out"),
                          RecordingReporter())
    assert any("differ in temperature" in w for w in result.warnings)
    labels = [m["label"] for m in result.document["methods"]]
    assert labels == [f"l2 [{floor_run}]", f"l2 [{other}]"]


def test_compare_refuses_a_dir_that_is_not_a_run(floor_run, tmp_path):
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "empty", tmp_path / "missing"):
        result = runner.invoke(app, ["compare", str(floor_run), str(bad), "--output-dir",
                                     str(tmp_path / "out")])
        assert result.exit_code == 1
        assert result.output.strip().splitlines() == [
            f"error: {bad} is not a vtkit run: no sweep.h5 in it, nor in seedN/ "
            f"sub-directories (of `vtkit sweep --seeds`)"]


def test_compare_cli_json(floor_run, tmp_path):
    result = runner.invoke(app, ["compare", str(floor_run), "--output-dir", str(tmp_path),
                                 "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["table"][0]["k"] == 576
