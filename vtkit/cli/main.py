"""The root of the CLI: it only wires the command modules together."""

from __future__ import annotations

import os

# Batches of very different shapes fragment CUDA memory; growable segments avoid that. Set
# before torch touches the GPU; a value the user set wins.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import typer  # noqa: E402

from vtkit import __version__
from vtkit.cli import (
    bench,
    convert,
    demo,
    extract,
    plot,
    prompts,
    rank,
    run,
    score,
    sweep,
)
from vtkit.cli.output import handles_errors

app = typer.Typer(
    name="vtkit",
    help="Measure what visual-token pruning does to LLaVA: ScienceQA accuracy and the rank of "
         "the visual tokens' attention outputs as the kept tokens fall from 576 to 20.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

#: Every command, in pipeline order; docs and tests read this list.
COMMANDS = {
    "extract": extract.extract,
    "sweep": sweep.sweep,
    "rank": rank.rank,
    "plot": plot.plot,
    "run": run.run,
    "score": score.score,
    "prompts": prompts.prompts,
    "demo": demo.demo,
    "convert": convert.convert,
    "bench": bench.bench,
}

for _name, _command in COMMANDS.items():
    app.command(_name)(handles_errors(_command))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"vtkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Show the version and exit."),
) -> None:
    """vtkit: visual-token pruning experiments on LLaVA."""


def main() -> None:
    app(prog_name="vtkit")
