"""Stage 4: results JSON and figures of accuracy and rank against the number of visual tokens.

Reads ``sweep.h5`` (which answers were correct at each k) and ``ranks.json`` (from `vtkit
rank`), and writes to the same output dir:

- ``raw_results.json``: token counts as swept, accuracy and IMG accuracy (percent), mean
  numerical and effective ranks of the first and last layer, and a ``meta`` block;
- ``normalized_results.json``: the same plus every series min-max normalised to [0, 1];
- ``pruning_experiment_results.png``/``.pdf``: the normalised series against k;
- ``pruning_experiment_raw.png``/``.pdf``: raw accuracy with a 95% bootstrap band over questions
  and the mean ranks with their std, on twin axes;
- ``pruning_experiment_compare.png``/``.pdf`` (with ``compare``): accuracy of several runs,
  with a warning for each way the runs differ other than the scorer (:data:`COMPARED`);
- when ranks.json has ``measures`` for more than two layers of its primary capture (a sweep with
  ``--layers all`` or a list): ``rank_heatmap_<measure>.png``/``.pdf``, depth x k for each
  measure (each layer min-max normalised over k, and raw), and ``rank_by_layer.png``/``.pdf``,
  the headline numerical rank of up to :data:`MAX_LAYER_CURVES` layers against k. Depth figures
  of an earlier plot that this one does not redraw are removed, so none is left stale.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from vtkit import __version__, cache
from vtkit.cache import (
    COMPARE_FIGURE,
    DEPTH_FIGURE_PATTERNS,
    LAYER_CURVES_FIGURE,
    LAYERS,
    NORMALIZED_RESULTS_FILE,
    RANKS_FILE,
    RAW_FIGURE,
    RAW_RESULTS_FILE,
    RESULTS_FIGURE,
    SWEEP_FILE,
    heatmap_figure,
)
from vtkit.defaults import CAPTURE_DESCRIPTIONS
from vtkit.errors import CacheMismatchError, DataError
from vtkit.progress import Reporter
from vtkit.rank import open_sweep, sweep_meta

#: Resolution of the PNG figures (the PDFs are vector).
DPI = 300
#: Figure size in inches: 3000 x 1800 pixels at 300 dpi.
FIGSIZE = (10.0, 6.0)
#: The heatmaps' two panels side by side: 3900 x 1800 pixels at 300 dpi.
HEATMAP_FIGSIZE = (13.0, 6.0)
#: The heatmaps' colours; a cell without a value is grey.
HEATMAP_COLORS = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
#: More curves than this in rank_by_layer cannot be told apart; the heatmap shows every layer.
MAX_LAYER_CURVES = 8

#: What overlaid runs should share for their curves to be compared; each difference is warned.
COMPARED = ("questions", "template", "temperature", "model")

#: The series of raw_results.json that get a min-max normalised copy in normalized_results.json,
#: raw key -> normalised key, in this order.
NORMALIZED_SERIES = {key: f"normalized_{key}" for key in (
    "accuracies", "img_accuracies",
    *(f"{layer}_ranks" for layer in LAYERS),
    *(f"{layer}_effective_ranks" for layer in LAYERS))}
#: How the figures show the layers.
LAYER_STYLES = dict(zip(LAYERS, (("First-layer rank", "tab:red"),
                                 ("Last-layer rank", "tab:green")), strict=True))


# ---------------------------------------------------------------------------------------------
# Pure functions


def accuracy_percent(correct: np.ndarray, columns: np.ndarray | None = None) -> np.ndarray:
    """Percent of True per row of ``correct`` [n_k, n_q], over ``columns`` (a bool mask) if given.

    An empty selection gives NaN (there is no accuracy over zero questions).
    """
    correct = np.asarray(correct, dtype=bool)
    if columns is not None:
        correct = correct[:, np.asarray(columns, dtype=bool)]
    if correct.shape[1] == 0:
        return np.full(correct.shape[0], np.nan)
    return correct.mean(axis=1) * 100.0


def min_max_normalize(values: np.ndarray) -> tuple[np.ndarray, bool]:
    """``(values - min) / (max - min)``, and whether the series was constant (then all zeros)."""
    values = np.asarray(values, dtype=np.float64)
    low, high = np.nanmin(values), np.nanmax(values)
    if not high > low:
        return np.zeros_like(values), True
    return (values - low) / (high - low), False


def bootstrap_accuracy_band(correct: np.ndarray, samples: int = 1000, seed: int = 0,
                            level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap band of accuracy (percent) per k, resampling questions.

    ``correct`` is [n_k, n_q]. Each bootstrap sample draws n_q questions with replacement and
    uses the same draw for every k, so the band reflects which questions were asked. Returns
    ``(low, high)``, each [n_k].
    """
    correct = np.asarray(correct, dtype=np.float64)
    n_k, n_q = correct.shape
    if n_q == 0:
        nan = np.full(n_k, np.nan)
        return nan, nan
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_q, size=(samples, n_q))
    # How often each question was drawn in each sample: accuracy is then one matrix product.
    offsets = draws + (np.arange(samples) * n_q)[:, None]
    weights = np.bincount(offsets.ravel(), minlength=samples * n_q).reshape(samples, n_q)
    accuracies = correct @ weights.T.astype(np.float64) / n_q * 100.0
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(accuracies, [tail, 100.0 - tail], axis=1)
    return low, high


