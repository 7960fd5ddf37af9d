"""`vtkit rank`."""

from __future__ import annotations

from vtkit.cli.options import JsonOpt, OutputDirOpt, ThresholdOpt
from vtkit.cli.output import print_json, rank_json
from vtkit.defaults import DEFAULT_OUTPUT_DIR, DEFAULT_THRESHOLD
from vtkit.errors import UsageError


def rank(
    output_dir: OutputDirOpt = DEFAULT_OUTPUT_DIR,
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
        print_json(rank_json(result))
