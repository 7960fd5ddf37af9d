"""Packed batches (vtkit/packed.py): the rows concatenated, no padding.

The reference is the model's own transformers forward over left-padded rows (the path of
``--no-pack``) and each row alone: in float32 on the CPU the packed prefill gives the same
logits, captured rows and decoded answers. On a CUDA machine the flash variable-length kernel
is checked against SDPA one row at a time, and the compiled pieces against the eager ones.
"""

from __future__ import annotations

import pytest
import torch

from vtkit.data import select_questions
from vtkit.demo import DEMO_MODEL_DIR
from vtkit.generate import (
    ActivationCapture,
    batch_decoder,
    decode,
    decode_loop,
    prefill,
    prepare_items,
)
from vtkit.packed import (
    KEPT_PREFIXES,
    PackedDecoder,
    Part,
    attend,
    combine,
    finish,
    packing_problem,
    project,
)
from vtkit.sweep import SweepConfig

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def demo_model():
    from vtkit.model import load_model

    return load_model(str(DEMO_MODEL_DIR), dtype="float32", device="cpu")


def image_items(model, base_dir, count: int, config: SweepConfig):
    selection = select_questions(base_dir, num_samples=8 * count)
    items = [it for it in prepare_items(selection.questions, model.tokenizer, config)
             if it.question.has_image][:count]
    assert len(items) == count
    return items


@pytest.mark.parametrize("share_prefix", [False, True])
def test_packed_rows_give_what_padded_rows_and_each_row_alone_give(demo_model, demo_scienceqa,
                                                                  share_prefix):
    model = demo_model
    config = SweepConfig(model_path="", base_dir=demo_scienceqa, tokens=[576], max_new_tokens=4)
    items = image_items(model, demo_scienceqa, 4, config)
    ks = [5, 17, 17, 9]
    g = torch.Generator().manual_seed(1)
    visual = [torch.randn(k, model.hidden_size, generator=g) for k in ks]
    decoder = PackedDecoder(model, compiled=False)
    capture = ActivationCapture(model, ("attn_out", "attn_heads", "hidden"),
                                [0, model.num_layers - 1])
    try:
        packed = prefill(model, items, visual, capture, share_prefix, decoder)
        padded = prefill(model, items, visual, capture, share_prefix)
        alone = [prefill(model, [it], [v], capture, decoder=decoder)
                 for it, v in zip(items, visual, strict=True)]
    finally:
        capture.close()
    lengths = [it.text_length + k for it, k in zip(items, ks, strict=True)]
    assert packed.tokens == sum(lengths) < padded.tokens      # no padding
    assert packed.reused == padded.reused == (3 * len(items[0].prefix) if share_prefix else 0)
    assert packed.positions[:, 0].tolist() == [n - 1 for n in lengths]
    torch.testing.assert_close(packed.logits, padded.logits, atol=1e-4, rtol=1e-4)
    assert set(packed.captured) == set(padded.captured) and len(packed.captured) == 6
    for slot, rows in packed.captured.items():
        torch.testing.assert_close(rows, padded.captured[slot], atol=1e-4, rtol=1e-4,
                                   msg=str(slot))
        for j, k in enumerate(ks):
            assert not rows[j, k:].any()                         # zeros past the row's k
            torch.testing.assert_close(rows[j, :k], alone[j].captured[slot][0, :k], atol=1e-4,
                                       rtol=1e-4, msg=f"{slot} row {j}")
    for j in range(len(items)):
        torch.testing.assert_close(packed.logits[j], alone[j].logits[0], atol=1e-4, rtol=1e-4)
    # Several decode steps, greedy and sampled, append to every row as the padded cache does.
    for temperature in (0.0, 0.7):
        config.temperature = temperature
        again = prefill(model, items, visual, None, share_prefix, decoder)
        assert (decode(model, items, again, config, ks) ==
                decode(model, items, prefill(model, items, visual, None, share_prefix), config,
                       ks))


