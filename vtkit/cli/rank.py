"""`vtkit rank`."""

from __future__ import annotations

from typing import Annotated

import typer

from vtkit.cli.options import JsonOpt, OutputDirOpt
from vtkit.cli.output import print_json, rank_json
from vtkit.defaults import DEFAULT_OUTPUT_DIR, DEFAULT_THRESHOLD

#: rank's --threshold takes several values (vtkit run's takes one: cli/options.py ThresholdOpt).
ThresholdsOpt = Annotated[str, typer.Option(
    "--threshold", metavar="<t[,t...]>",
    help="Count singular values above this fraction of the largest (in (0, 1)); several, "
         "comma-separated, are all reported and the first is the headline one. The default "
         "sits above float16 rounding noise; bfloat16 runs warn below 2.4e-3 (docs/rank.md).")]


def rank(
    output_dir: OutputDirOpt = DEFAULT_OUTPUT_DIR,
    # A number as the default (click passes it on as text), so --help and RankConfig agree.
    threshold: ThresholdsOpt = DEFAULT_THRESHOLD,
    json_output: JsonOpt = False,
) -> None:
    """Rank measures of the visual tokens' rows at every analysed layer and tensor, from sweep.h5.

    Reads the singular values `vtkit sweep` stored for each captured tensor (--capture) and
    decoder layer (--layers), and per question and k computes the numerical rank at each
    THRESHOLD, the effective rank and the stable rank. Writes ranks.json: mean, std and a 95%
    bootstrap interval over image questions, the mean rank of questions answered right vs wrong,
    and the seed's first/last-layer curves. Where the sweep kept raw matrices
    (--keep-attention), their singular values are recomputed in float64 as a check. Runs in
    seconds, so thresholds can change without re-running the sweep.

    Example: vtkit rank --output-dir pruning_results --threshold 1e-3,1e-2,1e-4
    """
    from vtkit.cli.progress import RichReporter
    from vtkit.rank import RankConfig, compute_ranks, parse_thresholds

    thresholds = parse_thresholds(threshold)
    config = RankConfig(output_dir=output_dir, threshold=thresholds[0],
                        more_thresholds=thresholds[1:])
    config.validate()
    result = compute_ranks(config, RichReporter())
    if json_output:
        print_json(rank_json(result))
