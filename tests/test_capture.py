"""What the sweep captures and stores: --layers, --capture, sweep.h5 schema 3.

The stored spectra are checked against an independent recomputation: the shipped demo model's
own transformers modules run on the same spliced input (one question at a time, no padding),
plain forward hooks take the captured tensor's visual rows, and ``torch.linalg.svdvals`` in
float64 gives their singular values on the CPU.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vtkit import cache
from vtkit.cli.main import app
from vtkit.data import select_questions
from vtkit.defaults import CAPTURES
from vtkit.demo import DEMO_MODEL_DIR
from vtkit.errors import UsageError
from vtkit.generate import (
    ActivationCapture,
    PreparedItem,
    decode,
    prefill,
    prepare_items,
    shared_prefix,
)
from vtkit.sweep import SweepConfig, resolve_layers

N = 6
TOKENS = [576, 64]


def vtkit(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def common(base_dir: Path, out: Path, n: int = N) -> list:
    return ["--model-path", DEMO_MODEL_DIR, "--base-dir", base_dir, "--output-dir", out,
            "--num-samples", n, "--device", "cpu"]


def sweep_args(base_dir: Path, out: Path, *extra, n: int = N) -> list:
    return ["sweep", *common(base_dir, out, n), "--tokens", ",".join(map(str, TOKENS)),
            "--max-new-tokens", 2, *extra]


@pytest.fixture(scope="module")
def features_dir(demo_scienceqa, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("capture") / "features"
    result = vtkit("extract", *common(demo_scienceqa, out))
    assert result.exit_code == 0, result.output
    return out


def fresh(features_dir: Path, tmp_path: Path, name: str) -> Path:
    out = tmp_path / name
    out.mkdir()
    shutil.copy(features_dir / cache.FEATURES_FILE, out / cache.FEATURES_FILE)
    return out


@pytest.fixture(scope="module")
def demo_model():
    from vtkit.model import load_model

    return load_model(str(DEMO_MODEL_DIR), dtype="float32", device="cpu")


def reference_rows(model, base_dir: Path, features_path: Path, capture: str,
                   k: int) -> dict[str, list[torch.Tensor]]:
    """question id -> per decoder layer, the captured tensor's k visual rows [k, d], from the
    model's transformers modules with plain hooks, each question alone."""
    hf = model.hf
    layers = hf.model.language_model.layers
    selection = select_questions(base_dir, num_samples=N)
    config = SweepConfig(model_path="", base_dir=base_dir, tokens=TOKENS)
    items = [it for it in prepare_items(selection.questions, model.tokenizer, config)
             if it.question.has_image]
    with h5py.File(features_path, "r") as f:
        row = {qid: i for i, qid in enumerate(f["question_ids"].asstr()[:])}
        features = {it.question.question_id: f["features"][row[it.question.question_id]]
                    for it in items}
        scores = {it.question.question_id: f["scores/l2"][row[it.question.question_id]]
                  for it in items}
    seen: dict[int, torch.Tensor] = {}

    def keep(i):
        def hook(module, args, output=None):
            if capture == "attn_heads":
                seen[i] = args[0][0]
            elif capture == "attn_out":
                seen[i] = output[0]
            else:
                seen[i] = (output[0] if isinstance(output, tuple) else output)[0]
        return hook

    handles = []
    for i, layer in enumerate(layers):
        if capture == "attn_heads":
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(keep(i)))
        elif capture == "attn_out":
            handles.append(layer.self_attn.o_proj.register_forward_hook(keep(i)))
        else:
            handles.append(layer.register_forward_hook(keep(i)))
    rows = {}
    embed = hf.get_input_embeddings()
    try:
        with torch.no_grad():
            for it in items:
                qid = it.question.question_id
                kept = torch.topk(torch.from_numpy(scores[qid]).float(), k).indices.sort().values
                visual = hf.model.multi_modal_projector(
                    torch.from_numpy(features[qid]).float()[None])[0][kept]
                sequence = torch.cat([embed(torch.tensor(it.prefix)), visual,
                                      embed(torch.tensor(it.suffix))])[None]
                hf.model.language_model(inputs_embeds=sequence)
                start = len(it.prefix)
                rows[qid] = [seen[i][start:start + k].clone() for i in range(len(layers))]
    finally:
        for handle in handles:
            handle.remove()
    return rows


