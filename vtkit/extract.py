"""Stage 1, ``vtkit extract``: run the vision tower once per image question and cache, in HDF5,
the CLIP features (layer -2, CLS dropped, before the projector) and every scorer's importance
scores. ``docs/cache.md`` documents the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import h5py
import numpy as np
import torch

from vtkit import cache
from vtkit.cache import FEATURES_FILE, FEATURES_PARTS_DIR, STALE_AFTER_EXTRACT
from vtkit.data import Question, Selection, check_num_samples, select_questions
from vtkit.defaults import (
    DEFAULT_DEVICE,
    DEFAULT_NUM_SAMPLES,
    DEFAULT_OUTPUT_DIR,
    DEFAULT_SEED,
    DEFAULT_SPLIT,
    IN_LLM_SCORERS,
)
from vtkit.errors import DataError, UsageError
from vtkit.images import check_image_mode, load_image, preprocess_images
from vtkit.parallel import init_workers
from vtkit.progress import Reporter
from vtkit.pruning import SCORERS as ALL_SCORERS
from vtkit.pruning import l2_scores, random_scores, uniform_scores

#: The scorers whose scores extract stores (the in-LLM ones score inside the sweep).
SCORERS = tuple(s for s in ALL_SCORERS if s not in IN_LLM_SCORERS)


@dataclass
class ExtractConfig:
    """Everything that decides what ``vtkit extract`` computes (saved in the cache)."""

    model_path: str
    base_dir: Path
    model_base: str | None = None
    question_file: Path | None = None
    image_folder: Path | None = None
    split: str = DEFAULT_SPLIT
    num_samples: int = DEFAULT_NUM_SAMPLES
    output_dir: Path = DEFAULT_OUTPUT_DIR
    image_mode: str | None = None    # pad | crop; None: the checkpoint's (model.image_mode_default)
    batch_size: int | None = None    # images per vision forward; None: 32 on CUDA, 8 on CPU
    dtype: str | None = None         # None: float16 on CUDA, float32 on CPU
    device: str = DEFAULT_DEVICE
    random_init: bool = False
    seed: int = DEFAULT_SEED         # the random scorer's seed
    force: bool = False
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}

    def validate(self) -> None:
        """Check every flag that can be checked without the model (UsageError naming it)."""
        if self.image_mode is not None:
            check_image_mode(self.image_mode)
        check_common_flags(self)


def check_common_flags(config) -> None:
    """The flags extract and sweep share: --num-samples, --batch-size, --dtype, --device."""
    from vtkit.model import resolve_device, resolve_dtype

    check_num_samples(config.num_samples)
    if config.batch_size is not None and config.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, not {config.batch_size}")
    if not str(config.split).strip():
        raise UsageError("--split must name a split of pid_splits.json")
    resolve_dtype(config.dtype, resolve_device(config.device))


@dataclass
class ExtractResult:
    path: Path
    num_images: int
    num_computed: int
    seconds: float
    bytes_per_image: float
    already_complete: bool
    random_init: bool


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def image_hashes(selection: Selection, questions: list[Question]) -> list[tuple[str, str]]:
    """(relative path, sha256 of the file's bytes) of each question's image.

    The content, not size and mtime: a touched but unchanged image is the same input, a changed
    one with equal size and mtime is not. Hashed on a few threads (hashlib releases the GIL)."""
    paths = [selection.image_path(q) for q in questions]
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(file_sha256, paths))
    return [(q.image, d) for q, d in zip(questions, digests, strict=True)]


def vision_settings(model) -> dict:
    """The vision facts that decide the features: CLIP input size, patch size, feature layer,
    and the mean/std the pixels are normalised with."""
    return {"image_size": int(model.image_size), "patch_size": int(model.patch_size),
            "feature_layer": int(model.vision_feature_layer),
            "image_mean": [float(v) for v in model.image_mean],
            "image_std": [float(v) for v in model.image_std]}


def cache_inputs(model, image_mode: str, seed: int, questions: list[Question],
                 hashes: list[tuple[str, str]], feature_dtype: str) -> dict:
    """The record of what a features cache is made from; its hash is the cache's fingerprint.

    The model counts by what determines its outputs (:func:`vtkit.model.model_key`), never by
    the path it was loaded from."""
    from vtkit.model import model_key

    return {
        "schema_version": cache.FEATURES_SCHEMA_VERSION,
        "model": model_key(model.identity),
        "vision": vision_settings(model),
        "dtype": str(model.identity.get("dtype")),
        "feature_dtype": feature_dtype,
        "image_mode": image_mode,
        "questions": cache.digest([q.question_id for q in questions]),
        "images": cache.digest(hashes),
        "scorers": list(SCORERS),
        "seed": seed,
    }


def _feature_dtype(model_dtype: torch.dtype) -> np.dtype:
    # Half-precision models store float16 (bfloat16 converts exactly within CLIP's range);
    # float32 runs keep float32 so the cached path equals the stock forward bit for bit.
    return np.dtype(np.float32) if model_dtype == torch.float32 else np.dtype(np.float16)


@cache.holds_output_lock
def extract(config: ExtractConfig, reporter: Reporter | None = None, model=None) -> ExtractResult:
    """Compute (or resume, or confirm) the features cache ``<output_dir>/features.h5``."""
    reporter = reporter or Reporter()
    started = time.perf_counter()
    config.validate()
    selection = select_questions(config.base_dir, config.question_file, config.image_folder,
                                 config.split, config.num_samples)
    questions = [q for q in selection.questions if q.has_image]
    if not questions:
        raise DataError(f"no image questions among the {len(selection.questions)} selected "
                        f"questions; nothing to extract")
    hashes = image_hashes(selection, questions)

    workers = init_workers(config.device)
    if model is None:
        from vtkit.model import load_model

        model = load_model(config.model_path, config.model_base, random_init=config.random_init,
                           dtype=config.dtype, device=workers.device(config.device))
    if model.identity.get("random_init"):
        reporter.warn("RANDOM WEIGHTS (--random-init): features are noise; for benchmarks only")
    # The resolved mode is what is fingerprinted and recorded.
    config = replace(config, image_mode=config.image_mode or model.image_mode_default)
    feature_dtype = _feature_dtype(model.dtype)
    inputs = cache_inputs(model, config.image_mode, config.seed, questions, hashes,
                          feature_dtype.name)

    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / FEATURES_FILE
    store = cache.start_parts(final, output_dir / FEATURES_PARTS_DIR, inputs, config.force, workers,
                              cache.FEATURES_SCHEMA_VERSION)
    if store is None:
        reporter.info(f"{final}: cache is complete ({len(questions)} images); nothing to do")
        return ExtractResult(final, len(questions), 0, time.perf_counter() - started,
                             final.stat().st_size / len(questions), True,
                             bool(model.identity.get("random_init")))
    if config.force and workers.is_main:
        # New features: whatever the sweep, rank and plot made from the old ones is stale.
        gone = cache.remove_outputs(output_dir, STALE_AFTER_EXTRACT)
        if gone:
            reporter.info(f"--force: removed {len(gone)} outputs of the old features (sweep, "
                          f"answers, ranks, results, figures)")
    todo = _remaining(store, questions, workers, reporter)
    batch_size = config.batch_size or (32 if model.device.type == "cuda" else 8)
    computed = _run_vision(model, selection, todo, batch_size, config, store, reporter,
                           feature_dtype)
    workers.barrier()
    if workers.is_main:
        _merge(store, final, questions, hashes, model, config, inputs, feature_dtype)
        store.remove()
    workers.barrier()
    size = final.stat().st_size
    reporter.info(f"wrote {final} ({len(questions)} images, {size / len(questions) / 1e6:.2f} MB "
                  f"per image)")
    return ExtractResult(final, len(questions), computed, time.perf_counter() - started,
                         size / len(questions), False, bool(model.identity.get("random_init")))


def _remaining(store: cache.PartStore, questions: list[Question], workers,
               reporter: Reporter) -> list[Question]:
    """This process's share of the image questions that no finished part holds yet."""
    done = set()
    for part in store.parts():
        with h5py.File(part, "r") as f:
            done.update(s.decode() for s in f["question_ids"][:])
    todo = workers.share([q for q in questions if q.question_id not in done])
    if done:
        reporter.info(f"resuming: {len(done)} of {len(questions)} images already extracted")
    return todo


def _load_batch(selection: Selection, batch: list[Question], image_mode: str, model,
                decoders: ThreadPoolExecutor) -> torch.Tensor:
    """Decode and preprocess a batch of images, several at a time (PIL releases the GIL)."""
    def one(question: Question) -> torch.Tensor:
        return preprocess_images([load_image(selection.image_path(question))], image_mode,
                                 size=model.image_size, mean=model.image_mean,
                                 std=model.image_std)

    return torch.cat(list(decoders.map(one, batch)))


def _run_vision(model, selection, todo, batch_size, config, store, reporter, feature_dtype) -> int:
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    if not batches:
        return 0
    uniform = uniform_scores(model.num_patches)
    position = {q.question_id: i for i, q in enumerate(selection.questions)}
    # Decode and preprocess the next batch on a thread while the device runs this one.
    decoders = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
    with decoders, ThreadPoolExecutor(max_workers=1) as pool, \
            reporter.task("extract", total=len(todo), unit="images") as task:
        pending = pool.submit(_load_batch, selection, batches[0], config.image_mode, model,
                              decoders)
        for index, batch in enumerate(batches):
            pixels = pending.result()
            if index + 1 < len(batches):
                pending = pool.submit(_load_batch, selection, batches[index + 1],
                                      config.image_mode, model, decoders)
            with torch.inference_mode():
                features, cls_attention = model.encode_images(
                    pixels.to(model.device, model.dtype))
                l2 = l2_scores(model.project(features))
            ids = [q.question_id for q in batch]
            # Parts are named by the position of their first question: unique across resumes.
            store.write(f"part-{position[ids[0]]:06d}", {
                "question_ids": ids,
                "features": features.float().cpu().numpy().astype(feature_dtype),
                "scores/l2": l2.cpu().numpy(),
                "scores/cls": cls_attention.float().cpu().numpy(),
                "scores/random": np.stack([random_scores(q, model.num_patches, config.seed)
                                           for q in ids]),
                "scores/uniform": np.tile(uniform, (len(ids), 1)),
            })
            task.advance(len(batch))
    return len(todo)


def _merge(store, final, questions, hashes, model, config, inputs, feature_dtype) -> None:
    """Gather the parts into the final file in question order, through a temporary name."""
    index = {q.question_id: i for i, q in enumerate(questions)}
    n, num_patches = len(questions), model.num_patches
    cache.check_free_space(final.parent, store.size(), final, cache.PARTS_KEPT)
    # Each row is written as one whole chunk: no chunk cache needed (none to flush at close).
    with cache.atomic_h5(final, cache.PARTS_KEPT, rdcc_nbytes=0) as out:
        attrs = cache.base_attrs(config.to_dict(), inputs, cache.FEATURES_SCHEMA_VERSION)
        attrs.update({
            # The model path as given; sweep.h5's model_id is the checkpoint's name (docs/cache.md).
            "model_id": str(model.identity.get("model_path")),
            "checkpoint_dir": str(model.identity.get("checkpoint_dir")),
            "random_init": bool(model.identity.get("random_init")),
            "image_mode": config.image_mode,
            "dtype": str(model.dtype).replace("torch.", ""),
            "num_patches": num_patches,
            "scorers": json.dumps(list(SCORERS)),
            "complete": False,
        })
        out.attrs.update(attrs)
        out.create_dataset("question_ids", data=np.asarray([q.question_id for q in questions],
                                                           dtype=object), dtype=cache.STRING)
        out.create_dataset("image_paths", data=np.asarray([h[0] for h in hashes], dtype=object),
                           dtype=cache.STRING)
        out.create_dataset("image_sha256", data=np.asarray([h[1] for h in hashes], dtype=object),
                           dtype=cache.STRING)
        features = None
        scores = {name: out.create_dataset(f"scores/{name}", (n, num_patches), np.float32)
                  for name in SCORERS}
        filled = np.zeros(n, dtype=bool)
        for part in store.parts():
            with h5py.File(part, "r") as f:
                rows = [index[s.decode()] for s in f["question_ids"][:]]
                block = f["features"][:]
                if features is None:
                    features = out.create_dataset(
                        "features", (n, num_patches, block.shape[-1]), feature_dtype,
                        chunks=(1, num_patches, block.shape[-1]), compression="lzf",
                        shuffle=True)
                for j, row in enumerate(rows):
                    features[row] = block[j]
                for name in SCORERS:
                    scores[name][rows] = f[f"scores/{name}"][:]
                filled[rows] = True
        if not filled.all():
            missing = [questions[i].question_id for i in np.flatnonzero(~filled)]
            raise DataError(f"{store.directory}: parts are missing questions "
                            f"{', '.join(missing[:10])}; re-run vtkit extract")
        out.attrs["complete"] = True
