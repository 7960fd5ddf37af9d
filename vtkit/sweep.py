"""Stage 2, ``vtkit sweep``: the pruned LLaVA passes.

For every k of the grid and every image question: project the cached CLIP features, keep the
top-k by the chosen scorer in raster order, splice them into the embedded prompt in place of the
image placeholder, run the language model (batched, left-padded), capture the self-attention
output of the first and last decoder layers in the same prefill, keep the spectra of their k
visual rows, and decode the answer. Text-only questions do not depend on k: they run once and
count in every k. Results go to ``sweep.h5`` (layout in ``docs/cache.md``) and to LLaVA-format
answer files ``answers/k{K}.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from threadpoolctl import threadpool_limits

from vtkit import cache
from vtkit.data import Question, select_questions
from vtkit.defaults import (
    DEFAULT_CONV_MODE,
    DEFAULT_DEVICE,
    DEFAULT_KEEP_ATTENTION,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_NUM_SAMPLES,
    DEFAULT_OUTPUT_DIR,
    DEFAULT_SCORER,
    DEFAULT_SEED,
    DEFAULT_SINGLE_PRED_PROMPT,
    DEFAULT_SPLIT,
    DEFAULT_TEMPERATURE,
)
from vtkit.errors import CacheMismatchError, DataError, UsageError
from vtkit.extract import FEATURES_FILE, check_common_flags, remove_outputs
from vtkit.parallel import init_ranks
from vtkit.progress import NullTimer, PhaseTimer, Reporter
from vtkit.prompts import (
    IMAGE_TOKEN_INDEX,
    build_prompt,
    get_conv_template,
    question_text,
    tokenize_prompt,
)
from vtkit.pruning import (
    SCORERS,
    gather_rows,
    gram_matrices,
    left_pad,
    spectra_from_gram,
    splice_sequence,
    top_k_raster,
)
from vtkit.scoring import score_predictions

SWEEP_FILE = "sweep.h5"
PARTS_DIR = "sweep.parts"
ANSWERS_DIR = "answers"
#: What rank and plot make from sweep.h5: stale once the sweep is recomputed (the answer files
#: of the new grid are rewritten; those of an old grid would stay behind).
RESULT_FILES = ("ranks.json", "raw_results.json", "normalized_results.json")
RESULT_PATTERNS = ("answers/k*.jsonl", "pruning_experiment_*.png", "pruning_experiment_*.pdf")
#: Plot's outputs alone: they hold accuracies, so a re-scored sweep makes them stale.
ACCURACY_FILES = ("raw_results.json", "normalized_results.json")
ACCURACY_PATTERNS = ("pruning_experiment_*.png", "pruning_experiment_*.pdf")


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
    conv_mode: str = DEFAULT_CONV_MODE
    single_pred_prompt: bool = DEFAULT_SINGLE_PRED_PROMPT
    temperature: float = DEFAULT_TEMPERATURE
    seed: int = DEFAULT_SEED
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    batch_size: int | None = None     # questions per forward; None: by token budget
    token_budget: int | None = None   # prefill tokens per forward; None: from free memory
    keep_attention: int = DEFAULT_KEEP_ATTENTION
    compile: bool = False             # torch.compile the decoder's MLP and norms
    dtype: str | None = None
    device: str = DEFAULT_DEVICE
    random_init: bool = False
    force: bool = False
    model_id: str | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}

    def validate(self) -> None:
        """Check every flag that can be checked without the model (UsageError naming it).
        The k <= number-of-patches check needs the checkpoint's config: :func:`check_tokens`."""
        if self.scorer not in SCORERS:
            raise UsageError(f"--scorer: unknown scorer {self.scorer!r} "
                             f"(known: {', '.join(SCORERS)})")
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


@dataclass
class _Item:
    """One question ready for the language model."""

    index: int               # position in the evaluated question list
    question: Question
    prompt: str              # LLaVA's cur_prompt, written to the answer files
    prefix: list[int]        # token ids before the image placeholder (all ids if text-only)
    suffix: list[int]        # token ids after it
    cache_row: int = -1      # row in features.h5 (image questions)

    @property
    def text_length(self) -> int:
        return len(self.prefix) + len(self.suffix)


