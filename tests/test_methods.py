"""The pre-LLM methods end to end on the demo questions: what extract caches for them, the rows
the sweep hands the language model (checked against vtkit.selection's rules applied to the cached
signals one question at a time), and batched == one question at a time."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import vtkit.sweep as sweep_module
from vtkit.cache import FEATURES_FILE, SWEEP_FILE
from vtkit.cli.main import app
from vtkit.data import select_questions
from vtkit.errors import UsageError
from vtkit.extract import ExtractConfig, extract
from vtkit.images import load_image, preprocess_images
from vtkit.model import clip_layers
from vtkit.pruning import gather_rows
from vtkit.selection import (
    divprune_order,
    order_scores,
    visionzip_split,
    visionzip_tokens,
    vispruner_important,
    vispruner_keep,
)
from vtkit.sweep import SweepConfig, sweep

N = 6
# Neighbouring budgets, so that rows of different k share batches.
TOKENS = [576, 64, 60]
METHODS = ("divprune", "vispruner", "visionzip")


@pytest.fixture(scope="module")
def model(tiny_models):
    from vtkit.model import load_model

    return load_model(str(tiny_models["hf"]), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def features_dir(tiny_models, demo_scienceqa, model, tmp_path_factory):
    out = tmp_path_factory.mktemp("methods")
    extract(ExtractConfig(model_path=str(tiny_models["hf"]), base_dir=demo_scienceqa,
                          output_dir=out, num_samples=N, device="cpu"), model=model)
    return out


def _config(tiny_models, demo_scienceqa, out, **kw) -> SweepConfig:
    return SweepConfig(model_path=str(tiny_models["hf"]), base_dir=demo_scienceqa,
                       output_dir=out, num_samples=N, device="cpu", tokens=TOKENS,
                       max_new_tokens=3, **kw)


def _fresh(features_dir, tmp_path, name):
    out = tmp_path / name
    out.mkdir()
    shutil.copy(features_dir / FEATURES_FILE, out / FEATURES_FILE)
    return out


def test_extract_caches_the_feature_layer_cls_state_and_keys(features_dir, demo_scienceqa,
                                                            model):
    # Against the stock CLIP forward: hidden_states[-2] is the feature layer's output, and its
    # keys come from k_proj of the layer-normed hidden_states[-3].
    selection = select_questions(demo_scienceqa, num_samples=N)
    question = next(q for q in selection.questions if q.has_image)
    pixels = preprocess_images([load_image(selection.image_path(question))], "pad",
                               size=model.image_size, mean=model.image_mean, std=model.image_std)
    core, layers = clip_layers(model.hf)
    with torch.inference_mode():
        states = core(pixel_values=pixels, output_hidden_states=True).hidden_states
        attention = layers[-2].self_attn
        keys = attention.k_proj(layers[-2].layer_norm1(states[-3]))
        heads = attention.num_heads
        keys = keys.view(1, keys.shape[1], heads, -1).mean(dim=2)
        projected = model.project(states[-2][:, 1:])
    with h5py.File(features_dir / FEATURES_FILE, "r") as f:
        row = [s.decode() for s in f["question_ids"][:]].index(question.question_id)
        torch.testing.assert_close(torch.from_numpy(f["cls_features"][row]), states[-2][0, 0])
        torch.testing.assert_close(torch.from_numpy(f["keys"][row]), keys[0, 1:])
        divprune = torch.from_numpy(f["scores/divprune"][row])
    torch.testing.assert_close(divprune, order_scores(divprune_order(projected))[0])


def _expected_rows(model, f, row: int, scorer: str, k: int) -> torch.Tensor:
    """The visual rows of one question by the method's rule on the cached signals alone."""
    feats = torch.from_numpy(f["features"][row:row + 1])
    attention = torch.from_numpy(f["scores/cls"][row:row + 1])
    if scorer == "visionzip":
        tokens = visionzip_tokens(feats, torch.from_numpy(f["cls_features"][row:row + 1]),
                                  attention, torch.from_numpy(f["keys"][row:row + 1]),
                                  *visionzip_split(k))
        return model.project(tokens)[0]
    projected = model.project(feats)
    if scorer == "divprune":
        keep = torch.sort(divprune_order(projected)[:, :k]).values
    else:
        keep = vispruner_keep(attention, feats, k, vispruner_important(k))
    return gather_rows(projected, keep)[0]


