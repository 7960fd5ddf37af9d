"""Stage 3: rank measures of the visual tokens' rows, at every analysed layer and tensor.

`vtkit sweep` stores, for every captured tensor (``--capture``), analysed decoder layer
(``--layers``), k and image question, the singular values of the k visual rows (``sweep.h5``).
This stage turns those spectra into rank measures, so thresholds can change without re-running
the sweep, and writes ``ranks.json``: mean, std and a 95% bootstrap interval over image
questions per (tensor, layer, measure, k), and per k and layer the mean rank of the questions
answered right against those answered wrong. Where the sweep also kept raw matrices, their
singular values are recomputed in float64 as a check that the stored spectra are what they
claim to be.

Definitions (see docs/rank.md):

- numerical rank: the number of singular values above ``threshold * s.max()``, at each
  threshold given (the first is the headline one);
- effective rank (Roy & Vetterli, 2007): ``exp(H(p))`` with ``p = s / s.sum()`` and ``H`` the
  Shannon entropy (natural log); ``n`` for ``n`` equal values, 1 for a single non-zero value;
- stable rank: ``sum(s**2) / s.max()**2``; ``n`` for ``n`` equal values, never above the rank.
"""

from __future__ import annotations

import json
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
    SWEEP_FILE,
    SWEEP_SCHEMA_VERSION,
    attention_dataset,
    spectra_dataset,
)
from vtkit.defaults import DEFAULT_CAPTURE, DEFAULT_SEED, DEFAULT_THRESHOLD
from vtkit.errors import DataError, UsageError
from vtkit.progress import Reporter

#: A stored spectrum further than this (relative to the largest singular value) from the float64
#: spectrum of its kept float16 matrix is reported as a mismatch; float16 storage of the raw matrix
#: alone moves singular values by well under 1e-3 of the largest.
SPECTRA_CHECK_TOLERANCE = 1e-2

#: The rounding floor of a relative singular-value threshold per capture dtype: the largest
#: singular value (relative to the largest) that rounding a 576 x 4096 matrix of rank 256 once to
#: the dtype adds; about a fifth of the unit roundoff (2^-11, 2^-8). Derivation and table in
#: docs/rank.md. float32's floor is far below any threshold in (0, 1) worth using.
ROUNDING_FLOORS = {"float16": 1.0e-4, "bfloat16": 8.0e-4}
#: A threshold less than this many times its dtype's floor is warned about.
FLOOR_MARGIN = 3.0
#: The dtype names a sweep config may hold (torch's aliases included), by canonical name.
_DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32",
                  "float": "float32"}
#: Bootstrap of the means over image questions: resamples and the interval's coverage.
BOOTSTRAP_SAMPLES = 1000
CI_LEVEL = 0.95
#: Why every rank series is null at k = 0 (written to ranks.json when the grid holds it).
UNRANKED_NOTE = ("k = 0 keeps no visual token: there are no visual rows, so no rank; every rank "
                 "value at k = 0 is null (the accuracy at k = 0 is real)")
EFFECTIVE_RANK = "effective_rank"
STABLE_RANK = "stable_rank"


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


def stable_ranks(spectra: np.ndarray) -> np.ndarray:
    """Stable rank of each row of ``spectra`` ([n, m]): ``sum(s**2) / max(s)**2``, float64 [n].

    ``n`` for ``n`` equal values, 1 for one non-zero value, 0 for an all-zero row.
    """
    spectra = np.asarray(spectra, dtype=np.float64)
    if spectra.shape[-1] == 0:
        return np.zeros(spectra.shape[:-1])
    peak = spectra.max(axis=-1)
    energy = (spectra * spectra).sum(axis=-1)
    return np.divide(energy, peak * peak, out=np.zeros_like(energy), where=peak > 0)


def stable_rank(singular_values: np.ndarray) -> float:
    """Stable rank of one spectrum: 6/4 for [2, 1, 1]."""
    return float(stable_ranks(np.asarray(singular_values)[None, :])[0])


def numerical_rank_measure(threshold: float) -> str:
    """The name of the numerical rank at ``threshold`` in ranks.json (``numerical_rank@0.001``)."""
    return f"numerical_rank@{threshold:g}"