@pytest.fixture(scope="module")
def every_layer(demo_scienceqa, features_dir, tmp_path_factory) -> Path:
    """`vtkit sweep --layers all` of every tensor (one prefill captures them all)."""
    out = tmp_path_factory.mktemp("every") / "out"
    out.mkdir()
    shutil.copy(features_dir / cache.FEATURES_FILE, out / cache.FEATURES_FILE)
    result = vtkit(*sweep_args(demo_scienceqa, out, "--layers", "all", "--capture",
                               ",".join(CAPTURES)))
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("capture", CAPTURES)
def test_every_stored_spectrum_is_svdvals_of_the_captured_rows(
        capture, demo_model, demo_scienceqa, every_layer):
    out = every_layer
    num_layers = demo_model.num_layers
    with h5py.File(out / cache.SWEEP_FILE, "r") as f:
        assert int(f.attrs["schema_version"]) == 3
        assert f.attrs["layers"].tolist() == list(range(num_layers))
        assert int(f.attrs["num_layers"]) == num_layers
        assert json.loads(f.attrs["captures"]) == list(CAPTURES)
        image_ids = [q for q, img in zip(f["question_ids"].asstr()[:], f["has_image"][:],
                                         strict=True) if img]
        assert image_ids
        for k in TOKENS:
            ref = reference_rows(demo_model, demo_scienceqa, out / cache.FEATURES_FILE,
                                 capture, k)
            for layer in range(num_layers):
                stored = f[cache.spectra_dataset(capture, layer, k)][:]
                assert stored.dtype == np.float32
                assert stored.shape == (len(image_ids), min(k, demo_model.hidden_size))
                for j, qid in enumerate(image_ids):
                    expected = torch.linalg.svdvals(ref[qid][layer].double()).numpy()
                    np.testing.assert_allclose(stored[j], expected, rtol=1e-4,
                                               atol=1e-5 * expected[0],
                                               err_msg=f"{capture} layer {layer} k {k} {qid}")
            # The kept raw rows (--keep-attention, 2 by default) are the same rows, in float16.
            kept = f[cache.attention_dataset(capture, num_layers - 1, k)][:]
            np.testing.assert_allclose(kept[0], ref[image_ids[0]][-1].numpy(), rtol=2e-3,
                                       atol=2e-3 * float(np.abs(kept[0]).max()))


def test_a_shared_prefix_gives_each_row_what_it_gets_alone(demo_model, demo_scienceqa):
    """The batch's common prompt prefix runs once and its keys and values go to every row's
    cache: logits, captured rows and decoded answers agree with the batch run whole and with
    each row alone."""
    model = demo_model
    config = SweepConfig(model_path="", base_dir=demo_scienceqa, tokens=TOKENS,
                         max_new_tokens=4)
    selection = select_questions(demo_scienceqa, num_samples=4 * N)
    items = [it for it in prepare_items(selection.questions, model.tokenizer, config)
             if it.question.has_image][:4]
    assert len(items) == 4
    ks = [5, 17, 17, 9]
    g = torch.Generator().manual_seed(0)
    visual = [torch.randn(k, model.hidden_size, generator=g) for k in ks]
    common = shared_prefix(items)
    assert common == len(items[0].prefix) > 0     # the system prompt and "USER:"
    capture = ActivationCapture(model, ("attn_out", "hidden"), [0, model.num_layers - 1])
    try:
        shared = prefill(model, items, visual, capture, share_prefix=True)
        whole = prefill(model, items, visual, capture, share_prefix=False)
        alone = [prefill(model, [it], [v], capture, share_prefix=True)
                 for it, v in zip(items, visual, strict=True)]
    finally:
        capture.close()
    assert shared.reused == 3 * common and whole.reused == 0 and alone[0].reused == 0
    assert shared.tokens == whole.tokens and shared.mask.shape == whole.mask.shape
    torch.testing.assert_close(shared.logits, whole.logits, atol=1e-4, rtol=1e-4)
    for j, k in enumerate(ks):
        torch.testing.assert_close(shared.logits[j], alone[j].logits[0], atol=1e-4, rtol=1e-4)
        for slot, rows in shared.captured.items():
            torch.testing.assert_close(rows[j, :k], alone[j].captured[slot][0, :k], atol=1e-4,
                                       rtol=1e-4, msg=f"{slot} row {j}")
    assert decode(model, items, shared, config, ks) == decode(model, items, whole, config, ks)