def heatmap_matrix(ranks: dict[str, Any], measure: str, normalised: bool,
                   capture: str | None = None) -> tuple[list[int], list[int], np.ndarray]:
    """The depth x k matrix a rank heatmap draws, from a ranks.json document.

    Returns ``(layers, token_counts, matrix)``: rows are the analysed layers ascending, columns
    the k of the grid in its order (as swept, descending), values the mean of ``measure`` over
    image questions (null becomes NaN). ``normalised`` min-max normalises each row over k; a
    constant row becomes zeros, NaN stays NaN. ``capture`` defaults to the primary capture.
    """
    by_layer = ranks["measures"][capture or ranks["primary_capture"]]
    layers = sorted(int(layer) for layer in ranks["layers"])
    matrix = np.array([float_series(by_layer[str(layer)][measure]["mean"]) for layer in layers],
                      dtype=np.float64).reshape(len(layers), len(ranks["token_counts"]))
    if normalised:
        matrix = np.array([_normalize_row(row) for row in matrix]).reshape(matrix.shape)
    return layers, list(ranks["token_counts"]), matrix


def _normalize_row(row: np.ndarray) -> np.ndarray:
    present = ~np.isnan(row)
    if not present.any():
        return row.copy()
    values, _ = min_max_normalize(row[present])
    out = np.full_like(row, np.nan)
    out[present] = values
    return out


def curve_layers(layers: list[int], limit: int = MAX_LAYER_CURVES) -> list[int]:
    """At most ``limit`` of ``layers`` (ascending) to draw as curves: all of them when they fit,
    else evenly spaced ones, the first and the last included."""
    layers = sorted(layers)
    if len(layers) <= limit:
        return layers
    picks = np.unique(np.round(np.linspace(0, len(layers) - 1, limit)).astype(int))
    return [layers[i] for i in picks]


# ---------------------------------------------------------------------------------------------
# The stage


@dataclass
class PlotConfig:
    """What `vtkit plot` needs: the run's output dir, other runs to compare, the bootstrap."""

    output_dir: Path
    compare: list[Path] = field(default_factory=list)
    bootstrap_samples: int = 1000
    seed: int = 0


@dataclass
class PlotResult:
    """The files `vtkit plot` wrote and the raw results document."""

    files: list[Path]
    raw_results: dict[str, Any]
    constant_series: list[str]
    #: The figure files among ``files``.
    figures: list[Path] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"files": [str(p) for p in self.files], "figures": [str(p) for p in self.figures],
                "constant_series": self.constant_series, **self.raw_results}


