"""``vtkit bench``: measure vtkit's real extract + sweep code path on a model of a named shape.

The model is built from its config with random weights directly on the device; the questions
are synthetic, with text lengths drawn from the real ScienceQA test questions (the length table
in ``assets/cqma_test_lengths.json``). Extract and sweep then run exactly as a user's would
(same functions, batching, activation capture and spectra), with a phase timer attached. Random
weights never stop at EOS, so the bench decodes ``max_new_tokens`` = 2 tokens per answer, what
LLaVA-1.5 emits on ScienceQA (the letter, then EOS).
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from vtkit import cache
from vtkit.defaults import (
    DEFAULT_BENCH_DIR,
    DEFAULT_BENCH_MAX_NEW_TOKENS,
    DEFAULT_BENCH_PROFILE_BATCHES,
    DEFAULT_BENCH_QUESTIONS,
    DEFAULT_BENCH_SEED_QUESTIONS,
    DEFAULT_BENCH_SHAPE,
    DEFAULT_CAPTURE,
    DEFAULT_CONV_MODE,
    DEFAULT_DEVICE,
    DEFAULT_EIGENSOLVER,
    DEFAULT_LAYERS,
    DEFAULT_MAX_TOKENS,
    DEFAULT_MIN_TOKENS,
    DEFAULT_SEED,
    DEFAULT_SINGLE_PRED_PROMPT,
    DEFAULT_STEP,
)
from vtkit.errors import UsageError
from vtkit.pipeline import PipelineResult, run_pipeline, synchronize
from vtkit.progress import PhaseTimer, Reporter, spread, time_calls
from vtkit.pruning import gather_rows, l2_scores, token_grid, top_k_raster

LENGTHS_FILE = Path(__file__).resolve().parent / "assets" / "cqma_test_lengths.json"
MODEL_SHAPES = ("tiny", "llava-1.5-7b")   # the --shape values
#: (batch, tokens per row) of the plain-forward baseline: a sweep-sized batch on a GPU (64 rows
#: of the longest k=576 prompt length), a small one on the CPU.
PLAIN_FORWARD_SHAPE = {True: (64, 708), False: (2, 64)}
FULL_GRID = token_grid(DEFAULT_MIN_TOKENS, DEFAULT_MAX_TOKENS, DEFAULT_STEP)  # 57 values


@dataclass
class BenchConfig:
    shape: str = DEFAULT_BENCH_SHAPE
    questions: int = DEFAULT_BENCH_QUESTIONS
    tokens: list[int] = field(default_factory=lambda: list(FULL_GRID))
    device: str = DEFAULT_DEVICE
    dtype: str | None = None
    batch_size: int | None = None
    token_budget: int | None = None
    max_new_tokens: int = DEFAULT_BENCH_MAX_NEW_TOKENS
    compile: bool | None = None           # --compile of the measured sweep (None: its default)
    share_prefix: bool = True
    pack: bool | None = None              # --pack of the measured sweep (None: its default)
    layers: str = DEFAULT_LAYERS          # --layers of the measured sweep (all: every layer)
    eigensolver: str = DEFAULT_EIGENSOLVER   # --eigensolver of the measured sweep
    captures: list[str] = field(default_factory=lambda: [DEFAULT_CAPTURE])
    seed_questions: int = DEFAULT_BENCH_SEED_QUESTIONS
    profile: bool = False                 # torch.profiler over a few sweep batches
    profile_batches: int = DEFAULT_BENCH_PROFILE_BATCHES
    output_dir: Path = DEFAULT_BENCH_DIR
    seed: int = DEFAULT_SEED


def shape_config(shape: str):
    """The LlavaConfig of a named model shape."""
    from vtkit.demo.tiny import tiny_config

    if shape == "tiny":
        return tiny_config()
    if shape == "llava-1.5-7b":
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

        text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                           num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                           max_position_embeddings=4096, rms_norm_eps=1e-5,
                           tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                           pad_token_id=32001)
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=336, patch_size=14,
                                  projection_dim=768, hidden_act="quick_gelu")
        return LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000,
                           projector_hidden_act="gelu", vision_feature_layer=-2,
                           vision_feature_select_strategy="default",
                           image_seq_length=576, tie_word_embeddings=False)
    raise UsageError(f"--shape: unknown shape {shape!r} (known: {', '.join(MODEL_SHAPES)})")


def length_table() -> list[int]:
    """Text tokens of the real test image questions' prompts (Llama-2 tokenizer)."""
    return json.loads(LENGTHS_FILE.read_text())["image_question_lengths"]