def test_the_shared_prefix_leaves_every_row_a_token_of_its_own():
    def item(prefix, suffix=()):
        return PreparedItem(0, None, "", list(prefix), list(suffix))

    assert shared_prefix([item([1, 2, 3, 4], [9]), item([1, 2, 5], [9])]) == 2
    assert shared_prefix([item([1, 2, 3], [9]), item([1, 2, 3], [8])]) == 3
    # Text-only rows are all prefix: identical prompts still keep their last token.
    assert shared_prefix([item([1, 2, 3]), item([1, 2, 3])]) == 2
    assert shared_prefix([item([7, 2]), item([1, 2])]) == 0


def test_several_captures_and_layers_in_one_prefill(demo_scienceqa, features_dir, tmp_path):
    out = fresh(features_dir, tmp_path, "several")
    result = vtkit(*sweep_args(demo_scienceqa, out, "--layers", "2,-1,first", "--capture",
                               "hidden,attn_out", "--keep-attention", "0", n=3))
    assert result.exit_code == 0, result.output
    with h5py.File(out / cache.SWEEP_FILE, "r") as f:
        layers = f.attrs["layers"].tolist()
        assert layers == [0, 2, 5]
        assert json.loads(f.attrs["captures"]) == ["attn_out", "hidden"]    # CAPTURES order
        assert json.loads(f.attrs["config"])["layers"] == "2,-1,first"
        names = sorted(f"{c}/{layer}" for c in f["spectra"] for layer in f[f"spectra/{c}"])
        assert names == [f"{c}/layer{i}" for c in ("attn_out", "hidden") for i in layers]
        assert "attention" not in f
        # The residual stream is not the attention output.
        assert not np.allclose(f[cache.spectra_dataset("hidden", 2, 64)][:],
                               f[cache.spectra_dataset("attn_out", 2, 64)][:])


@pytest.mark.parametrize("command", ["sweep", "run", "bench"])
def test_the_commands_have_layers_and_capture(command):
    help_text = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"}).stdout
    assert " --layers " in help_text and " --capture " in help_text
    assert all(c in " ".join(help_text.split()) for c in CAPTURES)


def test_resolve_layers():
    assert resolve_layers("first,last", 32) == [0, 31]
    assert resolve_layers("all", 4) == [0, 1, 2, 3]
    assert resolve_layers("-1, 2,first,0,last", 32) == [0, 2, 31]
    assert resolve_layers("-32", 32) == [0]
    assert resolve_layers("last", 1) == [0]
    assert resolve_layers("all,-1", 3) == [0, 1, 2]
    assert resolve_layers("first,last") == []    # spelling alone, without the model
    for bad in ("32", "-33", "0,40"):
        with pytest.raises(UsageError, match="--layers: layer .* outside this model's 32"):
            resolve_layers(bad, 32)
    for bad in ("", "middle", "1,,2", "1.5"):
        with pytest.raises(UsageError, match="--layers"):
            resolve_layers(bad, 32)


def test_bad_layers_and_captures_are_refused_before_the_model_loads(demo_scienceqa, tmp_path):
    # No features.h5 here: a flag error must come first (exit 2), before any model or data work.
    out = tmp_path / "none"
    too_deep = vtkit(*sweep_args(demo_scienceqa, out, "--layers", "0,6"))
    assert too_deep.exit_code == 2, too_deep.output
    assert "--layers" in too_deep.output and "6 decoder" in " ".join(too_deep.output.split())
    misspelt = vtkit(*sweep_args(demo_scienceqa, out, "--layers", "fist"))
    assert misspelt.exit_code == 2 and "--layers" in misspelt.output
    unknown = vtkit(*sweep_args(demo_scienceqa, out, "--capture", "attn_out,mlp"))
    assert unknown.exit_code == 2 and "--capture" in unknown.output
    assert not out.exists() or not any(out.iterdir())
    # vtkit run and vtkit bench check their sweep config the same way, before loading.
    from vtkit.extract import ExtractConfig
    from vtkit.pipeline import check_configs

    settings = dict(model_path=str(DEMO_MODEL_DIR), base_dir=demo_scienceqa, output_dir=out)
    with pytest.raises(UsageError, match="--layers: layer -7 is outside"):
        check_configs(ExtractConfig(**settings), SweepConfig(**settings, tokens=[64],
                                                             layers="-7"))


