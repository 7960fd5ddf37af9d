"""The selection rules of the published pre-LLM pruning methods, as pure tensor functions.

DivPrune (vbdi/divprune), VisPruner (Theia-4869/VisPruner) and VisionZip
(dvlab-research/VisionZip), each written from the rule of its official code; docs/scorers.md
says where vtkit departs from that code and why. Every function is batched over questions (one
k per call) and computes in float32; ties always go to the lower index, so a result does not
depend on the batch or the device. No I/O here.
"""

from __future__ import annotations

import math

import torch

#: VisPruner's important share where its README gives one: 0.5 at 128 tokens (also the
#: scripts' default), 0.75 at 64.
VISPRUNER_RATIOS = ((128, 0.5), (64, 0.75))
#: VisionZip's contextual share: its README keeps 54 dominant + 10 contextual tokens of 64.
VISIONZIP_CONTEXTUAL_RATIO = 10 / 64
#: VisPruner drops at most this many duplicates per round.
VISPRUNER_ROUND = 8


def _descending(values: torch.Tensor) -> torch.Tensor:
    """Indices sorting each row descending; equal values keep the lower index first."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices


def _take(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` [B, m] of ``values`` [B, N, D] -> [B, m, D]."""
    return torch.gather(values, 1, index.unsqueeze(-1).expand(-1, -1, values.shape[-1]))


def _unit(values: torch.Tensor) -> torch.Tensor:
    values = values.float()
    return values / torch.linalg.vector_norm(values, dim=-1, keepdim=True)


def divprune_order(projected: torch.Tensor) -> torch.Tensor:
    """DivPrune's pick order of all N tokens: [B, N, D] -> [B, N] (long).

    Distances are 1 - cosine of the projected features. The first pick is the token whose
    nearest other token is farthest; each next pick is the unpicked token whose distance to the
    nearest picked one is largest. ``argmax`` ties go to the lower index. A budget k keeps the
    first k picks (in raster order): later picks never change earlier ones.
    """
    unit = _unit(projected)
    distance = 1.0 - unit @ unit.transpose(1, 2)
    batch, num = distance.shape[:2]
    rows = torch.arange(batch, device=distance.device)
    # The second-smallest entry of a column, the smallest being the token itself (0).
    nearest = distance.clone()
    nearest.diagonal(dim1=1, dim2=2).fill_(math.inf)
    pick = nearest.min(dim=1).values.argmax(dim=-1)
    order = torch.empty((batch, num), dtype=torch.long, device=distance.device)
    # Each unpicked token's distance to the nearest picked one; picked tokens hold -inf (a
    # minimum never raises it), so they are never picked again.
    closest = torch.full((batch, num), math.inf, device=distance.device)
    for step in range(num):
        order[:, step] = pick
        closest = torch.minimum(closest, distance[rows, pick])
        # scatter_ takes the value as a kernel argument; indexed assignment of a Python float
        # would copy it to the device from pageable memory and wait for the GPU, every step.
        closest.scatter_(1, pick[:, None], -math.inf)
        pick = closest.argmax(dim=-1)
    return order


def order_scores(order: torch.Tensor) -> torch.Tensor:
    """Scores whose descending order is ``order`` [B, N]: N for the first pick, down to 1."""
    num = order.shape[-1]
    ranks = torch.arange(num, 0, -1, dtype=torch.float32, device=order.device)
    return torch.empty(order.shape, dtype=torch.float32, device=order.device).scatter_(
        1, order, ranks.expand_as(order).contiguous())


def vispruner_important(k: int, ratio: float | None = None) -> int:
    """VisPruner's important-token count for budget k: ``int(k * ratio)`` as its code does.

    ``ratio`` None takes the README's share for the budget: 0.5 for k >= 128, 0.75 for k <= 64,
    linear in k between the two.
    """
    if ratio is None:
        (high_k, high), (low_k, low) = VISPRUNER_RATIOS
        ratio = high if k >= high_k else low if k <= low_k else (
            low + (high - low) * (k - low_k) / (high_k - low_k))
    return int(k * ratio)


