"""fastv and dart: pruning inside the language model at --prune-layer (vtkit/inllm.py).

The selection rules are checked on hand-built inputs whose answers are worked out from the
official rules. The whole forward is checked against an independent reference: the demo model
with eager attention, full-length rows and FastV's own "mask" formulation (from layer K on no
query sees the dropped image keys; every token keeps its position), the attention weights the
eager kernel returns at layer K-1 (FastV) or layer K-1's keys and outputs read by hooks (DART),
and a literal transcription of the official selection loops.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import h5py
import pytest
import torch
from typer.testing import CliRunner

from vtkit import cache, inllm
from vtkit.cli.main import app
from vtkit.data import select_questions
from vtkit.demo import DEMO_MODEL_DIR
from vtkit.generate import ActivationCapture, prepare_items
from vtkit.generate import run_batch as run_unpruned
from vtkit.rank import sweep_meta
from vtkit.sweep import SweepConfig, sweep_inputs

K = 2


def vtkit(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


# ---- the rules on hand-built inputs ----------------------------------------------------------

def test_fastv_keeps_the_top_k_by_attention_in_raster_order():
    attention = torch.tensor([0.10, 0.50, 0.05, 0.30, 0.05])
    assert inllm.fastv_select(attention, 2).tolist() == [1, 3]
    assert inllm.fastv_select(attention, 3).tolist() == [0, 1, 3]
    # A tie at the cut goes to the lower index.
    assert inllm.fastv_select(attention, 4).tolist() == [0, 1, 2, 3]


def test_head_mean_attention_is_the_post_softmax_mean_over_heads():
    # Head 0 scores the three keys 0, ln 2, 0 -> 1/4, 1/2, 1/4; head 1 scores ln 3, 0, 0 ->
    # 3/5, 1/5, 1/5. Their mean: 0.425, 0.35, 0.225.
    query = torch.ones(1, 2, 1)
    keys = torch.tensor([[0.0, math.log(2), 0.0], [math.log(3), 0.0, 0.0]])[None, :, :, None]
    valid = torch.ones(1, 3, dtype=torch.bool)
    weights = inllm.head_mean_attention(query, keys, valid, scaling=1.0)
    torch.testing.assert_close(weights, torch.tensor([[0.425, 0.35, 0.225]]))
    # Without the last key: 1/3, 2/3 and 3/4, 1/4.
    valid[0, 2] = False
    weights = inllm.head_mean_attention(query, keys, valid, scaling=1.0)
    torch.testing.assert_close(weights, torch.tensor([[(1 / 3 + 3 / 4) / 2, (2 / 3 + 1 / 4) / 2,
                                                       0.0]]))


def _unit(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


# Six image tokens at these angles, key norms 5 1 2 9 3 4 (pivot: token 3); two text tokens,
# key norms 1 7 (pivot: text token 1, at 90 degrees).
IMAGE_STATES = torch.tensor([_unit(a) for a in (0, 90, 180, 0, 45, 135)])
IMAGE_KEYS = torch.tensor([5.0, 1.0, 2.0, 9.0, 3.0, 4.0])
TEXT_STATES = torch.tensor([_unit(a) for a in (30, 90)])
TEXT_KEYS = torch.tensor([1.0, 7.0])


@pytest.mark.parametrize(("k", "expected"), [
    # 2 picks, one per pivot: token 3 (0 deg) takes the least similar, token 2 (180 deg); the
    # text pivot (90 deg) then takes token 0 (cosine 0; tokens 4 and 5 are at 0.71).
    (3, [0, 2, 3]),
    # 3 picks: the image pivot takes 2 (tokens 2, 5), the text pivot 1 (token 0).
    (4, [0, 2, 3, 5]),
    (1, [3]),          # the image pivot alone
    (6, [0, 1, 2, 3, 4, 5]),
])
def test_dart_pivots_and_their_least_similar_tokens(k, expected):
    kept = inllm.dart_select(IMAGE_KEYS, TEXT_KEYS, IMAGE_STATES, TEXT_STATES, k,
                             image_pivots=1, text_pivots=1)
    assert kept.tolist() == expected


def test_dart_at_the_official_budget_gives_each_of_the_8_pivots_16_tokens():
    # The official LLaVA-1.5 setting (max_num_trunction 128): 4 image pivots + 8 x 16 = 132.
    generator = torch.Generator().manual_seed(0)
    image_keys = torch.rand(576, generator=generator)
    states = torch.randn(576, 16, generator=generator)
    kept = inllm.dart_select(image_keys, torch.rand(40, generator=generator), states,
                             torch.randn(40, 16, generator=generator), 132)
    assert kept.shape == (132,) and kept.unique().shape == (132,)
    assert set(image_keys.topk(4).indices.tolist()) <= set(kept.tolist())


# ---- the forward against an independent reference --------------------------------------------

@pytest.fixture(scope="module")
def models():
    from vtkit.model import load_model

    sdpa = load_model(str(DEMO_MODEL_DIR), dtype="float32", device="cpu")
    eager = load_model(str(DEMO_MODEL_DIR), dtype="float32", device="cpu")
    eager.hf.set_attn_implementation("eager")
    return sdpa, eager


@pytest.fixture(scope="module")
def items(demo_scienceqa, models):
    selection = select_questions(demo_scienceqa, num_samples=12)
    config = SweepConfig(model_path=str(DEMO_MODEL_DIR), base_dir=demo_scienceqa, tokens=[64])
    prepared = prepare_items(selection.questions, models[0].tokenizer, config)
    return [it for it in prepared if it.question.has_image][:3]


def visual_rows(model, count: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(model.num_patches, model.hidden_size, generator=generator)
            for _ in range(count)]


def config_for(base_dir: Path, max_new_tokens: int = 4, temperature: float = 0.0) -> SweepConfig:
    return SweepConfig(model_path=str(DEMO_MODEL_DIR), base_dir=base_dir, tokens=[64],
                       max_new_tokens=max_new_tokens, temperature=temperature)


def _reference_keep(method: str, k: int, weights, keys, states, start: int, count: int):
    """The official selection, transcribed literally (batch 1, full-length sequence)."""
    if method == "fastv":
        row = weights.mean(dim=1)[0][-1][start:start + count]
        return sorted((row.topk(k).indices + start).tolist())
    flat = keys.permute(0, 2, 1, 3).reshape(keys.shape[0], keys.shape[2], -1)[0]
    image_norm = torch.norm(flat[start:start + count], p=1, dim=-1)
    text_norm = torch.norm(flat[start + count:], p=1, dim=-1)
    image_pivots = (image_norm.topk(4).indices + start).tolist()
    text_pivots = (text_norm.topk(4).indices + start + count).tolist()
    per_pivot = (k - 4) // 8      # tests use k = 4 + 8m: the official equal shares
    kept = set(image_pivots)
    valid = [i for i in range(start, start + count) if i not in kept]
    for pivot in image_pivots + text_pivots:
        similarity = -torch.nn.functional.cosine_similarity(states[0][pivot], states[0][valid],
                                                            dim=-1)
        chosen = [valid[i] for i in similarity.topk(per_pivot).indices.tolist()]
        kept.update(chosen)
        valid = [i for i in valid if i not in chosen]
    return sorted(kept)


def reference_tokens(model, item, visual: torch.Tensor, k: int, method: str,
                     steps: int) -> tuple[torch.Tensor, list[int]]:
    """First-step logits and greedy tokens of one row, FastV's mask formulation, no KV cache:
    the whole (growing) sequence is run again for every new token."""
    lm, layers = model.language_model, model.decoder_layers
    embed = model.embed_tokens
    start, count = len(item.prefix), visual.shape[0]
    seen: dict = {}
    hooks = [layers[K - 1].self_attn.register_forward_hook(
                 lambda m, a, out: seen.__setitem__("weights", out[1])),
             layers[K - 1].self_attn.k_proj.register_forward_hook(
                 lambda m, a, out: seen.__setitem__("k", out)),
             layers[K - 1].register_forward_hook(
                 lambda m, a, out: seen.__setitem__("out", out[0] if isinstance(out, tuple)
                                                    else out))]
    keep, tokens, first = None, [], None
    try:
        for _ in range(steps):
            ids = torch.tensor(item.suffix + tokens)
            hidden = torch.cat([embed(torch.tensor(item.prefix)), visual, embed(ids)])[None]
            length = hidden.shape[1]
            positions = torch.arange(length)[None]
            cos, sin = lm.rotary_emb(hidden, positions)
            causal = torch.ones(length, length, dtype=torch.bool).tril()
            for index, layer in enumerate(layers):
                allowed = causal.clone()
                if index >= K:
                    dropped = [i for i in range(start, start + count) if i not in keep]
                    allowed[:, dropped] = False
                mask = torch.zeros(length, length).masked_fill(~allowed, -1e30)[None, None]
                out = layer(hidden, attention_mask=mask, position_ids=positions,
                            position_embeddings=(cos, sin))
                hidden = out[0] if isinstance(out, tuple) else out
                if index == K - 1 and keep is None:
                    attention = layer.self_attn
                    keys = seen["k"].view(1, length, -1, attention.head_dim).transpose(1, 2)
                    keys = keys * cos[:, None] + torch.cat(
                        [-keys[..., attention.head_dim // 2:],
                         keys[..., :attention.head_dim // 2]], dim=-1) * sin[:, None]
                    keep = set(_reference_keep(method, k, seen["weights"], keys,
                                               lm.norm(seen["out"]), start, count))
            logits = model.lm_head(lm.norm(hidden[0, -1]))
            first = logits if first is None else first
            tokens.append(int(logits.argmax()))
            if tokens[-1] == model.eos_token_id:
                break
    finally:
        for hook in hooks:
            hook.remove()
    return first, tokens


@pytest.mark.parametrize(("method", "ks"), [("fastv", [64, 200]), ("dart", [36, 132])])
def test_pruned_forward_equals_the_mask_formulation(models, items, demo_scienceqa, method, ks):
    model, eager = models
    rows = items[:2]
    visual = visual_rows(model, 2, seed=1)
    state = inllm.prefill(model, rows, visual, ks, method, K)
    # Pruned caches: full length before K, the row's text + k image tokens from K on.
    assert state.past.keys[K - 1].shape[2] == max(it.text_length + 576 for it in rows)
    assert state.past.keys[K].shape[2] == max(it.text_length + k
                                              for it, k in zip(rows, ks, strict=True))
    answers = inllm.decode(model, rows, state, config_for(demo_scienceqa), ks, K)
    for j, (item, k) in enumerate(zip(rows, ks, strict=True)):
        with torch.inference_mode():
            logits, tokens = reference_tokens(eager, item, visual[j], k, method, steps=4)
        torch.testing.assert_close(state.logits[j], logits, atol=1e-4, rtol=1e-4)
        if model.eos_token_id in tokens:
            tokens = tokens[:tokens.index(model.eos_token_id)]
        assert answers[j] == model.tokenizer.decode(tokens, skip_special_tokens=True).strip()


def test_fastv_at_all_tokens_is_the_unpruned_path(models, items, demo_scienceqa):
    model = models[0]
    visual = visual_rows(model, len(items), seed=2)
    ks = [576] * len(items)
    config = config_for(demo_scienceqa, max_new_tokens=6)
    # One left-padded forward per batch on both sides, so that the two compute the very same
    # sums (with the prefix shared, or rows packed, the plain path agrees to float32 rounding:
    # test_capture.py, test_packed.py).
    config.share_prefix = False
    config.pack = False
    capture = ActivationCapture(model, ("attn_out", "hidden"), [0, 1, 3, 5])
    try:
        pruned = inllm.run_batch(model, items, visual, config, capture, ks, "fastv", K)
        plain = run_unpruned(model, items, visual, config, capture, ks)
    finally:
        capture.close()
    assert pruned[0] == plain[0]
    for slot, rows in plain[1].items():
        torch.testing.assert_close(pruned[1][slot], rows, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("method", "temperature"), [("fastv", 0.0), ("dart", 0.0),
                                                     ("dart", 0.7)])
def test_batched_equals_one_at_a_time(models, items, demo_scienceqa, method, temperature):
    model = models[0]
    visual = visual_rows(model, len(items), seed=3)
    ks = [64, 576, 20]
    config = config_for(demo_scienceqa, max_new_tokens=5, temperature=temperature)
    capture = ActivationCapture(model, ("attn_out", "hidden"), [0, 1, 2, 5])
    try:
        answers, captured, _ = inllm.run_batch(model, items, visual, config, capture, ks,
                                               method, K)
        for j, (item, k) in enumerate(zip(items, ks, strict=True)):
            alone, rows, _ = inllm.run_batch(model, [item], [visual[j]], config, capture, [k],
                                             method, K)
            assert answers[j] == alone[0]
            for slot, block in rows.items():
                assert block.shape[1] == k
                torch.testing.assert_close(captured[slot][j, :k], block[0], atol=1e-4,
                                           rtol=1e-4)
                assert not captured[slot][j, k:].any()
    finally:
        capture.close()


def test_captured_rows_before_the_pruning_layer_are_the_kept_tokens(models, items):
    """Layer 0's captured rows at k are the k kept tokens' rows of the full-length layer 0."""
    model = models[0]
    visual = visual_rows(model, 1, seed=4)
    capture = ActivationCapture(model, ("hidden",), [0])
    try:
        full = inllm.prefill(model, items[:1], visual, [576], "fastv", K, capture)
        pruned = inllm.prefill(model, items[:1], visual, [32], "fastv", K, capture)
    finally:
        capture.close()
    rows = full.captured[("hidden", 0)][0]
    kept = pruned.captured[("hidden", 0)][0]
    matches = [int((rows - row).abs().sum(-1).argmin()) for row in kept]
    assert matches == sorted(matches) and len(set(matches)) == 32
    torch.testing.assert_close(kept, rows[matches])


# ---- the sweep ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def features_dir(demo_scienceqa, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("inllm") / "features"
    result = vtkit("extract", "--model-path", DEMO_MODEL_DIR, "--base-dir", demo_scienceqa,
                   "--output-dir", out, "--num-samples", 8, "--device", "cpu")
    assert result.exit_code == 0, result.output
    return out


def sweep_run(features_dir: Path, base_dir: Path, out: Path, scorer: str, *extra):
    out.mkdir()
    shutil.copy(features_dir / cache.FEATURES_FILE, out / cache.FEATURES_FILE)
    return vtkit("sweep", "--model-path", DEMO_MODEL_DIR, "--base-dir", base_dir,
                 "--output-dir", out, "--num-samples", 8, "--device", "cpu", "--tokens",
                 "576,192,128,64", "--max-new-tokens", 2, "--scorer", scorer, *extra)


def test_extract_stores_no_scores_for_in_llm_scorers(features_dir):
    with h5py.File(features_dir / cache.FEATURES_FILE, "r") as f:
        assert "scores/l2" in f and "scores/fastv" not in f and "scores/dart" not in f


@pytest.fixture(scope="module")
def l2_sweep(features_dir, demo_scienceqa, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("inllm") / "l2"
    result = sweep_run(features_dir, demo_scienceqa, out, "l2")
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("scorer", ["fastv", "dart"])
def test_demo_sweep(features_dir, demo_scienceqa, l2_sweep, tmp_path, scorer):
    result = sweep_run(features_dir, demo_scienceqa, tmp_path / scorer, scorer)
    assert result.exit_code == 0, result.output
    with h5py.File(tmp_path / scorer / cache.SWEEP_FILE, "r") as f, \
            h5py.File(l2_sweep / cache.SWEEP_FILE, "r") as g:
        pruning = json.loads(f.attrs["pruning"])
        assert pruning["prune_layer"] == K
        assert pruning["equivalent_tokens"][-1] == pytest.approx((2 * 576 + 4 * 64) / 6)
        assert "pruning" not in g.attrs
        # rank and plot carry it on (raw_results.json's meta.pruning).
        assert sweep_meta(f)["pruning"] == pruning and "pruning" not in sweep_meta(g)
        # At k = 576 nothing is pruned: the answers are the pre-LLM path's.
        assert (f["answers"][0] == g["answers"][0]).all()
    for k in (576, 192, 128, 64):
        assert (tmp_path / scorer / cache.ANSWERS_DIR / f"k{k}.jsonl").exists()


@pytest.mark.parametrize("command", ["sweep", "run"])
def test_the_commands_have_prune_layer(command):
    result = vtkit(command, "--help")
    assert result.exit_code == 0 and "--prune-layer" in result.output


def test_prune_layer_outside_the_model_is_refused(features_dir, demo_scienceqa, tmp_path):
    result = sweep_run(features_dir, demo_scienceqa, tmp_path / "bad", "fastv",
                       "--prune-layer", 6)
    assert result.exit_code != 0
    assert "--prune-layer 6 is outside 1..5" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_prune_layer_is_in_the_fingerprint_only_for_in_llm_scorers(models, items,
                                                                   demo_scienceqa):
    def inputs(scorer: str, layer: int) -> dict:
        config = SweepConfig(model_path=str(DEMO_MODEL_DIR), base_dir=demo_scienceqa,
                             tokens=[64], scorer=scorer, prune_layer=layer)
        return sweep_inputs(config, models[0], items, {})

    assert inputs("l2", 2) == inputs("l2", 3)
    assert inputs("fastv", 2) != inputs("fastv", 3)
    assert inputs("dart", 3)["prune_layer"] == 3
