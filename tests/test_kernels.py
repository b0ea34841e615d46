"""The chunked torch backend against the eager oracle, and the oracle against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_helpers import assert_same, make_qkv

from headlab.kernels import (
    MaskSpec,
    attention_with_stats,
    eager_attention_with_stats,
    torch_attention_with_stats,
)


def test_hand_computed_two_keys():
    # One query, two keys with logits 0 and ln 3: probabilities 1/4 and 3/4.
    q = torch.tensor([[[[1.0]]]])
    k = torch.tensor([[[[0.0], [math.log(3.0)]]]])
    v = torch.tensor([[[[10.0], [2.0]]]])
    mask = MaskSpec(causal=False)
    for fn in (eager_attention_with_stats, torch_attention_with_stats):
        out, stats = fn(q, k, v, mask, 1.0)
        assert out.item() == pytest.approx(0.25 * 10 + 0.75 * 2)
        assert stats.lse.item() == pytest.approx(math.log(4.0))
        assert stats.entropy.item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
        assert stats.key_mass[0, 0].tolist() == pytest.approx([0.25, 0.75])
        assert stats.first_mass.item() == pytest.approx(0.25)


def test_causal_key_count_is_number_of_later_queries():
    q, k, v = make_qkv(1, 2, 2, 6, 6, 8)
    _, stats = torch_attention_with_stats(q, k, v, MaskSpec(causal=True), 0.3)
    assert stats.key_count[0].tolist() == [6, 5, 4, 3, 2, 1]
    # Every counted row sums to one, so the masses over keys add up to the number of rows.
    assert stats.key_mass.sum(-1)[0].tolist() == pytest.approx([6.0, 6.0])


def test_output_matches_sdpa():
    q, k, v = make_qkv(2, 4, 2, 37, 37, 16)
    out, _ = attention_with_stats(q, k, v, causal=True, backend="torch", chunk_size=5)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_torch_matches_eager_fp32(causal, window, padding, heads, kv_heads):
    q, k, v = make_qkv(2, heads, kv_heads, 13, 13, 8)
    key_padding = None
    if padding:
        key_padding = torch.ones(2, 13, dtype=torch.bool)
        key_padding[0, 10:] = False  # right padding
        key_padding[1, :4] = False  # left padding
    mask = MaskSpec(causal=causal, window=window, key_padding=key_padding, query_valid=key_padding)
    sinks = torch.linspace(-1.0, 1.0, heads)
    for s in (None, sinks):
        assert_same(
            torch_attention_with_stats(q, k, v, mask, 0.35, s, chunk_size=4),
            eager_attention_with_stats(q, k, v, mask, 0.35, s),
            atol=1e-5,
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_matches_eager_half(dtype):
    q, k, v = make_qkv(1, 4, 2, 33, 33, 16, dtype=dtype)
    mask = MaskSpec(causal=True)
    assert_same(
        torch_attention_with_stats(q, k, v, mask, 0.25, chunk_size=7),
        eager_attention_with_stats(q, k, v, mask, 0.25),
        atol=2e-2,
    )


def test_decode_step_with_offset_and_row_mask():
    # One new query against 9 cached keys; an extra row mask hides key 2.
    q, k, v = make_qkv(1, 2, 1, 1, 9, 8)

    def row_mask(start, stop):
        allowed = torch.ones(1, 1, stop - start, 9, dtype=torch.bool)
        allowed[..., 2] = False
        return allowed

    mask = MaskSpec(causal=True, q_offset=8, row_mask=row_mask)
    got = torch_attention_with_stats(q, k, v, mask, 0.3)
    assert_same(got, eager_attention_with_stats(q, k, v, mask, 0.3), atol=1e-5)
    assert got[1].key_mass[0, :, 2].abs().max() == 0


def test_fully_padded_rows_give_zero_not_nan():
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8)
    padding = torch.tensor([[False, False, True, True]])
    out, stats = torch_attention_with_stats(q, k, v, MaskSpec(causal=True, key_padding=padding), 0.3)
    assert torch.isfinite(out).all()
    assert out[0, :, :2].abs().max() == 0
    assert stats.row_counted[0].tolist() == [False, False, True, True]
    assert stats.first_key.tolist() == [2]


def test_unknown_backend_is_a_clear_error(monkeypatch):
    q, k, v = make_qkv(1, 2, 2, 3, 3, 4)
    monkeypatch.setenv("HEADLAB_ATTN_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="unknown attention backend 'cuda-magic'"):
        attention_with_stats(q, k, v)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 19),
    group=st.sampled_from([1, 2, 3]),
    kv_heads=st.integers(1, 2),
    causal=st.booleans(),
    window=st.one_of(st.none(), st.integers(1, 6)),
    pad=st.integers(0, 5),
    chunk=st.integers(1, 8),
    seed=st.integers(0, 1000),
)
def test_property_torch_equals_eager(n, group, kv_heads, causal, window, pad, chunk, seed):
    q, k, v = make_qkv(2, kv_heads * group, kv_heads, n, n, 8, seed=seed)
    key_padding = torch.ones(2, n, dtype=torch.bool)
    key_padding[1, n - min(pad, n - 1):] = False if pad else True
    mask = MaskSpec(causal=causal, window=window, key_padding=key_padding, query_valid=key_padding)
    assert_same(
        torch_attention_with_stats(q, k, v, mask, 0.4, chunk_size=chunk),
        eager_attention_with_stats(q, k, v, mask, 0.4),
        atol=1e-5,
    )
