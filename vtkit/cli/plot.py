"""`vtkit plot`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vtkit.cli.options import JsonOpt, OutputDirOpt
from vtkit.cli.output import print_json
from vtkit.defaults import DEFAULT_OUTPUT_DIR

CompareOpt = Annotated[list[Path] | None, typer.Option(
    "--compare", metavar="DIR",
    help="Another run's output dir (its raw_results.json or sweep.h5) whose accuracy curve to "
         "overlay; repeat for several runs.")]


def plot(
    output_dir: OutputDirOpt = DEFAULT_OUTPUT_DIR,
    compare: CompareOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Results JSON and figures: accuracy and rank against the number of visual tokens kept.

    Reads sweep.h5 and ranks.json (run `vtkit rank` first) and writes raw_results.json,
    normalized_results.json, pruning_experiment_results.png/.pdf (min-max normalised accuracy and
    first/last-layer rank against k) and pruning_experiment_raw.png/.pdf (accuracy with a 95%
    bootstrap band, mean ranks with their std). With --compare, also
    pruning_experiment_compare.png/.pdf overlaying the accuracy of other runs. When ranks.json
    has more than two layers (vtkit sweep --layers all), also rank_heatmap_<measure>.png/.pdf
    (depth x k, each layer normalised over k and raw) and rank_by_layer.png/.pdf (the rank
    curves of up to 8 layers).

    Example: vtkit plot --output-dir runs/l2 --compare runs/random --compare runs/cls
    """
    from vtkit.cli.progress import RichReporter
    from vtkit.plot import PlotConfig, make_plots

    result = make_plots(PlotConfig(output_dir=output_dir, compare=list(compare or [])),
                        RichReporter())
    if json_output:
        print_json(result.to_json())
