"""ScienceQA data layer: reading, building question files, selecting and validating questions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from vtkit.cli.main import app
from vtkit.data import (
    Question,
    build_question_entries,
    load_json,
    load_question_file,
    problems_from_cqma,
    scoring_problems,
    select_questions,
    write_question_file,
)
from vtkit.errors import DataError, UsageError

runner = CliRunner()


def _problem(question, choices, answer, *, hint="", image=None, lecture="", solution="",
             subject="natural science", grade="grade3"):
    return {"question": question, "choices": choices, "answer": answer, "hint": hint,
            "image": image, "task": "closed choice", "grade": grade, "subject": subject,
            "topic": "t", "category": "c", "skill": "s", "lecture": lecture,
            "solution": solution, "split": "test"}


PROBLEMS = {
    "1": _problem("Which animal is bigger?", ["cat", "dog"], 1, image="image.png",
                  hint="Look at the picture."),
    "2": _problem("Which closing is correct for a letter?", ["Love,\nZoe", "love,\nZoe"], 0),
    "3": _problem("What is the color?", ["red", "green", "blue"], 2, image="image.png"),
    "4": _problem("Which word is a noun?", ["run", "table", "quickly", "blue", "softly"], 1,
                  hint="Nouns name things.\nThey can be people."),
}
SPLITS = {"train": [], "val": [], "test": ["1", "2", "3", "4"], "minitest": ["3", "4"]}


def make_sqa(root: Path, *, problems=PROBLEMS, splits=SPLITS, question_file=False) -> Path:
    """A tiny ScienceQA folder in the real layout (PIL images in a few modes)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "problems.json").write_text(json.dumps(problems))
    (root / "pid_splits.json").write_text(json.dumps(splits))
    for index, (pid, problem) in enumerate(problems.items()):
        if problem["image"]:
            folder = root / "images" / "test" / pid
            folder.mkdir(parents=True, exist_ok=True)
            mode = ["RGB", "L", "P"][index % 3]
            Image.new(mode, (20 + index, 12)).save(folder / problem["image"])
    if question_file:
        entries = build_question_entries(problems, splits["test"])
        write_question_file(entries, root / "llava_test_CQM-A.json")
    return root


@pytest.fixture
def sqa(tmp_path) -> Path:
    return make_sqa(tmp_path / "scienceqa")


def invoke(*args: str):
    return runner.invoke(app, list(args))


# ----------------------------------------------------------------------------- real file

def test_cqma_round_trip_over_all_real_questions(reference_data, tmp_path):
    real = reference_data / "scienceqa" / "llava_test_CQM-A.json"
    entries = json.loads(real.read_text())
    assert len(entries) == 4241
    problems = problems_from_cqma(entries)
    rebuilt = build_question_entries(problems, [e["id"] for e in entries], "CQM-A")
    assert rebuilt == entries
    # Same bytes too: indent, ASCII escapes and no final newline as in the original file.
    assert write_question_file(rebuilt, tmp_path / "x.json").read_bytes() == real.read_bytes()


def test_real_test_split_statistics(reference_data):
    base = reference_data / "scienceqa"
    problems, pids = scoring_problems(base, "test")
    assert len(pids) == 4241
    assert sum(1 for pid in pids if problems[pid]["image"]) == 2017
    assert sum(1 for pid in pids if problems[pid]["hint"]) == 2046
    letters = [problems[pid]["answer"] for pid in pids]
    assert [letters.count(i) for i in range(5)] == [1700, 1689, 583, 261, 8]


def test_multiline_choices_are_recovered(reference_data):
    questions = load_question_file(reference_data / "scienceqa" / "llava_test_CQM-A.json")
    by_id = {q.question_id: q for q in questions}
    problem = problems_from_cqma([by_id["512"]])["512"]
    assert problem["choices"] == ["See you soon,\nJanet", "See You Soon,\nJanet"]
    assert problem["answer"] == 0 and problem["hint"] == "" and problem["image"] is None


# ----------------------------------------------------------------------------- building

