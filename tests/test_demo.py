"""The synthetic demo ScienceQA folder: layout, determinism, images, answers, guessability."""

from __future__ import annotations

import copy
import json
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from vtkit.data import build_question_entries, load_question_file, write_question_file
from vtkit.demo import task
from vtkit.errors import UsageError

FIELDS = ("question", "choices", "answer", "hint", "image", "task", "grade", "subject", "topic",
          "category", "skill", "lecture", "solution", "split")
SPLIT_KEYS = {"train", "val", "test", "trainval", "minitrain", "minival", "minitest"}
SUBJECTS = {"natural science", "social science", "language science"}
MODES = {"RGB", "RGBA", "P", "L", "LA"}


def _load(folder: Path) -> tuple[dict, dict]:
    return (json.loads((folder / "problems.json").read_text()),
            json.loads((folder / "pid_splits.json").read_text()))


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def _grey(rgb: tuple[int, int, int]) -> int:
    return Image.new("RGB", (1, 1), rgb).convert("L").getpixel((0, 0))


def test_layout_and_fields(demo_scienceqa):
    problems, splits = _load(demo_scienceqa)
    assert set(splits) == SPLIT_KEYS
    assert len(splits["test"]) == 60 and splits["train"] == splits["val"] == []
    assert set(splits["minitest"]) < set(splits["test"]) and splits["minitest"]
    assert set(problems) == set(splits["test"])
    text_only = 0
    for pid, problem in problems.items():
        assert tuple(problem) == FIELDS, pid
        assert 2 <= len(problem["choices"]) <= 5 and len(set(problem["choices"])) == len(
            problem["choices"])
        assert 0 <= problem["answer"] < len(problem["choices"])
        assert problem["subject"] in SUBJECTS and problem["split"] == "test"
        assert re.fullmatch(r"grade([1-9]|1[0-2])", problem["grade"])
        assert isinstance(problem["hint"], str) and problem["lecture"] and problem["solution"]
        folder = demo_scienceqa / "images" / "test" / pid
        if problem["image"] is None:
            text_only += 1
            assert not folder.exists()
        else:
            assert problem["image"] == "image.png" and (folder / "image.png").is_file()
    assert 0.15 <= text_only / len(problems) <= 0.25
    assert {p["subject"] for p in problems.values()} == SUBJECTS
    assert any(p["hint"] for p in problems.values() if p["image"])
    assert any(not p["hint"] for p in problems.values() if p["image"] is None)


def test_images_in_every_mode_and_several_sizes(demo_scienceqa):
    generated = {p.pid: p for p in task.generate_problems("test", 60, seed=0)}
    modes, sizes = Counter(), Counter()
    for image_path in (demo_scienceqa / "images" / "test").glob("*/image.png"):
        with Image.open(image_path) as image:
            expected = generated[image_path.parent.name]
            assert (image.mode, image.size) == (expected.mode, expected.size)
            modes[image.mode] += 1
            sizes[image.size] += 1
    assert set(modes) == MODES and modes["RGB"] > sum(modes.values()) / 2
    assert len(sizes) >= 4 and any(w != h for w, h in sizes)


def test_images_show_their_scene(demo_scienceqa):
    """Every object centre has the object's colour, every empty cell the background; RGBA/LA
    images are opaque exactly on the objects."""
    for problem in task.generate_problems("test", 60, seed=0):
        if problem.scene is None:
            continue
        scene, size = problem.scene, problem.size
        with Image.open(demo_scienceqa / "images" / "test" / problem.pid / "image.png") as image:
            image.load()
        rgb = image.convert("RGB")
        grey = problem.mode in ("L", "LA")

        def expected(colour, grey=grey):
            return (_grey(colour),) * 3 if grey else colour

        for obj in scene.objects:
            point = task.scene_to_image(scene, obj.centre, size)
            assert rgb.getpixel(point) == expected(task.COLOURS[obj.colour]), problem.pid
            if "A" in problem.mode:
                assert image.getpixel(point)[-1] == 255
        empty = [(r, c) for r in range(task.GRID) for c in range(task.GRID) if not scene.at(r, c)]
        for row, col in empty:
            centre = ((col + 0.5) * task.CELL, (row + 0.5) * task.CELL)
            point = task.scene_to_image(scene, centre, size)
            assert rgb.getpixel(point) == expected(scene.background), problem.pid
            if "A" in problem.mode:
                assert image.getpixel(point)[-1] == 0


