"""`vtkit bench`: the length table is the real one, and the bench measures the real path."""

from __future__ import annotations

import json

import numpy as np

from vtkit.bench import (
    BenchConfig,
    full_sweep_tokens,
    length_table,
    representative_lengths,
    run_bench,
)
from vtkit.data import load_question_file
from vtkit.prompts import build_prompt, tokenize_prompt


def test_length_table_is_derived_from_the_real_test_questions(reference_data, llama2_tokenizer):
    questions = load_question_file(reference_data / "scienceqa/llava_test_CQM-A.json")
    lengths = [len(tokenize_prompt(build_prompt(q, "vicuna_v1", True), llama2_tokenizer)) - 1
               for q in questions if q.has_image]
    assert lengths == length_table()
    assert len(lengths) == 2017


def test_full_sweep_size_matches_the_spec():
    # 2017 image questions x 57 values of k: about 49.6 M prefill tokens.
    assert abs(full_sweep_tokens() / 1e6 - 49.6) < 0.1


def test_representative_lengths_follow_the_table():
    table = np.asarray(length_table())
    picked = np.asarray(representative_lengths(200))
    assert abs(picked.mean() - table.mean()) < 0.05 * table.mean()
    assert picked.min() == table.min() and picked.max() == table.max()


def test_bench_runs_the_real_path_on_the_tiny_shape(tmp_path):
    result = run_bench(BenchConfig(shape="tiny", questions=6, tokens=[576, 100, 20],
                                   device="cpu", seed_questions=2, output_dir=tmp_path))
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["useful_tokens"] == result["useful_tokens"] > 0
    assert 0 < result["mfu"] <= 1.0
    assert result["padded_tokens"] >= result["useful_tokens"]
    assert {"prefill", "decode", "spectra", "select", "load", "drain"} <= set(
        result["phase_seconds"])
    assert result["projected_full_sweep_seconds"] > result["flop_floor_seconds"] > 0
    assert (tmp_path / "run" / "sweep.h5").is_file()
    # The seed-style loop: each of its questions timed alone, the median quoted.
    assert set(saved["seed_style_timings"]) == {"576", "20"}
    for k, timing in saved["seed_style_timings"].items():
        assert timing["repeats"] == 2
        assert saved["seed_style_seconds_per_question"][k] == timing["median"] > 0
    # The synthetic prompts have the lengths asked for (within a filler word's tokens).
    from vtkit.data import select_questions
    from vtkit.model import load_tokenizer

    tokenizer = load_tokenizer(tmp_path / "model-tiny")
    wanted = representative_lengths(6)
    got = [len(tokenize_prompt(build_prompt(q, "vicuna_v1", True), tokenizer)) - 1
           for q in select_questions(tmp_path / "scienceqa").questions]
    floor = min(got)   # the shortest prompt this tokenizer can make
    assert floor <= 85
    assert all(abs(a - max(b, floor)) <= 3 for a, b in zip(got, wanted, strict=True)), (got, wanted)