def load_ranks(output_dir: Path, sweep_fingerprint: str) -> dict[str, Any]:
    """A run's ranks.json, refused when it was computed from another sweep.h5."""
    path = output_dir / RANKS_FILE
    if not path.is_file():
        raise DataError(f"{path} not found: run `vtkit rank` first")
    try:
        ranks = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"{path} is not valid JSON ({error}): re-run `vtkit rank`") from None
    if ranks.get("meta", {}).get("sweep_fingerprint") != sweep_fingerprint:
        raise CacheMismatchError(f"{path} was computed from another sweep.h5 (fingerprint "
                                 f"{ranks.get('meta', {}).get('sweep_fingerprint')!r}, sweep.h5 "
                                 f"has {sweep_fingerprint!r}): re-run `vtkit rank`")
    return ranks


def read_correct(output_dir: Path) -> tuple[dict[str, Any], list[int], np.ndarray, np.ndarray]:
    """Meta, token counts, correct [n_k, n_q] and has_image [n_q] from a finished sweep.h5."""
    with open_sweep(output_dir) as handle:
        meta = sweep_meta(handle)
        token_counts = [int(k) for k in handle["token_counts"][()]]
        correct = np.asarray(handle["correct"][()], dtype=bool)
        has_image = np.asarray(handle["has_image"][()], dtype=bool)
    if correct.shape != (len(token_counts), has_image.shape[0]):
        raise DataError(f"{output_dir / SWEEP_FILE}: 'correct' has shape {correct.shape}, "
                        f"expected ({len(token_counts)}, {has_image.shape[0]})")
    return meta, token_counts, correct, has_image


def _rounded(values: np.ndarray) -> list[float | None]:
    """JSON-ready floats: NaN (an accuracy over no questions) becomes null."""
    return [None if np.isnan(v) else float(v) for v in np.asarray(values, dtype=np.float64)]


@cache.holds_output_lock(create=False)
def make_plots(config: PlotConfig, reporter: Reporter | None = None) -> PlotResult:
    """Write the results JSON files and figures of one run (see the module docstring).

    Raises DataError when sweep.h5 or ranks.json is missing or malformed, CacheMismatchError
    when ranks.json was computed from another sweep.h5.
    """
    reporter = reporter or Reporter()
    output_dir = Path(config.output_dir)
    meta, token_counts, correct, has_image = read_correct(output_dir)
    ranks = load_ranks(output_dir, meta["sweep_fingerprint"])
    if ranks.get("token_counts") != token_counts:
        raise CacheMismatchError(f"{output_dir / RANKS_FILE} has other token counts than "
                                 f"{output_dir / SWEEP_FILE}: re-run `vtkit rank`")
    # Other runs are read first, so a bad --compare dir fails before anything is written.
    others = [(Path(d), _load_run(Path(d))) for d in config.compare
              if Path(d).resolve() != output_dir.resolve()]
    if others:
        runs = [(output_dir, run_settings(output_dir)), *((d, r["settings"]) for d, r in others)]
        for message in compare_differences(runs):
            reporter.warn(message)

    raw = _raw_results(meta, ranks, token_counts, correct, has_image, config)
    normalized, constant = _normalized_results(raw, reporter)

    depth = _depth_measures(ranks, output_dir / RANKS_FILE)

    files = [_write_json(output_dir / RAW_RESULTS_FILE, raw),
             _write_json(output_dir / NORMALIZED_RESULTS_FILE, normalized)]
    title = _title(meta["model_id"], meta["scorer"], meta["random_init"])
    figures = save_figure(_results_figure(normalized, title), output_dir / RESULTS_FIGURE)
    figures += save_figure(_raw_figure(raw, title), output_dir / RAW_FIGURE)
    if config.compare:
        figures += save_figure(_compare_figure([(output_dir, raw), *others]),
                         output_dir / COMPARE_FIGURE)
    if depth is not None:
        figures += _depth_figures(ranks, depth, title, output_dir)
    for path in _stale_depth_figures(output_dir, figures):
        path.unlink()
        reporter.info(f"removed {path} (not drawn from this ranks.json)")
    files += figures
    for path in files:
        reporter.info(f"wrote {path}")
    return PlotResult(files=files, raw_results=raw, constant_series=constant, figures=figures)


