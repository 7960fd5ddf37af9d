"""Singular values of many matrices at once, on the device that holds them.

The sweep stores, for every captured (tensor, layer) and every (question, k) row, the singular
values of the k x d block of visual rows. They are the square roots of the eigenvalues of the
float64 Gram matrix (min(k, d) square). On a GPU run :func:`gram_spectra` computes them where
the captures are: the Gram matrices of all a batch's blocks go end to end into one buffer,
Triton kernels reduce each to tridiagonal form (blocked Householder, in place, a panel of
columns per pair of launches), and another finds the eigenvalues of the tridiagonal matrices by
bisection (:mod:`vtkit.eigen_kernels`). Each launch takes every matrix of the chunk, whatever
the mix of sizes; only the singular values leave the GPU.

Accuracy: both steps are backward stable in float64, as LAPACK's dsyevd (Householder, then
dsterf) is: each eigenvalue is found to within a few units of 1e-16 times the largest, so a
singular value is exact to about 1e-8 of the largest, far below the rank thresholds.

Elsewhere (CPU runs, or no Triton) the eigenvalues come from LAPACK on CPU threads
(:func:`vtkit.pruning.spectra_from_gram`).
"""

from __future__ import annotations

import math
import os
from contextlib import nullcontext
from functools import cache

import numpy as np
import torch

from vtkit.pruning import gram_matrices, to_device

# Bisection halvings: Gershgorin's interval, halved 56 times, is narrower than 2e-16 of itself.
BISECTION_ITERATIONS = 56
# Device bytes per chunk of launches: the Gram matrices and their working vectors. A sweep
# batch's fit in one (5.5 GiB at most for 32 layers in the 7B bench; the token budget keeps
# room for them, generate.default_token_budget): every matrix then runs in the same launches,
# whose time is that of the largest, not a sum over chunks (20% less time than 1 GiB chunks,
# docs/performance.md).
CHUNK_BYTES = 8 << 30
# Float64 bytes of rows that one Gram matrix product reads at most (a block's rows are
# converted a slice at a time).
GRAM_INPUT_BYTES = 1 << 28
# The reduction's tile (rows x columns of the lower triangle per step of a pass), its panel
# (columns whose reflectors update the trailing block together), the lanes of its vector work
# (CHUNK alone, WIDE against the panel's reflectors), and warps per program. Measured on an
# H200 against 9 other settings, and again against 5 with whole-batch chunks
# (docs/performance.md).
TRIDIAGONAL_TILE = {"ROWS": 16, "COLS": 32, "PANEL": 16, "CHUNK": 128, "WIDE": 32,
                    "num_warps": 2}
# Widest matrix the kernels take (their scratch grows with it, and nothing wider was tested);
# LLaVA's largest is 576.
MAX_SIZE = 2048


@cache
def _kernels():
    from vtkit import eigen_kernels

    return eigen_kernels


