"""The synthetic demo ScienceQA folder that `vtkit demo` writes.

Each image problem shows a 336 x 336 scene: a 3 x 3 grid of 112-px cells, 2-6 of them holding one
large object (a circle, square or triangle, 72-90 px, red, green, blue or yellow). Questions are
local (the colour or shape of the object at one position) or global (counts, whether a given
object is there). About a fifth of the problems have no image and are answered from their hint
(or from the question alone), as in real ScienceQA.

Every question kind has a fixed list of options in a fixed order (as many real ScienceQA kinds
do: "past, present, future"), and answers are not guessable from the text: the correct answer is
dealt first, from a shuffled deck of the kind's options (so answers and letters stay balanced),
and only then a scene is drawn (by rejection) that makes it true. :func:`text_only_baseline`
measures what a text-only guesser still gets.

Everything is seeded per split and generated in order, so the same seed gives the same bytes, and
the first n problems of a split are the same for any larger n.
"""

from __future__ import annotations

import random
import re
import shutil
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from vtkit.data import build_question_entries, write_question_file
from vtkit.errors import UsageError
from vtkit.progress import Reporter

#: Scene side in pixels (the CLIP input size of LLaVA-1.5) and its grid of cells.
SCENE_SIZE = 336
GRID = 3
CELL = SCENE_SIZE // GRID
#: Object side range in scene pixels: large enough to cover many 14-px patches (26-41 for a
#: square), and close enough in size that an object's share of the patches is a fair measure.
OBJECT_SIZES = (72, 90)
#: Gap kept between an object and its cell border, so neighbours never touch.
CELL_MARGIN = 5
#: Objects per scene (each in its own cell).
OBJECTS_PER_SCENE = (2, 6)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
}
SHAPES = ("circle", "square", "triangle")
#: Light backgrounds; all stay far from every object colour in grayscale too.
BACKGROUNDS = ((238, 238, 238), (246, 242, 232), (232, 238, 246))
POSITIONS: dict[tuple[int, int], str] = {
    (0, 0): "top left", (0, 1): "top middle", (0, 2): "top right",
    (1, 0): "middle left", (1, 1): "center", (1, 2): "middle right",
    (2, 0): "bottom left", (2, 1): "bottom middle", (2, 2): "bottom right",
}
SPLITS = ("train", "val", "test")
#: Test problems in the demo folder (what `make all` evaluates).
DEMO_N_TEST = 60
#: The trained tiny LLaVA shipped with vtkit: an HF-format checkpoint made by
#: `vtkit demo --train`, with the record of its training (:data:`TRAINING_RECORD`).
DEMO_MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "demo-model"
TRAINING_RECORD = "training.json"

# Problems come in blocks of 20, shuffled within the block: 4 text-only and 16 images whose PIL
# mode and size are dealt from these lists (most RGB at 336 x 336), so every split of 20 or more
# problems has every mode and the mix stays fixed as the split grows.
_BLOCK_KINDS = ("text",) * 4 + ("RGB",) * 10 + ("RGBA",) * 2 + ("P",) * 2 + ("L", "LA")
_BLOCK_SIZES = ((336, 336),) * 12 + ((400, 300), (300, 420), (448, 448), (224, 224))
#: PIL modes without colour: their questions never ask about colour.
GRAYSCALE_MODES = ("L", "LA")
# pid = 3 * i + offset: numeric strings, splits interleaved as in the real file, and a split's
# pids do not depend on the sizes of the other splits.
_PID_OFFSET = {"test": 1, "val": 2, "train": 3}
_IMAGE_HINTS = (
    "The picture shows shapes on a light background.",
    "Each shape in the picture is a circle, a square or a triangle.",
    "Look closely at the shapes in the picture.",
)
_COUNTS = tuple(str(n) for n in range(5))


@dataclass(frozen=True)
class SceneObject:
    """One object: its shape, colour, grid cell and box (x0, y0, x1, y1) in scene pixels."""

    shape: str
    colour: str
    row: int
    col: int
    box: tuple[int, int, int, int]

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


