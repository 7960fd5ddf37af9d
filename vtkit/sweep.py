"""Stage 2, ``vtkit sweep``: the pruned LLaVA passes.

For every k of the grid and every image question: take the k visual rows the chosen scorer
gives (the top k of a ranking scorer's scores, or a per-k method's kept or merged tokens, from
the cached CLIP signals; docs/scorers.md), projected, splice them into the embedded prompt in
place of the image placeholder, run the language model (batched, left-padded), capture the
chosen tensors (``--capture``: attention output, concatenated heads, decoder layer output) at
the chosen decoder layers (``--layers``) in the same prefill, keep the spectra of their k visual
rows, and decode the answer. Text-only questions do not depend on k: they run once and count in
every k. Results go to ``sweep.h5`` (layout in ``docs/cache.md``) and to LLaVA-format
answer files ``answers/k{K}.jsonl``.

This module is the stage: its config, the plan of (question, k) batches, the part files and
resuming, the merge and the scoring of the merged answers. One batch through the language
model (prepared items, activation capture, prefill, decode) is :mod:`vtkit.generate`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import h5py
import numpy as np
import torch
from threadpoolctl import threadpool_limits

from vtkit import cache, eigen, inllm
from vtkit.cache import (
    ANSWERS_DIR,
    FEATURES_FILE,
    STALE_AFTER_RESCORE,
    STALE_AFTER_SWEEP,
    SWEEP_FILE,
    SWEEP_PARTS_DIR,
)
from vtkit.data import Selection, select_questions
from vtkit.defaults import (
    CAPTURES,
    DEFAULT_CAPTURE,
    DEFAULT_CONV_MODE,
    DEFAULT_DEVICE,
    DEFAULT_EIGENSOLVER,
    DEFAULT_KEEP_ATTENTION,
    DEFAULT_LAYERS,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_NUM_SAMPLES,
    DEFAULT_OUTPUT_DIR,
    DEFAULT_PRUNE_LAYER,
    DEFAULT_SCORER,
    DEFAULT_SEED,
    DEFAULT_SINGLE_PRED_PROMPT,
    DEFAULT_SPLIT,
    DEFAULT_TEMPERATURE,
    EIGENSOLVERS,
    IN_LLM_SCORERS,
    PER_K_SCORERS,
    RANKING_SCORERS,
)
from vtkit.errors import CacheMismatchError, DataError, UsageError
from vtkit.extract import check_common_flags
from vtkit.flops import LMShape
from vtkit.generate import (
    ActivationCapture,
    PreparedItem,
    batch_decoder,
    decode_settings,
    default_token_budget,
    packing_wanted,
    prepare_items,
    run_batch,
    slot_widths,
)
from vtkit.packed import PackedDecoder, packing_problem
from vtkit.parallel import init_workers
from vtkit.progress import NullTimer, PhaseTimer, Reporter
from vtkit.prompts import get_conv_template
from vtkit.pruning import (
    SCORERS,
    gather_rows,
    gram_matrices,
    random_scores,
    spectra_from_gram,
    to_device,
    top_k_raster,
)
from vtkit.scoring import score_predictions
from vtkit.selection import (
    visionzip_split,
    visionzip_tokens,
    vispruner_important,
    vispruner_keep,
)


@dataclass
class SweepConfig:
    """Everything that decides what ``vtkit sweep`` computes (saved in sweep.h5)."""

    model_path: str
    base_dir: Path
    tokens: list[int]
    model_base: str | None = None
    question_file: Path | None = None
    image_folder: Path | None = None
    split: str = DEFAULT_SPLIT
    num_samples: int = DEFAULT_NUM_SAMPLES
    output_dir: Path = DEFAULT_OUTPUT_DIR
    scorer: str = DEFAULT_SCORER
    important_ratio: float | None = None   # vispruner's important share; None: per k (README)
    contextual_ratio: float | None = None  # visionzip's contextual share; None: 10/64 (README)
    prune_layer: int = DEFAULT_PRUNE_LAYER   # fastv/dart prune before this decoder layer
    conv_mode: str = DEFAULT_CONV_MODE
    single_pred_prompt: bool = DEFAULT_SINGLE_PRED_PROMPT
    temperature: float = DEFAULT_TEMPERATURE
    seed: int = DEFAULT_SEED
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    batch_size: int | None = None     # questions per forward; None: by token budget
    token_budget: int | None = None   # prefill tokens per forward; None: from free memory
    share_prefix: bool = True         # a batch's common prompt prefix runs once, not per row
    pack: bool | None = None          # a batch's rows packed into one sequence, not left-padded;
                                      # None: where flash's variable-length kernel runs
    keep_attention: int = DEFAULT_KEEP_ATTENTION
    layers: str = DEFAULT_LAYERS      # --layers as given; resolved by :func:`resolve_layers`
    captures: list[str] = field(default_factory=lambda: [DEFAULT_CAPTURE])
    compile: bool | None = None       # torch.compile the decoder's elementwise work; None: on
                                      # CUDA for packed rows, off for padded ones
    eigensolver: str = DEFAULT_EIGENSOLVER   # who computes the spectra (resolve_eigensolver)
    dtype: str | None = None
    device: str = DEFAULT_DEVICE
    random_init: bool = False
    force: bool = False
    model_id: str | None = None       # sweep.h5's model_id; None: the model path's last part
    features_dir: Path | None = None  # where features.h5 is; None: output_dir (--seeds: its parent)
    extra: dict = field(default_factory=dict)

    @property
    def features_file(self) -> Path:
        return Path(self.features_dir or self.output_dir) / FEATURES_FILE

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}

    def validate(self) -> None:
        """Check every flag that can be checked without the model (UsageError naming it).
        The k <= number-of-patches and layer-index checks need the checkpoint's config:
        :func:`check_model_fit`."""
        if self.scorer not in SCORERS:
            raise UsageError(f"--scorer: unknown scorer {self.scorer!r} "
                             f"(known: {', '.join(SCORERS)})")
        check_method_settings(self)
        get_conv_template(self.conv_mode)
        check_tokens(self.tokens)
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise UsageError(f"--temperature must be 0 (greedy) or positive, not "
                             f"{self.temperature}")
        if self.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be at least 1, not {self.max_new_tokens}")
        if self.token_budget is not None and self.token_budget < 1:
            raise UsageError(f"--token-budget must be at least 1, not {self.token_budget}")
        if self.keep_attention < 0:
            raise UsageError(f"--keep-attention must be 0 or more, not {self.keep_attention}")
        check_captures(self.captures)
        if self.eigensolver not in EIGENSOLVERS:
            raise UsageError(f"--eigensolver: unknown solver {self.eigensolver!r} "
                             f"(known: {', '.join(EIGENSOLVERS)})")
        resolve_layers(self.layers)
        check_prune_layer(self)
        check_common_flags(self)


@dataclass
class KResult:
    k: int
    total: int
    correct: int
    accuracy: float
    img_total: int
    img_accuracy: float


@dataclass
class SweepResult:
    path: Path
    results: list[KResult]
    seconds: float
    prefill_tokens: int
    already_complete: bool
    random_init: bool


def check_tokens(tokens: list[int], num_patches: int | None = None) -> None:
    """The k grid: non-empty, no repeats, every k in 0..num_patches (when given). k = 0, the
    floor without any visual token, comes only from --tokens (the --min grid starts at 1)."""
    if not tokens:
        raise UsageError("--tokens: no token counts to sweep")
    if len(set(tokens)) != len(tokens):
        raise UsageError("--tokens: token counts repeat")
    bad = [k for k in tokens if k < 0 or (num_patches is not None and k > num_patches)]
    if bad:
        limit = num_patches if num_patches is not None else "the number of patches"
        raise UsageError(f"--tokens/--max: k={bad[0]} is outside 0..{limit}, the number of "
                         f"visual tokens of this model")


def check_method_settings(config: SweepConfig) -> None:
    """--important-ratio and --contextual-ratio: a share in [0, 1], given only with the scorer
    that reads it."""
    for flag, value, scorer in (("--important-ratio", config.important_ratio, "vispruner"),
                                ("--contextual-ratio", config.contextual_ratio, "visionzip")):
        if value is None:
            continue
        if config.scorer != scorer:
            raise UsageError(f"{flag} applies to --scorer {scorer} only, not {config.scorer}")
        if not (math.isfinite(value) and 0 <= value <= 1):
            raise UsageError(f"{flag} must be a share between 0 and 1, not {value}")


def selection_plan(config: SweepConfig) -> dict:
    """How the scorer picks each k's visual rows, with every per-k count resolved: recorded in
    sweep.h5 (attribute ``selection``) and, for the per-k methods, in its fingerprint."""
    if config.scorer == "vispruner":
        return {"method": "vispruner", "rows": "kept CLIP rows, projected",
                "important_ratio": config.important_ratio,
                "important": [[k, vispruner_important(k, config.important_ratio)]
                              for k in config.tokens]}
    if config.scorer == "visionzip":
        return {"method": "visionzip",
                "rows": "merged CLIP tokens ([CLS], dominant, contextual), projected: features "
                        "change, not only which rows are kept",
                "contextual_ratio": config.contextual_ratio,
                "dominant_contextual": [[k, *visionzip_split(k, config.contextual_ratio)]
                                        for k in config.tokens]}
    return {"method": config.scorer, "rows": "top k of one ranking (scores/"
                                             f"{config.scorer} of features.h5), projected"}


def check_prune_layer(config: SweepConfig, num_layers: int | None = None) -> None:
    """--prune-layer of an in-LLM scorer: at least 1 (the signal is layer K-1's) and below the
    model's decoder layer count (when known); ignored by the other scorers."""
    if config.scorer not in IN_LLM_SCORERS:
        return
    if config.prune_layer < 1:
        raise UsageError(f"--prune-layer must be at least 1 ({config.scorer} reads layer K-1), "
                         f"not {config.prune_layer}")
    if num_layers is not None and config.prune_layer >= num_layers:
        raise UsageError(f"--prune-layer {config.prune_layer} is outside 1..{num_layers - 1}: "
                         f"{config.scorer} reads layer K-1 and prunes before layer K of this "
                         f"model's {num_layers} decoder layers")


def resolve_eigensolver(name: str, device: torch.device, slots: int,
                        reporter: Reporter | None = None) -> str:
    """The solver a run uses: ``triton`` (vtkit/eigen.py's kernels, on the GPU that holds the
    captures) or ``lapack`` (float64 eigvalsh on CPU threads, overlapped with the GPU).

    ``auto`` takes Triton on a CUDA device, when it is installed, for more captured (tensor,
    layer) slots than the default two. At two, the CPU threads keep up with the GPU and cost it
    nothing, while the kernels take 2.6 s of GPU time per 55 s of sweep; at 32 they are 12x
    faster than the threads (docs/performance.md, "Every layer"; the crossover between 3 and
    31 slots is not measured). Where the kernels cannot run,
    ``triton`` is refused and ``auto`` takes LAPACK, with a warning to ``reporter``."""
    if name == "lapack" or (name == "auto" and (device.type != "cuda" or slots <= 2)):
        return "lapack"
    if not eigen.triton_available(device):
        problem = f"they need a CUDA device and the triton package (this run is on {device})"
    else:
        problem = eigen.kernel_problem(device)
        if problem is None:
            return "triton"
        problem = f"they do not run on {device}: {problem}"
    if name == "triton":
        raise UsageError(f"--eigensolver triton: {problem}; use --eigensolver lapack")
    if reporter is not None:
        reporter.warn(f"--eigensolver auto: no Triton kernels ({problem}); the eigenvalues go to "
                      f"LAPACK on CPU threads, slower with many layers")
    return "lapack"


def check_captures(captures: list[str]) -> list[str]:
    """The --capture names, checked, without repeats and in :data:`CAPTURES` order."""
    if not captures:
        raise UsageError("--capture: no tensor to capture")
    unknown = [c for c in captures if c not in CAPTURES]
    if unknown:
        raise UsageError(f"--capture: unknown tensor {unknown[0]!r} (known: {', '.join(CAPTURES)})")
    return [c for c in CAPTURES if c in captures]


def resolve_layers(text: str, num_layers: int | None = None) -> list[int]:
    """The decoder layers --layers names, ascending, without repeats, each in 0..num_layers-1.

    ``text`` is comma-separated: ``first``, ``last``, ``all``, or layer indices (negative ones
    count from the end), mixed freely. Without ``num_layers`` only the spelling is checked
    (and [] returned). A bad entry or an index outside the model is a UsageError naming --layers.
    """
    entries = [e.strip() for e in str(text).split(",")]
    if not text or not all(entries):
        raise UsageError(f"--layers: expected first, last, all or layer indices separated by "
                         f"commas, got {text!r}")
    indices: set[int] = set()
    for entry in entries:
        if entry in ("first", "last", "all"):
            named = {"first": [0], "last": [-1], "all": range(num_layers or 0)}[entry]
            indices.update(named)
            continue
        try:
            indices.add(int(entry))
        except ValueError:
            raise UsageError(f"--layers: {entry!r} is not first, last, all or a layer "
                             f"index") from None
    if num_layers is None:
        return []
    bad = [i for i in sorted(indices) if not -num_layers <= i < num_layers]
    if bad:
        raise UsageError(f"--layers: layer {bad[0]} is outside this model's {num_layers} decoder "
                         f"layers (0..{num_layers - 1}, or -{num_layers}..-1 from the end)")
    return sorted({i % num_layers for i in indices})


def check_model_fit(config: SweepConfig, model=None) -> None:
    """k <= the model's visual tokens and --layers within its decoder layers, read from the
    checkpoint's configs when no model is loaded yet, so bad flags are refused before any
    model work."""
    if model is not None:
        check_tokens(config.tokens, model.num_patches)
        resolve_layers(config.layers, model.num_layers)
        check_prune_layer(config, model.num_layers)
        return
    from vtkit.model import checkpoint_num_layers, checkpoint_num_patches

    check_tokens(config.tokens, checkpoint_num_patches(config.model_path))
    num_layers = checkpoint_num_layers(config.model_path)
    if num_layers is not None:
        resolve_layers(config.layers, num_layers)
        check_prune_layer(config, num_layers)


@dataclass
class _Run:
    """What one sweep works on, resolved from its config, its questions and the model."""

    config: SweepConfig
    model: object
    items: list[PreparedItem]     # every evaluated question, in question-file order
    problems: dict                # problems.json (or the question file), for scoring
    extract_attrs: dict           # features.h5's attributes; {} without image questions
    inputs: dict                  # what sweep.h5 is made from (its fingerprint's record)
    answer_key: str               # :func:`answer_key_digest` of the selected questions
    final: Path                   # <output_dir>/sweep.h5
    model_name: str               # the checkpoint's name: ``model_id`` in sweep.h5 and answers
    layers: list[int]             # the analysed decoder layers, ascending
    captures: list[str]           # the captured tensors, in CAPTURES order

    @property
    def slots(self) -> list[tuple[str, int]]:
        """Every (capture, layer) whose visual rows the sweep analyses."""
        return [(c, layer) for c in self.captures for layer in self.layers]

    @property
    def image_items(self) -> list[PreparedItem]:
        return [it for it in self.items if it.question.has_image]

    @property
    def text_items(self) -> list[PreparedItem]:
        return [it for it in self.items if not it.question.has_image]


@cache.holds_output_lock
def sweep(config: SweepConfig, reporter: Reporter | None = None, model=None,
          timer: PhaseTimer | NullTimer | None = None) -> SweepResult:
    """Run (or resume, or confirm) the sweep into ``<output_dir>/sweep.h5``.

    Under torchrun every rank sweeps its share of the questions and rank 0 merges. ``timer``
    (a :class:`vtkit.progress.PhaseTimer`) measures the phases for ``vtkit bench``.
    """
    reporter = reporter or Reporter()
    timer = timer or NullTimer()
    started = time.perf_counter()
    config.validate()
    check_model_fit(config, model)
    workers = init_workers(config.device)
    output_dir = Path(config.output_dir)
    selection = select_questions(config.base_dir, config.question_file, config.image_folder,
                                 config.split, config.num_samples)
    model = _ready_model(config, model, workers, reporter)
    _compile(model, config, reporter, timer)
    random_init = bool(model.identity.get("random_init"))
    run = _resolve(config, model, selection)
    store = cache.start_parts(run.final, output_dir / SWEEP_PARTS_DIR, run.inputs, config.force,
                              workers, cache.SWEEP_SCHEMA_VERSION)
    if store is None:
        results = _confirm_complete(run, workers, reporter)
        _report(results, reporter)
        return SweepResult(run.final, results, time.perf_counter() - started, 0, True,
                           random_init)
    if config.force and workers.is_main:
        gone = cache.remove_outputs(output_dir, STALE_AFTER_SWEEP)
        if gone:
            reporter.info(f"--force: removed {len(gone)} answer files, results and figures of "
                          f"the old sweep")
    results, tokens_done = _compute(run, store, workers, reporter, timer)
    _report(results, reporter)
    return SweepResult(run.final, results, time.perf_counter() - started, tokens_done, False,
                       random_init)


def parse_seeds(text: str) -> list[int]:
    """``--seeds 0,1,2``: distinct non-negative seeds, in the order given (UsageError naming
    the flag)."""
    try:
        seeds = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--seeds: expected comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise UsageError(f"--seeds: expected distinct non-negative seeds, got {text!r}")
    return seeds


def seed_configs(config: SweepConfig, seeds: list[int]) -> list[SweepConfig]:
    """One sweep per seed of the random scorer: each into ``<output_dir>/seed{N}/`` with
    ``--seed N``, all reading the one ``<output_dir>/features.h5``. Each is a complete run
    (its own sweep.h5, answers, ranks and results, fingerprinted and resumable)."""
    if config.scorer != "random":
        raise UsageError(f"--seeds: only the random scorer has seeds (--scorer random), not "
                         f"{config.scorer!r}")
    return [replace(config, seed=seed, output_dir=Path(config.output_dir) / cache.seed_dir(seed),
                    features_dir=Path(config.features_dir or config.output_dir))
            for seed in seeds]


def sweep_seeds(config: SweepConfig, seeds: list[int], reporter: Reporter | None = None,
                model=None) -> list[SweepResult]:
    """:func:`sweep` once per seed (:func:`seed_configs`), the model loaded once."""
    configs = seed_configs(config, seeds)
    for seeded in configs:
        seeded.validate()
    check_model_fit(config, model)
    if model is None:
        from vtkit.model import load_model

        model = load_model(config.model_path, config.model_base, random_init=config.random_init,
                           dtype=config.dtype,
                           device=init_workers(config.device).device(config.device))
    return [sweep(seeded, reporter, model=model) for seeded in configs]


def _ready_model(config: SweepConfig, model, workers, reporter: Reporter):
    """The model to sweep with: ``model``, else the checkpoint loaded; its MLP and norms
    compiled with ``--compile`` for padded batches (packed ones compile their own pieces); a
    warning when its weights are random, and a note when its rows cannot be packed."""
    if model is None:
        from vtkit.model import load_model

        model = load_model(config.model_path, config.model_base, random_init=config.random_init,
                           dtype=config.dtype, device=workers.device(config.device))
        check_model_fit(config, model)
    packed = packing_wanted(model, config)
    problem = packing_problem(model) if packed else None
    if problem is not None:
        reporter.warn(f"left-padded batches: this language model cannot run packed ({problem})")
    if config.compile and (problem is not None or not packed):
        model.compile_decoder()
    if model.identity.get("random_init"):
        reporter.warn("RANDOM WEIGHTS (--random-init): answers and ranks are noise; for "
                      "benchmarks only")
    return model


def _compile(model, config: SweepConfig, reporter: Reporter,
             timer: PhaseTimer | NullTimer) -> None:
    """Compile the packed decoder's pieces before the first batch, when the batches will run
    them compiled: a cost of the run (timer phase ``compile``), not of its first batch."""
    started = time.perf_counter()
    with timer.phase("compile"):
        decoder = batch_decoder(model, config)
        if decoder is None or not decoder.compiled:
            return
        decoder.warm_up()
    reporter.info(f"packed decoder layers compiled in {time.perf_counter() - started:.1f} s")


def _resolve(config: SweepConfig, model, selection: Selection) -> _Run:
    """Prepare the questions, check features.h5 against them, record the sweep's inputs."""
    output_dir = Path(config.output_dir)
    items = prepare_items(selection.questions, model.tokenizer, config)
    image_items = [it for it in items if it.question.has_image]
    extract_attrs = (_load_extract_cache(config.features_file, image_items, model)
                     if image_items else {})
    inputs = sweep_inputs(config, model, items, extract_attrs)
    answer_key = answer_key_digest(selection.problems, items)
    model_name = config.model_id or Path(str(config.model_path).rstrip("/")).name
    return _Run(config, model, items, selection.problems, extract_attrs, inputs, answer_key,
                output_dir / SWEEP_FILE, model_name, resolve_layers(config.layers,
                                                                    model.num_layers),
                check_captures(config.captures))


def _load_extract_cache(path: Path, image_items: list[PreparedItem], model) -> dict:
    """features.h5's attributes, once it is checked against the model and the questions; sets
    each image item's ``cache_row``."""
    if not path.exists():
        raise DataError(f"{path} not found: run `vtkit extract` with the same model and "
                        f"questions first")
    from vtkit.model import model_key

    try:
        attrs = cache.read_attrs(path)
    except DataError as error:
        raise DataError(f"{error}; re-run `vtkit extract --force`") from None
    if attrs.get("schema_version") != cache.FEATURES_SCHEMA_VERSION:
        raise CacheMismatchError(f"{path} has schema version {attrs.get('schema_version')}, "
                                 f"this vtkit reads version {cache.FEATURES_SCHEMA_VERSION}: "
                                 f"re-run `vtkit extract --force`")
    if not attrs.get("complete"):
        raise DataError(f"{path} is incomplete: finish `vtkit extract` first")
    inputs = cache.stored_inputs(attrs)
    # The model counts by what decides its outputs, not by how its path is spelled.
    stored_model, current = inputs.get("model", {}), model_key(model.identity)
    changed = [key for key in current if stored_model.get(key) != current[key]]
    if inputs.get("dtype") != str(model.identity.get("dtype")):
        changed.append("dtype")
    if changed:
        raise CacheMismatchError(f"{path} was made from another model (changed: "
                                 f"{', '.join(changed)}); re-run `vtkit extract` for this model "
                                 f"(with --force to replace it)")
    with h5py.File(path, "r") as f:
        cached = [s.decode() for s in f["question_ids"][:]]
    rows = {qid: i for i, qid in enumerate(cached)}
    missing = [it.question.question_id for it in image_items if it.question.question_id not in rows]
    if missing:
        raise CacheMismatchError(f"{path} lacks {len(missing)} selected image questions (e.g. "
                                 f"{', '.join(missing[:5])}); re-run `vtkit extract` with the "
                                 f"same --num-samples/--split/--question-file")
    for it in image_items:
        it.cache_row = rows[it.question.question_id]
    return attrs


def _confirm_complete(run: _Run, workers, reporter: Reporter) -> list[KResult]:
    """A finished sweep.h5 of the same inputs: re-score it when the answer key changed, then
    read its accuracies."""
    final = run.final
    if workers.is_main and cache.read_attrs(final).get("answer_key") != run.answer_key:
        rescore(final, run.problems, run.items, run.answer_key)
        gone = cache.remove_outputs(Path(run.config.output_dir), STALE_AFTER_RESCORE)
        reporter.info(f"{final}: the answer key of the selected questions changed; re-scored "
                      f"the stored answers" + (f" and removed {len(gone)} results and "
                                               f"figures of the old scores (re-run `vtkit "
                                               f"plot`)" if gone else ""))
    else:
        reporter.info(f"{final}: sweep is complete; nothing to do")
    workers.barrier()
    return read_accuracies(final)


def _compute(run: _Run, store: cache.PartStore, workers, reporter: Reporter,
             timer: PhaseTimer | NullTimer) -> tuple[list[KResult], int]:
    """Sweep what the parts lack on every process, merge on rank 0: (results, prefill tokens)."""
    config, model = run.config, run.model
    done = _stored_rows(store, reporter)
    budget = config.token_budget or default_token_budget(model, len(run.slots))
    image_items, text_items = run.image_items, run.text_items
    keep = {it.index for it in image_items[:max(config.keep_attention, 0)]}
    computing = time.perf_counter()
    times = _execute(model, config, store, workers.share(image_items),
                     workers.share(text_items), done, budget, keep, run.captures, run.layers,
                     config.features_file, reporter, timer)
    executed = time.perf_counter()
    ranks = workers.gather(times)
    gathered = time.perf_counter()
    if workers.is_main:
        results = _merge(store, run)
        store.remove()
    workers.barrier()
    compute_seconds = time.perf_counter() - computing
    if not workers.is_main:
        results = read_accuracies(run.final)
    reporter.info(f"swept {len(image_items)} image and {len(text_items)} text questions x "
                  f"{len(config.tokens)} k in {compute_seconds:.1f} s on {workers.world_size} "
                  f"process(es) (model loading excluded)")
    planning = executed - computing - times.warm_up - times.looping - times.tail
    for line in _time_split(times, ranks, planning, gathered - executed,
                            compute_seconds - (gathered - computing)):
        reporter.info(line)
    return results, times.tokens


def _time_split(own: _RankTimes, ranks: list[_RankTimes], planning: float, waiting: float,
                merging: float) -> list[str]:
    """Lines splitting the sweep's time on this rank (``own``) into its batches and the costs
    of the run (``planning`` the batches; ``waiting`` for the other ranks to finish theirs;
    ``merging`` the parts into sweep.h5, the ranks leaving together) and, with several ranks
    (``ranks``, in rank order), what each rank's batches took."""
    fixed = [f"planning {planning:.1f} s", f"kernel warm-up {own.warm_up:.1f} s",
             f"eigenvalue tail {own.tail:.1f} s"]
    if len(ranks) > 1:
        fixed.append(f"waiting for the other ranks {waiting:.1f} s")
    fixed.append(f"merge {merging:.1f} s")
    lines = [f"batches {_share_line(own)}; per run: " + ", ".join(fixed)]
    for rank, times in enumerate(ranks if len(ranks) > 1 else []):
        lines.append(f"rank {rank}: batches {_share_line(times)}, warm-up "
                     f"{times.warm_up:.1f} s, eigenvalue tail {times.tail:.1f} s")
    return lines


def _share_line(times: _RankTimes) -> str:
    rate = times.tokens / times.looping if times.looping > 0 else 0.0
    return (f"{times.looping:.1f} s ({times.batches} batches, {times.tokens:,} tokens, "
            f"{rate:,.0f} tokens/s)")


def _stored_rows(store: cache.PartStore, reporter: Reporter) -> dict[int, set[int]]:
    """The question indices, by k, that finished parts already hold (k = 0: text-only)."""
    done: dict[int, set[int]] = {}
    for part in store.parts():
        with h5py.File(part, "r") as f:
            for q, k in zip(f["question_index"][:], f["k"][:], strict=True):
                done.setdefault(int(k), set()).add(int(q))
    if done:
        reporter.info(f"resuming: {sum(len(v) for v in done.values())} (question, k) results "
                      f"already stored")
    return done


class _PartWriter:
    """Finishes batches on CPU threads: eigenvalues of the Gram matrices, then the part file.

    The GPU goes on with the next batch meanwhile. At most ``2 * workers`` batches, holding at
    most ``max_bytes`` of Gram matrices, wait, so host memory stays bounded however many layers
    are captured (a 7B batch with every layer holds gigabytes). An error in a worker surfaces at
    the next submit or at close. With no workers (CPU runs, where the threads would only
    compete with the model for cores) each batch is finished at once.

    A batch's eigenvalues run on ``solvers``, a second pool of ``workers`` threads, in pieces
    of about equal cost (:func:`_eigen_spans`); the batch's own thread waits for them. One
    batch's matrices then spread over every thread, so the last batch, which nothing follows,
    no longer holds the sweep's end on a single thread while the others idle.
    """

    def __init__(self, workers: int, max_bytes: int = 0) -> None:
        self.pool = ThreadPoolExecutor(max_workers=workers) if workers else None
        self.solvers = (ThreadPoolExecutor(max_workers=workers, thread_name_prefix="eigen")
                        if workers else None)
        self.workers = workers
        self.pending: list[tuple[object, int]] = []
        self.limit = 2 * workers
        self.max_bytes = max_bytes or host_memory_budget()

    def make_room(self, nbytes: int) -> None:
        """Wait for finished batches until one more of ``nbytes`` fits the limits."""
        while self.pending and (len(self.pending) >= self.limit or
                                sum(b for _, b in self.pending) + nbytes > self.max_bytes):
            self.pending.pop(0)[0].result()

    def submit(self, fn, *args, nbytes: int = 0) -> None:
        if self.pool is None:
            fn(*args)
            return
        self.make_room(nbytes)
        self.pending.append((self.pool.submit(fn, *args), nbytes))

    def close(self) -> None:
        if self.pool is None:
            return
        try:
            for future, _ in self.pending:
                future.result()
        finally:
            self.pool.shutdown(wait=True)
            self.solvers.shutdown(wait=True)


def host_memory_budget(share: float = 0.2, cap: int = 32 << 30) -> int:
    """Bytes of host memory the waiting batches' Gram matrices may take: a share of the
    machine's memory, at most ``cap``."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return cap
    return max(1 << 30, min(cap, int(total * share)))


class _PinnedBuffers:
    """Pinned host buffers for the Gram matrices' copies, reused from batch to batch: a buffer
    returns once its batch's eigenvalues are computed (pinning memory is slow, and allocating
    it per batch would stall the GPU stream). At most ``limit`` idle buffers are kept."""

    def __init__(self, limit: int, max_bytes: int | None = None) -> None:
        self.idle: list[torch.Tensor] = []
        self.limit = max(1, limit)
        self.max_bytes = max_bytes if max_bytes is not None else host_memory_budget()
        self.lock = threading.Lock()

    def take(self, numel: int) -> torch.Tensor:
        with self.lock:
            # Positions, not tensors: a list's remove() would compare tensors elementwise.
            fitting = [i for i, b in enumerate(self.idle) if b.numel() >= numel]
            if fitting:
                return self.idle.pop(min(fitting, key=lambda i: self.idle[i].numel()))
        # Rounded up, so that batches of slightly different shapes share buffers.
        return torch.empty(1 << max(numel - 1, 1).bit_length(), dtype=torch.float64,
                           pin_memory=True)

    def give(self, buffer: torch.Tensor) -> None:
        with self.lock:
            self.idle.append(buffer)
            while len(self.idle) > 1 and (len(self.idle) > self.limit or
                                          sum(b.numel() * 8 for b in self.idle) > self.max_bytes):
                self.idle.pop(min(range(len(self.idle)), key=lambda i: self.idle[i].numel()))


@dataclass
class _HostSpectra:
    """One batch's singular values in host memory, by (capture, layer, k), as computed on the
    device (:func:`vtkit.eigen.gram_spectra`): [rows, min(k, d)] float32, descending, for the
    rows sharing a k (``groups``: k -> the rows' positions in the batch). On CUDA ``tensors``
    sit in one pinned buffer whose copy ``ready`` marks as landed, returned to ``pool`` once
    read."""

    tensors: dict
    groups: dict
    ready: object = None
    buffer: torch.Tensor | None = None
    pool: _PinnedBuffers | None = None

    def landed(self) -> dict:
        """The tensors as numpy arrays, once their copy to host memory has landed."""
        if self.ready is not None:
            self.ready.synchronize()
        return {key: t.numpy() for key, t in self.tensors.items()}

    def values(self) -> dict:
        return self.landed()

    def release(self) -> None:
        if self.pool is not None and self.buffer is not None:
            self.pool.give(self.buffer)
            self.buffer = None


@dataclass
class _HostGrams(_HostSpectra):
    """One batch's float64 Gram matrices (min(k, d) square) in host memory instead: their
    singular values are found by LAPACK on the CPU, on the thread that reads them or, given
    ``solvers`` (an executor of ``parts`` threads), in pieces on those threads."""

    solvers: object = None
    parts: int = 1

    def values(self) -> dict:
        grams = self.landed()
        if self.solvers is None:
            return {key: spectra_from_gram(g) for key, g in grams.items()}
        pieces = {key: [self.solvers.submit(spectra_from_gram, grams[key][start:stop])
                        for start, stop in spans]
                  for key, spans in _eigen_spans(grams, self.parts).items()}
        # Every piece ends before the buffer they read can go back to the pool, errors too.
        wait([f for futures in pieces.values() for f in futures])
        return {key: np.concatenate([f.result() for f in futures])
                for key, futures in pieces.items()}


def _eigen_spans(grams: dict, parts: int) -> dict:
    """Row ranges splitting each stack of Gram matrices [B, m, m] into pieces of about equal
    cost, about ``parts`` pieces over all the stacks: an eigendecomposition costs about m^3,
    so a piece holds the rows of a stack that fit a ``parts``-th of the batch's total cost
    (one row at least)."""
    cost = {key: g.shape[-1] ** 3 for key, g in grams.items()}
    share = sum(len(g) * cost[key] for key, g in grams.items()) / max(1, parts)
    spans = {}
    for key, g in grams.items():
        step = max(1, int(share // max(1, cost[key])))
        spans[key] = [(start, min(start + step, len(g))) for start in range(0, len(g), step)]
    return spans


def _finish_image_batch(store, name: str, index: np.ndarray, ks: list[int], answers: list[str],
                        spectra: _HostSpectra, kept: dict) -> None:
    """Write one image batch's part: answers, its spectra (by capture and layer, each
    question's min(k, d) values end to end, in batch order), kept rows."""
    arrays = {"question_index": index, "k": np.asarray(ks, dtype=np.int32), "answers": answers}
    try:
        values: dict = {}
        for (capture, layer, k), group in spectra.values().items():
            rows = values.setdefault((capture, layer),
                                     [np.empty(0, np.float32) for _ in ks])
            for j, spectrum in zip(spectra.groups[k], group, strict=True):
                rows[j] = spectrum
        for slot, rows in values.items():
            arrays[f"spectra/{cache.slot_name(*slot)}"] = np.concatenate(rows)
    finally:
        spectra.release()
    arrays.update(kept)
    store.write(name, arrays)


def _image_part_name(index: np.ndarray, ks: list[int]) -> str:
    """A part named by its (question, k) rows: unique, and stable across resumes."""
    rows = sorted(zip(index.tolist(), ks, strict=True))
    return "i-" + hashlib.sha1(json.dumps(rows).encode()).hexdigest()[:20]


@dataclass
class _BatchRunner:
    """Runs one planned batch through the model and hands its part to the writer."""

    model: object
    config: SweepConfig
    store: cache.PartStore
    writer: _PartWriter
    capture: ActivationCapture
    keep: set[int]                # questions whose raw attention rows are kept
    timer: PhaseTimer | NullTimer
    solver: str = "lapack"        # resolve_eigensolver
    pinned: _PinnedBuffers | None = None
    decoder: PackedDecoder | None = None    # batch_decoder: packed rows, else left-padded

    def text(self, batch: list[tuple[PreparedItem, int]]) -> int:
        """A batch without visual rows (k = 0): text-only questions, or image questions whose
        placeholder is replaced by zero rows (prefix + suffix); returns its prefill tokens.
        Nothing is captured: there are no visual rows."""
        items = [it for it, _ in batch]
        visual = None
        if items[0].question.has_image:
            visual = [torch.zeros((0, self.model.hidden_size), dtype=self.model.dtype,
                                  device=self.model.device)] * len(items)
        answers, _, n = run_batch(self.model, items, visual, self.config, None, [0] * len(items),
                                  self.timer, self.decoder)
        self.writer.submit(self.store.write, f"t-{items[0].index:06d}", {
            "question_index": np.asarray([it.index for it in items], dtype=np.int64),
            "k": np.zeros(len(items), dtype=np.int32), "answers": answers})
        return n

    def image(self, batch: list[tuple[PreparedItem, int]], chunk: _Chunk,
              local: dict[int, int]) -> int:
        """A batch of (image question, k) rows of a loaded chunk (``local``: question index ->
        row of ``chunk``); returns its prefill tokens."""
        items, ks = [it for it, _ in batch], [k for _, k in batch]
        rows = [local[it.index] for it in items]
        queued = {}

        def spectra(captured: dict) -> None:
            # Queued before the decoding: on CUDA their kernels and copies then run on a
            # stream of their own while the decode step leaves the GPU waiting on the host.
            with self.timer.phase("spectra"):
                queued["spectra"], queued["nbytes"] = self._spectra(captured, ks)

        if self.config.scorer in IN_LLM_SCORERS:
            # Every row enters with all its visual rows; the method prunes inside the model.
            answers, captured, n = inllm.run_batch(
                self.model, items, [chunk.projected[r] for r in rows], self.config,
                self.capture, ks, self.config.scorer, self.config.prune_layer, self.timer,
                spectra)
        else:
            with self.timer.phase("select"):
                visual = _select(self.model, self.config, chunk, rows, ks)
            answers, captured, n = run_batch(self.model, items, visual, self.config,
                                             self.capture, ks, self.timer, self.decoder,
                                             spectra)
        with self.timer.phase("spectra"):
            kept = _kept_attention(items, ks, captured, self.keep)
        index = np.asarray([it.index for it in items], dtype=np.int64)
        self.writer.submit(_finish_image_batch, self.store, _image_part_name(index, ks), index,
                           ks, answers, queued["spectra"], kept, nbytes=queued["nbytes"])
        return n

    def _spectra(self, captured: dict, ks: list[int]) -> tuple[object, int]:
        """Queue the spectra of a batch's captured rows: (their pending result, the host
        bytes they hold until the writer is done with them)."""
        if self.solver == "triton":
            return _device_spectra(captured, ks, self.pinned), 0
        # Float64 Gram matrices of every captured slot, held until their eigenvalues.
        nbytes = _gram_bytes(captured, ks, self.capture.widths)
        self.writer.make_room(nbytes)
        grams = _grams_to_host(captured, ks, self.pinned)
        grams.solvers, grams.parts = self.writer.solvers, self.writer.workers
        return grams, nbytes


def _batches(rows: list[tuple[PreparedItem, int]], batch_size: int | None, budget: int,
             max_padding: float = 0.05, full_visual: int = 0,
             packed: bool = False) -> list[list[tuple[PreparedItem, int]]]:
    """Length-sorted batches of (question, k) rows.

    Sorting every (question, k) of a chunk by prompt length, whatever its k, packs rows of
    nearly equal length together: batches fill the token budget with little padding. A batch
    closes when the next row would exceed ``batch_size`` rows, or ``budget`` padded tokens,
    or make padding more than ``max_padding`` of the batch's tokens. With ``full_visual``
    (pruning inside the model: the first layers see every visual token) the budget counts each
    row at its text plus ``full_visual`` tokens, the length those layers run at. ``packed``
    rows (:mod:`vtkit.packed`) have no padding: the budget counts their own tokens, and a batch
    closes only when it is full.
    """
    ordered = sorted(rows, key=lambda r: (r[0].text_length + r[1], r[0].index, r[1]))
    batches, current, useful, widest = [], [], 0, 0
    for item, k in ordered:
        length = item.text_length + k          # the longest so far: lengths ascend
        padded = useful + length if packed else (len(current) + 1) * length
        before_pruning = ((len(current) + 1) * max(widest, item.text_length + full_visual)
                          if full_visual else 0)
        full = (len(current) == batch_size if batch_size
                else max(padded, before_pruning) > budget)
        wasteful = not packed and padded - (useful + length) > max_padding * padded
        if current and (full or wasteful):
            batches.append(current)
            current, useful, widest = [], 0, 0
        current.append((item, k))
        useful += length
        widest = max(widest, item.text_length + full_visual)
    if current:
        batches.append(current)
    return batches


def _plan(chunks: list[list[PreparedItem]], text_items: list[PreparedItem],
          config: SweepConfig, done: dict[int, set[int]], budget: int,
          num_patches: int = 0, packed: bool = False) -> tuple[list, list]:
    """The batches of the (question, k) rows no part holds yet: per chunk of image questions,
    and of the text-only questions. An in-LLM scorer's rows run their first layers with all
    ``num_patches`` visual tokens: the budget counts them at that length. ``packed``: the
    rows run packed (:func:`~vtkit.generate.batch_decoder`), the in-LLM scorers' excepted."""
    text_rows = [(it, 0) for it in text_items if it.index not in done.get(0, set())]
    # Image questions at k = 0 need no features: they run in batches of their own, as text.
    bare_rows = [(it, 0) for chunk in chunks for it in chunk
                 if 0 in config.tokens and it.index not in done.get(0, set())]
    plan = []
    in_llm = config.scorer in IN_LLM_SCORERS      # their rows run left-padded
    for chunk in chunks:
        rows = [(it, k) for it in chunk for k in config.tokens
                if k and it.index not in done.get(k, set())]
        plan.append(_batches(rows, config.batch_size, budget,
                             full_visual=num_patches if in_llm else 0,
                             packed=packed and not in_llm) if rows else [])
    text_batches = (_batches(text_rows, config.batch_size, budget, packed=packed)
                    + _batches(bare_rows, config.batch_size, budget, packed=packed))
    return plan, text_batches


@dataclass
class _RankTimes:
    """Where one process's share of a sweep went (host seconds): the batches themselves, and
    the costs of a run rather than of its questions: loading the batches' kernels before the
    first (``warm_up``), the eigenvalues still computing after the last (``tail``)."""

    batches: int = 0
    tokens: int = 0
    warm_up: float = 0.0
    looping: float = 0.0
    tail: float = 0.0


def _execute(model, config, store, image_items, text_items, done, budget, keep, captures,
             layers, features_path, reporter, timer) -> _RankTimes:
    """Plan the remaining (question, k) work and run it, writing one part per batch.

    Questions go in chunks whose projected features stay on the device for the whole grid, so
    every question's features are read and projected once, not once per k; within a chunk all
    (question, k) rows are batched together by length.
    """
    times = _RankTimes()
    chunk_size = 512 if model.device.type == "cuda" else 1024
    chunks = [image_items[i:i + chunk_size] for i in range(0, len(image_items), chunk_size)]
    decoder = batch_decoder(model, config)
    plan, text_batches = _plan(chunks, text_items, config, done, budget, model.num_patches,
                               decoder is not None)
    total = len(text_batches) + sum(len(b) for b in plan)
    if total == 0:
        return times
    solver = resolve_eigensolver(config.eigensolver, model.device, len(captures) * len(layers),
                                 reporter)
    # On GPU runs CPU threads write the parts and, with LAPACK, compute the eigenvalues (one
    # BLAS thread each); the Triton kernels leave them only the writing. Eight solver threads
    # keep up with an H200 (docs/performance.md, run J8).
    workers = 0
    if model.device.type == "cuda":
        cores = (os.cpu_count() or 2) - 2
        workers = max(1, min(SOLVER_THREADS, cores)) if solver == "lapack" else 2
    writer = _PartWriter(workers)
    runner = _BatchRunner(model, config, store, writer, ActivationCapture(model, captures, layers),
                          keep, timer, solver, _PinnedBuffers(writer.limit + 1, writer.max_bytes),
                          decoder)
    started = time.perf_counter()
    with timer.phase("warm_up"):
        rows, groups = _kernel_sizes(text_batches + [b for batches in plan for b in batches])
        _load_kernels(model, rows, groups if solver == "lapack" else set(),
                      set(runner.capture.widths.values()))
    times.warm_up = time.perf_counter() - started
    limits = threadpool_limits(limits=1, user_api="blas") if workers else nullcontext()
    attention = sweep_attention_backends(model.device)
    tokens_done = 0
    started = time.perf_counter()
    try:
        with limits, attention, \
                reporter.task("sweep", total=total, unit="batches", work_unit="tokens") as task, \
                (h5py.File(features_path, "r") if image_items else nullcontext()) as features:
            for batch in text_batches:
                n = runner.text(batch)
                tokens_done += n
                task.advance(1, work=n)
            for chunk, batches in zip(chunks, plan, strict=True):
                if not batches:
                    continue
                with timer.phase("load"):
                    signals = _load_chunk(model, features, chunk, config)
                local = {it.index: j for j, it in enumerate(chunk)}
                for batch in batches:
                    ks = [k for _, k in batch]
                    task.describe(f"sweep k={min(ks)}..{max(ks)}")
                    n = runner.image(batch, signals, local)
                    tokens_done += n
                    task.advance(1, work=n)
            task.describe(f"sweep ({len(config.tokens)} k values)")
            ended = time.perf_counter()
            with timer.phase("drain"):
                runner.writer.close()
    finally:
        runner.capture.close()
        runner.writer.close()
    times.batches, times.tokens = total, tokens_done
    times.looping, times.tail = ended - started, time.perf_counter() - ended
    return times


def _kernel_sizes(batches: list[list[tuple[PreparedItem, int]]]) -> tuple[set, set]:
    """The sizes of the products that follow a batch's rows, over the planned ``batches``:
    (their row counts, their (rows, k) groups)."""
    rows = {len(batch) for batch in batches}
    groups = {(len(members), k) for batch in batches
              for k, members in _k_groups([k for _, k in batch]).items() if k}
    return rows, groups


@torch.inference_mode()
def _load_kernels(model, rows: set[int], groups: set[tuple[int, int]],
                  widths: set[int]) -> None:
    """Run once, before the first batch, the matrix products whose sizes follow a batch's
    rows, at every size the planned batches give them (:func:`_kernel_sizes`): on CUDA a
    kernel is loaded on its first launch, and loading waits until the GPU has run everything
    queued before it.

    cuBLAS picks its kernel by the sizes of the product, and the products over one position
    per row (the LM head on each row's last position, every linear layer of a decode step)
    have as many rows as the batch. Met for the first time inside a batch, a new size's kernel
    made the host wait for that batch's whole prefill, and the GPU then waited for the host
    (profiled: the LM head's product held the host 236-681 ms a batch, docs/performance.md).
    The float64 Gram matrices of each k group (``groups``, when LAPACK finds their
    eigenvalues; rows ``widths`` wide) run likewise. Elsewhere than on CUDA nothing is loaded
    lazily, and nothing runs.
    """
    if model.device.type != "cuda":
        return
    weights = {tuple(m.weight.shape): m.weight for m in model.decoder_layers[0].modules()
               if isinstance(m, torch.nn.Linear)}
    weights[tuple(model.lm_head.weight.shape)] = model.lm_head.weight
    for count in sorted(rows):
        for shape, weight in sorted(weights.items()):
            torch.nn.functional.linear(weight.new_zeros(count, shape[1]), weight)
    for width in sorted(widths if groups else ()):
        for count, k in sorted(groups):
            gram_matrices(torch.zeros(count, k, width, dtype=model.dtype, device=model.device))
    torch.cuda.synchronize(model.device)


def _k_groups(ks: list[int]) -> dict[int, list[int]]:
    """The positions of a batch's rows, grouped by their k."""
    groups: dict[int, list[int]] = {}
    for j, k in enumerate(ks):
        groups.setdefault(k, []).append(j)
    return groups


def _gram_bytes(captured: dict, ks: list[int], widths: dict) -> int:
    """Bytes of the float64 Gram matrices of a batch: min(k, d)^2 per row and slot."""
    return sum(8 * min(k, widths[slot]) ** 2 for slot in captured for k in ks)


def sweep_attention_backends(device: torch.device):
    """The SDPA kernels the sweep's forwards may use: on CUDA flash, memory-efficient and math,
    not cuDNN's. cuDNN's attention builds an execution plan on the CPU for every new shape
    (about 30 ms per call on an H200 host, profiled) and nearly every sweep batch has a new
    length, so the GPU waited for it in every layer; without it a 7B sweep ran 15% faster
    (docs/performance.md). Elsewhere (extract, the cost table, batch-1 timings) shapes repeat
    and torch's default choice stays."""
    if device.type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH])


