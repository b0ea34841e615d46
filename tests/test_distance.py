"""Attention mass by query-key distance: bins, the eager oracle against brute force, torch against eager."""

from __future__ import annotations

import pytest
import torch

from headlab.kernels import (
    MaskSpec,
    StatsRequest,
    attention_probs,
    distance_bin_edges,
    distance_bins,
    eager_attention_with_stats,
    torch_attention_with_stats,
)
from headlab.kernels.stats import distance_shape

DISTANCE = StatsRequest(distance=True)


def qkv(batch, heads, kv_heads, n_q, n_k, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, n_q, dim, generator=gen), torch.randn(batch, kv_heads, n_k, dim, generator=gen),
            torch.randn(batch, kv_heads, n_k, dim, generator=gen))


def test_bins_follow_their_edges():
    distances = torch.arange(0, 5000)
    bins = distance_bins(distances)
    edges = distance_bin_edges(int(bins.max()) + 2)
    assert edges[:10] == [0, 1, 2, 3, 4, 6, 8, 12, 16, 24]
    for d, b in zip(distances.tolist(), bins.tolist(), strict=True):
        assert edges[b] <= d < edges[b + 1]
    assert distance_shape(32768, 32768, 0) == 30  # 32k tokens: 30 bins per side


def test_eager_distance_equals_brute_force():
    q, k, v = qkv(2, 3, 3, 9, 9)
    padding = torch.ones(2, 9, dtype=torch.bool)
    padding[1, 6:] = False
    mask = MaskSpec(causal=False, key_padding=padding, query_valid=padding)
    _, stats = eager_attention_with_stats(q, k, v, mask, 8 ** -0.5, request=DISTANCE)
    probs, _, allowed = attention_probs(q, k, mask, 8 ** -0.5)
    n_bins = stats.distance_mass.shape[-1]
    mass = torch.zeros(2, 3, 2, n_bins)
    count = torch.zeros(2, 2, n_bins)
    for b in range(2):
        for i in range(9):
            if not padding[b, i]:
                continue
            for j in range(9):
                if not allowed[b, 0, i, j]:
                    continue
                side, d = (0, i - j) if j <= i else (1, j - i)
                bin_ = int(distance_bins(torch.tensor(d)))
                mass[b, :, side, bin_] += probs[b, :, i, j]
                count[b, side, bin_] += 1
    torch.testing.assert_close(stats.distance_mass, mass)
    torch.testing.assert_close(stats.distance_count, count)


@pytest.mark.parametrize("causal,window,q_offset", [(True, None, 0), (True, 4, 0), (False, None, 0), (True, None, 5)])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 1)])
def test_torch_distance_matches_eager(causal, window, q_offset, heads, kv_heads):
    n_q, n_k = 23 - q_offset, 23
    q, k, v = qkv(2, heads, kv_heads, n_q, n_k, seed=q_offset + heads)
    padding = torch.ones(2, n_k, dtype=torch.bool)
    padding[0, :3] = False  # left padding in one row
    valid = padding[:, q_offset:]
    mask = MaskSpec(causal=causal, window=window, q_offset=q_offset, key_padding=padding, query_valid=valid)
    _, oracle = eager_attention_with_stats(q, k, v, mask, 0.3, request=DISTANCE)
    _, fast = torch_attention_with_stats(q, k, v, mask, 0.3, request=DISTANCE, chunk_size=5)
    torch.testing.assert_close(fast.distance_mass, oracle.distance_mass, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.distance_count, oracle.distance_count)
    # Every counted row's mass lands in exactly one bin: the bins add up to the key sums.
    torch.testing.assert_close(fast.distance_mass.sum((-2, -1)), fast.key_mass.sum(-1), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(fast.distance_count.sum((-2, -1)), fast.key_count.sum(-1))
    if causal:
        assert fast.distance_mass[:, :, 1].abs().max() == 0


def test_distance_is_off_unless_asked():
    q, k, v = qkv(1, 2, 2, 6, 6)
    _, stats = torch_attention_with_stats(q, k, v, MaskSpec(), 0.3)
    assert stats.distance_mass is None and stats.distance_count is None