def test_cqma_text_for_crafted_problems():
    entries = build_question_entries(PROBLEMS, ["1", "2", "4"], "CQM-A")
    assert entries[0] == {
        "id": "1", "image": "1/image.png",
        "conversations": [
            {"from": "human", "value": "<image>\nContext: Look at the picture.\n"
                                       "Which animal is bigger?\nA. cat\nB. dog"},
            {"from": "gpt", "value": "B"}]}
    assert "image" not in entries[1]
    assert entries[1]["conversations"][0]["value"] == (
        "Which closing is correct for a letter?\nA. Love,\nZoe\nB. love,\nZoe")
    assert entries[2]["conversations"][0]["value"] == (
        "Context: Nouns name things.\nThey can be people.\nWhich word is a noun?\n"
        "A. run\nB. table\nC. quickly\nD. blue\nE. softly")
    assert problems_from_cqma(entries)["2"]["choices"] == ["Love,\nZoe", "love,\nZoe"]


def test_qcmlea_text_matches_hand_written_expectation():
    problems = {
        # Hint stripped; lecture keeps its newline; image token goes last.
        "7": _problem("Which is bigger?", ["cat", "dog"], 1, hint="  A hint. ",
                      image="image.png", lecture="Size is\nmeasured.",
                      solution="A dog is bigger."),
        # Empty hint -> N/A; three spaces -> two (one replace pass); "Question: " and
        # "Answer: " are removed everywhere, not only as prefixes; empty lecture.
        "8": _problem("Pick the   odd one.  Question: which?", ["x", "y", "z"], 2,
                      solution="See Answer: here."),
        # No lecture and no solution: the output keeps a leading space.
        "9": _problem("Yes?", ["yes", "no"], 0),
    }
    entries = build_question_entries(problems, ["7", "8", "9"], "QCM-LEA")
    assert entries[0] == {
        "id": "7", "image": "7/image.png",
        "conversations": [
            {"from": "human", "value": "Which is bigger?\nContext: A hint.\n"
                                       "Options: (A) cat (B) dog\n<image>"},
            {"from": "gpt", "value": "Size is\nmeasured. A dog is bigger. The answer is B."}]}
    assert entries[1]["conversations"] == [
        {"from": "human", "value": "Pick the  odd one. which?\nContext: N/A\n"
                                   "Options: (A) x (B) y (C) z"},
        {"from": "gpt", "value": "See here. The answer is C."}]
    assert entries[2]["conversations"][1]["value"] == " The answer is A."


def test_build_rejects_unknown_format_and_ids():
    with pytest.raises(UsageError, match="CQM-A, QCM-LEA"):
        build_question_entries(PROBLEMS, ["1"], "QCM-X")
    with pytest.raises(DataError, match="99"):
        build_question_entries(PROBLEMS, ["1", "99"])


# ----------------------------------------------------------------------------- reading

def test_load_json_names_path_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"id": 1,\n  }\n]')
    with pytest.raises(DataError, match=r"bad\.json.*line 3, column 3"):
        load_json(path, "question file")
    with pytest.raises(DataError, match="question file not found"):
        load_json(tmp_path / "nope.json", "question file")


def test_load_question_file_names_the_bad_entry(tmp_path):
    path = tmp_path / "q.json"
    path.write_text(json.dumps([{"id": "1", "conversations": [{"from": "human", "value": "x"}]},
                                {"id": "2", "conversations": []}]))
    with pytest.raises(DataError, match=r"entry 1 \(id 2\)"):
        load_question_file(path)


def test_load_question_file_lists_every_malformed_entry(tmp_path):
    good = {"id": "1", "image": "1/image.png",
            "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "A"}]}
    bad = [
        ["not", "an", "object"],
        {"conversations": good["conversations"]},
        {"id": ["a"], "conversations": good["conversations"]},
        {"id": "c", "conversations": "text"},
        {"id": "d", "conversations": [{"from": "human", "value": 3}]},
        {"id": "e", "conversations": [{"from": "human", "value": "x"}, "A"]},
        {"id": 7, "conversations": [{"value": "x"}]},
        {"id": "g", "image": 5, "conversations": good["conversations"]},
    ]
    path = tmp_path / "q.json"
    path.write_text(json.dumps([good, *bad, {**good, "id": 2}]))
    with pytest.raises(DataError) as error:
        load_question_file(path)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"question file {path}: 8 malformed")
    for expected in ("entry 1: not a JSON object", "entry 2: no 'id'",
                     "entry 3 (id ['a']): 'id' must be", "entry 4 (id c): 'conversations'",
                     "entry 5 (id d): each turn", "entry 6 (id e): each turn",
                     "entry 7 (id 7): each turn", "entry 8 (id g): 'image' must be"):
        assert expected in message
    assert "entry 0" not in message and "entry 9" not in message
    # Integer ids are read as strings, as before.
    path.write_text(json.dumps([{**good, "id": 2}]))
    assert load_question_file(path)[0] == Question("2", "x", "1/image.png", "A")


