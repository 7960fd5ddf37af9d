"""ScienceQA: problems.json, pid_splits.json, LLaVA question files, and the questions a run uses.

A question file is LLaVA's JSON list of ``{"id", "image"?, "conversations": [human, gpt]}``. vtkit
reads the official CQM-A file (LLaVA-1.5) and the older QCM-LEA file, and builds either one from
problems.json + pid_splits.json with the same text as the originals (docs/protocol.md section 2),
so a base dir without a question file still works.

:func:`select_questions` is what stages call: it resolves the question file and image folder
from the base dir, takes the first ``num_samples`` questions, and checks all of them (ids, image
files, image decoding) in one pass, so a bad input fails before any model work starts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vtkit.errors import DataError, UsageError, list_offenders

#: Answer letters, in choice order (ScienceQA has 2 to 5 choices).
LETTERS = "ABCDE"
#: Question file formats vtkit can build from problems.json.
QUESTION_FORMATS = ("CQM-A", "QCM-LEA")
#: Where the image goes in question files and prompt text; vtkit.model adds it to tokenizers.
IMAGE_TOKEN = "<image>"
#: Fields a problem needs for building question files and scoring.
REQUIRED_PROBLEM_FIELDS = ("question", "choices", "answer", "hint", "image")


@dataclass(frozen=True)
class Question:
    """One entry of a question file.

    ``text`` is the human turn exactly as the file holds it (it may contain ``<image>``),
    ``image`` the image path relative to the image folder (``"5/image.png"``) or None, and
    ``answer`` the gpt turn (the bare letter in CQM-A) or None when the file has no gpt turn.
    """

    question_id: str
    text: str
    image: str | None = None
    answer: str | None = None

    @property
    def has_image(self) -> bool:
        return self.image is not None


# ---------------------------------------------------------------------------------------------
# Reading files


def load_json(path: Path | str, what: str) -> Any:
    """Parse a JSON file; missing or malformed: DataError naming ``what`` and the path."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read {what} {path}: {error}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{what} {path} is not valid JSON: {error.msg} "
                        f"(line {error.lineno}, column {error.colno})") from None


def load_problems(path: Path | str) -> dict[str, dict]:
    """Read problems.json: ``{pid: problem}``; each problem must have the fields vtkit uses."""
    problems = load_json(path, "problems file")
    if not isinstance(problems, dict):
        raise DataError(f"problems file {path} must hold a JSON object {{pid: problem}}")
    offenders = []
    for pid, problem in problems.items():
        if not isinstance(problem, dict):
            offenders.append(f"{pid} (not an object)")
            continue
        missing = [name for name in REQUIRED_PROBLEM_FIELDS if name not in problem]
        if missing:
            offenders.append(f"{pid} (no {', '.join(missing)})")
        elif not isinstance(problem["choices"], list) or not isinstance(problem["answer"], int):
            offenders.append(f"{pid} (choices must be a list and answer an integer)")
    if offenders:
        raise DataError(f"problems file {path}: {list_offenders('bad problems', offenders)}")
    return problems


def load_splits(path: Path | str) -> dict[str, list[str]]:
    """Read pid_splits.json: ``{split: [pid, ...]}``."""
    splits = load_json(path, "split file")
    if not isinstance(splits, dict) or not all(
        isinstance(pids, list) and all(isinstance(pid, str) for pid in pids)
        for pids in splits.values()
    ):
        raise DataError(f"split file {path} must hold a JSON object {{split: [pid, ...]}}")
    return splits


def _entry_problem(entry: Any) -> str | None:
    """What is wrong with the types of one question-file entry, or None if nothing is."""
    if not isinstance(entry, dict):
        return "not a JSON object"
    if "id" not in entry:
        return "no 'id'"
    if isinstance(entry["id"], bool) or not isinstance(entry["id"], str | int):
        return "'id' must be a string or an integer"
    turns = entry.get("conversations")
    if not isinstance(turns, list) or not turns:
        return "'conversations' must be a non-empty list of turns"
    if not all(isinstance(turn, dict) and isinstance(turn.get("from"), str)
               and isinstance(turn.get("value"), str) for turn in turns):
        return "each turn of 'conversations' must be an object with string 'from' and 'value'"
    if entry.get("image") is not None and not isinstance(entry["image"], str):
        return "'image' must be a string path"
    return None


def _describe_entry(entry: Any, problem: str) -> str:
    if isinstance(entry, dict) and "id" in entry:
        return f" (id {entry['id']}): {problem}"
    return f": {problem}"