@dataclass(frozen=True)
class Scene:
    """What an image shows, in 336 x 336 scene coordinates."""

    objects: tuple[SceneObject, ...]
    background: tuple[int, int, int]

    def at(self, row: int, col: int) -> SceneObject | None:
        """The object in cell (row, col), or None."""
        return next((o for o in self.objects if (o.row, o.col) == (row, col)), None)

    def count(self, colour: str | None = None, shape: str | None = None) -> int:
        """Number of objects matching the given colour and/or shape."""
        return sum((colour in (None, o.colour)) and (shape in (None, o.shape))
                   for o in self.objects)


@dataclass(frozen=True)
class DemoProblem:
    """One generated problem: its problems.json record and what it was made from.

    ``template`` names the question kind, ``params`` the words the question fills in
    ("position", "colour", "shape"); ``scene``, ``mode`` and ``size`` are None for text-only
    problems.
    """

    pid: str
    problem: dict
    template: str
    params: dict[str, str]
    scene: Scene | None
    mode: str | None
    size: tuple[int, int] | None


@dataclass(frozen=True)
class _Template:
    """An image question kind: its wording, options (in their fixed order) and metadata."""

    question: str
    options: tuple[str, ...]
    needs_colour: bool
    local: bool
    weight: int
    topic: str
    category: str
    skill: str
    task: str = "closed choice"


_COLOUR_NAMES = tuple(COLOURS)
# Local templates (one object) are drawn twice as often as each global one, so that half of the
# image questions are local and a pruning curve can show both kinds of evidence going.
IMAGE_TEMPLATES: dict[str, _Template] = {
    "colour_at": _Template(
        "What color is the shape in the {position} of the picture?", _COLOUR_NAMES,
        needs_colour=True, local=True, weight=2, topic="colors", category="Identify colors",
        skill="Name the color of the shape at a position"),
    "shape_at": _Template(
        "Which shape is in the {position} of the picture?", SHAPES,
        needs_colour=False, local=True, weight=2, topic="shapes", category="Identify shapes",
        skill="Name the shape at a position"),
    "count_colour": _Template(
        "How many {colour} shapes are in the picture?", _COUNTS,
        needs_colour=True, local=False, weight=1, topic="counting", category="Count objects",
        skill="Count the shapes of one color"),
    "count_shape": _Template(
        "How many {shape}s are in the picture?", _COUNTS,
        needs_colour=False, local=False, weight=1, topic="counting", category="Count objects",
        skill="Count the shapes of one kind"),
    "count_total": _Template(
        "How many shapes are in the picture?", tuple(str(n) for n in range(2, 7)),
        needs_colour=False, local=False, weight=1, topic="counting", category="Count objects",
        skill="Count all the shapes"),
    "has_object": _Template(
        "Is there a {colour} {shape} in the picture?", ("yes", "no"),
        needs_colour=True, local=False, weight=1, topic="shapes", category="Find objects",
        skill="Find a shape of a given color", task="yes or no"),
}

_LECTURES = {
    "colors": "Every object has a color. To name the color of one object, find that object "
              "first and look only at it.",
    "shapes": "A circle is round and has no corners. A square has four equal sides and four "
              "corners. A triangle has three sides and three corners.",
    "counting": "To count objects, point at each one once and say the next number. The last "
                "number you say is how many there are.",
    "reading-comprehension": "Read the text carefully. The answer is in the text.",
    "community": "People waiting in a line are served in order: first the person at the front, "
                 "last the person at the back.",
}