def vispruner_keep(attention: torch.Tensor, features: torch.Tensor, k: int,
                   important: int) -> torch.Tensor:
    """VisPruner's kept tokens for budget k, in raster order: [B, N], [B, N, D] -> [B, k].

    ``attention`` is the [CLS] attention to the patches (head mean) and ``features`` the CLIP
    features whose cosine finds duplicates. The ``important`` most attended tokens are kept;
    the rest, in descending attention, lose duplicates in rounds until k - important remain:
    each round splits them by position into even and odd, scores every even one by its largest
    cosine to an odd one, drops up to 8 of the highest-scoring even ones, and continues with
    the other even ones (in descending score) followed by the odd ones.
    """
    num = attention.shape[-1]
    if not 0 <= important <= k <= num:
        raise ValueError(f"need 0 <= important ({important}) <= k ({k}) <= {num}")
    order = _descending(attention.float())
    kept, residual = order[:, :important], order[:, important:]
    diverse = k - important
    unit = _unit(features)
    while diverse > 0:
        size = residual.shape[1]
        evens, odds = residual[:, ::2], residual[:, 1::2]
        drop = min(VISPRUNER_ROUND, size - diverse, evens.shape[1])
        if drop <= 0:
            break
        similarity = (_take(unit, evens) @ _take(unit, odds).transpose(1, 2)).max(dim=-1).values
        survivors = _descending(similarity)[:, drop:]
        residual = torch.cat([torch.gather(evens, 1, survivors), odds], dim=1)
    if diverse > 0:
        kept = torch.cat([kept, residual], dim=1)
    return torch.sort(kept, dim=-1).values


def visionzip_split(k: int, ratio: float | None = None) -> tuple[int, int]:
    """(dominant, contextual) tokens of VisionZip for budget k; dominant counts the [CLS] token.

    contextual = round(k * ratio) (halves up), at least 1 and at most k - 1 for k >= 2;
    ``ratio`` None is the README's 10/64 (54 + 10 at 64, 108 + 20 at 128, 162 + 30 at 192).
    """
    ratio = VISIONZIP_CONTEXTUAL_RATIO if ratio is None else ratio
    contextual = min(max(math.floor(k * ratio + 0.5), 1), k - 1) if k >= 2 else 0
    return k - contextual, contextual


def visionzip_tokens(features: torch.Tensor, cls_feature: torch.Tensor,
                     attention: torch.Tensor, keys: torch.Tensor, dominant: int,
                     contextual: int) -> torch.Tensor:
    """VisionZip's dominant + contextual tokens in CLIP space: [B, dominant + contextual, Dv].

    ``features`` [B, N, Dv] are the CLIP patch features, ``cls_feature`` [B, Dv] the same
    layer's [CLS] hidden state, ``attention`` [B, N] its [CLS] attention to the patches and
    ``keys`` [B, N, Dk] its keys averaged over heads. Output order: [CLS], the dominant - 1 most
    attended patches in raster order, then one contextual token per target. The targets are
    taken at a stride of (remaining // contextual) through the remaining patches in raster
    order; every other remaining patch joins the target whose key is most cosine-similar, and a
    contextual token is its target's feature plus the mean of its members' (the target alone
    when none joined).
    """
    batch, num, width = features.shape
    if not 1 <= dominant <= num + 1 or contextual < 0 or dominant - 1 + contextual > num:
        raise ValueError(f"dominant={dominant}, contextual={contextual} do not fit {num} patches")
    features = features.float()
    top = _descending(attention.float())
    chosen = torch.sort(top[:, :dominant - 1], dim=-1).values
    rest = torch.sort(top[:, dominant - 1:], dim=-1).values
    parts = [cls_feature.float().unsqueeze(1), _take(features, chosen)]
    if contextual:
        remaining = rest.shape[1]
        step = max(1, remaining // contextual)
        is_target = torch.zeros(remaining, dtype=torch.bool, device=rest.device)
        is_target[torch.arange(0, remaining, step, device=rest.device)[:contextual]] = True
        targets, members = rest[:, is_target], rest[:, ~is_target]
        unit = _unit(keys)
        similarity = _take(unit, members) @ _take(unit, targets).transpose(1, 2)
        assign = torch.nn.functional.one_hot(similarity.argmax(dim=-1), contextual).float()
        counts = assign.sum(dim=1).clamp(min=1).unsqueeze(-1)
        merged = assign.transpose(1, 2) @ _take(features, members) / counts
        parts.append(_take(features, targets) + merged)
    return torch.cat(parts, dim=1)
