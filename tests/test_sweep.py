"""`vtkit sweep`: faithfulness to the stock forward, batching, capture, resume, answer files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import vtkit.sweep as sweep_module
from vtkit.cache import FEATURES_FILE, SWEEP_FILE, SWEEP_PARTS_DIR, read_rows
from vtkit.cli.main import app
from vtkit.data import select_questions
from vtkit.extract import ExtractConfig, extract
from vtkit.generate import ActivationCapture, clean_answer, decode, prefill, prepare_items
from vtkit.images import load_image, preprocess_images
from vtkit.pruning import gather_rows, singular_values, top_k_raster
from vtkit.sweep import SweepConfig, sweep

N = 12
TOKENS = [576, 100, 20]


@pytest.fixture(scope="module")
def model(tiny_models):
    from vtkit.model import load_model

    return load_model(str(tiny_models["hf"]), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def features_dir(tiny_models, demo_scienceqa, model, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    extract(ExtractConfig(model_path=str(tiny_models["hf"]), base_dir=demo_scienceqa,
                          output_dir=out, num_samples=N, device="cpu"), model=model)
    return out


def _config(tiny_models, demo_scienceqa, out, **kw) -> SweepConfig:
    kw.setdefault("tokens", TOKENS)
    kw.setdefault("max_new_tokens", 6)
    return SweepConfig(model_path=str(tiny_models["hf"]), base_dir=demo_scienceqa,
                       output_dir=out, num_samples=N, device="cpu", **kw)


def _fresh(features_dir: Path, tmp_path: Path, name: str) -> Path:
    out = tmp_path / name
    out.mkdir()
    shutil.copy(features_dir / FEATURES_FILE, out / FEATURES_FILE)
    return out


@pytest.fixture(scope="module")
def swept(tiny_models, demo_scienceqa, model, features_dir):
    result = sweep(_config(tiny_models, demo_scienceqa, features_dir, batch_size=16), model=model)
    return features_dir, result


def _items_and_features(demo_scienceqa, model, features_dir):
    selection = select_questions(demo_scienceqa, num_samples=N)
    config = SweepConfig(model_path="", base_dir=demo_scienceqa, tokens=TOKENS)
    items = [it for it in prepare_items(selection.questions, model.tokenizer, config)
             if it.question.has_image]
    with h5py.File(features_dir / FEATURES_FILE, "r") as f:
        ids = [s.decode() for s in f["question_ids"][:]]
        rows = [ids.index(it.question.question_id) for it in items]
        feats = torch.from_numpy(f["features"][sorted(rows)])
        l2 = torch.from_numpy(f["scores/l2"][sorted(rows)])
    order = np.argsort(np.argsort(rows))
    with torch.inference_mode():
        projected = model.project(feats[order])
    return selection, items, projected, l2[order]


def test_k576_logits_equal_the_stock_forward(model, demo_scienceqa, features_dir):
    selection, items, projected, _ = _items_and_features(demo_scienceqa, model, features_dir)
    image_token = model.hf.config.image_token_id
    for j in (0, 1):
        item = items[j]
        state = prefill(model, [item], [projected[j]])
        ids = item.prefix + [image_token] * 576 + item.suffix
        pixels = preprocess_images([load_image(selection.image_path(item.question))], "pad")
        with torch.inference_mode():
            stock = model.hf(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0, -1]
        torch.testing.assert_close(state.logits[0], stock, atol=1e-5, rtol=0)
    # Left padding leaves every row's logits as they were unbatched.
    batched = prefill(model, items[:3], list(projected[:3]))
    for j in range(3):
        alone = prefill(model, [items[j]], [projected[j]])
        torch.testing.assert_close(batched.logits[j], alone.logits[0], atol=1e-5, rtol=0)


def test_greedy_text_equals_generate(model, demo_scienceqa, features_dir):
    selection, items, projected, _ = _items_and_features(demo_scienceqa, model, features_dir)
    config = SweepConfig(model_path="", base_dir=demo_scienceqa, tokens=TOKENS,
                         max_new_tokens=8)
    image_token = model.hf.config.image_token_id
    for j in (0, 2):
        item = items[j]
        ours = decode(model, [item], prefill(model, [item], [projected[j]]), config, [576])[0]
        ids = torch.tensor([item.prefix + [image_token] * 576 + item.suffix])
        pixels = preprocess_images([load_image(selection.image_path(item.question))], "pad")
        with torch.inference_mode():
            out = model.hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                    pixel_values=pixels, max_new_tokens=8, do_sample=False,
                                    pad_token_id=model.pad_token_id)
        stock = model.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        assert ours == stock


def test_kept_rows_are_the_top_k_in_raster_order(swept, model, demo_scienceqa):
    out, _ = swept
    _, items, projected, l2 = _items_and_features(demo_scienceqa, model, out)
    k = 20
    kept = top_k_raster(l2[:2], k)
    visual = gather_rows(projected[:2], kept)
    last = model.num_layers - 1
    capture = ActivationCapture(model)
    try:
        state = prefill(model, items[:2], list(visual), capture)
    finally:
        capture.close()
    first_rows, last_rows = state.captured[("attn_out", 0)], state.captured[("attn_out", last)]
    with h5py.File(out / SWEEP_FILE, "r") as f:
        stored_first = f[f"attention/attn_out/layer0/k{k}"][:]
        stored_last = f[f"attention/attn_out/layer{last}/k{k}"][:]
        spectra = f[f"spectra/attn_out/layer0/k{k}"][:2]
    np.testing.assert_allclose(stored_first, first_rows.numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(stored_last, last_rows.numpy(), rtol=2e-3, atol=2e-3)
    # A selection in another order (or another set) would give other attention outputs.
    shuffled = gather_rows(projected[:2], kept.flip(-1))
    capture = ActivationCapture(model)
    try:
        other = prefill(model, items[:2], list(shuffled), capture)
    finally:
        capture.close()
    assert not np.allclose(stored_first, other.captured[("attn_out", 0)].numpy(), atol=2e-3)
    # Stored spectra equal a float64 SVD of the captured float32 matrices.
    for b in range(2):
        ref = np.linalg.svd(first_rows[b].double().numpy(), compute_uv=False)
        np.testing.assert_allclose(spectra[b], ref, rtol=0, atol=1e-4 * ref[0])
    assert np.allclose(singular_values(first_rows).numpy(), spectra, rtol=1e-4, atol=1e-6)


def test_answers_do_not_depend_on_batch_size(swept, tiny_models, demo_scienceqa, model,
                                             features_dir, tmp_path):
    out, _ = swept
    single = _fresh(features_dir, tmp_path, "batch1")
    sweep(_config(tiny_models, demo_scienceqa, single, batch_size=1), model=model)
    with h5py.File(out / SWEEP_FILE, "r") as a, h5py.File(single / SWEEP_FILE, "r") as b:
        assert a["answers"][:].tolist() == b["answers"][:].tolist()
        assert np.array_equal(a["correct"][:], b["correct"][:])


def test_text_only_questions_run_once(tiny_models, demo_scienceqa, model, features_dir,
                                      tmp_path, monkeypatch):
    calls: list[tuple[int, tuple[str, ...]]] = []
    original = sweep_module.run_batch

    def counting(model_, items, visual, config, capture, ks, timer=None, *args):
        calls.extend((k, it.question.question_id) for it, k in zip(items, ks, strict=True))
        return original(model_, items, visual, config, capture, ks, timer, *args)

    monkeypatch.setattr(sweep_module, "run_batch", counting)
    out = _fresh(features_dir, tmp_path, "count")
    sweep(_config(tiny_models, demo_scienceqa, out, batch_size=4), model=model)
    questions = select_questions(demo_scienceqa, num_samples=N).questions
    text_ids = {q.question_id for q in questions if not q.has_image}
    image_ids = {q.question_id for q in questions if q.has_image}
    assert text_ids and image_ids
    seen_text = [qid for k, qid in calls if qid in text_ids]
    assert sorted(seen_text) == sorted(text_ids)
    assert all(k == 0 for k, qid in calls if qid in text_ids)
    for k in TOKENS:
        seen = sorted(qid for kk, qid in calls if kk == k)
        assert seen == sorted(image_ids)
    with h5py.File(out / SWEEP_FILE, "r") as f:
        answers = f["answers"][:]
        has_image = f["has_image"][:]
    for col in np.flatnonzero(~has_image):
        assert len(set(answers[:, col].tolist())) == 1


def test_each_image_batch_queues_its_spectra_before_it_decodes(tiny_models, demo_scienceqa,
                                                               model, features_dir, tmp_path,
                                                               monkeypatch):
    """A batch's spectra are queued between its prefill and its decoding (on CUDA their GPU
    work then runs beside the decode step); text batches capture nothing and queue none."""
    import vtkit.generate as generate_module

    events = []
    grams, decoding = sweep_module._grams_to_host, generate_module.decode

    def queued(captured, ks, pinned):
        events.append(("spectra", id(captured)))
        return grams(captured, ks, pinned)

    def decoded(model_, items, state, config, ks):
        events.append(("decode", id(state.captured)))
        return decoding(model_, items, state, config, ks)

    monkeypatch.setattr(sweep_module, "_grams_to_host", queued)
    monkeypatch.setattr(generate_module, "decode", decoded)
    out = _fresh(features_dir, tmp_path, "order")
    sweep(_config(tiny_models, demo_scienceqa, out, batch_size=4), model=model)
    first = [name for name, _ in events].index("spectra")
    text, image = events[:first], events[first:]        # the text batches run first
    assert text and {name for name, _ in text} == {"decode"}
    assert len(image) > 2 and image[0::2] == [("spectra", b) for _, b in image[1::2]]
    assert image[1::2] == [("decode", b) for _, b in image[0::2]]


def test_the_kernel_warm_up_runs_every_size_the_batches_meet(tiny_models, demo_scienceqa,
                                                              model, features_dir, tmp_path,
                                                              monkeypatch):
    """On CUDA the sweep runs, before its first batch, the products whose sizes follow a
    batch's rows (a kernel met first inside a batch stalls the host until the GPU is idle).
    The sizes it plans are those the batches then meet: the row count of every product over
    one position per row (LM head, decode step), and the (rows, k) of every Gram matrix."""
    planned, linear_rows, grams = {}, set(), set()
    sizes, linear, gram = (sweep_module._kernel_sizes, torch.nn.functional.linear,
                           sweep_module.gram_matrices)

    def planning(batches):
        planned["rows"], planned["groups"] = sizes(batches)
        return planned["rows"], planned["groups"]

    def linear_spy(x, *args, **kwargs):
        linear_rows.add(x.shape[:-1].numel())
        return linear(x, *args, **kwargs)

    def gram_spy(matrices, *args, **kwargs):
        grams.add(tuple(matrices.shape[:2]))
        return gram(matrices, *args, **kwargs)

    monkeypatch.setattr(sweep_module, "_kernel_sizes", planning)
    monkeypatch.setattr(torch.nn.functional, "linear", linear_spy)
    monkeypatch.setattr(sweep_module, "gram_matrices", gram_spy)
    out = _fresh(features_dir, tmp_path, "kernels")
    sweep(_config(tiny_models, demo_scienceqa, out, batch_size=4, pack=True), model=model)
    assert planned["rows"] and max(planned["rows"]) <= 4
    # Prefill products run over whole prompts (tens of positions per row): above 4 rows.
    assert {m for m in linear_rows if m <= 4} == planned["rows"]
    assert grams == planned["groups"] and len({k for _, k in grams}) == len(TOKENS)


def test_answer_files_score_like_the_sweep(swept, demo_scienceqa):
    out, result = swept
    for r in result.results:
        lines = [json.loads(x) for x in (out / "answers" / f"k{r.k}.jsonl").read_text()
                 .splitlines()]
        assert len(lines) == N
        assert {x["metadata"]["k"] for x in lines} == {r.k}
        assert set(lines[0]) >= {"question_id", "prompt", "text", "answer_id", "model_id",
                                 "metadata"}
        scored = CliRunner().invoke(app, ["score", str(out / "answers" / f"k{r.k}.jsonl"),
                                          "--base-dir", str(demo_scienceqa), "--json"])
        assert scored.exit_code == 0, scored.output
    with h5py.File(out / SWEEP_FILE, "r") as f:
        assert f.attrs["complete"]
        assert f["token_counts"][:].tolist() == TOKENS
        assert f["spectra/attn_out/layer0/k20"].shape[1] == min(20, f.attrs["hidden_size"])


def test_rerun_is_a_no_op_and_other_settings_are_refused(swept, tiny_models, demo_scienceqa,
                                                         model):
    out, _ = swept
    again = sweep(_config(tiny_models, demo_scienceqa, out, batch_size=16), model=model)
    assert again.already_complete
    from vtkit.errors import CacheMismatchError

    with pytest.raises(CacheMismatchError, match="scorer"):
        sweep(_config(tiny_models, demo_scienceqa, out, scorer="random"), model=model)


def test_bad_k_and_missing_cache_are_clear_errors(tiny_models, demo_scienceqa, features_dir,
                                                  tmp_path):
    runner = CliRunner()
    base = ["sweep", "--model-path", str(tiny_models["hf"]), "--base-dir", str(demo_scienceqa),
            "--num-samples", str(N), "--device", "cpu"]
    too_many = runner.invoke(app, base + ["--output-dir", str(features_dir), "--tokens", "600"])
    assert too_many.exit_code == 2 and "--tokens" in too_many.output
    missing = runner.invoke(app, base + ["--output-dir", str(tmp_path / "none")])
    assert missing.exit_code == 1 and "features.h5" in missing.output


def test_sigkill_mid_sweep_then_resume_equals_uninterrupted(tiny_models, demo_scienceqa, model,
                                                            features_dir, tmp_path):
    reference = _fresh(features_dir, tmp_path, "reference")
    sweep(_config(tiny_models, demo_scienceqa, reference, batch_size=1), model=model)
    out = _fresh(features_dir, tmp_path, "killed")
    cmd = [sys.executable, "-m", "vtkit", "sweep", "--model-path", str(tiny_models["hf"]),
           "--base-dir", str(demo_scienceqa), "--num-samples", str(N), "--output-dir", str(out),
           "--device", "cpu", "--batch-size", "1", "--max-new-tokens", "6",
           "--tokens", ",".join(map(str, TOKENS))]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = out / SWEEP_PARTS_DIR
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.glob("i-*.h5"))) < 4:
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / SWEEP_FILE).exists(), "sweep finished before it could be killed"
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with h5py.File(reference / SWEEP_FILE, "r") as a, h5py.File(out / SWEEP_FILE, "r") as b:
        assert a.attrs["fingerprint"] == b.attrs["fingerprint"]
        last = int(a.attrs["layers"][-1])
        for name in ("answers", "correct", "spectra/attn_out/layer0/k20",
                     f"spectra/attn_out/layer{last}/k576", "attention/attn_out/layer0/k100"):
            assert np.array_equal(a[name][:], b[name][:]), name
    assert (reference / "answers" / "k20.jsonl").read_text() == \
        (out / "answers" / "k20.jsonl").read_text()


def test_an_answer_with_nul_is_stored_and_read_back(tmp_path):
    # A barely trained model can decode the byte token <0x00>; HDF5 strings cannot hold NUL.
    from vtkit.cache import write_h5_atomic
    answers = [clean_answer(" A\x00B \n"), clean_answer("C")]
    assert answers == ["A\ufffdB", "C"]
    write_h5_atomic(tmp_path / "a.h5", {"answers": answers}, {})
    with h5py.File(tmp_path / "a.h5") as f:
        assert [t.decode() for t in f["answers"][:]] == answers


def test_the_progress_label_says_the_grid_is_done(tiny_models, demo_scienceqa, model,
                                                  features_dir, tmp_path):
    """The bar's last label names the whole grid, not the last batch's k range."""
    from vtkit.progress import RecordingReporter

    reporter = RecordingReporter()
    out = _fresh(features_dir, tmp_path, "label")
    sweep(_config(tiny_models, demo_scienceqa, out, tokens=[576, 20], max_new_tokens=2),
          reporter, model=model)
    assert any(label.startswith("sweep k=") for label in reporter.labels)
    assert reporter.labels[-1] == "sweep (2 k values)"


def test_the_report_splits_the_batches_from_the_costs_of_the_run(tiny_models, demo_scienceqa,
                                                                model, features_dir, tmp_path):
    """After the sweep's time, a line splits it: the batches (their count, their tokens) and
    what a run costs whatever its questions (planning, kernel warm-up, eigenvalue tail,
    merge), the parts adding up to no more than the whole."""
    import re

    from vtkit.progress import RecordingReporter

    reporter = RecordingReporter()
    out = _fresh(features_dir, tmp_path, "split")
    result = sweep(_config(tiny_models, demo_scienceqa, out, tokens=[576, 20], max_new_tokens=2,
                           batch_size=4), reporter, model=model)
    infos = [m for kind, m in reporter.messages if kind == "info"]
    swept = next(i for i, m in enumerate(infos) if m.startswith("swept "))
    total = float(re.search(r" in ([0-9.]+) s on 1 process", infos[swept]).group(1))
    split = infos[swept + 1]
    numbers = re.fullmatch(
        r"batches ([0-9.]+) s \((\d+) batches, ([0-9,]+) tokens, [0-9,]+ tokens/s\); per run: "
        r"planning ([0-9.]+) s, kernel warm-up ([0-9.]+) s, eigenvalue tail ([0-9.]+) s, "
        r"merge ([0-9.]+) s", split)
    assert numbers, split
    looping, batches, tokens, *fixed = numbers.groups()
    assert int(tokens.replace(",", "")) == result.prefill_tokens > 0
    # 12 questions x 2 k in batches of at most 4 rows, some of them text-only (k = 0 once).
    assert 2 * N / 4 <= int(batches) <= 2 * N
    assert 0 < float(looping) <= total + 0.1
    assert float(looping) + sum(map(float, fixed)) <= total + 0.3
    assert not any(m.startswith("rank ") for m in infos)


def test_the_layout_names_are_the_documented_ones():
    """Writers and readers take these names from vtkit.cache; docs/cache.md documents them."""
    from vtkit import cache

    assert cache.spectra_dataset("attn_out", 0, 20) == "spectra/attn_out/layer0/k20"
    assert cache.attention_dataset("hidden", 31, 576) == "attention/hidden/layer31/k576"
    assert cache.layer_name(2) == "layer2"
    assert (cache.FEATURES_SCHEMA_VERSION, cache.SWEEP_SCHEMA_VERSION) == (3, 3)
    assert cache.answers_file(100) == "answers/k100.jsonl"
    assert cache.LAYERS == ("first_layer", "last_layer")
    figures = ("pruning_experiment_*.png", "pruning_experiment_*.pdf", "rank_heatmap_*.png",
               "rank_heatmap_*.pdf", "rank_by_layer.png", "rank_by_layer.pdf")
    assert cache.STALE_AFTER_RESCORE == (("raw_results.json", "normalized_results.json"), figures)
    assert cache.STALE_AFTER_SWEEP == (
        ("ranks.json", "raw_results.json", "normalized_results.json"),
        ("answers/k*.jsonl", *figures))
    assert cache.STALE_AFTER_EXTRACT == (
        ("sweep.h5", "sweep.parts", "ranks.json", "raw_results.json", "normalized_results.json"),
        ("answers/k*.jsonl", *figures))


def test_in_llm_rows_are_budgeted_at_their_full_visual_length():
    """Rows pruned inside the model run their first layers at text + all visual tokens: the
    token budget must count them there, or a batch that fits at k overflows before pruning."""
    from vtkit.data import Question
    from vtkit.generate import PreparedItem
    from vtkit.sweep import _batches

    def item(index: int, text: int) -> PreparedItem:
        question = Question(question_id=str(index), text="q")
        return PreparedItem(index, question, "q", list(range(text)), [])

    rows = [(item(i, 100), 64) for i in range(8)]
    # 8 rows of 164 tokens fit a budget of 1400; at 100 + 576 tokens only 2 rows do.
    assert [len(b) for b in _batches(rows, None, 1400)] == [8]
    batches = _batches(rows, None, 1400, full_visual=576)
    assert [len(b) for b in batches] == [2, 2, 2, 2]
    assert all(len(b) * (100 + 576) <= 1400 for b in batches)
    # The longest text of a batch sets its full length, whatever the row's own k.
    # Two rows of 320 tokens; before pruning 300 + 576 and 280 + 576.
    mixed = [(item(0, 300), 20), (item(1, 280), 40)]
    assert [len(b) for b in _batches(mixed, None, 1730)] == [2]
    assert [len(b) for b in _batches(mixed, None, 1730, full_visual=576)] == [1, 1]
    assert [len(b) for b in _batches(mixed, None, 1752, full_visual=576)] == [2]


def test_packed_rows_are_budgeted_at_their_own_tokens():
    """Left-padded, a batch holds rows up to its longest row's length each, and closes where
    the next row would pad it by more than 5%; packed rows hold no padding, so a batch closes
    only where the next row's own tokens would pass the budget."""
    from vtkit.data import Question
    from vtkit.generate import PreparedItem
    from vtkit.sweep import _batches, _plan

    def item(index: int, text: int) -> PreparedItem:
        question = Question(question_id=str(index), text="q", image=f"{index}.png")
        return PreparedItem(index, question, "q", list(range(text)), [])

    # Lengths far apart, as a few questions' (question, k) rows are.
    rows = [(item(i, 100 + 60 * i), 20) for i in range(6)]
    lengths = [120 + 60 * i for i in range(6)]            # 120 .. 420, 1620 in all
    assert [len(b) for b in _batches(rows, None, 1000)] == [1] * 6
    packed = _batches(rows, None, 1000, packed=True)
    assert [len(b) for b in packed] == [4, 2]             # 720 tokens, then 900
    assert sum(lengths[:5]) > 1000 >= sum(lengths[:4])
    assert [len(b) for b in _batches(rows, 3, 10 ** 6, packed=True)] == [3, 3]
    # The plan packs the rows it runs packed; an in-LLM scorer's rows stay left-padded.
    chunk = [it for it, _ in rows]
    config = SweepConfig(model_path="", base_dir="", tokens=[20])
    plan, _ = _plan([chunk], [], config, {}, 1000, 576, packed=True)
    assert [len(b) for b in plan[0]] == [4, 2]
    config.scorer = "fastv"
    plan, _ = _plan([chunk], [], config, {}, 10 ** 6, 576, packed=True)
    assert [len(b) for b in plan[0]] == [1] * 6


