"""A :class:`vtkit.progress.Reporter` that draws with rich on stderr."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from vtkit.cli.output import console
from vtkit.progress import Reporter, Task


class _RateColumn(ProgressColumn):
    """Items per second, and the secondary unit per second (e.g. tokens/s) when there is one."""

    def render(self, task) -> Text:
        elapsed = task.elapsed or 0.0
        if elapsed <= 0:
            return Text("")
        unit = task.fields.get("unit", "items")
        parts = [f"{task.completed / elapsed:,.1f} {unit}/s"]
        work_unit = task.fields.get("work_unit")
        if work_unit:
            parts.append(f"{task.fields.get('work', 0.0) / elapsed:,.0f} {work_unit}/s")
        return Text("  ".join(parts), style="progress.data.speed")


class _RichTask(Task):
    def __init__(self, progress: Progress, task_id) -> None:
        self._progress, self._id, self._work = progress, task_id, 0.0

    def advance(self, n: int = 1, *, work: float = 0.0) -> None:
        self._work += work
        self._progress.update(self._id, advance=n, work=self._work)

    def describe(self, description: str) -> None:
        self._progress.update(self._id, description=description)


class RichReporter(Reporter):
    @contextmanager
    def task(self, description, total, unit="items", work_unit=None) -> Iterator[Task]:
        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            _RateColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        with progress:
            task_id = progress.add_task(description, total=total, unit=unit,
                                        work_unit=work_unit, work=0.0)
            yield _RichTask(progress, task_id)

    def info(self, message: str) -> None:
        console.print(message, highlight=False)

    def warn(self, message: str) -> None:
        # One line however long (the terminal wraps it), and the message is never markup.
        console.print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False,
                      soft_wrap=True)

    def table(self, title, columns, rows) -> None:
        table = Table(title=title)
        for column in columns:
            table.add_column(str(column), justify="right")
        for row in rows:
            table.add_row(*(_cell(v) for v in row))
        console.print(table)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def stage_reporter() -> Reporter:
    """Progress and tables from the main process only (torchrun starts one per GPU)."""
    from vtkit.parallel import launched_workers

    return RichReporter() if launched_workers().is_main else Reporter()
