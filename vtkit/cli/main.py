"""The root of the CLI: it only wires the command modules together.

The command modules import the library inside their command bodies, so `vtkit --help`, every
command's help and every usage error answer without loading torch, transformers, h5py or
matplotlib.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

# Batches of very different shapes fragment CUDA memory; growable segments avoid that. Set
# before torch touches the GPU; a value the user set wins.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import typer  # noqa: E402
from typer.core import TyperGroup  # noqa: E402

try:  # newer typer carries its own copy of click
    from typer._click.exceptions import UsageError
except ImportError:
    from click.exceptions import UsageError

from vtkit import __version__  # noqa: E402
from vtkit.cli import (  # noqa: E402
    bench,
    compare,
    convert,
    cost,
    demo,
    extract,
    plot,
    prompts,
    rank,
    run,
    score,
    sweep,
)
from vtkit.cli.output import fail, handles_errors  # noqa: E402


@contextmanager
def _one_line_usage_errors() -> Iterator[None]:
    """A bad flag or argument becomes one ``error:`` line and exit 2, like vtkit's own errors."""
    try:
        yield
    except UsageError as error:
        if type(error).__name__ == "NoArgsIsHelpError":  # `vtkit` alone: the help, as it is
            raise
        where = f" (see '{error.ctx.command_path} -h')" if error.ctx is not None else ""
        raise fail(error.format_message() + where, error.exit_code) from None


class _Group(TyperGroup):
    """The root group: parsing errors of the root and of every command go through
    :func:`_one_line_usage_errors` (the root's options parse in ``make_context``, a command's
    name and options in ``invoke``)."""

    def make_context(self, *args, **kwargs):
        with _one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with _one_line_usage_errors():
            return super().invoke(ctx)


app = typer.Typer(
    name="vtkit",
    cls=_Group,
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
    "compare": compare.compare,
    "score": score.score,
    "prompts": prompts.prompts,
    "demo": demo.demo,
    "convert": convert.convert,
    "bench": bench.bench,
    "cost": cost.cost,
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
