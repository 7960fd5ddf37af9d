"""Packed batches: a batch's rows concatenated into one sequence, with no padding.

The sweep's rows have different lengths. Left-padded into one [B, L] batch, their attention
needs a padding mask, SDPA then runs its masked kernels, and every padded position runs the
whole layer for nothing. Packed, the rows are one [T, D] sequence (T the sum of their
lengths), and each row's queries attend to that row's keys alone: through flash attention's
variable-length kernel (``torch.nn.attention.varlen``) on CUDA in half precision, where the
sweep packs its rows by default, and one row at a time with the softmax written out elsewhere
(the CPU, float32, where the sweep packs them only when asked: ``--pack``).

:class:`PackedDecoder` runs the language model's decoder layers on such a sequence with the
model's own weights, in the order of operations of transformers' Llama layer (RMSNorm in
float32, the rotary embedding of the model's own ``rotary_emb``, SiLU MLP). The elementwise
work around the matrix products runs as functions of tensors, :func:`project` (norm,
projections, rotary) and :func:`finish` (residual, norm, MLP, residual), which on CUDA are
``torch.compile``'d once for every layer and length (dynamic shapes) for the prefill; a
decode step runs them eager. ``o_proj`` runs as the module, so forward hooks on it (the
sweep's capture) see its [T, D] input and output.

:class:`PackedCache` keeps each layer's keys and values in parts that are never copied into
one another (a shared prefix, the rows' prompts, the decoded tokens); attention runs over each
part and :func:`combine` merges the parts' outputs by their log-sum-exp, which is the softmax
over all of a row's keys at once.
"""

from __future__ import annotations

import functools
import inspect
import itertools
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vtkit.pruning import to_device

#: The submodules a decoder layer needs for the packed path (transformers' Llama layout).
_LAYER_PARTS = ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj",
                "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj", "mlp.down_proj")


def packing_problem(model) -> str | None:
    """Why :class:`PackedDecoder` cannot run ``model``'s language model, or None when it can:
    Llama decoder layers (RMSNorm, SiLU MLP, full attention of as many key as query heads)
    and a rotary embedding module."""
    language = model.language_model
    config = language.config
    if getattr(language, "rotary_emb", None) is None or getattr(language, "norm", None) is None:
        return f"{type(language).__name__} has no rotary_emb or norm"
    layer = model.decoder_layers[0]
    for part in _LAYER_PARTS:
        if _submodule(layer, part) is None:
            return f"{type(layer).__name__} has no {part}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r} (the packed layers run SiLU)"
    heads = config.num_attention_heads
    if (getattr(config, "num_key_value_heads", None) or heads) != heads:
        return "grouped-query attention"
    if getattr(config, "sliding_window", None) or getattr(config, "layer_types", None) and any(
            t != "full_attention" for t in config.layer_types):
        return "sliding-window attention"
    return None


def _submodule(module, dotted: str):
    for name in dotted.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm, in its order of operations (float32 statistics, then the input dtype)."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def project(x, norm, eps: float, wq, bq, wk, bk, wv, bv, cos, sin, head_dim: int):
    """A layer's attention inputs: ``x`` [T, D] normed, projected to queries, keys and values
    [T, H, d], and the rotary embedding (``cos``, ``sin`` [T, d]) applied to queries and keys."""
    h = rms_norm(x, norm, eps)
    shape = (x.shape[0], -1, head_dim)
    q = F.linear(h, wq, bq).view(shape)
    k = F.linear(h, wk, bk).view(shape)
    v = F.linear(h, wv, bv).view(shape)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v


def finish(x, attention, norm, eps: float, wg, bg, wu, bu, wd, bd):
    """The rest of a layer: the attention block's output [T, D] added to the residual, then the
    normed SiLU MLP added in turn."""
    x = x + attention
    h = rms_norm(x, norm, eps)
    return x + F.linear(F.silu(F.linear(h, wg, bg)) * F.linear(h, wu, bu), wd, bd)


@functools.cache
def compiled_pieces():
    """:func:`project`, :func:`finish` and :func:`combine`, compiled once for every layer and
    length (dynamic shapes)."""
    return tuple(torch.compile(f, dynamic=True) for f in (project, finish, combine))


