"""Caches that never return stale results, and flags checked before anything is touched.

Most tests copy one finished `vtkit run` of the shipped demo model (8 questions, 3 k) and
change one input: the fingerprints must refuse (naming what changed), re-score, or accept an
input that is only spelled differently.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vtkit.cache import FEATURES_SCHEMA_VERSION
from vtkit.cli.main import app
from vtkit.data import build_question_entries, load_question_file, write_question_file
from vtkit.demo import DEMO_MODEL_DIR
from vtkit.errors import UsageError
from vtkit.extract import ExtractConfig
from vtkit.generate import sampling_candidates
from vtkit.rank import RankConfig
from vtkit.sweep import SweepConfig

SELECT = ["--num-samples", "8", "--device", "cpu"]
TOKENS = ["--tokens", "576,64,20"]
RESULTS = ("ranks.json", "raw_results.json", "normalized_results.json",
           "pruning_experiment_results.png", "pruning_experiment_raw.pdf")


def vtkit(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def stage(command: str, model: Path | str, base_dir: Path, out: Path, *extra):
    tokens = TOKENS if command in ("sweep", "run") else []
    return vtkit(command, "--model-path", model, "--base-dir", base_dir, "--output-dir", out,
                 *SELECT, *tokens, *extra)


def one_line(result) -> str:
    assert result.exit_code != 0, result.output
    return " ".join(result.output.split())


@pytest.fixture(scope="module")
def finished(demo_scienceqa, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "out"
    result = stage("run", DEMO_MODEL_DIR, demo_scienceqa, out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def run_dir(finished, demo_scienceqa, tmp_path) -> tuple[Path, Path]:
    """A private copy of the finished run and of its ScienceQA folder: (base dir, output dir)."""
    base = shutil.copytree(demo_scienceqa, tmp_path / "scienceqa")
    return base, shutil.copytree(finished, tmp_path / "out")


def model_copy(tmp_path: Path, name: str = "model") -> Path:
    return shutil.copytree(DEMO_MODEL_DIR, tmp_path / name)


def edit_json(path: Path, **changes) -> None:
    document = json.loads(path.read_text())
    document.update(changes)
    path.write_text(json.dumps(document))


def image_paths(out: Path) -> list[str]:
    with h5py.File(out / "features.h5", "r") as f:
        return f["image_paths"].asstr()[:].tolist()


def write_other_png_of_size(path: Path, size: int) -> None:
    """Replace a PNG by another picture whose file has exactly ``size`` bytes: a flat quarter
    compresses better, and a text chunk pads the file back to the old length."""
    from PIL import Image, PngImagePlugin

    image = Image.open(path).convert("RGB")
    image.paste((1, 2, 3), (0, 0, image.width // 2, image.height // 2))
    image.save(path)
    padding = size - path.stat().st_size - 12 - 2     # chunk header/CRC, keyword and NUL
    assert padding >= 0
    info = PngImagePlugin.PngInfo()
    info.add_text("c", "x" * padding)
    image.save(path, pnginfo=info)


def accepted(result) -> bool:
    return result.exit_code == 0 and "nothing to do" in result.output


# --------------------------------------------------------------------------------------------
# 1. extract: each image's content, the vision settings, the schema


def test_features_record_each_images_sha256(finished, demo_scienceqa):
    with h5py.File(finished / "features.h5", "r") as f:
        stored = f["image_sha256"].asstr()[:].tolist()
        assert "image_sizes" not in f and "image_mtimes_ns" not in f
        assert int(f.attrs["schema_version"]) == FEATURES_SCHEMA_VERSION
    folder = demo_scienceqa / "images" / "test"
    assert stored == [hashlib.sha256((folder / p).read_bytes()).hexdigest()
                      for p in image_paths(finished)]


def test_a_touched_image_is_the_same_input(run_dir):
    base, out = run_dir
    image = base / "images" / "test" / image_paths(out)[0]
    os.utime(image, ns=(0, image.stat().st_mtime_ns + 10**12))
    assert accepted(stage("extract", DEMO_MODEL_DIR, base, out))


def test_a_changed_image_of_equal_size_and_mtime_is_refused(run_dir):
    base, out = run_dir
    image = base / "images" / "test" / image_paths(out)[0]
    before = image.stat()
    write_other_png_of_size(image, before.st_size)
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert image.stat().st_size == before.st_size
    message = one_line(stage("extract", DEMO_MODEL_DIR, base, out))
    assert "changed: images" in message and "--force" in message


def test_other_image_normalisation_is_refused_naming_vision(run_dir, tmp_path):
    base, out = run_dir
    model = model_copy(tmp_path)
    edit_json(model / "preprocessor_config.json", image_mean=[0.5, 0.5, 0.5])
    message = one_line(stage("extract", model, base, out))
    assert "changed: vision" in message


def test_an_older_schema_names_its_version_and_the_fix(run_dir):
    base, out = run_dir
    with h5py.File(out / "features.h5", "r+") as f:
        f.attrs["schema_version"] = 1
    message = one_line(stage("extract", DEMO_MODEL_DIR, base, out))
    assert "schema version 1" in message and "--force" in message
    assert stage("extract", DEMO_MODEL_DIR, base, out, "--force").exit_code == 0


# --------------------------------------------------------------------------------------------
# 2. sweep: prompts, tokenizer, answer key


def test_qcm_lea_file_with_the_same_ids_is_refused(run_dir, tmp_path):
    base, out = run_dir
    cqma = load_question_file(base / "llava_test_CQM-A.json")
    problems = json.loads((base / "problems.json").read_text())
    lea = write_question_file(
        build_question_entries(problems, [q.question_id for q in cqma], "QCM-LEA"),
        tmp_path / "llava_test_QCM-LEA.json")
    message = one_line(stage("sweep", DEMO_MODEL_DIR, base, out, "--question-file", lea))
    assert "sweep.h5" in message and "changed: prompts" in message and "--force" in message


def test_another_tokenizer_is_refused_naming_it(run_dir, tmp_path):
    base, out = run_dir
    model = model_copy(tmp_path)
    edit_json(model / "tokenizer_config.json", model_max_length=4096)
    assert accepted(stage("extract", model, base, out))     # same weights: same features
    message = one_line(stage("sweep", model, base, out))
    assert "changed: tokenizer" in message


def test_a_changed_answer_key_is_rescored(run_dir):
    base, out = run_dir
    with h5py.File(out / "sweep.h5", "r") as f:
        pids = f["question_ids"].asstr()[:].tolist()
        before = f["correct"][:].sum(axis=1)
        fingerprint = f.attrs["fingerprint"]
    assert before[0] > 0
    problems = json.loads((base / "problems.json").read_text())
    for pid in pids:
        problems[pid]["answer"] = (problems[pid]["answer"] + 1) % len(problems[pid]["choices"])
    (base / "problems.json").write_text(json.dumps(problems))

    result = stage("sweep", DEMO_MODEL_DIR, base, out)
    assert result.exit_code == 0, result.output
    assert "re-scored" in result.output
    with h5py.File(out / "sweep.h5", "r") as f:
        after = f["correct"][:].sum(axis=1)
        assert f.attrs["fingerprint"] == fingerprint      # the answers still stand
    assert list(after) != list(before)
    for row, k in enumerate((576, 64, 20)):
        scored = vtkit("score", out / "answers" / f"k{k}.jsonl", "--base-dir", base, "--json")
        assert scored.exit_code == 0, scored.output
        assert json.loads(scored.stdout)["correct"] == after[row]
    # The figures of the old scores are gone; ranks.json still fits, so plot redraws at once.
    assert not (out / "raw_results.json").exists() and (out / "ranks.json").exists()
    assert vtkit("plot", "--output-dir", out).exit_code == 0
    raw = json.loads((out / "raw_results.json").read_text())
    assert raw["accuracies"][0] == pytest.approx(100.0 * after[0] / len(pids))
    assert accepted(stage("sweep", DEMO_MODEL_DIR, base, out))


# --------------------------------------------------------------------------------------------
# 3. one model, however it is spelled


def test_every_spelling_of_one_model_is_the_same_input(run_dir, tmp_path, monkeypatch):
    base, out = run_dir
    shutil.copytree(DEMO_MODEL_DIR, tmp_path / "demo" / "llava-tiny-hf")
    (tmp_path / "link").symlink_to(tmp_path / "demo" / "llava-tiny-hf")
    monkeypatch.chdir(tmp_path)
    spellings = ["demo/llava-tiny-hf", "./demo/llava-tiny-hf", "demo/llava-tiny-hf/",
                 str(tmp_path / "demo" / "llava-tiny-hf"), "link"]
    for spelling in spellings:
        for command in ("extract", "sweep"):
            result = stage(command, spelling, base, out)
            assert accepted(result), (spelling, command, result.output)


# --------------------------------------------------------------------------------------------
# 5. sampling follows the checkpoint's generation config


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 50, 1.0), (0.7, 5, 1.0), (0.2, 50, 0.9), (1.3, 0, 0.5), (0.5, 3, 0.05), (2.0, 8, 0.3)])
def test_warpers_match_transformers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(4, 40, generator=torch.Generator().manual_seed(7)) * 3
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    expected = torch.softmax(warpers(None, logits.clone()), dim=-1)
    values, indices = sampling_candidates(logits, temperature, top_k, top_p)
    ours = torch.zeros_like(expected).scatter(-1, indices, torch.softmax(values, dim=-1))
    assert torch.equal(ours > 0, expected > 0)
    torch.testing.assert_close(ours, expected)


def test_sampling_defaults_are_transformers_where_the_checkpoint_names_none(tmp_path):
    from vtkit.model import sampling_defaults

    assert sampling_defaults(tmp_path) == {"top_k": 50, "top_p": 1.0}
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": 0.9}))
    assert sampling_defaults(tmp_path) == {"top_k": 50, "top_p": 0.9}


def test_sampling_reads_top_k_from_generation_config(run_dir, tmp_path):
    base, out = run_dir
    model = model_copy(tmp_path)
    edit_json(model / "generation_config.json", top_k=1, top_p=0.8)
    sampled = tmp_path / "sampled"
    shutil.copytree(out, sampled, ignore=shutil.ignore_patterns("sweep.h5", "answers", "*.json",
                                                                "*.png", "*.pdf"))
    result = stage("sweep", model, base, sampled, "--temperature", "0.7")
    assert result.exit_code == 0, result.output
    with h5py.File(sampled / "sweep.h5", "r") as f:
        config, inputs = json.loads(f.attrs["config"]), json.loads(f.attrs["inputs"])
        sampled_answers = f["answers"].asstr()[:]
    assert config["decode"] == {"temperature": 0.7, "max_new_tokens": 1024, "top_k": 1,
                                "top_p": 0.8}
    assert (inputs["top_k"], inputs["top_p"]) == (1, 0.8)
    # top-k 1 keeps only the most likely token: sampling gives the greedy answers.
    with h5py.File(out / "sweep.h5", "r") as f:
        assert (f["answers"].asstr()[:] == sampled_answers).all()


# --------------------------------------------------------------------------------------------
# 6. the checkpoint's image-mode default


def test_the_checkpoints_image_mode_is_the_default(finished, demo_scienceqa, tmp_path):
    with h5py.File(finished / "features.h5", "r") as f:
        assert f.attrs["image_mode"] == "pad"      # the demo model says image_aspect_ratio pad
    model = model_copy(tmp_path)
    edit_json(model / "config.json", image_aspect_ratio="square")
    out = tmp_path / "out"
    assert stage("extract", model, demo_scienceqa, out, "--num-samples", "2").exit_code == 0
    with h5py.File(out / "features.h5", "r") as f:
        assert f.attrs["image_mode"] == "crop"
        assert json.loads(f.attrs["inputs"])["image_mode"] == "crop"


# --------------------------------------------------------------------------------------------
# 7. validate everything before touching anything


def test_a_bad_image_mode_with_force_keeps_the_cache(run_dir):
    base, out = run_dir
    before = (out / "features.h5").read_bytes()
    result = stage("extract", DEMO_MODEL_DIR, base, out, "--image-mode", "bogus", "--force")
    assert result.exit_code == 2 and "--image-mode" in result.output
    assert (out / "features.h5").read_bytes() == before
    assert (out / "sweep.h5").exists()


@pytest.mark.parametrize("flag, value", [
    ("--conv-mode", "bogus"), ("--scorer", "bogus"), ("--max", "600"), ("--threshold", "5"),
    ("--tokens", "20,20"), ("--image-mode", "bogus"), ("--dtype", "int3"), ("--device", "tpu"),
    ("--num-samples", "0")])
def test_run_checks_every_flag_before_any_work(demo_scienceqa, tmp_path, flag, value):
    out = tmp_path / "out"
    args = ["run", "--model-path", DEMO_MODEL_DIR, "--base-dir", demo_scienceqa,
            "--output-dir", out, "--device", "cpu", "--num-samples", "4"]
    if flag != "--max":
        args += ["--tokens", "576,20"]
    result = vtkit(*args, flag, value)
    assert result.exit_code == 2, result.output
    assert flag in result.output or (flag == "--max" and "--tokens/--max" in result.output)
    assert not (out / "features.h5").exists()


def test_sweep_checks_its_flags_before_loading_the_model(demo_scienceqa, tmp_path):
    missing_model = tmp_path / "no-such-model"
    result = stage("sweep", missing_model, demo_scienceqa, tmp_path / "out",
                   "--conv-mode", "bogus")
    assert result.exit_code == 2 and "--conv-mode" in result.output


@pytest.mark.parametrize("config, flag", [
    (ExtractConfig("m", Path("b"), image_mode="square"), "--image-mode"),
    (ExtractConfig("m", Path("b"), batch_size=0), "--batch-size"),
    (ExtractConfig("m", Path("b"), num_samples=-3), "--num-samples"),
    (ExtractConfig("m", Path("b"), dtype="int8"), "--dtype"),
    (ExtractConfig("m", Path("b"), device="gpu0"), "--device"),
    (SweepConfig("m", Path("b"), tokens=[]), "--tokens"),
    (SweepConfig("m", Path("b"), tokens=[64, 64]), "--tokens"),
    (SweepConfig("m", Path("b"), tokens=[-1]), "--tokens"),
    (SweepConfig("m", Path("b"), tokens=[20], scorer="norm"), "--scorer"),
    (SweepConfig("m", Path("b"), tokens=[20], conv_mode="chatml"), "--conv-mode"),
    (SweepConfig("m", Path("b"), tokens=[20], temperature=-0.1), "--temperature"),
    (SweepConfig("m", Path("b"), tokens=[20], temperature=float("nan")), "--temperature"),
    (SweepConfig("m", Path("b"), tokens=[20], max_new_tokens=0), "--max-new-tokens"),
    (SweepConfig("m", Path("b"), tokens=[20], batch_size=0), "--batch-size"),
    (SweepConfig("m", Path("b"), tokens=[20], token_budget=0), "--token-budget"),
    (SweepConfig("m", Path("b"), tokens=[20], keep_attention=-1), "--keep-attention"),
    (RankConfig(Path("o"), threshold=1.5), "--threshold"),
    (RankConfig(Path("o"), threshold=0.0), "--threshold"),
])
def test_validate_names_the_flag(config, flag):
    with pytest.raises(UsageError, match=flag):
        config.validate()


def test_the_patch_count_comes_from_the_checkpoint_config(tiny_models):
    from vtkit.model import checkpoint_num_patches

    assert checkpoint_num_patches(DEMO_MODEL_DIR) == 576
    assert checkpoint_num_patches(tiny_models["hf"]) == 576
    assert checkpoint_num_patches(tiny_models["orig"]) == 576


def test_force_with_a_new_grid_leaves_no_old_outputs(run_dir):
    base, out = run_dir
    result = stage("sweep", DEMO_MODEL_DIR, base, out, "--tokens", "576,100", "--force")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "answers").iterdir()) == ["k100.jsonl", "k576.jsonl"]
    assert not any((out / name).exists() for name in RESULTS)
    assert (out / "features.h5").exists()


def test_extract_force_removes_what_was_made_from_the_old_features(run_dir):
    base, out = run_dir
    result = stage("extract", DEMO_MODEL_DIR, base, out, "--image-mode", "crop", "--force")
    assert result.exit_code == 0, result.output
    left = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert left == ["features.h5"]


@pytest.mark.parametrize("name, command", [("features.h5", "extract"), ("sweep.h5", "sweep")])
def test_a_truncated_cache_is_named_then_replaced_under_force(run_dir, name, command):
    base, out = run_dir
    path = out / name
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 3)
    message = one_line(stage(command, DEMO_MODEL_DIR, base, out))
    assert name in message and "delete it or pass --force" in message
    result = stage(command, DEMO_MODEL_DIR, base, out, "--force")
    assert result.exit_code == 0, result.output
    with h5py.File(path, "r") as f:
        assert bool(f.attrs["complete"])
        assert np.asarray(f["question_ids"]).shape[0] > 0
