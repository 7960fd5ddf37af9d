"""Triton kernels behind :mod:`vtkit.eigen`: the eigenvalues of many symmetric matrices of
mixed sizes, in two launches.

``tridiagonalize``: one program per matrix reduces it in place to tridiagonal form by
Householder reflections, blocked as LAPACK's dsytrd blocks them (dlatrd's panel, lower
triangle). For each column j of a panel of PANEL columns: the column as updated by the panel's
earlier reflectors, the reflector v that zeroes it below the subdiagonal, p = A_j v (one read
of the trailing block as it was at the panel's start, corrected by the earlier reflectors) and
w = p - (v.p) v. At the panel's end the trailing block takes the rank-2 PANEL update
A -= 2 (V W^T + W V^T) in one read and one write, a matrix product per tile, and that pass also
computes the next panel's first p. Per column that is about one read of half the trailing
block, against one read and one write unblocked. Each entry of the lower triangle is read
once per pass and counts twice, as itself and as its mirror image.

Matrices lie end to end in one flat buffer (``offsets``, ``sizes``), so one launch takes a
batch's every k and layer. Vectors (the column, v, w, the parts of p) live in a scratch buffer
and are worked on CHUNK lanes at a time, so that a program's registers go to the tiles of the
passes and more programs fit on a multiprocessor; barriers separate the stages. Work against
all the panel's earlier reflectors (a column's corrections, w's) reads them as one
[PANEL, WIDE] tile per step rather than one reflector after another, and the read pass loads
its next tile before working on the current one: each program is bound by the latency of its
loads, so the fewer loads it waits for in a row, the faster.

``bisect``: eigenvalues of the tridiagonal matrices by bisection on Sturm counts (LAPACK's
dlaebz count, with its pivmin guard): each lane owns one eigenvalue index i and halves its
interval ``iterations`` times, counting the negative pivots of T - x I at the midpoint.

Every launch of a kernel runs one compiled variant: the host pads the row stride of the
working vectors to a multiple of 16 and panels start at multiples of 16, and the tile count is
left unspecialised, so a new batch shape never compiles anything in the middle of a sweep.

Imported lazily: Triton comes with torch's CUDA builds. With TRITON_INTERPRET=1 set before
the first import, the same kernels run on the CPU (the tests do this).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _zero():
    """A float64 scalar zero that a loop can accumulate into."""
    return tl.sum(tl.zeros([16], tl.float64), axis=0)


@triton.jit
def _column_tile(block, n, size, c, v_ptr, parts, mirrored_part, stride, update_v, update_w,
                 UPDATE: tl.constexpr, PANEL: tl.constexpr, ROWS: tl.constexpr,
                 COLS: tl.constexpr):
    """Column tile c (columns c..c+COLS-1, every row tile on or below the diagonal) of a pass
    over the lower triangle of the ``size``-square block at ``block`` (row stride n): its parts
    of p = B v (v at ``v_ptr``, B symmetric), and with UPDATE first the panel's update
    B -= 2 (V W^T + W V^T), written back (the PANEL vectors at ``update_v`` and ``update_w``,
    ``stride`` apart). Each entry counts twice, as itself and as its mirror image: p[c..]
    collects the tile's columns (``mirrored_part``), p[r] row r's entries left of the diagonal
    (row c // COLS of ``parts``; the caller sums the rows)."""
    tile_rows = tl.arange(0, ROWS)
    cols = c + tl.arange(0, COLS)
    live_cols = cols < size
    vc = tl.load(v_ptr + cols, mask=live_cols, other=0.0)
    mirrored = tl.zeros([ROWS, COLS], tl.float64)
    if UPDATE:
        panel = tl.arange(0, PANEL)
        at_cols = panel[:, None] * stride + cols[None, :]
        wc = tl.load(update_w + at_cols, mask=live_cols[None, :], other=0.0)
        uc = tl.load(update_v + at_cols, mask=live_cols[None, :], other=0.0)
    # Each step loads the next row tile before working on the one loaded before it, so that
    # a program always has a tile in flight (the pass is bound by the loads' latency).
    rows = c + tile_rows
    inside = rows < size
    lower = inside[:, None] & live_cols[None, :] & (cols[None, :] <= rows[:, None])
    tile = tl.load(block + rows[:, None] * n + cols[None, :], mask=lower, other=0.0)
    vr = tl.load(v_ptr + rows, mask=inside, other=0.0)
    for r in range(c, size, ROWS):
        rows = r + tile_rows
        inside = rows < size
        lower = inside[:, None] & live_cols[None, :] & (cols[None, :] <= rows[:, None])
        ahead = rows + ROWS
        ahead_inside = ahead < size
        ahead_lower = (ahead_inside[:, None] & live_cols[None, :] &
                       (cols[None, :] <= ahead[:, None]))
        next_tile = tl.load(block + ahead[:, None] * n + cols[None, :], mask=ahead_lower,
                            other=0.0)
        next_vr = tl.load(v_ptr + ahead, mask=ahead_inside, other=0.0)
        if UPDATE:
            at_rows = rows[:, None] + panel[None, :] * stride
            ur = tl.load(update_v + at_rows, mask=inside[:, None], other=0.0)
            wr = tl.load(update_w + at_rows, mask=inside[:, None], other=0.0)
            tile = tile - 2.0 * (tl.dot(ur, wc) + tl.dot(wr, uc))
            tile = tl.where(lower, tile, 0.0)
            tl.store(block + rows[:, None] * n + cols[None, :], tile, mask=lower)
        tl.store(parts + (c // COLS) * stride + rows, tl.sum(tile * vc[None, :], axis=1),
                 mask=inside)
        mirrored += tl.where(cols[None, :] < rows[:, None], tile, 0.0) * vr[:, None]
        tile = next_tile
        vr = next_vr
    tl.store(mirrored_part + cols, tl.sum(mirrored, axis=0), mask=live_cols)


@triton.jit
def _column(block, n, j, m, vs, ws, stride, count, out, PANEL: tl.constexpr,
            WIDE: tl.constexpr):
    """Column j (rows j..m-1) of the block after the panel's first ``count`` reflectors, the
    stored column minus 2 sum_i (v_i w_i[j] + w_i v_i[j]), into ``out`` (zeros above row j).
    Returns its entries j and j + 1 and the sum of squares of those below j + 1. The
    reflectors are read as one [PANEL, WIDE] tile per step, not one after another."""
    lanes = tl.arange(0, WIDE)
    panel = tl.arange(0, PANEL)
    earlier = panel < count
    wj = tl.load(ws + panel * stride + j, mask=earlier, other=0.0)
    vj = tl.load(vs + panel * stride + j, mask=earlier, other=0.0)
    diagonal = _zero()
    below = _zero()
    rest = _zero()
    for c in range(0, m, WIDE):
        at = c + lanes
        live = (at >= j) & (at < m)
        column = tl.load(block + at * n + j, mask=live, other=0.0)
        both = earlier[:, None] & live[None, :]
        at_panel = panel[:, None] * stride + at[None, :]
        vi = tl.load(vs + at_panel, mask=both, other=0.0)
        wi = tl.load(ws + at_panel, mask=both, other=0.0)
        column -= 2.0 * tl.sum(vi * wj[:, None] + wi * vj[:, None], axis=0)
        column = tl.where(live, column, 0.0)
        tl.store(out + at, column, mask=at < m)
        diagonal += tl.sum(tl.where(at == j, column, 0.0), axis=0)
        below += tl.sum(tl.where(at == j + 1, column, 0.0), axis=0)
        rest += tl.sum(tl.where(at > j + 1, column * column, 0.0), axis=0)
    return diagonal, below, rest


@triton.jit
def _next_reflector(block, n, j, m, s, vs, ws, stride, count, work, d, e, v_out, start,
                    PANEL: tl.constexpr, CHUNK: tl.constexpr, WIDE: tl.constexpr):
    """Column j of the block (the n x n matrix's column s): d[s], e[s], and into
    ``v_out`` (rows start..m-1) the reflector that zeroes the column below row j + 1. It is
    zero for the last two columns, which need none."""
    diagonal, below, rest = _column(block, n, j, m, vs, ws, stride, count, work, PANEL, WIDE)
    tl.store(d + s, diagonal)
    # x = column[j + 1:]; (I - 2 v v^T) x = alpha e_0 with |v| = 1, alpha of the sign
    # opposite to x[0] so that v[0] does not cancel (LAPACK's dlarfg); v = 0 when x = 0.
    norm = tl.sqrt(below * below + rest)
    alpha = tl.where(below >= 0, -norm, norm)
    head = below - alpha
    scale = 1.0 / tl.maximum(tl.sqrt(head * head + rest), 1e-300)
    reflect = s < n - 2
    if s == n - 2:
        tl.store(e + s, below)
    if reflect:
        tl.store(e + s, alpha)
    tl.debug_barrier()
    lanes = tl.arange(0, CHUNK)
    for c in range(0, m, CHUNK):
        at = c + lanes
        x = tl.load(work + at, mask=(at > j) & (at < m), other=0.0)
        v = tl.where(at == j + 1, head, x) * scale
        tl.store(v_out + at, tl.where(reflect, v, 0.0), mask=(at >= start) & (at < m))


@triton.jit
def _panel_w(j, m, vs, ws, stride, parts, mirrored_part, tiles, COLS: tl.constexpr,
             PANEL: tl.constexpr, WIDE: tl.constexpr):
    """w_j = p - (v.p) v, where p = A_j v_j: the pass's parts (they start at row j + 1) minus
    2 sum_{i<j} (v_i (w_i.v) + w_i (v_i.v)). Built in place in row j of W, in three passes
    over the rows, each reading the parts and the earlier reflectors as [PANEL, WIDE] tiles."""
    lanes = tl.arange(0, WIDE)
    panel = tl.arange(0, PANEL)
    earlier = panel < j
    v_ptr = vs + j * stride
    w_ptr = ws + j * stride
    # p, and the dot products of the earlier reflectors with v.
    wv = tl.zeros([PANEL], tl.float64)
    vv = tl.zeros([PANEL], tl.float64)
    for c in range(0, m, WIDE):
        at = c + lanes
        live = at < m
        local = at - j - 1
        inside = (local >= 0) & live
        p = tl.load(mirrored_part + local, mask=inside, other=0.0)
        for t0 in range(0, tiles, PANEL):
            t = t0 + panel
            own = (t < tiles)[:, None] & inside[None, :] & (t[:, None] <= local[None, :] // COLS)
            p += tl.sum(tl.load(parts + t[:, None] * stride + local[None, :], mask=own,
                                other=0.0), axis=0)
        tl.store(w_ptr + at, p, mask=live)
        v = tl.load(v_ptr + at, mask=live, other=0.0)
        both = earlier[:, None] & live[None, :]
        at_panel = panel[:, None] * stride + at[None, :]
        wv += tl.sum(tl.load(ws + at_panel, mask=both, other=0.0) * v[None, :], axis=1)
        vv += tl.sum(tl.load(vs + at_panel, mask=both, other=0.0) * v[None, :], axis=1)
    tl.debug_barrier()
    vp = _zero()
    for c in range(0, m, WIDE):
        at = c + lanes
        live = at < m
        both = earlier[:, None] & live[None, :]
        at_panel = panel[:, None] * stride + at[None, :]
        p = tl.load(w_ptr + at, mask=live, other=0.0)
        p -= 2.0 * tl.sum(tl.load(vs + at_panel, mask=both, other=0.0) * wv[:, None] +
                          tl.load(ws + at_panel, mask=both, other=0.0) * vv[:, None], axis=0)
        tl.store(w_ptr + at, p, mask=live)
        vp += tl.sum(tl.load(v_ptr + at, mask=live, other=0.0) * p, axis=0)
    tl.debug_barrier()
    for c in range(0, m, WIDE):
        at = c + lanes
        live = at < m
        w = tl.load(w_ptr + at, mask=live, other=0.0) - vp * tl.load(v_ptr + at, mask=live,
                                                                      other=0.0)
        tl.store(w_ptr + at, tl.where(at > j, w, 0.0), mask=live)


@triton.jit
def _scratch(scratch_ptr, pid, stride, tiles, PANEL: tl.constexpr):
    """A program's scratch: the panel's reflectors V and W (PANEL rows each, in the panel's
    coordinates), the next panel's first reflector, a column, then p's parts: the mirrored one
    and one per column tile."""
    vs = scratch_ptr + pid * (2 * PANEL + 3 + tiles) * stride
    ws = vs + PANEL * stride
    ahead = vs + 2 * PANEL * stride
    return vs, ws, ahead, ahead + stride, ahead + 2 * stride, ahead + 3 * stride


@triton.jit(do_not_specialize=["tiles"])
def reduce_panel(a_ptr, offsets_ptr, sizes_ptr, d_ptr, e_ptr, scratch_ptr, stride, tiles, s0,
                 ROWS: tl.constexpr, COLS: tl.constexpr, PANEL: tl.constexpr,
                 CHUNK: tl.constexpr, WIDE: tl.constexpr):
    """The panel of columns s0 .. s0 + PANEL - 1 of each matrix (one program per matrix):
    its reflectors V, W, its part of d and e, and the next panel's first reflector. The block
    at (s0, s0) stays as it was at the panel's start; :func:`update_trailing` updates it."""
    pid = tl.program_id(0)
    n = tl.load(sizes_ptr + pid)
    if s0 < n:
        m = n - s0
        block = a_ptr + tl.load(offsets_ptr + pid) + s0 * n + s0
        d = d_ptr + pid * stride
        e = e_ptr + pid * stride
        vs, ws, ahead, work, mirrored_part, parts = _scratch(scratch_ptr, pid, stride, tiles,
                                                             PANEL)
        lanes = tl.arange(0, CHUNK)
        for j in range(0, tl.minimum(PANEL, m)):
            s = s0 + j
            if (j == 0) & (s0 > 0):
                # The last trailing update computed d[s], e[s], the reflector and p's parts.
                for c in range(0, m, CHUNK):
                    at = c + lanes
                    tl.store(vs + at, tl.load(ahead + at, mask=at < m, other=0.0),
                             mask=at < m)
            else:
                _next_reflector(block, n, j, m, s, vs, ws, stride, j, work, d, e,
                                vs + j * stride, 0, PANEL, CHUNK, WIDE)
            tl.debug_barrier()
            if (s < n - 2) & ((j > 0) | (s0 == 0)):
                for c in range(0, m - j - 1, COLS):
                    _column_tile(block + (j + 1) * n + j + 1, n, m - j - 1, c,
                                 vs + j * stride + j + 1, parts, mirrored_part, stride, vs, ws,
                                 False, PANEL, ROWS, COLS)
                tl.debug_barrier()
            if s < n - 2:
                _panel_w(j, m, vs, ws, stride, parts, mirrored_part, tiles, COLS, PANEL, WIDE)
            else:
                for c in range(0, m, CHUNK):
                    at = c + lanes
                    tl.store(ws + j * stride + at, tl.zeros([CHUNK], tl.float64), mask=at < m)
            tl.debug_barrier()
        if s0 + PANEL < n:
            # The next panel's first column and reflector, in its coordinates (PANEL rows
            # down): the trailing update multiplies by it.
            _next_reflector(block, n, PANEL, m, s0 + PANEL, vs, ws, stride, PANEL, work, d,
                            e, ahead - PANEL, PANEL, PANEL, CHUNK, WIDE)


@triton.jit(do_not_specialize=["tiles"])
def update_trailing(a_ptr, offsets_ptr, sizes_ptr, scratch_ptr, stride, tiles, s0,
                    ROWS: tl.constexpr, COLS: tl.constexpr, PANEL: tl.constexpr):
    """After :func:`reduce_panel` at s0: the block below and right of the next panel's first
    column takes the panel's update, and its product with the next reflector is left in the
    parts. One program per (matrix, column tile)."""
    pid = tl.program_id(0)
    c = tl.program_id(1) * COLS
    n = tl.load(sizes_ptr + pid)
    size = n - s0 - PANEL - 1
    if c < size:
        start = s0 + PANEL + 1
        block = a_ptr + tl.load(offsets_ptr + pid) + start * n + start
        vs, ws, ahead, work, mirrored_part, parts = _scratch(scratch_ptr, pid, stride, tiles,
                                                             PANEL)
        _column_tile(block, n, size, c, ahead + 1, parts, mirrored_part, stride,
                     vs + PANEL + 1, ws + PANEL + 1, True, PANEL, ROWS, COLS)


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