@pytest.fixture(scope="module")
def default_sweep(demo_scienceqa, features_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("default") / "out"
    out.mkdir()
    shutil.copy(features_dir / cache.FEATURES_FILE, out / cache.FEATURES_FILE)
    result = vtkit(*sweep_args(demo_scienceqa, out))
    assert result.exit_code == 0, result.output
    return out


def test_the_default_is_the_first_and_last_layers_attention_output(default_sweep):
    with h5py.File(default_sweep / cache.SWEEP_FILE, "r") as f:
        assert f.attrs["layers"].tolist() == [0, 5]
        assert json.loads(f.attrs["captures"]) == ["attn_out"]
        assert sorted(f["spectra"]) == ["attn_out"]
        assert sorted(f["spectra/attn_out"]) == ["layer0", "layer5"]
        assert sorted(f["attention/attn_out/layer5"]) == ["k576", "k64"]


def test_changed_layers_or_captures_are_refused_naming_them(default_sweep, demo_scienceqa):
    same = vtkit(*sweep_args(demo_scienceqa, default_sweep, "--layers", "0,-1"))
    assert same.exit_code == 0, same.output   # the same layers, spelt otherwise
    assert "nothing to do" in " ".join(same.output.split())
    for flag, value, key in (("--layers", "all", "layers"),
                             ("--capture", "attn_out,hidden", "captures")):
        other = vtkit(*sweep_args(demo_scienceqa, default_sweep, flag, value))
        assert other.exit_code == 1, other.output
        message = " ".join(other.output.split())
        assert "other inputs" in message and key in message and "--force" in message


def test_a_sweep_file_of_the_old_schema_is_refused(default_sweep, demo_scienceqa, tmp_path):
    out = tmp_path / "old"
    shutil.copytree(default_sweep, out)
    with h5py.File(out / cache.SWEEP_FILE, "r+") as f:
        f.attrs["schema_version"] = 2
    refused = vtkit(*sweep_args(demo_scienceqa, out))
    assert refused.exit_code == 1
    lines = refused.output.strip().splitlines()
    assert len(lines) == 1 and "schema version 2" in lines[0] and "version 3" in lines[0]
    assert "--force" in lines[0]
    forced = vtkit(*sweep_args(demo_scienceqa, out, "--force"))
    assert forced.exit_code == 0, forced.output
    assert int(cache.read_attrs(out / cache.SWEEP_FILE)["schema_version"]) == 3


def test_a_features_cache_of_schema_2_is_refused_by_the_sweep(features_dir, demo_scienceqa,
                                                              tmp_path):
    out = tmp_path / "old-features"
    out.mkdir()
    shutil.copy(features_dir / cache.FEATURES_FILE, out / cache.FEATURES_FILE)
    with h5py.File(out / cache.FEATURES_FILE, "r+") as f:
        f.attrs["schema_version"] = 2
    refused = vtkit(*sweep_args(demo_scienceqa, out))
    assert refused.exit_code == 1
    line = " ".join(refused.output.split())
    assert str(out / cache.FEATURES_FILE) in line and "schema version 2" in line
    assert "vtkit extract --force" in line


def test_the_config_refuses_an_unknown_capture(demo_scienceqa):
    config = SweepConfig(model_path="", base_dir=demo_scienceqa, tokens=TOKENS,
                         captures=["attn_out", "values"])
    with pytest.raises(UsageError, match="--capture: unknown tensor 'values'"):
        config.validate()
    with pytest.raises(UsageError, match="--capture"):
        SweepConfig(model_path="", base_dir=demo_scienceqa, tokens=TOKENS,
                    captures=[]).validate()


class _TupleLayer(torch.nn.Module):
    """A decoder layer that returns a tuple, as some transformers versions' do."""

    def __init__(self) -> None:
        super().__init__()
        self.self_attn = torch.nn.Module()
        self.self_attn.o_proj = torch.nn.Linear(4, 4, bias=False)

    def forward(self, x):
        return (x + self.self_attn.o_proj(x * 2), None)


def test_hidden_capture_takes_the_first_element_of_a_tuple_output():
    class Toy:
        decoder_layers = [_TupleLayer()]
        hidden_size = 4

    capture = ActivationCapture(Toy(), ["attn_heads", "attn_out", "hidden"], [0])
    x = torch.randn(2, 5, 4)
    capture.rows = torch.tensor([[1, 2], [3, 3]])
    capture.valid = torch.tensor([[True, True], [True, False]])
    try:
        out, _ = Toy.decoder_layers[0](x)
    finally:
        capture.close()
    assert capture.widths == {("attn_heads", 0): 4, ("attn_out", 0): 4, ("hidden", 0): 4}
    expected_rows = {"attn_heads": x * 2, "attn_out": out - x, "hidden": out}
    for name, full in expected_rows.items():
        got = capture.captured[(name, 0)]
        torch.testing.assert_close(got[0], full[0, 1:3])
        torch.testing.assert_close(got[1, 0], full[1, 3])
        assert not got[1, 1].any()    # past the row's k: zeros


def test_bench_layers_all_captures_every_layer(tmp_path):
    result = vtkit("bench", "--shape", "tiny", "--questions", 2, "--tokens", "64",
                   "--seed-questions", 1, "--device", "cpu", "--layers", "all",
                   "--capture", "attn_out,hidden", "--output-dir", tmp_path, "--json")
    assert result.exit_code == 0, result.output
    with h5py.File(tmp_path / "run" / cache.SWEEP_FILE, "r") as f:
        num_layers = int(f.attrs["num_layers"])
        assert f.attrs["layers"].tolist() == list(range(num_layers))
        assert all(cache.spectra_dataset(c, layer, 64) in f for c in ("attn_out", "hidden")
                   for layer in range(num_layers))
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["layers"] == "all" and saved["captures"] == ["attn_out", "hidden"]


def test_pinned_buffers_are_reused(monkeypatch):
    import vtkit.sweep as sweep_module

    made = []
    plain_empty = torch.empty

    def empty(*shape, pin_memory=False, **kw):    # no CUDA here: pinning is not possible
        made.append(shape)
        return plain_empty(*shape, **kw)

    monkeypatch.setattr(torch, "empty", empty)
    pool = sweep_module._PinnedBuffers(limit=2)
    first = pool.take(100)
    assert first.numel() == 128     # rounded up to a power of two
    pool.give(first)
    assert pool.take(90) is first   # a buffer that fits is reused, not allocated again
    second = pool.take(300)
    pool.give(first)
    pool.give(second)
    pool.give(pool.take(1000))
    assert len(made) == 3 and len(pool.idle) == 2
    # Beyond the limit the smallest idle buffer goes.
    assert not any(b is first for b in pool.idle)


def test_the_token_budget_leaves_room_for_more_captured_slots(monkeypatch):
    from types import SimpleNamespace

    from vtkit.bench import shape_config
    from vtkit.generate import default_token_budget

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (100 * 2**30, 140 * 2**30))
    seven_b = SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16, num_patches=576,
                              language_model=SimpleNamespace(config=shape_config(
                                  "llava-1.5-7b").text_config))
    seed = default_token_budget(seven_b)
    assert default_token_budget(seven_b, 2) == seed       # the seed's two slots: as before
    every = default_token_budget(seven_b, 3 * 32)
    assert every < 0.6 * seed
    # What the further slots hold fits in the share the budget gives them.
    per_token = (4096 * 2 + 576 * 8) * (3 * 32 - 2)
    assert every * per_token < 0.6 * 100 * 2**30