def test_same_seed_same_bytes_and_splits_independent(tmp_path, demo_scienceqa):
    first = task.write_demo_scienceqa(tmp_path / "a", seed=3, n_test=20, n_train=20, n_val=20)
    second = task.write_demo_scienceqa(tmp_path / "b", seed=3, n_test=20, n_train=20, n_val=20)
    files = _files(first)
    assert files == _files(second)
    assert any(name.startswith("images/train/") for name in files)
    assert any(name.startswith("images/val/") for name in files)
    other = task.write_demo_scienceqa(tmp_path / "c", seed=4, n_test=20)
    assert (other / "problems.json").read_bytes() != files["problems.json"]

    # The test split does not change with the other splits' sizes, and its first n problems are
    # those of any larger n.
    problems, splits = _load(first)
    assert splits["trainval"] == splits["train"] + splits["val"]
    assert not set(splits["train"]) & set(splits["test"])
    reference, reference_splits = _load(demo_scienceqa)
    assert splits["test"] == reference_splits["test"][:20]
    assert problems[splits["test"][0]] != reference[reference_splits["test"][0]]  # seed 3 vs 0
    longer = task.generate_problems("test", 60, seed=3)
    assert [p.problem for p in longer[:20]] == [problems[pid] for pid in splits["test"]]


def test_rewrite_removes_stale_images(tmp_path):
    folder = task.write_demo_scienceqa(tmp_path / "d", seed=0, n_test=20, n_train=10)
    task.write_demo_scienceqa(folder, seed=0, n_test=20)
    assert not (folder / "images" / "train").exists()


def test_cqma_file_is_what_vtkit_data_builds(demo_scienceqa, tmp_path):
    problems, splits = _load(demo_scienceqa)
    entries = build_question_entries(problems, splits["test"], "CQM-A")
    expected = write_question_file(entries, tmp_path / "expected.json")
    assert (demo_scienceqa / "llava_test_CQM-A.json").read_text() == expected.read_text()
    questions = load_question_file(demo_scienceqa / "llava_test_CQM-A.json")
    assert [q.question_id for q in questions] == splits["test"]
    for question in questions:
        problem = problems[question.question_id]
        assert question.answer == "ABCDE"[problem["answer"]]
        assert question.has_image == (problem["image"] is not None)
        assert question.text.startswith("<image>\n") == question.has_image


def _scene_truth(problem: task.DemoProblem) -> str:
    """The answer recomputed from the scene, independently of vtkit.demo's own answer code."""
    objects, params = problem.scene.objects, problem.params
    kind = problem.template
    if kind in ("colour_at", "shape_at"):
        (obj,) = [o for o in objects if task.POSITIONS[(o.row, o.col)] == params["position"]]
        return obj.colour if kind == "colour_at" else obj.shape
    if kind == "count_colour":
        return str(sum(o.colour == params["colour"] for o in objects))
    if kind == "count_shape":
        return str(sum(o.shape == params["shape"] for o in objects))
    if kind == "count_total":
        return str(len(objects))
    assert kind == "has_object"
    found = any(o.colour == params["colour"] and o.shape == params["shape"] for o in objects)
    return "yes" if found else "no"


