"""Pure tensor functions at the core of the experiment: importance scores, top-k selection in
raster order, splicing the kept visual rows into the embedded prompt, and their spectra.

No I/O here; every function is unit-tested on tiny tensors.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

from vtkit.defaults import SCORERS  # noqa: F401  (defined where the CLI reads it without torch)


def l2_scores(projected: torch.Tensor) -> torch.Tensor:
    """L2 norm of each projected image feature: [B, N, D] -> [B, N] float32."""
    return torch.linalg.vector_norm(projected.float(), dim=-1)


def random_scores(question_id: str, num_patches: int, seed: int) -> np.ndarray:
    """Seeded random scores for one question, [N] float32.

    Seeded from (seed, question id) rather than from a running generator, so a question gets the
    same scores whatever the batch, the resume point or the rank that computes it.
    """
    digest = hashlib.sha256(f"{seed}:{question_id}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    return rng.random(num_patches, dtype=np.float32)


def uniform_ranking(grid: int) -> np.ndarray:
    """A ranking of the grid x grid patches whose every prefix is spread evenly over the grid.

    The first ceil(grid/2)^2 entries are the patches with even row and column (so no two of them
    touch, diagonals included); within that lattice and then among the rest, farthest-point
    sampling orders patches coarse to fine, ties going to the lower raster index.
    """
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    coords = np.stack([rows, cols], axis=1).astype(np.float64)
    lattice = (rows % 2 == 0) & (cols % 2 == 0)
    order: list[int] = []
    dist = np.full(grid * grid, np.inf)
    for pool in (np.flatnonzero(lattice), np.flatnonzero(~lattice)):
        remaining = np.zeros(grid * grid, dtype=bool)
        remaining[pool] = True
        if not order:
            # Start at the patch nearest the centre, so small k are centred and symmetric.
            centre = (grid - 1) / 2.0
            first = pool[np.argmin(((coords[pool] - centre) ** 2).sum(1))]
            order.append(int(first))
            remaining[first] = False
            dist = np.minimum(dist, ((coords - coords[first]) ** 2).sum(1))
        while remaining.any():
            candidates = np.where(remaining, dist, -1.0)
            nxt = int(np.argmax(candidates))
            order.append(nxt)
            remaining[nxt] = False
            dist = np.minimum(dist, ((coords - coords[nxt]) ** 2).sum(1))
    return np.asarray(order, dtype=np.int64)


def uniform_scores(num_patches: int) -> np.ndarray:
    """Scores whose descending order is :func:`uniform_ranking` ([N] float32, N a square)."""
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise ValueError(f"uniform scorer needs a square patch grid, got {num_patches} patches")
    scores = np.empty(num_patches, dtype=np.float32)
    scores[uniform_ranking(grid)] = np.arange(num_patches, 0, -1, dtype=np.float32)
    return scores


def top_k_raster(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores per row, sorted ascending (raster order): [B, N] -> [B, k].

    A stable descending sort breaks ties toward the lower index on every device, so the kept set
    never depends on the kernel that ran it.
    """
    num = scores.shape[-1]
    if not 1 <= k <= num:
        raise ValueError(f"k={k} is outside 1..{num} (the number of visual tokens)")
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.sort(order, dim=-1).values


def gather_rows(features: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Rows ``indices`` [B, k] of ``features`` [B, N, D] -> [B, k, D]."""
    return torch.gather(features, 1, indices.unsqueeze(-1).expand(-1, -1, features.shape[-1]))


def token_grid(min_tokens: int, max_tokens: int, step: int) -> list[int]:
    """The sweep's k values: max first, then every multiple of step below max, down to min.

    ``token_grid(20, 576, 10)`` -> [576, 570, 560, ..., 30, 20] (57 values).
    """
    if step < 1:
        raise ValueError("step must be at least 1")
    if min_tokens < 1 or min_tokens > max_tokens:
        raise ValueError(f"need 1 <= min ({min_tokens}) <= max ({max_tokens})")
    grid = [max_tokens]
    k = (max_tokens - 1) // step * step
    while k >= min_tokens:
        grid.append(k)
        k -= step
    return grid


def splice_sequence(prefix: torch.Tensor, visual: torch.Tensor,
                    suffix: torch.Tensor) -> torch.Tensor:
    """The embedded prompt with the kept visual rows in place of the image placeholder.

    ``prefix`` [Lp, D] and ``suffix`` [Ls, D] are the embedded text around the placeholder;
    ``visual`` [k, D]. The kept rows take consecutive positions: the sequence is rebuilt.
    """
    return torch.cat([prefix, visual.to(prefix.dtype), suffix], dim=0)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device``, through pinned memory on CUDA so that the copy does
    not wait for the kernels already queued (a copy from pageable memory waits for them all,
    and the host then runs behind the GPU instead of ahead of it)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def left_pad(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad embedded sequences [L_i, D] into a batch.

    Returns (inputs_embeds [B, L, D], attention_mask [B, L] long, position_ids [B, L]); padded
    slots hold zeros, are masked out, and every row's real tokens get positions 0..L_i-1, as
    they would unbatched.
    """
    lengths = [int(s.shape[0]) for s in sequences]
    longest = max(lengths)
    first = sequences[0]
    embeds = first.new_zeros((len(sequences), longest, first.shape[-1]))
    mask = torch.zeros((len(sequences), longest), dtype=torch.long, device=first.device)
    for row, (seq, length) in enumerate(zip(sequences, lengths, strict=True)):
        embeds[row, longest - length:] = seq
        mask[row, longest - length:] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return embeds, mask, positions


def gram_matrices(matrices: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The smaller Gram matrix of each [k, D] matrix, in float64: [B, k, D] -> [B, m, m]
    (written into ``out`` when given).

    m = min(k, D). Its eigenvalues are the squared singular values; zero rows (a shorter
    matrix padded to k) only add zero eigenvalues.
    """
    x = matrices.double()
    if x.shape[1] <= x.shape[2]:
        return torch.matmul(x, x.transpose(1, 2), out=out)
    return torch.matmul(x.transpose(1, 2), x, out=out)


def spectra_from_gram(gram: np.ndarray) -> np.ndarray:
    """Singular values (descending, float32) from Gram matrices: [B, m, m] -> [B, m].

    Float64 eigenvalues by LAPACK: exact enough for relative thresholds far below 1e-6. (GPU
    runs find them on the device instead: :mod:`vtkit.eigen`.)
    """
    values = np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0.0, None))[:, ::-1]
    return np.ascontiguousarray(values, dtype=np.float32)


def singular_values(matrices: torch.Tensor) -> torch.Tensor:
    """Singular values of each [k, D] matrix, descending: [B, k, D] -> [B, min(k, D)] float32."""
    eig = torch.linalg.eigvalsh(gram_matrices(matrices)).clamp(min=0).sqrt()
    return eig.flip(-1).float()
