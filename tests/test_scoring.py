"""The scorer: eval_science_qa.py's parsing and counting, categories, result files, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vtkit.cli.main import app
from vtkit.errors import DataError
from vtkit.scoring import (
    load_answers,
    parse_answer,
    prediction_index,
    score_predictions,
    write_llava_results,
)

runner = CliRunner()


@pytest.mark.parametrize("text, letter", [
    ("B", "B"),                                   # rule 1: exactly an option
    ("E", "E"),                                   # ... even beyond the problem's choices
    ("A. because it is", "A"),                    # rule 2: letter, ". "
    ("C. ", "C"),
    ("A.", "FAILED"),                             # rule 2 needs 3 characters
    ("The answer is B.", "B"),                    # rule 3
    ("Hmm. The answer is D, surely", "D"),        # the regex dot matches any character
    ("The answer is B", "FAILED"),                # ... but needs one
    ("The answer is A. No, the answer is B.", "A"),  # lower-case "the" does not match
    ("The answer is A. The answer is B.", "FAILED"),  # two matches
    ("The answer is A. The answer is A.", "FAILED"),  # two matches, even if equal
    ("The answer is F.", "F"),                    # any capital letter
    ("a", "FAILED"),                              # lowercase is not an option
    ("b. text", "FAILED"),
    (" A", "FAILED"),                             # no stripping
    ("", "FAILED"),
    ("FAILED", "FAILED"),
])
def test_parse_answer_rules(text, letter):
    assert parse_answer(text) == letter


def test_prediction_index_respects_the_number_of_choices():
    assert prediction_index("B", ["x", "y", "z"]) == 1
    assert prediction_index("C", ["x", "y"]) == -1
    assert prediction_index("F", ["x", "y"]) == -1
    assert prediction_index("FAILED", ["x", "y"]) == -1


def _problem(n_choices, answer, *, image=False, hint="", subject="natural science", grade=3):
    return {"question": "q", "choices": [f"c{i}" for i in range(n_choices)], "answer": answer,
            "hint": hint, "image": "image.png" if image else None, "subject": subject,
            "grade": f"grade{grade}", "lecture": "", "solution": "", "split": "test"}


PROBLEMS = {
    "1": _problem(2, 1, image=True),
    "2": _problem(3, 0, hint="h", subject="social science", grade=8),
    "3": _problem(4, 1, image=True, hint="h", subject="language science", grade=10),
    "4": _problem(2, 0, image=True, grade=2),
    "5": _problem(2, 0, grade=1),
    "6": _problem(2, 1, image=True, subject="social science", grade=7),
    "7": _problem(3, 2, image=True, subject="language science", grade=12),
    "8": _problem(2, 0, image=True, grade=4),
    "9": _problem(2, 1, grade=5),
}
PIDS = list(PROBLEMS)
IMG = "<image>\nq"
ANSWERS = [
    {"question_id": "1", "prompt": IMG, "text": "B"},                       # right
    {"question_id": "2", "prompt": "q", "text": "A. c0"},                   # right
    {"question_id": "3", "prompt": IMG, "text": "I think. The answer is B."},  # right
    {"question_id": "4", "prompt": IMG, "text": "The answer is A. The answer is A."},  # FAILED
    {"question_id": "5", "prompt": "q", "text": "a"},                       # FAILED
    {"question_id": "6", "prompt": IMG, "text": "C"},                       # beyond 2 choices
    # "7" has no prediction: wrong, and not an image question.
    {"question_id": "8", "prompt": "q", "text": "A"},  # image problem, text-only prompt
    {"question_id": "9", "prompt": "q", "text": "The answer is B.\nYes"},   # right
    {"question_id": "99", "prompt": IMG, "text": "A"},                      # not in the split
]


def _predictions():
    return {a["question_id"]: a for a in ANSWERS}


def test_counting_rules():
    report = score_predictions(PROBLEMS, PIDS, _predictions())
    assert (report.total, report.correct) == (9, 5)
    # Image questions are those whose prompt holds <image>: 1, 3, 4, 6 (not 7: missing; not 8).
    assert (report.img_total, report.img_correct) == (4, 2)
    assert report.correct_ids == ["1", "2", "3", "8", "9"]
    assert report.results == {"1": 1, "2": 0, "3": 1, "4": -1, "5": -1, "6": -1, "7": -1,
                              "8": 0, "9": 1}
    assert report.outputs["7"] == "FAILED" and "99" not in report.outputs
    assert report.official_line() == (
        "Total: 9, Correct: 5, Accuracy: 55.56%, IMG-Accuracy: 50.00%")


def test_categories_follow_scienceqa_definitions():
    report = score_predictions(PROBLEMS, PIDS, _predictions())
    expected = {"NAT": 60.0, "SOC": 50.0, "LAN": 50.0, "TXT": 100.0, "IMG": 50.0, "NO": 50.0,
                "G1-6": 60.0, "G7-12": 50.0, "AVG": 500 / 9}
    assert report.categories == pytest.approx(expected)
    assert list(report.categories) == list(expected)
    assert report.category_counts["IMG"] == 6 and report.category_counts["NO"] == 2


def test_categories_only_when_the_fields_allow():
    bare = {pid: {k: p[k] for k in ("question", "choices", "answer", "hint", "image")}
            for pid, p in PROBLEMS.items()}
    report = score_predictions(bare, PIDS, _predictions())
    assert list(report.categories) == ["TXT", "IMG", "NO", "AVG"]


def test_to_json_and_no_image_questions():
    document = score_predictions(PROBLEMS, PIDS, _predictions()).to_json()
    assert list(document) == ["total", "correct", "accuracy", "img_accuracy", "categories"]
    assert document["accuracy"] == pytest.approx(500 / 9)
    report = score_predictions(PROBLEMS, ["2", "5"], _predictions())
    assert math.isnan(report.img_accuracy) and report.to_json()["img_accuracy"] is None


def test_empty_and_unknown_pids_are_errors():
    with pytest.raises(DataError, match="no questions"):
        score_predictions(PROBLEMS, [], {})
    with pytest.raises(DataError, match="42"):
        score_predictions(PROBLEMS, ["1", "42"], {})


def test_llava_result_files(tmp_path):
    report = score_predictions(PROBLEMS, PIDS, _predictions())
    write_llava_results(report, PROBLEMS, tmp_path / "out.json", tmp_path / "res.json")
    output = json.loads((tmp_path / "out.json").read_text())
    assert [a["question_id"] for a in output["correct"]] == ["1", "2", "3", "8", "9"]
    assert output["incorrect"][-1] == {
        "question_id": "7", "parsed_ans": "FAILED", "ground_truth": "C", "question": "Unknown",
        "pred": "FAILED", "is_multimodal": False}
    assert list(output["correct"][0]) == ["question_id", "parsed_ans", "ground_truth",
                                          "question", "pred", "is_multimodal"]
    result = json.loads((tmp_path / "res.json").read_text())
    assert list(result) == ["acc", "correct", "count", "results", "outputs"]
    assert (result["correct"], result["count"], result["results"]["6"]) == (5, 9, -1)
    assert (tmp_path / "res.json").read_text().startswith('{\n  "acc": 55.55')


def test_load_answers_names_file_and_line(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text('{"question_id": "1", "prompt": "q", "text": "A"}\n\n{"question_id": 2,\n')
    with pytest.raises(DataError, match=r"answers\.jsonl, line 3: not valid JSON"):
        load_answers(path)
    path.write_text('{"question_id": "1", "prompt": "q"}\n')
    with pytest.raises(DataError, match="line 1: no text"):
        load_answers(path)
    path.write_text('{"question_id": "1", "prompt": "q", "text": "A"}\n'
                    '{"question_id": "1", "prompt": "q", "text": "B"}\n')
    assert load_answers(path)["1"]["text"] == "B"  # the later line wins, as in the original


# ----------------------------------------------------------------------------- CLI

def _base_dir(tmp_path: Path) -> Path:
    base = tmp_path / "scienceqa"
    base.mkdir()
    (base / "problems.json").write_text(json.dumps(PROBLEMS))
    (base / "pid_splits.json").write_text(json.dumps({"test": PIDS, "val": ["1"]}))
    return base


def _answers_file(tmp_path: Path, answers=ANSWERS) -> Path:
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps(a) + "\n" for a in answers))
    return path


def test_cli_score_prints_the_official_line_and_a_table(tmp_path):
    base, answers = _base_dir(tmp_path), _answers_file(tmp_path)
    result = runner.invoke(app, ["score", str(answers), "--base-dir", str(base),
                                 "--output-file", str(tmp_path / "o.json"),
                                 "--output-result", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "Total: 9, Correct: 5, Accuracy: 55.56%, IMG-Accuracy: 50.00%\n"
    assert "G7-12" in result.stderr and "60.00" in result.stderr
    assert json.loads((tmp_path / "r.json").read_text())["count"] == 9
    assert len(json.loads((tmp_path / "o.json").read_text())["correct"]) == 5


def test_cli_score_json(tmp_path):
    base, answers = _base_dir(tmp_path), _answers_file(tmp_path)
    result = runner.invoke(app, ["score", str(answers), "--base-dir", str(base), "--json"])
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["total"] == 9 and document["categories"]["TXT"] == 100.0
    result = runner.invoke(app, ["score", str(answers), "--base-dir", str(base), "--json",
                                 "--split", "val"])
    assert json.loads(result.stdout)["total"] == 1


def test_cli_score_errors(tmp_path):
    base = _base_dir(tmp_path)
    result = runner.invoke(app, ["score", str(tmp_path / "none.jsonl"), "--base-dir", str(base)])
    assert result.exit_code == 1 and "error: answers file not found" in result.stderr
    answers = _answers_file(tmp_path)
    result = runner.invoke(app, ["score", str(answers), "--base-dir", str(base), "--split", "x"])
    assert result.exit_code == 2 and "unknown --split 'x'" in result.stderr
    answers.write_text('{"question_id": "1"\n')
    result = runner.invoke(app, ["score", str(answers), "--base-dir", str(base)])
    assert result.exit_code == 1 and "line 1" in result.stderr


def test_cli_score_real_questions_without_problems_json(reference_data, tmp_path):
    """Always answering "A" on the real test split: 1700 of 4241 (40.1%, docs/protocol.md
    section 2)."""
    base = reference_data / "scienceqa"
    entries = json.loads((base / "llava_test_CQM-A.json").read_text())
    answers = _answers_file(tmp_path, [
        {"question_id": e["id"], "text": "A",
         "prompt": ("<image>\n" if "image" in e else "") + "q"} for e in entries])
    image_a = sum(1 for e in entries
                  if "image" in e and e["conversations"][1]["value"] == "A")
    result = runner.invoke(app, ["score", str(answers), "--base-dir", str(base)])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == (f"Total: 4241, Correct: 1700, Accuracy: 40.08%, "
                                     f"IMG-Accuracy: {image_a / 2017 * 100:.2f}%")


def test_cli_score_help():
    result = runner.invoke(app, ["score", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for text in ("ANSWERS", "--base-dir", "--split", "--json", "--output-file",
                 "--output-result", "Example"):
        assert text in result.stdout


def test_cli_score_result_file_is_the_answers_argument(tmp_path):
    """--result-file (eval_science_qa.py's flag) scores like ANSWERS; exactly one of them."""
    base, answers = _base_dir(tmp_path), _answers_file(tmp_path)
    result = runner.invoke(app, ["score", "--result-file", str(answers), "--base-dir", str(base)])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "Total: 9, Correct: 5, Accuracy: 55.56%, IMG-Accuracy: 50.00%\n"
    for args in ([], [str(answers), "--result-file", str(answers)]):
        result = runner.invoke(app, ["score", *args, "--base-dir", str(base)])
        assert result.exit_code == 2
        assert result.stderr.count("\n") == 1 and "--result-file" in result.stderr


def test_cli_score_warns_about_answers_outside_the_split(tmp_path):
    base = _base_dir(tmp_path)
    extra = [{"question_id": f"x{i}", "prompt": "q", "text": "A"} for i in range(7)]
    answers = _answers_file(tmp_path, ANSWERS + extra)
    result = runner.invoke(app, ["score", str(answers), "--base-dir", str(base)])
    assert result.exit_code == 0, result.stderr
    # The score itself is eval_science_qa.py's: the unknown answers change nothing.
    assert result.stdout == "Total: 9, Correct: 5, Accuracy: 55.56%, IMG-Accuracy: 50.00%\n"
    warning = [line for line in result.stderr.splitlines() if "warning:" in line]
    assert len(warning) == 1
    assert "8 answers not scored" in warning[0] and "'test'" in warning[0]
    assert "99, x0, x1, x2, x3 (and 3 more)" in warning[0]
    quiet = runner.invoke(app, ["score", str(_answers_file(tmp_path, ANSWERS[:-1])),
                                "--base-dir", str(base)])
    assert "warning" not in quiet.stderr