def representative_lengths(n: int) -> list[int]:
    """n lengths at evenly spaced quantiles of the real table: same mean and spread."""
    table = np.sort(np.asarray(length_table()))
    picks = np.round(np.linspace(0, len(table) - 1, n)).astype(int)
    return table[picks].tolist()


def full_sweep_tokens(grid: list[int] = FULL_GRID) -> int:
    """Prefill tokens of the full sweep: every real image question at every k of the grid."""
    lengths = length_table()
    return len(grid) * sum(lengths) + len(lengths) * sum(grid)


def matmul_peak(device: torch.device, dtype: torch.dtype, rounds: int = 5) -> float:
    """Measured dense matmul throughput of this device (FLOP/s), the MFU denominator: the
    fastest of ``rounds`` timed rounds. One round of 30 products (about 40 ms on an H200)
    measured 765-790 TFLOP/s on the same GPU from run to run; the best of several is the
    peak the card reaches, and a steadier denominator."""
    size = 8192 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    repeats = 30 if device.type == "cuda" else 5
    best = float("inf")
    for _ in range(rounds):
        synchronize(device)
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * size ** 3 * repeats / best


def plain_forward(model, batch: int, length: int, repeats: int) -> dict:
    """The reference the sweep is held against: the language model's own forward over random
    embeddings of ``batch`` rows of ``length`` tokens, no padding mask, no cache, no capture,
    timed by :func:`time_calls` (median of ``repeats`` after one warm-up call)."""
    from vtkit.progress import spread, time_calls

    embeds = torch.randn(batch, length, model.hidden_size, device=model.device,
                         dtype=model.dtype) * 0.02

    @torch.inference_mode()
    def forward() -> None:
        model.language_model(inputs_embeds=embeds, use_cache=False)

    forward()
    seconds = spread(time_calls([forward] * repeats, model.device))
    return {"batch": batch, "length": length, "seconds": seconds,
            "tokens_per_s": batch * length / seconds["median"]}


def write_bench_questions(base_dir: Path, tokenizer, lengths: list[int], seed: int = 0) -> Path:
    """A ScienceQA folder of image questions whose prompts have the given text lengths."""
    from PIL import Image

    from vtkit.data import Question
    from vtkit.prompts import build_prompt, tokenize_prompt

    base_dir = Path(base_dir)
    rng = np.random.default_rng(seed)
    # The shortest question the tokenizer allows: lengths below it are raised to it (the tiny
    # tokenizer spends more tokens on the system prompt than Llama-2's does).
    question, choices = "Colour?", ["red", "blue"]

    def length_of(hint: str) -> int:
        text = "<image>\n" + (f"Context: {hint}\n" if hint else "") + f"{question}\n" + \
            "\n".join(f"{'AB'[i]}. {c}" for i, c in enumerate(choices))
        ids = tokenize_prompt(build_prompt(Question("x", text, "x/image.png", "A"),
                                           DEFAULT_CONV_MODE, DEFAULT_SINGLE_PRED_PROMPT),
                             tokenizer)
        return len(ids) - 1

    base = length_of("")
    per_word = (length_of(" ".join(["data"] * 100)) - length_of("data")) / 99
    problems, pids = {}, []
    for i, target in enumerate(lengths):
        words = 0
        if target > base:
            words = max(1, round((target - length_of("data")) / per_word) + 1)
            words = max(1, words + round((target - length_of(" ".join(["data"] * words)))
                                         / per_word))
        pid = f"b{i:05d}"
        problems[pid] = {
            "question": question, "choices": choices, "answer": int(rng.integers(2)),
            "hint": " ".join(["data"] * words),
            "image": "image.png", "task": "closed choice", "grade": "grade1",
            "subject": "natural science", "topic": "bench", "category": "bench",
            "skill": "bench", "lecture": "", "solution": "", "split": "test"}
        pids.append(pid)
        folder = base_dir / "images" / "test" / pid
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (336, 336, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "image.png")
    (base_dir / "problems.json").write_text(json.dumps(problems))
    (base_dir / "pid_splits.json").write_text(json.dumps({"test": pids}))
    return base_dir


