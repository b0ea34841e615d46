"""Shared by the kernel tests: seeded inputs and the backend-agreement assertion."""

from __future__ import annotations

import torch

FIELDS = ("lse", "entropy", "key_mass", "key_count", "first_mass", "distance_mass", "distance_count",
          "group_mass", "group_out")


def make_qkv(batch, heads, kv_heads, n_q, n_k, dim, dtype=torch.float32, seed=0):
    """q ``[batch, head, query, dim]``, k/v ``[batch, kv_head, key, dim]`` from a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n_q, dim, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, n_k, dim, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, n_k, dim, generator=gen).to(dtype)
    return q, k, v


def assert_same(got, want, atol):
    """Output and every statistic present in ``want`` agree; infinities (lse of empty rows) in the same places."""
    out_a, stats_a = got
    out_b, stats_b = want
    torch.testing.assert_close(out_a.float(), out_b.float(), atol=atol, rtol=atol)
    for name in FIELDS:
        x, y = getattr(stats_a, name), getattr(stats_b, name)
        if y is None:
            assert x is None, name
            continue
        assert x.shape == y.shape, name
        x, y = x.float(), y.float()
        finite = torch.isfinite(y)
        assert torch.equal(torch.isfinite(x), finite), name
        torch.testing.assert_close(x[finite], y[finite], atol=atol, rtol=atol, msg=name)
    assert torch.equal(stats_a.row_counted, stats_b.row_counted)
    assert torch.equal(stats_a.first_key, stats_b.first_key)
