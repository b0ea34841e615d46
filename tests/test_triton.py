"""The Triton kernels, run on CPU by Triton's interpreter, against the eager oracle and the torch backend.

``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates, so the variable is set before the kernel
module is first imported (and the module reloaded if something imported it without the interpreter).
Shapes stay tiny: under the interpreter every program is numpy code.
"""

from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import TEXT  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from kernel_helpers import assert_same, make_qkv  # noqa: E402

from headlab.errors import InputError  # noqa: E402
from headlab.kernels import (  # noqa: E402
    MaskSpec,
    StatsRequest,
    attention_with_stats,
    eager_attention_with_stats,
    resolve_backend,
    torch_attention_with_stats,
    triton_backend,
    triton_kernels,
)

if not triton_backend.INTERPRETED:
    importlib.reload(triton_kernels)
    importlib.reload(triton_backend)
run_triton = triton_backend.triton_attention_with_stats

def padding_both_sides(batch, n):
    padding = torch.ones(batch, n, dtype=torch.bool)
    padding[0, n - 4:] = False  # right padding
    if batch > 1:
        padding[1, :3] = False  # left padding
    return padding


def full_request(batch, n_k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(-1, 3, (batch, n_k), generator=gen)  # -1: a key in no group
    return StatsRequest(distance=True, key_groups=labels, n_groups=3, group_outputs=True, query_group=1)


def test_hand_computed_two_keys_with_sink():
    # One query, keys with logits 0 and ln 3, a sink with logit ln 4: probabilities 1/8, 3/8 (sink 1/2).
    q = torch.tensor([[[[1.0]]]])
    k = torch.tensor([[[[0.0], [math.log(3.0)]]]])
    v = torch.tensor([[[[10.0], [2.0]]]])
    out, stats = run_triton(q, k, v, MaskSpec(causal=False), 1.0, torch.tensor([math.log(4.0)]))
    assert out.item() == pytest.approx(10 / 8 + 2 * 3 / 8)
    assert stats.lse.item() == pytest.approx(math.log(8.0))
    assert stats.entropy.item() == pytest.approx(-(math.log(1 / 8) / 8 + 3 * math.log(3 / 8) / 8))
    assert stats.key_mass[0, 0].tolist() == pytest.approx([1 / 8, 3 / 8])
    assert stats.first_mass.item() == pytest.approx(1 / 8)


@pytest.mark.parametrize("causal,window,sinks", [(True, None, False), (True, 5, True), (False, None, True),
                                                 (False, 6, False)])
def test_every_statistic_matches_eager_fp32(causal, window, sinks):
    # 37 = two full blocks of 16 and a partial one; GQA 4 heads on 2 kv heads; padding on both sides.
    q, k, v = make_qkv(2, 4, 2, 37, 37, 16)
    padding = padding_both_sides(2, 37)
    mask = MaskSpec(causal=causal, window=window, key_padding=padding, query_valid=padding)
    sink_logits = torch.linspace(-1.0, 1.0, 4) if sinks else None
    request = full_request(2, 37)
    want = eager_attention_with_stats(q, k, v, mask, 0.3, sink_logits, request=request)
    assert_same(run_triton(q, k, v, mask, 0.3, sink_logits, request=request), want, atol=1e-5)


def test_torch_and_triton_agree_on_the_same_inputs():
    q, k, v = make_qkv(2, 6, 2, 29, 29, 32, seed=3)
    padding = padding_both_sides(2, 29)
    mask = MaskSpec(causal=True, key_padding=padding, query_valid=padding)
    request = full_request(2, 29, seed=1)
    sinks = torch.linspace(0.5, -0.5, 6)
    assert_same(run_triton(q, k, v, mask, 0.2, sinks, request=request),
                torch_attention_with_stats(q, k, v, mask, 0.2, sinks, request=request, chunk_size=5), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_eager(dtype):
    q, k, v = make_qkv(1, 4, 2, 21, 21, 32, dtype=dtype)
    mask = MaskSpec(causal=True)
    request = StatsRequest(key_groups=(torch.arange(21) % 2)[None], n_groups=2, group_outputs=True)
    got = run_triton(q, k, v, mask, 32 ** -0.5, request=request)
    assert got[0].dtype == dtype and got[1].group_out.dtype == dtype
    assert_same(got, eager_attention_with_stats(q, k, v, mask, 32 ** -0.5, request=request), atol=2e-2)


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_head_dims(head_dim):
    # Non-powers of two (80, 96) run in padded tiles; one block of queries keeps this cheap.
    q, k, v = make_qkv(1, 2, 1, 6, 6, head_dim, seed=head_dim)
    mask = MaskSpec(causal=True)
    assert_same(run_triton(q, k, v, mask, head_dim ** -0.5),
                eager_attention_with_stats(q, k, v, mask, head_dim ** -0.5), atol=1e-5)


def test_decode_step_far_from_the_start_bins_long_distances():
    # One query at absolute position 599 over a left-padded cache: distances up to 599 reach bin 17.
    q, k, v = make_qkv(2, 2, 1, 1, 600, 16, seed=5)
    padding = torch.ones(2, 600, dtype=torch.bool)
    padding[1, :7] = False
    mask = MaskSpec(causal=True, q_offset=599, key_padding=padding)
    request = StatsRequest(distance=True)
    got = run_triton(q, k, v, mask, 0.25, request=request)
    assert_same(got, eager_attention_with_stats(q, k, v, mask, 0.25, request=request), atol=1e-5)
    assert got[1].distance_count[0, 0].sum() == 600 and got[1].distance_count[1, 0].sum() == 593
    assert got[1].first_key.tolist() == [0, 7]


def test_rows_without_visible_keys_give_zero_not_nan():
    q, k, v = make_qkv(1, 2, 2, 20, 20, 16)
    padding = torch.zeros(1, 20, dtype=torch.bool)
    padding[0, 18:] = True  # rows 0..17 see nothing under the causal mask
    sinks = torch.tensor([0.5, -0.5])
    for s in (None, sinks):
        out, stats = run_triton(q, k, v, MaskSpec(causal=True, key_padding=padding), 0.3, s)
        assert torch.isfinite(out).all() and out[0, :, :18].abs().max() == 0
        assert stats.row_counted[0].tolist() == [False] * 18 + [True, True]
        assert torch.isfinite(stats.entropy).all() and stats.entropy[0, :, :18].abs().max() == 0
        want_lse = float("-inf") if s is None else s[:, None].expand(2, 18)
        torch.testing.assert_close(stats.lse[0, :, :18], torch.as_tensor(want_lse).expand(2, 18))


def test_eager_group_statistics_equal_brute_force():
    # The oracle itself: group masses and partial outputs by explicit sums over the probabilities.
    q, k, v = make_qkv(1, 2, 1, 5, 5, 4, seed=6)
    labels = torch.tensor([[0, 2, -1, 2, 1]])
    mask = MaskSpec(causal=True)
    _, stats = eager_attention_with_stats(q, k, v, mask, 0.5, request=StatsRequest(key_groups=labels,
                                                                                    group_outputs=True))
    probs = torch.softmax((q @ k.transpose(-1, -2) * 0.5).masked_fill(torch.ones(5, 5).triu(1).bool(), -torch.inf),
                          dim=-1)
    for g in range(3):
        keys = [j for j in range(5) if labels[0, j] == g]
        torch.testing.assert_close(stats.group_mass[..., g], probs[..., keys].sum(-1))
        torch.testing.assert_close(stats.group_out[..., g, :], probs[..., keys] @ v[0, 0, keys])


def test_group_outputs_recombine_into_the_output():
    # Every key labelled: the partial outputs add up to O, and the group masses plus the sink mass to one.
    q, k, v = make_qkv(1, 2, 1, 18, 18, 16, seed=2)
    sinks = torch.tensor([1.0, -2.0])
    request = StatsRequest(key_groups=(torch.arange(18) % 3)[None], group_outputs=True)
    out, stats = run_triton(q, k, v, MaskSpec(causal=True), 0.3, sinks, request=request)
    torch.testing.assert_close(stats.group_out.sum(3), out, atol=1e-5, rtol=1e-5)
    sink_mass = torch.exp(sinks[None, :, None] - stats.lse)
    torch.testing.assert_close(stats.group_mass.sum(-1) + sink_mass, torch.ones_like(sink_mass))


def test_query_group_restricts_the_column_sums():
    # Queries labelled 1 only: the column sums equal those of the unrestricted run with other rows invalid.
    q, k, v = make_qkv(1, 2, 2, 17, 17, 16, seed=4)
    labels = torch.tensor([[0, 1, 1, 0, 2, 1, 1, 1, 0, 0, 2, 1, 1, 0, 1, 1, 2]])
    restricted = run_triton(q, k, v, MaskSpec(causal=True), 0.3,
                            request=StatsRequest(distance=True, key_groups=labels, query_group=1))[1]
    only_ones = MaskSpec(causal=True, query_valid=labels == 1)
    plain = run_triton(q, k, v, only_ones, 0.3, request=StatsRequest(distance=True))[1]
    for name in ("key_mass", "key_count", "distance_mass", "distance_count"):
        torch.testing.assert_close(getattr(restricted, name), getattr(plain, name), msg=name)
    assert restricted.row_counted.all()


def test_row_mask_falls_back_to_torch():
    q, k, v = make_qkv(1, 2, 1, 5, 9, 8)

    def row_mask(start, stop):
        allowed = torch.ones(1, 1, stop - start, 9, dtype=torch.bool)
        allowed[..., 2] = False
        return allowed

    mask = MaskSpec(causal=True, q_offset=4, row_mask=row_mask)
    assert_same(run_triton(q, k, v, mask, 0.3), eager_attention_with_stats(q, k, v, mask, 0.3), atol=1e-5)


def test_dispatch_picks_triton_on_request_and_by_device(monkeypatch):
    assert resolve_backend(torch.device("cuda")) == "triton"
    assert resolve_backend(torch.device("cpu")) == "torch"
    q, k, v = make_qkv(1, 2, 1, 4, 4, 8)
    monkeypatch.setenv("HEADLAB_ATTN_BACKEND", "triton")
    calls = []
    monkeypatch.setattr(triton_backend, "_check_device", lambda t: calls.append(t.device))
    out, _ = attention_with_stats(q, k, v, causal=True)
    assert calls == [torch.device("cpu")]
    torch.testing.assert_close(out, eager_attention_with_stats(q, k, v, MaskSpec(causal=True), 8 ** -0.5)[0])


def test_clear_errors(monkeypatch):
    q, k, v = make_qkv(1, 2, 1, 4, 4, 8)
    with pytest.raises(InputError, match="need key labels"):
        run_triton(q, k, v, MaskSpec(), 0.3, request=StatsRequest(group_outputs=True))
    with pytest.raises(InputError, match=r"key_groups must be \[batch, key\]"):
        run_triton(q, k, v, MaskSpec(), 0.3, request=StatsRequest(key_groups=torch.zeros(1, 3, dtype=torch.long)))
    with pytest.raises(InputError, match="run past the 4 keys"):
        run_triton(q, k, v, MaskSpec(q_offset=2), 0.3,
                   request=StatsRequest(key_groups=torch.zeros(1, 4, dtype=torch.long), query_group=0))
    monkeypatch.setattr(triton_backend, "INTERPRETED", False)
    with pytest.raises(InputError, match="needs CUDA tensors"):
        run_triton(q, k, v, MaskSpec(), 0.3)


def test_probe_runs_the_triton_backend_unchanged(load_model, monkeypatch):
    from headlab.kernels import BACKENDS
    from headlab.probes import AttentionProbe

    calls = []
    monkeypatch.setitem(BACKENDS, "triton", lambda *a, **kw: calls.append(1) or run_triton(*a, **kw))
    loaded = load_model("tiny-llama")
    tok = loaded.text_tokenizer
    enc = tok(TEXT[1:], return_tensors="pt", padding=True)
    got, want = {}, {}
    with torch.no_grad():
        for backend, store in (("triton", got), ("torch", want)):
            with AttentionProbe(loaded, backend=backend, layers=[0, 1]) as probe:
                logits = loaded.model(**enc).logits
            store.update(probe.last, logits=logits)
    assert len(calls) == 2  # layers 0 and 1 went through the Triton kernels
    torch.testing.assert_close(got.pop("logits"), want.pop("logits"), atol=1e-4, rtol=1e-4)
    for layer in (0, 1):
        for name in ("lse", "entropy", "key_mass", "key_count", "first_mass"):
            a, b = getattr(got[layer], name), getattr(want[layer], name)
            finite = torch.isfinite(b)
            torch.testing.assert_close(a[finite], b[finite], atol=1e-5, rtol=1e-5)


@settings(max_examples=12, deadline=None)
@given(
    n_q=st.integers(1, 40),
    extra_keys=st.integers(0, 20),
    group=st.sampled_from([1, 2, 4]),
    causal=st.booleans(),
    window=st.one_of(st.none(), st.integers(1, 24)),
    pad=st.integers(0, 12),
    sinks=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_property_triton_equals_eager(n_q, extra_keys, group, causal, window, pad, sinks, seed):
    # extra_keys > 0 is a cache (q_offset = extra_keys); n_q = 1 with it is a decode step.
    n_k = n_q + extra_keys
    q, k, v = make_qkv(2, 2 * group, 2, n_q, n_k, 16, seed=seed)
    padding = torch.ones(2, n_k, dtype=torch.bool)
    padding[1, : min(pad, n_k - 1)] = False  # left padding of the second sequence
    mask = MaskSpec(causal=causal, window=window, q_offset=extra_keys, key_padding=padding,
                    query_valid=padding[:, extra_keys:])
    request = StatsRequest(distance=True, key_groups=torch.arange(n_k)[None] % 3 - 1, n_groups=2)
    sink_logits = torch.linspace(-1.0, 1.0, 2 * group) if sinks else None
    got = run_triton(q, k, v, mask, 0.3, sink_logits, request=request)
    assert_same(got, eager_attention_with_stats(q, k, v, mask, 0.3, sink_logits, request=request), atol=1e-5)


GPU_CHECK = """
import torch
from headlab.kernels import MaskSpec, StatsRequest, eager_attention_with_stats
from headlab.kernels.triton_backend import triton_attention_with_stats
for dtype, atol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-2)):
    for dim in (64, 80, 96, 128, 256):
        g = torch.Generator(device="cuda").manual_seed(dim)
        q = torch.randn(2, 8, 300, dim, device="cuda", generator=g).to(dtype)
        k = torch.randn(2, 2, 300, dim, device="cuda", generator=g).to(dtype)
        v = torch.randn(2, 2, 300, dim, device="cuda", generator=g).to(dtype)
        pad = torch.ones(2, 300, dtype=torch.bool, device="cuda"); pad[1, :17] = False
        mask = MaskSpec(causal=True, window=100, key_padding=pad, query_valid=pad)
        req = StatsRequest(distance=True, key_groups=(torch.arange(300, device="cuda") % 3)[None], n_groups=3,
                           group_outputs=True)
        sinks = torch.linspace(-1, 1, 8, device="cuda")
        a = triton_attention_with_stats(q, k, v, mask, dim ** -0.5, sinks, request=req)
        b = eager_attention_with_stats(q, k, v, mask, dim ** -0.5, sinks, request=req)
        torch.testing.assert_close(a[0].float(), b[0].float(), atol=atol, rtol=atol)
        for name in ("lse", "entropy", "key_mass", "first_mass", "distance_mass", "group_mass"):
            torch.testing.assert_close(getattr(a[1], name), getattr(b[1], name), atol=atol, rtol=atol)
print("ok")
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled kernels)")
def test_compiled_kernels_match_eager_on_gpu():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", GPU_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