def question_from_entry(entry: Any, where: str) -> Question:
    """Turn one question-file entry into a :class:`Question`; DataError naming ``where`` if bad."""
    problem = _entry_problem(entry)
    if problem is not None:
        raise DataError(f"{where}{_describe_entry(entry, problem)}")
    turns = entry["conversations"]
    answer = turns[1]["value"] if len(turns) > 1 else None
    return Question(question_id=str(entry["id"]), text=turns[0]["value"],
                    image=entry.get("image"), answer=answer)


def load_question_file(path: Path | str) -> list[Question]:
    """Read a LLaVA question file (CQM-A or QCM-LEA) into Questions, in file order.

    Entries of the wrong shape are listed together, by index and id, in one DataError.
    """
    entries = load_json(path, "question file")
    if not isinstance(entries, list):
        raise DataError(f"question file {path} must hold a JSON list of questions")
    offenders = []
    for index, entry in enumerate(entries):
        problem = _entry_problem(entry)
        if problem is not None:
            offenders.append(f"entry {index}{_describe_entry(entry, problem)}")
    if offenders:
        raise DataError(f"question file {path}: {list_offenders('malformed entries', offenders)}")
    return [question_from_entry(entry, f"question file {path}, entry {index}")
            for index, entry in enumerate(entries)]


# ---------------------------------------------------------------------------------------------
# Building question files (docs/protocol.md section 2)


def _cqma_entry(pid: str, problem: dict) -> dict:
    options = "\n".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(problem["choices"]))
    human = IMAGE_TOKEN + "\n" if problem["image"] else ""
    if problem["hint"]:
        human += f"Context: {problem['hint']}\n"
    human += f"{problem['question']}\n{options}"
    return _entry(pid, problem, human, LETTERS[problem["answer"]])


def _qcmlea_entry(pid: str, problem: dict) -> dict:
    # LLaVA's scripts/convert_sqa_to_llava.py (prompt format QCM-LEA), quirks included.
    context = problem["hint"].strip() or "N/A"
    options = " ".join(f"({LETTERS[i]}) {choice}" for i, choice in enumerate(problem["choices"]))
    # The original turns newlines into a literal "\n" and back again; keep that round trip.
    lecture = problem["lecture"].replace("\n", "\\n").replace("\\n", "\n")
    solution = problem["solution"].replace("\n", "\\n").replace("\\n", "\n")
    text_in = f"Question: {problem['question']}\nContext: {context}\nOptions: {options}\n"
    text_out = f"Answer: {lecture} {solution} The answer is {LETTERS[problem['answer']]}."
    # One replace pass only: three spaces become two, as in the original.
    text_in = text_in.replace("  ", " ").strip()
    text_out = text_out.replace("  ", " ").strip()
    if text_in.startswith("Question: "):
        text_in = text_in.replace("Question: ", "")
    if text_out.startswith("Answer: "):
        text_out = text_out.replace("Answer: ", "")
    human = f"{text_in}\n{IMAGE_TOKEN}" if problem["image"] else text_in
    return _entry(pid, problem, human, text_out)


def _entry(pid: str, problem: dict, human: str, gpt: str) -> dict:
    entry: dict[str, Any] = {"id": pid}
    if problem["image"]:
        entry["image"] = f"{pid}/{problem['image']}"
    entry["conversations"] = [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]
    return entry


_BUILDERS = {"CQM-A": _cqma_entry, "QCM-LEA": _qcmlea_entry}


def check_question_format(fmt: str) -> None:
    if fmt not in _BUILDERS:
        raise UsageError(f"unknown question format {fmt!r}; known: {', '.join(QUESTION_FORMATS)}")


def build_question_entries(problems: dict[str, dict], pids: Sequence[str],
                           fmt: str = "CQM-A") -> list[dict]:
    """Question-file entries for ``pids``, in that order, with the original files' exact text.

    ``fmt`` is "CQM-A" (official LLaVA-1.5 file) or "QCM-LEA" (LLaVA's older convert script).
    """
    check_question_format(fmt)
    builder = _BUILDERS[fmt]
    missing = [pid for pid in pids if pid not in problems]
    if missing:
        raise DataError(f"cannot build the question file: "
                        f"{list_offenders('question ids not in problems.json', missing)}")
    entries = []
    for pid in pids:
        try:
            entries.append(builder(pid, problems[pid]))
        except (KeyError, IndexError, TypeError, AttributeError) as error:
            raise DataError(f"problem {pid} is malformed ({type(error).__name__}: {error})") \
                from None
    return entries