def _grams_to_host(captured: dict, ks: list[int], pinned: _PinnedBuffers | None) -> _HostGrams:
    """Float64 Gram matrices of each slot's captured rows, copied to host memory without
    stalling the GPU.

    Rows are grouped by k, so a row's matrix is min(k, d) square rather than padded to the
    batch's largest k: the eigenvalues, the costly part on the CPU, grow as the cube of that
    size. On CUDA they are computed on a stream of their own (:func:`_beside`), beside the
    batch's decode step and the next batch's prefill, and go, asynchronously, into one pinned
    buffer of ``pinned`` (each in a slice of it); the recorded event tells the CPU worker when
    the copy has landed. On the CPU the tensors are simply returned.
    """
    return _beside(captured, _grams_here, captured, ks, pinned)


def _grams_here(captured: dict, ks: list[int], pinned: _PinnedBuffers | None) -> _HostGrams:
    """:func:`_grams_to_host` on the current stream."""
    groups, index = _group_index(captured, ks)
    grams = {}
    for (capture, layer), rows in captured.items():
        for k in index:
            grams[capture, layer, k] = gram_matrices(rows[index[k], :k])
    if not grams or next(iter(grams.values())).device.type != "cuda" or pinned is None:
        return _HostGrams(grams, groups)
    host, ready, buffer = _copy_to_pinned(grams, pinned)
    return _HostGrams(host, groups, ready, buffer, pinned)


