"""Builds small synthetic ``sweep.h5`` files in the exact layout `vtkit sweep` writes
(schema version 3: ``spectra/<capture>/layer<L>/k<K>``, docs/cache.md).

The captured matrices are random products of known rank (rank ``min(k, rank)``), so their
spectra, ranks and the float64 check are all predictable.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from vtkit import __version__
from vtkit.cache import (
    SWEEP_FILE,
    SWEEP_SCHEMA_VERSION,
    attention_dataset,
    spectra_dataset,
)

TOKEN_COUNTS = (576, 300, 40, 20)


def write_sweep(
    output_dir: Path,
    *,
    token_counts: tuple[int, ...] = TOKEN_COUNTS,
    n_questions: int = 10,
    n_image: int = 6,
    hidden: int = 32,
    rank: int = 5,
    n_keep: int = 2,
    correct: np.ndarray | None = None,
    complete: bool = True,
    scorer: str = "l2",
    model_id: str = "llava-tiny-hf",
    random_init: bool = False,
    seed: int = 0,
    config: dict | None = None,
    layers: tuple[int, ...] = (0, 3),
    num_layers: int = 4,
    captures: tuple[str, ...] = ("attn_out",),
) -> Path:
    """Write ``output_dir/sweep.h5``; the first ``n_image`` questions have an image.

    ``correct`` ([n_k, n_questions] bool) defaults to accuracy falling as k falls; ``config``
    adds to the stored config (e.g. conv_mode, temperature, dtype). ``layers`` are the analysed
    decoder layers of a ``num_layers``-layer model (the default: the first and the last, as
    ``--layers first,last``), each with a spectrum per capture and k.
    """
    rng = np.random.default_rng(seed)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / SWEEP_FILE
    n_k = len(token_counts)
    if correct is None:
        # Question q is answered correctly while k is at least its own cut-off.
        cutoffs = rng.choice(np.asarray(token_counts), size=n_questions)
        correct = np.asarray(token_counts)[:, None] >= cutoffs[None, :]
    has_image = np.arange(n_questions) < n_image
    question_ids = [f"q{i:04d}" for i in range(n_questions)]
    answers = np.where(correct, "A", "B").astype(object)
    config = {"token_counts": list(token_counts), "scorer": scorer, "model_path": model_id,
              **(config or {})}
    with h5py.File(path, "w") as f:
        f.attrs["vtkit_version"] = __version__
        f.attrs["schema_version"] = SWEEP_SCHEMA_VERSION
        f.attrs["config"] = json.dumps(config)
        f.attrs["fingerprint"] = f"sweep-{seed}-{scorer}"
        f.attrs["extract_fingerprint"] = f"extract-{seed}"
        f.attrs["model_id"] = model_id
        f.attrs["scorer"] = scorer
        f.attrs["random_init"] = random_init
        f.attrs["layers"] = np.asarray(sorted(layers), dtype=np.int64)
        f.attrs["num_layers"] = num_layers
        f.attrs["captures"] = json.dumps(list(captures))
        f.attrs["hidden_size"] = hidden
        f.attrs["complete"] = complete
        f["token_counts"] = np.asarray(token_counts, dtype=np.int32)
        f.create_dataset("question_ids", data=question_ids, dtype=h5py.string_dtype())
        f["has_image"] = has_image
        f["correct"] = np.asarray(correct, dtype=bool).reshape(n_k, n_questions)
        f.create_dataset("answers", data=answers, dtype=h5py.string_dtype())
        for capture in captures:
            for layer in sorted(layers):
                for k in token_counts:
                    r = min(rank, k)
                    matrices = (rng.standard_normal((n_image, k, r))
                                @ rng.standard_normal((n_image, r, hidden))).astype(np.float16)
                    # The same values as the k x hidden matrices', and far faster in LAPACK for
                    # tall ones.
                    wide = matrices if k <= hidden else np.swapaxes(matrices, -1, -2)
                    spectra = np.linalg.svd(wide.astype(np.float32), compute_uv=False)
                    f[spectra_dataset(capture, layer, k)] = spectra.astype(np.float32)
                    if n_keep:
                        f[attention_dataset(capture, layer, k)] = matrices[:n_keep]
    return path