def _text_truth(problem: task.DemoProblem) -> str:
    """The answer read off the hint (or the question alone) of a text-only problem."""
    hint, question = problem.problem["hint"], problem.problem["question"]
    if problem.template == "count_story":
        return str(sum(int(n) for n in re.findall(r"\d+", hint)))
    if problem.template == "owner_colour":
        who, item = re.fullmatch(r"What color is (\w+)'s (\w+)\?", question).groups()
        return re.search(rf"{who} has an? (\w+) {item}", hint).group(1)
    if problem.template == "line_order":
        place = re.fullmatch(r"Who is (\w+) in line\?", question).group(1)
        return re.search(rf"(\w+) is {place}", hint).group(1)
    assert problem.template == "shape_corners" and hint == ""
    corners = re.fullmatch(r"Which shape has (.+)\?", question).group(1)
    return {"no corners": "circle", "three corners": "triangle", "four corners": "square"}[corners]


@pytest.mark.parametrize("split", ["test", "train"])
def test_every_answer_is_right_and_the_only_right_choice(split):
    for problem in task.generate_problems(split, 400, seed=1):
        record = problem.problem
        truth = _scene_truth(problem) if problem.scene else _text_truth(problem)
        assert record["choices"].count(truth) == 1, problem.pid
        assert record["choices"][record["answer"]] == truth, problem.pid
        if problem.scene is None:
            continue
        for word in problem.params.values():
            assert word in record["question"]
        if problem.mode in ("L", "LA"):
            assert not task.IMAGE_TEMPLATES[problem.template].needs_colour, problem.pid
        cells = [(o.row, o.col) for o in problem.scene.objects]
        assert len(set(cells)) == len(cells)
        for obj in problem.scene.objects:
            x0, y0, x1, y1 = obj.box
            assert x1 - x0 == y1 - y0 and 72 <= x1 - x0 <= 90
            assert obj.col * task.CELL <= x0 and x1 <= (obj.col + 1) * task.CELL
            assert obj.row * task.CELL <= y0 and y1 <= (obj.row + 1) * task.CELL


def test_options_fixed_per_kind_answers_balanced_and_text_alone_near_chance():
    generated = task.generate_problems("test", 1000, seed=0)
    problems = {p.pid: p.problem for p in generated}
    by_kind = {}
    for p in generated:
        by_kind.setdefault(p.template, []).append(p.problem)
    for kind, records in by_kind.items():
        # One option list per kind (in line_order: the people of the hint, in line order).
        if kind != "line_order":
            assert len({tuple(r["choices"]) for r in records}) == 1, kind
        letters = Counter(r["answer"] for r in records)
        n_options = len(records[0]["choices"])
        assert 2 <= n_options <= 5
        assert len(letters) == n_options and max(letters.values()) - min(letters.values()) <= 1
    assert {p.template for p in generated} == set(task.IMAGE_TEMPLATES) | {
        "count_story", "owner_colour", "line_order", "shape_corners"}
    with_image = [p.pid for p in generated if p.scene is not None]
    chance = task.chance_accuracy(problems, with_image)
    assert 0.25 < chance < 0.35
    assert task.text_only_baseline(problems, with_image) <= chance + 0.05


def test_text_only_baseline_catches_leaks():
    generated = task.generate_problems("test", 400, seed=0)
    pids = [p.pid for p in generated if p.scene is not None]
    always_a = {p.pid: copy.deepcopy(p.problem) for p in generated}
    for record in always_a.values():
        right = record["choices"].pop(record["answer"])
        record["choices"].insert(0, right)
        record["answer"] = 0
    assert task.text_only_baseline(always_a, pids) > 0.95
    # A correct text that follows from the choice set (here: the last in sorted order).
    by_text = {p.pid: copy.deepcopy(p.problem) for p in generated}
    for record in by_text.values():
        record["answer"] = record["choices"].index(max(record["choices"]))
    assert task.text_only_baseline(by_text, pids) > 0.8


def test_negative_split_size_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="train"):
        task.write_demo_scienceqa(tmp_path / "e", n_train=-1)