def seed_style_question(model, selection, item, k: int, sweep_config) -> None:
    """One question of the single-script loop at one k: batch 1, the vision tower re-run for
    the (question, k), then prune, prefill and generate."""
    from vtkit.generate import decode, prefill
    from vtkit.images import load_image, preprocess_images

    pixels = preprocess_images([load_image(selection.image_path(item.question))], "pad")
    with torch.inference_mode():
        features, _ = model.encode_images(pixels.to(model.device, model.dtype))
        projected = model.project(features)
        visual = gather_rows(projected, top_k_raster(l2_scores(projected), k))
    decode(model, [item], prefill(model, [item], [visual[0]]), sweep_config, [k])


def seed_style_seconds(model, selection, items, k: int, sweep_config) -> list[float]:
    """Seconds of each question of the seed-style loop at one k (:func:`time_calls`: CUDA
    events on a GPU), after one untimed question: batch-1 shapes of a new k are new to the
    kernels' autotuning caches."""
    seed_style_question(model, selection, items[0], k, sweep_config)
    return time_calls([functools.partial(seed_style_question, model, selection, item, k,
                                         sweep_config) for item in items], model.device)


def run_bench(config: BenchConfig, reporter: Reporter | None = None) -> dict:
    """Build the model, run extract + sweep on synthetic questions, return the measurements
    (also written to ``bench.json`` in the output dir, and shown as a table)."""
    from vtkit.data import select_questions
    from vtkit.generate import batch_decoder, prepare_items

    reporter = reporter or Reporter()
    out = Path(config.output_dir)
    model, model_dir, build_seconds = build_bench_model(config, out / f"model-{config.shape}")
    reporter.warn(f"RANDOM WEIGHTS: benchmark model of shape {config.shape} "
                  f"({model.dtype}, {model.device})")
    peak = matmul_peak(model.device, model.dtype)
    result = model_measures(config, model, build_seconds, peak)
    data_dir = write_bench_questions(out / "scienceqa", model.tokenizer,
                                     representative_lengths(config.questions), config.seed)
    run, timer, sweep_config = run_timed_pipeline(config, model, model_dir, data_dir,
                                                  out / "run", reporter)
    # Useful tokens (no padding) define throughput and MFU; padding is reported on its own.
    selection = select_questions(data_dir)
    items = prepare_items(selection.questions, model.tokenizer, sweep_config)
    flop_per_token = 2 * result["lm_parameters"]
    result.update(throughput(config, run, timer.totals(), items, flop_per_token, peak,
                             timer.counts()))
    result["pack"] = batch_decoder(model, sweep_config) is not None    # as the sweep resolved it
    baseline = plain_forward(model, *PLAIN_FORWARD_SHAPE[model.device.type == "cuda"],
                             repeats=5)
    baseline["mfu"] = baseline["tokens_per_s"] * flop_per_token / peak
    result["plain_forward"] = baseline
    result.update(seed_style_comparison(model, selection, items, config, sweep_config, result))
    result["config"] = {k: (str(v) if isinstance(v, Path) else v)
                        for k, v in asdict(config).items()}
    if config.profile:
        result["profile"] = write_profile(timer, out, reporter)
    cache.write_json_atomic(out / "bench.json", result)
    report_bench(result, reporter)
    return result


def write_profile(profiler, out: Path, reporter: Reporter) -> dict | None:
    """profile.json and the timeline of the profiled batches, their tables; the totals by kind
    (for bench.json), or None with a warning when the sweep had too few batches."""
    from vtkit.profiling import profile_tables

    summary = profiler.finish()
    if summary is None:
        reporter.warn(f"--profile: the sweep ran {profiler.batches_seen} batch(es), none after "
                      f"the {profiler.warmup} warm-up one(s); nothing was profiled (use more "
                      f"--questions or a smaller --batch-size)")
        return None
    cache.write_json_atomic(out / "profile.json", summary)
    profiler.write_trace(out / "profile_trace.json.gz")
    for title, columns, rows in profile_tables(summary):
        reporter.table(title, columns, rows)
    return {"file": str(out / "profile.json"), "batches": summary["batches"],
            "kinds": summary["kinds"]}


def build_bench_model(config: BenchConfig, model_dir: Path):
    """The model of the bench's shape, random weights on its device: (model, its checkpoint
    directory of configs, seconds to build it)."""
    from vtkit.demo.tiny import write_config_checkpoint
    from vtkit.model import load_model

    model_dir = write_config_checkpoint(model_dir, shape_config(config.shape))
    started = time.perf_counter()
    model = load_model(model_dir, random_init=True, dtype=config.dtype, device=config.device,
                       seed=config.seed)
    synchronize(model.device)
    return model, model_dir, time.perf_counter() - started