def write_question_file(entries: list[dict], path: Path | str) -> Path:
    """Write entries as LLaVA does (``json.dump(indent=2)``, ASCII escapes, no final newline)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries, indent=2), encoding="utf-8")
    return path


def problems_from_cqma(entries_or_questions: Iterable[dict | Question]) -> dict[str, dict]:
    """Recover ``question, hint, choices, answer, image`` of each problem from a CQM-A file.

    Rebuilding with :func:`build_question_entries` gives the file's text back exactly. Where both
    the hint and the question span several lines their boundary is not in the text; the question
    is then taken to be the last line (this changes neither the rebuilt text nor any score, which
    only asks whether the hint is empty). Raises DataError for entries that are not CQM-A.
    """
    problems = {}
    for index, item in enumerate(entries_or_questions):
        question = item if isinstance(item, Question) else question_from_entry(
            item, f"CQM-A entry {index}")
        problems[question.question_id] = _problem_from_cqma(question)
    return problems


def _problem_from_cqma(question: Question) -> dict:
    pid = question.question_id
    body = question.text
    if body.startswith(IMAGE_TOKEN + "\n"):
        body = body[len(IMAGE_TOKEN) + 1:]
    # Choices may hold newlines ("See you soon,\nJanet"), so find the options block by its
    # "A. " line and then each following letter in turn.
    start = body.rfind("\nA. ")
    if start < 0 or question.answer not in LETTERS:
        raise DataError(f"question {pid} is not in CQM-A format (options 'A. ...' and a bare "
                        "answer letter); problems.json is needed for this question file")
    head, options = body[:start], body[start + 1:]
    choices = []
    for letter in LETTERS[1:]:
        cut = options.find(f"\n{letter}. ")
        if cut < 0:
            break
        choices.append(options[3:cut])
        options = options[cut + 1:]
    choices.append(options[3:])
    hint = ""
    if head.startswith("Context: "):
        hint, _, head = head[len("Context: "):].rpartition("\n")
    image = None
    if question.image is not None:
        image = question.image.split("/", 1)[1] if "/" in question.image else question.image
    return {"question": head, "hint": hint, "choices": choices,
            "answer": LETTERS.index(question.answer), "image": image}


# ---------------------------------------------------------------------------------------------
# Selecting and validating the questions of a run


@dataclass
class Selection:
    """The validated questions of a run and where their images and problems come from.

    ``question_file`` is None when the questions were built from problems.json; ``problems``
    comes from problems.json, or is recovered from the CQM-A file when the base dir has none.
    """

    base_dir: Path
    split: str
    questions: list[Question]
    image_folder: Path
    question_file: Path | None
    problems: dict[str, dict] = field(default_factory=dict)

    def image_path(self, question: Question) -> Path:
        if question.image is None:
            raise ValueError(f"question {question.question_id} has no image")
        return self.image_folder / question.image


def check_num_samples(num_samples: int) -> None:
    if num_samples == 0 or num_samples < -1:
        raise UsageError(f"--num-samples must be -1 (all) or a positive count, not {num_samples}")


def first_questions(questions: list[Question], num_samples: int) -> list[Question]:
    """The first ``num_samples`` questions (-1 = all); UsageError naming --num-samples if bad."""
    check_num_samples(num_samples)
    return list(questions) if num_samples == -1 else list(questions[:num_samples])


def split_pids(base_dir: Path, split: str) -> list[str] | None:
    """The split's pids from ``base_dir/pid_splits.json`` (None when there is no such file).

    An unknown split is a UsageError listing the known ones.
    """
    path = Path(base_dir) / "pid_splits.json"
    if not path.exists():
        return None
    splits = load_splits(path)
    if split not in splits:
        raise UsageError(f"unknown --split {split!r}; {path} has: {', '.join(splits)}")
    return splits[split]


def _check_base_dir(base_dir: Path) -> None:
    if not base_dir.is_dir():
        raise DataError(f"ScienceQA directory not found: {base_dir} "
                        "(set --base-dir or SCIENCEQA_DIR)")


def select_questions(base_dir: Path | str, question_file: Path | str | None = None,
                     image_folder: Path | str | None = None, split: str = "test",
                     num_samples: int = -1, question_format: str = "CQM-A",
                     check_images: bool = True) -> Selection:
    """Resolve, load and validate the questions of a run (docs/protocol.md section 2).

    Question file: ``question_file``, else ``base_dir/llava_{split}_{question_format}.json`` if
    it exists, else built from problems.json + pid_splits.json. Image folder: ``image_folder``,
    else ``base_dir/images/{split}``. ``num_samples``: -1 = all, else the first N.

    Everything is checked in one pass before returning: ids missing from problems.json (when
    there is one), duplicate ids, image paths that leave the image folder (absolute, with a
    ``..`` part, or through a symlink), image files missing or not decodable by PIL (the files
    are not looked at when ``check_images`` is False), an empty selection. Bad inputs raise
    DataError (listing up to 10 offenders and the count); bad flag values raise UsageError.
    """
    check_num_samples(num_samples)
    check_question_format(question_format)
    base_dir = Path(base_dir)
    problems_path = base_dir / "problems.json"
    pids = split_pids(base_dir, split) if base_dir.is_dir() else None

    problems = load_problems(problems_path) if problems_path.exists() else None
    if question_file is not None:
        question_file = Path(question_file)
    else:
        _check_base_dir(base_dir)
        default_file = base_dir / f"llava_{split}_{question_format}.json"
        if default_file.exists():
            question_file = default_file
        elif problems is None or pids is None:
            raise DataError(f"no question file in {base_dir}: need {default_file.name}, or "
                            "problems.json and pid_splits.json to build it")

    if question_file is not None:
        questions = load_question_file(question_file)
    else:
        entries = build_question_entries(problems, pids, question_format)
        questions = [question_from_entry(e, f"built question {i}") for i, e in enumerate(entries)]
    questions = first_questions(questions, num_samples)

    folder = Path(image_folder) if image_folder is not None else base_dir / "images" / split
    source = str(question_file) if question_file else f"split {split!r} of {problems_path}"
    _validate(questions, problems, folder if check_images else None, source)
    if problems is None:
        problems = problems_from_cqma(questions)
    return Selection(base_dir=base_dir, split=split, questions=questions, image_folder=folder,
                     question_file=question_file, problems=problems)


def _validate(questions: list[Question], problems: dict[str, dict] | None,
              image_folder: Path | None, source: str) -> None:
    """One pass over the selection; raises one DataError that names every kind of problem."""
    if not questions:
        raise DataError(f"no questions selected from {source}")
    seen: set[str] = set()
    duplicates, unknown, outside, missing, undecodable = [], [], [], [], []
    with_images = [q for q in questions if q.has_image]
    if image_folder is not None and with_images and not image_folder.is_dir():
        raise DataError(f"image folder not found: {image_folder} (set --image-folder)")
    for question in questions:
        qid = question.question_id
        if qid in seen:
            duplicates.append(qid)
        seen.add(qid)
        if problems is not None and qid not in problems:
            unknown.append(qid)
        if question.image is not None and _leaves_folder(question.image, image_folder):
            outside.append(f"{qid} ({question.image})")
        elif image_folder is not None and question.image is not None:
            path = image_folder / question.image
            if not path.is_file():
                missing.append(question.image)
            else:
                reason = _undecodable(path)
                if reason:
                    undecodable.append(f"{question.image} ({reason})")
    parts = []
    if unknown:
        parts.append(list_offenders("question ids not in problems.json", unknown))
    if duplicates:
        parts.append(list_offenders("duplicate question ids", duplicates))
    if outside:
        folder = image_folder if image_folder is not None else "the image folder"
        parts.append(list_offenders(f"image paths outside {folder}", outside))
    if missing:
        parts.append(list_offenders(f"images missing under {image_folder}", missing))
    if undecodable:
        parts.append(list_offenders(f"images not decodable under {image_folder}", undecodable))
    if parts:
        raise DataError(f"{source}: " + "; ".join(parts))


def _leaves_folder(image: str, folder: Path | None) -> bool:
    """Whether an image path points outside ``folder``: by its spelling (absolute, or a ``..``
    part), or, when ``folder`` is given, once symlinks are resolved."""
    path = Path(image)
    if path.is_absolute() or ".." in path.parts:
        return True
    return folder is not None and not (folder / path).resolve().is_relative_to(folder.resolve())


def _undecodable(path: Path) -> str | None:
    """Why PIL cannot read the image at ``path``, or None if it can."""
    from PIL import Image  # Pillow is only needed when images are checked.

    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as error:  # PIL raises many types for bad files; all mean "unreadable".
        reason = str(error).replace(f"'{path}'", "").replace(str(path), "")
        return " ".join(reason.split()) or type(error).__name__
    return None


def scoring_problems(base_dir: Path | str, split: str = "test") -> tuple[dict[str, dict],
                                                                         list[str]]:
    """The problems and ordered pids to score a split against, as eval_science_qa.py reads them.

    problems.json when the base dir has it, else recovered from ``llava_{split}_CQM-A.json``;
    pids from pid_splits.json, else the question file's order.
    """
    base_dir = Path(base_dir)
    _check_base_dir(base_dir)
    pids = split_pids(base_dir, split)
    problems_path = base_dir / "problems.json"
    if problems_path.exists():
        problems = load_problems(problems_path)
        if pids is None:
            raise DataError(f"split file not found: {base_dir / 'pid_splits.json'}")
        return problems, pids
    question_file = base_dir / f"llava_{split}_CQM-A.json"
    if not question_file.exists():
        raise DataError(f"{base_dir} has neither problems.json nor {question_file.name}")
    questions = load_question_file(question_file)
    problems = problems_from_cqma(questions)
    return problems, pids if pids is not None else [q.question_id for q in questions]
