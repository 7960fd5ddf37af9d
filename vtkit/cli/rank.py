"""`vtkit rank`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vtkit.cli.options import JsonOpt, OutputDirOpt
from vtkit.cli.output import print_json
from vtkit.defaults import DEFAULT_THRESHOLD
from vtkit.errors import UsageError

ThresholdOpt = Annotated[float, typer.Option(
    "--threshold",
    help="Count singular values above this fraction of the largest (in (0, 1)); 1e-3 sits above "
         "float16/bfloat16 rounding noise (docs/rank.md).")]


def rank(
    output_dir: OutputDirOpt = Path("pruning_results"),
    threshold: ThresholdOpt = DEFAULT_THRESHOLD,
    json_output: JsonOpt = False,
) -> None:
    """Numerical and effective rank of the visual tokens' attention outputs, from sweep.h5.

    Reads the singular values `vtkit sweep` stored for the first and the last decoder layer,
    counts those above THRESHOLD x the largest per question and k, and writes ranks.json (mean
    and std over image questions per k, effective ranks, per-question ranks). Where the sweep
    kept raw matrices (--keep-attention), their singular values are recomputed in float64 as a
    check. Runs in seconds, so the threshold can change without re-running the sweep.

    Example: vtkit rank --output-dir pruning_results --threshold 1e-3
    """
    if not 0.0 < threshold < 1.0:
        raise UsageError(f"--threshold must be in (0, 1), got {threshold:g}")
    from vtkit.cli.progress import RichReporter
    from vtkit.rank import RankConfig, compute_ranks

    result = compute_ranks(RankConfig(output_dir=output_dir, threshold=threshold), RichReporter())
    if json_output:
        print_json({"ranks_file": str(result.path), **result.to_json(per_question=False)})
