"""How library code reports progress and results without knowing who listens.

Stages take a :class:`Reporter`. The default one is silent; the CLI passes a rich-backed one
(:class:`vtkit.cli.progress.RichReporter`) that draws progress bars with rate and ETA and prints
tables on stderr. Library modules never import rich themselves.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any


class Task:
    """A running unit of long work: call :meth:`advance` as items finish."""

    def advance(self, n: int = 1, *, work: float = 0.0) -> None:
        """``n`` items finished; ``work`` counts the secondary unit (e.g. tokens) they took."""

    def describe(self, description: str) -> None:
        """Change the label shown next to the bar."""


class Reporter:
    """Silent reporter: the interface stages talk to. Subclass to show things."""

    @contextmanager
    def task(self, description: str, total: int, unit: str = "items",
             work_unit: str | None = None) -> Iterator[Task]:
        yield Task()

    def info(self, message: str) -> None:
        pass

    def warn(self, message: str) -> None:
        pass

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        pass


class _RecordingTask(Task):
    def __init__(self, labels: list[str]) -> None:
        self._labels = labels

    def describe(self, description: str) -> None:
        self._labels.append(description)


class RecordingReporter(Reporter):
    """Keeps every message, table and task label; handy in tests and for saving a run's log."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, str]] = []
        self.tables: list[tuple[str, list[str], list[list[Any]]]] = []
        #: Every label the tasks showed, in order (a task's first, then each describe()).
        self.labels: list[str] = []

    @contextmanager
    def task(self, description: str, total: int, unit: str = "items",
             work_unit: str | None = None) -> Iterator[Task]:
        self.labels.append(description)
        yield _RecordingTask(self.labels)

    def info(self, message: str) -> None:
        self.messages.append(("info", message))

    def warn(self, message: str) -> None:
        self.messages.append(("warn", message))

    def table(self, title, columns, rows) -> None:
        self.tables.append((title, list(columns), [list(r) for r in rows]))


class PhaseTimer:
    """Time named phases of a stage (prefill, decode, spectra, ...) without stalling the GPU.

    On CUDA each phase records a pair of events and nothing waits; :meth:`totals` synchronises
    once and adds them up. On the CPU it reads the clock.
    """

    def __init__(self, device=None) -> None:
        import torch

        self._cuda = device is not None and getattr(device, "type", str(device)) == "cuda"
        self._torch = torch
        self._events: dict[str, list] = {}
        self._seconds: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def count(self, name: str, n: int) -> None:
        """Add ``n`` to the counter ``name`` (e.g. prefill tokens a shared prefix saved)."""
        self._counts[name] = self._counts.get(name, 0) + n

    def counts(self) -> dict[str, int]:
        return dict(self._counts)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self._cuda:
            start = self._torch.cuda.Event(enable_timing=True)
            end = self._torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.setdefault(name, []).append((start, end))
        else:
            import time

            began = time.perf_counter()
            yield
            self._seconds[name] = self._seconds.get(name, 0.0) + time.perf_counter() - began

    def totals(self) -> dict[str, float]:
        """Seconds spent in each phase so far."""
        totals = dict(self._seconds)
        if self._events:
            self._torch.cuda.synchronize()
            for name, pairs in self._events.items():
                totals[name] = totals.get(name, 0.0) + sum(
                    s.elapsed_time(e) for s, e in pairs) / 1000.0
        return totals


class NullTimer:
    """The timer stages use when nobody measures: phases cost nothing."""

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        yield

    def count(self, name: str, n: int) -> None:
        pass

    def totals(self) -> dict[str, float]:
        return {}

    def counts(self) -> dict[str, int]:
        return {}


def time_repeats(run, device, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``run()`` after ``warmup`` untimed ones
    (:func:`time_calls`)."""
    for _ in range(warmup):
        run()
    return time_calls([run] * repeats, device)


def time_calls(calls, device) -> list[float]:
    """Seconds of each call of ``calls`` (functions of no argument), made in order.

    On CUDA each call is bracketed by a pair of events: the GPU time from the call's first
    queued work to its last, host launch gaps included, with no synchronisation added between
    calls (one at the end). Elsewhere the clock brackets each call (CPU work is done when the
    call returns).
    """
    import time

    import torch

    if getattr(device, "type", str(device)) != "cuda":
        seconds = []
        for call in calls:
            began = time.perf_counter()
            call()
            seconds.append(time.perf_counter() - began)
        return seconds
    torch.cuda.synchronize(device)
    pairs = []
    for call in calls:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) / 1000.0 for start, end in pairs]


def spread(seconds: list[float]) -> dict[str, float]:
    """Median, quartiles, extremes (seconds) and count of repeated timings."""
    import numpy as np

    values = np.asarray(seconds, dtype=np.float64)
    q25, median, q75 = np.percentile(values, [25, 50, 75])
    return {"median": float(median), "q25": float(q25), "q75": float(q75),
            "min": float(values.min()), "max": float(values.max()), "repeats": len(seconds)}