@dataclass
class Part:
    """One part of every row's keys, for one layer: ``keys``/``values`` [Tk, H, d] hold the
    rows back to back; row i's queries ``cu_q[i]:cu_q[i+1]`` see its keys
    ``cu_k[i]:cu_k[i+1]``: all of them, or, ``causal``, when the queries are those keys' own
    tokens, each the keys up to its own. The host lists give the same bounds for the
    attention that loops over rows."""

    keys: torch.Tensor
    values: torch.Tensor
    cu_q: torch.Tensor          # [R + 1] int32, on the device
    cu_k: torch.Tensor          # [R + 1] int32, on the device
    bounds_q: list[int]         # cu_q on the host
    bounds_k: list[int]         # cu_k on the host
    causal: bool


def _bounds(lengths: list[int], device) -> tuple[torch.Tensor, list[int]]:
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return to_device(torch.tensor(bounds, dtype=torch.int32), device), bounds


class PackedCache:
    """Each decoder layer's keys and values of a batch's packed rows, in up to three parts
    that are never copied into one another:

    - ``prefix``: the tokens every row begins with, run once ([P, H, d]) or reused from an
      earlier batch (:meth:`PackedDecoder.prefix`), when shared;
    - ``rows``: each row's own prompt tokens, back to back ([T, H, d]);
    - ``decoded``: the tokens decoded since, one per row and step ([B, S, H, d]).

    A query attends to each part with flash's kernel, and the parts' outputs are combined by
    their log-sum-exp (:func:`combine`): the softmax over all of a row's keys at once.
    """

    def __init__(self, layers: int) -> None:
        self.prefix: list[tuple | None] = [None] * layers
        self.rows: list[tuple | None] = [None] * layers
        self.decoded: list[torch.Tensor | None] = [None] * layers   # keys and values stacked
        self.prefix_length = 0
        self.row_lengths: list[int] = []
        self.steps = 0


def _varlen():
    try:
        from torch.nn.attention.varlen import AuxRequest, varlen_attn
    except ImportError:
        return None
    return varlen_attn, AuxRequest


@functools.cache
def _causal_arguments() -> tuple[dict, dict] | None:
    """The keyword arguments of ``varlen_attn`` for causal and for full attention (they moved
    between torch versions), or None without a usable one (it must return the log-sum-exp)."""
    found = _varlen()
    if found is None:
        return None
    params = inspect.signature(found[0]).parameters
    if "return_aux" not in params:
        return None
    if "window_size" in params:
        return {"window_size": (-1, 0)}, {"window_size": (-1, -1)}
    if "is_causal" in params:
        return {"is_causal": True}, {"is_causal": False}
    return None


def flash_varlen_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether flash attention's variable-length kernel runs on ``device`` in ``dtype``: CUDA,
    half precision, a torch that has it."""
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
            and _causal_arguments() is not None)


def _flash_part(q: torch.Tensor, part: Part, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    varlen, aux = _varlen()
    causal, full = _causal_arguments()
    max_q = max(b - a for a, b in itertools.pairwise(part.bounds_q))
    max_k = max(b - a for a, b in itertools.pairwise(part.bounds_k))
    return varlen(q, part.keys, part.values, part.cu_q, part.cu_k, max_q, max_k, scale=scale,
                  return_aux=aux(lse=True), **(causal if part.causal else full))


def _looped_part(q: torch.Tensor, part: Part, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_flash_part` one row at a time, the softmax written out (float32 statistics)."""
    outs, lses = [], []
    rows = zip(itertools.pairwise(part.bounds_q), itertools.pairwise(part.bounds_k), strict=True)
    for (q0, q1), (k0, k1) in rows:
        qi = q[q0:q1].transpose(0, 1).float()                        # [H, n_q, d]
        scores = qi @ part.keys[k0:k1].transpose(0, 1).float().transpose(1, 2) * scale
        if part.causal:
            allowed = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~allowed, float("-inf"))
        lse = scores.logsumexp(-1)                                    # [H, n_q]
        probs = (scores - lse[..., None]).exp()
        outs.append((probs @ part.values[k0:k1].transpose(0, 1).float()).transpose(0, 1))
        lses.append(lse)
    return torch.cat(outs).to(q.dtype), torch.cat(lses, dim=1)


