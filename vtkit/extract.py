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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from vtkit import cache
from vtkit.data import Question, Selection, select_questions
from vtkit.errors import DataError
from vtkit.images import load_image, preprocess_images
from vtkit.parallel import init_ranks
from vtkit.progress import Reporter
from vtkit.pruning import SCORERS, l2_scores, random_scores, uniform_scores

FEATURES_FILE = "features.h5"
PARTS_DIR = "features.parts"


@dataclass
class ExtractConfig:
    """Everything that decides what ``vtkit extract`` computes (saved in the cache)."""

    model_path: str
    base_dir: Path
    model_base: str | None = None
    question_file: Path | None = None
    image_folder: Path | None = None
    split: str = "test"
    num_samples: int = -1
    output_dir: Path = Path("pruning_results")
    image_mode: str = "pad"          # pad (LLaVA-1.5 code) | crop (llava-hf, published 66.8)
    batch_size: int | None = None    # images per vision forward; None: 32 on CUDA, 8 on CPU
    dtype: str | None = None         # None: float16 on CUDA, float32 on CPU
    device: str = "auto"
    random_init: bool = False
    seed: int = 0                    # the random scorer's seed
    force: bool = False
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


@dataclass
class ExtractResult:
    path: Path
    num_images: int
    num_computed: int
    seconds: float
    bytes_per_image: float
    already_complete: bool
    random_init: bool


def image_stats(selection: Selection, questions: list[Question]) -> list[tuple[str, int, int]]:
    """(relative path, size in bytes, mtime in ns) of each question's image."""
    stats = []
    for q in questions:
        st = selection.image_path(q).stat()
        stats.append((q.image, st.st_size, st.st_mtime_ns))
    return stats


def _digest(items) -> str:
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def cache_inputs(identity: dict, config: ExtractConfig, questions: list[Question],
                 stats: list[tuple[str, int, int]], feature_dtype: str) -> dict:
    """The record of what a features cache is made from; its hash is the cache's fingerprint."""
    model = {k: identity.get(k) for k in
             ("model_path", "model_base", "format", "weights_sha256", "random_init")}
    return {
        "schema_version": cache.SCHEMA_VERSION,
        "model": model,
        "dtype": str(identity.get("dtype")),
        "feature_dtype": feature_dtype,
        "image_mode": config.image_mode,
        "questions": _digest([q.question_id for q in questions]),
        "images": _digest(stats),
        "scorers": list(SCORERS),
        "seed": config.seed,
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
    selection = select_questions(config.base_dir, config.question_file, config.image_folder,
                                 config.split, config.num_samples)
    questions = [q for q in selection.questions if q.has_image]
    if not questions:
        raise DataError(f"no image questions among the {len(selection.questions)} selected "
                        f"questions; nothing to extract")
    stats = image_stats(selection, questions)

    ranks = init_ranks(config.device)
    if model is None:
        from vtkit.model import load_model

        model = load_model(config.model_path, config.model_base, random_init=config.random_init,
                           dtype=config.dtype, device=ranks.device(config.device))
    if model.identity.get("random_init"):
        reporter.warn("RANDOM WEIGHTS (--random-init): features are noise; for benchmarks only")
    feature_dtype = _feature_dtype(model.dtype)
    inputs = cache_inputs(model.identity, config, questions, stats, feature_dtype.name)

    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / FEATURES_FILE
    store = cache.start_parts(final, output_dir / PARTS_DIR, inputs, config.force, ranks)
    if store is None:
        reporter.info(f"{final}: cache is complete ({len(questions)} images); nothing to do")
        return ExtractResult(final, len(questions), 0, time.perf_counter() - started,
                             final.stat().st_size / len(questions), True,
                             bool(model.identity.get("random_init")))
    done = set()
    for part in store.parts():
        with h5py.File(part, "r") as f:
            done.update(s.decode() for s in f["question_ids"][:])
    todo = ranks.share([q for q in questions if q.question_id not in done])
    if done:
        reporter.info(f"resuming: {len(done)} of {len(questions)} images already extracted")

    batch_size = config.batch_size or (32 if model.device.type == "cuda" else 8)
    computed = _run_vision(model, selection, todo, batch_size, config, store, reporter,
                           feature_dtype)
    ranks.barrier()
    if ranks.is_main:
        _merge(store, final, questions, stats, model, config, inputs, feature_dtype)
        store.remove()
    ranks.barrier()
    size = final.stat().st_size
    reporter.info(f"wrote {final} ({len(questions)} images, {size / len(questions) / 1e6:.2f} MB "
                  f"per image)")
    return ExtractResult(final, len(questions), computed, time.perf_counter() - started,
                         size / len(questions), False, bool(model.identity.get("random_init")))


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


def _merge(store, final, questions, stats, model, config, inputs, feature_dtype) -> None:
    """Gather the parts into the final file in question order, through a temporary name."""
    index = {q.question_id: i for i, q in enumerate(questions)}
    n, num_patches = len(questions), model.num_patches
    cache.check_free_space(final.parent, store.size(), final, cache.PARTS_KEPT)
    # Each row is written as one whole chunk: no chunk cache needed (none to flush at close).
    with cache.atomic_h5(final, cache.PARTS_KEPT, rdcc_nbytes=0) as out:
        attrs = cache.base_attrs(config.to_dict(), inputs)
        attrs.update({
            "model_id": str(model.identity.get("model_path")),
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
        out.create_dataset("image_paths", data=np.asarray([s[0] for s in stats], dtype=object),
                           dtype=cache.STRING)
        out.create_dataset("image_sizes", data=np.asarray([s[1] for s in stats], dtype=np.int64))
        out.create_dataset("image_mtimes_ns",
                           data=np.asarray([s[2] for s in stats], dtype=np.int64))
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