def check_tokens(tokens: list[int], num_patches: int | None = None) -> None:
    """The k grid: non-empty, no repeats, every k in 1..num_patches (when given)."""
    if not tokens:
        raise UsageError("--tokens: no token counts to sweep")
    if len(set(tokens)) != len(tokens):
        raise UsageError("--tokens: token counts repeat")
    bad = [k for k in tokens if k < 1 or (num_patches is not None and k > num_patches)]
    if bad:
        limit = num_patches if num_patches is not None else "the number of patches"
        raise UsageError(f"--tokens/--max: k={bad[0]} is outside 1..{limit}, the number of "
                         f"visual tokens of this model")


def check_tokens_fit(config: SweepConfig, model=None) -> None:
    """k <= the model's visual tokens, read from the checkpoint's configs when no model is
    loaded yet, so a bad grid is refused before any model work."""
    if model is not None:
        check_tokens(config.tokens, model.num_patches)
        return
    from vtkit.model import checkpoint_num_patches

    check_tokens(config.tokens, checkpoint_num_patches(config.model_path))


def _prepare_items(questions: list[Question], tokenizer, config: SweepConfig) -> list[_Item]:
    items = []
    for index, q in enumerate(questions):
        ids = tokenize_prompt(build_prompt(q, config.conv_mode, config.single_pred_prompt),
                              tokenizer)
        if q.has_image:
            cut = ids.index(IMAGE_TOKEN_INDEX)
            prefix, suffix = ids[:cut], ids[cut + 1:]
        else:
            prefix, suffix = ids, []
        items.append(_Item(index, q, question_text(q, config.single_pred_prompt), prefix, suffix))
    return items


def default_token_budget(model) -> int:
    """Prefill tokens per forward: a share of free GPU memory, or a fixed size on CPU."""
    if model.device.type != "cuda":
        return 8192
    free, _ = torch.cuda.mem_get_info(model.device)
    config = model.language_model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    width = torch.finfo(model.dtype).bits // 8
    kv = 2 * config.num_hidden_layers * heads * head_dim * width
    # Per token: the KV cache twice (a decode step concatenates a new copy of it), a few
    # hidden-size activations and the MLP intermediate; 40% of free memory stays for the
    # allocator, the captured rows and their Gram matrices.
    activations = (6 * config.hidden_size + 2 * config.intermediate_size) * width
    return max(512, int(free * 0.6 / (2 * kv + activations)))


def _batches(rows: list[tuple[_Item, int]], batch_size: int | None, budget: int,
             max_padding: float = 0.05) -> list[list[tuple[_Item, int]]]:
    """Length-sorted batches of (question, k) rows.

    Sorting every (question, k) of a chunk by prompt length, whatever its k, packs rows of
    nearly equal length together: batches fill the token budget with little padding. A batch
    closes when the next row would exceed ``batch_size`` rows, or ``budget`` padded tokens,
    or make padding more than ``max_padding`` of the batch's tokens.
    """
    ordered = sorted(rows, key=lambda r: (r[0].text_length + r[1], r[0].index, r[1]))
    batches, current, useful = [], [], 0
    for item, k in ordered:
        length = item.text_length + k          # the longest so far: lengths ascend
        padded = (len(current) + 1) * length
        full = len(current) == batch_size if batch_size else padded > budget
        wasteful = padded - (useful + length) > max_padding * padded
        if current and (full or wasteful):
            batches.append(current)
            current, useful = [], 0
        current.append((item, k))
        useful += length
    if current:
        batches.append(current)
    return batches