@pytest.mark.parametrize("check_images", [True, False])
def test_image_paths_that_leave_the_image_folder_are_refused(sqa, tmp_path, check_images):
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(secret)
    (sqa / "images/test/9").mkdir()
    (sqa / "images/test/9/image.png").symlink_to(secret)
    entries = build_question_entries(PROBLEMS, ["1", "2", "3", "4"])
    entries[0]["image"] = str(secret)
    entries[2]["image"] = "3/../../../../secret.png"
    entries[3]["image"] = "9/image.png"
    question_file = write_question_file(entries, tmp_path / "q.json")
    with pytest.raises(DataError) as error:
        select_questions(sqa, question_file=question_file, check_images=check_images)
    message = str(error.value)
    offenders = f"1 ({secret}), 3 (3/../../../../secret.png)"
    if check_images:
        # The symlink is seen only where the image folder is looked at.
        assert f"3 image paths outside {sqa / 'images/test'}: {offenders}, 4 (9/image.png)" \
            in message
    else:
        assert f"2 image paths outside the image folder: {offenders}" in message
    assert "missing" not in message and "\n" not in message


def test_a_symlink_inside_the_image_folder_is_fine(sqa):
    (sqa / "images/test/1/alias.png").symlink_to(sqa / "images/test/1/image.png")
    entries = build_question_entries(PROBLEMS, ["1"])
    entries[0]["image"] = "1/alias.png"
    write_question_file(entries, sqa / "llava_test_CQM-A.json")
    assert select_questions(sqa).questions[0].image == "1/alias.png"


# ----------------------------------------------------------------------------- selecting

def test_select_builds_from_problems_when_no_question_file(sqa):
    selection = select_questions(sqa)
    assert selection.question_file is None
    assert [q.question_id for q in selection.questions] == ["1", "2", "3", "4"]
    assert selection.questions[0] == Question(
        "1", "<image>\nContext: Look at the picture.\nWhich animal is bigger?\nA. cat\nB. dog",
        "1/image.png", "B")
    assert selection.image_path(selection.questions[0]) == sqa / "images/test/1/image.png"
    assert selection.problems["4"]["subject"] == "natural science"


def test_select_prefers_the_question_file_in_the_base_dir(tmp_path):
    base = make_sqa(tmp_path / "s", question_file=True)
    selection = select_questions(base, num_samples=2)
    assert selection.question_file == base / "llava_test_CQM-A.json"
    assert [q.question_id for q in selection.questions] == ["1", "2"]


def test_select_recovers_problems_without_problems_json(tmp_path):
    base = make_sqa(tmp_path / "s", question_file=True)
    (base / "problems.json").unlink()
    selection = select_questions(base)
    assert selection.problems["4"]["choices"] == PROBLEMS["4"]["choices"]
    assert selection.problems["1"]["image"] == "image.png"


def test_select_other_split_and_qcmlea(sqa):
    selection = select_questions(sqa, split="minitest", question_format="QCM-LEA",
                                 image_folder=sqa / "images" / "test")
    assert [q.question_id for q in selection.questions] == ["3", "4"]
    assert selection.questions[0].text.endswith("\n<image>")


@pytest.mark.parametrize("num_samples", [0, -2])
def test_bad_num_samples(sqa, num_samples):
    with pytest.raises(UsageError, match="--num-samples"):
        select_questions(sqa, num_samples=num_samples)


def test_unknown_split_lists_known_splits(sqa):
    with pytest.raises(UsageError, match="train, val, test, minitest"):
        select_questions(sqa, split="tset")


