"""The FLOPs formula of vtkit.flops against torch's own FLOP counter on a tiny Llama."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vtkit.flops import (
    LLAVA_7B,
    LMShape,
    attention_flops,
    attention_pairs,
    decode_flops,
    equivalent_tokens,
    linear_flops_per_token,
    prefill_flops,
)


def _tiny_llama(kv_heads: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=kv_heads,
                         max_position_embeddings=256)
    config._attn_implementation = "eager"
    return LlamaForCausalLM(config).eval(), config


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_linear_and_attention_terms_match_torch_flop_counter(kv_heads):
    model, config = _tiny_llama(kv_heads)
    shape = LMShape.from_config(config)
    length = 37
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 96, (1, length)), logits_to_keep=1)
    # Eager attention multiplies the full L x L score matrix (the mask comes after), so the
    # counter sees L * L pairs where the causal formula counts L (L + 1) / 2.
    expected = (shape.layers * (length * linear_flops_per_token(shape)
                                + attention_flops(shape, length * length))
                + 2 * shape.hidden * shape.vocab)
    assert counter.get_total_flops() == expected


def test_prefill_counts_causal_pairs_and_one_lm_head_row():
    shape = LMShape(hidden=8, intermediate=16, layers=2, heads=2, kv_heads=2, head_dim=4, vocab=10)
    per_token = 2 * 8 * 6 * 4 + 2 * 2 * 4 * 8 + 6 * 8 * 16
    assert linear_flops_per_token(shape) == per_token
    length = 5
    pairs = 1 + 2 + 3 + 4 + 5
    assert attention_pairs(length) == pairs
    assert prefill_flops(shape, 3, 2) == 2 * (length * per_token + 4 * 2 * 4 * pairs) + 2 * 8 * 10


def test_in_llm_pruning_counts_layers_before_and_after():
    shape = LLAVA_7B
    full = prefill_flops(shape, 100, 576)
    assert prefill_flops(shape, 100, 576, prune_layer=2, visual_before=576) == full
    assert prefill_flops(shape, 100, 144, prune_layer=0, visual_before=576) == \
        prefill_flops(shape, 100, 144)
    pruned = prefill_flops(shape, 100, 144, prune_layer=2, visual_before=576)
    per_layer_full = (full - 2 * shape.hidden * shape.vocab) / shape.layers
    per_layer_pruned = (prefill_flops(shape, 100, 144) - 2 * shape.hidden * shape.vocab) / 32
    assert pruned == pytest.approx(2 * per_layer_full + 30 * per_layer_pruned
                                   + 2 * shape.hidden * shape.vocab)
    with pytest.raises(ValueError, match="visual_before"):
        prefill_flops(shape, 100, 144, prune_layer=2)
    with pytest.raises(ValueError, match="prune_layer 33"):
        prefill_flops(shape, 100, 144, prune_layer=33, visual_before=576)


def test_seven_b_per_token_cost_is_about_two_flops_per_parameter():
    # 6.74 B parameters -> 13.5 GFLOP per token; the layers alone are 6.48 B of them.
    per_token = shape_layers = LLAVA_7B.layers * linear_flops_per_token(LLAVA_7B)
    assert per_token == shape_layers == 12_952_010_752
    assert 2 * 6.48e9 == pytest.approx(per_token, rel=1e-3)


def test_decode_steps_attend_to_the_growing_context():
    shape = LMShape(hidden=8, intermediate=16, layers=2, heads=2, kv_heads=2, head_dim=4, vocab=10)
    one = shape.layers * linear_flops_per_token(shape) + 2 * 8 * 10
    assert decode_flops(shape, 10, 0) == 0
    assert decode_flops(shape, 10, 2) == 2 * one + 2 * attention_flops(shape, 11 + 12)


def test_equivalent_tokens_is_the_layer_average():
    assert equivalent_tokens(144, 32, 2, 576) == 171.0
    assert equivalent_tokens(64, 32) == 64.0