def bootstrap_weights(n: int, samples: int = BOOTSTRAP_SAMPLES, seed: int = DEFAULT_SEED,
                      ) -> np.ndarray:
    """How often each of ``n`` items is drawn in each of ``samples`` resamples with replacement:
    float64 [samples, n]. A resample's mean of ``values`` is then ``values @ weights.T / n``, one
    matrix product for every k at once; the same draws serve every layer, tensor and measure."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(samples, n))
    offsets = draws + (np.arange(samples) * n)[:, None]
    return np.bincount(offsets.ravel(), minlength=samples * n).reshape(samples, n).astype(
        np.float64)


def bootstrap_interval(values: np.ndarray, weights: np.ndarray, level: float = CI_LEVEL,
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of the mean of each row of ``values`` ([n_k, n]), from the
    resample counts ``weights`` ([samples, n], :func:`bootstrap_weights`): (low, high), [n_k]."""
    values = np.asarray(values, dtype=np.float64)
    means = values @ weights.T / values.shape[1]
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail], axis=1)
    return low, high


def summarise(values: np.ndarray, weights: np.ndarray) -> dict[str, list[float]]:
    """Mean, std (population, ddof=0: defined for one question) and the bootstrap interval of
    each row of ``values`` [n_k, n_img], as lists over k."""
    low, high = bootstrap_interval(values, weights)
    return {"mean": values.mean(axis=1).tolist(), "std": values.std(axis=1).tolist(),
            "ci95_low": low.tolist(), "ci95_high": high.tolist()}


