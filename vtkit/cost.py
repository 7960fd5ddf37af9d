"""``vtkit cost``: what one question costs at each k of a grid, measured and by formula.

For a model of a named shape (random weights, as :mod:`vtkit.bench` builds it) or a real
checkpoint, one question whose prompt has the median text length of the real ScienceQA test
image questions is run through vtkit's own prefill and decode at every k, and for each k the
table gives: prefill latency at batch 1, time to first token (prefill and the first token's
pick, on the host), throughput at the automatic batch size (prefill and a two-token answer),
KV-cache bytes per question, and FLOPs per question by :mod:`vtkit.flops`. Timings are the
median (with quartiles and extremes) of repeated calls after untimed warm-up calls: CUDA events
on a GPU, the clock on the CPU (:func:`vtkit.progress.time_repeats`). docs/performance.md
defines every column.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from vtkit import __version__, cache
from vtkit.defaults import (
    DEFAULT_BENCH_MAX_NEW_TOKENS,
    DEFAULT_COST_DIR,
    DEFAULT_COST_REPEATS,
    DEFAULT_COST_THROUGHPUT_REPEATS,
    DEFAULT_COST_TOKENS,
    DEFAULT_COST_WARMUP,
    DEFAULT_DEVICE,
    DEFAULT_SEED,
)
from vtkit.errors import UsageError
from vtkit.flops import LMShape, decode_flops, prefill_flops
from vtkit.progress import Reporter, spread, time_repeats

COST_FILE = "cost.json"
FIGURE_STEM = "cost"
#: Where the FLOPs formula is written out.
FLOPS_REFERENCE = "vtkit.flops; docs/performance.md, section 'FLOPs per question'"
#: Answer tokens of the throughput measure and of the FLOPs per question: the letter, then EOS.
ANSWER_TOKENS = DEFAULT_BENCH_MAX_NEW_TOKENS


@dataclass
class CostConfig:
    shape: str | None = None              # a named shape (vtkit.bench.MODEL_SHAPES); or:
    model_path: str | None = None         # a checkpoint
    model_base: str | None = None
    random_init: bool = False             # the checkpoint's config with random weights
    tokens: list[int] = field(default_factory=lambda: list(DEFAULT_COST_TOKENS))
    device: str = DEFAULT_DEVICE
    dtype: str | None = None
    repeats: int = DEFAULT_COST_REPEATS
    warmup: int = DEFAULT_COST_WARMUP
    throughput_repeats: int = DEFAULT_COST_THROUGHPUT_REPEATS
    batch_size: int | None = None         # rows of the throughput batch (default: automatic)
    output_dir: Path = DEFAULT_COST_DIR
    seed: int = DEFAULT_SEED


def run_cost(config: CostConfig, reporter: Reporter | None = None) -> dict:
    """Measure the cost table; write ``cost.json`` and ``cost.png``/``cost.pdf`` in the output
    dir, show the table, return the JSON document."""
    from vtkit.sweep import check_tokens

    reporter = reporter or Reporter()
    check_cost_config(config)
    check_tokens(config.tokens, cost_num_patches(config))
    out = Path(config.output_dir)
    model = load_cost_model(config, out)
    if model.identity["random_init"]:
        reporter.warn(f"RANDOM WEIGHTS: cost table of {describe_model(config)} "
                      f"({model.dtype}, {model.device})")
    item, median = median_question(model, out / "scienceqa", config.seed)
    kernels = observed_attention(model, item, config)
    rows = []
    with reporter.task("cost per k", total=len(config.tokens), unit="k") as task:
        for k in config.tokens:
            rows.append(measure_k(model, item, k, config))
            task.advance()
    result = {
        "vtkit_version": __version__,
        "model": describe_model(config), "identity": model.identity,
        **environment(model, kernels),
        "timer": "cuda events" if model.device.type == "cuda" else "perf_counter",
        "repeats": config.repeats, "warmup": config.warmup,
        "throughput_repeats": config.throughput_repeats,
        "text_tokens": item.text_length, "median_text_tokens": median,
        "answer_tokens": ANSWER_TOKENS, "flops_formula": FLOPS_REFERENCE,
        "kv_cache_bytes_per_token": kv_bytes_per_token(model),
        "rows": rows,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
    }
    out.mkdir(parents=True, exist_ok=True)
    cache.write_json_atomic(out / COST_FILE, result)
    result["figures"] = [str(p) for p in write_cost_figure(result, out / FIGURE_STEM)]
    report_cost(result, reporter)
    return result


def check_cost_config(config: CostConfig) -> None:
    """One model source, and counts that can be measured."""
    if config.shape is not None and config.model_path is not None:
        raise UsageError("pass --shape or --model-path, not both")
    if config.model_path is None and (config.random_init or config.model_base is not None):
        raise UsageError("--random-init and --model-base are for --model-path (a --shape "
                         "model always has random weights)")
    for flag, value, least in (("--repeats", config.repeats, 1), ("--warmup", config.warmup, 0),
                               ("--throughput-repeats", config.throughput_repeats, 1)):
        if value < least:
            raise UsageError(f"{flag}: must be at least {least}, got {value}")
    if config.batch_size is not None and config.batch_size < 1:
        raise UsageError(f"--batch-size: must be at least 1, got {config.batch_size}")


def describe_model(config: CostConfig) -> str:
    return config.model_path if config.model_path is not None else (config.shape or "tiny")


def cost_num_patches(config: CostConfig) -> int:
    """Visual tokens per image of the model to measure, from its config alone."""
    if config.model_path is not None:
        from vtkit.model import checkpoint_num_patches

        return checkpoint_num_patches(config.model_path)
    from vtkit.bench import shape_config

    vision = shape_config(config.shape or "tiny").vision_config
    return (vision.image_size // vision.patch_size) ** 2


def load_cost_model(config: CostConfig, out: Path):
    """The checkpoint, or the named shape with random weights built as the bench builds it."""
    if config.model_path is not None:
        from vtkit.model import load_model

        return load_model(config.model_path, config.model_base, random_init=config.random_init,
                          dtype=config.dtype, device=config.device, seed=config.seed)
    from vtkit.bench import BenchConfig, build_bench_model

    shape = config.shape or "tiny"
    bench = BenchConfig(shape=shape, device=config.device, dtype=config.dtype, seed=config.seed)
    model, _, _ = build_bench_model(bench, out / f"model-{shape}")
    return model


def median_question(model, base_dir: Path, seed: int):
    """(one prepared image question whose prompt has the median text length of the real test
    image questions, that median); a tokenizer whose system prompt alone is longer (the tiny
    one) gives its shortest prompt instead."""
    from vtkit.bench import length_table, write_bench_questions
    from vtkit.data import select_questions
    from vtkit.generate import prepare_items
    from vtkit.sweep import SweepConfig

    median = int(np.median(length_table()))
    write_bench_questions(base_dir, model.tokenizer, [median], seed)
    questions = select_questions(base_dir).questions
    items = prepare_items(questions, model.tokenizer,
                          SweepConfig(model_path="", base_dir=base_dir, tokens=[1]))
    return items[0], median


def visual_rows(model, k: int, seed: int) -> torch.Tensor:
    """k projected visual rows [k, D] of random CLIP features (their values do not change the
    cost)."""
    generator = torch.Generator().manual_seed(seed + k)
    features = torch.randn(1, k, model.vision_hidden_size, generator=generator)
    return model.project(features)[0]


def kv_bytes_per_token(model) -> int:
    """Bytes of keys and values one position holds in the KV cache: 2 x layers x KV heads x
    head size x bytes per element."""
    shape = lm_shape(model)
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * (torch.finfo(model.dtype).bits
                                                                 // 8)


def lm_shape(model) -> LMShape:
    """The language model's shape, with the vocabulary its LM head really has."""
    shape = LMShape.from_config(model.language_model.config)
    return dataclasses.replace(shape, vocab=int(model.lm_head.out_features))