def test_the_sweep_keeps_cudnn_attention_off_on_cuda_only():
    """cuDNN's SDPA builds a plan per new shape; the sweep's batches all have new shapes."""
    import torch

    from vtkit.sweep import sweep_attention_backends

    before = (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled())
    with sweep_attention_backends(torch.device("cuda")):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled()
        assert torch.backends.cuda.mem_efficient_sdp_enabled()
    assert (torch.backends.cuda.cudnn_sdp_enabled(),
            torch.backends.cuda.flash_sdp_enabled()) == before
    with sweep_attention_backends(torch.device("cpu")):
        assert torch.backends.cuda.cudnn_sdp_enabled() == before[0]


def test_host_copies_land_in_slices_of_one_pinned_buffer(monkeypatch):
    """The GPU path's copy to pinned memory (Gram matrices in float64, spectra in float32),
    with a plain buffer and event standing in for CUDA's."""
    class Pool:
        def take(self, numel):
            self.buffer = torch.full((numel,), float("nan"), dtype=torch.float64)
            return self.buffer

    class Event:
        def record(self):
            self.recorded = True

    monkeypatch.setattr(torch.cuda, "Event", Event)
    for dtype in (torch.float64, torch.float32):
        tensors = {("attn_out", 0, 64): torch.arange(6, dtype=dtype).view(2, 3),
                   ("attn_out", 5, 64): torch.arange(5, dtype=dtype) + 10,
                   ("hidden", 0, 20): torch.ones(1, 1, dtype=dtype)}
        pool = Pool()
        host, ready, buffer = sweep_module._copy_to_pinned(tensors, pool)
        assert buffer is pool.buffer and ready.recorded
        assert buffer.numel() * 8 >= 12 * dtype.itemsize
        start = buffer.data_ptr()
        ends = []
        for key, tensor in tensors.items():
            assert host[key].dtype == dtype and torch.equal(host[key], tensor)
            offset = host[key].data_ptr() - start
            assert 0 <= offset and offset + tensor.numel() * dtype.itemsize <= buffer.numel() * 8
            ends.append((offset, offset + tensor.numel() * dtype.itemsize))
        ends.sort()
        assert all(a[1] <= b[0] for a, b in zip(ends, ends[1:], strict=False))  # no overlap