def scene_answer(scene: Scene, template: str, params: Mapping[str, str]) -> str | None:
    """The correct answer of an image question about ``scene``, or None when it has none (the
    asked cell is empty)."""
    if template in ("colour_at", "shape_at"):
        obj = scene.at(*_cell(params["position"]))
        if obj is None:
            return None
        return obj.colour if template == "colour_at" else obj.shape
    if template == "count_colour":
        return str(scene.count(colour=params["colour"]))
    if template == "count_shape":
        return str(scene.count(shape=params["shape"]))
    if template == "count_total":
        return str(len(scene.objects))
    if template == "has_object":
        return "yes" if scene.count(params["colour"], params["shape"]) else "no"
    raise ValueError(f"unknown image template {template!r}")


def _cell(position: str) -> tuple[int, int]:
    return next(cell for cell, name in POSITIONS.items() if name == position)


def _solution(scene: Scene, template: str, params: Mapping[str, str], answer: str) -> str:
    if template in ("colour_at", "shape_at"):
        obj = scene.at(*_cell(params["position"]))
        why = f"The shape in the {params['position']} of the picture is a {obj.colour} {obj.shape}."
    elif template == "count_colour":
        why = f"The picture shows {_plural(int(answer), params['colour'] + ' shape')}."
    elif template == "count_shape":
        why = f"The picture shows {_plural(int(answer), params['shape'])}."
    elif template == "count_total":
        why = f"The picture shows {_plural(int(answer), 'shape')}."
    else:
        n = scene.count(params["colour"], params["shape"])
        why = f"The picture shows {_plural(n, params['colour'] + ' ' + params['shape'])}."
    return f"{why} So, the answer is {answer}."


def _plural(n: int, noun: str) -> str:
    """ "1 circle", "3 circles" (every noun here takes a plain -s)."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


class _AnswerDeck:
    """Deals the correct option of each question kind from a shuffled deck of its options, so
    answers (and with them letters) stay balanced even in a small split, and the text of a
    question says nothing about which option is right."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._decks: dict[str, list[int]] = {}

    def deal(self, kind: str, n_options: int) -> int:
        deck = self._decks.setdefault(kind, [])
        if not deck:
            deck.extend(range(n_options))
            self._rng.shuffle(deck)
        return deck.pop()


def random_scene(rng: random.Random) -> Scene:
    """A scene with 2-6 objects in distinct cells, every attribute uniform."""
    n = rng.randint(*OBJECTS_PER_SCENE)
    objects = []
    for cell in sorted(rng.sample(range(GRID * GRID), n)):
        row, col = divmod(cell, GRID)
        size = rng.randint(*OBJECT_SIZES)
        x0 = col * CELL + rng.randint(CELL_MARGIN, CELL - CELL_MARGIN - size)
        y0 = row * CELL + rng.randint(CELL_MARGIN, CELL - CELL_MARGIN - size)
        objects.append(SceneObject(rng.choice(SHAPES), rng.choice(_COLOUR_NAMES), row, col,
                                   (x0, y0, x0 + size, y0 + size)))
    return Scene(tuple(objects), rng.choice(BACKGROUNDS))


def _image_problem(rng: random.Random, deck: _AnswerDeck, mode: str
                   ) -> tuple[str, dict[str, str], Scene, dict]:
    """An image question fit for ``mode``: (template name, params, scene, problems.json record)."""
    names = [n for n, t in IMAGE_TEMPLATES.items()
             if mode not in GRAYSCALE_MODES or not t.needs_colour]
    name = rng.choices(names, weights=[IMAGE_TEMPLATES[n].weight for n in names])[0]
    template = IMAGE_TEMPLATES[name]
    params = {"position": rng.choice(list(POSITIONS.values())), "colour": rng.choice(_COLOUR_NAMES),
              "shape": rng.choice(SHAPES)}
    params = {k: v for k, v in params.items() if "{" + k + "}" in template.question}
    # Answer first, scene second: the text then says nothing about which choice is right.
    index = deck.deal(name, len(template.options))
    answer = template.options[index]
    scene = random_scene(rng)
    while scene_answer(scene, name, params) != answer:
        scene = random_scene(rng)
    grade = rng.randint(1, 6) if template.local else rng.randint(7, 12)
    record = _record(
        question=template.question.format(**params), choices=list(template.options),
        answer=index,
        hint=rng.choice(_IMAGE_HINTS) if rng.random() < 0.3 else "", image="image.png",
        task=template.task, grade=grade, subject="natural science", topic=template.topic,
        category=template.category, skill=template.skill, lecture=_LECTURES[template.topic],
        solution=_solution(scene, name, params, answer))
    return name, params, scene, record


