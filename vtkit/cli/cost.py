"""`vtkit cost`: latency, throughput, KV-cache bytes and FLOPs of one question per k."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vtkit.cli.options import (
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    MaxOpt,
    MinOpt,
    ModelBaseOpt,
    RandomInitOpt,
    SeedOpt,
    ShapeOpt,
    StepOpt,
    TokensOpt,
    resolve_tokens,
)
from vtkit.cli.output import print_json
from vtkit.defaults import (
    DEFAULT_COST_DIR,
    DEFAULT_COST_REPEATS,
    DEFAULT_COST_THROUGHPUT_REPEATS,
    DEFAULT_COST_TOKENS,
    DEFAULT_COST_WARMUP,
    DEFAULT_DEVICE,
    DEFAULT_MAX_TOKENS,
    DEFAULT_MIN_TOKENS,
    DEFAULT_SEED,
    DEFAULT_STEP,
)

CheckpointOpt = Annotated[str | None, typer.Option(
    "--model-path",
    help="Measure this LLaVA checkpoint (directory or cached repo id) instead of a --shape.")]
RepeatsOpt = Annotated[int, typer.Option(
    "--repeats", min=1, help="Timed calls per latency measure; the median is reported.")]
WarmupOpt = Annotated[int, typer.Option(
    "--warmup", min=0, help="Untimed calls before each measure.")]
ThroughputRepeatsOpt = Annotated[int, typer.Option(
    "--throughput-repeats", min=1, help="Timed batches of the throughput measure.")]
ThroughputBatchOpt = Annotated[int | None, typer.Option(
    "--batch-size", min=1,
    help="Questions per batch of the throughput measure (default: the automatic token budget).")]
CostDirOpt = Annotated[Path, typer.Option(
    "--output-dir", help="Where cost.json, cost.png/.pdf and the shape's configs go.")]


def cost(
    shape: ShapeOpt = None,
    model_path: CheckpointOpt = None,
    model_base: ModelBaseOpt = None,
    random_init: RandomInitOpt = False,
    tokens: TokensOpt = None,
    min_tokens: MinOpt = None,
    max_tokens: MaxOpt = None,
    step: StepOpt = None,
    device: DeviceOpt = DEFAULT_DEVICE,
    dtype: DtypeOpt = None,
    repeats: RepeatsOpt = DEFAULT_COST_REPEATS,
    warmup: WarmupOpt = DEFAULT_COST_WARMUP,
    throughput_repeats: ThroughputRepeatsOpt = DEFAULT_COST_THROUGHPUT_REPEATS,
    batch_size: ThroughputBatchOpt = None,
    seed: SeedOpt = DEFAULT_SEED,
    output_dir: CostDirOpt = DEFAULT_COST_DIR,
    json_output: JsonOpt = False,
) -> None:
    """Cost of one question at each k: prefill latency, time to first token, throughput,
    KV-cache bytes and FLOPs.

    The question has the median text length of the ScienceQA test image questions. Latencies
    are at batch 1 (median of --repeats after --warmup, CUDA events on a GPU); throughput at the
    automatic batch size. Writes cost.json (device, dtype, versions, attention backend) and
    cost.png/.pdf. The grid: --tokens, or --min/--max/--step, else 576,448,320,192,128,64,32.
    Without --model-path the model has random weights of --shape (default tiny).

    Example: vtkit cost --shape llava-1.5-7b --device cuda --dtype bfloat16
    """
    from vtkit.cli.progress import RichReporter
    from vtkit.cost import CostConfig, run_cost

    if tokens or any(v is not None for v in (min_tokens, max_tokens, step)):
        grid = resolve_tokens(DEFAULT_MIN_TOKENS if min_tokens is None else min_tokens,
                              DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
                              DEFAULT_STEP if step is None else step, tokens)
    else:
        grid = list(DEFAULT_COST_TOKENS)
    config = CostConfig(shape=shape, model_path=model_path, model_base=model_base,
                        random_init=random_init, tokens=grid, device=device, dtype=dtype,
                        repeats=repeats, warmup=warmup, throughput_repeats=throughput_repeats,
                        batch_size=batch_size, output_dir=output_dir, seed=seed)
    result = run_cost(config, RichReporter())
    if json_output:
        print_json(result)
