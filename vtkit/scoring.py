"""ScienceQA scoring exactly as LLaVA's ``llava/eval/eval_science_qa.py``
(docs/protocol.md section 5).

Parsing a model's text into a letter, in order:

1. the text is exactly one of the options (``"A"``) -> that letter;
2. it is at least 3 characters, starts with an option and then ``". "`` (``"A. text"``) -> that
   letter;
3. the regex ``The answer is ([A-Z]).`` (the dot matches any character) matches exactly once
   -> that letter; otherwise ``"FAILED"``.

A letter beyond the problem's choices, or FAILED, is wrong. A question with no prediction is
wrong and does not count as an image question; "image question" means the prediction's prompt
holds ``<image>``. The same :func:`score_predictions` scores ``vtkit score`` and every k of a
sweep. The categories follow ScienceQA's own evaluator (subject, context, grade).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vtkit.data import scoring_problems
from vtkit.errors import DataError, list_offenders
from vtkit.progress import Reporter

OPTIONS = ("A", "B", "C", "D", "E")
FAILED = "FAILED"
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")
#: What eval_science_qa.py substitutes for a question that has no prediction.
_MISSING = {"text": FAILED, "prompt": "Unknown"}

#: ScienceQA's categories: name -> (field it needs, test on a problem).
_GRADES_1_6 = {f"grade{i}" for i in range(1, 7)}
_GRADES_7_12 = {f"grade{i}" for i in range(7, 13)}
CATEGORIES = {
    "NAT": (("subject",), lambda p: p["subject"] == "natural science"),
    "SOC": (("subject",), lambda p: p["subject"] == "social science"),
    "LAN": (("subject",), lambda p: p["subject"] == "language science"),
    "TXT": (("hint",), lambda p: bool(p["hint"])),
    "IMG": (("image",), lambda p: bool(p["image"])),
    "NO": (("hint", "image"), lambda p: not p["hint"] and not p["image"]),
    "G1-6": (("grade",), lambda p: p["grade"] in _GRADES_1_6),
    "G7-12": (("grade",), lambda p: p["grade"] in _GRADES_7_12),
}


def parse_answer(text: str, options: Sequence[str] = OPTIONS) -> str:
    """The letter a model's answer names, or ``"FAILED"`` (rules 1-3 of the module docstring).

    Rule 3 may return a capital letter outside ``options`` (e.g. "F"); it then scores as wrong.
    """
    if text in options:
        return text
    if len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        return text[0]
    matches = _ANSWER_IS.findall(text)
    return matches[0] if len(matches) == 1 else FAILED


def prediction_index(letter: str, choices: Sequence[str], options: Sequence[str] = OPTIONS) -> int:
    """0-based choice index of ``letter``, or -1 if it is not one of this problem's choices."""
    if letter in options[:len(choices)]:
        return list(options).index(letter)
    return -1


