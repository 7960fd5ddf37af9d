"""FLOPs of one question through the language model, by one formula (docs/performance.md).

Counted as 2 FLOPs per multiply-add, for a Llama-type decoder (what LLaVA-1.5 uses):

- per token and layer, the projections q, k, v, o (``2 d (H + 2 H_kv) h + 2 H h d``) and the
  MLP with its three matrices (``3 x 2 d f``);
- per layer, the causal attention scores and values: a query at position i attends to i + 1
  keys, ``2 x 2 H h`` FLOPs per (query, key) pair;
- the LM head for the last position only (``2 d V``): one next-token distribution per prefill.

Embedding lookups, norms, rotary and softmax are left out (a fraction of a percent at 7B).
In-LLM pruning (``prune_layer`` K) counts layers before K at the full length and layers from K
on at the pruned one, whose queries attend only to the kept keys.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LMShape:
    """The sizes of a decoder-only language model that its FLOPs depend on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> LMShape:
        """From a transformers text config (``LlamaConfig``) or a dict of its fields."""
        get = config.get if isinstance(config, dict) else lambda name, default=None: getattr(
            config, name, default)
        heads = int(get("num_attention_heads"))
        hidden = int(get("hidden_size"))
        return cls(hidden=hidden, intermediate=int(get("intermediate_size")),
                   layers=int(get("num_hidden_layers")), heads=heads,
                   kv_heads=int(get("num_key_value_heads", None) or heads),
                   head_dim=int(get("head_dim", None) or hidden // heads),
                   vocab=int(get("vocab_size")))


#: LLaVA-1.5-7B's language model (Vicuna-7B v1.5; llava-hf pads the vocabulary to 32064).
LLAVA_7B = LMShape(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32,
                   head_dim=128, vocab=32000)


def linear_flops_per_token(shape: LMShape) -> int:
    """Projections and MLP of one token through one decoder layer."""
    d, h = shape.hidden, shape.head_dim
    qkv = 2 * d * (shape.heads + 2 * shape.kv_heads) * h
    out = 2 * shape.heads * h * d
    mlp = 3 * 2 * d * shape.intermediate
    return qkv + out + mlp


def attention_pairs(length: int, context: int = 0) -> int:
    """(query, key) pairs of ``length`` causal queries after ``context`` cached keys."""
    return length * context + length * (length + 1) // 2


def attention_flops(shape: LMShape, pairs: int) -> int:
    """Scores (q . k) and values (p v) over ``pairs`` (query, key) pairs in one layer."""
    return 2 * 2 * shape.heads * shape.head_dim * pairs


def prefill_flops(shape: LMShape, text_tokens: int, visual_tokens: int, *,
                  prune_layer: int | None = None, visual_before: int | None = None) -> int:
    """FLOPs of one question's prefill: ``text_tokens`` + ``visual_tokens`` positions through
    every layer, and the LM head for the last one.

    With ``prune_layer`` K, layers before K see ``visual_before`` visual tokens (576 for
    LLaVA-1.5) and layers from K on see ``visual_tokens``.
    """
    if prune_layer is None:
        prune_layer, visual_before = 0, visual_tokens
    elif visual_before is None:
        raise ValueError("prune_layer needs visual_before (the visual tokens before it)")
    if not 0 <= prune_layer <= shape.layers:
        raise ValueError(f"prune_layer {prune_layer} is not in 0..{shape.layers}")
    total = 0
    for layers, visual in ((prune_layer, visual_before), (shape.layers - prune_layer,
                                                          visual_tokens)):
        length = text_tokens + visual
        total += layers * (length * linear_flops_per_token(shape)
                           + attention_flops(shape, attention_pairs(length)))
    return total + 2 * shape.hidden * shape.vocab


def decode_flops(shape: LMShape, context: int, steps: int) -> int:
    """FLOPs of ``steps`` decode forwards after a prefill of ``context`` positions (one token
    each, attending to everything before it), LM head included."""
    per_step = shape.layers * linear_flops_per_token(shape) + 2 * shape.hidden * shape.vocab
    pairs = sum(context + t + 1 for t in range(steps))
    return steps * per_step + shape.layers * attention_flops(shape, pairs)


def equivalent_tokens(visual_tokens: int, layers: int, prune_layer: int | None = None,
                      visual_before: int | None = None) -> float:
    """The layer-averaged visual token count papers print for in-LLM pruning:
    ``(K x visual_before + (layers - K) x visual_tokens) / layers``; ``visual_tokens`` when
    nothing is pruned inside the model."""
    if prune_layer is None:
        return float(visual_tokens)
    return (prune_layer * visual_before + (layers - prune_layer) * visual_tokens) / layers