def test_validation_lists_every_kind_of_offender_in_one_pass(sqa, tmp_path):
    entries = build_question_entries(PROBLEMS, ["1", "2", "3"])
    entries += [{"id": f"x{i}", "conversations": entries[1]["conversations"]} for i in range(12)]
    (sqa / "images/test/1/image.png").write_bytes(b"not a png")
    (sqa / "images/test/3/image.png").unlink()
    question_file = write_question_file(entries, tmp_path / "q.json")
    with pytest.raises(DataError) as error:
        select_questions(sqa, question_file=question_file)
    message = str(error.value)
    assert "12 question ids not in problems.json: x0, x1" in message
    assert "(and 2 more)" in message and "x10" not in message
    assert "1 images missing under" in message and "3/image.png" in message
    assert "1 images not decodable" in message and "1/image.png" in message
    # Without image checks only the ids remain.
    with pytest.raises(DataError) as error:
        select_questions(sqa, question_file=question_file, check_images=False)
    assert "images" not in str(error.value)


def test_missing_image_folder_and_empty_selection(sqa, tmp_path):
    with pytest.raises(DataError, match="image folder not found"):
        select_questions(sqa, image_folder=tmp_path / "nowhere")
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(DataError, match="no questions selected"):
        select_questions(sqa, question_file=empty)


def test_base_dir_without_questions(tmp_path):
    with pytest.raises(DataError, match="ScienceQA directory not found"):
        select_questions(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no question file"):
        select_questions(tmp_path / "empty")


# ----------------------------------------------------------------------------- through the CLI

def _prompts(*args: str):
    return invoke("prompts", "--tokenizer", "unused", "--output", "out.jsonl", *args)


def test_cli_missing_id(sqa, tmp_path):
    entries = build_question_entries(PROBLEMS, ["1"]) + [
        {"id": "77", "conversations": [{"from": "human", "value": "q"}]}]
    write_question_file(entries, sqa / "llava_test_CQM-A.json")
    result = _prompts("--base-dir", str(sqa))
    assert result.exit_code == 1
    assert "error:" in result.stderr and "1 question ids not in problems.json: 77" in result.stderr


def test_cli_malformed_json(sqa):
    (sqa / "problems.json").write_text('{"1": {')
    result = _prompts("--base-dir", str(sqa))
    assert result.exit_code == 1
    assert "problems.json is not valid JSON" in result.stderr and "line 1" in result.stderr


def test_cli_empty_selection(tmp_path):
    path = tmp_path / "q.json"
    path.write_text("[]")
    result = _prompts("--question-file", str(path))
    assert result.exit_code == 1 and "no questions" in result.stderr


def test_cli_bad_num_samples_and_split(sqa):
    result = _prompts("--base-dir", str(sqa), "--num-samples", "0")
    assert result.exit_code == 2 and "--num-samples" in result.stderr
    result = _prompts("--base-dir", str(sqa), "--split", "nope")
    assert result.exit_code == 2 and "unknown --split 'nope'" in result.stderr


@pytest.mark.parametrize("damage", ["missing", "undecodable"])
def test_cli_bad_image_stops_extract_before_any_model_work(sqa, tmp_path, damage):
    image = sqa / "images/test/3/image.png"
    if damage == "missing":
        image.unlink()
    else:
        image.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    result = invoke("extract", "--base-dir", str(sqa), "--model-path", str(tmp_path / "none"),
                    "--output-dir", str(tmp_path / "out"))
    assert result.exit_code == 1
    expected = "images missing under" if damage == "missing" else "images not decodable"
    assert expected in result.stderr and "3/image.png" in result.stderr


def test_cli_escaping_image_path_stops_extract_with_the_question_id(sqa, tmp_path):
    entries = build_question_entries(PROBLEMS, ["1", "2", "3"])
    entries[2]["image"] = "../../problems.json"
    write_question_file(entries, sqa / "llava_test_CQM-A.json")
    result = invoke("extract", "--base-dir", str(sqa), "--model-path", str(tmp_path / "none"),
                    "--output-dir", str(tmp_path / "out"))
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1
    assert "1 image paths outside" in result.stderr and "3 (../../problems.json)" in result.stderr
