"""Triton kernels behind :mod:`vtkit.eigen`: the eigenvalues of many symmetric matrices of
mixed sizes, in two launches.

``tridiagonalize``: one program per matrix reduces it in place to tridiagonal form by
Householder reflections (LAPACK's dsytd2, unblocked, lower triangle): for each column j, the
reflector v that zeroes it below the subdiagonal, p = A v over the trailing block,
w = p - (v.p) v, and the rank-2 update A -= 2 (v w^T + w v^T). Only the lower triangle is read
and written. The update's pass over the block also computes the next step's p: the block's
first column is updated first and gives the next reflector; the other entries, updated tile by
tile, are multiplied by it while in registers (each entry once as itself, once as its mirror
image). One read and one write of half the trailing block per step. Matrices lie end to end
in one flat buffer (``offsets``, ``sizes``), so one launch takes a batch's every k and layer.
Vectors shared across the program's lanes (v, w, the parts of p) go through a scratch buffer;
barriers separate the passes.

``bisect``: eigenvalues of the tridiagonal matrices by bisection on Sturm counts (LAPACK's
dlaebz count, with its pivmin guard): each lane owns one eigenvalue index i and halves its
interval ``iterations`` times, counting the negative pivots of T - x I at the midpoint.

Imported lazily: Triton comes with torch's CUDA builds. With TRITON_INTERPRET=1 set before
the first import, the same kernels run on the CPU (the tests do this).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _reflector(x, lanes):
    """The Householder reflector of x: (alpha, v) with (I - 2 v v^T) x = alpha e_0, |v| = 1
    (v = 0 when x = 0). alpha takes the sign opposite to x[0], so v[0] does not cancel."""
    norm = tl.sqrt(tl.sum(x * x, axis=0))
    head = tl.sum(tl.where(lanes == 0, x, 0.0), axis=0)
    alpha = tl.where(head >= 0, -norm, norm)
    v = tl.where(lanes == 0, x - alpha, x)
    return alpha, v / tl.maximum(tl.sqrt(tl.sum(v * v, axis=0)), 1e-300)


@triton.jit
def tridiagonalize(a_ptr, offsets_ptr, sizes_ptr, d_ptr, e_ptr, scratch_ptr, stride, tiles,
                   VEC: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    pid = tl.program_id(0)
    a = a_ptr + tl.load(offsets_ptr + pid)
    n = tl.load(sizes_ptr + pid)
    d = d_ptr + pid * stride
    e = e_ptr + pid * stride
    # Scratch, by step parity: v; p = A v from the entries above the diagonal (read as their
    # mirror images); w; then p's parts from the entries on or below it, one row per column
    # tile (``tiles`` of them), summed at the next step. Zeros at first.
    scratch = scratch_ptr + pid * (5 + 2 * tiles) * stride
    ws = scratch + 4 * stride
    lanes = tl.arange(0, VEC)
    tile_rows = tl.arange(0, ROWS)
    tile_cols = tl.arange(0, COLS)
    for s in range(0, n - 1):
        # Step s: the block is rows/columns s.. (size m) of the lower triangle. It applies the
        # reflector of step s - 1 (none at s = 0: v = w = 0) and builds reflector s from the
        # updated column 0, then updates the rest of the block and computes the next p.
        m = n - s
        vs = scratch + (s % 2) * stride
        v = tl.load(vs + lanes, mask=lanes < m, other=0.0)
        p = tl.load(scratch + (2 + s % 2) * stride + lanes, mask=lanes < m, other=0.0)
        rows_now = scratch + (5 + (s % 2) * tiles) * stride
        for t in range(0, tiles):
            # Row i's parts come from the column tiles that start at or before its diagonal.
            p += tl.load(rows_now + t * stride + lanes, mask=(lanes < m) & (t <= lanes // COLS),
                         other=0.0)
        w = p - tl.sum(v * p, axis=0) * v
        tl.store(ws + lanes, w, mask=lanes < m)
        vn = scratch + (1 - s % 2) * stride
        cols_next = scratch + (3 - s % 2) * stride
        rows_next = scratch + (5 + (1 - s % 2) * tiles) * stride
        tl.debug_barrier()
        block = a + s * n + s
        v0 = tl.load(vs)
        w0 = tl.load(ws)
        column = tl.load(block + lanes * n, mask=lanes < m, other=0.0)
        column = column - 2.0 * (v * w0 + w * v0)
        tl.store(block + lanes * n, column, mask=lanes < m)
        tl.store(d + s, tl.sum(tl.where(lanes == 0, column, 0.0), axis=0))
        tl.debug_barrier()
        if s < n - 2:
            alpha, vnext = _reflector(
                tl.load(block + (lanes + 1) * n, mask=lanes < m - 1, other=0.0), lanes)
            tl.store(e + s, alpha)
            tl.store(vn + lanes, vnext, mask=lanes < m - 1)
        tl.debug_barrier()
        for c in range(1, m, COLS):
            parts = rows_next + ((c - 1) // COLS) * stride
            cols = c + tile_cols
            live_cols = cols < m
            vc = tl.load(vs + cols, mask=live_cols, other=0.0)
            wc = tl.load(ws + cols, mask=live_cols, other=0.0)
            ahead_c = tl.load(vn + cols - 1, mask=live_cols, other=0.0)
            mirrored = tl.zeros([COLS], tl.float64)
            for r in range(c, m, ROWS):
                rows = r + tile_rows
                inside = rows < m
                lower = inside[:, None] & live_cols[None, :] & (cols[None, :] <= rows[:, None])
                at = block + rows[:, None] * n + cols[None, :]
                vr = tl.load(vs + rows, mask=inside, other=0.0)
                wr = tl.load(ws + rows, mask=inside, other=0.0)
                tile = tl.load(at, mask=lower, other=0.0)
                tile = tile - 2.0 * (vr[:, None] * wc[None, :] + wr[:, None] * vc[None, :])
                tile = tl.where(lower, tile, 0.0)
                tl.store(at, tile, mask=lower)
                ahead_r = tl.load(vn + rows - 1, mask=inside, other=0.0)
                # p'[r] += L[r, c] v'[c] (c <= r); p'[c] += L[r, c] v'[r] (c < r).
                tl.store(parts + rows - 1, tl.sum(tile * ahead_c[None, :], axis=1), mask=inside)
                strict = tl.where(cols[None, :] < rows[:, None], tile, 0.0)
                mirrored += tl.sum(strict * ahead_r[:, None], axis=0)
            tl.store(cols_next + cols - 1, mirrored, mask=live_cols)
        tl.debug_barrier()
    if n == 1:
        tl.store(d, tl.load(a))
    if n >= 2:
        tl.store(e + n - 2, tl.load(a + (n - 1) * n + n - 2))
        tl.store(d + n - 1, tl.load(a + (n - 1) * n + n - 1))


@triton.jit
def bisect(d_ptr, e2_ptr, lower_ptr, upper_ptr, pivmin_ptr, sizes_ptr, out_ptr, stride,
           ITERATIONS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    first = tl.program_id(1) * BLOCK
    n = tl.load(sizes_ptr + pid)
    if first < n:
        index = first + tl.arange(0, BLOCK)   # the eigenvalues (ascending) this program finds
        d = d_ptr + pid * stride
        e2 = e2_ptr + pid * stride            # e2[i] = e[i - 1]^2, e2[0] = 0
        pivmin = tl.load(pivmin_ptr + pid)
        lo = tl.zeros([BLOCK], tl.float64) + tl.load(lower_ptr + pid)
        hi = tl.zeros([BLOCK], tl.float64) + tl.load(upper_ptr + pid)
        for _ in range(ITERATIONS):
            mid = 0.5 * (lo + hi)
            q = tl.zeros([BLOCK], tl.float64) + 1.0
            below = tl.zeros([BLOCK], tl.int32)  # eigenvalues below mid
            for i in range(n):
                q = tl.load(d + i) - mid - tl.load(e2 + i) / q
                negative = q <= pivmin
                below += negative.to(tl.int32)
                q = tl.where(negative, tl.minimum(q, -pivmin), q)
            up = below <= index
            lo = tl.where(up, mid, lo)
            hi = tl.where(up, hi, mid)
        tl.store(out_ptr + pid * stride + index, 0.5 * (lo + hi), mask=index < n)