@pytest.mark.parametrize("rows", [[0, 1, 2, 3], [1, 3, 4, 5, 9, 10], [0, 2, 4, 6, 8, 10], [11],
                                  [0, 11], []])
@pytest.mark.parametrize("layout", [{"chunks": (1, 5, 3), "compression": "lzf", "shuffle": True},
                                    {}])
def test_read_rows_equals_h5py_list_indexing(tmp_path, rows, layout):
    """Rows read run by run (consecutive rows as one slice) are the rows h5py's list indexing
    reads, from a dataset chunked and compressed as features.h5 is, or stored whole as its
    scores are."""
    data = np.random.default_rng(0).standard_normal((12, 5, 3)).astype(np.float16)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        dataset = f.create_dataset("features", data=data, **layout)
        got = read_rows(dataset, rows)
        assert got.dtype == data.dtype and got.shape == (len(rows), 5, 3)
        np.testing.assert_array_equal(got, dataset[rows] if rows else data[:0])
        np.testing.assert_array_equal(got, data[rows])


@pytest.mark.parametrize("rows", [[2, 1], [3, 3], [-1, 0], [0, 12]])
def test_read_rows_refuses_rows_out_of_order_or_range(tmp_path, rows):
    with h5py.File(tmp_path / "f.h5", "w") as f:
        dataset = f.create_dataset("features", data=np.zeros((12, 2)), chunks=(1, 2))
        with pytest.raises(ValueError, match="features: rows must ascend"):
            read_rows(dataset, rows)