def _depth_measures(ranks: dict[str, Any], path: Path) -> list[str] | None:
    """The measures to draw across depth, or None when ranks.json has no ``measures`` or two
    layers at most (the seed's figures show those). Raises DataError naming what is missing."""
    if "measures" not in ranks:
        return None
    try:
        layers = [int(layer) for layer in ranks["layers"]]
        by_layer = ranks["measures"][ranks["primary_capture"]]
        if len(layers) <= 2:
            return None
        measures = list(by_layer[str(layers[0])])
        n_k = len(ranks["token_counts"])
        for layer in layers:
            for measure in measures:
                for key in ("mean", "ci95_low", "ci95_high"):
                    if len(by_layer[str(layer)][measure][key]) != n_k:
                        raise DataError(f"{path}: measures/{ranks['primary_capture']}/{layer}/"
                                        f"{measure}/{key} does not have one value per k "
                                        f"({n_k}): re-run `vtkit rank`")
        headline = _headline(ranks)
    except (KeyError, TypeError, ValueError) as error:
        raise DataError(f"{path} lacks {error} (or it is malformed) among layers, "
                        f"primary_capture, thresholds and measures: re-run `vtkit rank`") from None
    if headline not in measures:
        raise DataError(f"{path}: measures has no {headline!r} (the headline threshold): "
                        f"re-run `vtkit rank`")
    return measures


def _headline(ranks: dict[str, Any]) -> str:
    """The measure key of the numerical rank at the headline (first) threshold."""
    threshold = (ranks.get("thresholds") or [ranks["meta"]["threshold"]])[0]
    return f"numerical_rank@{threshold:g}"


def _depth_figures(ranks: dict[str, Any], measures: list[str], title: str,
                   output_dir: Path) -> list[Path]:
    files: list[Path] = []
    for measure in measures:
        files += save_figure(_heatmap_figure(ranks, measure, title),
                       output_dir / heatmap_figure(measure))
    files += save_figure(_layer_curves_figure(ranks, title), output_dir / LAYER_CURVES_FIGURE)
    return files


def _stale_depth_figures(output_dir: Path, written: list[Path]) -> list[Path]:
    """Depth figures in ``output_dir`` that this plot did not write (another grid of layers or
    measures drew them)."""
    found = {p for pattern in DEPTH_FIGURE_PATTERNS for p in output_dir.glob(pattern)}
    return sorted(found - set(written))


def _raw_results(meta: dict[str, Any], ranks: dict[str, Any], token_counts: list[int],
                 correct: np.ndarray, has_image: np.ndarray, config: PlotConfig) -> dict[str, Any]:
    """The raw_results.json document: accuracies, mean ranks and the bootstrap band per k."""
    raw: dict[str, Any] = {
        "meta": {
            "model": meta["model_id"],
            "scorer": meta["scorer"],
            "threshold": ranks["meta"]["threshold"],
            "n_questions": int(has_image.shape[0]),
            "n_image_questions": int(has_image.sum()),
            "vtkit_version": __version__,
            "random_init": meta["random_init"],
            "sweep_fingerprint": meta["sweep_fingerprint"],
            "layers": meta["layers"],
            "bootstrap_samples": config.bootstrap_samples,
            "bootstrap_seed": config.seed,
            **({"pruning": meta["pruning"]} if "pruning" in meta else {}),
        },
        "token_counts": token_counts,
        "accuracies": _rounded(accuracy_percent(correct)),
        "img_accuracies": _rounded(accuracy_percent(correct, has_image)),
    }
    for layer in LAYERS:
        raw[f"{layer}_ranks"] = ranks[layer]["numerical_rank_mean"]
        raw[f"{layer}_effective_ranks"] = ranks[layer]["effective_rank_mean"]
    for layer in LAYERS:
        raw[f"{layer}_ranks_std"] = ranks[layer]["numerical_rank_std"]
    low, high = bootstrap_accuracy_band(correct, config.bootstrap_samples, config.seed)
    raw["accuracies_ci95_low"], raw["accuracies_ci95_high"] = _rounded(low), _rounded(high)
    return raw


