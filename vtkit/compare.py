"""`vtkit compare`: several runs side by side, as pruning papers print them.

Each RUN_DIR is a run's output dir (its ``sweep.h5``, and ``ranks.json`` once ranked), or the
output dir of ``--seeds`` (its ``seed{N}/`` runs are one method: the random scorer, averaged
over seeds). Writes to the output dir:

- ``comparison.png``/``.pdf``: accuracy against k (left) and the headline numerical rank of the
  first and last analysed layer against k (right), one colour per method; a method over seeds
  is drawn as its mean with a band from the lowest to the highest seed;
- ``comparison.md`` and ``comparison.json``: the table: per k of :data:`TABLE_TOKENS` (and
  k = 0 where a run has it) and method, accuracy over all questions and over IMG questions with
  95% bootstrap intervals over questions (the band ``vtkit plot`` draws, same resamples), the
  layer-averaged visual token count ("equivalent tokens", :func:`vtkit.flops.equivalent_tokens`)
  and the prefill FLOPs per image question (:func:`vtkit.flops.prefill_flops`, docs/performance.md).

Runs that differ in their questions, template, decoding or model are warned about
(:func:`vtkit.plot.compare_differences`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from vtkit import __version__, cache, defaults
from vtkit.cache import (
    COMPARISON_FIGURE,
    COMPARISON_JSON,
    COMPARISON_TABLE,
    LAYERS,
    RANKS_FILE,
    SEED_DIR_PREFIX,
    SWEEP_FILE,
)
from vtkit.errors import CacheMismatchError, DataError, UsageError
from vtkit.flops import LMShape, equivalent_tokens, prefill_flops
from vtkit.plot import (
    accuracy_percent,
    bootstrap_accuracy_band,
    compare_differences,
    float_series,
    load_ranks,
    read_correct,
    run_settings,
    save_figure,
)
from vtkit.progress import Reporter
from vtkit.rank import open_sweep

#: The budgets the table reports (LLaVA-1.5 pruning papers print 576, 192, 128 and 64).
TABLE_TOKENS = (576, 192, 128, 64)
#: The accuracy series of the table: (key, the questions it counts).
ACCURACY_SERIES = (("accuracy", "all"), ("img_accuracy", "IMG"))


@dataclass
class CompareConfig:
    """What `vtkit compare` needs: the runs, where to write, and the accuracy bootstrap (the
    resamples and seed of `vtkit plot`, so a single run's intervals are its raw_results.json's)."""

    run_dirs: list[Path]
    output_dir: Path = defaults.DEFAULT_COMPARE_DIR
    bootstrap_samples: int = 1000
    seed: int = 0

    def validate(self) -> None:
        if not self.run_dirs:
            raise UsageError("vtkit compare: give at least one RUN_DIR")


@dataclass
class Run:
    """One finished sweep, as compare reads it."""

    path: Path
    config: dict[str, Any]
    meta: dict[str, Any]
    token_counts: list[int]
    correct: np.ndarray               # [n_k, n_q] bool
    has_image: np.ndarray             # [n_q] bool
    question_ids: list[str]
    text_tokens: np.ndarray | None    # [n_q] prompt tokens without visual rows; None: not stored
    lm_shape: LMShape | None
    num_patches: int | None
    ranks: dict[str, Any] | None      # ranks.json; None when not ranked


@dataclass
class Method:
    """One curve and one block of the table: a run, or the seeds of one ``--seeds`` run."""

    label: str
    path: Path
    runs: list[Run]

    @property
    def first(self) -> Run:
        return self.runs[0]

    @property
    def seeds(self) -> list[int] | None:
        if len(self.runs) == 1 and self.path == self.first.path:
            return None
        return [int(r.config.get("seed", 0)) for r in self.runs]

    @property
    def prune_layer(self) -> int | None:
        """The decoder layer an in-LLM method prunes at; None for the pre-LLM scorers."""
        if self.first.config.get("scorer") not in getattr(defaults, "IN_LLM_SCORERS", ()):
            return None
        layer = self.first.config.get("prune_layer")
        return int(layer) if layer is not None else None


@dataclass
class CompareResult:
    files: list[Path]
    document: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Pure functions


def seed_summary(values: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Mean, lowest and highest of per-seed series ([n_k] each; NaN where a seed has none)."""
    stacked = np.asarray(values, dtype=np.float64)
    return {"mean": stacked.mean(axis=0), "min": stacked.min(axis=0),
            "max": stacked.max(axis=0)}