def correctness_table(ranks: np.ndarray, correct: np.ndarray) -> dict[str, list]:
    """Per k, the mean of ``ranks`` ([n_k, n_img]) over the questions answered right and over
    those answered wrong (``correct``, [n_k, n_img] bool), and the group sizes; a mean is None
    where its group is empty."""
    ranks = np.asarray(ranks, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    n_right = correct.sum(axis=1)
    n_wrong = (~correct).sum(axis=1)
    right = np.where(correct, ranks, 0.0).sum(axis=1)
    wrong = np.where(correct, 0.0, ranks).sum(axis=1)
    return {
        "right_mean": [float(s / n) if n else None for s, n in zip(right, n_right, strict=True)],
        "wrong_mean": [float(s / n) if n else None for s, n in zip(wrong, n_wrong, strict=True)],
        "n_right": n_right.tolist(),
        "n_wrong": n_wrong.tolist(),
    }


def canonical_dtype(name: str | None) -> str | None:
    """``float16``/``bfloat16``/``float32`` for a dtype name or alias (``torch.bfloat16``,
    ``fp16``); None for none or an unknown one."""
    if not name:
        return None
    name = str(name).removeprefix("torch.").lower()
    name = _DTYPE_ALIASES.get(name, name)
    return name if name in ("float16", "bfloat16", "float32") else None


def dtype_warnings(dtype: str | None, thresholds: tuple[float, ...]) -> list[str]:
    """One warning per threshold within :data:`FLOOR_MARGIN` x of the capture dtype's rounding
    floor (:data:`ROUNDING_FLOORS`); none for float32 or an unknown dtype."""
    floor = ROUNDING_FLOORS.get(canonical_dtype(dtype) or "")
    if floor is None:
        return []
    return [f"threshold {t:g} is only {t / floor:.2g}x the {dtype} rounding floor ({floor:g} of "
            f"the largest singular value): numerical ranks there count rounding noise; compare "
            f"a larger threshold (docs/rank.md)"
            for t in thresholds if t < FLOOR_MARGIN * floor]


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
        if schema is None or int(schema) != SWEEP_SCHEMA_VERSION:
            raise DataError(f"{path} has schema version {schema}, this vtkit reads version "
                            f"{SWEEP_SCHEMA_VERSION}: re-run `vtkit sweep --force` to recompute it")
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
    # In-LLM scorers record what k means there (vtkit.sweep.in_llm_pruning).
    pruning = {"pruning": json.loads(attrs["pruning"])} if "pruning" in attrs else {}
    return {
        **pruning,
        "model_id": str(attrs.get("model_id", "")),
        "scorer": str(attrs.get("scorer", "")),
        "random_init": bool(attrs.get("random_init", False)),
        "sweep_fingerprint": str(attrs.get("fingerprint", "")),
        "sweep_vtkit_version": str(attrs.get("vtkit_version", "")),
        "layers": [int(v) for v in np.asarray(attrs.get("layers", []))],
        "hidden_size": int(attrs.get("hidden_size", 0)),
    }


def analysed_layers(handle: h5py.File) -> list[int]:
    """The analysed decoder layer indices (attribute ``layers``), ascending."""
    layers = np.asarray(handle.attrs.get("layers", []))
    if layers.ndim != 1 or not layers.size or (layers < 0).any():
        raise DataError(f"{handle.filename}: attribute 'layers' is {layers.tolist()!r}, expected "
                        "the analysed decoder layer indices: re-run `vtkit sweep --force`")
    return sorted(int(v) for v in layers)


def analysed_captures(handle: h5py.File) -> list[str]:
    """The captured tensors' names (attribute ``captures``, a JSON list)."""
    try:
        captures = json.loads(handle.attrs.get("captures", ""))
    except (TypeError, ValueError):
        captures = None
    if not isinstance(captures, list) or not captures \
            or not all(isinstance(c, str) for c in captures):
        raise DataError(f"{handle.filename}: attribute 'captures' is not a JSON list of tensor "
                        "names: re-run `vtkit sweep --force`")
    return captures


def primary_capture(captures: list[str]) -> str:
    """The tensor of the seed's two curves and of ``per_layer``: attn_out when captured."""
    return DEFAULT_CAPTURE if DEFAULT_CAPTURE in captures else captures[0]


def capture_dtype(handle: h5py.File) -> str | None:
    """The dtype the sweep ran in: the config's ``dtype``, else the resolved one in its inputs."""
    for key in ("config", "inputs"):
        try:
            record = json.loads(handle.attrs.get(key, "{}"))
        except (TypeError, ValueError):
            continue
        dtype = canonical_dtype(record.get("dtype")) if isinstance(record, dict) else None
        if dtype:
            return dtype
    return None


def _read_spectra(handle: h5py.File, capture: str, layer: int, k: int, n_img: int,
                  ) -> np.ndarray:
    path = Path(handle.filename)
    name = spectra_dataset(capture, layer, k)
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


def parse_thresholds(text: str) -> tuple[float, ...]:
    """``--threshold 1e-3,1e-2``: the thresholds in the order given (UsageError naming the flag)."""
    try:
        values = tuple(float(part) for part in str(text).split(","))
    except ValueError:
        raise UsageError(f"--threshold takes numbers in (0, 1), comma-separated, not "
                         f"{text!r}") from None
    return values


@dataclass
class RankConfig:
    """What `vtkit rank` needs: the run's output dir and the relative thresholds (``threshold``
    is the headline one; ``more_thresholds`` are reported next to it)."""

    output_dir: Path
    threshold: float = DEFAULT_THRESHOLD
    more_thresholds: tuple[float, ...] = ()
    bootstrap_samples: int = BOOTSTRAP_SAMPLES
    seed: int = DEFAULT_SEED

    @property
    def thresholds(self) -> tuple[float, ...]:
        return (self.threshold, *self.more_thresholds)

    def validate(self) -> None:
        """Check the flags before any work (UsageError naming the flag)."""
        for threshold in self.thresholds:
            if not 0.0 < threshold < 1.0:
                raise UsageError(f"--threshold must be in (0, 1), not {threshold:g}")
        if len({numerical_rank_measure(t) for t in self.thresholds}) != len(self.thresholds):
            raise UsageError(f"--threshold lists a value twice: "
                             f"{','.join(f'{t:g}' for t in self.thresholds)}")
        if self.bootstrap_samples < 1:
            raise UsageError(f"bootstrap samples must be at least 1, not {self.bootstrap_samples}")


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
class LayerMeasures:
    """Every measure of one tensor at one decoder layer, summarised over image questions:
    ``summaries`` {measure: {"mean", "std", "ci95_low", "ci95_high"}} and the ``correctness``
    table of the headline numerical rank (lists over k)."""

    summaries: dict[str, dict[str, list[float]]]
    correctness: dict[str, list]


@dataclass
class SpectraCheck:
    """Float64 re-computation of the spectra of the raw matrices the sweep kept."""

    matrices_checked: int = 0
    max_relative_difference: float | None = None
    #: The seed's two curves (first_layer, last_layer of the primary capture), as before.
    per_layer: dict[str, float | None] = field(default_factory=dict)
    #: Every checked tensor and decoder layer: {capture: {layer: difference}}.
    per_capture: dict[str, dict[int, float]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return (self.max_relative_difference is None
                or self.max_relative_difference <= SPECTRA_CHECK_TOLERANCE)

    def add(self, capture: str, layer: int, matrices: int, difference: float) -> None:
        self.matrices_checked += matrices
        layers = self.per_capture.setdefault(capture, {})
        layers[layer] = max(layers.get(layer, difference), difference)
        self.max_relative_difference = max(self.max_relative_difference or 0.0, difference)

    def to_json(self) -> dict[str, Any]:
        return {
            "matrices_checked": self.matrices_checked,
            "max_relative_difference": self.max_relative_difference,
            "per_layer_max_relative_difference": self.per_layer,
            "per_capture_max_relative_difference": {
                capture: {str(layer): value for layer, value in layers.items()}
                for capture, layers in self.per_capture.items()},
            "tolerance": SPECTRA_CHECK_TOLERANCE,
            "ok": self.ok,
        }


@dataclass
class RankResult:
    """What `vtkit rank` computed and where it wrote it.

    ``layers`` holds the seed's two curves (:data:`vtkit.cache.LAYERS`: the primary capture's
    smallest and largest analysed layer); ``measures`` every tensor and analysed layer.
    """

    path: Path
    meta: dict[str, Any]
    token_counts: list[int]
    image_question_ids: list[str]
    layers: dict[str, LayerRanks]
    spectra_check: SpectraCheck
    thresholds: list[float] = field(default_factory=list)
    layer_indices: list[int] = field(default_factory=list)
    captures: list[str] = field(default_factory=list)
    primary_capture: str = DEFAULT_CAPTURE
    measures: dict[str, dict[int, LayerMeasures]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def per_layer(self) -> dict[str, dict[str, list[float]]]:
        """ranks.json's ``per_layer``: the primary capture's mean ranks per analysed layer."""
        headline = numerical_rank_measure(self.thresholds[0])
        return {
            str(layer): {
                "numerical_rank_mean": measures.summaries[headline]["mean"],
                "effective_rank_mean": measures.summaries[EFFECTIVE_RANK]["mean"],
                "stable_rank_mean": measures.summaries[STABLE_RANK]["mean"],
            }
            for layer, measures in self.measures[self.primary_capture].items()
        }

    def to_json(self, per_question: bool = True) -> dict[str, Any]:
        """The ranks.json document (``per_question=False`` drops the [n_k][n_img] lists)."""
        document: dict[str, Any] = {"meta": self.meta, "token_counts": self.token_counts}
        if per_question:
            document["image_question_ids"] = self.image_question_ids
        for layer, ranks in self.layers.items():
            document[layer] = ranks.summary()
            if per_question:
                document[layer]["numerical_rank_per_question"] = [
                    None if np.isnan(row).any() else row.astype(np.int64).tolist()
                    for row in np.asarray(ranks.numerical, dtype=np.float64)]
        document["spectra_check"] = self.spectra_check.to_json()
        document.update({
            "thresholds": self.thresholds,
            "layers": self.layer_indices,
            "captures": self.captures,
            "primary_capture": self.primary_capture,
            "per_layer": self.per_layer(),
            "measures": {capture: {str(layer): m.summaries for layer, m in layers.items()}
                         for capture, layers in self.measures.items()},
            "correctness": {capture: {str(layer): m.correctness for layer, m in layers.items()}
                            for capture, layers in self.measures.items()},
            "warnings": self.warnings,
            "unranked_token_counts": [k for k in self.token_counts if k == 0],
        })
        if 0 in self.token_counts:
            document["unranked_note"] = UNRANKED_NOTE
        return _nan_to_null(document)


def _nan_to_null(value: Any) -> Any:
    """``value`` with every float NaN (a rank at k = 0) replaced by None (JSON null)."""
    if isinstance(value, dict):
        return {key: _nan_to_null(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_nan_to_null(item) for item in value]
    if isinstance(value, float) and np.isnan(value):
        return None
    return value


def _check_kept(handle: h5py.File, capture: str, layer: int, k: int, spectra: np.ndarray,
                check: SpectraCheck) -> None:
    """Recompute the spectra of the raw matrices kept of (capture, layer, k), if any, in
    float64 and compare them with the stored ones (already read: ``spectra``)."""
    name = attention_dataset(capture, layer, k)
    if name not in handle:
        return
    matrices = handle[name][()]
    try:
        difference = spectra_difference(matrices, spectra[: matrices.shape[0]])
    except ValueError as error:
        raise DataError(f"{handle.filename}: {name}: {error}") from None
    check.add(capture, layer, matrices.shape[0], difference)


def _measure_layer(handle: h5py.File, capture: str, layer: int, token_counts: list[int],
                   n_img: int, thresholds: tuple[float, ...], check: SpectraCheck,
                   task) -> dict[str, np.ndarray]:
    """Every measure of every image question at one (capture, layer): {measure: [n_k, n_img]}.

    Each k's spectra are read once and measured as one [n_img, min(k, d)] block."""
    names = [numerical_rank_measure(t) for t in thresholds] + [EFFECTIVE_RANK, STABLE_RANK]
    blocks = {name: np.empty((len(token_counts), n_img)) for name in names}
    for i, k in enumerate(token_counts):
        if k == 0:      # no visual rows: no rank (NaN here, null in ranks.json)
            for block in blocks.values():
                block[i] = np.nan
            task.advance()
            continue
        # float64 once, not once per measure.
        spectra = _read_spectra(handle, capture, layer, k, n_img).astype(np.float64)
        for threshold in thresholds:
            blocks[numerical_rank_measure(threshold)][i] = numerical_ranks(spectra, threshold)
        blocks[EFFECTIVE_RANK][i] = effective_ranks(spectra)
        blocks[STABLE_RANK][i] = stable_ranks(spectra)
        _check_kept(handle, capture, layer, k, spectra, check)
        task.advance()
    return blocks


def _read_answers(handle: h5py.File) -> tuple[list[int], list[str], np.ndarray]:
    """The grid, the image questions' ids and their ``correct`` columns [n_k, n_img]."""
    token_counts = [int(k) for k in handle["token_counts"][()]]
    question_ids = handle["question_ids"].asstr()[()]
    has_image = np.asarray(handle["has_image"][()], dtype=bool)
    correct = np.asarray(handle["correct"][()], dtype=bool)
    if correct.shape != (len(token_counts), len(question_ids)):
        raise DataError(f"{handle.filename}: 'correct' has shape {correct.shape}, expected "
                        f"({len(token_counts)}, {len(question_ids)}): re-run `vtkit sweep`")
    image_ids = [str(q) for q in question_ids[has_image]]
    if not image_ids:
        raise DataError(f"{handle.filename} has no image questions: no visual tokens to rank")
    return token_counts, image_ids, correct[:, has_image]


def _measure_all(handle: h5py.File, captures: list[str], layer_indices: list[int],
                 token_counts: list[int], thresholds: list[float], weights: np.ndarray,
                 correct_images: np.ndarray, seed_slots: tuple[str, set[int]],
                 check: SpectraCheck, task) -> tuple[dict, dict[int, LayerRanks]]:
    """Every (capture, layer)'s measures and right-vs-wrong table, and the per-question ranks
    of the seed's two curves (``seed_slots``: the primary capture and its end layers)."""
    headline = numerical_rank_measure(thresholds[0])
    primary, ends = seed_slots
    measures: dict[str, dict[int, LayerMeasures]] = {}
    seed_curves: dict[int, LayerRanks] = {}
    for capture in captures:
        measures[capture] = {}
        for layer in layer_indices:
            blocks = _measure_layer(handle, capture, layer, token_counts, correct_images.shape[1],
                                    thresholds, check, task)
            measures[capture][layer] = LayerMeasures(
                summaries={name: summarise(values, weights) for name, values in blocks.items()},
                correctness=correctness_table(blocks[headline], correct_images))
            if capture == primary and layer in ends:
                numerical = blocks[headline]
                seed_curves[layer] = LayerRanks(
                    numerical=numerical if np.isnan(numerical).any() else numerical.astype(
                        np.int64), effective=blocks[EFFECTIVE_RANK])
    return measures, seed_curves


@cache.holds_output_lock(create=False)
def compute_ranks(config: RankConfig, reporter: Reporter | None = None) -> RankResult:
    """Read ``sweep.h5`` in ``config.output_dir``, compute the rank measures, write
    ``ranks.json``.

    Raises DataError when sweep.h5 is missing, unfinished, of another schema version or
    malformed, or has no image questions (there is nothing to rank without visual tokens).
    """
    reporter = reporter or Reporter()
    config.validate()
    output_dir = Path(config.output_dir)
    thresholds = config.thresholds
    with open_sweep(output_dir) as handle:
        meta = sweep_meta(handle)
        layer_indices = analysed_layers(handle)
        captures = analysed_captures(handle)
        primary = primary_capture(captures)
        dtype = capture_dtype(handle)
        token_counts, image_ids, correct_images = _read_answers(handle)
        weights = bootstrap_weights(len(image_ids), config.bootstrap_samples, config.seed)
        ends = {LAYERS[0]: layer_indices[0], LAYERS[1]: layer_indices[-1]}
        check = SpectraCheck()
        with reporter.task("ranking spectra",
                           total=len(captures) * len(layer_indices) * len(token_counts),
                           unit="k") as task:
            measures, seed_curves = _measure_all(
                handle, captures, layer_indices, token_counts, thresholds, weights,
                correct_images, (primary, set(ends.values())), check, task)
    if check.matrices_checked:
        check.per_layer = {name: check.per_capture.get(primary, {}).get(layer)
                           for name, layer in ends.items()}

    meta = {
        "vtkit_version": __version__,
        "threshold": thresholds[0],
        **meta,
        "n_image_questions": len(image_ids),
        "dtype": dtype,
        "bootstrap_samples": config.bootstrap_samples,
        "bootstrap_seed": config.seed,
    }
    warnings = dtype_warnings(dtype, thresholds)
    if not check.ok:
        warnings.append(f"spectra check: largest relative difference "
                        f"{check.max_relative_difference:.2e} (float64 vs stored) exceeds "
                        f"{SPECTRA_CHECK_TOLERANCE:g}: the stored spectra do not match the kept "
                        "matrices")
    result = RankResult(path=output_dir / RANKS_FILE, meta=meta, token_counts=token_counts,
                        image_question_ids=image_ids,
                        layers={name: seed_curves[layer] for name, layer in ends.items()},
                        spectra_check=check, thresholds=list(thresholds),
                        layer_indices=layer_indices, captures=captures, primary_capture=primary,
                        measures=measures, warnings=warnings)
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
         f"{last['effective_rank_mean'][i]:.1f}"] if k else [k, *["no visual rows"] * 4]
        for i, k in enumerate(result.token_counts)
    ]
    reporter.table(
        f"Rank of the visual rows (threshold {result.meta['threshold']:g}, "
        f"{result.meta['n_image_questions']} image questions)",
        ["k", "first layer rank", "last layer rank", "first eff. rank", "last eff. rank"],
        rows,
    )
    if len(result.layer_indices) > 2 or len(result.captures) > 1:
        _report_depth(result, reporter)
    for warning in result.warnings:
        reporter.warn(warning)
    check = result.spectra_check
    if check.matrices_checked:
        if check.ok:
            reporter.info(f"spectra check: {check.matrices_checked} kept matrices, largest "
                          f"relative difference {check.max_relative_difference:.2e} (float64 vs "
                          "stored)")
    else:
        reporter.info("spectra check: no raw matrices kept (vtkit sweep --keep-attention 0)")
    reporter.info(f"wrote {result.path}")


def _report_depth(result: RankResult, reporter: Reporter) -> None:
    """One row per tensor and layer: the measures at the largest and the smallest k."""
    headline = numerical_rank_measure(result.thresholds[0])
    ends = (0, len(result.token_counts) - 1)
    rows = []
    for capture, layers in result.measures.items():
        for layer, measures in layers.items():
            rows.append([capture, layer, *(
                f"{measures.summaries[name]['mean'][i]:.1f}"
                for i in ends for name in (headline, EFFECTIVE_RANK, STABLE_RANK))])
    k_first, k_last = (result.token_counts[i] for i in ends)
    reporter.table(
        "Mean ranks over image questions, per tensor and decoder layer",
        ["tensor", "layer", f"rank k={k_first}", f"eff. k={k_first}", f"stable k={k_first}",
         f"rank k={k_last}", f"eff. k={k_last}", f"stable k={k_last}"],
        rows,
    )