def _normalized_results(raw: dict[str, Any],
                        reporter: Reporter) -> tuple[dict[str, Any], list[str]]:
    """The normalized_results.json document, and the series that were constant over k."""
    normalized = dict(raw)
    constant = []
    # k = 0 (no visual token) is left out of every min and max, so adding the floor to a grid
    # does not move the other points; its accuracy goes on the same scale (it may fall below 0).
    swept = np.asarray(raw["token_counts"]) > 0
    swept |= not swept.any()    # a grid of k = 0 alone: nothing else to scale by
    for key, normalized_key in NORMALIZED_SERIES.items():
        series = float_series(raw[key])
        values, is_constant = min_max_normalize(series[swept])
        if not swept.all():
            low, high = np.nanmin(series[swept]), np.nanmax(series[swept])
            values = (series - low) / (high - low) if not is_constant else np.where(
                swept, 0.0, series - low)
        normalized[normalized_key] = _rounded(values)
        if is_constant:
            constant.append(key)
            reporter.warn(f"{key} is constant over k; {normalized_key} is all zeros")
    return normalized, constant


def _write_json(path: Path, document: dict[str, Any]) -> Path:
    cache.write_json_atomic(path, document, indent=2)
    return path


def _load_run(run_dir: Path) -> dict[str, Any]:
    """Token counts, accuracies and meta of another run: its raw_results.json, else sweep.h5."""
    run_dir = Path(run_dir)
    raw_path = run_dir / RAW_RESULTS_FILE
    if raw_path.is_file():
        try:
            raw = json.loads(raw_path.read_text())
            run = {"token_counts": raw["token_counts"], "accuracies": raw["accuracies"],
                   "meta": {"scorer": raw["meta"]["scorer"], "model": raw["meta"]["model"]}}
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise DataError(f"{raw_path} is not a vtkit raw_results.json ({error!r})") from None
        return {**run, "settings": run_settings(run_dir, run["meta"]["model"])}
    if not (run_dir / SWEEP_FILE).is_file():
        raise DataError(f"--compare {run_dir}: neither {RAW_RESULTS_FILE} nor {SWEEP_FILE} found")
    meta, token_counts, correct, _ = read_correct(run_dir)
    return {"token_counts": token_counts, "accuracies": _rounded(accuracy_percent(correct)),
            "meta": {"scorer": meta["scorer"], "model": meta["model_id"]},
            "settings": run_settings(run_dir)}


def run_settings(run_dir: Path, model: str | None = None) -> dict[str, str]:
    """The :data:`COMPARED` settings of a run, as text, from its sweep.h5 (the run's config
    and question ids). A run known only by its raw_results.json gives just its ``model``."""
    try:
        with open_sweep(run_dir) as handle:
            config = json.loads(handle.attrs.get("config", "{}"))
            ids = [s.decode() if isinstance(s, bytes) else str(s)
                   for s in handle["question_ids"][()]]
            model = str(handle.attrs.get("model_id", ""))
    except (DataError, json.JSONDecodeError):
        return {} if model is None else {"model": model}
    digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:12]
    # No --question-file means llava_<split>_CQM-A.json or the same text built from problems.json.
    question_file = config.get("question_file") or f"llava_{config.get('split')}_CQM-A.json"
    single = "on" if config.get("single_pred_prompt", True) else "off"
    return {
        "questions": f"{len(ids)} questions, ids sha256 {digest}",
        "template": f"conv mode {config.get('conv_mode')}, single-pred prompt {single}, "
                    f"question file {Path(question_file).name}",
        "temperature": f"temperature {config.get('temperature')}",
        "model": model,
    }


def compare_differences(runs: list[tuple[Path, dict[str, str]]]) -> list[str]:
    """One warning per :data:`COMPARED` setting in which the runs differ, naming each value and
    the runs that have it (a setting a run does not record is left out for that run)."""
    messages = []
    for name in COMPARED:
        groups: dict[str, list[str]] = {}
        for run_dir, settings in runs:
            if name in settings:
                groups.setdefault(settings[name], []).append(str(run_dir))
        if len(groups) > 1:
            messages.append(f"the compared runs differ in {name}: " + "; ".join(
                f"{', '.join(dirs)}: {value}" for value, dirs in groups.items()))
    return messages