def test_waiting_batches_are_bounded_by_bytes():
    """Batches waiting for their eigenvalues hold their Gram matrices: with every layer of a 7B
    model one batch holds gigabytes, so the writer waits by bytes, not only by count."""
    import threading

    import vtkit.sweep as sweep_module

    done: list[str] = []
    release = threading.Event()

    def slow(name):
        release.wait(5)
        done.append(name)

    writer = sweep_module._PartWriter(workers=2, max_bytes=100)
    writer.submit(slow, "first", nbytes=60)
    assert done == []                       # the first batch still waits for its worker
    threading.Timer(0.2, release.set).start()
    writer.submit(slow, "second", nbytes=60)  # 120 bytes would not fit: waits for the first
    assert done == ["first"]
    writer.close()
    assert done == ["first", "second"]
    pool = sweep_module._PinnedBuffers(limit=10, max_bytes=8 * 1024)
    for _ in range(4):
        pool.give(torch.empty(512, dtype=torch.float64))   # 4 KiB each
    assert sum(b.numel() * 8 for b in pool.idle) <= 8 * 1024


def test_a_batchs_eigenvalues_spread_over_the_solver_threads():
    """The eigenvalues of one batch's Gram matrices run in pieces of about equal cost on the
    writer's solver threads: the values equal those of one LAPACK call per stack, and the
    last batch of a sweep no longer holds its end on a single thread."""
    from concurrent.futures import ThreadPoolExecutor

    import vtkit.sweep as sweep_module
    from vtkit.pruning import spectra_from_gram

    rng = np.random.default_rng(0)

    def stack(rows, m):
        x = rng.standard_normal((rows, m, 2 * m))
        return torch.from_numpy(x @ x.transpose(0, 2, 1))

    grams = {("attn", 0, 40): stack(7, 40), ("attn", 0, 10): stack(30, 10),
             ("attn", 31, 40): stack(7, 40)}
    spans = sweep_module._eigen_spans(grams, 4)
    for key, g in grams.items():                  # each stack covered once, in order
        assert [i for a, b in spans[key] for i in range(a, b)] == list(range(len(g)))
    costs = [(b - a) * grams[key].shape[-1] ** 3 for key in spans for a, b in spans[key]]
    assert 4 <= len(costs) <= 8
    assert max(costs) <= sum(costs) / 4           # no piece above a quarter of the work
    assert sweep_module._eigen_spans({("attn", 0, 9): stack(3, 9)}, 8)[("attn", 0, 9)] == [
        (0, 1), (1, 2), (2, 3)]                    # one row at least per piece

    submitted = []

    class Recording(ThreadPoolExecutor):
        def submit(self, fn, *args):
            submitted.append(len(args[0]))
            return super().submit(fn, *args)

    with Recording(max_workers=4) as solvers:
        split = sweep_module._HostGrams(grams, {}, solvers=solvers, parts=4).values()
    whole = sweep_module._HostGrams(grams, {}).values()
    assert split.keys() == whole.keys()
    for key in whole:
        np.testing.assert_array_equal(split[key], whole[key])
        np.testing.assert_array_equal(whole[key], spectra_from_gram(grams[key].numpy()))
    assert len(submitted) == len(costs) and sum(submitted) == 7 + 30 + 7


def test_a_failing_eigenvalue_piece_surfaces_after_every_piece_has_ended(monkeypatch):
    """An error in one piece reaches the batch's thread, and only once every other piece has
    ended: the pinned buffer they read goes back to the pool right after."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import vtkit.sweep as sweep_module

    ended, first = [], threading.Event()

    def solve(gram):
        if not first.is_set():
            first.set()
            raise np.linalg.LinAlgError("no convergence")
        threading.Event().wait(0.05)          # later pieces still running when the first fails
        ended.append(len(gram))
        return np.zeros((len(gram), gram.shape[-1]), np.float32)

    monkeypatch.setattr(sweep_module, "spectra_from_gram", solve)
    grams = {("attn", 0, 8): torch.eye(8, dtype=torch.float64).repeat(6, 1, 1)}
    with ThreadPoolExecutor(max_workers=3) as solvers:
        with pytest.raises(np.linalg.LinAlgError, match="no convergence"):
            sweep_module._HostGrams(grams, {}, solvers=solvers, parts=6).values()
        assert sum(ended) == 5                   # the five other rows, all ended