def measure_k(model, item, k: int, config: CostConfig) -> dict:
    """One row of the table: timings, KV bytes and FLOPs of the question at k."""
    from vtkit.generate import decode, default_token_budget, pick_tokens, prefill
    from vtkit.sweep import SweepConfig

    visual = visual_rows(model, k, config.seed)
    length = item.text_length + k
    device = model.device

    def first_token() -> list[int]:
        state = prefill(model, [item], [visual])
        return pick_tokens(state.logits, {"temperature": 0.0}, None).tolist()

    prefill_seconds = time_repeats(lambda: prefill(model, [item], [visual]), device,
                                   config.repeats, config.warmup)
    first_token_seconds = time_repeats(first_token, device, config.repeats, config.warmup)
    rows = config.batch_size or max(1, default_token_budget(model) // length)
    answer = SweepConfig(model_path="", base_dir=".", tokens=[k], max_new_tokens=ANSWER_TOKENS)
    batch_seconds = time_repeats(
        lambda: decode(model, [item] * rows, prefill(model, [item] * rows, [visual] * rows),
                       answer, [k] * rows),
        device, config.throughput_repeats, warmup=1)
    shape = lm_shape(model)
    flops = prefill_flops(shape, item.text_length, k)
    answer_flops = decode_flops(shape, length, ANSWER_TOKENS - 1)
    prefill_time, batch_time = spread(prefill_seconds), spread(batch_seconds)
    return {
        "k": k, "tokens": length,
        "prefill_seconds": prefill_time,
        "first_token_seconds": spread(first_token_seconds),
        "throughput": {"batch_size": rows, "batch_seconds": batch_time,
                       "questions_per_s": rows / batch_time["median"],
                       "tokens_per_s": rows * length / batch_time["median"],
                       "tflop_per_s": rows * (flops + answer_flops) / batch_time["median"] / 1e12},
        "kv_cache_bytes": kv_bytes_per_token(model) * length,
        "prefill_flops": flops, "answer_decode_flops": answer_flops,
        "question_flops": flops + answer_flops,
        "prefill_tflop_per_s": flops / prefill_time["median"] / 1e12,
    }


def observed_attention(model, item, config: CostConfig) -> dict[str, list[str]]:
    """The attention kernels a prefill runs at the grid's largest k, at batch 1 and in a batch
    of two (identical rows, so no padding either)."""
    from vtkit.generate import prefill
    from vtkit.profiling import attention_kernels

    k = max(config.tokens)
    visual = visual_rows(model, k, config.seed)
    return {f"batch {rows}": attention_kernels(
        lambda rows=rows: prefill(model, [item] * rows, [visual] * rows), model.device)
        for rows in (1, 2)}


def environment(model, kernels: dict[str, list[str]]) -> dict:
    """Device, dtype, library versions and the attention: the language model's attention
    implementation, on CUDA which SDPA backends torch may pick, and the attention kernels
    (CPU operators on the CPU) a prefill really ran."""
    import transformers

    cuda = model.device.type == "cuda"
    backends = None
    if cuda:
        flags = torch.backends.cuda
        backends = {"flash": flags.flash_sdp_enabled(),
                    "memory_efficient": flags.mem_efficient_sdp_enabled(),
                    "cudnn": flags.cudnn_sdp_enabled(), "math": flags.math_sdp_enabled()}
    return {
        "device": torch.cuda.get_device_name(model.device) if cuda else "cpu",
        "dtype": str(model.dtype).replace("torch.", ""),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "attention": {"implementation": model.language_model.config._attn_implementation,
                      "sdpa_backends_enabled": backends, "kernels_seen": kernels},
    }


def write_cost_figure(result: dict, stem: Path) -> list[Path]:
    """Latency (median, quartile band) and FLOPs per question against k: ``stem``.png/.pdf."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from vtkit.plot import save_figure

    rows = sorted(result["rows"], key=lambda r: r["k"])
    k = [r["k"] for r in rows]
    figure = Figure(figsize=(9, 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    latency, flops = figure.subplots(1, 2)
    for key, label in (("prefill_seconds", "prefill (batch 1)"),
                       ("first_token_seconds", "time to first token")):
        ms = {q: [1e3 * r[key][q] for r in rows] for q in ("median", "q25", "q75")}
        latency.plot(k, ms["median"], marker="o", markersize=3, label=label)
        latency.fill_between(k, ms["q25"], ms["q75"], alpha=0.25)
    latency.set_ylabel("ms (median, quartiles)")
    latency.legend(loc="best")
    for key, label in (("prefill_flops", "prefill"), ("question_flops", "question")):
        flops.plot(k, [r[key] / 1e9 for r in rows], marker="o", markersize=3, label=label)
    flops.set_ylabel("GFLOP per question (vtkit.flops)")
    flops.legend(loc="best")
    for axes in (latency, flops):
        axes.set_xlabel("visual tokens kept (k)")
        axes.grid(alpha=0.3)
    figure.suptitle(f"Cost per k: {result['model']}, {result['dtype']} on {result['device']} "
                    f"({result['text_tokens']} text tokens)")
    return save_figure(figure, stem)


def report_cost(result: dict, reporter: Reporter) -> None:
    """The table, one row per k (quartiles of every timing are in cost.json)."""
    def iqr(timing: dict) -> str:
        return f"{100 * (timing['q75'] - timing['q25']) / timing['median']:.0f}%"

    rows = [[r["k"], r["tokens"], 1e3 * r["prefill_seconds"]["median"], iqr(r["prefill_seconds"]),
             1e3 * r["first_token_seconds"]["median"], r["throughput"]["batch_size"],
             r["throughput"]["questions_per_s"], r["kv_cache_bytes"] / 2 ** 20,
             r["prefill_flops"] / 1e9, r["question_flops"] / 1e9] for r in result["rows"]]
    reporter.table(
        f"vtkit cost: {result['model']}, {result['dtype']} on {result['device']}, "
        f"{result['text_tokens']} text tokens, attention "
        f"{result['attention']['implementation']}, {result['timer']}, median of "
        f"{result['repeats']}",
        ["k", "tokens", "prefill ms", "IQR", "TTFT ms", "batch", "q/s", "KV MiB",
         "prefill GFLOP", "GFLOP/q"], rows)
