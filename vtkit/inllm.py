"""Pruning inside the language model: FastV and DART at decoder layer K (``--prune-layer``).

Every (question, k) row enters with all of its image's visual rows spliced in. Layers 0..K-1
run on the full left-padded sequences; from layer K-1's own queries, keys and outputs the
method picks each row's k image tokens (the pure rules :func:`fastv_select` and
:func:`dart_select`); each row keeps its text and those k tokens, left-padded again, and layers
K.. run on the pruned rows with their ORIGINAL position ids (the gaps stay, as in both official
implementations). The attention of every layer is the model's own kernel (SDPA) with a 4D mask
built here; the one attention row FastV needs is recomputed from layer K-1's query of the last
token and its cached keys, so no layer has to return attention weights.

The KV cache is one tensor pair per layer, so layers before K keep full-length keys and values
and layers from K pruned ones; :func:`decode` continues from them (greedy, or the seeded sampling
of :mod:`vtkit.generate`). With an :class:`~vtkit.generate.ActivationCapture`, the captured rows
are those of the k kept image tokens at every layer: at layers before K the hooks keep all the
image rows and the kept ones are taken once the selection is known, so every layer's spectrum
is of the same k tokens.
"""

from __future__ import annotations

import inspect
import math

import torch

from vtkit.errors import UsageError
from vtkit.generate import Prefill, PreparedItem, decode_loop, embed_texts
from vtkit.pruning import gather_rows, left_pad, splice_sequence, to_device

#: DART's pivots (the official LLaVA-1.5 scripts): image tokens and post-image text tokens with
#: the largest L1 norm of their layer K-1 keys.
DART_IMAGE_PIVOTS = 4
DART_TEXT_PIVOTS = 4


def _top_indices(values: torch.Tensor, count: int, largest: bool = True) -> torch.Tensor:
    """Indices of the ``count`` largest (or smallest) values, best first; ties go to the lower
    index (a stable sort), so the choice does not depend on the kernel."""
    order = torch.sort(values.float(), descending=largest, stable=True).indices
    return order[:count]


def fastv_select(attention: torch.Tensor, k: int) -> torch.Tensor:
    """FastV's kept image tokens: the ``k`` with the largest attention from the last prompt
    token (``attention`` [N], already averaged over heads), in raster order."""
    return _top_indices(attention, k).sort().values


