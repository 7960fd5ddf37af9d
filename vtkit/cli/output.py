"""Where the CLI talks to humans (stderr) and machines (stdout); errors become exit codes."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import PurePath
from typing import Any

import typer
from rich.console import Console

from vtkit.errors import VtkitError, os_error_message

#: Progress bars, tables and messages: stderr, so stdout stays clean for ``--json``.
console = Console(stderr=True)


def print_json(document: Any) -> None:
    """Print one JSON document on stdout; result dataclasses become objects, paths strings."""
    sys.stdout.write(json.dumps(document, indent=2, sort_keys=False, default=_plain) + "\n")
    sys.stdout.flush()


def print_stage_json(document: Any) -> None:
    """:func:`print_json` in the main process only: torchrun starts one process per GPU, and
    stdout carries one document."""
    from vtkit.parallel import launched_workers

    if launched_workers().is_main:
        print_json(document)


def rank_json(result) -> dict[str, Any]:
    """What `vtkit rank --json` prints of a RankResult: the file and the per-k summary."""
    return {"ranks_file": str(result.path), **result.to_json(per_question=False)}


def _plain(value: Any) -> Any:
    """What json cannot encode by itself: the stages' result dataclasses and paths."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, PurePath):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``error: message`` on one line of stderr and return the Exit to raise."""
    sys.stderr.write(f"error: {' '.join(str(message).split())}\n")
    sys.stderr.flush()
    return typer.Exit(code)


def handles_errors(command: Callable) -> Callable:
    """Wrap a command so a :class:`VtkitError` becomes one line on stderr and its exit code.

    An OS error that no stage turned into a VtkitError (a file it could not read or write,
    HDF5's errors among them) becomes one line the same way, exit 1. ``VTKIT_DEBUG=1`` lets the
    exception through with its traceback.
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except VtkitError as error:
            if os.environ.get("VTKIT_DEBUG"):
                raise
            raise fail(str(error), error.exit_code) from None
        except OSError as error:
            if os.environ.get("VTKIT_DEBUG"):
                raise
            raise fail(os_error_message(error, action="use"), 1) from None

    return wrapper


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {message}", highlight=False)