def _device_spectra(captured: dict, ks: list[int], pinned: _PinnedBuffers | None) -> _HostSpectra:
    """Singular values of each slot's captured rows, computed where the rows are (the Triton
    kernels of :mod:`vtkit.eigen`, all the batch's slots and k groups in one launch of each
    kernel per chunk and panel), then copied to host memory without stalling the GPU.

    On CUDA they run on a stream of their own (:func:`_beside`), beside the batch's decode
    step and the next batch's prefill: the eigenvalue kernels are bound by their loads'
    latency and leave most of the GPU idle at the end of each launch, which the prefill's
    kernels then fill."""
    return _beside(captured, _spectra_here, captured, ks, pinned)


def _beside(captured: dict, work, *args):
    """``work(*args)`` on CUDA on a stream of its own (:data:`SPECTRA_STREAM`), after the work
    queued so far on the sweep's stream (the prefill that captured ``captured``), and beside
    what the sweep queues next: the captured rows are marked as used by that stream, so that
    their memory is not handed to the next batch before it is done with them."""
    device = next(iter(captured.values())).device if captured else None
    if device is None or device.type != "cuda" or not SPECTRA_STREAM:
        return work(*args)
    stream = _spectra_stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    for rows in captured.values():
        rows.record_stream(stream)     # their memory waits for the stream's work, not ours
    with torch.cuda.stream(stream):
        return work(*args)