def triton_available(device: torch.device) -> bool:
    """Whether :func:`gram_spectra` can run its kernels for tensors on ``device``: a CUDA device
    with Triton installed, or any device in Triton's interpreter (TRITON_INTERPRET=1, set
    before Triton's import: the tests)."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        _kernels()
    except ImportError:
        return False
    return True


def kernel_problem(device: torch.device) -> str | None:
    """None when the kernels compile and find the eigenvalues of a known 3 x 3 matrix on
    ``device`` (2 - sqrt 2, 2, 2 + sqrt 2); otherwise, in one line, why not. Checked once per
    device and process."""
    return _kernel_problem(str(device))


@cache
def _kernel_problem(device_name: str) -> str | None:
    device = torch.device(device_name)
    expected = torch.tensor([2 - 2 ** 0.5, 2.0, 2 + 2 ** 0.5], dtype=torch.float64)
    try:
        matrix = torch.tensor([[2.0, 1.0, 0.0], [1.0, 2.0, 1.0], [0.0, 1.0, 2.0]],
                              dtype=torch.float64, device=device)
        values = symmetric_eigenvalues(
            matrix.reshape(-1).clone(), torch.tensor([3], dtype=torch.int32, device=device),
            torch.tensor([0], dtype=torch.int64, device=device), 3)[0].cpu()
    except Exception as error:    # a missing compiler, an unsupported GPU: any reason is reported
        return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"
    if not torch.allclose(values, expected, rtol=0, atol=1e-12):
        return f"they found {values.tolist()} for {expected.tolist()}"
    return None


def symmetric_eigenvalues(matrices: torch.Tensor, sizes: torch.Tensor, offsets: torch.Tensor,
                          width: int) -> torch.Tensor:
    """Eigenvalues, ascending, of symmetric float64 matrices lying end to end in ``matrices``
    (matrix i: ``sizes[i]`` square, row-major from ``offsets[i]``), which are overwritten.
    Returns [count, width] float64 (width >= the largest size; row i's values in its first
    ``sizes[i]`` places, zeros after)."""
    kernels = _kernels()
    count = int(sizes.numel())
    device = matrices.device
    # Rows of the working vectors padded to a multiple of 16: Triton compiles a variant per
    # divisibility of an integer argument, and one stride keeps it to one (compiled by the
    # kernel_problem check, not in the middle of a timed sweep).
    stride = -(-width // 16) * 16
    d, e = (torch.zeros((count, stride), dtype=torch.float64, device=device) for _ in range(2))
    tiles = -(-width // TRIDIAGONAL_TILE["COLS"])
    panel = TRIDIAGONAL_TILE["PANEL"]
    update_options = {key: value for key, value in TRIDIAGONAL_TILE.items()
                      if key not in ("CHUNK", "WIDE")}
    scratch = torch.zeros((count, 2 * panel + 3 + tiles, stride),
                          dtype=torch.float64, device=device)
    # (_working_vectors counts these: d, e, the values below, and the scratch.)
    values = torch.zeros((count, stride), dtype=torch.float64, device=device)
    step = 64
    # Triton launches on the current device: make it the tensors' (e.g. --device cuda:1).
    with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
        for s0 in range(0, width, panel):
            kernels.reduce_panel[(count,)](matrices, offsets, sizes, d, e, scratch, stride,
                                           tiles, s0, **TRIDIAGONAL_TILE)
            if s0 + panel + 1 < width:
                kernels.update_trailing[(count, tiles)](matrices, offsets, sizes, scratch,
                                                        stride, tiles, s0, **update_options)
        lower, upper, pivmin = _bisection_bounds(d, e, sizes)
        e2 = torch.cat([torch.zeros_like(e[:, :1]), e[:, :-1] ** 2], dim=1)
        kernels.bisect[(count, -(-width // step))](d, e2, lower, upper, pivmin, sizes, values,
                                                   stride, ITERATIONS=BISECTION_ITERATIONS,
                                                   BLOCK=step, num_warps=2)
    return values[:, :width]


def _bisection_bounds(d: torch.Tensor, e: torch.Tensor, sizes: torch.Tensor):
    """Per tridiagonal matrix: Gershgorin's interval, widened by its rounding (as LAPACK's
    dstebz widens it), and the smallest pivot a Sturm count lets stand (dlaebz's pivmin)."""
    width = d.shape[1]
    live = torch.arange(width, device=d.device)[None, :] < sizes[:, None]
    # e holds zeros past each matrix's last off-diagonal element (n - 2).
    radius = e.abs() + torch.cat([torch.zeros_like(e[:, :1]), e[:, :-1].abs()], dim=1)
    # Python floats, not tensors made from them: a host value copied to the GPU would wait
    # for every kernel queued before it.
    lower = torch.where(live, d - radius, math.inf).amin(dim=1)
    upper = torch.where(live, d + radius, -math.inf).amax(dim=1)
    norm = torch.maximum(lower.abs(), upper.abs())
    tiny = torch.finfo(torch.float64).tiny
    pivmin = tiny * torch.clamp((e ** 2).amax(dim=1), min=1.0)
    fudge = 2.1 * torch.finfo(torch.float64).eps * norm * sizes.double() + 4 * pivmin
    return lower - fudge, upper + fudge, pivmin


def gram_spectra(blocks: list[torch.Tensor],
                 chunk_bytes: int = CHUNK_BYTES) -> list[torch.Tensor]:
    """Singular values, descending, float32, of each [k, d] matrix of each block [B, k, d]:
    one [B, min(k, d)] tensor per block, on the blocks' device.

    The Gram matrices are computed straight into a flat buffer, a chunk of blocks at a time,
    and their eigenvalues found by the Triton kernels (:func:`triton_available`). Blocks go
    largest first, so that a chunk holds matrices of similar sizes: its working vectors are as
    wide as its largest matrix. A chunk takes at most ``chunk_bytes`` with them (or one block).
    """
    sizes = [min(block.shape[1], block.shape[2]) for block in blocks]
    if max(sizes, default=0) > MAX_SIZE:
        raise ValueError(f"gram_spectra takes matrices up to {MAX_SIZE} square, not "
                         f"{max(sizes)}")
    out: list[torch.Tensor | None] = [None] * len(blocks)
    chunk: list[int] = []
    count = grams = 0
    for i in sorted(range(len(blocks)), key=lambda i: -sizes[i]):
        rows = blocks[i].shape[0]
        width = sizes[chunk[0]] if chunk else sizes[i]     # the chunk's largest matrix
        if chunk and 8 * (grams + rows * sizes[i] ** 2 +
                          (count + rows) * _working_vectors(width) * width) > chunk_bytes:
            _spectra_chunk(blocks, chunk, out)
            chunk, count, grams = [], 0, 0
        chunk.append(i)
        count += rows
        grams += rows * sizes[i] ** 2
    if chunk:
        _spectra_chunk(blocks, chunk, out)
    return out


def _working_vectors(width: int) -> int:
    """Float64 vectors of ``width`` per matrix that :func:`symmetric_eigenvalues` allocates: d,
    e, the eigenvalues, and the reduction's scratch."""
    return 3 + 2 * TRIDIAGONAL_TILE["PANEL"] + 3 + -(-width // TRIDIAGONAL_TILE["COLS"])


def _spectra_chunk(blocks: list[torch.Tensor], chunk: list[int], out: list) -> None:
    device = blocks[chunk[0]].device
    shapes = [(blocks[i].shape[0], min(blocks[i].shape[1], blocks[i].shape[2])) for i in chunk]
    sizes = [m for b, m in shapes for _ in range(b)]
    if not sizes:
        for i, (b, m) in zip(chunk, shapes, strict=True):
            out[i] = torch.zeros((b, m), dtype=torch.float32, device=device)
        return
    flat = torch.empty(sum(b * m * m for b, m in shapes), dtype=torch.float64, device=device)
    start = 0
    for i, (b, m) in zip(chunk, shapes, strict=True):
        block = blocks[i]
        # In slices, so that the float64 copy of the rows that the product reads stays small.
        step = max(1, GRAM_INPUT_BYTES // max(1, 8 * block.shape[1] * block.shape[2]))
        for r in range(0, b, step):
            rows = block[r:r + step]
            gram_matrices(rows, out=flat[start + r * m * m:start + (r + len(rows)) * m * m]
                          .view(len(rows), m, m))
        start += b * m * m
    offsets = np.zeros(len(sizes), dtype=np.int64)
    offsets[1:] = np.cumsum(np.asarray(sizes[:-1], dtype=np.int64) ** 2)
    width = max(sizes)
    values = symmetric_eigenvalues(flat, to_device(torch.tensor(sizes, dtype=torch.int32), device),
                                   to_device(torch.from_numpy(offsets), device), width)
    singular = values.clamp(min=0).sqrt().float()
    row = 0
    for i, (b, m) in zip(chunk, shapes, strict=True):
        out[i] = singular[row:row + b, :m].flip(-1)
        row += b