@pytest.mark.parametrize("scorer", ["cls", "visionzip"])
def test_a_chunks_signals_follow_its_questions_whatever_their_rows_in_the_cache(tmp_path,
                                                                                scorer):
    """The chunk's questions in any order of their features.h5 rows (here 5, 0, 3, with a gap)
    get their own rows of every signal, read in ascending rows and put back in order."""
    from types import SimpleNamespace

    rng = np.random.default_rng(0)
    n, patches, width = 6, 4, 3
    with h5py.File(tmp_path / "features.h5", "w") as f:
        for name, shape in [("features", (n, patches, width)), ("keys", (n, patches, 2)),
                            ("cls_features", (n, width)), ("scores/cls", (n, patches))]:
            f.create_dataset(name, data=rng.standard_normal(shape).astype(np.float32),
                             chunks=(1, *shape[1:]))
    model = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32,
                            project=lambda x: 2 * x)
    chunk = [SimpleNamespace(cache_row=row) for row in (5, 0, 3)]
    with h5py.File(tmp_path / "features.h5", "r") as f:
        signals = sweep_module._load_chunk(model, f, chunk, SimpleNamespace(scorer=scorer))
        rows = [5, 0, 3]
        if scorer == "cls":
            np.testing.assert_array_equal(signals.scores.numpy(), f["scores/cls"][:][rows])
            np.testing.assert_array_equal(signals.projected.numpy(), 2 * f["features"][:][rows])
        else:
            np.testing.assert_array_equal(signals.features.numpy(), f["features"][:][rows])
            np.testing.assert_array_equal(signals.keys.numpy(), f["keys"][:][rows])
            np.testing.assert_array_equal(signals.cls_feature.numpy(), f["cls_features"][:][rows])
            np.testing.assert_array_equal(signals.attention.numpy(), f["scores/cls"][:][rows])