def test_a_prefix_runs_once_for_every_batch_that_begins_with_it(demo_model, demo_scienceqa,
                                                               monkeypatch):
    """The packed decoder keeps a shared prefix's keys and values: a later batch that begins
    with the same tokens reuses them, the same tensors, and gets the logits of a decoder that
    runs them anew. Other prefixes run, and only the last few are kept."""
    model = demo_model
    config = SweepConfig(model_path="", base_dir=demo_scienceqa, tokens=[576])
    items = image_items(model, demo_scienceqa, 4, config)
    g = torch.Generator().manual_seed(2)
    visual = [torch.randn(k, model.hidden_size, generator=g) for k in (5, 17, 17, 9)]
    decoder = PackedDecoder(model, compiled=False)
    runs, layers = [], decoder._layers

    def counted(x, *args, **kwargs):
        runs.append(x.shape[0])
        return layers(x, *args, **kwargs)

    monkeypatch.setattr(decoder, "_layers", counted)
    first = prefill(model, items[:2], visual[:2], None, True, decoder)
    second = prefill(model, items[2:], visual[2:], None, True, decoder)
    shared = first.past.prefix_length
    assert shared == second.past.prefix_length > 0
    assert runs == [shared, first.tokens - 2 * shared, second.tokens - 2 * shared]
    for (k1, v1), (k2, v2) in zip(first.past.prefix, second.past.prefix, strict=True):
        assert k1 is k2 and v1 is v2
    fresh = prefill(model, items[2:], visual[2:], None, True, PackedDecoder(model, False))
    assert torch.equal(second.logits, fresh.logits)
    x = torch.randn(3, model.hidden_size, generator=g)
    for key in range(KEPT_PREFIXES + 1):
        decoder.prefix(x, decoder.new_cache(), key=(key,))
    assert runs[3:] == [3] * (KEPT_PREFIXES + 1)
    assert list(decoder._prefixes) == [(key,) for key in range(1, KEPT_PREFIXES + 1)]


def test_decoding_asks_whether_every_row_has_ended_from_the_second_token_on(demo_model,
                                                                           demo_scienceqa):
    """After the first token the loop runs a step without asking whether every row has ended
    (asking makes the host wait for the prefill): rows that end at once still answer nothing.
    From the second token on a batch whose rows have all ended stops."""
    model = demo_model
    config = SweepConfig(model_path="", base_dir=demo_scienceqa, tokens=[576], max_new_tokens=6)
    items = image_items(model, demo_scienceqa, 2, config)
    vocab = model.lm_head.weight.shape[0]
    eos = model.eos_token_id
    letter = model.tokenizer.encode("A", add_special_tokens=False)[-1]

    def logits(*tokens):
        out = torch.full((len(tokens), vocab), -1e4)
        out[range(len(tokens)), list(tokens)] = 0.0
        return out

    def run(first, then):
        steps = []

        def forward(token, step):
            steps.append(step)
            return logits(*then)

        return decode_loop(model, items, [576, 576], config, logits(*first), forward), steps

    assert run((eos, eos), (letter, letter)) == (["", ""], [0])
    assert run((letter, letter), (eos, eos)) == (["A", "A"], [0])
    answers, steps = run((eos, letter), (letter, letter))
    assert answers == ["", model.tokenizer.decode([letter] * 6)] and steps == [0, 1, 2, 3, 4]


def reference_attention(q, keys, values, row_queries, scale):
    """Each row alone over its whole key list (``keys``/``values``: one [n_k, H, d] per row),
    its queries the last of its keys, by the softmax written out in float64."""
    out, at = [], 0
    for n_q, k, v in zip(row_queries, keys, values, strict=True):
        qi, ki, vi = (t.double().transpose(0, 1) for t in (q[at:at + n_q], k, v))
        scores = qi @ ki.transpose(1, 2) * scale
        n_k = k.shape[0]
        allowed = torch.arange(n_k)[None, :] <= torch.arange(n_q)[:, None] + (n_k - n_q)
        scores = scores.masked_fill(~allowed.to(q.device), float("-inf"))
        out.append((scores.softmax(-1) @ vi).transpose(0, 1))
        at += n_q
    return torch.cat(out)