def question_flops(shape: LMShape, text_tokens: np.ndarray, k: int, prune_layer: int | None,
                   num_patches: int) -> float:
    """Mean prefill FLOPs over questions of ``text_tokens`` prompt tokens each, with k visual
    tokens (from ``prune_layer`` on, ``num_patches`` before it, for an in-LLM method)."""
    before = num_patches if prune_layer is not None else None
    return float(np.mean([prefill_flops(shape, int(t), k, prune_layer=prune_layer,
                                        visual_before=before) for t in text_tokens]))


def method_label(config: dict[str, Any], seeds: list[int] | None, in_llm: bool) -> str:
    """A method's name from its sweep config: the scorer, with the prune layer of an in-LLM
    method and the seeds of the random scorer."""
    label = str(config.get("scorer"))
    if in_llm and config.get("prune_layer") is not None:
        label += f" (K={config['prune_layer']})"
    if seeds is not None:
        label += f" (seeds {','.join(map(str, seeds))})"
    elif label == "random":
        label += f" (seed {config.get('seed', 0)})"
    return label


# ---------------------------------------------------------------------------------------------
# Reading runs


def find_runs(run_dir: Path) -> list[Path]:
    """The sweep dirs of a RUN_DIR: itself, or its ``seed{N}/`` dirs in seed order."""
    run_dir = Path(run_dir)
    if (run_dir / SWEEP_FILE).is_file():
        return [run_dir]
    pattern = re.compile(rf"{SEED_DIR_PREFIX}(\d+)")
    seeds = sorted((int(m.group(1)), p) for p in run_dir.glob(f"{SEED_DIR_PREFIX}*")
                   if (m := pattern.fullmatch(p.name)) and (p / SWEEP_FILE).is_file())
    if not seeds:
        raise DataError(f"{run_dir} is not a vtkit run: no {SWEEP_FILE} in it, nor in "
                        f"{SEED_DIR_PREFIX}N/ sub-directories (of `vtkit sweep --seeds`)")
    return [p for _, p in seeds]


def read_run(path: Path, reporter: Reporter) -> Run:
    """A finished sweep's answers, config and shape, and its ranks.json if it has one."""
    meta, token_counts, correct, has_image = read_correct(path)
    with open_sweep(path) as handle:
        config = json.loads(handle.attrs.get("config", "{}"))
        ids = handle["question_ids"].asstr()[()].tolist()
        text_tokens = handle["text_tokens"][()] if "text_tokens" in handle else None
        shape = handle.attrs.get("lm_shape")
        num_patches = handle.attrs.get("num_patches")
    ranks = None
    if (path / RANKS_FILE).is_file():
        try:
            ranks = load_ranks(path, meta["sweep_fingerprint"])
        except CacheMismatchError as error:
            reporter.warn(f"{error}; its rank curves are left out")
    else:
        reporter.warn(f"{path / RANKS_FILE} not found (run `vtkit rank --output-dir {path}`): "
                      f"its rank curves are left out")
    return Run(path, config, meta, token_counts, correct, has_image, ids, text_tokens,
               LMShape(**json.loads(shape)) if shape else None,
               int(num_patches) if num_patches is not None else None, ranks)


