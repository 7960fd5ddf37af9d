"""The pre-LLM methods' rules (vtkit.selection) on hand-built inputs whose expected selection is
worked out by hand from each official rule, and batched == one question at a time."""

from __future__ import annotations

import math

import pytest
import torch

from vtkit.selection import (
    divprune_order,
    order_scores,
    visionzip_split,
    visionzip_tokens,
    vispruner_important,
    vispruner_keep,
)


def _unit(dim: int, i: int) -> list[float]:
    return [1.0 if j == i else 0.0 for j in range(dim)]


def test_divprune_first_pick_is_the_token_with_the_farthest_nearest_neighbour():
    # Angles 0, 10, 90, 180 degrees (lengths differ: only directions count). Nearest-neighbour
    # distances 1 - cos: 0.015, 0.015, 0.826, 1.0 -> token 3 first; then the largest distance to
    # the picked set: token 0 (2.0), then token 2 (1.0 vs 0.015), then token 1.
    angles = [0.0, 10.0, 90.0, 180.0]
    scale = [1.0, 3.0, 0.5, 2.0]
    feats = torch.tensor([[s * math.cos(math.radians(a)), s * math.sin(math.radians(a))]
                          for a, s in zip(angles, scale, strict=True)]).unsqueeze(0)
    assert divprune_order(feats).tolist() == [[3, 0, 2, 1]]


def test_divprune_ties_go_to_the_lower_index():
    # Four directions 90 degrees apart: every nearest distance is 1 (tie: token 0); then token 2
    # at distance 2; then tokens 1 and 3 both at 1 from the set (tie: token 1).
    feats = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]])
    assert divprune_order(feats).tolist() == [[0, 2, 1, 3]]


def test_divprune_never_repeats_a_token_among_duplicates():
    feats = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [2.0, 0.0], [0.0, 1.0]]])
    order = divprune_order(feats)[0].tolist()
    assert sorted(order) == [0, 1, 2, 3]
    assert order[:2] == [3, 0]


def test_order_scores_rank_in_pick_order():
    order = torch.tensor([[2, 0, 3, 1]])
    scores = order_scores(order)
    assert scores.tolist() == [[3.0, 1.0, 4.0, 2.0]]
    assert torch.sort(scores, descending=True, stable=True).indices.tolist() == order.tolist()


def test_vispruner_one_round_drops_the_even_positions_most_like_an_odd_one():
    # Nine tokens; attention puts token 5 first (important = 1), then 4, 3, 2, 1, 0, 6, 7, 8.
    # k = 7: six diverse tokens out of eight -> one round dropping 2. Even positions of the
    # residual: tokens 4, 2, 0, 7; odd: 3, 1, 6, 8. Largest cosine to an odd token: token 2 1.0
    # (same as 1), token 7 0.9 (to 8), token 4 0.5 (to 3), token 0 0.3 (to 6): 2 and 7 go.
    attention = torch.tensor([[0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.3, 0.2, 0.1]])
    e = lambda i: torch.tensor(_unit(5, i))  # noqa: E731
    rest = math.sqrt(1 - 0.81)
    feats = torch.stack([
        0.3 * e(2) + math.sqrt(0.91) * e(4),    # 0
        e(1),                                   # 1
        e(1),                                   # 2
        e(0),                                   # 3
        0.5 * e(0) + math.sqrt(0.75) * e(4),    # 4
        e(4),                                   # 5
        e(2),                                   # 6
        0.9 * e(3) + rest * e(4),               # 7
        e(3),                                   # 8
    ]).unsqueeze(0)
    assert vispruner_keep(attention, feats, 7, 1).tolist() == [[0, 1, 3, 4, 5, 6, 8]]


def test_vispruner_next_round_splits_survivors_then_odd_ones():
    # 18 tokens, attention descending with the index, no important token, k = 9. Round 1: the
    # even tokens 2..16 duplicate an odd one, token 0 does not: 8 go, [0, 1, 3, ..., 17] stay.
    # Round 2 (one to drop) splits that list: even positions 0, 3, 7, 11, 15; odd 1, 5, 9, 13,
    # 17; token 7 is the one like an odd one (9): it goes. Had the odd ones come first, 9 would.
    n = 18
    attention = torch.arange(n, 0, -1, dtype=torch.float32).unsqueeze(0)
    feats = torch.zeros(n, 10)
    for j in range(9):
        feats[2 * j + 1, j] = 1.0
    for j in range(1, 9):
        feats[2 * j, j - 1] = 1.0
    feats[0, 9] = 1.0
    feats[7] = torch.tensor(_unit(10, 3)) + torch.tensor(_unit(10, 4))
    kept = vispruner_keep(attention, feats.unsqueeze(0), 9, 0)
    assert kept.tolist() == [[0, 1, 3, 5, 9, 11, 13, 15, 17]]


