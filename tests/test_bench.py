"""`vtkit bench`: the length table is the real one, and the bench measures the real path."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vtkit.bench import (
    BenchConfig,
    full_sweep_tokens,
    length_table,
    representative_lengths,
    run_bench,
)
from vtkit.data import load_question_file
from vtkit.profiling import KINDS, kind_of
from vtkit.progress import RecordingReporter
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
    # The system prompt ran once per batch of more than one row: the forwards computed fewer
    # tokens than the padded batches hold, by that count.
    assert result["share_prefix"] and result["shared_prefix_tokens"] > 0
    assert result["computed_tokens"] == result["padded_tokens"] - result["shared_prefix_tokens"]
    assert result["computed_mfu"] < result["mfu"] * result["padded_tokens"] / result[
        "useful_tokens"]
    assert {"prefill", "decode", "spectra", "select", "load", "drain"} <= set(
        result["phase_seconds"])
    # On the CPU rows are left-padded by default; compiling (none here) is reported apart from
    # the phases.
    assert result["pack"] is False and result["padded_tokens"] > result["useful_tokens"]
    assert "compile" not in result["phase_seconds"] and 0 <= result["compile_seconds"] < 1
    # Kernels load lazily on CUDA alone: on the CPU nothing is warmed up.
    assert "warm_up" not in result["phase_seconds"] and 0 <= result["warm_up_seconds"] < 0.05
    assert result["projected_full_sweep_seconds"] > result["flop_floor_seconds"] > 0
    assert (tmp_path / "run" / "sweep.h5").is_file()
    # The plain-forward baseline: its tokens/s and MFU follow from its own median time.
    plain = saved["plain_forward"]
    assert plain["seconds"]["repeats"] == 5
    assert plain["tokens_per_s"] == pytest.approx(
        plain["batch"] * plain["length"] / plain["seconds"]["median"])
    assert plain["mfu"] == pytest.approx(
        plain["tokens_per_s"] * 2 * saved["lm_parameters"] / (saved["matmul_peak_tflops"] * 1e12))
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


@pytest.mark.parametrize("name, kind", [
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN", "matmul"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", "matmul"),
    ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<at::native::(anonymous "
     "namespace)::OpaqueType<2u>, unsigned int, 4, 64, 64>(...)", "cache copy"),
    ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel)",
     "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x128_4x1x1_kernel0_0", "attention"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::"
     "BFloat16>, std::array<char*, 3ul> >(int, ...)", "elementwise"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::MeanOps"
     "<float, float, float, float>, unsigned int, float, 4, 4> >(...)", "elementwise"),
    ("Memcpy HtoD (Pinned -> Device)", "other"),
    ("aten::addmm", "matmul"), ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("aten::cat", "cache copy"), ("aten::silu", "elementwise"), ("aten::sort", "other"),
])
def test_kernels_are_sorted_into_kinds_by_name(name, kind):
    assert kind_of(name) == kind


def test_profile_covers_the_batches_after_the_warm_up(tmp_path):
    reporter = RecordingReporter()
    # 4 questions x 2 k in batches of at most 2; the 2nd and 3rd are profiled. Without the
    # shared prefix each prefill is one forward, whatever the batch's rows.
    result = run_bench(BenchConfig(shape="tiny", questions=4, tokens=[576, 20], device="cpu",
                                   batch_size=2, seed_questions=1, profile=True,
                                   share_prefix=False, output_dir=tmp_path), reporter)
    profile = json.loads((tmp_path / "profile.json").read_text())
    assert profile["batches"] == 2 and profile["warmup_batches"] == 1
    assert list(profile["kinds"]) == list(KINDS)
    assert sum(v["share"] for v in profile["kinds"].values()) == pytest.approx(1.0)
    assert profile["kinds"]["matmul"]["seconds"] > 0
    names = {t["name"]: t for t in profile["top"]}
    assert names["aten::mm"]["kind"] == "matmul"
    # 2 batches x (prefill + 1 decode step) x (2 layers x q, k, v, o, gate, up, down + LM head).
    assert names["aten::mm"]["calls"] == 2 * 2 * (2 * 7 + 1)
    assert result["profile"]["kinds"] == profile["kinds"]
    # The longest single host calls, longest first, each with its input shapes: a matrix
    # product's are its two operands' (none here is longer than all mm calls together).
    longest = profile["host_longest"]
    assert len(longest) == 10
    assert [t["seconds"] for t in longest] == sorted((t["seconds"] for t in longest),
                                                     reverse=True)
    assert longest[0]["seconds"] <= max(t["seconds"] for t in profile["host_top"])
    assert any(t["shapes"] for t in longest)
    for t in longest:
        if t["name"] == "aten::mm":
            assert len(t["shapes"]) == 2 and t["shapes"][0][-1] == t["shapes"][1][0]
    assert any(title.startswith("longest single host calls") for title, _, _ in reporter.tables)
    assert (tmp_path / "profile_trace.json.gz").stat().st_size > 0
    assert any(title.startswith("profile by kind") for title, _, _ in reporter.tables)


def test_too_few_batches_to_profile_is_said(tmp_path):
    reporter = RecordingReporter()
    result = run_bench(BenchConfig(shape="tiny", questions=1, tokens=[20], device="cpu",
                                   seed_questions=1, profile=True, output_dir=tmp_path),
                       reporter)
    assert result["profile"] is None and not (tmp_path / "profile.json").exists()
    assert any("--profile" in message for _, message in reporter.messages)


def test_the_matmul_peak_is_the_fastest_of_its_rounds(monkeypatch):
    """The MFU denominator is the best of several timed rounds, not one noisy round: with
    rounds of 4, 2 and 3 seconds the peak is the work of a round over 2 seconds."""
    import torch

    import vtkit.bench as bench

    clock = iter([0.0, 4.0, 10.0, 12.0, 20.0, 23.0])
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))
    peak = bench.matmul_peak(torch.device("cpu"), torch.float32, rounds=3)
    assert peak == pytest.approx(2 * 1024 ** 3 * 5 / 2.0)
