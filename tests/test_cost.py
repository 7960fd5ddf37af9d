"""`vtkit cost`: the table's FLOPs, KV bytes and fields on the tiny shape, and its bad flags."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vtkit.bench import length_table
from vtkit.cli.main import app
from vtkit.cost import CostConfig, median_question, run_cost, visual_rows
from vtkit.flops import LMShape, decode_flops, prefill_flops
from vtkit.progress import RecordingReporter, spread

TOKENS = [576, 64]
runner = CliRunner()


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    out = tmp_path_factory.mktemp("cost")
    reporter = RecordingReporter()
    result = run_cost(CostConfig(shape="tiny", tokens=TOKENS, device="cpu", repeats=3, warmup=1,
                                 throughput_repeats=1, batch_size=2, output_dir=out), reporter)
    return out, result, reporter


def test_flops_and_kv_bytes_follow_the_formulas(measured):
    out, result, _ = measured
    config = json.loads((out / "model-tiny" / "config.json").read_text())["text_config"]
    shape = LMShape.from_config(config)
    text = result["text_tokens"]
    assert [r["k"] for r in result["rows"]] == TOKENS
    for row in result["rows"]:
        k = row["k"]
        assert row["tokens"] == text + k
        assert row["prefill_flops"] == prefill_flops(shape, text, k)
        assert row["question_flops"] == prefill_flops(shape, text, k) + decode_flops(
            shape, text + k, 1)
        # float32: 4 bytes per element, keys and values of every layer.
        assert row["kv_cache_bytes"] == (2 * shape.layers * shape.kv_heads * shape.head_dim * 4
                                         * (text + k))


def test_kv_bytes_are_what_a_prefill_caches(measured):
    from vtkit.cost import load_cost_model
    from vtkit.generate import prefill

    out, result, _ = measured
    model = load_cost_model(CostConfig(shape="tiny", device="cpu"), out)
    item, _ = median_question(model, out / "scienceqa", 0)
    state = prefill(model, [item], [visual_rows(model, 64, 0)])
    cached = sum(layer.keys.nbytes + layer.values.nbytes for layer in state.past.layers)
    assert cached == result["rows"][1]["kv_cache_bytes"]


def test_json_records_the_setting_and_the_spread(measured):
    out, result, reporter = measured
    saved = json.loads((out / "cost.json").read_text())
    assert saved["rows"] == result["rows"]
    assert saved["median_text_tokens"] == int(np.median(length_table()))
    assert saved["device"] == "cpu" and saved["dtype"] == "float32"
    assert saved["torch"] == torch.__version__
    assert saved["transformers"]
    attention = saved["attention"]
    assert attention["implementation"] == "sdpa" and attention["sdpa_backends_enabled"] is None
    # What the CPU's SDPA really ran in a prefill, profiled.
    for rows in ("batch 1", "batch 2"):
        assert any("scaled_dot_product" in name for name in attention["kernels_seen"][rows])
    assert saved["timer"] == "perf_counter" and saved["repeats"] == 3
    assert "vtkit.flops" in saved["flops_formula"]
    for row in saved["rows"]:
        for key in ("prefill_seconds", "first_token_seconds"):
            timing = row[key]
            assert timing["repeats"] == 3
            assert timing["min"] <= timing["q25"] <= timing["median"] <= timing["q75"] \
                <= timing["max"]
        assert row["throughput"]["batch_size"] == 2
        assert row["throughput"]["questions_per_s"] == pytest.approx(
            2 / row["throughput"]["batch_seconds"]["median"])
    assert (out / "cost.png").stat().st_size > 0 and (out / "cost.pdf").stat().st_size > 0
    (title, columns, rows), = reporter.tables
    assert "tiny" in title and "sdpa" in title and len(rows) == len(TOKENS)


def test_spread_of_known_timings():
    assert spread([4.0, 1.0, 3.0, 2.0, 5.0]) == {"median": 3.0, "q25": 2.0, "q75": 4.0,
                                                 "min": 1.0, "max": 5.0, "repeats": 5}


@pytest.mark.parametrize("args, flag", [
    (["--shape", "tiny", "--model-path", "x"], "--shape or --model-path"),
    (["--random-init"], "--random-init"),
    (["--repeats", "0"], "--repeats"),
    (["--tokens", "576,577"], "--tokens"),
    (["--tokens", "64,64"], "--tokens"),
    (["--shape", "huge"], "--shape"),
    (["--min", "40", "--max", "30"], "--min/--max/--step"),
])
def test_bad_flags_are_one_line(args, flag, tmp_path):
    result = runner.invoke(app, ["cost", "--device", "cpu", "--output-dir", str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0], result.output
    assert not (tmp_path / "cost.json").exists()
