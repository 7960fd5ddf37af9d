"""End to end: `vtkit run` does extract, sweep, rank and plot through the pipeline, which loads
the model once and checks every setting before it touches the output dir."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import vtkit.model
from vtkit.cli.main import app
from vtkit.errors import UsageError
from vtkit.extract import ExtractConfig
from vtkit.pipeline import run_pipeline
from vtkit.plot import PlotConfig
from vtkit.rank import RankConfig
from vtkit.sweep import SweepConfig


def test_run_writes_every_output(tiny_models, demo_scienceqa, tmp_path):
    out = tmp_path / "results"
    result = CliRunner().invoke(app, [
        "run", "--model-path", str(tiny_models["hf"]), "--base-dir", str(demo_scienceqa),
        "--num-samples", "8", "--tokens", "576,64,20", "--max-new-tokens", "3",
        "--output-dir", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    raw = json.loads((out / "raw_results.json").read_text())
    assert raw["token_counts"] == [576, 64, 20]
    for key in ("accuracies", "img_accuracies", "first_layer_ranks", "last_layer_ranks"):
        assert len(raw[key]) == 3
    normalized = json.loads((out / "normalized_results.json").read_text())
    assert all(0.0 <= v <= 1.0 for v in normalized["normalized_first_layer_ranks"])
    for name in ("pruning_experiment_results", "pruning_experiment_raw"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"
    answers = (out / "answers" / "k64.jsonl").read_text().splitlines()
    assert len(answers) == 8


def test_pipeline_loads_the_model_once_for_all_four_stages(tiny_models, demo_scienceqa,
                                                           tmp_path, monkeypatch):
    loads = []
    real_load = vtkit.model.load_model

    def counting_load(*args, **kwargs):
        loads.append(args[0])
        return real_load(*args, **kwargs)

    monkeypatch.setattr(vtkit.model, "load_model", counting_load)
    out = tmp_path / "results"
    common = dict(model_path=str(tiny_models["hf"]), base_dir=demo_scienceqa, num_samples=4,
                  output_dir=out, device="cpu")
    result = run_pipeline(ExtractConfig(**common),
                          SweepConfig(**common, tokens=[576, 20], max_new_tokens=2),
                          RankConfig(output_dir=out), PlotConfig(output_dir=out))
    assert loads == [str(tiny_models["hf"])]
    assert list(result.seconds) == ["extract", "sweep", "rank", "plot"]
    assert [r.k for r in result.swept.results] == [576, 20]
    assert result.ranked is not None and (out / "ranks.json").is_file()
    assert result.plotted.raw_results["token_counts"] == [576, 20]


def test_pipeline_refuses_bad_configs_before_touching_the_output_dir(tiny_models,
                                                                     demo_scienceqa, tmp_path):
    out = tmp_path / "results"
    common = dict(model_path=str(tiny_models["hf"]), base_dir=demo_scienceqa, output_dir=out,
                  device="cpu")
    with pytest.raises(UsageError, match="--tokens"):
        run_pipeline(ExtractConfig(**common), SweepConfig(**common, tokens=[577]))
    with pytest.raises(ValueError, match="one output dir"):
        run_pipeline(ExtractConfig(**common), SweepConfig(**common, tokens=[20]),
                     RankConfig(output_dir=tmp_path / "elsewhere"))
    assert not out.exists()
