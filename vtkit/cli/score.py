"""`vtkit score`: score a LLaVA answers file exactly as eval_science_qa.py does."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vtkit.cli.options import BaseDirOpt, JsonOpt, SplitOpt
from vtkit.cli.output import print_json
from vtkit.defaults import DEFAULT_BASE_DIR, DEFAULT_SPLIT
from vtkit.errors import UsageError

AnswersArg = Annotated[Path | None, typer.Argument(
    metavar="ANSWERS", show_default=False,
    help="LLaVA answers file: JSON lines with question_id, prompt, text.")]
ResultFileOpt = Annotated[Path | None, typer.Option(
    "--result-file", help="The answers file, as eval_science_qa.py's flag names it (instead of "
                          "ANSWERS).")]
OutputFileOpt = Annotated[Path | None, typer.Option(
    "--output-file", help="Write eval_science_qa.py's per-question file (correct/incorrect).")]
OutputResultOpt = Annotated[Path | None, typer.Option(
    "--output-result", help="Write eval_science_qa.py's result file (acc, results, outputs).")]


def score(
    answers: AnswersArg = None,
    result_file: ResultFileOpt = None,
    base_dir: BaseDirOpt = DEFAULT_BASE_DIR,
    split: SplitOpt = DEFAULT_SPLIT,
    json_output: JsonOpt = False,
    output_file: OutputFileOpt = None,
    output_result: OutputResultOpt = None,
) -> None:
    """Score a LLaVA ScienceQA answers file with the original parsing and counting.

    Prints the official line (Total, Correct, Accuracy, IMG-Accuracy) on stdout, then a table of
    ScienceQA's categories on stderr; --json prints one JSON document on stdout instead.
    A question without an answer counts as wrong; answers to questions outside the split are
    not scored, and a warning names them.

    Example: vtkit score answers/llava-v1.5-7b.jsonl --base-dir scienceqa --split test
    """
    if (answers is None) == (result_file is None):
        raise UsageError("give the answers file once: as ANSWERS or as --result-file")
    from vtkit.cli.progress import RichReporter
    from vtkit.scoring import score_answers

    reporter = RichReporter()
    report = score_answers(answers or result_file, base_dir, split, output_file, output_result,
                           reporter)
    if json_output:
        print_json(report.to_json())
        return
    typer.echo(report.official_line())
    reporter.table(
        f"ScienceQA {split}", ["category", "questions", "accuracy %"],
        [[name, report.category_counts[name], acc] for name, acc in report.categories.items()])