# ---------------------------------------------------------------------------------------------
# Figures (object-oriented matplotlib on the Agg canvas: no GUI backend, no global state)


def _title(model: str, scorer: str, random_init: bool) -> str:
    title = f"Visual-token pruning: {model}, scorer {scorer}"
    return title + " (random weights)" if random_init else title


def _new_axes(title: str):
    figure = Figure(figsize=FIGSIZE, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.set_title(title)
    axes.set_xlabel("Number of visual tokens kept (k)")
    axes.grid(True, alpha=0.3)
    return figure, axes


def _k_axis(axes, token_counts: list[int]) -> None:
    # Pruning reads left to right: all 576 tokens on the left, the fewest on the right.
    axes.set_xlim(max(token_counts), min(token_counts))


def _results_figure(normalized: dict[str, Any], title: str) -> Figure:
    figure, axes = _new_axes(title)
    k = normalized["token_counts"]
    series = [("normalized_accuracies", "Accuracy", "tab:blue")]
    series += [(NORMALIZED_SERIES[f"{layer}_ranks"], label, color)
               for layer, (label, color) in LAYER_STYLES.items()]
    for key, label, color in series:
        axes.plot(k, float_series(normalized[key]), color=color, label=label, marker="o",
                  markersize=3, linewidth=1.5, clip_on=False)
    _k_axis(axes, k)
    # Accuracy at k = 0, on the scale of the swept k, may lie below 0.
    lowest = np.nanmin(float_series(normalized["normalized_accuracies"]))
    axes.set_ylim(min(0.0, float(lowest)), 1.0)
    axes.set_ylabel("Min-max normalised value")
    axes.legend(loc="best")
    return figure


def _raw_figure(raw: dict[str, Any], title: str) -> Figure:
    figure, axes = _new_axes(title)
    k = raw["token_counts"]
    axes.fill_between(k, float_series(raw["accuracies_ci95_low"]),
                      float_series(raw["accuracies_ci95_high"]), color="tab:blue", alpha=0.2,
                      linewidth=0, label="Accuracy 95% bootstrap")
    axes.plot(k, float_series(raw["accuracies"]), color="tab:blue", marker="o", markersize=3,
              label="Accuracy (all questions)")
    axes.plot(k, float_series(raw["img_accuracies"]), color="tab:blue", linestyle="--",
              label="IMG accuracy")
    axes.set_ylabel("Accuracy (%)", color="tab:blue")
    ranks = axes.twinx()
    for layer, (label, color) in LAYER_STYLES.items():
        mean, std = float_series(raw[f"{layer}_ranks"]), float_series(raw[f"{layer}_ranks_std"])
        ranks.fill_between(k, mean - std, mean + std, color=color, alpha=0.15, linewidth=0)
        ranks.plot(k, mean, color=color, marker="s", markersize=3, label=f"{label} (mean ± std)")
    ranks.set_ylabel(f"Numerical rank (threshold {raw['meta']['threshold']:g})")
    _k_axis(axes, k)
    handles, labels = axes.get_legend_handles_labels()
    more_handles, more_labels = ranks.get_legend_handles_labels()
    axes.legend(handles + more_handles, labels + more_labels, loc="best")
    return figure


def _measure_label(measure: str) -> str:
    name, _, threshold = measure.partition("@")
    label = name.replace("_", " ").capitalize()
    return f"{label} (threshold {float(threshold):g})" if threshold else label


def _tensor_words(ranks: dict[str, Any]) -> str:
    capture = ranks["primary_capture"]
    return CAPTURE_DESCRIPTIONS.get(capture, capture)


def _sparse_ticks(axes_set_ticks, labels: list[int], most: int) -> None:
    """Ticks at every index when they fit, else at about ``most`` evenly spaced ones."""
    step = max(1, int(np.ceil(len(labels) / most)))
    positions = list(range(0, len(labels), step))
    axes_set_ticks(positions, [str(labels[i]) for i in positions])


def _heatmap_figure(ranks: dict[str, Any], measure: str, title: str) -> Figure:
    figure = Figure(figsize=HEATMAP_FIGSIZE, layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle(f"{_measure_label(measure)} of the {_tensor_words(ranks)}\n{title}")
    panels = figure.subplots(1, 2)
    for axes, normalised in zip(panels, (True, False), strict=True):
        layers, k, matrix = heatmap_matrix(ranks, measure, normalised)
        # Layer 0 at the bottom, as depth reads; a NaN (no value) cell is grey.
        image = axes.imshow(np.ma.masked_invalid(matrix), origin="lower", aspect="auto",
                            interpolation="nearest", cmap=HEATMAP_COLORS,
                            vmin=0.0 if normalised else None, vmax=1.0 if normalised else None)
        _sparse_ticks(axes.set_xticks, k, 12)
        _sparse_ticks(axes.set_yticks, layers, 32)
        axes.set_xlabel("Number of visual tokens kept (k)")
        axes.set_ylabel("Decoder layer index")
        axes.set_title("Each layer min-max normalised over k" if normalised
                       else "Raw values (mean over image questions)")
        bar = figure.colorbar(image, ax=axes)
        bar.set_label("Normalised value" if normalised else _measure_label(measure))
    return figure


def _layer_curves_figure(ranks: dict[str, Any], title: str) -> Figure:
    figure, axes = _new_axes(title)
    measure = _headline(ranks)
    by_layer = ranks["measures"][ranks["primary_capture"]]
    layers = sorted(int(layer) for layer in ranks["layers"])
    drawn = curve_layers(layers)
    k = ranks["token_counts"]
    colors = matplotlib.colormaps["viridis"](np.linspace(0.0, 0.9, len(drawn)))
    for layer, color in zip(drawn, colors, strict=True):
        stats = by_layer[str(layer)][measure]
        axes.fill_between(k, float_series(stats["ci95_low"]), float_series(stats["ci95_high"]),
                          color=color, alpha=0.15, linewidth=0)
        axes.plot(k, float_series(stats["mean"]), color=color, marker="o", markersize=3,
                  label=f"layer {layer}")
    _k_axis(axes, k)
    axes.set_ylabel(f"{_measure_label(measure)}, mean and 95% bootstrap interval")
    shown = (f"all {len(layers)} analysed layers" if len(drawn) == len(layers) else
             f"{len(drawn)} of {len(layers)} analysed layers, evenly spaced "
             f"(the heatmap shows all)")
    axes.legend(loc="best", title=shown, fontsize="small")
    axes.set_title(f"{_measure_label(measure)} of the {_tensor_words(ranks)}, by layer\n{title}")
    return figure


def _compare_figure(runs: list[tuple[Path, dict[str, Any]]]) -> Figure:
    figure, axes = _new_axes("Accuracy against visual tokens kept")
    all_k: list[int] = []
    for run_dir, run in runs:
        label = f"{Path(run_dir).resolve().name} ({run['meta']['scorer']})"
        axes.plot(run["token_counts"], float_series(run["accuracies"]), marker="o", markersize=3,
                  label=label)
        all_k += list(run["token_counts"])
    _k_axis(axes, all_k)
    axes.set_ylabel("Accuracy (%)")
    axes.legend(loc="best")
    return figure


def float_series(values: list[float | None]) -> np.ndarray:
    """A JSON series as float64, null (no value) as NaN."""
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def save_figure(figure: Figure, stem: Path) -> list[Path]:
    """Write ``stem.png`` (DPI) and ``stem.pdf``; the PDF carries no creation date, so the same
    inputs give the same bytes."""
    # Appended, not with_suffix: a heatmap stem may hold a dot (numerical_rank_2.5e-4).
    png, pdf = stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".pdf")
    with cache.atomic_path(png) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI)
    with cache.atomic_path(pdf) as tmp:
        figure.savefig(tmp, format="pdf", metadata={"CreationDate": None})
    return [png, pdf]