def read_method(run_dir: Path, reporter: Reporter) -> Method:
    """One RUN_DIR as a method; the seeds of a ``--seeds`` dir must share questions and grid."""
    runs = [read_run(p, reporter) for p in find_runs(run_dir)]
    for run in runs[1:]:
        if run.token_counts != runs[0].token_counts or run.question_ids != runs[0].question_ids:
            raise DataError(f"{run.path}: another k grid or other questions than "
                            f"{runs[0].path}: the seeds of {run_dir} cannot be averaged")
    method = Method("", Path(run_dir), runs)
    method.label = method_label(runs[0].config, method.seeds, method.prune_layer is not None)
    return method


# ---------------------------------------------------------------------------------------------
# Series and table


def method_series(method: Method, config: CompareConfig) -> dict[str, Any]:
    """Per k: accuracy (all, IMG) with their 95% intervals, over seeds their mean, lowest and
    highest, and the mean headline ranks of the first and last layer."""
    runs = method.runs
    # The seed-averaged correctness of each question: its bootstrap over questions gives the
    # interval of the mean accuracy (for one run, exactly `vtkit plot`'s band).
    mean_correct = np.mean([r.correct.astype(np.float64) for r in runs], axis=0)
    has_image = method.first.has_image
    series: dict[str, Any] = {"token_counts": method.first.token_counts}
    for key, columns in (("accuracy", None), ("img_accuracy", has_image)):
        per_seed = [accuracy_percent(r.correct, columns) for r in runs]
        summary = seed_summary(per_seed)
        matrix = mean_correct if columns is None else mean_correct[:, columns]
        low, high = bootstrap_accuracy_band(matrix, config.bootstrap_samples, config.seed)
        series[key] = summary["mean"]
        series[f"{key}_ci95_low"], series[f"{key}_ci95_high"] = low, high
        if method.seeds is not None:
            series[f"{key}_per_seed"] = per_seed
            series[f"{key}_seed_min"], series[f"{key}_seed_max"] = summary["min"], summary["max"]
    if all(r.ranks is not None for r in runs):
        for layer in LAYERS:
            summary = seed_summary([float_series(r.ranks[layer]["numerical_rank_mean"])
                                    for r in runs])
            series[f"{layer}_ranks"] = summary["mean"]
            series[f"{layer}_ranks_seed_min"] = summary["min"]
            series[f"{layer}_ranks_seed_max"] = summary["max"]
    return series


def table_rows(method: Method, series: dict[str, Any]) -> tuple[list[dict], list[int]]:
    """The method's rows of the table, and the :data:`TABLE_TOKENS` its grid lacks."""
    grid = series["token_counts"]
    wanted = [*TABLE_TOKENS, *([0] if 0 in grid else [])]
    run = method.first
    image_tokens = (run.text_tokens[run.has_image] if run.text_tokens is not None
                    else None)
    rows = []
    for k in (k for k in wanted if k in grid):
        i = grid.index(k)
        row: dict[str, Any] = {"method": method.label, "k": k}
        for key, _ in ACCURACY_SERIES:
            for suffix in ("", "_ci95_low", "_ci95_high"):
                row[key + suffix] = _number(series[key + suffix][i])
        row["equivalent_tokens"] = row["flops_per_question"] = None
        if run.lm_shape is not None and run.num_patches is not None:
            # k = 0 is the floor for every method: no visual token in any layer.
            prune_layer = method.prune_layer if k > 0 else None
            row["equivalent_tokens"] = equivalent_tokens(k, run.lm_shape.layers, prune_layer,
                                                         run.num_patches)
            if image_tokens is not None and image_tokens.size:
                row["flops_per_question"] = question_flops(run.lm_shape, image_tokens, k,
                                                           prune_layer, run.num_patches)
        rows.append(row)
    return rows, [k for k in TABLE_TOKENS if k not in grid]