def load_answers(path: Path | str) -> dict[str, dict]:
    """Read a LLaVA answers file (JSON lines with question_id, prompt, text) into {id: answer}.

    A later line for the same question wins, as in the original. A bad line is a DataError
    naming the file and the line number.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"answers file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read answers file {path}: {error}") from None
    answers: dict[str, dict] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            answer = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"answers file {path}, line {number}: not valid JSON "
                            f"({error.msg}, column {error.colno})") from None
        if not isinstance(answer, dict):
            raise DataError(f"answers file {path}, line {number}: not a JSON object")
        missing = [key for key in ("question_id", "prompt", "text") if key not in answer]
        if missing:
            raise DataError(f"answers file {path}, line {number}: no {', '.join(missing)}")
        if not isinstance(answer["text"], str) or not isinstance(answer["prompt"], str):
            raise DataError(f"answers file {path}, line {number}: prompt and text must be "
                            "strings")
        answers[str(answer["question_id"])] = answer
    return answers


@dataclass(frozen=True)
class Judgement:
    """How one question was scored (one entry of LLaVA's output file)."""

    question_id: str
    parsed_answer: str
    prediction_index: int
    correct: bool
    prompt: str
    text: str
    is_multimodal: bool


@dataclass
class ScoreReport:
    """Counts and accuracies (in percent) of one scored answers set.

    ``img_accuracy`` is NaN when no prompt had an image (the original divides by zero there).
    ``categories`` holds ScienceQA's category accuracies that the problems' fields allow
    (a category with no questions is left out); ``results`` the predicted index per question
    (-1 = invalid), ``outputs`` the model's text; ``ignored_ids`` the predictions' question ids
    that are not among the scored questions (not scored, as in the original).
    """

    total: int
    correct: int
    accuracy: float
    img_total: int
    img_correct: int
    img_accuracy: float
    categories: dict[str, float] = field(default_factory=dict)
    category_counts: dict[str, int] = field(default_factory=dict)
    results: dict[str, int] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    correct_ids: list[str] = field(default_factory=list)
    judgements: list[Judgement] = field(default_factory=list)
    ignored_ids: list[str] = field(default_factory=list)

    def official_line(self) -> str:
        """The line eval_science_qa.py prints."""
        return (f"Total: {self.total}, Correct: {self.correct}, Accuracy: {self.accuracy:.2f}%, "
                f"IMG-Accuracy: {self.img_accuracy:.2f}%")

    def to_json(self) -> dict[str, Any]:
        """``{"total", "correct", "accuracy", "img_accuracy", "categories"}`` (NaN -> null)."""
        return {
            "total": self.total,
            "correct": self.correct,
            "accuracy": self.accuracy,
            "img_accuracy": None if math.isnan(self.img_accuracy) else self.img_accuracy,
            "categories": dict(self.categories),
        }


def score_predictions(problems: dict[str, dict], pids: Sequence[str],
                      predictions: dict[str, dict]) -> ScoreReport:
    """Score ``predictions`` ({question_id: {"prompt", "text", ...}}) on the questions ``pids``.

    Counting is eval_science_qa.py's: every pid counts, a missing prediction is wrong and not
    multimodal, predictions for other ids are ignored (their ids are in ``ignored_ids``).
    """
    if not pids:
        raise DataError("nothing to score: the split has no questions")
    unknown = [pid for pid in pids if pid not in problems]
    if unknown:
        what = "question ids not in the problems"
        raise DataError(f"cannot score: {list_offenders(what, unknown)}")
    judgements = []
    for pid in pids:
        problem = problems[pid]
        prediction = predictions.get(pid, _MISSING)
        letter = parse_answer(prediction["text"])
        index = prediction_index(letter, problem["choices"])
        judgements.append(Judgement(
            question_id=pid, parsed_answer=letter, prediction_index=index,
            correct=index == problem["answer"], prompt=prediction["prompt"],
            text=prediction["text"], is_multimodal="<image>" in prediction["prompt"]))

    scored = set(pids)
    total = len(judgements)
    correct = sum(j.correct for j in judgements)
    img_total = sum(j.is_multimodal for j in judgements)
    img_correct = sum(j.correct and j.is_multimodal for j in judgements)
    correct_ids = [j.question_id for j in judgements if j.correct]
    categories, counts = category_accuracies(problems, pids, set(correct_ids))
    return ScoreReport(
        total=total, correct=correct, accuracy=correct / total * 100,
        img_total=img_total, img_correct=img_correct,
        img_accuracy=img_correct / img_total * 100 if img_total else math.nan,
        categories=categories, category_counts=counts,
        results={j.question_id: j.prediction_index for j in judgements},
        outputs={j.question_id: j.text for j in judgements},
        correct_ids=correct_ids, judgements=judgements,
        ignored_ids=[qid for qid in predictions if qid not in scored])


def category_accuracies(problems: dict[str, dict], pids: Sequence[str],
                        correct_ids: set[str]) -> tuple[dict[str, float], dict[str, int]]:
    """ScienceQA's category accuracies (percent) and sizes, then ``AVG`` over all ``pids``.

    A category is computed only if every problem has the fields it needs, and kept only if it
    has questions.
    """
    selected = [(pid, problems[pid]) for pid in pids]
    accuracies: dict[str, float] = {}
    counts: dict[str, int] = {}
    for name, (fields, test) in CATEGORIES.items():
        if not all(f in problem for _, problem in selected for f in fields):
            continue
        members = [pid for pid, problem in selected if test(problem)]
        if members:
            counts[name] = len(members)
            accuracies[name] = sum(pid in correct_ids for pid in members) / len(members) * 100
    counts["AVG"] = len(pids)
    accuracies["AVG"] = sum(pid in correct_ids for pid in pids) / len(pids) * 100
    return accuracies, counts


def write_llava_results(report: ScoreReport, problems: dict[str, dict],
                        output_file: Path | str | None = None,
                        output_result: Path | str | None = None) -> None:
    """Write eval_science_qa.py's two files (same keys, order and ``indent=2``).

    ``output_file``: ``{"correct": [...], "incorrect": [...]}``, one analysis per question
    (question_id, parsed_ans, ground_truth, question, pred, is_multimodal).
    ``output_result``: ``{"acc", "correct", "count", "results", "outputs"}``.
    """
    if output_file is not None:
        analyses: dict[str, list[dict]] = {"correct": [], "incorrect": []}
        for j in report.judgements:
            analyses["correct" if j.correct else "incorrect"].append({
                "question_id": j.question_id,
                "parsed_ans": j.parsed_answer,
                "ground_truth": OPTIONS[problems[j.question_id]["answer"]],
                "question": j.prompt,
                "pred": j.text,
                "is_multimodal": j.is_multimodal,
            })
        _dump(analyses, output_file)
    if output_result is not None:
        _dump({"acc": report.accuracy, "correct": report.correct, "count": report.total,
               "results": report.results, "outputs": report.outputs}, output_result)


def _dump(document: Any, path: Path | str) -> None:
    from vtkit.cache import write_text_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(document, indent=2))


def score_answers(answers_file: Path | str, base_dir: Path | str, split: str = "test",
                  output_file: Path | str | None = None,
                  output_result: Path | str | None = None,
                  reporter: Reporter | None = None) -> ScoreReport:
    """Score a LLaVA answers file against a ScienceQA base dir, as eval_science_qa.py does,
    and write its two result files when asked (see :func:`write_llava_results`).

    Answers to questions outside the split are not scored (as in the original) but named in a
    warning, since they usually mean the wrong split or the wrong answers file.
    """
    problems, pids = scoring_problems(base_dir, split)
    report = score_predictions(problems, pids, load_answers(answers_file))
    if report.ignored_ids:
        what = f"answers not scored, their question ids are not in split {split!r}"
        (reporter or Reporter()).warn(
            f"{answers_file}: {list_offenders(what, report.ignored_ids, limit=5)}")
    write_llava_results(report, problems, output_file, output_result)
    return report
