"""`vtkit score`: score a LLaVA answers file exactly as eval_science_qa.py does."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vtkit.cli.options import BaseDirOpt, JsonOpt, SplitOpt
from vtkit.cli.output import print_json
from vtkit.cli.progress import RichReporter
from vtkit.scoring import score_answers

AnswersArg = Annotated[Path, typer.Argument(
    metavar="ANSWERS", help="LLaVA answers file: JSON lines with question_id, prompt, text.")]
OutputFileOpt = Annotated[Path | None, typer.Option(
    "--output-file", help="Write eval_science_qa.py's per-question file (correct/incorrect).")]
OutputResultOpt = Annotated[Path | None, typer.Option(
    "--output-result", help="Write eval_science_qa.py's result file (acc, results, outputs).")]


def score(
    answers: AnswersArg,
    base_dir: BaseDirOpt = Path("scienceqa"),
    split: SplitOpt = "test",
    json_output: JsonOpt = False,
    output_file: OutputFileOpt = None,
    output_result: OutputResultOpt = None,
) -> None:
    """Score a LLaVA ScienceQA answers file with the original parsing and counting.

    Prints the official line (Total, Correct, Accuracy, IMG-Accuracy) on stdout, then a table of
    ScienceQA's categories on stderr; --json prints one JSON document on stdout instead.
    A question without an answer counts as wrong.

    Example: vtkit score answers/llava-v1.5-7b.jsonl --base-dir scienceqa --split test
    """
    report = score_answers(answers, base_dir, split, output_file, output_result)
    if json_output:
        print_json(report.to_json())
        return
    typer.echo(report.official_line())
    RichReporter().table(
        f"ScienceQA {split}", ["category", "questions", "accuracy %"],
        [[name, report.category_counts[name], acc] for name, acc in report.categories.items()])