def model_measures(config: BenchConfig, model, build_seconds: float, peak: float) -> dict:
    """The device, the model's size and cost per token, the device's matmul peak (FLOP/s)."""
    from vtkit.sweep import resolve_eigensolver, resolve_layers

    lm_params = sum(p.numel() for p in model.language_model.parameters()) + \
        sum(p.numel() for p in model.lm_head.parameters())
    return {
        "device": torch.cuda.get_device_name(model.device) if model.device.type == "cuda"
        else "cpu",
        "shape": config.shape, "dtype": str(model.dtype).replace("torch.", ""),
        "questions": config.questions, "k_values": len(config.tokens),
        "layers": config.layers, "captures": list(config.captures),
        "eigensolver": resolve_eigensolver(
            config.eigensolver, model.device,
            len(config.captures) * len(resolve_layers(config.layers, model.num_layers))),
        "lm_parameters": lm_params, "gflop_per_token": 2 * lm_params / 1e9,
        "matmul_peak_tflops": peak / 1e12, "model_build_seconds": build_seconds,
    }


def run_timed_pipeline(config: BenchConfig, model, model_dir: Path, data_dir: Path,
                       run_dir: Path, reporter: Reporter):
    """Extract and sweep the bench questions from scratch, as a user's run would, timing the
    sweep's phases: (the pipeline's result, the phase timer, the sweep config)."""
    from vtkit.extract import ExtractConfig
    from vtkit.profiling import BatchProfiler
    from vtkit.sweep import SweepConfig

    common = dict(model_path=str(model_dir), base_dir=data_dir, output_dir=run_dir,
                  random_init=True, dtype=config.dtype, device=config.device, force=True)
    for stale in ("features.h5", "sweep.h5"):
        (run_dir / stale).unlink(missing_ok=True)
    # No raw rows kept (--keep-attention 0): they are a fixed cost of the first questions, which
    # the projection to the full sweep, per question, would multiply.
    sweep_config = SweepConfig(**common, tokens=list(config.tokens), keep_attention=0,
                               max_new_tokens=config.max_new_tokens,
                               batch_size=config.batch_size, token_budget=config.token_budget,
                               compile=config.compile, share_prefix=config.share_prefix,
                               pack=config.pack,
                               layers=config.layers,
                               eigensolver=config.eigensolver,
                               captures=list(config.captures))
    timer = (BatchProfiler(model.device, config.profile_batches) if config.profile
             else PhaseTimer(model.device))
    run = run_pipeline(ExtractConfig(**common, seed=config.seed), sweep_config,
                       reporter=reporter, model=model, timer=timer)
    return run, timer, sweep_config


def throughput(config: BenchConfig, run: PipelineResult, phases: dict[str, float], items,
               flop_per_token: int, peak: float, counts: dict[str, int]) -> dict:
    """Images/s of extract; tokens/s, MFU, padding, phase shares and peak memory of the sweep;
    the full sweep's projected time against its FLOP floor.

    MFU counts the useful tokens, the work of one question at a time; with a shared prefix
    the forwards compute fewer (``computed_tokens``: padding added, the rows' copies of the
    prefix taken away), and ``computed_mfu`` is the share of peak those achieve."""
    # Compiling the packed decoder and loading the kernels of the batches' sizes are costs of
    # the run, like loading the model, not of its questions: they are reported on their own
    # and kept out of the rate the projection scales.
    compile_seconds = phases.get("compile", 0.0)
    warm_up_seconds = phases.get("warm_up", 0.0)
    phases = {name: seconds for name, seconds in phases.items()
              if name not in ("compile", "warm_up")}
    sweep_seconds = run.seconds["sweep"] - compile_seconds - warm_up_seconds
    real_tokens = sum(it.text_length + k for it in items for k in config.tokens)
    tokens_per_s = real_tokens / sweep_seconds
    full_tokens = full_sweep_tokens()
    projected = full_tokens / tokens_per_s
    floor = full_tokens * flop_per_token / peak
    phase_total = sum(phases.values()) or 1.0
    peak_memory = run.peak_memory.get("sweep")
    shared = counts.get("shared prefix tokens", 0)
    computed = run.swept.prefill_tokens - shared
    return {
        "vision_images_per_s": run.extracted.num_images / run.seconds["extract"],
        "sweep_seconds": sweep_seconds, "useful_tokens": real_tokens,
        "padded_tokens": run.swept.prefill_tokens,
        "padding_overhead": run.swept.prefill_tokens / real_tokens - 1.0,
        "compile": config.compile, "compile_seconds": compile_seconds,
        "warm_up_seconds": warm_up_seconds,
        "share_prefix": config.share_prefix, "shared_prefix_tokens": shared,
        "shared_prefix_share": shared / real_tokens, "computed_tokens": computed,
        "prefill_tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s * flop_per_token / peak,
        "computed_mfu": computed / sweep_seconds * flop_per_token / peak,
        "phase_seconds": phases,
        "decode_share": phases.get("decode", 0.0) / phase_total,
        "capture_svd_share": phases.get("spectra", 0.0) / phase_total,
        "peak_gpu_memory_gb": peak_memory / 1e9 if peak_memory is not None else None,
        "token_budget": config.token_budget, "batch_size": config.batch_size,
        "full_sweep_tokens": full_tokens, "projected_full_sweep_seconds": projected,
        "flop_floor_seconds": floor, "ratio_to_floor": projected / floor,
    }