# Whether the spectra's GPU work runs on a CUDA stream beside the sweep's forwards.
SPECTRA_STREAM = True

#: Most CPU threads computing LAPACK eigenvalues on a GPU run (fewer where the host has fewer
#: cores).
SOLVER_THREADS = 8


@functools.cache
def _spectra_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def _spectra_here(captured: dict, ks: list[int], pinned: _PinnedBuffers | None) -> _HostSpectra:
    """:func:`_device_spectra` on the current stream."""
    groups, index = _group_index(captured, ks)
    # One block per k of every slot of one row width and dtype, stacked: a batch's Gram
    # matrices then take a few large matrix products rather than one small one per slot.
    alike: dict[tuple, list] = {}
    for slot, rows in captured.items():
        alike.setdefault((rows.shape[2], rows.dtype), []).append(slot)
    stacks = [(slots, k) for slots in alike.values() for k in index]
    values = eigen.gram_spectra([torch.stack([captured[slot][index[k], :k] for slot in slots])
                                 .flatten(0, 1) for slots, k in stacks])
    spectra = {(*slot, k): part for (slots, k), v in zip(stacks, values, strict=True)
               for slot, part in zip(slots, v.unflatten(0, (len(slots), -1)), strict=True)}
    if not spectra or values[0].device.type != "cuda" or pinned is None:
        return _HostSpectra({key: v.cpu() for key, v in spectra.items()}, groups)
    host, ready, buffer = _copy_to_pinned(spectra, pinned)
    return _HostSpectra(host, groups, ready, buffer, pinned)


