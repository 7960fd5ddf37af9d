"""One whole run: check every setting, load the model once, then extract -> sweep -> rank -> plot.

:func:`run_pipeline` is the one entry point for a run that goes through several stages:
``vtkit run`` calls it with all four configs, ``vtkit bench`` and the demo training's final
measurement with extract and sweep only. The stages still talk through files in the output
dir; the pipeline only saves loading the model once and holds the output dir for the whole run.
Under torchrun every process extracts and sweeps its share, and the main process alone ranks
and plots, as the rank and plot stages read the merged files.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vtkit.cache import output_lock
from vtkit.extract import ExtractConfig, ExtractResult, extract
from vtkit.parallel import init_workers
from vtkit.progress import NullTimer, PhaseTimer, Reporter
from vtkit.sweep import SweepConfig, SweepResult, check_model_fit, seed_configs, sweep

if TYPE_CHECKING:
    from vtkit.plot import PlotConfig, PlotResult
    from vtkit.rank import RankConfig, RankResult


@dataclass
class PipelineResult:
    """What each stage returned (None: not run, or not on this process), and per stage the
    seconds it took and, on CUDA, its peak GPU memory in bytes."""

    extracted: ExtractResult
    swept: SweepResult
    ranked: RankResult | None = None
    plotted: PlotResult | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    peak_memory: dict[str, int] = field(default_factory=dict)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read after it measures that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_configs(extract_config: ExtractConfig, sweep_config: SweepConfig,
                  rank_config: RankConfig | None = None, plot_config: PlotConfig | None = None,
                  model=None) -> None:
    """Every flag, and the grid and --layers against the patch and layer counts of ``model`` or,
    before any model work, of the checkpoint (UsageError naming the flag); the stages of one run
    share one output dir."""
    extract_config.validate()
    sweep_config.validate()
    if rank_config is not None:
        rank_config.validate()
    check_model_fit(sweep_config, model)
    configs = [c for c in (extract_config, sweep_config, rank_config, plot_config)
               if c is not None]
    output_dirs = {Path(c.output_dir) for c in configs}
    if len(output_dirs) > 1:
        raise ValueError(f"the stages of one run write one output dir, not "
                         f"{', '.join(sorted(map(str, output_dirs)))}")


def run_pipeline(extract_config: ExtractConfig, sweep_config: SweepConfig,
                 rank_config: RankConfig | None = None, plot_config: PlotConfig | None = None,
                 *, reporter: Reporter | None = None, model=None,
                 timer: PhaseTimer | NullTimer | None = None) -> PipelineResult:
    """Run extract and sweep, then rank and plot where their configs are given.

    The configs are checked first; then the output dir is held (one writer, from before the
    model loads until the last file is written), and the model is loaded once from
    ``extract_config`` unless ``model`` is given. ``timer`` measures the sweep's phases
    (:class:`vtkit.progress.PhaseTimer`).
    """
    check_configs(extract_config, sweep_config, rank_config, plot_config, model)
    return _extract_then_each(extract_config, [(sweep_config, rank_config, plot_config)],
                              reporter or Reporter(), model, timer)[0]


def run_seeds(extract_config: ExtractConfig, sweep_config: SweepConfig, seeds: list[int],
              rank_config: RankConfig | None = None, plot_config: PlotConfig | None = None,
              *, reporter: Reporter | None = None, model=None) -> list[PipelineResult]:
    """:func:`run_pipeline` for the random scorer over several seeds: extract once into the
    output dir, then sweep, rank and plot each seed into its own ``seed{N}/`` there
    (:func:`vtkit.sweep.seed_configs`). One result per seed; the first carries the extract."""
    seeded = seed_configs(sweep_config, seeds)
    check_configs(extract_config, sweep_config, rank_config, plot_config, model)
    runs = [(config, *(replace(c, output_dir=config.output_dir) if c is not None else None
                       for c in (rank_config, plot_config))) for config in seeded]
    return _extract_then_each(extract_config, runs, reporter or Reporter(), model, None)


def _extract_then_each(extract_config: ExtractConfig, runs: list[tuple], reporter: Reporter,
                       model, timer) -> list[PipelineResult]:
    """Hold the output dir, load the model once, extract, then for each (sweep, rank, plot)
    config: sweep, and on the main process rank and plot where their configs are given."""
    results = []
    with output_lock(extract_config.output_dir):
        workers = init_workers(extract_config.device)
        if model is None:
            model = _load(extract_config, workers.device(extract_config.device))
        meter = _StageMeter(model.device)
        with meter.stage("extract"):
            extracted = extract(extract_config, reporter, model=model)
        for sweep_config, rank_config, plot_config in runs:
            with meter.stage("sweep"):
                swept = sweep(sweep_config, reporter, model=model, timer=timer)
            result = PipelineResult(extracted, swept, seconds=meter.seconds,
                                    peak_memory=meter.peak_memory)
            if workers.is_main:
                _rank_and_plot(rank_config, plot_config, reporter, meter, result)
            results.append(result)
            meter = _StageMeter(model.device)
    return results


def _load(config: ExtractConfig, device: str):
    """The model the configs name, on this process's device."""
    from vtkit.model import load_model

    return load_model(config.model_path, config.model_base, random_init=config.random_init,
                      dtype=config.dtype, device=device)


def _rank_and_plot(rank_config: RankConfig | None, plot_config: PlotConfig | None,
                   reporter: Reporter, meter: _StageMeter, result: PipelineResult) -> None:
    """The main process's stages, each where its config is given (they read the merged files)."""
    if rank_config is not None:
        from vtkit.rank import compute_ranks

        with meter.stage("rank"):
            result.ranked = compute_ranks(rank_config, reporter)
    if plot_config is not None:
        from vtkit.plot import make_plots

        with meter.stage("plot"):
            result.plotted = make_plots(plot_config, reporter)


class _StageMeter:
    """Seconds of each stage, the device synchronised at both ends, and on CUDA its peak
    allocated memory (bytes)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self.peak_memory: dict[str, int] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Measure the stage run inside the block, recorded under ``name``."""
        cuda = self.device.type == "cuda"
        synchronize(self.device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        started = time.perf_counter()
        yield
        synchronize(self.device)
        self.seconds[name] = time.perf_counter() - started
        if cuda:
            self.peak_memory[name] = torch.cuda.max_memory_allocated(self.device)