@dataclass(frozen=True)
class _TextDraft:
    """A text-only question, its options in their fixed order."""

    kind: str
    hint: str
    question: str
    options: tuple[str, ...]
    answer: int
    topic: str
    solution: str


_NAMES = ("Mia", "Leo", "Ava", "Noah", "Emma", "Liam", "Zoe", "Omar", "Lily", "Ravi")
_THINGS = ("marble", "apple", "pencil", "block", "balloon")
_ITEMS = ("ball", "hat", "kite", "cup", "bike")
_ORDINALS = ("first", "second", "third")
_CORNERS = {"circle": "no corners", "square": "four corners", "triangle": "three corners"}
_STORY_COUNTS = tuple(str(n) for n in range(1, 6))
#: topic -> (subject, category, skill) of the text-only questions.
_TEXT_TOPICS = {
    "reading-comprehension": ("language science", "Read for details",
                              "Find details in a short text"),
    "community": ("social science", "Order and sequence", "Find a place in a line"),
    "shapes": ("natural science", "Identify shapes", "Name a shape from its corners"),
}
#: Text-only kinds and what their options are drawn from (in line_order: the three people of
#: the hint, one per ordinal).
_TEXT_KINDS = {"count_story": _STORY_COUNTS, "owner_colour": _COLOUR_NAMES,
               "line_order": _ORDINALS, "shape_corners": SHAPES}


def _text_draft(kind: str, index: int, rng: random.Random) -> _TextDraft:
    """A text-only question of ``kind`` whose correct option is ``index``."""
    name = rng.choice(_NAMES)
    if kind == "count_story":
        thing, n = rng.choice(_THINGS), _STORY_COUNTS[index]
        return _TextDraft(kind, f"{name} has {_plural(int(n), thing)}.",
                          f"How many {thing}s does {name} have?", _STORY_COUNTS, index,
                          "reading-comprehension", f"The text says that {name} has {n}.")
    if kind == "owner_colour":
        item, colour = rng.choice(_ITEMS), _COLOUR_NAMES[index]
        return _TextDraft(kind, f"{name} has a {colour} {item}.", f"What color is {name}'s {item}?",
                          _COLOUR_NAMES, index, "reading-comprehension",
                          f"The text says that {name} has a {colour} {item}.")
    if kind == "line_order":
        people = tuple(rng.sample(_NAMES, 3))
        hint = (f"{people[0]}, {people[1]} and {people[2]} are waiting in line. {people[0]} is "
                f"first, {people[1]} is second and {people[2]} is third.")
        return _TextDraft(kind, hint, f"Who is {_ORDINALS[index]} in line?", people, index,
                          "community", f"The text says that {people[index]} is "
                                       f"{_ORDINALS[index]}.")
    shape = SHAPES[index]
    return _TextDraft(kind, "", f"Which shape has {_CORNERS[shape]}?", SHAPES, index, "shapes",
                      f"A {shape} has {_CORNERS[shape]}.")


def _text_problem(rng: random.Random, deck: _AnswerDeck) -> tuple[str, dict]:
    """A problem without an image, answered from its hint (or from the question alone)."""
    kind = rng.choice(list(_TEXT_KINDS))
    draft = _text_draft(kind, deck.deal(kind, len(_TEXT_KINDS[kind])), rng)
    subject, category, skill = _TEXT_TOPICS[draft.topic]
    answer = draft.options[draft.answer]
    record = _record(
        question=draft.question, choices=list(draft.options), answer=draft.answer,
        hint=draft.hint, image=None, task="closed choice", grade=rng.randint(1, 6),
        subject=subject, topic=draft.topic, category=category, skill=skill,
        lecture=_LECTURES[draft.topic], solution=f"{draft.solution} So, the answer is {answer}.")
    return draft.kind, record