def head_mean_attention(query: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor,
                        scaling: float) -> torch.Tensor:
    """Post-softmax attention of one query per row, averaged over heads, in float32.

    ``query`` [B, H, d] (RoPE applied), ``keys`` [B, H_kv, L, d] (RoPE applied; grouped-query
    heads are repeated), ``valid`` [B, L] the keys the query may see. Returns [B, L].
    """
    keys = keys.repeat_interleave(query.shape[1] // keys.shape[1], dim=1)
    logits = torch.einsum("bhd,bhld->bhl", query.float(), keys.float()) * scaling
    logits = logits.masked_fill(~valid[:, None, :], -math.inf)
    return logits.softmax(dim=-1).mean(dim=1)


def dart_select(image_keys: torch.Tensor, text_keys: torch.Tensor, image_states: torch.Tensor,
                text_states: torch.Tensor, k: int, image_pivots: int = DART_IMAGE_PIVOTS,
                text_pivots: int = DART_TEXT_PIVOTS) -> torch.Tensor:
    """DART's kept image tokens for budget ``k``, in raster order.

    ``image_keys`` [N] / ``text_keys`` [T]: L1 norms of layer K-1's keys (post-RoPE, all heads)
    of the image tokens and of the text after the image; ``image_states`` [N, D] /
    ``text_states`` [T, D]: layer K-1's outputs after the final RMSNorm. Pivots are the
    ``image_pivots`` image and ``text_pivots`` text tokens of largest key norm, image pivots
    first, each group by descending norm. The image pivots are kept; the other k - (image
    pivots) picks are shared out over the pivots as evenly as possible (earlier pivots take
    the remainder), and each pivot in turn takes its share of the remaining image tokens least
    cosine-similar to it. Text pivots are not kept.
    """
    count = image_keys.shape[0]
    if k >= count:
        return torch.arange(count, device=image_keys.device)
    image_pivot = _top_indices(image_keys, min(image_pivots, k))
    text_pivot = _top_indices(text_keys, min(text_pivots, text_keys.shape[0]))
    pivots = [image_states[i] for i in image_pivot] + [text_states[i] for i in text_pivot]
    picks = k - image_pivot.shape[0]
    shares = [picks // len(pivots) + (j < picks % len(pivots)) for j in range(len(pivots))]
    remaining = torch.ones(count, dtype=torch.bool, device=image_keys.device)
    remaining[image_pivot] = False
    kept = [image_pivot]
    for pivot, share in zip(pivots, shares, strict=True):
        if share == 0:
            continue
        candidates = remaining.nonzero().squeeze(-1)
        similarity = torch.nn.functional.cosine_similarity(
            pivot.float()[None], image_states[candidates].float(), dim=-1)
        chosen = candidates[_top_indices(similarity, share, largest=False)]
        remaining[chosen] = False
        kept.append(chosen)
    return torch.cat(kept).sort().values


class LayerCache:
    """Keys and values per decoder layer, each layer its own length (full before the pruning
    layer, pruned from it). Passed to the decoder layers as their cache: they call
    :meth:`update`, the one method transformers' attention uses."""

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def update(self, key: torch.Tensor, value: torch.Tensor, layer: int, *args, **kwargs):
        if self.keys[layer] is not None:
            key = torch.cat([self.keys[layer], key], dim=-2)
            value = torch.cat([self.values[layer], value], dim=-2)
        self.keys[layer], self.values[layer] = key, value
        return key, value


class PrunedLM:
    """The language model of a :class:`~vtkit.model.LlavaModel` run layer by layer, with the
    rows pruned before ``prune_layer``."""

    def __init__(self, model, prune_layer: int) -> None:
        self.model = model
        self.lm = model.language_model
        self.layers = model.decoder_layers
        self.prune_layer = prune_layer
        params = inspect.signature(self.layers[0].forward).parameters
        # transformers renamed the decoder layer's cache argument within 5.x.
        self.cache_argument = "cache" if "cache" in params else "past_key_values"
        self.implementation = getattr(self.lm.config, "_attn_implementation", "sdpa")
        if self.implementation not in ("sdpa", "eager"):
            # Other kernels read 2D masks or none: the pruned rows' masks would be ignored.
            raise UsageError(f"--scorer fastv/dart need sdpa or eager attention; this model "
                             f"uses {self.implementation}")

    def mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """A [B, 1, Lq, Lk] attention mask from ``allowed`` [B, Lq, Lk]: boolean for SDPA,
        additive (0 / dtype minimum) for eager attention."""
        if self.implementation == "sdpa":
            return allowed[:, None]
        bias = torch.zeros(allowed.shape, dtype=self.model.dtype, device=allowed.device)
        return bias.masked_fill(~allowed, torch.finfo(self.model.dtype).min)[:, None]

    def run(self, hidden: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor,
            layers: range, cache: LayerCache) -> tuple[torch.Tensor, torch.Tensor]:
        """``layers`` over ``hidden`` [B, L, D] at ``positions`` [B, L]: (output, the input of
        the last of them)."""
        embeddings = self.lm.rotary_emb(hidden, positions)
        mask = self.mask(allowed)
        last_input = hidden
        for index in layers:
            last_input = hidden
            out = self.layers[index](hidden, attention_mask=mask, position_ids=positions,
                                     position_embeddings=embeddings, use_cache=True,
                                     **{self.cache_argument: cache})
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden, last_input


def _causal(valid: torch.Tensor) -> torch.Tensor:
    """[B, L, L]: each query sees the valid keys at or before it (a padded query sees itself,
    so no softmax row is empty)."""
    length = valid.shape[1]
    lower = torch.ones(length, length, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(length, dtype=torch.bool, device=valid.device)
    return (lower[None] & valid[:, None, :]) | eye[None]


def _embed(model, items: list[PreparedItem], visual: list[torch.Tensor]):
    """The spliced, left-padded batch: embeddings, mask, positions, each row's image start
    (a list, so that per-row work needs no device sync)."""
    texts = embed_texts(model, [it.prefix for it in items] + [it.suffix for it in items])
    sequences = [splice_sequence(prefix, v, suffix) for prefix, v, suffix in
                 zip(texts[:len(items)], visual, texts[len(items):], strict=True)]
    embeds, mask, positions = left_pad(sequences)
    starts = [embeds.shape[1] - s.shape[0] + len(it.prefix)
              for s, it in zip(sequences, items, strict=True)]
    return embeds, mask.bool(), positions, starts


def _signal_rows(runner: PrunedLM, method: str, hidden_in: torch.Tensor, hidden_out: torch.Tensor,
                 positions: torch.Tensor, valid: torch.Tensor, starts: list[int],
                 count: int, cache: LayerCache, ks: list[int]) -> list[torch.Tensor]:
    """Each row's kept image indices (0..count-1, raster order) from layer K-1."""
    layer, device = runner.prune_layer - 1, valid.device
    keep = [torch.arange(count, device=device)] * len(ks)
    need = [j for j, k in enumerate(ks) if k < count]
    if not need:
        return keep
    rows = to_device(torch.tensor(need), device)
    keys = cache.keys[layer][rows]
    if method == "fastv":
        attention = runner.layers[layer].self_attn
        normed = runner.layers[layer].input_layernorm(hidden_in[rows, -1:])
        query = attention.q_proj(normed).view(len(need), 1, -1, attention.head_dim).transpose(1, 2)
        cos, sin = runner.lm.rotary_emb(normed, positions[rows, -1:])
        query = query * cos[:, None] + _rotate_half(query) * sin[:, None]
        weights = head_mean_attention(query[:, :, 0], keys, valid[rows], attention.scaling)
        for i, j in enumerate(need):
            keep[j] = fastv_select(weights[i, starts[j]:starts[j] + count], ks[j])
        return keep
    norms = keys.float().abs().sum(-1).sum(1)       # L1 over every head's key: [b, L]
    states = runner.lm.norm(hidden_out[rows])
    length = valid.shape[1]
    for i, j in enumerate(need):
        start, end = starts[j], starts[j] + count
        keep[j] = dart_select(norms[i, start:end], norms[i, end:length], states[i, start:end],
                              states[i, end:length], ks[j])
    return keep


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _prune(hidden: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
           starts: list[int], count: int, keep: list[torch.Tensor]):
    """Each row's text and kept image rows, left-padded again: (hidden, original positions,
    valid, index of each kept row in the pruned batch [B, k_max])."""
    length = valid.shape[1]
    kept = valid.clone()
    for j, (start, chosen) in enumerate(zip(starts, keep, strict=True)):
        kept[j, start:start + count] = False
        # index_fill_ takes True as a kernel argument; kept[j, start + chosen] = True would
        # copy it to the device from pageable memory, waiting for the GPU on every row.
        kept[j].index_fill_(0, start + chosen, True)
    lengths = kept.sum(-1)
    longest = int(lengths.max())
    order = torch.arange(length, device=kept.device)
    # Kept slots first in their original order, padded slots after, then rotated to the right.
    source = torch.sort(torch.where(kept, order, order + length), dim=-1).values % length
    shift = (longest - lengths)[:, None]
    slot = torch.arange(longest, device=kept.device)[None] - shift
    take = source.gather(1, slot.clamp(min=0))
    new_valid = slot >= 0
    new_hidden = gather_rows(hidden, take) * new_valid[..., None]
    new_positions = positions.gather(1, take).masked_fill(~new_valid, 0)
    # Where each kept image row landed: its rank among the row's kept slots, plus the padding.
    k_max = max(int(c.shape[0]) for c in keep)
    rank = kept.long().cumsum(-1) - 1
    rows = torch.stack([torch.nn.functional.pad(
        rank[j, starts[j] + c], (0, k_max - c.shape[0]), value=0)
        for j, c in enumerate(keep)]) + shift
    return new_hidden, new_positions, new_valid, rows


def _image_rows(keep: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, k_max] kept image indices (past a row's k, its last one repeated) and validity."""
    k_max = max(int(c.shape[0]) for c in keep)
    index = torch.stack([torch.cat([c, c[-1:].expand(k_max - c.shape[0])]) for c in keep])
    device = keep[0].device
    valid = torch.arange(k_max, device=device)[None] < to_device(
        torch.tensor([c.shape[0] for c in keep]), device)[:, None]
    return index, valid


@torch.inference_mode()
def prefill(model, items: list[PreparedItem], visual: list[torch.Tensor], ks: list[int],
            method: str, prune_layer: int, capture=None) -> Prefill:
    """One batch's prefill with ``method`` pruning each row to its k image tokens before layer
    ``prune_layer``. ``visual``: every row's full [N, D] projected rows. The returned state's
    ``past`` is a :class:`LayerCache`, ``positions`` the original positions of the pruned rows
    and ``mask`` a pair (valid keys before K, valid keys from K)."""
    runner = PrunedLM(model, prune_layer)
    count = int(visual[0].shape[0])
    embeds, valid, positions, starts = _embed(model, items, visual)
    cache = LayerCache(len(runner.layers))
    if capture is not None:     # all image rows until the kept ones are known
        capture.rows = to_device(torch.tensor(starts), model.device)[:, None] + torch.arange(
            count, device=model.device)[None]
        capture.valid, capture.captured = torch.ones_like(capture.rows, dtype=torch.bool), {}
    try:
        hidden, hidden_in = runner.run(embeds, positions, _causal(valid), range(prune_layer), cache)
        keep = _signal_rows(runner, method, hidden_in, hidden, positions, valid, starts, count,
                            cache, ks)
        pruned, new_positions, new_valid, rows = _prune(hidden, positions, valid, starts, count,
                                                        keep)
        captured = {}
        if capture is not None:
            index, kvalid = _image_rows(keep)
            captured = {slot: gather_rows(block, index).masked_fill(~kvalid[..., None], 0)
                        for slot, block in capture.captured.items()}
            capture.rows, capture.valid, capture.captured = rows, kvalid, {}
        hidden, _ = runner.run(pruned, new_positions, _causal(new_valid),
                               range(prune_layer, len(runner.layers)), cache)
        if capture is not None:
            captured.update(capture.captured)
    finally:
        if capture is not None:
            capture.rows = None
    logits = model.lm_head(runner.lm.norm(hidden[:, -1]))
    return Prefill(logits=logits, past=cache, mask=(valid, new_valid), positions=new_positions,
                   captured=captured, tokens=int(embeds.shape[0] * embeds.shape[1]))


@torch.inference_mode()
def decode(model, items: list[PreparedItem], state: Prefill, config, ks: list[int],
           prune_layer: int) -> list[str]:
    """Greedy or seeded sampled decoding from a pruned prefill's caches
    (:func:`vtkit.generate.decode_loop`): each new token attends to the full-length cache in
    the layers before ``prune_layer`` and to the pruned one from it on."""
    runner = PrunedLM(model, prune_layer)
    groups = (range(prune_layer), range(prune_layer, len(runner.layers)))
    # Each group's mask for every step is a view of one allocation (new positions attended).
    room = (len(items), config.max_new_tokens - 1)
    masks = [torch.cat([valid, valid.new_ones(room)], dim=1) for valid in state.mask]
    lengths = [valid.shape[1] for valid in state.mask]
    last = state.positions[:, -1:]

    def forward(token: torch.Tensor, step: int) -> torch.Tensor:
        hidden = model.embed_tokens(token[:, None])
        for group, mask, length in zip(groups, masks, lengths, strict=True):
            valid = mask[:, :length + step + 1]
            hidden, _ = runner.run(hidden, last + step + 1, valid[:, None, :], group, state.past)
        return model.lm_head(runner.lm.norm(hidden[:, -1]))

    return decode_loop(model, items, ks, config, state.logits, forward)


def run_batch(model, items: list[PreparedItem], visual: list[torch.Tensor], config, capture,
              ks: list[int], method: str, prune_layer: int,
              timer=None, on_captured=None) -> tuple[list[str], dict, int]:
    """Prefill and decode one batch with in-LLM pruning: (answers, captured rows, prefill
    tokens), as :func:`vtkit.generate.run_batch` returns them, ``on_captured`` called as it
    calls it."""
    from vtkit.progress import NullTimer

    timer = timer or NullTimer()
    with timer.phase("prefill"):
        state = prefill(model, items, visual, ks, method, prune_layer, capture)
    if on_captured is not None:
        on_captured(state.captured)
    with timer.phase("decode"):
        answers = decode(model, items, state, config, ks, prune_layer)
    return answers, state.captured, state.tokens
