"""torch.profiler over a few batches of a sweep, summed up by kernel and by kind of work.

:class:`BatchProfiler` is the sweep's phase timer (it still times every phase) that also runs
the profiler from the start of one batch's prefill to the start of the prefill ``batches``
batches later, after ``warmup`` batches. On CUDA the work is the GPU kernels (their own time);
on the CPU it is the CPU operators (self time). :func:`kind_of` sorts a kernel or operator into
matmul, attention, elementwise, cache copy or other by its name (docs/performance.md).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from vtkit.progress import PhaseTimer

KINDS = ("matmul", "attention", "elementwise", "cache copy", "other")
#: (kind, name pattern), first match wins: fused attention kernels hold "cutlass" or "gemm"
#: in their names, so attention is tried before matmul; copies between host and device are other.
_PATTERNS = (
    ("other", re.compile(r"^Memcpy|^Memset")),
    ("attention", re.compile(r"flash|fmha|attention|sdpa|softmax", re.IGNORECASE)),
    ("cache copy", re.compile(r"CatArrayBatchedCopy|^aten::cat$")),
    ("matmul", re.compile(r"gemm|nvjet|cutlass|xmma|cublas|^aten::(mm|addmm|bmm|baddbmm)$",
                          re.IGNORECASE)),
    ("elementwise", re.compile(
        r"elementwise|reduce_kernel|copy|^aten::(mul|add|sub|div|pow|mean|sum|neg|silu|gelu|"
        r"rsqrt|exp|sin|cos|where|masked_fill|fill_|zero_|cumsum|clamp|index|gather|embedding|"
        r"argmax|topk)", re.IGNORECASE)),
)
#: The top kernels (or operators) kept in profile.json and shown in the table.
TOP = 25
#: The longest single host calls kept, with their input shapes.
LONGEST = 10


def kind_of(name: str) -> str:
    """The kind of work a kernel or operator named ``name`` does."""
    for kind, pattern in _PATTERNS:
        if pattern.search(name):
            return kind
    return "other"


class BatchProfiler(PhaseTimer):
    """A :class:`PhaseTimer` that profiles ``batches`` sweep batches after ``warmup`` ones.

    A batch begins at its ``prefill`` phase. :meth:`finish` stops a profile still running at
    the end of the sweep and returns the summary (None when the sweep ran too few batches).
    """

    def __init__(self, device, batches: int = 2, warmup: int = 1) -> None:
        super().__init__(device)
        self.device = torch.device(device)
        self.batches, self.warmup = batches, warmup
        self._seen = 0
        self._profiler = None
        self._began = 0.0
        self.summary: dict | None = None

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if name == "prefill":
            self._seen += 1
            if self._seen == self.warmup + 1:
                self._start()
            elif self._seen == self.warmup + self.batches + 1:
                self._stop(self.batches)
        with super().phase(name):
            yield

    @property
    def batches_seen(self) -> int:
        return self._seen

    def finish(self) -> dict | None:
        if self._profiler is not None and self.summary is None:
            self._stop(self._seen - self.warmup)
        return self.summary

    def _start(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize(self.device)
        # Input shapes name the call behind a long wait (e.g. the LM head's product over a
        # batch's rows, whose kernel loads on its first launch).
        self._profiler = torch.profiler.profile(activities=activities, record_shapes=True)
        self._profiler.start()
        self._began = time.perf_counter()

    def _stop(self, batches: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - self._began
        self._profiler.stop()
        self.summary = summarize(self._profiler, self.device.type == "cuda", wall, batches,
                                 self.warmup)

    def write_trace(self, path: Path) -> None:
        """The profiled window's timeline (chrome://tracing, Perfetto); ``.gz`` compresses."""
        self._profiler.export_chrome_trace(str(path))


def attention_kernels(run, device) -> list[str]:
    """Names of the attention kernels (CUDA) or operators (CPU) one call of ``run()`` runs:
    which SDPA backend torch really picked for those shapes."""
    cuda = torch.device(device).type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        run()
        if cuda:
            torch.cuda.synchronize(device)
    wanted = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    return sorted({a.key for a in profiler.key_averages()
                   if a.device_type == wanted and kind_of(a.key) == "attention"})


def summarize(profiler, cuda: bool, wall: float, batches: int, warmup: int) -> dict:
    """Top kernels (CUDA) or operators (CPU) by their own time, totals by kind, and the top
    CPU-side operators and runtime calls (what the host spent its time on)."""
    averages = [a for a in profiler.key_averages() if not getattr(a, "is_user_annotation",
                                                                   False)]
    device_type = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU

    def own(a) -> float:
        return (a.self_device_time_total if cuda else a.self_cpu_time_total) / 1e6

    work = sorted((a for a in averages if a.device_type == device_type and own(a) > 0),
                  key=own, reverse=True)
    total = sum(own(a) for a in work) or 1.0
    kinds = dict.fromkeys(KINDS, 0.0)
    for a in work:
        kinds[kind_of(a.key)] += own(a)
    host = sorted((a for a in averages if a.device_type == torch.autograd.DeviceType.CPU),
                  key=lambda a: a.self_cpu_time_total, reverse=True)
    calls = sorted((e for e in profiler.events()
                    if e.device_type == torch.autograd.DeviceType.CPU
                    and not getattr(e, "is_user_annotation", False)),
                   key=lambda e: e.self_cpu_time_total, reverse=True)
    return {
        "device": "cuda" if cuda else "cpu",
        "measure": "GPU kernel time" if cuda else "CPU operator self time",
        "batches": batches, "warmup_batches": warmup, "wall_seconds": wall,
        "busy_seconds": sum(own(a) for a in work),
        "kinds": {kind: {"seconds": s, "share": s / total} for kind, s in kinds.items()},
        "top": [{"name": a.key, "kind": kind_of(a.key), "seconds": own(a),
                 "share": own(a) / total, "calls": a.count} for a in work[:TOP]],
        "host_top": [{"name": a.key, "seconds": a.self_cpu_time_total / 1e6, "calls": a.count}
                     for a in host[:TOP]],
        "host_longest": [{"name": e.name, "seconds": e.self_cpu_time_total / 1e6,
                          "shapes": [list(shape) for shape in e.input_shapes or []]}
                         for e in calls[:LONGEST]],
    }


def profile_tables(summary: dict) -> list[tuple[str, list[str], list[list]]]:
    """(title, columns, rows) of the kinds and of the top kernels or operators."""
    where = f"{summary['batches']} sweep batch(es) after {summary['warmup_batches']} warm-up"
    kinds = [[kind, v["seconds"], f"{100 * v['share']:.1f}%"]
             for kind, v in summary["kinds"].items()]
    top = [[t["name"][:70], t["kind"], t["calls"], t["seconds"], f"{100 * t['share']:.1f}%"]
           for t in summary["top"]]
    tables = [
        (f"profile by kind: {summary['measure']}, {where}; wall {summary['wall_seconds']:.3f} s",
         ["kind", "seconds", "share"], kinds),
        (f"top {len(top)} by {summary['measure']}", ["name", "kind", "calls", "seconds", "share"],
         top),
    ]
    if summary["device"] == "cuda":
        tables.append(("top CPU-side operators and CUDA runtime calls (self CPU time)",
                       ["name", "calls", "seconds"],
                       [[t["name"][:70], t["calls"], t["seconds"]] for t in summary["host_top"]]))
    tables.append(("longest single host calls (self CPU time), with their input shapes",
                   ["name", "seconds", "input shapes"],
                   [[t["name"][:50], t["seconds"], str(t["shapes"])[:70]]
                    for t in summary["host_longest"]]))
    return tables
