"""Training the demo model (``vtkit demo --train``): a tiny LLaVA that learns the demo task.

The model is the tiny LLaVA of :mod:`vtkit.demo.tiny` (transformers'
``LlavaForConditionalGeneration``: a CLIP-shaped tower at 336 px with 14-px patches, so 576 visual
tokens; features from its penultimate layer; a Linear-GELU-Linear projector; a small Llama decoder;
the tiny tokenizer), initialised by :func:`vtkit.demo.tiny.random_tiny_model` and trained end to
end on the demo's train split (:func:`vtkit.demo.task.generate_problems`), rendered on the fly,
never written to disk.

Every example is what the evaluation feeds the model: the CQM-A question text, the ``vicuna_v1``
template with the single-prediction instruction, the prompt tokenized chunk by chunk around
``<image>`` (:mod:`vtkit.prompts`), the image padded to a square of the CLIP mean colour and
CLIP-preprocessed (:mod:`vtkit.images`), and all 576 visual tokens, as LLaVA trains. The target
is the assistant turn ``" <letter></s>"``; the loss covers only those answer tokens.

A linear probe on the features LLaVA takes from the tower (layer -2, one per patch) learns, with
the answer, what each patch shows: the colour and shape of the object over it, whether it holds
an object's centre, and its grid cell (:func:`patch_labels`). This dense signal, 576 labels per
image where the answer gives one per example, is what grows a tower that sees the scene; the
probe is dropped when the model is saved (it is not part of LLaVA), and ``aux_weight=0`` turns
it off.

Runs are reproducible: the seed fixes the initial weights, the training problems and their
order. The learning rate warms up, holds at its peak, then decays (cosine) to a small floor.
The result is written with :func:`vtkit.demo.tiny.save_tiny_checkpoints` (HF and original format),
then measured through the real pipeline (extract + sweep, ``l2`` scorer, k = 576 and 20) on the
demo's test split, and everything is recorded in ``training.json`` next to the HF checkpoint.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vtkit import __version__, cache
from vtkit.data import build_question_entries, question_from_entry
from vtkit.defaults import DEFAULT_CONV_MODE, DEFAULT_SINGLE_PRED_PROMPT
from vtkit.demo.task import (
    CELL,
    COLOURS,
    GRAYSCALE_MODES,
    GRID,
    SCENE_SIZE,
    SHAPES,
    TRAINING_RECORD,
    DemoProblem,
    Scene,
    generate_problems,
    render_scene,
    scene_to_image,
)
from vtkit.errors import UsageError
from vtkit.images import (
    CLIP_MEAN,
    CLIP_STD,
    expand_to_square,
    mean_colour,
    resize_shortest_edge,
    to_rgb,
)
from vtkit.pipeline import run_pipeline, synchronize
from vtkit.progress import Reporter
from vtkit.prompts import IMAGE_TOKEN_INDEX, build_prompt, tokenize_prompt

#: The evaluation protocol the model is trained for (docs/protocol.md, sections 3 and 4): the
#: default conversation template and single-prediction instruction of the official run.
SINGLE_PRED_PROMPT = DEFAULT_SINGLE_PRED_PROMPT
IMAGE_MODE = "pad"
#: The two conversations a problem is trained in: the evaluation's (CQM-A question with the
#: single-prediction instruction; answer " <letter></s>") and the explained one that LLaVA's
#: ScienceQA fine-tuning used (QCM-LEA, no instruction; answer: lecture, solution, "The answer
#: is X.").
ANSWER_FORMAT = "CQM-A"
EXPLAIN_FORMAT = "QCM-LEA"
#: Token counts of the final measurement: everything, and the bottom of the sweep grid.
EVAL_TOKENS = (576, 20)


@dataclass
class TrainConfig:
    """Everything that decides a training run (saved in training.json)."""

    output_dir: Path = Path("demo-model")   # gets llava-tiny-hf/, llava-tiny-orig/, clip-.../
    seed: int = 0                  # initial weights, training problems and their order
    steps: int = 6000              # optimiser steps (at most, with time_budget)
    batch_size: int = 128
    lr: float = 1e-3               # peak learning rate (AdamW)
    warmup_steps: int = 300        # linear warm-up from 0
    hold_fraction: float = 0.6     # the peak holds until this share of the steps, then decays
    final_lr_fraction: float = 0.02  # the cosine decay ends at lr * this
    weight_decay: float = 0.05     # on matrices only
    grad_clip: float = 1.0
    explain_fraction: float = 0.0  # share of each batch trained in the explained format
    aux_weight: float = 1.0        # weight of the patch-probe loss (0: answer loss alone)
    n_train: int | None = None     # None: new problems for every batch; N: cycle through the
                                   # first N problems of the demo's train split
    n_val: int = 512               # validation problems (teacher-forced accuracy during training)
    n_eval: int = 1000             # test problems for the final pipeline measurement (0: skip)
    eval_every: int = 500          # steps between validation passes
    device: str = "auto"
    time_budget: float | None = None  # seconds of training; fixes the step count after warm-up
    workers: int | None = None     # data-loading processes (None: 0 on CPU, up to 14 on CUDA)
    save_dtype: str = "float16"    # dtype of the saved weights (float16 keeps the shipped model
                                   # small; the evaluation loads them as float32)
    # Model shape (see vtkit.demo.tiny.tiny_config): larger than the test fixtures, small enough
    # that `make all` sweeps it in about a minute on two CPU cores and that it ships in < 5 MB.
    text_hidden_size: int = 128
    text_layers: int = 6           # prompt -> answer -> option letter takes several hops
    text_heads: int = 4
    text_intermediate_size: int = 352
    vision_hidden_size: int = 96
    vision_layers: int = 5         # the last one is unused: features come from layer -2
    vision_heads: int = 4
    vision_intermediate_size: int = 256
    command: str | None = None     # how the run was started (recorded; default: sys.argv)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


@dataclass
class TrainResult:
    """What a run produced: checkpoint paths, its record (also in training.json), wall time."""

    paths: dict[str, Path]
    record: dict
    seconds: float


def check_config(config: TrainConfig) -> None:
    """Refuse settings that cannot train (UsageError naming the flag)."""
    checks = {
        "--steps": config.steps >= 1, "--batch-size": config.batch_size >= 1,
        "--lr": config.lr > 0, "--n-train": config.n_train is None or config.n_train >= 1,
        "--time-budget": config.time_budget is None or config.time_budget > 0,
        "--workers": config.workers is None or config.workers >= 0,
    }
    for flag, ok in checks.items():
        if not ok:
            raise UsageError(f"{flag} must be positive")
    if config.aux_weight < 0:
        raise UsageError("--aux-weight must be >= 0")
    for name in ("hold_fraction", "explain_fraction"):
        if not 0 <= getattr(config, name) <= 1:
            raise UsageError(f"{name} must be between 0 and 1")
    if config.save_dtype not in ("float16", "bfloat16", "float32"):
        raise UsageError(f"save dtype must be float16, bfloat16 or float32, not "
                         f"{config.save_dtype!r}")


def model_config(config: TrainConfig):
    """The LlavaConfig of the model to train (:func:`vtkit.demo.tiny.tiny_config`, its shape)."""
    from vtkit.demo.tiny import tiny_config

    return tiny_config(
        text_hidden_size=config.text_hidden_size, text_layers=config.text_layers,
        text_heads=config.text_heads, text_intermediate_size=config.text_intermediate_size,
        vision_hidden_size=config.vision_hidden_size, vision_layers=config.vision_layers,
        vision_heads=config.vision_heads,
        vision_intermediate_size=config.vision_intermediate_size)


def learning_rate(step: int, config: TrainConfig, steps: int) -> float:
    """The learning rate of ``step`` (0-based) in a run of ``steps`` steps.

    Linear warm-up over ``warmup_steps``, then the peak until ``hold_fraction`` of the run, then
    a cosine down to ``final_lr_fraction`` of the peak at the last step. Warm-up values do not
    depend on ``steps``, so a time budget can fix the step count once warm-up has been timed.
    """
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    decay_start = max(config.warmup_steps, int(config.hold_fraction * steps))
    if step < decay_start:
        return config.lr
    progress = min(1.0, (step - decay_start) / max(1, steps - 1 - decay_start))
    floor = config.final_lr_fraction
    return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


# --------------------------------------------------------------------------------------------
# Examples


def clip_uint8(image, size: int) -> np.ndarray:
    """The pixels CLIP preprocessing normalises, as uint8 [3, size, size]: RGB, padded to a
    square of the CLIP mean colour, shortest edge resized to ``size`` (bicubic), centre crop.

    Same steps as :func:`vtkit.images.preprocess_images` in ``pad`` mode; the normalisation is
    left to :func:`normalise_pixels` so batches travel as bytes (a quarter of float32's).
    """
    image = expand_to_square(to_rgb(image), mean_colour(CLIP_MEAN))
    pixels = np.asarray(resize_shortest_edge(image, size), dtype=np.uint8)
    height, width = pixels.shape[:2]
    top, left = (height - size) // 2, (width - size) // 2
    return np.ascontiguousarray(pixels[top:top + size, left:left + size].transpose(2, 0, 1))


def normalise_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] from :func:`clip_uint8` -> CLIP's normalised float32 input."""
    mean = torch.tensor(CLIP_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=pixels.device).view(1, 3, 1, 1)
    return (pixels.float() / 255 - mean) / std


#: The per-patch label channels of :func:`patch_labels` and their number of classes.
PATCH_CHANNELS = {"colour": 1 + len(COLOURS), "shape": 1 + len(SHAPES), "centre": 2,
                  "cell": 1 + GRID * GRID}
IGNORE = -100


def patch_labels(scene: Scene, size: tuple[int, int], mode: str, image_size: int = 336,
                 patch_size: int = 14) -> np.ndarray:
    """What each patch of the preprocessed image shows: int64 [4, patches] of
    :data:`PATCH_CHANNELS`, patches in raster order.

    Each patch is judged at its centre, mapped back through the ``pad`` preprocessing (the
    image of ``size`` padded to a centred square, resized to ``image_size``) and
    :func:`vtkit.demo.task.scene_to_image` into scene coordinates. ``colour``: 0 background,
    else 1 + the index of the colour of the object drawn there (:data:`IGNORE` in grayscale modes);
    ``shape``: 0 background, else 1 + the shape's index; ``centre``: 1 on the patch that holds
    an object's centre; ``cell``: the 3 x 3 grid cell (0-8), 9 outside the scene (padding).
    """
    width, height = size
    side, long = min(size), max(size)
    grid = image_size // patch_size
    centres = (np.arange(grid) + 0.5) * patch_size
    # Preprocessed pixel -> original image pixel -> scene point.
    to_image = long / image_size
    xs = (centres * to_image - (long - width) // 2 - (width - side) // 2) * SCENE_SIZE / side
    ys = (centres * to_image - (long - height) // 2 - (height - side) // 2) * SCENE_SIZE / side
    x, y = np.meshgrid(xs, ys)            # [grid, grid]: row = y, column = x
    inside = (x >= 0) & (x < SCENE_SIZE) & (y >= 0) & (y < SCENE_SIZE)
    cell = np.where(inside, (np.clip(y, 0, SCENE_SIZE - 1) // CELL) * GRID
                    + np.clip(x, 0, SCENE_SIZE - 1) // CELL, GRID * GRID)
    colour = np.zeros((grid, grid), dtype=np.int64)
    shape = np.zeros((grid, grid), dtype=np.int64)
    centre = np.zeros((grid, grid), dtype=np.int64)
    colours = list(COLOURS)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        cx, cy = obj.centre
        half = (x1 - x0) / 2
        if obj.shape == "circle":
            drawn = (x - cx) ** 2 + (y - cy) ** 2 <= half ** 2
        elif obj.shape == "square":
            drawn = (x >= x0) & (x < x1) & (y >= y0) & (y < y1)
        else:                              # apex at the top middle, base along the bottom
            drawn = (y >= y0) & (y < y1) & (np.abs(x - cx) <= half * (y - y0) / (y1 - y0))
        colour[drawn] = 1 + colours.index(obj.colour)
        shape[drawn] = 1 + SHAPES.index(obj.shape)
        # The patch under the centre: scene -> image -> preprocessed pixel.
        ix, iy = scene_to_image(scene, (cx, cy), size)
        px = int(((long - width) // 2 + ix) / to_image // patch_size)
        py = int(((long - height) // 2 + iy) / to_image // patch_size)
        centre[min(py, grid - 1), min(px, grid - 1)] = 1
    if mode in GRAYSCALE_MODES:
        colour[:] = IGNORE
    return np.stack([colour, shape, centre, cell]).reshape(4, -1).astype(np.int64)


def answer_ids(prompt: str, prompt_ids: list[int], answer: str, tokenizer) -> list[int]:
    """Token ids of the assistant's turn ``" {answer}</s>"`` after ``prompt``.

    LLaVA trains on the whole conversation tokenized at once, so the answer's ids are what
    ``prompt + " " + answer`` adds to the prompt's own ids, then EOS.
    """
    full = tokenize_prompt(f"{prompt} {answer}", tokenizer)
    if full[:len(prompt_ids)] != prompt_ids:
        raise ValueError(f"the tokenizer splits the prompt differently before the answer "
                         f"{answer[:20]!r}; the answer cannot be appended token-wise")
    return full[len(prompt_ids):] + [int(tokenizer.eos_token_id)]


@dataclass
class Example:
    """One training example: prompt ids around the image, answer ids, image bytes or None."""

    prefix: list[int]        # ids before the image (all of the prompt for text-only problems)
    suffix: list[int]        # ids after the image
    answer: list[int]        # " <letter>" and EOS
    pixels: np.ndarray | None  # uint8 [3, size, size]
    template: str
    labels: np.ndarray | None = None  # int64 [4, patches] (patch_labels), with pixels


class DemoExamples(Dataset):
    """Demo problems as training examples, rendered when asked for (so data-loading workers
    share the work and no image ever touches the disk). Indexing gives the evaluation's format."""

    def __init__(self, problems: Sequence[DemoProblem], tokenizer, image_size: int) -> None:
        self.problems = list(problems)
        self.tokenizer = tokenizer
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.problems)

    def __getitem__(self, index: int) -> Example:
        return self.example(self.problems[index])

    def example(self, problem: DemoProblem, explain: bool = False) -> Example:
        """The training example of any demo problem, in the evaluation's format or, with
        ``explain``, in the explained one (:data:`EXPLAIN_FORMAT`)."""
        fmt = EXPLAIN_FORMAT if explain else ANSWER_FORMAT
        entry = build_question_entries({problem.pid: problem.problem}, [problem.pid], fmt)[0]
        question = question_from_entry(entry, f"demo problem {problem.pid}")
        prompt = build_prompt(question, DEFAULT_CONV_MODE, SINGLE_PRED_PROMPT and not explain)
        ids = tokenize_prompt(prompt, self.tokenizer)
        answer = answer_ids(prompt, ids, question.answer, self.tokenizer)
        pixels = labels = None
        if problem.scene is not None:
            cut = ids.index(IMAGE_TOKEN_INDEX)
            prefix, suffix = ids[:cut], ids[cut + 1:]
            image = render_scene(problem.scene, problem.size, problem.mode)
            pixels = clip_uint8(image, self.image_size)
            labels = patch_labels(problem.scene, problem.size, problem.mode, self.image_size)
        else:
            prefix, suffix, labels = ids, [], None
        return Example(prefix, suffix, answer, pixels, problem.template, labels)


@dataclass
class Batch:
    """A right-padded batch. ``input_ids`` hold ``num_patches`` image tokens where each image
    goes (transformers' LLaVA replaces them with the projected features); ``positions[b, j]``
    is where the logits for ``targets[b, j]`` are read (-100 targets are padding)."""

    input_ids: torch.Tensor     # [B, L]
    pixels: torch.Tensor | None  # uint8 [images, 3, H, W]
    positions: torch.Tensor     # [B, T]
    targets: torch.Tensor       # [B, T]
    templates: list[str]
    labels: torch.Tensor | None = None  # int64 [images, 4, patches] (patch_labels)

    def pin_memory(self) -> Batch:
        """Page-locked copies (DataLoader calls this with ``pin_memory=True``)."""
        pixels = None if self.pixels is None else self.pixels.pin_memory()
        return Batch(self.input_ids.pin_memory(), pixels, self.positions, self.targets,
                     self.templates, self.labels)


def collate(examples: Sequence[Example], *, image_token_id: int, pad_token_id: int,
            num_patches: int) -> Batch:
    """Build a :class:`Batch`. Right padding needs no attention mask: under the causal mask no
    real token sees a pad, and every sequence's positions start at 0, as in the evaluation."""
    sequences, positions, targets = [], [], []
    for ex in examples:
        image = [image_token_id] * num_patches if ex.pixels is not None else []
        # The model reads the prompt and the answer but the last token; each answer token is
        # predicted from the position before it.
        sequence = ex.prefix + image + ex.suffix + ex.answer[:-1]
        start = len(sequence) - len(ex.answer)
        sequences.append(sequence)
        positions.append(list(range(start, start + len(ex.answer))))
        targets.append(list(ex.answer))
    length = max(map(len, sequences))
    width = max(map(len, targets))
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(examples), width), dtype=torch.long)
    target_ids = torch.full((len(examples), width), -100, dtype=torch.long)
    for row, (seq, pos, tgt) in enumerate(zip(sequences, positions, targets, strict=True)):
        input_ids[row, :len(seq)] = torch.tensor(seq)
        position_ids[row, :len(pos)] = torch.tensor(pos)
        target_ids[row, :len(tgt)] = torch.tensor(tgt)
    images = [ex.pixels for ex in examples if ex.pixels is not None]
    # numpy stacks uint8 images many times faster than torch.stack does on the CPU.
    pixels = torch.from_numpy(np.stack(images)) if images else None
    labels = None
    if images and all(ex.labels is not None for ex in examples if ex.pixels is not None):
        labels = torch.from_numpy(np.stack([ex.labels for ex in examples
                                            if ex.pixels is not None]))
    return Batch(input_ids, pixels, position_ids, target_ids, [ex.template for ex in examples],
                 labels)


def batch_seed(seed: int, index: int) -> int:
    """The demo seed whose train split gives batch ``index`` of a run seeded ``seed``."""
    return seed * 2**32 + index


class TrainBatches(Dataset):
    """The batches of a run, each built on its own, so that loading workers share no state and
    the data do not depend on how many there are. The first ``explain_fraction`` of each batch
    is in the explained format, the rest in the evaluation's.

    Without a pool, batch ``i`` is the first ``batch_size`` problems of the demo's train split
    for the seed :func:`batch_seed` (seed, i): every batch is new, so a small model cannot
    memorise its training set (the demo task's text questions come from a few thousand
    templates' worth of words). With a pool (the first ``n_train`` problems of the train split),
    batch ``i`` is the next slice of a seeded permutation of the pool, one per epoch.
    """

    def __init__(self, examples: DemoExamples, *, batch_size: int, seed: int, length: int,
                 pooled: bool, explain_fraction: float = 0.0, **collate_settings) -> None:
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.length, self.pooled = length, pooled
        self.explained = round(batch_size * explain_fraction)
        self.collate_settings = collate_settings

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Batch:
        if self.pooled:
            problems = [self.examples.problems[i] for i in self._pool_indices(index)]
        else:
            problems = generate_problems("train", self.batch_size, batch_seed(self.seed, index))
        # A split's order is shuffled in blocks of 20, so the first problems are as good a
        # sample as any for the explained format.
        return collate([self.examples.example(p, explain=j < self.explained)
                        for j, p in enumerate(problems)], **self.collate_settings)

    def _pool_indices(self, index: int) -> list[int]:
        n = len(self.examples.problems)
        per_epoch = max(1, n // self.batch_size)
        epoch, slot = divmod(index, per_epoch)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=generator).tolist()
        return order[slot * self.batch_size:(slot + 1) * self.batch_size]


def _as_is(batch: Batch) -> Batch:
    return batch


class PatchProbe(torch.nn.Module):
    """A linear read-out of :data:`PATCH_CHANNELS` from the tower's feature layer (the one LLaVA
    feeds its projector, CLS dropped), captured by a forward hook during the model's own
    forward, so the tower runs once. Training-only: it is not saved with the model."""

    def __init__(self, hf) -> None:
        from vtkit.model import clip_layers, feature_layer_index

        super().__init__()
        config = hf.config
        self.head = torch.nn.Linear(config.vision_config.hidden_size, sum(PATCH_CHANNELS.values()))
        _, layers = clip_layers(hf)
        index = feature_layer_index(config.vision_feature_layer, len(layers))
        self._features: torch.Tensor | None = None
        self._hook = layers[index - 1].register_forward_hook(self._capture)

    def _capture(self, module, inputs, output) -> None:
        self._features = output[0] if isinstance(output, tuple) else output

    def loss(self, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean cross-entropy over the channels, and per channel the number of right and of
        labelled patches (summed on the device)."""
        features = self._features[:, 1:]          # CLS dropped, as LLaVA's "default" does
        self._features = None
        logits = self.head(features).float()      # [images, patches, classes]
        losses, counts, start = [], {}, 0
        for channel, (name, classes) in enumerate(PATCH_CHANNELS.items()):
            part = logits[..., start:start + classes]
            start += classes
            target = labels[:, channel]
            valid = target != IGNORE
            labelled = valid.sum()
            # Summed, then divided by the labelled count: a channel with no labels in a batch
            # (colour, for grayscale images only) adds 0 instead of NaN, with no host sync.
            losses.append(torch.nn.functional.cross_entropy(
                part.flatten(0, 1), target.flatten(), ignore_index=IGNORE, reduction="sum")
                / labelled.clamp(min=1))
            counts[name] = torch.stack([((part.argmax(-1) == target) & valid).sum(), labelled])
        return torch.stack(losses).mean(), counts

    def remove(self) -> None:
        self._hook.remove()


def batch_losses(hf, batch: Batch, device: torch.device, autocast_dtype: torch.dtype | None,
            probe: PatchProbe | None = None) -> tuple[dict, torch.Tensor, dict]:
    """Losses of one batch: ``{"answer": ..., "probe": ...}`` (the probe's only with a probe),
    whether each example's letter is the arg-max (bool [B]), and the probe's per-channel
    counts (:meth:`PatchProbe.loss`).

    The answer loss is the cross-entropy over the answer tokens, its mean per sequence,
    averaged over the batch; the probe's is 0 for a batch without images."""
    input_ids = batch.input_ids.to(device, non_blocking=True)
    pixels = None if batch.pixels is None else normalise_pixels(
        batch.pixels.to(device, non_blocking=True))
    positions = batch.positions.to(device)
    targets = batch.targets.to(device)
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                        enabled=autocast_dtype is not None):
        hidden = hf.model(input_ids=input_ids, pixel_values=pixels,
                          use_cache=False).last_hidden_state
        rows = torch.arange(len(input_ids), device=device)[:, None]
        # The head runs only where an answer token is predicted, not over the whole sequence.
        logits = hf.lm_head(hidden[rows, positions]).float()
    token_loss = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none")
    # Each sequence counts once, however long its answer: a two-token letter answer weighs as
    # much as an explained one.
    mask = targets != -100
    losses = {"answer": ((token_loss.view_as(targets) * mask).sum(1) / mask.sum(1)).mean()}
    letter_right = logits[:, 0].argmax(-1) == targets[:, 0]
    counts = {}
    if probe is not None:
        if batch.labels is not None and probe._features is not None:
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):
                losses["probe"], counts = probe.loss(batch.labels.to(device, non_blocking=True))
        else:
            probe._features = None
            losses["probe"] = torch.zeros((), device=device)
    return losses, letter_right, counts


@torch.no_grad()
def validate(hf, batches: Sequence[Batch], device: torch.device,
             autocast_dtype: torch.dtype | None, probe: PatchProbe | None = None) -> dict:
    """Teacher-forced loss and letter accuracy on held-out batches, overall and per template,
    and with a probe its accuracy per channel (% of labelled patches)."""
    hf.eval()
    losses, right, by_template = [], 0, defaultdict(lambda: [0, 0])
    probe_counts = defaultdict(lambda: [0, 0])
    total = 0
    for batch in batches:
        loss, letter_right, counts = batch_losses(hf, batch, device, autocast_dtype, probe)
        for name, (ok, n) in counts.items():
            probe_counts[name][0] += int(ok)
            probe_counts[name][1] += int(n)
        losses.append(float(loss["answer"]) * len(batch.templates))
        total += len(batch.templates)
        right += int(letter_right.sum())
        for template, ok in zip(batch.templates, letter_right.tolist(), strict=True):
            by_template[template][0] += int(ok)
            by_template[template][1] += 1
    hf.train()
    per_template = {k: round(100.0 * c / n, 1) for k, (c, n) in sorted(by_template.items())}
    result = {"loss": sum(losses) / total, "accuracy": 100.0 * right / total,
              "by_template": per_template}
    if probe is not None:
        result["probe_accuracy"] = {k: round(100.0 * c / max(n, 1), 1)
                                    for k, (c, n) in probe_counts.items()}
    return result


# --------------------------------------------------------------------------------------------
# The run


def _default_workers(device: torch.device) -> int:
    import os

    if device.type != "cuda":
        return 0
    return max(1, min(14, (os.cpu_count() or 2) - 2))


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def train_demo_model(config: TrainConfig, reporter: Reporter | None = None) -> TrainResult:
    """Train the demo model, save it in both formats under ``config.output_dir``, measure it
    through the pipeline and write ``training.json`` next to the HF checkpoint.

    Returns the checkpoint paths (as :func:`vtkit.demo.tiny.save_tiny_checkpoints`), the record
    and the wall time. ``time_budget`` (seconds) times the warm-up steps and then fixes the step
    count (at most ``steps``) so training fits; the record says which count was used, and
    passing it as ``steps`` repeats the run.
    """
    from vtkit.demo.tiny import save_tiny_checkpoints
    from vtkit.model import resolve_device

    check_config(config)
    reporter = reporter or Reporter()
    started = time.perf_counter()
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    setup = _set_up(config, device, reporter)
    reporter.info(f"training {setup.parameters / 1e6:.2f} M parameters on {_device_name(device)}, "
                  f"batch {config.batch_size}, {setup.workers} loading workers")
    progress = _train(setup, config, reporter)
    if setup.probe is not None:
        setup.probe.remove()      # training-only: the saved model is plain LLaVA
    hf = setup.hf.to("cpu", getattr(torch, config.save_dtype)).eval()
    paths = save_tiny_checkpoints(hf, Path(config.output_dir))
    record = _training_record(config, setup, progress, started)
    # Written before the measurement too, so a failed measurement still leaves the record.
    cache.write_json_atomic(paths["hf"] / TRAINING_RECORD, record)
    if config.n_eval:
        record["evaluation"] = evaluate_checkpoint(paths["hf"], n_test=config.n_eval,
                                                   seed=config.seed, device=device,
                                                   reporter=reporter)
        record["seconds"] = round(time.perf_counter() - started, 1)
        cache.write_json_atomic(paths["hf"] / TRAINING_RECORD, record)
    return TrainResult(paths, record, time.perf_counter() - started)


@dataclass
class _Setup:
    """What a run trains and what it feeds it."""

    hf: torch.nn.Module              # LlavaForConditionalGeneration, on the device
    probe: PatchProbe | None
    optimiser: torch.optim.Optimizer
    loader: DataLoader
    val_batches: list[Batch]
    device: torch.device
    autocast_dtype: torch.dtype | None
    parameters: int                  # of the model (the probe's not counted)
    num_patches: int
    workers: int


def _set_up(config: TrainConfig, device: torch.device, reporter: Reporter) -> _Setup:
    """The model with its probe and optimiser, the training batches and the validation set,
    made in a fixed order (the model and the probe draw from torch's seeded generator)."""
    from vtkit.demo.tiny import TOKENIZER_DIR, random_tiny_model
    from vtkit.model import load_tokenizer

    llava_config = model_config(config)
    hf = random_tiny_model(llava_config, config.seed).to(device).train()
    parameters = sum(p.numel() for p in hf.parameters())
    tokenizer = load_tokenizer(TOKENIZER_DIR)
    vision = llava_config.vision_config
    num_patches = (vision.image_size // vision.patch_size) ** 2
    collate_settings = {"image_token_id": llava_config.image_token_id,
                        "pad_token_id": llava_config.text_config.pad_token_id,
                        "num_patches": num_patches}
    loader, workers = _loader(config, tokenizer, vision.image_size, collate_settings, device,
                              reporter)
    val_set = DemoExamples(generate_problems("val", config.n_val, config.seed), tokenizer,
                           vision.image_size)
    val_batches = [collate([val_set[i] for i in range(j, min(j + config.batch_size, len(val_set)))],
                           **collate_settings)
                   for j in range(0, len(val_set), config.batch_size)]
    probe = PatchProbe(hf).to(device) if config.aux_weight > 0 else None
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    return _Setup(hf, probe, _optimiser(config, hf, probe), loader, val_batches, device,
                  autocast_dtype, parameters, num_patches, workers)


def _loader(config: TrainConfig, tokenizer, image_size: int, collate_settings: dict,
            device: torch.device, reporter: Reporter) -> tuple[DataLoader, int]:
    """The training batches of the run, and the number of processes that load them."""
    pool = []
    if config.n_train is not None:
        reporter.info(f"generating the {config.n_train} training problems")
        pool = generate_problems("train", config.n_train, config.seed)
    batches_source = TrainBatches(
        DemoExamples(pool, tokenizer, image_size), batch_size=config.batch_size,
        seed=config.seed, length=config.steps, pooled=config.n_train is not None,
        explain_fraction=config.explain_fraction, **collate_settings)
    workers = _default_workers(device) if config.workers is None else config.workers
    loader = DataLoader(batches_source, batch_size=None, collate_fn=_as_is, num_workers=workers,
                        pin_memory=device.type == "cuda",
                        **({"prefetch_factor": 4} if workers else {}))
    return loader, workers


def _optimiser(config: TrainConfig, hf, probe: PatchProbe | None) -> torch.optim.AdamW:
    """AdamW over the model and the probe, weight decay on matrices only."""
    decay, no_decay = [], []
    for parameter in [*hf.parameters(), *(probe.parameters() if probe else ())]:
        (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(0.9, 0.98), eps=1e-8)


@dataclass
class _Progress:
    """Where a run stands: steps done and planned, the clock, the training losses since the
    last validation (summed on the device: reading a loss every step would wait for the GPU
    every step), and the validation history."""

    steps: int
    budget_known: bool
    timing_from: int
    device: torch.device
    step: int = 0
    started: float = field(default_factory=time.perf_counter)
    timing_started: float = 0.0
    seconds: float = 0.0
    recent_count: int = 0
    recent_answer: torch.Tensor | None = None
    recent_probe: torch.Tensor | None = None
    history: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.timing_started = self.started
        self.reset_recent()

    def reset_recent(self) -> None:
        """Start the next interval's training-loss sums."""
        self.recent_answer = torch.zeros((), device=self.device)
        self.recent_probe = torch.zeros((), device=self.device)
        self.recent_count = 0


def _train(setup: _Setup, config: TrainConfig, reporter: Reporter) -> _Progress:
    """The training loop: a step per batch, the step count fixed once warm-up is timed (with a
    time budget), a validation pass every ``eval_every`` steps and at the end."""
    # The second half of warm-up sets the pace (the first steps pay for allocator and kernel
    # start-up); the count is fixed when warm-up ends, before any rate depended on it.
    progress = _Progress(steps=config.steps, budget_known=config.time_budget is None,
                         timing_from=min(10, config.warmup_steps // 2), device=setup.device)
    with reporter.task("train", total=progress.steps, unit="steps") as task:
        batches = iter(setup.loader)
        while progress.step < progress.steps:
            lr = learning_rate(progress.step, config, progress.steps)
            _optimise(setup, next(batches), lr, config, progress)
            progress.step += 1
            task.advance()
            if progress.step == progress.timing_from:
                synchronize(setup.device)
                progress.timing_started = time.perf_counter()
            if not progress.budget_known and progress.step >= config.warmup_steps:
                _fix_step_count(progress, config, reporter)
                task.describe(f"train ({progress.steps} steps)")
            if progress.step % config.eval_every == 0 or progress.step == progress.steps:
                _validate_and_log(setup, progress, lr, reporter)
    progress.seconds = time.perf_counter() - progress.started
    return progress


def _optimise(setup: _Setup, batch: Batch, lr: float, config: TrainConfig,
              progress: _Progress) -> None:
    """One optimiser step on ``batch`` at learning rate ``lr``; its losses join the sums."""
    for group in setup.optimiser.param_groups:
        group["lr"] = lr
    losses, _, _ = batch_losses(setup.hf, batch, setup.device, setup.autocast_dtype, setup.probe)
    loss = losses["answer"]
    if setup.probe is not None:
        loss = loss + config.aux_weight * losses["probe"]
        progress.recent_probe += losses["probe"].detach()
    setup.optimiser.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(setup.hf.parameters(), config.grad_clip)
    setup.optimiser.step()
    progress.recent_answer += losses["answer"].detach()
    progress.recent_count += 1


def _fix_step_count(progress: _Progress, config: TrainConfig, reporter: Reporter) -> None:
    """With a time budget, when warm-up ends: the step count that fits, at the timed pace."""
    synchronize(progress.device)
    now = time.perf_counter()
    pace = (now - progress.timing_started) / max(1, progress.step - progress.timing_from)
    # 3% slack for validation passes and the slower cache-cold steps.
    left = config.time_budget - (now - progress.started)
    progress.steps = max(progress.step + 1,
                         min(config.steps, progress.step + int(0.97 * left / pace)))
    progress.budget_known = True
    reporter.info(f"time budget {config.time_budget:.0f} s at {pace * 1000:.0f} ms "
                  f"per step: {progress.steps} steps")


def _validate_and_log(setup: _Setup, progress: _Progress, lr: float, reporter: Reporter) -> None:
    """A validation pass, recorded in the history with the mean training losses since the
    last one, and reported."""
    val = validate(setup.hf, setup.val_batches, setup.device, setup.autocast_dtype, setup.probe)
    entry = {"step": progress.step, "lr": lr,
             "train_loss": round(float(progress.recent_answer) / progress.recent_count, 4),
             "val_loss": round(val["loss"], 4), "val_accuracy": val["accuracy"],
             "val_by_template": val["by_template"],
             "seconds": round(time.perf_counter() - progress.started, 1)}
    if setup.probe is not None:
        entry["train_probe_loss"] = round(float(progress.recent_probe) / progress.recent_count, 4)
        entry["val_probe_accuracy"] = val["probe_accuracy"]
    progress.history.append(entry)
    progress.reset_recent()
    kinds = ", ".join(f"{k} {v:.0f}" for k, v in
                      {**val["by_template"], **val.get("probe_accuracy", {})}.items())
    reporter.info(f"step {progress.step}: train loss {entry['train_loss']:.3f}, val loss "
                  f"{val['loss']:.3f}, val accuracy {val['accuracy']:.1f}% ({kinds})")


def _training_record(config: TrainConfig, setup: _Setup, progress: _Progress,
                     started: float) -> dict:
    """The record of a finished run (training.json), its final validation in float32 on the
    saved weights; ``evaluation`` is filled in by the measurement."""
    from transformers import __version__ as transformers_version

    return {
        "command": config.command or "vtkit.demo.train.train_demo_model (Python API)",
        "vtkit_version": __version__,
        "seed": config.seed,
        "config": config.to_dict(),
        "protocol": {"conv_mode": DEFAULT_CONV_MODE, "single_pred_prompt": SINGLE_PRED_PROMPT,
                     "image_mode": IMAGE_MODE, "visual_tokens": setup.num_patches,
                     "formats": {ANSWER_FORMAT: "single-prediction prompt, answer "
                                                "' <letter></s>'",
                                 EXPLAIN_FORMAT: "no instruction, answer: lecture, solution, "
                                                 "'The answer is X.'"},
                     "loss": "answer tokens only, plus aux_weight x the patch probe's "
                             "cross-entropy (colour, shape, centre, cell of each patch)"},
        "parameters": setup.parameters,
        "steps": progress.steps,
        "samples_seen": progress.steps * config.batch_size,
        "final_train_loss": progress.history[-1]["train_loss"],
        "final_val": validate(setup.hf.to(setup.device, torch.float32), setup.val_batches,
                              setup.device, None),
        "history": progress.history,
        "evaluation": None,
        "train_seconds": round(progress.seconds, 1),
        "seconds": round(time.perf_counter() - started, 1),
        "device": _device_name(setup.device),
        "torch": torch.__version__,
        "transformers": transformers_version,
        "saved_dtype": config.save_dtype,
    }


def evaluate_checkpoint(model_path: Path, *, n_test: int, seed: int = 0,
                        device: str | torch.device = "auto", scorer: str = "l2",
                        tokens: Sequence[int] = EVAL_TOKENS, max_new_tokens: int = 1024,
                        reporter: Reporter | None = None) -> dict:
    """Accuracy of a checkpoint on the first ``n_test`` demo test problems through the pipeline
    (extract, then sweep at ``tokens`` with ``scorer``), in float32.

    Returns ``{"scorer", "n_test", "questions", "image_questions", "accuracy": {k: %},
    "img_accuracy": {k: %}}`` (keys of the dicts are str(k), as in JSON).
    """
    from vtkit.demo.task import write_demo_scienceqa
    from vtkit.extract import ExtractConfig
    from vtkit.sweep import SweepConfig

    scratch = Path(tempfile.mkdtemp(prefix="vtkit-eval-"))
    try:
        base_dir = write_demo_scienceqa(scratch / "scienceqa", seed=seed, n_test=n_test)
        common = dict(model_path=str(model_path), base_dir=base_dir, output_dir=scratch / "out",
                      dtype="float32", device=str(device))
        run = run_pipeline(ExtractConfig(**common),
                           SweepConfig(**common, tokens=list(tokens), scorer=scorer,
                                       max_new_tokens=max_new_tokens), reporter=reporter)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    results = run.swept.results
    return {
        "scorer": scorer, "split": "test", "n_test": n_test,
        "questions": results[0].total, "image_questions": results[0].img_total,
        "accuracy": {str(r.k): round(r.accuracy, 2) for r in results},
        "img_accuracy": {str(r.k): round(r.img_accuracy, 2) for r in results},
    }