def _number(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def _json_series(series: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in series.items():
        if key.endswith("_per_seed"):
            out[key] = [[_number(v) for v in seed] for seed in value]
        elif isinstance(value, np.ndarray):
            out[key] = [_number(v) for v in value]
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------------------------------------
# The stage


@cache.holds_output_lock
def compare_runs(config: CompareConfig, reporter: Reporter | None = None) -> CompareResult:
    """Read every RUN_DIR, write the comparison figure and table (see the module docstring).

    Raises DataError naming a RUN_DIR that is not a finished vtkit run."""
    reporter = reporter or Reporter()
    output_dir = Path(config.output_dir)
    methods = [read_method(Path(d), reporter) for d in config.run_dirs]
    _unique_labels(methods)
    warnings = compare_differences([(r.path, run_settings(r.path))
                                    for m in methods for r in m.runs])
    blocks, rows, missing = [], [], {}
    for method in methods:
        series = method_series(method, config)
        method_rows, lacks = table_rows(method, series)
        rows += method_rows
        if lacks:
            missing[method.label] = lacks
        blocks.append((method, series))
    rows.sort(key=lambda row: (-row["k"] if row["k"] else 1, [m.label for m in methods]
                               .index(row["method"])))
    if any(r["flops_per_question"] is None for r in rows):
        warnings.append("FLOPs per question are missing for runs whose sweep.h5 lacks "
                        "text_tokens or lm_shape (swept by an older vtkit): re-run `vtkit sweep "
                        "--force` there")
    document = _document(config, blocks, rows, missing, warnings)
    output_dir.mkdir(parents=True, exist_ok=True)
    cache.write_json_atomic(output_dir / COMPARISON_JSON, document, indent=2)
    cache.write_text_atomic(output_dir / COMPARISON_TABLE, markdown_table(document))
    files = [output_dir / COMPARISON_JSON, output_dir / COMPARISON_TABLE]
    files += save_figure(_comparison_figure(blocks), output_dir / COMPARISON_FIGURE)
    _report(document, reporter)
    for path in files:
        reporter.info(f"wrote {path}")
    return CompareResult(files, document, warnings)


def _unique_labels(methods: list[Method]) -> None:
    """Two runs of the same method get their directory names appended to their labels."""
    for label in {m.label for m in methods}:
        same = [m for m in methods if m.label == label]
        if len(same) > 1:
            for m in same:
                m.label = f"{label} [{m.path}]"


def _document(config: CompareConfig, blocks, rows, missing, warnings) -> dict[str, Any]:
    first = blocks[0][0].first
    return {
        "meta": {
            "vtkit_version": __version__,
            "table_token_counts": list(TABLE_TOKENS),
            "n_questions": int(first.has_image.shape[0]),
            "n_image_questions": int(first.has_image.sum()),
            "bootstrap_samples": config.bootstrap_samples,
            "bootstrap_seed": config.seed,
            "flops": "mean over image questions of vtkit.flops.prefill_flops (docs/performance.md)",
        },
        "methods": [{
            "label": m.label, "run_dir": str(m.path), "runs": [str(r.path) for r in m.runs],
            "scorer": m.first.config.get("scorer"), "prune_layer": m.prune_layer,
            "seeds": m.seeds, "model": m.first.meta["model_id"],
            "sweep_fingerprints": [r.meta["sweep_fingerprint"] for r in m.runs],
            "series": _json_series(series),
        } for m, series in blocks],
        "table": rows,
        "missing_token_counts": missing,
        "warnings": warnings,
    }


def _interval(row: dict[str, Any], key: str) -> str:
    if row[key] is None:
        return "n/a"
    return f"{row[key]:.2f} [{row[key + '_ci95_low']:.2f}, {row[key + '_ci95_high']:.2f}]"


def _table_cells(row: dict[str, Any]) -> list[str]:
    tokens = "n/a" if row["equivalent_tokens"] is None else f"{row['equivalent_tokens']:.1f}"
    flops = ("n/a" if row["flops_per_question"] is None
             else f"{row['flops_per_question'] / 1e12:.4g}")
    return [str(row["k"]), row["method"], _interval(row, "accuracy"),
            _interval(row, "img_accuracy"), tokens, flops]


TABLE_COLUMNS = ["k", "method", "accuracy % [95% CI]", "IMG accuracy % [95% CI]",
                 "equivalent tokens", "TFLOPs / question"]


def markdown_table(document: dict[str, Any]) -> str:
    """comparison.md: the table, what each run lacks, and the warnings."""
    meta = document["meta"]
    lines = [
        "# Pruning methods compared", "",
        f"Accuracy on {meta['n_questions']} questions ({meta['n_image_questions']} with an "
        f"image, IMG), 95% bootstrap intervals over questions ({meta['bootstrap_samples']} "
        "resamples); over seeds, the mean accuracy and the interval of the seed-averaged "
        "answers. Equivalent tokens: the visual tokens averaged over the decoder layers; "
        f"TFLOPs: {meta['flops']}.", "",
        "| " + " | ".join(TABLE_COLUMNS) + " |",
        "|" + "---|" * len(TABLE_COLUMNS),
        *("| " + " | ".join(_table_cells(row)) + " |" for row in document["table"]),
    ]
    if document["missing_token_counts"]:
        lines += ["", "Not in the runs' grids:"]
        lines += [f"- {label}: k = {', '.join(map(str, ks))}"
                  for label, ks in document["missing_token_counts"].items()]
    if document["warnings"]:
        lines += ["", "Warnings:"] + [f"- {w}" for w in document["warnings"]]
    lines += ["", "Runs:"] + [f"- {m['label']}: {', '.join(m['runs'])}"
                              for m in document["methods"]]
    return "\n".join(lines) + "\n"


def _report(document: dict[str, Any], reporter: Reporter) -> None:
    reporter.table("Pruning methods compared", TABLE_COLUMNS,
                   [_table_cells(row) for row in document["table"]])
    for label, ks in document["missing_token_counts"].items():
        reporter.info(f"{label}: no k = {', '.join(map(str, ks))} in its grid")
    for warning in document["warnings"]:
        reporter.warn(warning)


# ---------------------------------------------------------------------------------------------
# The figure


def _comparison_figure(blocks: list[tuple[Method, dict[str, Any]]]) -> Figure:
    figure = Figure(figsize=(15.0, 6.0), layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle("Pruning methods compared")
    accuracy_axes, rank_axes = figure.subplots(1, 2)
    colors = [f"C{i % 10}" for i in range(len(blocks))]
    all_k: list[int] = []
    for (method, series), color in zip(blocks, colors, strict=True):
        k = series["token_counts"]
        all_k += k
        _curve(accuracy_axes, k, series, "accuracy", color, method.label, "o", "-")
        for layer, style in zip(LAYERS, ("-", "--"), strict=True):
            if f"{layer}_ranks" in series:
                _curve(rank_axes, k, series, f"{layer}_ranks", color,
                       f"{method.label}, {layer.replace('_', ' ')}", "s", style)
    for axes, ylabel in ((accuracy_axes, "Accuracy (%), all questions"),
                         (rank_axes, "Numerical rank (headline threshold), mean over image "
                                     "questions")):
        axes.set_xlabel("Number of visual tokens kept (k)")
        axes.set_ylabel(ylabel)
        axes.grid(True, alpha=0.3)
        axes.set_xlim(max(all_k), min(all_k))
        if axes.get_legend_handles_labels()[0]:
            axes.legend(loc="best", fontsize="small")
    return figure


def _curve(axes, k: list[int], series: dict[str, Any], key: str, color: str, label: str,
           marker: str, style: str) -> None:
    """One method's series; over seeds, its mean with a band from the lowest to the highest."""
    if f"{key}_seed_min" in series:
        axes.fill_between(k, series[f"{key}_seed_min"], series[f"{key}_seed_max"],
                          color=color, alpha=0.2, linewidth=0)
    axes.plot(k, series[key], color=color, linestyle=style, marker=marker, markersize=3,
              label=label)