def part(keys, values, queries: list[int], causal: bool, device) -> Part:
    """Rows' keys back to back as one part, with its bounds."""
    bounds_q, bounds_k = [0], [0]
    for n, k in zip(queries, keys, strict=True):
        bounds_q.append(bounds_q[-1] + n)
        bounds_k.append(bounds_k[-1] + k.shape[0])
    return Part(torch.cat(keys), torch.cat(values),
                torch.tensor(bounds_q, dtype=torch.int32, device=device),
                torch.tensor(bounds_k, dtype=torch.int32, device=device), bounds_q, bounds_k,
                causal)


def attention_case(case: str, device, dtype):
    """Queries, parts and the reference of one of the batch's kinds of attention."""
    g = torch.Generator().manual_seed(0)

    def rand(n):
        return torch.randn(n, 4, 32, generator=g).to(device, dtype)

    own = [7, 130, 1] if device == "cuda" else [5, 12, 1]
    prefix_k, prefix_v = rand(9), rand(9)
    own_k, own_v = [rand(n) for n in own], [rand(n) for n in own]
    if case == "prefill":
        q = rand(sum(own))
        return q, [part(own_k, own_v, own, True, device)], own_k, own_v, own
    if case == "after a prefix":
        q = rand(sum(own))
        parts = [part(own_k, own_v, own, True, device),
                 part([prefix_k], [prefix_v], [sum(own)], False, device)]
        return (q, parts, [torch.cat([prefix_k, k]) for k in own_k],
                [torch.cat([prefix_v, v]) for v in own_v], own)
    # A decode step: one query per row over prefix, prompt and 2 decoded tokens.
    q = rand(len(own))
    done_k, done_v = [rand(2) for _ in own], [rand(2) for _ in own]
    parts = [part(own_k, own_v, [1] * len(own), False, device),
             part(done_k, done_v, [1] * len(own), False, device),
             part([prefix_k], [prefix_v], [len(own)], False, device)]
    return (q, parts, [torch.cat([prefix_k, k, d]) for k, d in zip(own_k, done_k, strict=True)],
            [torch.cat([prefix_v, v, d]) for v, d in zip(own_v, done_v, strict=True)],
            [1] * len(own))


CASES = ["prefill", "after a prefix", "a decode step"]


@pytest.mark.parametrize("case", CASES)
def test_attention_over_parts_is_each_row_alone_over_all_its_keys(case):
    q, parts, keys, values, queries = attention_case(case, "cpu", torch.float32)
    torch.testing.assert_close(attend(q, parts, 0.3),
                               reference_attention(q, keys, values, queries, 0.3).float(),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not CUDA, reason="flash attention's variable-length kernel needs CUDA")
@pytest.mark.parametrize("case", CASES)
def test_the_flash_kernel_over_parts_is_each_row_alone_over_all_its_keys(case):
    q, parts, keys, values, queries = attention_case(case, "cuda", torch.bfloat16)
    torch.testing.assert_close(attend(q, parts, 0.3).float(),
                               reference_attention(q, keys, values, queries, 0.3).float(),
                               atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not CUDA, reason="the compiled pieces are compiled on CUDA")