class _AttentionCapture:
    """Forward hooks on the o_proj of the first and last decoder layer.

    During a prefill each hook keeps only the visual rows of its layer's attention output
    (before the residual add), so the full [B, L, D] activations are never held. Rows have
    their own k: the kept block is [B, k_max, D] with zeros past each row's k.
    """

    def __init__(self, model) -> None:
        layers = model.decoder_layers
        self.layer_ids = [0, len(layers) - 1]
        self.rows: torch.Tensor | None = None    # [B, k_max] positions of the visual rows
        self.valid: torch.Tensor | None = None   # [B, k_max] row j < that row's k
        self.captured: list[torch.Tensor | None] = [None, None]
        self.handles = [layers[i].self_attn.o_proj.register_forward_hook(self._hook(j))
                        for j, i in enumerate(self.layer_ids)]

    def _hook(self, slot: int):
        def hook(module, args, output):
            if self.rows is not None:
                rows = gather_rows(output, self.rows)
                self.captured[slot] = rows.masked_fill(~self.valid[..., None], 0)
        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def sampling_candidates(logits: torch.Tensor, temperature: float, top_k: int,
                        top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The distribution generate() samples from, as (scores, token ids) of the top-k tokens:
    temperature, then top-k (0: every token), then top-p (nucleus, keeping at least one token),
    in the order and with the arithmetic of transformers' logits warpers. Tokens top-p drops
    have score -inf."""
    scaled = logits.float() / temperature
    k = scaled.shape[-1] if top_k <= 0 else min(top_k, scaled.shape[-1])
    top = torch.topk(scaled, k, dim=-1)
    values = top.values
    if top_p < 1.0:
        # TopPLogitsWarper: ascending order, drop while the cumulative mass <= 1 - top_p.
        ascending = values.flip(-1)
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - top_p)
        drop[..., -1:] = False
        values = ascending.masked_fill(drop, -math.inf).flip(-1)
    return values, top.indices


def _pick_tokens(logits: torch.Tensor, decode: dict,
                 generators: list[torch.Generator] | None) -> torch.Tensor:
    if decode["temperature"] <= 0:
        return logits.argmax(-1)
    values, indices = sampling_candidates(logits, decode["temperature"], decode["top_k"],
                                          decode["top_p"])
    probs = torch.softmax(values, dim=-1)
    # One generator per question, so a sample never depends on its batch neighbours.
    picks = torch.stack([torch.multinomial(probs[i], 1, generator=g)
                         for i, g in enumerate(generators)]).squeeze(-1)
    return indices.gather(-1, picks.unsqueeze(-1)).squeeze(-1)


def decode_settings(config: SweepConfig, model) -> dict:
    """The resolved decoding: greedy, or sampling with the temperature and seed of the flags
    and the top-k / top-p of the checkpoint's generation config (as generate() does)."""
    settings = {"temperature": config.temperature, "max_new_tokens": config.max_new_tokens,
                "top_k": None, "top_p": None}
    if config.temperature > 0:
        from vtkit.model import DEFAULT_TOP_K, DEFAULT_TOP_P

        sampling = getattr(model, "sampling", None) or {}
        settings["top_k"] = int(sampling.get("top_k", DEFAULT_TOP_K))
        settings["top_p"] = float(sampling.get("top_p", DEFAULT_TOP_P))
    return settings


def _generators(items: list[_Item], ks: list[int], config: SweepConfig, device) -> list | None:
    if config.temperature <= 0:
        return None
    gens = []
    for item, k in zip(items, ks, strict=True):
        digest = hashlib.sha256(f"{config.seed}:{item.question.question_id}:{k}".encode())
        gens.append(torch.Generator(device=device).manual_seed(
            int.from_bytes(digest.digest()[:8], "little")))
    return gens


@dataclass
class Prefill:
    """The state after one batch's prefill: next-token logits, KV cache, captured rows."""

    logits: torch.Tensor               # [B, vocab] for the next token
    past: object                       # the KV cache
    mask: torch.Tensor                 # [B, L]
    positions: torch.Tensor            # [B, L]
    captured: list                     # [first, last] ([B, k_max, D]) or [None, None]
    tokens: int                        # prefill tokens, padding included


@torch.inference_mode()
def prefill(model, items: list[_Item], visual: list[torch.Tensor] | None,
            capture: _AttentionCapture | None = None) -> Prefill:
    """Embed, splice and left-pad a batch, run the language model once over it.

    With ``visual`` (one [k_i, D] tensor per item; k may differ between items) the kept rows
    replace each image placeholder; with ``capture`` the first and last layers' attention
    outputs of those rows are kept.
    """
    embed, device = model.embed_tokens, model.device
    sequences, visual_starts = [], []
    for j, item in enumerate(items):
        prefix = embed(torch.tensor(item.prefix, device=device))
        if visual is None:
            sequences.append(prefix)
            continue
        suffix = embed(torch.tensor(item.suffix, device=device))
        sequences.append(splice_sequence(prefix, visual[j], suffix))
        visual_starts.append(len(item.prefix))
    embeds, mask, positions = left_pad(sequences)
    capturing = capture is not None and visual is not None
    if capturing:
        longest = embeds.shape[1]
        starts = torch.tensor([longest - s.shape[0] + v for s, v in
                               zip(sequences, visual_starts, strict=True)], device=device)
        ks = torch.tensor([v.shape[0] for v in visual], device=device)
        offsets = torch.arange(int(ks.max()), device=device)
        # Past its own k a row repeats its last visual position; the hook zeroes those rows.
        capture.rows = starts[:, None] + torch.minimum(offsets[None, :], ks[:, None] - 1)
        capture.valid = offsets[None, :] < ks[:, None]
        capture.captured = [None, None]
    past = model.new_cache()
    try:
        hidden = model.run_decoder(embeds, mask, positions, past)
    finally:
        if capture is not None:
            capture.rows = None
    captured = list(capture.captured) if capturing else [None, None]
    logits = model.lm_head(hidden[:, -1])
    return Prefill(logits, past, mask, positions, captured, int(embeds.shape[0] * embeds.shape[1]))


@torch.inference_mode()
def decode(model, items: list[_Item], state: Prefill, config: SweepConfig,
           ks: list[int]) -> list[str]:
    """Greedy (temperature 0) or seeded sampled decoding with the KV cache.

    Every row stops at EOS; the batch ends once every row has, or at max_new_tokens. The text is
    decoded without special tokens and stripped, as LLaVA's eval script does.
    """
    generators = _generators(items, ks, config, model.device)
    settings = decode_settings(config, model)
    eos, pad = model.eos_token_id, model.pad_token_id
    logits, mask, positions = state.logits, state.mask, state.positions
    done = torch.zeros(len(items), dtype=torch.bool, device=model.device)
    steps = []
    for step in range(config.max_new_tokens):
        token = _pick_tokens(logits, settings, generators)
        token = torch.where(done, torch.full_like(token, pad), token)
        steps.append(token)
        done |= token == eos
        if step + 1 == config.max_new_tokens or bool(done.all()):
            break
        mask = torch.cat([mask, mask.new_ones((len(items), 1))], dim=1)
        positions = positions[:, -1:] + 1
        hidden = model.run_decoder(model.embed_tokens(token[:, None]), mask, positions,
                                   state.past)
        logits = model.lm_head(hidden[:, -1])
    answers = []
    for row in torch.stack(steps, dim=1).tolist():
        if eos in row:
            row = row[:row.index(eos)]
        answers.append(clean_answer(model.tokenizer.decode(row, skip_special_tokens=True)))
    return answers


def clean_answer(text: str) -> str:
    """A decoded answer as stored: stripped, as the original evaluation strips it, and with any
    NUL (a byte-fallback token ``<0x00>``, which a barely trained model can emit) replaced by
    U+FFFD, since HDF5 strings cannot hold NUL. No answer that parses contains one, so scoring
    is unchanged."""
    return text.strip().replace("\x00", "\ufffd")


def run_batch(model, items: list[_Item], visual: list[torch.Tensor] | None, config: SweepConfig,
              capture: _AttentionCapture | None, ks: list[int],
              timer: PhaseTimer | NullTimer | None = None) -> tuple[list[str], list, int]:
    """Prefill and decode one batch: (answers, captured rows, prefill tokens)."""
    timer = timer or NullTimer()
    with timer.phase("prefill"):
        state = prefill(model, items, visual, capture)
    with timer.phase("decode"):
        answers = decode(model, items, state, config, ks)
    return answers, state.captured, state.tokens


def _answer_id(fingerprint: str, question_id: str, k: int) -> str:
    return hashlib.sha256(f"{fingerprint}:{question_id}:{k}".encode()).hexdigest()[:22]


def _load_extract_cache(path: Path, image_items: list[_Item], model) -> dict:
    if not path.exists():
        raise DataError(f"{path} not found: run `vtkit extract` with the same model and "
                        f"questions first")
    from vtkit.model import model_key

    try:
        attrs = cache.read_attrs(path)
    except DataError as error:
        raise DataError(f"{error}; re-run `vtkit extract --force`") from None
    if attrs.get("schema_version") != cache.SCHEMA_VERSION:
        raise CacheMismatchError(f"{path} has schema version {attrs.get('schema_version')}, "
                                 f"this vtkit reads version {cache.SCHEMA_VERSION}: re-run "
                                 f"`vtkit extract --force`")
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
    check_tokens_fit(config, model)
    ranks = init_ranks(config.device)
    output_dir = Path(config.output_dir)
    features_path = output_dir / FEATURES_FILE
    selection = select_questions(config.base_dir, config.question_file, config.image_folder,
                                 config.split, config.num_samples)
    if model is None:
        from vtkit.model import load_model

        model = load_model(config.model_path, config.model_base, random_init=config.random_init,
                           dtype=config.dtype, device=ranks.device(config.device))
        check_tokens(config.tokens, model.num_patches)
    if config.compile:
        model.compile_decoder()
    random_init = bool(model.identity.get("random_init"))
    if random_init:
        reporter.warn("RANDOM WEIGHTS (--random-init): answers and ranks are noise; for "
                      "benchmarks only")
    items = _prepare_items(selection.questions, model.tokenizer, config)
    image_items = [it for it in items if it.question.has_image]
    text_items = [it for it in items if not it.question.has_image]
    extract_attrs = _load_extract_cache(features_path, image_items, model) if image_items else {}

    inputs = sweep_inputs(config, model, items, extract_attrs)
    answer_key = answer_key_digest(selection.problems, items)
    final = output_dir / SWEEP_FILE
    model_id = config.model_id or Path(str(config.model_path).rstrip("/")).name
    store = cache.start_parts(final, output_dir / PARTS_DIR, inputs, config.force, ranks)
    if store is None:
        if ranks.is_main and cache.read_attrs(final).get("answer_key") != answer_key:
            rescore(final, selection.problems, items, answer_key)
            gone = remove_outputs(output_dir, ACCURACY_FILES, ACCURACY_PATTERNS)
            reporter.info(f"{final}: the answer key of the selected questions changed; re-scored "
                          f"the stored answers" + (f" and removed {len(gone)} results and "
                                                   f"figures of the old scores (re-run `vtkit "
                                                   f"plot`)" if gone else ""))
        else:
            reporter.info(f"{final}: sweep is complete; nothing to do")
        ranks.barrier()
        results = read_accuracies(final)
        _report(results, reporter)
        return SweepResult(final, results, time.perf_counter() - started, 0, True, random_init)
    if config.force and ranks.is_main:
        gone = remove_outputs(output_dir, RESULT_FILES, RESULT_PATTERNS)
        if gone:
            reporter.info(f"--force: removed {len(gone)} answer files, results and figures of "
                          f"the old sweep")

    done: dict[int, set[int]] = {}
    for part in store.parts():
        with h5py.File(part, "r") as f:
            for q, k in zip(f["question_index"][:], f["k"][:], strict=True):
                done.setdefault(int(k), set()).add(int(q))
    if done:
        reporter.info(f"resuming: {sum(len(v) for v in done.values())} (question, k) results "
                      f"already stored")

    budget = config.token_budget or default_token_budget(model)
    keep = {it.index for it in image_items[:max(config.keep_attention, 0)]}
    computing = time.perf_counter()
    tokens_done = _execute(model, config, store, ranks.share(image_items),
                           ranks.share(text_items), done, budget, keep, features_path, reporter,
                           timer)
    ranks.barrier()
    if ranks.is_main:
        results = _merge(store, final, items, image_items, config, inputs, model, model_id,
                         selection.problems, extract_attrs, answer_key)
        store.remove()
    ranks.barrier()
    compute_seconds = time.perf_counter() - computing
    if not ranks.is_main:
        results = read_accuracies(final)
    reporter.info(f"swept {len(image_items)} image and {len(text_items)} text questions x "
                  f"{len(config.tokens)} k in {compute_seconds:.1f} s on {ranks.world_size} "
                  f"process(es) (model loading excluded)")
    _report(results, reporter)
    return SweepResult(final, results, time.perf_counter() - started, tokens_done, False,
                       random_init)


class _PartWriter:
    """Finishes batches on CPU threads: eigenvalues of the Gram matrices, then the part file.

    The GPU goes on with the next batch meanwhile; at most ``2 * workers`` batches wait, so
    memory stays bounded. An error in a worker surfaces at the next submit or at close. With
    no workers (CPU runs, where the threads would only compete with the model for cores) each
    batch is finished at once.
    """

    def __init__(self, workers: int) -> None:
        self.pool = ThreadPoolExecutor(max_workers=workers) if workers else None
        self.pending: list = []
        self.limit = 2 * workers

    def submit(self, fn, *args) -> None:
        if self.pool is None:
            fn(*args)
            return
        while len(self.pending) >= self.limit:
            self.pending.pop(0).result()
        self.pending.append(self.pool.submit(fn, *args))

    def close(self) -> None:
        if self.pool is None:
            return
        try:
            for future in self.pending:
                future.result()
        finally:
            self.pool.shutdown(wait=True)


def _finish_image_batch(store, name: str, index: np.ndarray, ks: list[int], answers: list[str],
                        grams: list, ready, hidden: int, kept: dict) -> None:
    if ready is not None:
        ready.synchronize()    # the Gram matrices' copy to pinned host memory has landed
    grams = [g.numpy() for g in grams]
    ranks = [min(k, hidden) for k in ks]
    arrays = {"question_index": index, "k": np.asarray(ks, dtype=np.int32), "answers": answers}
    for slot, layer in enumerate(("first_layer", "last_layer")):
        arrays[f"spectra/{layer}"] = np.concatenate(spectra_from_gram(grams[slot], ranks))
    arrays.update(kept)
    store.write(name, arrays)


def _execute(model, config, store, image_items, text_items, done, budget, keep,
             features_path, reporter, timer) -> int:
    """Plan the remaining (question, k) work and run it, writing one part per batch.

    Questions go in chunks whose projected features stay on the device for the whole grid, so
    every question's features are read and projected once, not once per k; within a chunk all
    (question, k) rows are batched together by length.
    """
    chunk_size = 512 if model.device.type == "cuda" else 1024
    chunks = [image_items[i:i + chunk_size] for i in range(0, len(image_items), chunk_size)]
    text_rows = [(it, 0) for it in text_items if it.index not in done.get(0, set())]
    plan = []
    for chunk in chunks:
        rows = [(it, k) for it in chunk for k in config.tokens
                if it.index not in done.get(k, set())]
        plan.append(_batches(rows, config.batch_size, budget) if rows else [])
    text_batches = _batches(text_rows, config.batch_size, budget) if text_rows else []
    total = len(text_batches) + sum(len(b) for b in plan)
    if total == 0:
        return 0
    capture = _AttentionCapture(model)
    # On GPU runs the eigenvalues are computed by CPU threads, one BLAS thread each.
    workers = max(1, min(12, (os.cpu_count() or 2) - 2)) if model.device.type == "cuda" else 0
    writer = _PartWriter(workers)
    limits = threadpool_limits(limits=1, user_api="blas") if workers else nullcontext()
    tokens_done = 0
    try:
        with limits, \
                reporter.task("sweep", total=total, unit="batches", work_unit="tokens") as task, \
                (h5py.File(features_path, "r") if image_items else nullcontext()) as features:
            for batch in text_batches:
                items = [it for it, _ in batch]
                answers, _, n = run_batch(model, items, None, config, None, [0] * len(items),
                                          timer)
                writer.submit(store.write, f"t-{items[0].index:06d}", {
                    "question_index": np.asarray([it.index for it in items], dtype=np.int64),
                    "k": np.zeros(len(items), dtype=np.int32), "answers": answers})
                tokens_done += n
                task.advance(1, work=n)
            for chunk, batches in zip(chunks, plan, strict=True):
                if not batches:
                    continue
                with timer.phase("load"):
                    projected, scores = _load_chunk(model, features, chunk, config)
                local = {it.index: j for j, it in enumerate(chunk)}
                for batch in batches:
                    items, ks = [it for it, _ in batch], [k for _, k in batch]
                    task.describe(f"sweep k={min(ks)}..{max(ks)}")
                    with timer.phase("select"):
                        visual = _select(projected, scores, [local[it.index] for it in items], ks)
                    answers, captured, n = run_batch(model, items, visual, config, capture, ks,
                                                     timer)
                    with timer.phase("spectra"):
                        grams, ready = _grams_to_host(captured)
                        kept = _kept_attention(items, ks, captured, keep)
                    index = np.asarray([it.index for it in items], dtype=np.int64)
                    # Named by its (question, k) rows: unique, and stable across resumes.
                    name = "i-" + hashlib.sha1(json.dumps(sorted(zip(index.tolist(), ks,
                                                                         strict=True)))
                                               .encode()).hexdigest()[:20]
                    writer.submit(_finish_image_batch, store, name, index, ks, answers, grams,
                                  ready, model.hidden_size, kept)
                    tokens_done += n
                    task.advance(1, work=n)
            task.describe(f"sweep ({len(config.tokens)} k values)")
            with timer.phase("drain"):
                writer.close()
    finally:
        capture.close()
        writer.close()
    return tokens_done


def _grams_to_host(captured: list[torch.Tensor]) -> tuple[list[torch.Tensor], object]:
    """Gram matrices of the captured rows, copied to host memory without stalling the GPU.

    On CUDA the copy goes to pinned memory asynchronously; the returned event tells the CPU
    worker when it has landed. On the CPU the tensors are simply returned.
    """
    grams = [gram_matrices(c) for c in captured]
    if grams[0].device.type != "cuda":
        return grams, None
    host = [torch.empty(g.shape, dtype=g.dtype, pin_memory=True) for g in grams]
    for h, g in zip(host, grams, strict=True):
        h.copy_(g, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


def _select(projected: torch.Tensor, scores: torch.Tensor, rows: list[int],
            ks: list[int]) -> list[torch.Tensor]:
    """Each row's top-k projected features in raster order (rows sharing a k go together)."""
    visual: list[torch.Tensor | None] = [None] * len(rows)
    for k in sorted(set(ks)):
        members = [j for j, kk in enumerate(ks) if kk == k]
        index = torch.tensor([rows[j] for j in members], device=projected.device)
        kept = gather_rows(projected[index], top_k_raster(scores[index], k))
        for j, block in zip(members, kept, strict=True):
            visual[j] = block
    return visual


def _kept_attention(items, ks, captured, keep: set[int]) -> dict:
    """Raw attention rows (float16) of the questions whose matrices are kept."""
    rows = [j for j, it in enumerate(items) if it.index in keep]
    if not rows:
        return {}
    kept = {"attention/index": np.asarray([items[j].index for j in rows], dtype=np.int64),
            "attention/k": np.asarray([ks[j] for j in rows], dtype=np.int32)}
    for slot, layer in enumerate(("first_layer", "last_layer")):
        kept[f"attention/{layer}"] = torch.cat(
            [captured[slot][j, :ks[j]] for j in rows]).to(torch.float16).cpu().numpy()
    return kept


def _load_chunk(model, features_file, chunk: list[_Item], config: SweepConfig):
    """Project one chunk's cached features once; every k of the grid reuses them."""
    order = np.argsort([it.cache_row for it in chunk], kind="stable")
    rows = [chunk[j].cache_row for j in order]
    feats = features_file["features"][rows]
    scores = features_file[f"scores/{config.scorer}"][rows]
    back = np.empty_like(order)
    back[order] = np.arange(len(order))
    feats, scores = feats[back], scores[back]
    with torch.inference_mode():
        projected = model.project(torch.from_numpy(feats).to(model.device, model.dtype))
    return projected, torch.from_numpy(np.ascontiguousarray(scores)).to(model.device)


def _merge(store, final, items, image_items, config, inputs, model, model_id, problems,
           extract_attrs, answer_key) -> list[KResult]:
    """Gather the parts into sweep.h5 and the answer files, score every k."""
    n_q, n_k = len(items), len(config.tokens)
    k_row = {k: i for i, k in enumerate(config.tokens)}
    img_row = {it.index: j for j, it in enumerate(image_items)}
    keep_row = {it.index: j for j, it in enumerate(image_items[:max(config.keep_attention, 0)])}
    answers = np.full((n_k, n_q), None, dtype=object)
    spectra = {name: {} for name in ("first_layer", "last_layer")}
    attention = {name: {} for name in ("first_layer", "last_layer")}
    hidden = int(model.hidden_size)
    for part in store.parts():
        with h5py.File(part, "r") as f:
            index, ks = f["question_index"][:], f["k"][:]
            text = [t.decode() for t in f["answers"][:]]
            if not ks.any():    # text-only rows: one answer for every k
                for q, t in zip(index, text, strict=True):
                    answers[:, q] = t
                continue
            ranks = np.minimum(ks, hidden)
            starts = np.concatenate([[0], np.cumsum(ranks)])
            for layer in spectra:
                flat = f[f"spectra/{layer}"][:]
                for r, (q, k) in enumerate(zip(index, ks, strict=True)):
                    block = spectra[layer].setdefault(
                        int(k), np.zeros((len(image_items), ranks[r]), np.float32))
                    block[img_row[q]] = flat[starts[r]:starts[r + 1]]
            for r, (q, k) in enumerate(zip(index, ks, strict=True)):
                answers[k_row[int(k)], q] = text[r]
            if "attention/index" in f:
                kept_k = f["attention/k"][:]
                offsets = np.concatenate([[0], np.cumsum(kept_k)])
                for layer in attention:
                    flat = f[f"attention/{layer}"][:]
                    for r, (q, k) in enumerate(zip(f["attention/index"][:], kept_k, strict=True)):
                        block = attention[layer].setdefault(
                            int(k), np.zeros((len(keep_row), k, flat.shape[1]), np.float16))
                        block[keep_row[q]] = flat[offsets[r]:offsets[r + 1]]
    missing = int(sum(a is None for a in answers.ravel()))
    if missing:
        raise DataError(f"{store.directory}: {missing} (question, k) results are missing; "
                        f"re-run vtkit sweep")

    cache.check_free_space(final.parent, store.size(), final, cache.PARTS_KEPT)
    answers_dir = Path(final).parent / ANSWERS_DIR
    answers_dir.mkdir(exist_ok=True)
    fingerprint = cache.fingerprint(inputs)
    pids = [it.question.question_id for it in items]
    correct, results = score_answers(problems, items, config.tokens, answers)
    for r, k in enumerate(config.tokens):
        lines = [json.dumps({
            "question_id": it.question.question_id, "prompt": it.prompt,
            "text": answers[r, it.index], "answer_id": _answer_id(fingerprint, pids[it.index], k),
            "model_id": model_id, "metadata": {"k": k, "scorer": config.scorer},
        }) for it in items]
        cache.write_text_atomic(answers_dir / f"k{k}.jsonl", "\n".join(lines) + "\n",
                                cache.PARTS_KEPT)

    arrays: dict = {
        "token_counts": np.asarray(config.tokens, dtype=np.int32),
        "question_ids": pids,
        "has_image": np.asarray([it.question.has_image for it in items], dtype=bool),
        "correct": correct,
        "answers": answers,
    }
    for name in spectra:
        for k, block in spectra[name].items():
            arrays[f"spectra/{name}/k{k}"] = block
        for k, block in attention[name].items():
            arrays[f"attention/{name}/k{k}"] = block
    attrs = cache.base_attrs({**config.to_dict(), "decode": decode_settings(config, model)},
                             inputs)
    attrs.update({
        "answer_key": answer_key,
        "checkpoint_dir": str(model.identity.get("checkpoint_dir")),
        "extract_fingerprint": str(extract_attrs.get("fingerprint", "")),
        "model_id": model_id,
        "scorer": config.scorer,
        "random_init": bool(model.identity.get("random_init")),
        "layers": np.asarray([0, model.num_layers - 1], dtype=np.int64),
        "hidden_size": int(model.hidden_size),
        "complete": True,
    })
    cache.write_h5_atomic(final, arrays, attrs, kept=cache.PARTS_KEPT)
    return results


def sweep_inputs(config: SweepConfig, model, items: list[_Item], extract_attrs: dict) -> dict:
    """The record of what sweep.h5 is made from; its hash is the file's fingerprint.

    The answers depend on the prompts (their text and token ids), the tokenizer, the model
    (by :func:`vtkit.model.model_key`), the features and the decoding; the answer key does not,
    so it stays out (``answer_key`` beside it: a changed key re-scores the stored answers)."""
    from vtkit.model import model_key

    decode = decode_settings(config, model)
    prompts = [[it.question.question_id, it.prompt, it.prefix, it.suffix] for it in items]
    return {
        "schema_version": cache.SCHEMA_VERSION,
        "extract_fingerprint": extract_attrs.get("fingerprint"),
        "model": model_key(model.identity),
        "tokenizer": model.identity.get("tokenizer_sha256"),
        "dtype": str(model.identity.get("dtype")),
        "questions": _digest([it.question.question_id for it in items]),
        "prompts": _digest(prompts),
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
    }


def _digest(items) -> str:
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def answer_key_digest(problems: dict, items: list[_Item]) -> str:
    """Hash of what scoring reads of the selected questions: each one's answer and choices."""
    return _digest([[it.question.question_id, problems.get(it.question.question_id, {})
                     .get("answer"), problems.get(it.question.question_id, {}).get("choices")]
                    for it in items])


def score_answers(problems: dict, items: list[_Item], tokens: list[int],
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


def rescore(path: Path, problems: dict, items: list[_Item], answer_key: str) -> list[KResult]:
    """Score the answers stored in a finished sweep.h5 against the current answer key and
    replace its ``correct`` and ``answer_key`` (on a copy, renamed over the file)."""
    with h5py.File(path, "r") as f:
        tokens = f["token_counts"][:].tolist()
        stored_ids = f["question_ids"].asstr()[:].tolist()
        answers = f["answers"].asstr()[:].astype(object)
    if stored_ids != [it.question.question_id for it in items]:
        raise CacheMismatchError(f"{path} holds other questions; pass --force to recompute it")
    correct, results = score_answers(problems, items, tokens, answers)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        shutil.copyfile(path, tmp)
        with h5py.File(tmp, "r+") as f:
            f["correct"][...] = correct
            f.attrs["answer_key"] = answer_key
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
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
