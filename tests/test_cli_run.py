"""End to end through the CLI: `vtkit run` does extract, sweep, rank and plot."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from vtkit.cli.main import app


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
