"""One batch through LLaVA: the language-model side of ``vtkit sweep``.

A question becomes a :class:`PreparedItem` (its prompt tokenized around the image
placeholder); a batch of them, with the kept visual rows of each, is embedded, spliced and
left-padded, prefilled once (:func:`prefill`, where :class:`ActivationCapture` keeps the visual
rows of the chosen tensors at the chosen decoder layers) and decoded with the KV cache
(:func:`decode`: greedy, or seeded sampling as ``generate()`` samples). :func:`run_batch` does
both. The stage around it (planning, parts, resume, merge) is :mod:`vtkit.sweep`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from vtkit.data import Question
from vtkit.packed import PackedDecoder, flash_varlen_available, packing_problem
from vtkit.progress import NullTimer, PhaseTimer
from vtkit.prompts import IMAGE_TOKEN_INDEX, build_prompt, question_text, tokenize_prompt
from vtkit.pruning import gather_rows, left_pad, splice_sequence, to_device

if TYPE_CHECKING:
    from vtkit.sweep import SweepConfig


@dataclass
class PreparedItem:
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


def prepare_items(questions: list[Question], tokenizer,
                  config: SweepConfig) -> list[PreparedItem]:
    """Each question's prompt (``config.conv_mode``, ``config.single_pred_prompt``), tokenized
    and cut at the image placeholder."""
    items = []
    for index, q in enumerate(questions):
        ids = tokenize_prompt(build_prompt(q, config.conv_mode, config.single_pred_prompt),
                              tokenizer)
        if q.has_image:
            cut = ids.index(IMAGE_TOKEN_INDEX)
            prefix, suffix = ids[:cut], ids[cut + 1:]
        else:
            prefix, suffix = ids, []
        items.append(PreparedItem(index, q, question_text(q, config.single_pred_prompt), prefix,
                                  suffix))
    return items


class ActivationCapture:
    """Forward hooks that keep the visual rows of chosen tensors at chosen decoder layers.

    A slot is a (capture, layer) pair, capture one of :data:`vtkit.defaults.CAPTURES`:
    ``attn_out`` is the output of the layer's ``self_attn.o_proj`` (before the residual add),
    ``attn_heads`` its input (the concatenated heads, read by a pre-hook), ``hidden`` the decoder
    layer's output (a tensor, or the first element of the tuple some transformers versions
    return). During a prefill each hook keeps only its slot's visual rows, so the full
    [B, L, D] activations are never held. Rows have their own k: the kept block is
    [B, k_max, D] with zeros past each row's k. Every slot fills in the same prefill.
    """

    def __init__(self, model, captures: list[str] | tuple[str, ...] = ("attn_out",),
                 layers: list[int] | None = None) -> None:
        decoder = model.decoder_layers
        layers = [0, len(decoder) - 1] if layers is None else list(layers)
        self.slots = [(c, layer) for c in captures for layer in layers]
        self.rows: torch.Tensor | None = None    # [B, k_max] positions of the visual rows
        self.valid: torch.Tensor | None = None   # [B, k_max] row j < that row's k
        self.captured: dict[tuple[str, int], torch.Tensor] = {}
        self.handles = [self._register(decoder[layer], capture, (capture, layer))
                        for capture, layer in self.slots]
        self.widths = slot_widths(model, self.slots)   # each slot's row width d

    def _register(self, layer, capture: str, slot: tuple[str, int]):
        if capture == "attn_out":
            return layer.self_attn.o_proj.register_forward_hook(
                lambda module, args, output: self._keep(slot, output))
        if capture == "attn_heads":
            return layer.self_attn.o_proj.register_forward_pre_hook(
                lambda module, args: self._keep(slot, args[0]))
        if capture == "hidden":
            return layer.register_forward_hook(
                lambda module, args, output: self._keep(
                    slot, output[0] if isinstance(output, tuple) else output))
        raise ValueError(f"unknown capture {capture!r}")

    def _keep(self, slot: tuple[str, int], tensor: torch.Tensor) -> None:
        if self.rows is not None:
            # A packed batch's tensors are [T, D], and its rows index T.
            rows = tensor[self.rows] if tensor.dim() == 2 else gather_rows(tensor, self.rows)
            self.captured[slot] = rows.masked_fill(~self.valid[..., None], 0)

    def layer_output(self, layer: int, tensor: torch.Tensor) -> None:
        """Keep decoder layer ``layer``'s output for a ``hidden`` slot: what the layer's hook
        does when a loop other than the layer's own forward runs it (:mod:`vtkit.packed`)."""
        if ("hidden", layer) in self.widths:
            self._keep(("hidden", layer), tensor)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def slot_widths(model, slots: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
    """The row width of each (capture, layer) slot: o_proj's input width for ``attn_heads``
    (the heads times the head size), the hidden size for the others."""
    decoder = model.decoder_layers
    return {(c, layer): int(decoder[layer].self_attn.o_proj.in_features) if c == "attn_heads"
            else int(model.hidden_size) for c, layer in slots}


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


def pick_tokens(logits: torch.Tensor, decode: dict,
                 generators: list[torch.Generator] | None) -> torch.Tensor:
    """Each row's next token: the argmax, or a seeded sample of :func:`sampling_candidates`."""
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


def row_generators(items: list[PreparedItem], ks: list[int], config: SweepConfig,
                device) -> list | None:
    """One generator per (question, k), seeded by both and ``--seed``; None when greedy."""
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
    mask: torch.Tensor | None          # [B, L]; None for packed rows
    positions: torch.Tensor            # [B, L] (padded) or [B, 1] each row's last (packed)
    captured: dict                     # (capture, layer) -> [B, k_max, D]; {} without capture
    tokens: int                        # the batch's positions (a shared prefix in each row)
    reused: int = 0                    # of those, run once for every row (a shared prefix)
    decoder: PackedDecoder | None = None   # the packed rows' decoder; None: padded


def embed_texts(model, texts: list[list[int]]) -> list[torch.Tensor]:
    """The embeddings of each token-id list, [len, D]: one copy to the device and one lookup
    for them all, so that the host never waits for the GPU here."""
    ids = to_device(torch.tensor([t for text in texts for t in text], dtype=torch.long),
                    model.device)
    return list(model.embed_tokens(ids).split([len(text) for text in texts]))


def shared_prefix(items: list[PreparedItem]) -> int:
    """How many leading prompt tokens every row of a batch has in common (the system prompt
    and ``USER:`` of the conversation template, at least), leaving each row a token of its own
    (a text-only row's prompt is all prefix)."""
    first = items[0].prefix
    common = min(len(item.prefix) - (0 if item.suffix else 1) for item in items)
    for item in items[1:]:
        common = next((i for i, (a, b) in enumerate(zip(first[:common], item.prefix[:common],
                                                        strict=True)) if a != b), common)
    return common


def packing_wanted(model, config: SweepConfig) -> bool:
    """Whether the sweep's rows are to run packed: ``--pack``/``--no-pack``, by default where
    flash attention's variable-length kernel runs (CUDA, fp16/bf16). Elsewhere the packed
    layers have no kernel of their own to gain from, and the model's own forward is faster."""
    if config.pack is not None:
        return config.pack
    return flash_varlen_available(model.device, model.dtype)


def batch_decoder(model, config: SweepConfig) -> PackedDecoder | None:
    """The packed decoder a sweep's batches run through, or None for left-padded batches
    (:func:`packing_wanted`, and a language model :func:`~vtkit.packed.packing_problem` does
    not rule out). Its elementwise work is compiled with ``--compile``, and by default on
    CUDA."""
    if not packing_wanted(model, config) or packing_problem(model) is not None:
        return None
    compiled = model.device.type == "cuda" if config.compile is None else config.compile
    return PackedDecoder(model, compiled)


def _embedded(model, items: list[PreparedItem],
              visual: list[torch.Tensor] | None) -> list[torch.Tensor]:
    """Each row's embedded prompt [L_i, D], the kept visual rows in place of the placeholder."""
    if visual is None:
        return embed_texts(model, [item.prefix for item in items])
    texts = embed_texts(model, [item.prefix for item in items] + [item.suffix for item in items])
    return [splice_sequence(prefix, v, suffix) for prefix, v, suffix in
            zip(texts[:len(items)], visual, texts[len(items):], strict=True)]


def _aim_capture(capture: ActivationCapture, starts: torch.Tensor,
                 visual: list[torch.Tensor]) -> None:
    """Point ``capture`` at each row's visual positions, from ``starts`` [B] (on the device),
    the position of each row's first visual token in the forward's layout."""
    device = starts.device
    lengths = [v.shape[0] for v in visual]
    ks = to_device(torch.tensor(lengths), device)
    offsets = torch.arange(max(lengths), device=device)
    # Past its own k a row repeats its last visual position; the hook zeroes those rows.
    capture.rows = starts[:, None] + torch.minimum(offsets[None, :], ks[:, None] - 1)
    capture.valid = offsets[None, :] < ks[:, None]
    capture.captured = {}


@torch.inference_mode()
def prefill(model, items: list[PreparedItem], visual: list[torch.Tensor] | None,
            capture: ActivationCapture | None = None, share_prefix: bool = False,
            decoder: PackedDecoder | None = None) -> Prefill:
    """Embed and splice a batch, run the language model once over it.

    With ``visual`` (one [k_i, D] tensor per item; k may differ between items) the kept rows
    replace each image placeholder; with ``capture`` the captured tensors of those rows are kept
    at every layer of its slots. With ``share_prefix`` (and more than one row) the tokens every
    row begins with (:func:`shared_prefix`) run once, and every row then attends to their keys
    and values (copied into each row's cache when padded, kept as one part of the packed
    cache): the same attention, position by position, as a row alone would have. With
    ``decoder`` the rows are packed (:mod:`vtkit.packed`), else left-padded and run by the
    model's own forward.
    """
    sequences = _embedded(model, items, visual)
    shared = shared_prefix(items) if share_prefix and len(items) > 1 else 0
    capturing = capture is not None and visual is not None
    if decoder is not None:
        return _prefill_packed(model, decoder, items, visual, sequences, shared,
                               capture if capturing else None)
    device = model.device
    past = model.new_cache()
    if shared:
        # The capture's rows are not set yet: its hooks keep nothing of this forward.
        head = sequences[0][:shared][None]
        model.run_decoder(head, torch.ones((1, shared), dtype=torch.long, device=device),
                          torch.arange(shared, device=device)[None], past)
        past.batch_repeat_interleave(len(items))
        sequences = [s[shared:] for s in sequences]
    embeds, mask, positions = left_pad(sequences)
    if shared:
        mask = torch.cat([mask.new_ones((len(items), shared)), mask], dim=1)
        positions = torch.cat([torch.arange(shared, device=device).expand(len(items), -1),
                               positions + shared], dim=1)
    if capturing:
        longest = embeds.shape[1]
        _aim_capture(capture, to_device(torch.tensor(
            [longest - s.shape[0] + len(item.prefix) - shared
             for s, item in zip(sequences, items, strict=True)]), device), visual)
    try:
        hidden = model.run_decoder(embeds, mask, positions[:, shared:], past)
    finally:
        if capture is not None:
            capture.rows = None
    captured = dict(capture.captured) if capturing else {}
    logits = model.lm_head(hidden[:, -1])
    return Prefill(logits, past, mask, positions, captured, int(mask.numel()),
                   (len(items) - 1) * shared)


def _prefill_packed(model, decoder: PackedDecoder, items: list[PreparedItem],
                    visual: list[torch.Tensor] | None, sequences: list[torch.Tensor],
                    shared: int, capture: ActivationCapture | None) -> Prefill:
    """:func:`prefill` over packed rows: the shared prefix once, then every row's own tokens
    after it."""
    device = model.device
    cache = decoder.new_cache()
    if shared:
        decoder.prefix(sequences[0][:shared], cache, key=tuple(items[0].prefix[:shared]))
        sequences = [s[shared:] for s in sequences]
    lengths = np.array([s.shape[0] for s in sequences])
    ends = lengths.cumsum()
    positions = np.arange(ends[-1]) - np.repeat(ends - lengths, lengths) + shared
    if capture is not None:
        firsts = ends - lengths + np.array([len(item.prefix) - shared for item in items])
        _aim_capture(capture, to_device(torch.from_numpy(firsts), device), visual)
    try:
        hidden = decoder.rows(torch.cat(sequences), to_device(torch.from_numpy(positions), device),
                              lengths.tolist(), cache, capture)
    finally:
        if capture is not None:
            capture.rows = None
    captured = dict(capture.captured) if capture is not None else {}
    logits = model.lm_head(decoder.norm(hidden[to_device(torch.from_numpy(ends - 1), device)]))
    last = to_device(torch.from_numpy(lengths + shared - 1), device)[:, None]
    return Prefill(logits, cache, None, last, captured, int(ends[-1]) + shared * len(items),
                   (len(items) - 1) * shared, decoder)


@torch.inference_mode()
def decode(model, items: list[PreparedItem], state: Prefill, config: SweepConfig,
           ks: list[int]) -> list[str]:
    """Greedy (temperature 0) or seeded sampled decoding with the KV cache of the prefill
    (:func:`decode_loop`)."""
    if state.decoder is not None:
        return _decode_packed(model, items, state, config, ks)
    length = state.mask.shape[1]
    # The mask of every step is a view of one allocation (each new position is attended).
    masks = torch.cat([state.mask, state.mask.new_ones((len(items), config.max_new_tokens - 1))],
                      dim=1)
    last = state.positions[:, -1:]

    def forward(token: torch.Tensor, step: int) -> torch.Tensor:
        hidden = model.run_decoder(model.embed_tokens(token[:, None]),
                                   masks[:, :length + step + 1], last + step + 1, state.past)
        return model.lm_head(hidden[:, -1])

    return decode_loop(model, items, ks, config, state.logits, forward)


def _decode_packed(model, items: list[PreparedItem], state: Prefill, config: SweepConfig,
                   ks: list[int]) -> list[str]:
    """:func:`decode` of packed rows: each step is one token per row, appended to its row."""
    def forward(token: torch.Tensor, step: int) -> torch.Tensor:
        hidden = state.decoder.step(model.embed_tokens(token), state.positions[:, 0] + step + 1,
                                    state.past)
        return model.lm_head(state.decoder.norm(hidden))

    return decode_loop(model, items, ks, config, state.logits, forward)


def decode_loop(model, items: list[PreparedItem], ks: list[int], config: SweepConfig,
                logits: torch.Tensor, forward) -> list[str]:
    """The decoding rule of every path: each step picks every row's token (the argmax, or a
    seeded sample as generate() samples), rows past their EOS get padding, and the batch ends
    once every row has stopped or at max_new_tokens. ``forward(token, step)`` runs step
    ``step``'s tokens [B] through the cache and returns the next logits. Returns the answers,
    decoded without special tokens and stripped, as LLaVA's eval script does."""
    generators = row_generators(items, ks, config, model.device)
    settings = decode_settings(config, model)
    eos, pad = model.eos_token_id, model.pad_token_id
    done = torch.zeros(len(items), dtype=torch.bool, device=model.device)
    steps = []
    for step in range(config.max_new_tokens):
        token = pick_tokens(logits, settings, generators)
        token = torch.where(done, torch.full_like(token, pad), token)
        steps.append(token)
        done |= token == eos
        if step + 1 == config.max_new_tokens:
            break
        # Whether every row has stopped is not asked after the first token: asking makes the
        # host wait for the prefill's last kernels, and the decode step's launches then leave
        # the GPU idle. Had every row stopped there, the step's tokens are all padding.
        if step and bool(done.all()):
            break
        logits = forward(token, step)
    return answer_texts(model, steps)


def answer_texts(model, steps: list[torch.Tensor]) -> list[str]:
    """Each row's answer from its decoded tokens (one [B] tensor per step): up to its EOS,
    decoded without special tokens, cleaned as :func:`clean_answer` says."""
    answers = []
    for row in torch.stack(steps, dim=1).tolist():
        if model.eos_token_id in row:
            row = row[:row.index(model.eos_token_id)]
        answers.append(clean_answer(model.tokenizer.decode(row, skip_special_tokens=True)))
    return answers


def clean_answer(text: str) -> str:
    """A decoded answer as stored: stripped, as the original evaluation strips it, and with any
    NUL (a byte-fallback token ``<0x00>``, which a barely trained model can emit) replaced by
    U+FFFD, since HDF5 strings cannot hold NUL. No answer that parses contains one, so scoring
    is unchanged."""
    return text.strip().replace("\x00", "\ufffd")


def run_batch(model, items: list[PreparedItem], visual: list[torch.Tensor] | None,
              config: SweepConfig, capture: ActivationCapture | None, ks: list[int],
              timer: PhaseTimer | NullTimer | None = None, decoder: PackedDecoder | None = None,
              on_captured=None) -> tuple[list[str], dict, int]:
    """Prefill and decode one batch: (answers, captured rows, prefill tokens). With
    ``decoder`` (:func:`batch_decoder`) the rows run packed, else left-padded. ``on_captured``,
    when given, is called with the captured rows as soon as the prefill has queued them, before
    the decoding: the sweep queues their spectra there."""
    timer = timer or NullTimer()
    with timer.phase("prefill"):
        state = prefill(model, items, visual, capture, config.share_prefix, decoder)
    timer.count("shared prefix tokens", state.reused)
    if on_captured is not None:
        on_captured(state.captured)
    with timer.phase("decode"):
        answers = decode(model, items, state, config, ks)
    return answers, state.captured, state.tokens


def default_token_budget(model, slots: int = 2) -> int:
    """Prefill tokens per forward: a share of free GPU memory, or a fixed size on CPU.
    ``slots``: the (capture, layer) pairs whose visual rows the prefill keeps."""
    if model.device.type != "cuda":
        return 8192
    free, _ = torch.cuda.mem_get_info(model.device)
    config = model.language_model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    width = torch.finfo(model.dtype).bits // 8
    kv = 2 * config.num_hidden_layers * heads * head_dim * width
    # Per token: the KV cache twice (a budget with one copy once ran out of memory), a few
    # hidden-size activations and the MLP intermediate; 40% of free memory stays for the
    # allocator, the captured rows and their Gram matrices.
    activations = (6 * config.hidden_size + 2 * config.intermediate_size) * width
    # The 40% covers the seed's two slots; each further one holds, per visual token, its row
    # and a row of its float64 Gram matrix until the batch's copy to the host is queued.
    per_slot = config.hidden_size * width + model.num_patches * 8
    captured = max(0, slots - 2) * per_slot
    return max(512, int(free * 0.6 / (2 * kv + activations + captured)))