def combine(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> torch.Tensor:
    """Attention over several parts of the keys from each part's output [T, H, d] and
    log-sum-exp [H, T]: the outputs weighted by each part's share of the softmax mass."""
    weights = torch.stack(lses).softmax(dim=0)                        # [parts, H, T]
    out = outs[0].float() * weights[0].t()[..., None]
    for o, w in zip(outs[1:], weights[1:], strict=True):
        out = out + o.float() * w.t()[..., None]
    return out.to(outs[0].dtype)


def attend(q: torch.Tensor, parts: list[Part], scale: float, merge=combine) -> torch.Tensor:
    """Queries [T, H, d] over the keys of every part (each row its own), as one softmax."""
    run = _flash_part if flash_varlen_available(q.device, q.dtype) else _looped_part
    results = [run(q, part, scale) for part in parts]
    if len(results) == 1:
        return results[0][0]
    return merge([o for o, _ in results], [lse for _, lse in results])


#: How many prefixes a :class:`PackedDecoder` keeps for reuse (a 7B model's 35-token system
#: prompt is 18 MB of keys and values).
KEPT_PREFIXES = 4


class PackedDecoder:
    """The language model's decoder layers over packed rows (module docstring)."""

    def __init__(self, model, compiled: bool) -> None:
        language = model.language_model
        self.layers = list(model.decoder_layers)
        self.rotary = language.rotary_emb
        self.norm = language.norm
        attention = self.layers[0].self_attn
        self.head_dim = int(attention.head_dim)
        self.scale = float(attention.scaling)
        pieces = compiled_pieces() if compiled else (project, finish, combine)
        self.project, self.finish, self.combine = pieces
        self.compiled = compiled
        # Prefixes run before, by their token ids: each layer's (keys, values).
        self._prefixes: OrderedDict[tuple[int, ...], list[tuple]] = OrderedDict()

    def new_cache(self) -> PackedCache:
        return PackedCache(len(self.layers))

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Run a few tokens through every compiled call a batch makes (a prefix, two rows after
        it; two rows without one), so that a compiled decoder compiles here and not inside the
        first batch."""
        weight = self.layers[0].input_layernorm.weight
        x = torch.randn(9, weight.shape[0], device=weight.device, dtype=weight.dtype)
        for shared in (3, 0):
            cache = self.new_cache()
            if shared:
                self.prefix(x[:shared], cache)
            positions = torch.arange(6, device=x.device).remainder(3) + shared
            self.rows(x[shared:shared + 6], positions, [3, 3], cache)
        if weight.is_cuda:
            torch.cuda.synchronize(weight.device)

    def prefix(self, x: torch.Tensor, cache: PackedCache,
               key: tuple[int, ...] | None = None) -> None:
        """Run the tokens every row begins with, ``x`` [P, D], once: ``cache.prefix``.

        With ``key`` (those tokens' ids) the keys and values of a prefix run before under the
        same key are reused, the same tensors: every batch of a sweep begins with the
        conversation's system prompt, whose few tokens would otherwise run every layer once
        per batch with the GPU waiting on the host. The last :data:`KEPT_PREFIXES` are kept."""
        length = x.shape[0]
        cache.prefix_length = length
        if key is not None and key in self._prefixes:
            self._prefixes.move_to_end(key)
            cache.prefix = list(self._prefixes[key])
            return
        cu, bounds = _bounds([length], x.device)

        def attention(index, q, k, v):
            cache.prefix[index] = (k, v)
            return attend(q, [Part(k, v, cu, cu, bounds, bounds, True)], self.scale)

        self._layers(x, torch.arange(length, device=x.device), attention)
        if key is not None:
            self._prefixes[key] = list(cache.prefix)
            while len(self._prefixes) > KEPT_PREFIXES:
                self._prefixes.popitem(last=False)

    def rows(self, x: torch.Tensor, positions: torch.Tensor, lengths: list[int],
             cache: PackedCache, capture=None) -> torch.Tensor:
        """Run each row's own prompt tokens (``x`` [T, D], rows of ``lengths`` tokens at
        ``positions`` [T]) after the cache's prefix, if any: ``cache.rows``. Returns the last
        layer's output [T, D] before the final norm. With ``capture`` (an
        :class:`~vtkit.generate.ActivationCapture`) its ``hidden`` slots get each layer's
        output; its hooks on ``o_proj`` fire as in the model's own forward."""
        cu, bounds = _bounds(lengths, x.device)
        prefix = self._prefix_part(cache, bounds[-1], x.device)

        def attention(index, q, k, v):
            cache.rows[index] = (k, v)
            own = Part(k, v, cu, cu, bounds, bounds, True)
            return attend(q, [own] + prefix(index), self.scale, self.combine)

        out = self._layers(x, positions, attention, capture)
        cache.row_lengths = list(lengths)
        return out

    def step(self, x: torch.Tensor, positions: torch.Tensor, cache: PackedCache) -> torch.Tensor:
        """One decode step: a token per row, ``x`` [B, D] at ``positions`` [B], attending to
        the row's prefix, prompt and decoded tokens; its keys join ``cache.decoded``. Returns
        the last layer's output [B, D] before the final norm."""
        rows = len(cache.row_lengths)
        steps = cache.steps + 1
        one, single = _bounds([1] * rows, x.device)
        cu_rows, row_bounds = _bounds(cache.row_lengths, x.device)
        cu_done, done_bounds = _bounds([steps] * rows, x.device)
        prefix = self._prefix_part(cache, rows, x.device)

        def attention(index, q, k, v):
            new = torch.stack([k, v])[:, :, None]                       # [2, B, 1, H, d]
            past = cache.decoded[index]
            decoded = new if past is None else torch.cat([past, new], dim=2)
            cache.decoded[index] = decoded
            keys, values = (t.reshape(rows * steps, *k.shape[1:]) for t in decoded)
            row_k, row_v = cache.rows[index]
            return attend(q, [Part(row_k, row_v, one, cu_rows, single, row_bounds, False),
                              Part(keys, values, one, cu_done, single, done_bounds, False)]
                          + prefix(index), self.scale)

        # A step's few tokens leave the GPU waiting on the host, and a compiled call costs the
        # host more than the eager kernels it fuses (measured: docs/performance.md).
        out = self._layers(x, positions, attention, eager=True)
        cache.steps = steps
        return out

    @staticmethod
    def _prefix_part(cache: PackedCache, queries: int, device):
        """The prefix as a part every one of ``queries`` queries sees whole (a function of the
        layer), or no part without a shared prefix."""
        if not cache.prefix_length:
            return lambda index: []
        cu_q, bounds_q = _bounds([queries], device)
        cu_k, bounds_k = _bounds([cache.prefix_length], device)
        return lambda index: [Part(*cache.prefix[index], cu_q, cu_k, bounds_q, bounds_k, False)]

    def _layers(self, x: torch.Tensor, positions: torch.Tensor, attention, capture=None,
                eager: bool = False) -> torch.Tensor:
        run_project, run_finish = (project, finish) if eager else (self.project, self.finish)
        cos, sin = self.rotary(x[None], positions[None])
        cos, sin = cos[0], sin[0]
        for index, layer in enumerate(self.layers):
            a, m = layer.self_attn, layer.mlp
            q, k, v = run_project(x, layer.input_layernorm.weight,
                                   layer.input_layernorm.variance_epsilon, a.q_proj.weight,
                                   a.q_proj.bias, a.k_proj.weight, a.k_proj.bias,
                                   a.v_proj.weight, a.v_proj.bias, cos, sin, self.head_dim)
            heads = attention(index, q, k, v)
            x = run_finish(x, a.o_proj(heads.reshape(x.shape[0], -1)),
                            layer.post_attention_layernorm.weight,
                            layer.post_attention_layernorm.variance_epsilon,
                            m.gate_proj.weight, m.gate_proj.bias, m.up_proj.weight,
                            m.up_proj.bias, m.down_proj.weight, m.down_proj.bias)
            if capture is not None:
                capture.layer_output(index, x)
        return x