def seed_style_comparison(model, selection, items, config: BenchConfig, sweep_config,
                          measured: dict) -> dict:
    """The seed-style loop's seconds per question at the grid's ends (the median over the
    questions, and its spread), its full sweep extrapolated linearly in k, and the speed-up of
    the measured sweep over it."""
    seed_items = items[:max(1, config.seed_questions)]
    timings = {k: spread(seed_style_seconds(model, selection, seed_items, k, sweep_config))
               for k in (max(config.tokens), min(config.tokens))}
    seed_cost = {k: timing["median"] for k, timing in timings.items()}
    k_hi, k_lo = max(seed_cost), min(seed_cost)
    slope = (seed_cost[k_hi] - seed_cost[k_lo]) / max(1, k_hi - k_lo)
    seed_full = len(length_table()) * sum(seed_cost[k_lo] + slope * (k - k_lo)
                                          for k in FULL_GRID)
    return {
        "seed_style_seconds_per_question": {str(k): v for k, v in seed_cost.items()},
        "seed_style_timings": {str(k): v for k, v in timings.items()},
        "seed_style_timer": "cuda events" if model.device.type == "cuda" else "perf_counter",
        "seed_style_full_sweep_seconds": seed_full,
        "speedup_over_seed_style": seed_full / measured["projected_full_sweep_seconds"],
    }


def report_bench(result: dict, reporter: Reporter) -> None:
    """The measurements as one table."""
    reporter.table(f"vtkit bench: {result['shape']} on {result['device']}", ["measure", "value"], [
        ["bf16/fp16 matmul peak (TFLOP/s)", result["matmul_peak_tflops"]],
        ["vision + extract (images/s)", result["vision_images_per_s"]],
        ["prefill tokens/s (whole sweep)", result["prefill_tokens_per_s"]],
        ["MFU", f"{100 * result['mfu']:.1f}%"],
        [f"plain forward tokens/s (batch {result['plain_forward']['batch']} x "
         f"{result['plain_forward']['length']}, no mask)",
         result["plain_forward"]["tokens_per_s"]],
        ["plain forward MFU", f"{100 * result['plain_forward']['mfu']:.1f}%"],
        ["decode share", f"{100 * result['decode_share']:.1f}%"],
        [f"capture + SVD share (layers {result['layers']}, eigenvalues by "
         f"{result['eigensolver']})", f"{100 * result['capture_svd_share']:.1f}%"],
        ["rows", "packed" if result["pack"] else "left-padded"],
        ["compile, before the sweep's time (s)", result["compile_seconds"]],
        ["kernels of the batches' sizes loaded, before the sweep's time (s)",
         result["warm_up_seconds"]],
        ["padding overhead", f"{100 * result['padding_overhead']:.1f}%"],
        ["shared prefix (tokens run once per batch, not per row)",
         f"{100 * result['shared_prefix_share']:.1f}%" if result["share_prefix"] else "off"],
        ["MFU of the tokens computed", f"{100 * result['computed_mfu']:.1f}%"],
        ["peak GPU memory (GB)", result["peak_gpu_memory_gb"] or "-"],
        ["projected full sweep (s)", result["projected_full_sweep_seconds"]],
        ["FLOP floor (s)", result["flop_floor_seconds"]],
        ["ratio to floor", result["ratio_to_floor"]],
        ["seed-style s/question (median), k " + " / ".join(result["seed_style_timings"]),
         " / ".join(f"{t['median']:.4f}" for t in result["seed_style_timings"].values())],
        ["speedup over seed-style loop", result["speedup_over_seed_style"]],
    ])