def test_the_compiled_pieces_equal_the_eager_ones():
    g = torch.Generator().manual_seed(0)
    dim, hidden, head_dim, tokens = 256, 512, 64, 300

    def w(*shape):
        return (torch.randn(*shape, generator=g) * 0.05).cuda()

    from vtkit.packed import compiled_pieces

    compiled_project, compiled_finish, compiled_combine = compiled_pieces()
    for n in (tokens, tokens - 37, 1):      # one compilation for every length
        x = w(n, dim) * 20
        cos, sin = w(n, head_dim).cos(), w(n, head_dim).sin()
        before = (w(dim) + 1, 1e-5, w(dim, dim), None, w(dim, dim), None, w(dim, dim), None)
        after = (w(dim) + 1, 1e-5, w(hidden, dim), None, w(hidden, dim), None, w(dim, hidden),
                 None)
        for a, b in zip(compiled_project(x, *before, cos, sin, head_dim),
                        project(x, *before, cos, sin, head_dim), strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(compiled_finish(x, x, *after), finish(x, x, *after),
                                   atol=1e-4, rtol=1e-4)
        outs, lses = [w(n, 4, 16) for _ in range(3)], [w(4, n) * 50 for _ in range(3)]
        for count in (2, 3):
            torch.testing.assert_close(compiled_combine(outs[:count], lses[:count]),
                                       combine(outs[:count], lses[:count]))


@pytest.mark.skipif(not CUDA, reason="the packed path's CUDA kernels")
def test_on_cuda_packed_rows_answer_as_padded_rows(demo_scienceqa):
    from vtkit.model import load_model

    model = load_model(str(DEMO_MODEL_DIR), dtype="bfloat16", device="cuda")
    config = SweepConfig(model_path="", base_dir=demo_scienceqa, tokens=[576], max_new_tokens=3)
    items = image_items(model, demo_scienceqa, 4, config)
    ks = [5, 17, 17, 9]
    g = torch.Generator().manual_seed(1)
    visual = [torch.randn(k, model.hidden_size, generator=g).cuda().bfloat16() for k in ks]
    decoder = batch_decoder(model, config)
    assert decoder is not None and decoder.compiled
    decoder.warm_up()
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    packed = prefill(model, items, visual, None, True, decoder)
    answers = decode(model, items, packed, config, ks)
    alone = prefill(model, items[:2], visual[:2], None, False, decoder)
    decode(model, items[:2], alone, config, ks[:2])
    assert counters["stats"]["unique_graphs"] == graphs       # the warm-up compiled them all
    padded = prefill(model, items, visual, None, True)
    torch.testing.assert_close(packed.logits.float(), padded.logits.float(), atol=5e-2,
                               rtol=5e-2)
    assert answers == decode(model, items, padded, config, ks)


def test_which_language_models_run_packed(demo_model, demo_scienceqa):
    assert packing_problem(demo_model) is None
    config = SweepConfig(model_path="", base_dir=demo_scienceqa, tokens=[576])
    assert config.pack is None and batch_decoder(demo_model, config) is None   # CPU: padded
    config.pack = True
    decoder = batch_decoder(demo_model, config)
    assert isinstance(decoder, PackedDecoder) and not decoder.compiled    # CPU: eager
    config.pack = False
    assert batch_decoder(demo_model, config) is None
    text = demo_model.language_model.config
    heads = text.num_key_value_heads
    try:
        text.num_key_value_heads = heads // 2
        assert packing_problem(demo_model) == "grouped-query attention"
        config.pack = True
        assert batch_decoder(demo_model, config) is None
    finally:
        text.num_key_value_heads = heads


def test_the_sweep_answers_alike_packed_and_padded(demo_scienceqa, tmp_path):
    """``vtkit sweep --pack`` and ``--no-pack``: the same answers and, in float32, the same
    spectra."""
    import json
    import shutil

    import h5py
    import numpy as np
    from typer.testing import CliRunner

    from vtkit.cli.main import app

    def vtkit(command, out, *extra):
        result = CliRunner().invoke(app, [
            command, "--model-path", str(DEMO_MODEL_DIR), "--base-dir", str(demo_scienceqa),
            "--output-dir", str(out), "--num-samples", "6", "--device", "cpu", *extra])
        assert result.exit_code == 0, result.output

    def sweep(out, *extra):
        out.mkdir()
        shutil.copy(tmp_path / "features.h5", out / "features.h5")
        vtkit("sweep", out, "--tokens", "576,64", "--max-new-tokens", "3", *extra)
        return h5py.File(out / "sweep.h5", "r")

    vtkit("extract", tmp_path)
    with (sweep(tmp_path / "packed", "--pack") as packed,
          sweep(tmp_path / "padded", "--no-pack") as padded):
        assert [json.loads(f.attrs["config"])["pack"] for f in (packed, padded)] == [True, False]
        assert (packed["answers"][:] == padded["answers"][:]).all()
        names = []
        packed["spectra"].visititems(
            lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        assert names
        for name in names:
            reference = padded["spectra"][name][:]
            np.testing.assert_allclose(packed["spectra"][name][:], reference, rtol=1e-4,
                                       atol=1e-4 * np.abs(reference).max())