def _spy(monkeypatch) -> list:
    seen = []
    original = sweep_module.run_batch

    def spying(model_, items, visual, config, capture, ks, timer=None, *args):
        if visual is not None:
            seen.append([(it.question.question_id, k, v.clone())
                         for it, k, v in zip(items, ks, visual, strict=True)])
        return original(model_, items, visual, config, capture, ks, timer, *args)

    monkeypatch.setattr(sweep_module, "run_batch", spying)
    return seen


@pytest.mark.parametrize("scorer", METHODS)
def test_the_sweep_feeds_the_rows_of_the_rule_and_batches_change_nothing(
        scorer, tiny_models, demo_scienceqa, model, features_dir, tmp_path, monkeypatch):
    batched = _fresh(features_dir, tmp_path, "batched")
    seen = _spy(monkeypatch)
    sweep(_config(tiny_models, demo_scienceqa, batched, scorer=scorer), model=model)
    assert any(len({k for _, k, _ in batch}) > 1 for batch in seen), "no batch mixed k"
    rows = [r for batch in seen for r in batch]
    with h5py.File(features_dir / FEATURES_FILE, "r") as f:
        ids = [s.decode() for s in f["question_ids"][:]]
        assert len(rows) == len(ids) * len(TOKENS)
        for qid, k, visual in rows:
            assert visual.shape[0] == k
            torch.testing.assert_close(visual, _expected_rows(model, f, ids.index(qid), scorer,
                                                              k), rtol=1e-5, atol=1e-5)

    single = _fresh(features_dir, tmp_path, "single")
    sweep(_config(tiny_models, demo_scienceqa, single, scorer=scorer, batch_size=1),
          model=model)
    with h5py.File(batched / SWEEP_FILE, "r") as a, h5py.File(single / SWEEP_FILE, "r") as b:
        assert a["answers"][:].tolist() == b["answers"][:].tolist()
        for k in TOKENS:
            spectra = a[f"spectra/attn_out/layer0/k{k}"][:]
            assert spectra.shape[1] == min(k, model.hidden_size)
            np.testing.assert_allclose(spectra, b[f"spectra/attn_out/layer0/k{k}"][:],
                                       rtol=1e-4, atol=1e-5 * spectra.max())
        plan = json.loads(a.attrs["selection"])
        config = json.loads(a.attrs["config"])
    assert plan["method"] == scorer
    if scorer == "vispruner":
        assert plan["important"] == [[576, 288], [64, 48], [60, 45]]
    if scorer == "visionzip":
        assert plan["dominant_contextual"] == [[576, 486, 90], [64, 54, 10], [60, 51, 9]]
        assert "features change" in plan["rows"]
    assert config["scorer"] == scorer


def test_method_settings_enter_the_fingerprint(tiny_models, demo_scienceqa, model,
                                               features_dir):
    from vtkit.generate import prepare_items

    selection = select_questions(demo_scienceqa, num_samples=N)
    base = _config(tiny_models, demo_scienceqa, features_dir, scorer="vispruner")
    items = prepare_items(selection.questions, model.tokenizer, base)
    inputs = sweep_module.sweep_inputs(base, model, items, {})
    other = sweep_module.sweep_inputs(
        _config(tiny_models, demo_scienceqa, features_dir, scorer="vispruner",
                important_ratio=0.25), model, items, {})
    assert inputs["selection"] != other["selection"]
    l2 = sweep_module.sweep_inputs(_config(tiny_models, demo_scienceqa, features_dir),
                                   model, items, {})
    assert "selection" not in l2   # the default scorer's fingerprint is as before


@pytest.mark.parametrize("flags, named", [
    (["--scorer", "l2", "--important-ratio", "0.5"], "--important-ratio"),
    (["--scorer", "vispruner", "--important-ratio", "1.5"], "--important-ratio"),
    (["--scorer", "vispruner", "--contextual-ratio", "0.2"], "--contextual-ratio"),
    (["--scorer", "visionzip", "--contextual-ratio", "-0.1"], "--contextual-ratio"),
])
def test_bad_method_settings_name_their_flag(flags, named, demo_scienceqa, tmp_path):
    result = CliRunner().invoke(app, ["sweep", "--base-dir", str(demo_scienceqa),
                                      "--output-dir", str(tmp_path), "--device", "cpu",
                                      "--tokens", "64", *flags])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], result.output
    with pytest.raises(UsageError, match=named):
        SweepConfig(model_path="m", base_dir=demo_scienceqa, tokens=[64],
                    scorer=flags[1], **{named[2:].replace("-", "_"): float(flags[3])}).validate()