def test_vispruner_important_only_and_all_tokens():
    attention = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
    feats = torch.eye(4).unsqueeze(0)
    assert vispruner_keep(attention, feats, 2, 2).tolist() == [[1, 3]]
    assert vispruner_keep(attention, feats, 4, 2).tolist() == [[0, 1, 2, 3]]


@pytest.mark.parametrize("num, k, important", [(9, 3, 0), (9, 2, 1), (20, 3, 1), (577, 20, 10)])
def test_vispruner_keeps_k_distinct_tokens_where_the_official_code_fails(num, k, important):
    # An odd residual, or fewer even positions than duplicates to drop, stop the official code.
    generator = torch.Generator().manual_seed(num + k)
    attention = torch.rand(2, num, generator=generator)
    feats = torch.randn(2, num, 6, generator=generator)
    kept = vispruner_keep(attention, feats, k, important)
    assert kept.shape == (2, k)
    top = torch.sort(attention, dim=-1, descending=True, stable=True).indices[:, :important]
    for row in range(2):
        assert len(set(kept[row].tolist())) == k
        assert set(top[row].tolist()) <= set(kept[row].tolist())


def test_vispruner_important_share_per_budget():
    assert [vispruner_important(k) for k in (576, 192, 128, 96, 64, 20)] == [
        288, 96, 64, 60, 48, 15]
    assert vispruner_important(100, 0.3) == 30


def test_visionzip_split_per_budget():
    assert [visionzip_split(k) for k in (64, 128, 192, 576, 20, 2, 1)] == [
        (54, 10), (108, 20), (162, 30), (486, 90), (17, 3), (1, 1), (1, 0)]
    assert visionzip_split(100, 0.5) == (50, 50)
    assert visionzip_split(10, 0.0) == (9, 1)


def test_visionzip_dominant_then_contextual_tokens():
    # Six patches: the two most attended (1 and 4) are dominant, after [CLS]; the rest in
    # raster order, 0 2 3 5, give targets at stride 4 // 2 = 2: patches 0 and 3. Patch 2's key
    # is closest to 3's, patch 5's to 0's: contextual = f0 + f5, f3 + f2.
    feats = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 4.0], [8.0, 8.0], [3.0, 3.0],
                          [0.0, 16.0]]).unsqueeze(0)
    cls = torch.tensor([[5.0, 5.0]])
    attention = torch.tensor([[0.1, 0.5, 0.1, 0.1, 0.3, 0.0]])
    keys = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.1, 1.0], [0.0, 1.0], [0.0, 0.0],
                         [1.0, 0.2]]).unsqueeze(0)
    out = visionzip_tokens(feats, cls, attention, keys, 3, 2)
    expected = [[5.0, 5.0], [2.0, 0.0], [3.0, 3.0], [1.0, 16.0], [8.0, 12.0]]
    assert out.tolist() == [expected]


def test_visionzip_contextual_is_target_plus_mean_of_members():
    # [CLS] alone is dominant; seven patches, stride 7 // 2 = 3: targets 0 and 3 (not 6). Every
    # other patch's key is closest to patch 0's: f0 + mean(f1 f2 f4 f5 f6), and f3 alone.
    feats = torch.tensor([[float(i), 10.0 * i] for i in range(7)]).unsqueeze(0)
    keys = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]] + [[1.0, 0.1]] * 3).unsqueeze(0)
    out = visionzip_tokens(feats, torch.zeros(1, 2), torch.rand(1, 7), keys, 1, 2)
    mean = (1 + 2 + 4 + 5 + 6) / 5
    torch.testing.assert_close(out, torch.tensor([[[0.0, 0.0], [mean, 10 * mean], [3.0, 30.0]]]))


def _random_signals(batch: int, num: int = 36, width: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, num, width, generator=generator),
            torch.randn(batch, width, generator=generator),
            torch.rand(batch, num, generator=generator),
            torch.randn(batch, num, 4, generator=generator))


def test_batched_equals_one_at_a_time():
    feats, cls, attention, keys = _random_signals(3)
    order = divprune_order(feats)
    kept = vispruner_keep(attention, feats, 10, 4)
    merged = visionzip_tokens(feats, cls, attention, keys, 6, 4)
    for row in range(3):
        one = slice(row, row + 1)
        assert torch.equal(divprune_order(feats[one]), order[one])
        assert torch.equal(vispruner_keep(attention[one], feats[one], 10, 4), kept[one])
        torch.testing.assert_close(
            visionzip_tokens(feats[one], cls[one], attention[one], keys[one], 6, 4), merged[one],
            rtol=1e-6, atol=1e-6)
