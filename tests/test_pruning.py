"""The pure tensor functions: grid, scorers, top-k in raster order, splicing, spectra."""

import numpy as np
import pytest
import torch

from vtkit.pruning import (
    gather_rows,
    l2_scores,
    left_pad,
    random_scores,
    singular_values,
    splice_sequence,
    token_grid,
    top_k_raster,
    uniform_ranking,
    uniform_scores,
)


def test_token_grid_matches_the_spec():
    grid = token_grid(20, 576, 10)
    assert grid[:4] == [576, 570, 560, 550]
    assert grid[-2:] == [30, 20]
    assert len(grid) == 57
    assert token_grid(20, 570, 10)[:2] == [570, 560]
    assert token_grid(5, 5, 10) == [5]
    with pytest.raises(ValueError):
        token_grid(30, 20, 10)


def test_top_k_keeps_the_highest_scores_in_raster_order():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.2], [5.0, 1.0, 4.0, 2.0, 3.0]])
    assert top_k_raster(scores, 2).tolist() == [[1, 3], [0, 2]]
    assert top_k_raster(scores, 5).tolist() == [[0, 1, 2, 3, 4]] * 2
    with pytest.raises(ValueError):
        top_k_raster(scores, 6)


def test_top_k_breaks_ties_toward_the_lower_index():
    scores = torch.ones(1, 10)
    assert top_k_raster(scores, 3).tolist() == [[0, 1, 2]]


def test_gather_rows_picks_the_kept_features():
    features = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    kept = torch.tensor([[1, 4], [0, 2]])
    out = gather_rows(features, kept)
    assert torch.equal(out[0], features[0, [1, 4]])
    assert torch.equal(out[1], features[1, [0, 2]])


def test_l2_scores_are_feature_norms():
    projected = torch.tensor([[[3.0, 4.0], [0.0, 1.0]]])
    assert l2_scores(projected).tolist() == [[5.0, 1.0]]


def test_random_scores_depend_on_seed_and_question_only():
    a = random_scores("17", 576, seed=0)
    assert np.array_equal(a, random_scores("17", 576, seed=0))
    assert not np.array_equal(a, random_scores("18", 576, seed=0))
    assert not np.array_equal(a, random_scores("17", 576, seed=1))


@pytest.mark.parametrize("k", [9, 36, 64, 100, 144])
def test_uniform_top_k_has_no_adjacent_patches(k):
    order = uniform_ranking(24)
    assert sorted(order.tolist()) == list(range(576))
    rows, cols = np.divmod(order[:k], 24)
    for i in range(k):
        near = (np.abs(rows - rows[i]) <= 1) & (np.abs(cols - cols[i]) <= 1)
        assert near.sum() == 1, f"patch {order[i]} touches another kept patch at k={k}"


def test_uniform_top_k_covers_all_quadrants():
    kept = torch.from_numpy(uniform_scores(576))[None]
    rows, cols = np.divmod(top_k_raster(kept, 20)[0].numpy(), 24)
    quadrants = {(r // 12, c // 12) for r, c in zip(rows, cols, strict=True)}
    assert quadrants == {(0, 0), (0, 1), (1, 0), (1, 1)}


def test_splice_and_left_pad_build_consecutive_positions():
    prefix, visual, suffix = torch.ones(3, 4), torch.full((2, 4), 2.0), torch.full((1, 4), 3.0)
    seq = splice_sequence(prefix, visual, suffix)
    assert seq[:, 0].tolist() == [1, 1, 1, 2, 2, 3]
    embeds, mask, positions = left_pad([seq, torch.ones(2, 4)])
    assert embeds.shape == (2, 6, 4)
    assert mask.tolist() == [[1] * 6, [0, 0, 0, 0, 1, 1]]
    assert positions[0].tolist() == [0, 1, 2, 3, 4, 5]
    assert positions[1, -2:].tolist() == [0, 1]
    assert torch.equal(embeds[1, :4], torch.zeros(4, 4))


@pytest.mark.parametrize("shape", [(3, 20, 64), (2, 80, 16)])
def test_singular_values_match_numpy_float64(shape):
    torch.manual_seed(0)
    x = torch.randn(*shape)
    x[0, :, : shape[2] // 2] *= 1e-3   # spread the spectrum
    ours = singular_values(x).numpy()
    for b in range(shape[0]):
        ref = np.linalg.svd(x[b].double().numpy(), compute_uv=False)
        assert ours[b].shape == ref.shape
        np.testing.assert_allclose(ours[b], ref, rtol=0, atol=1e-4 * ref[0])
