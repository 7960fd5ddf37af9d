"""The decode cache with room: same answers and logits as transformers' DynamicCache, and the
prefill's keys and values are written once, not copied at every decode step."""

from __future__ import annotations

import pytest
import torch

from vtkit import kvcache
from vtkit.data import select_questions
from vtkit.generate import decode, prefill, prepare_items
from vtkit.sweep import SweepConfig

STEPS = 20       # longer than the room (4), so the buffers move twice (room 4, 8, 16)
KS = [30, 5, 12, 20]


@pytest.fixture(scope="module")
def model(tiny_models):
    from vtkit.model import load_model

    return load_model(str(tiny_models["hf"]), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def batch(model, demo_scienceqa):
    """Four image questions of different lengths (so the batch is left-padded) and their
    visual rows."""
    selection = select_questions(demo_scienceqa, num_samples=12)
    config = SweepConfig(model_path="", base_dir=demo_scienceqa, tokens=KS)
    items = [it for it in prepare_items(selection.questions, model.tokenizer, config)
             if it.question.has_image][:len(KS)]
    generator = torch.Generator().manual_seed(0)
    visual = [torch.randn(k, model.hidden_size, generator=generator) for k in KS]
    return items, visual


def _decode_recording(model, items, visual, config, monkeypatch, cache_factory):
    """(answers, the logits of every step) of a decode whose cache ``cache_factory`` makes.
    Random tiny weights never emit EOS, so every row runs max_new_tokens steps."""
    monkeypatch.setattr(type(model), "new_cache", lambda self: cache_factory())
    logits = []
    handle = model.lm_head.register_forward_hook(lambda m, a, out: logits.append(out.clone()))
    try:
        answers = decode(model, items, prefill(model, items, visual), config, KS)
    finally:
        handle.remove()
        monkeypatch.undo()
    return answers, logits


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_answers_and_logits_equal_the_dynamic_cache(model, batch, monkeypatch, temperature):
    from transformers import DynamicCache

    items, visual = batch
    config = SweepConfig(model_path="", base_dir=".", tokens=KS, max_new_tokens=STEPS,
                         temperature=temperature, seed=3)
    roomy = _decode_recording(model, items, visual, config, monkeypatch,
                              lambda: kvcache.RoomyCache(model.num_layers, headroom=4))
    dynamic = _decode_recording(model, items, visual, config, monkeypatch, DynamicCache)
    assert roomy[0] == dynamic[0]
    assert all(len(answer) > 0 for answer in roomy[0])
    assert len(roomy[1]) == len(dynamic[1]) == STEPS
    for ours, theirs in zip(roomy[1], dynamic[1], strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_decode_steps_write_into_the_room(model, batch):
    items, visual = batch
    state = prefill(model, items, visual)
    layer = state.past.layers[0]
    length = state.mask.shape[1]
    assert isinstance(state.past, kvcache.RoomyCache)
    assert layer.key_buffer.shape[-2] == length + kvcache.DECODE_HEADROOM
    prefilled = layer.keys.clone()
    buffer = layer.key_buffer.data_ptr()
    config = SweepConfig(model_path="", base_dir=".", tokens=KS,
                         max_new_tokens=kvcache.DECODE_HEADROOM)
    decode(model, items, state, config, KS)
    # max_new_tokens - 1 forwards fill the room without moving the buffer or the prefill.
    assert layer.key_buffer.data_ptr() == buffer
    assert layer.get_seq_length() == length + kvcache.DECODE_HEADROOM - 1
    assert torch.equal(layer.keys[:, :, :length], prefilled)


def test_the_room_doubles_when_an_answer_outgrows_it():
    layer = kvcache.RoomyLayer(headroom=2)
    states = torch.arange(2 * 3 * 5 * 4, dtype=torch.float32).reshape(2, 3, 5, 4)
    keys, _ = layer.update(states, -states)
    assert keys is states and layer.key_buffer.shape[-2] == 7
    sizes = []
    for step in range(8):
        new = torch.full((2, 3, 1, 4), float(step))
        keys, values = layer.update(new, -new)
        sizes.append(layer.key_buffer.shape[-2])
    # 5 prefilled + 2 room; position 8 moves it (room 4), position 13 again (room 8).
    assert sizes == [7, 7, 12, 12, 12, 12, 12, 21]
    expected = torch.cat([states] + [torch.full((2, 3, 1, 4), float(s)) for s in range(8)], -2)
    assert torch.equal(keys, expected) and torch.equal(values, -expected)
    assert layer.get_seq_length() == 13 and layer.get_mask_sizes(1) == (14, 0)
    layer.reset()
    assert layer.get_seq_length() == 0
    keys, _ = layer.update(states[:, :, :2], states[:, :, :2])
    assert layer.get_seq_length() == 2 and layer.key_buffer.shape[-2] == 2 + 2
