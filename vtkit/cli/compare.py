"""`vtkit compare`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vtkit.cli.options import JsonOpt
from vtkit.cli.output import print_json
from vtkit.defaults import DEFAULT_COMPARE_DIR

RunDirsArg = Annotated[list[Path], typer.Argument(
    metavar="RUN_DIR...",
    help="Output dirs of finished runs (sweep.h5, and ranks.json for the rank curves), or of "
         "`--seeds` runs (their seed{N}/ runs are averaged).")]
CompareDirOpt = Annotated[Path, typer.Option(
    "--output-dir", help="Where comparison.png/.pdf, comparison.md and comparison.json go.")]


def compare(
    run_dirs: RunDirsArg,
    output_dir: CompareDirOpt = DEFAULT_COMPARE_DIR,
    json_output: JsonOpt = False,
) -> None:
    """Several runs side by side: one figure and the table pruning papers print.

    comparison.png/.pdf draws accuracy and the first/last-layer numerical rank against k for
    every run (the seeds of a --seeds run as their mean with a min-max band). comparison.md and
    comparison.json hold, per method at k = 576, 192, 128, 64 (and 0 where swept), accuracy
    over all and IMG questions with 95% bootstrap intervals, the layer-averaged visual tokens
    ("equivalent tokens") and the prefill FLOPs per image question. Runs that differ in
    questions, template, decoding or model are warned about.

    Example: vtkit compare runs/l2 runs/random runs/fastv --output-dir runs/comparison
    """
    from vtkit.cli.progress import RichReporter
    from vtkit.compare import CompareConfig, compare_runs

    result = compare_runs(CompareConfig(run_dirs=list(run_dirs), output_dir=output_dir),
                          RichReporter())
    if json_output:
        print_json(result.document)
