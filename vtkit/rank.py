"""Stage 3: numerical and effective rank of the visual tokens' attention outputs.

`vtkit sweep` stores, for every k and every image question, the singular values of the k visual
rows of the first and the last decoder layer's self-attention output (``sweep.h5``). This stage
turns those spectra into ranks, so the threshold can change without re-running the sweep, and
writes ``ranks.json``. Where the sweep also kept raw matrices, their singular values are
recomputed in float64 as a check that the stored spectra are what they claim to be.

Definitions (see docs/rank.md):

- numerical rank: the number of singular values above ``threshold * s.max()``;
- effective rank (Roy & Vetterli, 2007): ``exp(H(p))`` with ``p = s / s.sum()`` and ``H`` the
  Shannon entropy (natural log); ``n`` for ``n`` equal values, 1 for a single non-zero value.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from vtkit import __version__, cache
from vtkit.cache import (
    LAYERS,
    RANKS_FILE,
    SCHEMA_VERSION,
    SWEEP_FILE,
    attention_dataset,
    spectra_dataset,
)
from vtkit.defaults import DEFAULT_THRESHOLD
from vtkit.errors import DataError, UsageError
from vtkit.progress import Reporter

#: A stored spectrum further than this (relative to the largest singular value) from the float64
#: spectrum of its kept float16 matrix is reported as a mismatch; float16 storage of the raw matrix
#: alone moves singular values by well under 1e-3 of the largest.
SPECTRA_CHECK_TOLERANCE = 1e-2


# ---------------------------------------------------------------------------------------------
# Pure functions of spectra


def _check_threshold(threshold: float) -> None:
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")


def numerical_ranks(spectra: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """Numerical rank of each row of ``spectra`` ([n, m] singular values): int64 [n].

    A row's rank is the count of its values strictly above ``threshold`` times its largest value;
    an all-zero row has rank 0.
    """
    _check_threshold(threshold)
    spectra = np.asarray(spectra, dtype=np.float64)
    if spectra.shape[-1] == 0:
        return np.zeros(spectra.shape[:-1], dtype=np.int64)
    cutoff = threshold * spectra.max(axis=-1, keepdims=True)
    return (spectra > cutoff).sum(axis=-1).astype(np.int64)


def numerical_rank(singular_values: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> int:
    """Number of singular values above ``threshold * max``; 0 for an all-zero matrix."""
    return int(numerical_ranks(np.asarray(singular_values)[None, :], threshold)[0])


def effective_ranks(spectra: np.ndarray) -> np.ndarray:
    """Effective rank (Roy & Vetterli) of each row of ``spectra`` ([n, m]): float64 [n].

    ``exp(-sum p log p)`` with ``p = s / s.sum()`` and ``0 log 0 = 0``; an all-zero row gives 0.
    """
    spectra = np.asarray(spectra, dtype=np.float64)
    total = spectra.sum(axis=-1, keepdims=True)
    p = np.divide(spectra, total, out=np.zeros_like(spectra), where=total > 0)
    # log only where p > 0: 0 log 0 is 0 by continuity, and log(0) would warn.
    plogp = p * np.log(p, out=np.zeros_like(p), where=p > 0)
    entropy = -plogp.sum(axis=-1)
    return np.where(total[..., 0] > 0, np.exp(entropy), 0.0)


def effective_rank(singular_values: np.ndarray) -> float:
    """Effective rank of one spectrum: n for n equal values, 1 for one non-zero value."""
    return float(effective_ranks(np.asarray(singular_values)[None, :])[0])


def singular_values_float64(matrices: np.ndarray) -> np.ndarray:
    """Singular values (descending) of each matrix in ``matrices`` [n, k, d], in float64.

    Computed as square roots of the eigenvalues of the smaller Gram matrix: several times faster
    than ``np.linalg.svd`` on wide k x 4096 matrices, and in float64 the values agree with it to
    about 1e-8 of the largest (the square root of float64's epsilon) at worst, far below the
    float32 precision of the stored spectra.
    """
    a = np.asarray(matrices, dtype=np.float64)
    a_t = np.swapaxes(a, -1, -2)
    gram = a @ a_t if a.shape[-2] <= a.shape[-1] else a_t @ a
    eigenvalues = np.linalg.eigvalsh(gram)[..., ::-1]
    # Rounding can leave the zero eigenvalues of a rank-deficient matrix slightly negative.
    return np.sqrt(np.clip(eigenvalues, 0.0, None))


def spectra_difference(matrices: np.ndarray, stored: np.ndarray) -> float:
    """Largest difference between ``stored`` spectra and the float64 spectra of ``matrices``.

    ``matrices`` [n, k, d], ``stored`` [n, min(k, d)]; each matrix's difference is relative to its
    recomputed largest singular value (absolute for an all-zero matrix).
    """
    exact = singular_values_float64(matrices)
    stored = np.asarray(stored, dtype=np.float64)
    if exact.shape != stored.shape:
        raise ValueError(f"spectra shape {stored.shape} does not match matrices {exact.shape}")
    if exact.size == 0:
        return 0.0
    scale = exact.max(axis=-1, keepdims=True)
    scale = np.where(scale > 0, scale, 1.0)
    return float((np.abs(exact - stored) / scale).max())


# ---------------------------------------------------------------------------------------------
# sweep.h5


@contextmanager
def open_sweep(output_dir: Path) -> Iterator[h5py.File]:
    """Open ``<output_dir>/sweep.h5`` to read; refuse a missing, foreign or unfinished file."""
    path = Path(output_dir) / SWEEP_FILE
    if not path.is_file():
        raise DataError(f"{path} not found: run `vtkit sweep` first")
    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise DataError(f"{path} is not a readable HDF5 file ({error})") from None
    with handle:
        schema = handle.attrs.get("schema_version")
        if schema is None or int(schema) != SCHEMA_VERSION:
            raise DataError(f"{path} has schema_version {schema}, expected "
                            f"{SCHEMA_VERSION}: re-run `vtkit sweep --force` with this "
                            "vtkit")
        if not bool(handle.attrs.get("complete", False)):
            raise DataError(f"{path} is incomplete: finish `vtkit sweep` (re-run it to resume) "
                            "before ranking or plotting")
        for name in ("token_counts", "question_ids", "has_image", "correct"):
            if name not in handle:
                raise DataError(f"{path} has no dataset '{name}': re-run `vtkit sweep`")
        yield handle


def sweep_meta(handle: h5py.File) -> dict[str, Any]:
    """The run description stored in sweep.h5's attributes, as plain JSON-ready values."""
    attrs = handle.attrs
    return {
        "model_id": str(attrs.get("model_id", "")),
        "scorer": str(attrs.get("scorer", "")),
        "random_init": bool(attrs.get("random_init", False)),
        "sweep_fingerprint": str(attrs.get("fingerprint", "")),
        "sweep_vtkit_version": str(attrs.get("vtkit_version", "")),
        "layers": [int(v) for v in np.asarray(attrs.get("layers", []))],
        "hidden_size": int(attrs.get("hidden_size", 0)),
    }


def _read_spectra(handle: h5py.File, layer: str, k: int, n_img: int) -> np.ndarray:
    path = Path(handle.filename)
    name = spectra_dataset(layer, k)
    if name not in handle:
        raise DataError(f"{path} has no dataset '{name}': re-run `vtkit sweep`")
    spectra = handle[name][()]
    if spectra.ndim != 2 or spectra.shape[0] != n_img:
        raise DataError(f"{path}: '{name}' has shape {spectra.shape}, expected "
                        f"({n_img}, min(k, hidden)) for {n_img} image questions")
    if not np.isfinite(spectra).all():
        row = int(np.argwhere(~np.isfinite(spectra))[0, 0])
        raise DataError(f"{path}: '{name}' has non-finite singular values "
                        f"(image question {row})")
    return spectra


# ---------------------------------------------------------------------------------------------
# The stage


@dataclass
class RankConfig:
    """What `vtkit rank` needs: the run's output dir and the relative threshold."""

    output_dir: Path
    threshold: float = DEFAULT_THRESHOLD

    def validate(self) -> None:
        """Check the flags before any work (UsageError naming the flag)."""
        if not 0.0 < self.threshold < 1.0:
            raise UsageError(f"--threshold must be in (0, 1), not {self.threshold}")


@dataclass
class LayerRanks:
    """Ranks of one layer: per question [n_k, n_img] and their mean/std over questions [n_k]."""

    numerical: np.ndarray
    effective: np.ndarray

    def summary(self) -> dict[str, list[float]]:
        # Population std (ddof=0): defined for a single question too.
        return {
            "numerical_rank_mean": self.numerical.mean(axis=1).tolist(),
            "numerical_rank_std": self.numerical.std(axis=1).tolist(),
            "effective_rank_mean": self.effective.mean(axis=1).tolist(),
            "effective_rank_std": self.effective.std(axis=1).tolist(),
        }


@dataclass
class SpectraCheck:
    """Float64 re-computation of the spectra of the raw matrices the sweep kept."""

    matrices_checked: int = 0
    max_relative_difference: float | None = None
    per_layer: dict[str, float | None] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return (self.max_relative_difference is None
                or self.max_relative_difference <= SPECTRA_CHECK_TOLERANCE)

    def to_json(self) -> dict[str, Any]:
        return {
            "matrices_checked": self.matrices_checked,
            "max_relative_difference": self.max_relative_difference,
            "per_layer_max_relative_difference": self.per_layer,
            "tolerance": SPECTRA_CHECK_TOLERANCE,
            "ok": self.ok,
        }


@dataclass
class RankResult:
    """What `vtkit rank` computed and where it wrote it."""

    path: Path
    meta: dict[str, Any]
    token_counts: list[int]
    image_question_ids: list[str]
    layers: dict[str, LayerRanks]
    spectra_check: SpectraCheck

    def to_json(self, per_question: bool = True) -> dict[str, Any]:
        """The ranks.json document (``per_question=False`` drops the [n_k][n_img] lists)."""
        document: dict[str, Any] = {"meta": self.meta, "token_counts": self.token_counts}
        if per_question:
            document["image_question_ids"] = self.image_question_ids
        for layer, ranks in self.layers.items():
            document[layer] = ranks.summary()
            if per_question:
                document[layer]["numerical_rank_per_question"] = ranks.numerical.tolist()
        document["spectra_check"] = self.spectra_check.to_json()
        return document


def _check_spectra(handle: h5py.File, token_counts: list[int], reporter: Reporter) -> SpectraCheck:
    """Recompute the spectrum of every kept raw matrix in float64; compare with the stored ones."""
    names = [(layer, k) for layer in LAYERS for k in token_counts
             if attention_dataset(layer, k) in handle]
    check = SpectraCheck()
    if not names:
        return check
    with reporter.task("checking stored spectra", total=len(names), unit="k") as task:
        for layer, k in names:
            matrices = handle[attention_dataset(layer, k)][()]
            stored = handle[spectra_dataset(layer, k)][: matrices.shape[0]]
            try:
                difference = spectra_difference(matrices, stored)
            except ValueError as error:
                raise DataError(f"{handle.filename}: {attention_dataset(layer, k)}: {error}") \
                    from None
            check.matrices_checked += matrices.shape[0]
            previous = check.per_layer.get(layer)
            check.per_layer[layer] = difference if previous is None else max(previous, difference)
            task.advance()
    check.max_relative_difference = max(check.per_layer.values())
    return check


@cache.holds_output_lock(create=False)
def compute_ranks(config: RankConfig, reporter: Reporter | None = None) -> RankResult:
    """Read ``sweep.h5`` in ``config.output_dir``, compute ranks, write ``ranks.json``.

    Raises DataError when sweep.h5 is missing, unfinished or malformed, or has no image
    questions (there is nothing to rank without visual tokens).
    """
    reporter = reporter or Reporter()
    config.validate()
    output_dir = Path(config.output_dir)
    with open_sweep(output_dir) as handle:
        meta = sweep_meta(handle)
        token_counts = [int(k) for k in handle["token_counts"][()]]
        question_ids = handle["question_ids"].asstr()[()]
        has_image = np.asarray(handle["has_image"][()], dtype=bool)
        image_ids = [str(q) for q in question_ids[has_image]]
        if not image_ids:
            raise DataError(f"{handle.filename} has no image questions: no visual tokens to rank")
        layers = {}
        with reporter.task("ranking spectra", total=len(LAYERS) * len(token_counts),
                           unit="k") as task:
            for layer in LAYERS:
                numerical = np.empty((len(token_counts), len(image_ids)), dtype=np.int64)
                effective = np.empty((len(token_counts), len(image_ids)), dtype=np.float64)
                for i, k in enumerate(token_counts):
                    spectra = _read_spectra(handle, layer, k, len(image_ids))
                    numerical[i] = numerical_ranks(spectra, config.threshold)
                    effective[i] = effective_ranks(spectra)
                    task.advance()
                layers[layer] = LayerRanks(numerical=numerical, effective=effective)
        check = _check_spectra(handle, token_counts, reporter)

    meta = {
        "vtkit_version": __version__,
        "threshold": config.threshold,
        **meta,
        "n_image_questions": len(image_ids),
    }
    result = RankResult(path=output_dir / RANKS_FILE, meta=meta, token_counts=token_counts,
                        image_question_ids=image_ids, layers=layers, spectra_check=check)
    _write_json(result.path, result.to_json())
    _report(result, reporter)
    return result


def _write_json(path: Path, document: dict[str, Any]) -> None:
    """Write atomically, so a reader never sees half a document."""
    cache.write_json_atomic(path, document, indent=1)


def _report(result: RankResult, reporter: Reporter) -> None:
    first, last = (result.layers[layer].summary() for layer in LAYERS)
    rows = [
        [k,
         f"{first['numerical_rank_mean'][i]:.1f} ± {first['numerical_rank_std'][i]:.1f}",
         f"{last['numerical_rank_mean'][i]:.1f} ± {last['numerical_rank_std'][i]:.1f}",
         f"{first['effective_rank_mean'][i]:.1f}",
         f"{last['effective_rank_mean'][i]:.1f}"]
        for i, k in enumerate(result.token_counts)
    ]
    reporter.table(
        f"Rank of the visual rows (threshold {result.meta['threshold']:g}, "
        f"{result.meta['n_image_questions']} image questions)",
        ["k", "first layer rank", "last layer rank", "first eff. rank", "last eff. rank"],
        rows,
    )
    check = result.spectra_check
    if check.matrices_checked:
        message = (f"spectra check: {check.matrices_checked} kept matrices, largest relative "
                   f"difference {check.max_relative_difference:.2e} (float64 vs stored)")
        if check.ok:
            reporter.info(message)
        else:
            reporter.warn(f"{message} exceeds {SPECTRA_CHECK_TOLERANCE:g}: the stored spectra do "
                          "not match the kept matrices")
    else:
        reporter.info("spectra check: no raw matrices kept (vtkit sweep --keep-attention 0)")
    reporter.info(f"wrote {result.path}")