def _group_index(captured: dict, ks: list[int]) -> tuple[dict, dict]:
    """A batch's k groups (k -> the rows' positions) and, for each non-zero k, those positions
    as one index tensor on the captures' device: one per k, not per (slot, k)."""
    groups = _k_groups(ks)
    device = next(iter(captured.values())).device
    return groups, {k: to_device(torch.tensor(members), device)
                    for k, members in groups.items() if k}


def _copy_to_pinned(tensors: dict, pinned: _PinnedBuffers) -> tuple:
    """(host copies by key, the event that marks them landed, their buffer): the tensors copied
    into slices of one buffer of ``pinned`` (float64, viewed as their dtype), launched without
    waiting for the GPU."""
    dtype = next(iter(tensors.values())).dtype
    per = 8 // dtype.itemsize
    buffer = pinned.take(-(-sum(t.numel() for t in tensors.values()) // per))
    flat, host, offset = buffer.view(dtype), {}, 0
    for key, t in tensors.items():
        host[key] = flat[offset:offset + t.numel()].view(t.shape)
        host[key].copy_(t, non_blocking=True)
        offset += t.numel()
    ready = torch.cuda.Event()
    ready.record()
    return host, ready, buffer


def _select(model, config: SweepConfig, chunk: _Chunk, rows: list[int],
            ks: list[int]) -> list[torch.Tensor]:
    """Each row's visual rows [k, D] for the language model, by the scorer's rule (rows sharing
    a k go together)."""
    visual: list[torch.Tensor | None] = [None] * len(rows)
    for k in sorted(set(ks)):
        members = [j for j, kk in enumerate(ks) if kk == k]
        index = to_device(torch.tensor([rows[j] for j in members]), model.device)
        for j, block in zip(members, _visual_rows(model, config, chunk, index, k), strict=True):
            visual[j] = block
    return visual


def _visual_rows(model, config: SweepConfig, chunk: _Chunk, index: torch.Tensor,
                 k: int) -> torch.Tensor:
    """The k visual rows [B, k, D] of the chunk's questions ``index`` under the scorer.

    Ranking scorers keep the top k of their scores and VisPruner its kept tokens, as projected
    rows in raster order; VisionZip's tokens are merged in CLIP space, then projected."""
    if config.scorer == "vispruner":
        keep = vispruner_keep(chunk.attention[index], chunk.features[index], k,
                              vispruner_important(k, config.important_ratio))
        return gather_rows(chunk.projected[index], keep)
    if config.scorer == "visionzip":
        dominant, contextual = visionzip_split(k, config.contextual_ratio)
        tokens = visionzip_tokens(chunk.features[index], chunk.cls_feature[index],
                                  chunk.attention[index], chunk.keys[index], dominant, contextual)
        return model.project(tokens)
    return gather_rows(chunk.projected[index], top_k_raster(chunk.scores[index], k))


def _kept_attention(items, ks, captured: dict, keep: set[int]) -> dict:
    """Raw captured rows (float16) of the questions whose matrices are kept, by slot."""
    rows = [j for j, it in enumerate(items) if it.index in keep]
    if not rows:
        return {}
    kept = {"attention/index": np.asarray([items[j].index for j in rows], dtype=np.int64),
            "attention/k": np.asarray([ks[j] for j in rows], dtype=np.int32)}
    blocks = {slot: torch.cat([block[j, :ks[j]] for j in rows]).to(torch.float16)
              for slot, block in captured.items()}
    # One copy to the host for every slot: each copy waits for the GPU.
    flat = torch.cat([b.reshape(-1) for b in blocks.values()]).cpu().numpy()
    start = 0
    for slot, block in blocks.items():
        kept[f"attention/{cache.slot_name(*slot)}"] = \
            flat[start:start + block.numel()].reshape(block.shape)
        start += block.numel()
    return kept


@dataclass
class _Chunk:
    """One chunk's cached signals on the device, in the chunk's order; each scorer loads what
    its rule reads (None otherwise)."""

    projected: torch.Tensor | None = None    # [n, N, D] projected features
    scores: torch.Tensor | None = None       # [n, N] the ranking scorer's scores
    features: torch.Tensor | None = None     # [n, N, Dv] CLIP features
    attention: torch.Tensor | None = None    # [n, N] [CLS] attention (scores/cls)
    cls_feature: torch.Tensor | None = None  # [n, Dv] [CLS] hidden state
    keys: torch.Tensor | None = None         # [n, N, Dh] keys averaged over heads


def _load_chunk(model, features_file, chunk: list[PreparedItem], config: SweepConfig) -> _Chunk:
    """Read one chunk's cached signals once (projecting the features where the scorer keeps
    projected rows); every k of the grid reuses them."""
    order = np.argsort([it.cache_row for it in chunk], kind="stable")
    rows = [chunk[j].cache_row for j in order]
    back = np.empty_like(order)
    back[order] = np.arange(len(order))
    ascending = bool((order == np.arange(len(order))).all())

    def read(name: str, dtype: torch.dtype) -> torch.Tensor:
        # Read in ascending rows (cache.read_rows); ``back`` puts them in the chunk's order.
        block = cache.read_rows(features_file[name], rows)
        return torch.from_numpy(block if ascending else block[back]).to(model.device, dtype)

    signals = _Chunk()
    feats = read("features", model.dtype)
    with torch.inference_mode():
        if config.scorer != "visionzip":
            signals.projected = model.project(feats)
        if config.scorer in IN_LLM_SCORERS:
            return signals      # the method scores inside the language model
        if config.scorer == "random":   # from --seed, so one features.h5 serves every seed
            signals.scores = torch.from_numpy(np.stack([
                random_scores(it.question.question_id, model.num_patches, config.seed)
                for it in chunk])).to(model.device)
            return signals
        if config.scorer in RANKING_SCORERS:
            signals.scores = read(f"scores/{config.scorer}", torch.float32)
            return signals
        signals.features = feats
        signals.attention = read("scores/cls", torch.float32)
        if config.scorer == "visionzip":
            signals.cls_feature = read("cls_features", model.dtype)
            signals.keys = read("keys", torch.float32)
    return signals


def _merge(store: cache.PartStore, run: _Run) -> list[KResult]:
    """Gather the parts into sweep.h5 and the answer files, score every k."""
    answers, spectra, attention = _gather(store, run)
    cache.check_free_space(run.final.parent, store.size(), run.final, cache.PARTS_KEPT)
    correct, results = score_answers(run.problems, run.items, run.config.tokens, answers)
    _write_answer_files(run, answers)
    _write_sweep_file(run, answers, correct, spectra, attention)
    return results


def _gather(store: cache.PartStore, run: _Run) -> tuple[np.ndarray, dict, dict]:
    """Every part's rows in their places: answers [n_k, n_q], and by (capture, layer) and k the
    spectra [n_img, min(k, d)] and kept rows [n_keep, k, d]. A missing (question, k) is an
    error."""
    config, image_items = run.config, run.image_items
    k_row = {k: i for i, k in enumerate(config.tokens)}
    img_row = {it.index: j for j, it in enumerate(image_items)}
    keep_row = {it.index: j for j, it in enumerate(image_items[:max(config.keep_attention, 0)])}
    answers = np.full((len(config.tokens), len(run.items)), None, dtype=object)
    widths = slot_widths(run.model, run.slots)
    spectra: dict[tuple, dict] = {slot: {} for slot in run.slots}
    attention: dict[tuple, dict] = {slot: {} for slot in run.slots}
    for part in store.parts():
        with h5py.File(part, "r") as f:
            index, ks = f["question_index"][:], f["k"][:]
            text = [t.decode() for t in f["answers"][:]]
            if not ks.any():    # text-only rows (one answer for every k), image rows at k = 0
                for q, t in zip(index, text, strict=True):
                    answers[k_row[0] if q in img_row else slice(None), q] = t
                continue
            _gather_spectra(f, index, ks, widths, img_row, spectra)
            for r, (q, k) in enumerate(zip(index, ks, strict=True)):
                answers[k_row[int(k)], q] = text[r]
            if "attention/index" in f:
                _gather_attention(f, keep_row, attention)
    missing = int(sum(a is None for a in answers.ravel()))
    if missing:
        raise DataError(f"{store.directory}: {missing} (question, k) results are missing; "
                        f"re-run vtkit sweep")
    return answers, spectra, attention


def _gather_spectra(part: h5py.File, index: np.ndarray, ks: np.ndarray, widths: dict,
                    img_row: dict[int, int], spectra: dict[tuple, dict]) -> None:
    """Add one part's spectra (stored end to end) to ``spectra[(capture, layer)][k]``."""
    for slot, by_k in spectra.items():
        spectrum_lengths = np.minimum(ks, widths[slot])
        starts = np.concatenate([[0], np.cumsum(spectrum_lengths)])
        flat = part[f"spectra/{cache.slot_name(*slot)}"][:]
        for r, (q, k) in enumerate(zip(index, ks, strict=True)):
            block = by_k.get(int(k))
            if block is None:       # allocated once per k, not once per row
                block = by_k[int(k)] = np.zeros((len(img_row), spectrum_lengths[r]), np.float32)
            block[img_row[q]] = flat[starts[r]:starts[r + 1]]


def _gather_attention(part: h5py.File, keep_row: dict[int, int],
                      attention: dict[tuple, dict]) -> None:
    """Add one part's kept rows (stored end to end) to ``attention[(capture, layer)][k]``."""
    kept_index, kept_k = part["attention/index"][:], part["attention/k"][:]
    offsets = np.concatenate([[0], np.cumsum(kept_k)])
    for slot, by_k in attention.items():
        flat = part[f"attention/{cache.slot_name(*slot)}"][:]
        for r, (q, k) in enumerate(zip(kept_index, kept_k, strict=True)):
            block = by_k.get(int(k))
            if block is None:
                block = by_k[int(k)] = np.zeros((len(keep_row), k, flat.shape[1]), np.float16)
            block[keep_row[q]] = flat[offsets[r]:offsets[r + 1]]


def _write_answer_files(run: _Run, answers: np.ndarray) -> None:
    """``answers/k{K}.jsonl`` of every k, in LLaVA's answer-file format."""
    output_dir = run.final.parent
    (output_dir / ANSWERS_DIR).mkdir(exist_ok=True)
    fingerprint = cache.fingerprint(run.inputs)
    for r, k in enumerate(run.config.tokens):
        lines = [json.dumps({
            "question_id": it.question.question_id, "prompt": it.prompt,
            "text": answers[r, it.index],
            "answer_id": _answer_id(fingerprint, it.question.question_id, k),
            "model_id": run.model_name, "metadata": {"k": k, "scorer": run.config.scorer},
        }) for it in run.items]
        cache.write_text_atomic(output_dir / cache.answers_file(k), "\n".join(lines) + "\n",
                                cache.PARTS_KEPT)


def _answer_id(fingerprint: str, question_id: str, k: int) -> str:
    return hashlib.sha256(f"{fingerprint}:{question_id}:{k}".encode()).hexdigest()[:22]


def _write_sweep_file(run: _Run, answers: np.ndarray, correct: np.ndarray, spectra: dict,
                      attention: dict) -> None:
    """sweep.h5: answers and their scores, spectra and kept attention, and the attributes
    (layout in docs/cache.md)."""
    config, model = run.config, run.model
    arrays: dict = {
        "token_counts": np.asarray(config.tokens, dtype=np.int32),
        "question_ids": [it.question.question_id for it in run.items],
        "has_image": np.asarray([it.question.has_image for it in run.items], dtype=bool),
        # Prompt tokens without the visual rows, for the FLOPs per question of `vtkit compare`.
        "text_tokens": np.asarray([it.text_length for it in run.items], dtype=np.int32),
        "correct": correct,
        "answers": answers,
    }
    for capture, layer in run.slots:
        for k, block in spectra[(capture, layer)].items():
            arrays[cache.spectra_dataset(capture, layer, k)] = block
        for k, block in attention[(capture, layer)].items():
            arrays[cache.attention_dataset(capture, layer, k)] = block
    attrs = cache.base_attrs({**config.to_dict(), "decode": decode_settings(config, model)},
                             run.inputs, cache.SWEEP_SCHEMA_VERSION)
    attrs.update({
        "answer_key": run.answer_key,
        "checkpoint_dir": str(model.identity.get("checkpoint_dir")),
        "extract_fingerprint": str(run.extract_attrs.get("fingerprint", "")),
        "model_id": run.model_name,
        "scorer": config.scorer,
        "selection": json.dumps(selection_plan(config)),
        "random_init": bool(model.identity.get("random_init")),
        "layers": np.asarray(run.layers, dtype=np.int64),
        "num_layers": int(model.num_layers),
        "captures": json.dumps(run.captures),
        # Who computed the spectra of the batches of this call (a resumed run's earlier parts
        # may differ; the solvers agree to 1e-8 of the largest singular value).
        "eigensolver": resolve_eigensolver(config.eigensolver, model.device, len(run.slots)),
        "hidden_size": int(model.hidden_size),
        "num_patches": int(model.num_patches),
        "lm_shape": json.dumps(asdict(LMShape.from_config(model.language_model.config))),
        "complete": True,
    })
    if config.scorer in IN_LLM_SCORERS:
        attrs["pruning"] = json.dumps(in_llm_pruning(config, model))
    cache.write_h5_atomic(run.final, arrays, attrs, kept=cache.PARTS_KEPT)


def sweep_inputs(config: SweepConfig, model, items: list[PreparedItem],
                 extract_attrs: dict) -> dict:
    """The record of what sweep.h5 is made from; its hash is the file's fingerprint.

    The answers depend on the prompts (their text and token ids), the tokenizer, the model
    (by :func:`vtkit.model.model_key`), the features and the decoding; the answer key does not,
    so it stays out (``answer_key`` beside it: a changed key re-scores the stored answers)."""
    from vtkit.model import model_key

    decode = decode_settings(config, model)
    prompts = [[it.question.question_id, it.prompt, it.prefix, it.suffix] for it in items]
    inputs = {
        "schema_version": cache.SWEEP_SCHEMA_VERSION,
        "extract_fingerprint": extract_attrs.get("fingerprint"),
        "model": model_key(model.identity),
        "tokenizer": model.identity.get("tokenizer_sha256"),
        "dtype": str(model.identity.get("dtype")),
        "questions": cache.digest([it.question.question_id for it in items]),
        "prompts": cache.digest(prompts),
        "tokens": list(config.tokens),
        "scorer": config.scorer,
        "conv_mode": config.conv_mode,
        "single_pred_prompt": config.single_pred_prompt,
        "temperature": decode["temperature"],
        "top_k": decode["top_k"],
        "top_p": decode["top_p"],
        "seed": config.seed,
        "max_new_tokens": decode["max_new_tokens"],
        "keep_attention": config.keep_attention,
        "layers": resolve_layers(config.layers, model.num_layers),
        "captures": check_captures(config.captures),
        **({"prune_layer": config.prune_layer} if config.scorer in IN_LLM_SCORERS else {}),
    }
    if config.scorer in PER_K_SCORERS:
        # The ranking scorers' rule is the scorer's name; these depend on their settings too.
        inputs["selection"] = selection_plan(config)
    return inputs


def in_llm_pruning(config: SweepConfig, model) -> dict:
    """What k means for an in-LLM scorer, recorded in sweep.h5 (attribute ``pruning``) and
    raw_results.json: the image tokens kept from decoder layer ``prune_layer`` on (the layers
    before it see all of them), and the layer-averaged count papers print."""
    from vtkit.flops import equivalent_tokens

    return {
        "stage": "inside the language model",
        "prune_layer": config.prune_layer,
        "token_counts": f"image tokens kept from decoder layer {config.prune_layer} on; layers "
                        f"0..{config.prune_layer - 1} see all {model.num_patches}",
        "visual_tokens_before": int(model.num_patches),
        # k = 0 prompts without the image at all (the floor), in every layer.
        "equivalent_tokens": [equivalent_tokens(k, model.num_layers, config.prune_layer,
                                                model.num_patches) if k else 0.0
                              for k in config.tokens],
    }


def answer_key_digest(problems: dict, items: list[PreparedItem]) -> str:
    """Hash of what scoring reads of the selected questions: each one's answer and choices."""
    return cache.digest([[it.question.question_id, problems.get(it.question.question_id, {})
                     .get("answer"), problems.get(it.question.question_id, {}).get("choices")]
                    for it in items])


def score_answers(problems: dict, items: list[PreparedItem], tokens: list[int],
                  answers: np.ndarray) -> tuple[np.ndarray, list[KResult]]:
    """``correct`` [n_k, n_q] and per-k accuracy of answers [n_k, n_q], as eval_science_qa.py."""
    pids = [it.question.question_id for it in items]
    correct = np.zeros((len(tokens), len(items)), dtype=bool)
    results = []
    for r, k in enumerate(tokens):
        predictions = {it.question.question_id: {"text": answers[r, it.index],
                                                 "prompt": it.prompt} for it in items}
        report = score_predictions(problems, pids, predictions)
        correct_ids = set(report.correct_ids)
        correct[r] = [pid in correct_ids for pid in pids]
        results.append(KResult(k, report.total, report.correct, report.accuracy,
                               report.img_total, report.img_accuracy))
    return correct, results


def rescore(path: Path, problems: dict, items: list[PreparedItem],
            answer_key: str) -> list[KResult]:
    """Score the answers stored in a finished sweep.h5 against the current answer key and
    replace its ``correct`` and ``answer_key`` (on a copy, renamed over the file)."""
    with h5py.File(path, "r") as f:
        tokens = f["token_counts"][:].tolist()
        stored_ids = f["question_ids"].asstr()[:].tolist()
        answers = f["answers"].asstr()[:].astype(object)
    if stored_ids != [it.question.question_id for it in items]:
        raise CacheMismatchError(f"{path} holds other questions; pass --force to recompute it")
    correct, results = score_answers(problems, items, tokens, answers)
    with cache.atomic_path(path) as tmp:
        shutil.copyfile(path, tmp)
        with h5py.File(tmp, "r+") as f:
            f["correct"][...] = correct
            f.attrs["answer_key"] = answer_key
    return results


def read_accuracies(path: Path) -> list[KResult]:
    """Per-k accuracy from a finished sweep.h5."""
    with h5py.File(path, "r") as f:
        tokens = f["token_counts"][:].tolist()
        correct = f["correct"][:]
        has_image = f["has_image"][:]
    results = []
    for r, k in enumerate(tokens):
        n, c = correct.shape[1], int(correct[r].sum())
        n_img, c_img = int(has_image.sum()), int(correct[r][has_image].sum())
        results.append(KResult(k, n, c, 100.0 * c / n if n else 0.0, n_img,
                               100.0 * c_img / n_img if n_img else 0.0))
    return results


def _report(results: list[KResult], reporter: Reporter) -> None:
    reporter.table("Accuracy by number of kept visual tokens",
                   ["k", "questions", "correct", "accuracy %", "IMG accuracy %"],
                   [[r.k, r.total, r.correct, r.accuracy, r.img_accuracy] for r in results])
