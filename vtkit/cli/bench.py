"""`vtkit bench`: benchmark the real extract + sweep code path on a named model shape."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vtkit.cli.options import (
    BatchSizeOpt,
    CaptureOpt,
    CompileOpt,
    DeviceOpt,
    DtypeOpt,
    EigensolverOpt,
    JsonOpt,
    LayersOpt,
    MaxNewTokensOpt,
    PackOpt,
    ShapeOpt,
    SharePrefixOpt,
    TokenBudgetOpt,
    TokensOpt,
    resolve_tokens,
    split_captures,
)
from vtkit.cli.output import print_json
from vtkit.defaults import (
    DEFAULT_BENCH_DIR,
    DEFAULT_BENCH_MAX_NEW_TOKENS,
    DEFAULT_BENCH_PROFILE_BATCHES,
    DEFAULT_BENCH_QUESTIONS,
    DEFAULT_BENCH_SEED_QUESTIONS,
    DEFAULT_BENCH_SHAPE,
    DEFAULT_CAPTURE,
    DEFAULT_DEVICE,
    DEFAULT_EIGENSOLVER,
    DEFAULT_LAYERS,
    DEFAULT_MAX_TOKENS,
    DEFAULT_MIN_TOKENS,
    DEFAULT_STEP,
)

QuestionsOpt = Annotated[int, typer.Option(
    "--questions", min=1, help="Synthetic image questions in the measured sweep.")]
SeedQuestionsOpt = Annotated[int, typer.Option(
    "--seed-questions", min=1, help="Questions timed in the seed-style loop (batch 1).")]
ProfileOpt = Annotated[bool, typer.Option(
    "--profile", help="Run torch.profiler over a few sweep batches after a warm-up one; write "
                      "profile.json (top kernels, time by kind) and its timeline.")]
ProfileBatchesOpt = Annotated[int, typer.Option(
    "--profile-batches", min=1, help="Sweep batches that --profile profiles.")]
BenchDirOpt = Annotated[Path, typer.Option("--output-dir", help="Where the bench writes.")]


def bench(
    shape: ShapeOpt = DEFAULT_BENCH_SHAPE,
    questions: QuestionsOpt = DEFAULT_BENCH_QUESTIONS,
    tokens: TokensOpt = None,
    device: DeviceOpt = DEFAULT_DEVICE,
    dtype: DtypeOpt = None,
    batch_size: BatchSizeOpt = None,
    token_budget: TokenBudgetOpt = None,
    max_new_tokens: MaxNewTokensOpt = DEFAULT_BENCH_MAX_NEW_TOKENS,
    seed_questions: SeedQuestionsOpt = DEFAULT_BENCH_SEED_QUESTIONS,
    compile_decoder: CompileOpt = None,
    share_prefix: SharePrefixOpt = True,
    pack: PackOpt = None,
    layers: LayersOpt = DEFAULT_LAYERS,
    eigensolver: EigensolverOpt = DEFAULT_EIGENSOLVER,
    capture: CaptureOpt = DEFAULT_CAPTURE,
    profile: ProfileOpt = False,
    profile_batches: ProfileBatchesOpt = DEFAULT_BENCH_PROFILE_BATCHES,
    output_dir: BenchDirOpt = DEFAULT_BENCH_DIR,
    json_output: JsonOpt = False,
) -> None:
    """Measure extract + sweep throughput, MFU, and the projected time of a full sweep.

    Builds a model of the named shape with random weights on the device, writes synthetic
    image questions whose lengths follow the real ScienceQA test set, runs extract and the sweep
    exactly as `vtkit sweep` does, and compares with a seed-style loop (batch 1, vision per k).

    --layers all measures the cost of capturing every decoder layer. --profile adds a
    torch.profiler summary of a few sweep batches (profile.json; its batches run slower, so
    quote throughput from a run without it).

    Example: vtkit bench --shape llava-1.5-7b --questions 256 --device cuda --dtype bfloat16
    --layers all
    """
    from vtkit.bench import BenchConfig, run_bench
    from vtkit.cli.progress import RichReporter

    config = BenchConfig(
        shape=shape, questions=questions,
        tokens=resolve_tokens(DEFAULT_MIN_TOKENS, DEFAULT_MAX_TOKENS, DEFAULT_STEP, tokens),
        device=device, dtype=dtype,
        batch_size=batch_size, token_budget=token_budget, max_new_tokens=max_new_tokens,
        seed_questions=seed_questions, compile=compile_decoder, share_prefix=share_prefix,
        pack=pack,
        layers=layers,
        eigensolver=eigensolver,
        captures=split_captures(capture), profile=profile, profile_batches=profile_batches,
        output_dir=output_dir)
    result = run_bench(config, RichReporter())
    if json_output:
        print_json(result)