def _record(*, question: str, choices: list[str], answer: int, hint: str, image: str | None,
            task: str, grade: int, subject: str, topic: str, category: str, skill: str,
            lecture: str, solution: str) -> dict:
    """A problems.json record, its fields in the real file's order (split is set later)."""
    return {"question": question, "choices": choices, "answer": answer, "hint": hint,
            "image": image, "task": task, "grade": f"grade{grade}", "subject": subject,
            "topic": topic, "category": category, "skill": skill, "lecture": lecture,
            "solution": solution, "split": ""}


def generate_problems(split: str, n: int, seed: int = 0) -> list[DemoProblem]:
    """The first ``n`` problems of ``split`` for ``seed``, with their scenes (no I/O).

    The first n problems are the same for any larger n, and no split depends on another's size.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    rng = random.Random(f"vtkit-demo:{seed}:{split}")
    deck = _AnswerDeck(rng)
    kinds: list[str] = []
    sizes: list[tuple[int, int]] = []
    problems = []
    for i in range(n):
        if not kinds:
            kinds = rng.sample(_BLOCK_KINDS, len(_BLOCK_KINDS))
            sizes = rng.sample(_BLOCK_SIZES, len(_BLOCK_SIZES))
        kind = kinds.pop()
        pid = str(3 * i + _PID_OFFSET[split])
        if kind == "text":
            template, record = _text_problem(rng, deck)
            problem = DemoProblem(pid, record, template, {}, None, None, None)
        else:
            template, params, scene, record = _image_problem(rng, deck, kind)
            problem = DemoProblem(pid, record, template, params, scene, kind, sizes.pop())
        record["split"] = split
        problems.append(problem)
    return problems


def scene_to_image(scene: Scene, pixel: tuple[float, float], size: tuple[int, int]
                   ) -> tuple[int, int]:
    """Where scene point ``pixel`` lands in an image of ``size``: the scene fills the centred
    square of side min(size), so both pad and centre-crop preprocessing keep every object."""
    side = min(size)
    scale = side / SCENE_SIZE
    return ((size[0] - side) // 2 + round(pixel[0] * scale),
            (size[1] - side) // 2 + round(pixel[1] * scale))


def render_scene(scene: Scene, size: tuple[int, int] = (SCENE_SIZE, SCENE_SIZE),
                 mode: str = "RGB") -> Image.Image:
    """Draw ``scene`` into an image of ``size`` (width, height) and PIL ``mode``.

    Modes: RGB; RGBA and LA (objects opaque, background transparent, its colour kept under the
    alpha); P (an exact palette); L (grayscale, so only shapes, not colours, can be told apart).
    """
    image = Image.new("RGB", size, scene.background)
    mask = Image.new("L", size, 0)
    draw, draw_mask = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    for obj in scene.objects:
        x0, y0 = scene_to_image(scene, obj.box[:2], size)
        x1, y1 = scene_to_image(scene, obj.box[2:], size)
        box = (x0, y0, x1 - 1, y1 - 1)
        for target, fill in ((draw, COLOURS[obj.colour]), (draw_mask, 255)):
            if obj.shape == "circle":
                target.ellipse(box, fill=fill)
            elif obj.shape == "square":
                target.rectangle(box, fill=fill)
            else:
                target.polygon([(x0, y1 - 1), ((x0 + x1 - 1) / 2, y0), (x1 - 1, y1 - 1)],
                               fill=fill)
    if mode == "RGB":
        return image
    if mode == "P":
        # Few flat colours, so an adaptive palette holds every one of them exactly.
        return image.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    if mode in ("L", "LA"):
        image = image.convert("L")
    if mode in ("RGBA", "LA"):
        image.putalpha(mask)
    if image.mode != mode:
        raise ValueError(f"unsupported image mode {mode!r}")
    return image


def write_demo_scienceqa(out_dir: Path, seed: int = 0, n_test: int = 60, n_train: int = 0,
                         n_val: int = 0, *, reporter: Reporter | None = None) -> Path:
    """Write a synthetic ScienceQA folder in the real layout and return ``out_dir``.

    ``out_dir`` gets problems.json (every field), pid_splits.json (train, val, test, trainval,
    minitrain, minival, minitest), llava_test_CQM-A.json (built by vtkit.data, as for real data)
    and images/<split>/<pid>/image.png for the image problems. An existing ``out_dir/images`` is
    replaced, so no stale image survives. Same arguments, same bytes.
    """
    counts = {"train": n_train, "val": n_val, "test": n_test}
    for split, n in counts.items():
        if n < 0:
            raise UsageError(f"number of {split} problems must be >= 0, got {n}")
    generated = {split: generate_problems(split, n, seed) for split, n in counts.items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / "images").exists():
        shutil.rmtree(out_dir / "images")
    with_images = [p for split in SPLITS for p in generated[split] if p.scene is not None]
    with (reporter or Reporter()).task("demo images", total=len(with_images),
                                       unit="images") as task:
        for p in with_images:
            folder = out_dir / "images" / p.problem["split"] / p.pid
            folder.mkdir(parents=True)
            render_scene(p.scene, p.size, p.mode).save(folder / "image.png", format="PNG")
            task.advance()

    by_pid = sorted((p for split in SPLITS for p in generated[split]), key=lambda p: int(p.pid))
    problems = {p.pid: p.problem for p in by_pid}
    splits = {split: [p.pid for p in generated[split]] for split in SPLITS}
    splits["trainval"] = splits["train"] + splits["val"]
    for split in SPLITS:
        # A seeded tenth of each split, in split order, as the real mini splits are.
        chosen = set(random.Random(f"vtkit-demo:{seed}:mini{split}").sample(
            splits[split], len(splits[split]) // 10))
        splits[f"mini{split}"] = [pid for pid in splits[split] if pid in chosen]
    _write_json(out_dir / "problems.json", problems)
    _write_json(out_dir / "pid_splits.json", splits)
    entries = build_question_entries(problems, splits["test"], "CQM-A")
    write_question_file(entries, out_dir / "llava_test_CQM-A.json")
    return out_dir


def write_demo(out_dir: Path, seed: int = 0, n_test: int = DEMO_N_TEST, *,
               trained: bool = True, reporter: Reporter | None = None) -> dict[str, Path]:
    """Write the whole demo into ``out_dir``: ``scienceqa/`` (:func:`write_demo_scienceqa`) and
    the tiny LLaVA checkpoints in both formats.

    ``trained`` (default): the demo model shipped in :data:`DEMO_MODEL_DIR` (trained on the demo
    task; its training.json is copied next to the HF checkpoint); otherwise the random tiny
    model of :func:`vtkit.demo.tiny.build_tiny_checkpoints` for ``seed``. Returns the written paths:
    {"scienceqa": ..., then the checkpoint folders by name}.
    """
    out_dir = Path(out_dir)
    paths = {"scienceqa": write_demo_scienceqa(out_dir / "scienceqa", seed=seed, n_test=n_test,
                                               reporter=reporter)}
    paths.update(write_demo_model(out_dir) if trained else _random_checkpoints(out_dir, seed))
    return paths


def write_demo_model(out_dir: Path) -> dict[str, Path]:
    """Write the shipped demo model under ``out_dir`` in both checkpoint formats (float32), with
    its training.json next to the HF one; returns the paths as
    :func:`vtkit.demo.tiny.save_tiny_checkpoints`."""
    # torch is only needed for the checkpoints; generating data should not pay for importing it.
    import torch

    from vtkit.cache import write_bytes_atomic
    from vtkit.demo.tiny import save_tiny_checkpoints
    from vtkit.errors import DataError
    from vtkit.model import load_model

    if not (DEMO_MODEL_DIR / "config.json").is_file():
        raise DataError(f"the shipped demo model is missing from {DEMO_MODEL_DIR}; reinstall "
                        "vtkit or train one with `vtkit demo --train`")
    model = load_model(DEMO_MODEL_DIR, dtype=torch.float32, device="cpu")
    paths = save_tiny_checkpoints(model.hf, out_dir)
    record = DEMO_MODEL_DIR / TRAINING_RECORD
    if record.is_file():
        write_bytes_atomic(paths["hf"] / TRAINING_RECORD, record.read_bytes())
    return paths


def _random_checkpoints(out_dir: Path, seed: int) -> dict[str, Path]:
    from vtkit.demo.tiny import build_tiny_checkpoints

    return build_tiny_checkpoints(out_dir, seed=seed)


def _write_json(path: Path, obj: object) -> None:
    # Imported here: nothing else in writing the demo data needs vtkit.cache's h5py.
    from vtkit.cache import write_json_atomic

    write_json_atomic(path, obj, indent=2)


def chance_accuracy(problems: Mapping[str, dict], pids: Iterable[str]) -> float:
    """Expected accuracy of uniform guessing: the mean of 1 / number of choices."""
    pids = list(pids)
    return sum(1 / len(problems[pid]["choices"]) for pid in pids) / len(pids)


# Colour, shape and position words, blanked to turn a question into its template.
_VOCAB = re.compile(r"\b(" + "|".join(sorted([*COLOURS, *SHAPES, *POSITIONS.values()],
                                             key=len, reverse=True)) + r")s?\b")


def text_only_baseline(problems: Mapping[str, dict], pids: Iterable[str]) -> float:
    """Accuracy on ``pids`` of the best of a few text-only guessers, each by two-fold
    cross-validation (learn on one half of ``pids``, answer the other, then the reverse).

    Each guesser picks the choice text most often correct among learnt problems that share a
    key (nothing; the choice set; the question template, with colour, shape and position words
    blanked, and choice set; the whole hint, question and choice set), ties going to the letter
    most often correct for that number of choices; one more guesser uses the letter alone. On a
    task whose text says nothing about the answer this scores about :func:`chance_accuracy`
    (a little above, as it is the best of five).
    """
    pids = list(pids)
    return max(_cross_validate(problems, pids, key) for key in _GUESSER_KEYS)


def _cross_validate(problems: Mapping[str, dict], pids: list[str], key) -> float:
    halves = (pids[0::2], pids[1::2])
    correct = 0
    for learn, answer in (halves, halves[::-1]):
        texts: dict[tuple, Counter] = {}
        letters: dict[int, Counter] = {}
        for pid in learn:
            problem = problems[pid]
            if key is not None:
                correct_text = problem["choices"][problem["answer"]]
                texts.setdefault(key(problem), Counter())[correct_text] += 1
            letters.setdefault(len(problem["choices"]), Counter())[problem["answer"]] += 1
        for pid in answer:
            problem = problems[pid]
            by_text = texts.get(key(problem), Counter()) if key is not None else Counter()
            by_letter = letters.get(len(problem["choices"]), Counter())
            guess = max(range(len(problem["choices"])),
                        key=lambda i, p=problem, t=by_text, b=by_letter: (t[p["choices"][i]], b[i]))
            correct += guess == problem["answer"]
    return correct / len(pids)


# What the text-only guessers condition on (None: the letter alone).
_GUESSER_KEYS = (
    None,
    lambda p: (),
    lambda p: (frozenset(p["choices"]),),
    lambda p: (_VOCAB.sub("_", p["question"]), frozenset(p["choices"])),
    lambda p: (p["hint"], p["question"], frozenset(p["choices"])),
)
