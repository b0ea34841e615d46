"""The torch backend's one-pass chunk body: structural masking, deferred normalisation, partial outputs of
chosen groups, chunk size in rows; each against the eager oracle (fp32 within 1e-5, bf16 within 2e-2)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_helpers import assert_same, make_qkv

from headlab.errors import InputError
from headlab.interventions import AttentionOverride, KeyKnockout, Redistribute
from headlab.interventions.attention_call import LayerPlan, PostPlan, _merged_request
from headlab.kernels import (
    MaskSpec,
    ScoreEdit,
    StatsRequest,
    eager_attention_with_stats,
    torch_attention_with_stats,
    torch_backend,
)
from headlab.kernels.fused_rows import FUSED_ENV, FusedRows
from headlab.kernels.torch_backend import pick_chunk_size, reference_shift


@pytest.fixture(scope="module", params=["on", "off"], autouse=True)
def row_pass(request):
    """Every test here runs with the compiled row pass (``on``: built, or the test fails) and with the torch
    ops (``off``), the reference it is held to."""
    with mock.patch.dict(os.environ, {FUSED_ENV: request.param}):
        yield request.param


@contextmanager
def shift_path(on: bool):
    """Send every call down the reference-shift path (``on``) or the per-chunk maximum path, whatever its size."""
    with mock.patch.object(torch_backend, "SHIFT_MIN_ROWS", 1 if on else 10**9):
        yield


@contextmanager
def count_max_passes():
    """Count the chunks that shift rows by their maximum (the fallback of the reference shift): all of them
    on the torch ops' path, those with at least one such row on the compiled pass's."""
    calls = []
    original = torch_backend._ChunkBody.subtract_max

    def counted(self, *args):
        calls.append(args[-2:])
        return original(self, *args)

    original_fused = FusedRows.run

    def counted_fused(self, *args):
        redone = original_fused(self, *args)
        scores, start, reference = args[0], args[6], args[11]
        if redone or not reference:
            calls.append((start, start + scores.shape[2]))
        return redone

    with mock.patch.object(torch_backend._ChunkBody, "subtract_max", counted), \
            mock.patch.object(FusedRows, "run", counted_fused):
        yield calls


def all_true_rows(batch: int, n_k: int):
    """A row mask that hides nothing: it sends the torch backend down the dense (whole-tile) path."""
    return lambda start, stop: torch.ones(batch, 1, stop - start, n_k, dtype=torch.bool)


@settings(max_examples=40, deadline=None)
@given(
    n_q=st.integers(1, 21),
    extra_keys=st.integers(0, 6),
    causal=st.booleans(),
    window=st.one_of(st.none(), st.integers(1, 9)),
    pad=st.integers(0, 4),
    left=st.booleans(),
    chunk=st.integers(1, 9),
    sinks=st.booleans(),
    shift=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_structured_and_dense_paths_equal_eager(n_q, extra_keys, causal, window, pad, left, chunk, sinks, shift,
                                                seed):
    """Diagonal-block masking, structural key counts and rows-with-keys from prefix sums, with a KV-cache
    offset (keys before the queries), against eager and against the dense row-mask path; exponents shifted
    by each chunk's row maximum or by the reference scores."""
    n_k = n_q + extra_keys
    q, k, v = make_qkv(2, 4, 2, n_q, n_k, 8, seed=seed)
    padding = torch.ones(2, n_k, dtype=torch.bool)
    if pad:
        if left:
            padding[1, : min(pad, n_k)] = False
        else:
            padding[1, n_k - min(pad, n_k):] = False
    valid = padding[:, extra_keys:]
    sink = torch.linspace(-1.0, 2.0, 4) if sinks else None
    request = StatsRequest(distance=True, key_groups=(torch.arange(n_k) % 3)[None], n_groups=3, group_outputs=True)
    mask = MaskSpec(causal=causal, window=window, q_offset=extra_keys, key_padding=padding, query_valid=valid)
    want = eager_attention_with_stats(q, k, v, mask, 0.4, sink, request=request)
    dense = MaskSpec(causal=causal, window=window, q_offset=extra_keys, key_padding=padding, query_valid=valid,
                     row_mask=all_true_rows(2, n_k))
    with shift_path(shift):
        assert_same(torch_attention_with_stats(q, k, v, mask, 0.4, sink, request=request, chunk_size=chunk),
                    want, 1e-5)
        assert_same(torch_attention_with_stats(q, k, v, dense, 0.4, sink, request=request, chunk_size=chunk),
                    want, 1e-5)


def test_extreme_logits_and_masked_entries():
    """Scores hundreds of nats apart (where torch.exp leaves its fast path) and a sink far above every key:
    probabilities, lse and entropy still match eager."""
    q, k, v = make_qkv(1, 4, 2, 40, 40, 16, seed=3)
    q += 1.0
    k[:, :, 5] = 25.0  # about 400 above the other keys: they sit below exp's fast range (-87) once key 5 is seen
    sinks = torch.tensor([0.0, 50.0, 400.0, -400.0])
    mask = MaskSpec(causal=True, window=17)
    want = eager_attention_with_stats(q, k, v, mask, 1.0, sinks)
    assert want[1].lse.max() - want[1].lse.min() > 200
    for shift in (False, True):
        with shift_path(shift), count_max_passes() as max_passes:
            assert_same(torch_attention_with_stats(q, k, v, mask, 1.0, sinks, chunk_size=8), want, 1e-5)
        # Key 5 sits ~400 nats above the reference keys (first and own) of rows 5..7: their chunk falls back.
        assert (0, 8) in max_passes and (len(max_passes) == 5 or shift)


def test_reference_shift_is_the_first_or_own_key_score():
    """The shift is the larger of the row's scores on its first real key and on its own key, among the
    keys the row sees; a row that sees neither gets 0 (its chunk then falls back if needed)."""
    q, k, _ = make_qkv(2, 4, 2, 6, 9, 8, seed=5)
    padding = torch.ones(2, 9, dtype=torch.bool)
    padding[1, :2] = False  # left padding: batch row 1's first real key is key 2
    padding[0, 7] = False  # row 4 of batch 0 (its own key is 7 with q_offset 3) has a padded own key
    mask = MaskSpec(causal=True, window=4, q_offset=3, key_padding=padding)
    got = reference_shift(q, k, mask, mask.first_key(2, q.device))
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(2, dim=1))
    for b in range(2):
        first = 2 * b
        for i in range(6):
            own, candidates = i + 3, []
            if own - 4 < first <= own:
                candidates.append(scores[b, :, i, first])
            if padding[b, own]:
                candidates.append(scores[b, :, i, own])
            want = torch.stack(candidates).amax(0) if candidates else torch.zeros(4)
            torch.testing.assert_close(got[b, :, i], want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_calls_take_the_reference_shift_and_match_eager(dtype):
    """A call of at least SHIFT_MIN_ROWS rows (a prefill) shifts by reference scores without a max pass;
    padding, GQA, groups, distance and sinks as in a model's forward."""
    n = torch_backend.SHIFT_MIN_ROWS + 37
    q, k, v = make_qkv(2, 6, 2, n, n, 16, dtype=dtype, seed=11)
    # Laid out as a model hands them over: [batch, token, head, dim] transposed, so heads are strided.
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    padding = torch.ones(2, n, dtype=torch.bool)
    padding[1, :9] = False
    request = StatsRequest(distance=True, key_groups=(torch.arange(n) % 3)[None], n_groups=3, group_outputs=True)
    mask = MaskSpec(causal=True, key_padding=padding, query_valid=padding)
    sinks = torch.linspace(-1.0, 1.0, 6)
    with count_max_passes() as max_passes:
        got = torch_attention_with_stats(q, k, v, mask, 0.25, sinks, request=request, chunk_size=32)
    assert max_passes == []
    assert_same(got, eager_attention_with_stats(q, k, v, mask, 0.25, sinks, request=request),
                1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_with_groups_and_edit(dtype):
    q, k, v = make_qkv(2, 6, 3, 37, 37, 16, dtype=dtype, seed=1)
    labels = (torch.arange(37) % 4)[None].expand(2, -1)
    request = StatsRequest(key_groups=labels, n_groups=4, group_outputs=True, output_groups=(0, 3))
    edit = ScoreEdit(labels, torch.full((6, 4), 1.5), torch.full((6, 4), 0.2))
    mask = MaskSpec(causal=True)
    assert_same(torch_attention_with_stats(q, k, v, mask, 0.25, request=request, score_edit=edit, chunk_size=7),
                eager_attention_with_stats(q, k, v, mask, 0.25, request=request, score_edit=edit), atol=2e-2)


def group_labels(n_k: int, kind: str, batch: int) -> torch.Tensor:
    """Labels that send each group down one partial-output route of the torch backend."""
    labels = torch.full((batch, n_k), 1)  # group 1: nearly every key (outsiders few: zero-and-restore)
    labels[:, 1:3] = 0  # group 0: two columns (gathered)
    labels[:, 7] = 2  # group 2: one column
    if kind == "even":
        labels[:, ::2] = 3  # group 3: half of the keys (masked product)
    if batch > 1:
        labels[1, 4] = 0  # batch rows differ: gathered columns need each row's own membership
        labels[1, 9] = -1  # in no group
    return labels


@pytest.mark.parametrize("kind", ["narrow", "even"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("wanted", [None, (0,), (1,), (0, 2, 3)])
def test_output_groups_match_eager_and_others_are_zero(kind, batch, wanted):
    n = 40
    q, k, v = make_qkv(batch, 4, 2, n, n, 8, seed=7)
    request = StatsRequest(key_groups=group_labels(n, kind, batch), n_groups=4, group_outputs=True,
                           output_groups=wanted)
    mask = MaskSpec(causal=True)
    got = torch_attention_with_stats(q, k, v, mask, 0.3, request=request, chunk_size=16)
    want = eager_attention_with_stats(q, k, v, mask, 0.3, request=request)
    assert_same(got, want, 1e-5)
    full = eager_attention_with_stats(q, k, v, mask, 0.3, request=StatsRequest(
        key_groups=request.key_groups, n_groups=4, group_outputs=True))[1].group_out
    for g in range(4):
        if wanted is None or g in wanted:
            torch.testing.assert_close(got[1].group_out[..., g, :], full[..., g, :], atol=1e-5, rtol=1e-5)
        else:
            assert got[1].group_out[..., g, :].abs().max() == 0


def test_output_groups_bad_input():
    q, k, v = make_qkv(1, 2, 2, 5, 5, 4)
    labels = torch.zeros(1, 5, dtype=torch.long)
    for request, message in [
        (StatsRequest(key_groups=labels, n_groups=2, group_outputs=True, output_groups=(2,)), "not groups"),
        (StatsRequest(key_groups=labels, n_groups=2, output_groups=(0,)), "group_outputs=True"),
    ]:
        for fn in (torch_attention_with_stats, eager_attention_with_stats):
            with pytest.raises(InputError, match=message):
                fn(q, k, v, MaskSpec(), 0.5, request=request)


def test_chunk_rows_from_the_cache_override_and_bad_env(monkeypatch):
    monkeypatch.delenv("HEADLAB_CHUNK_ROWS", raising=False)
    # smollm2-135m (9 heads, batch 1): 64 rows at 1k keys, 32 from 4k on; tiny calls get the most rows.
    assert [pick_chunk_size(1, 9, n) for n in (1024, 4096, 8192, 16)] == [64, 32, 32, 128]
    assert pick_chunk_size(1, 9, 1024, 5) == 5
    monkeypatch.setenv("HEADLAB_CHUNK_ROWS", "24")
    assert pick_chunk_size(1, 9, 1024) == 24
    monkeypatch.setenv("HEADLAB_CHUNK_ROWS", "lots")
    with pytest.raises(InputError, match="HEADLAB_CHUNK_ROWS"):
        pick_chunk_size(1, 9, 1024)
    with pytest.raises(InputError, match="at least 1"):
        pick_chunk_size(1, 9, 1024, 0)


def test_post_softmax_edits_ask_only_for_the_groups_they_read(load_model):
    """AttentionOverride reads its keys' group, KeyKnockout the rest, both together what either reads;
    Redistribute (weights from the masses) every group; crossed with a probe's groups, each probe group
    repeats the edit's choice."""
    loaded = load_model("tiny-llama")

    def needed(*edits):
        return LayerPlan(1, [edit.bind(loaded.arch) for edit in edits], loaded.arch.n_heads).needed_cells

    assert needed(AttentionOverride([(1, 0)], keys=[0, 1])) == [0]
    assert needed(KeyKnockout([(1, 0)], keys=[0])) == [1]
    # Two key sets: cells 0 (set 0 only), 1 (set 1 only), 2 (both), 3 the rest; cell 1 has weight 0 in both edits.
    assert needed(AttentionOverride([(1, 0)], keys=[0]), KeyKnockout([(1, 1)], keys=[0])) == [0, 2, 3]
    assert needed(Redistribute([(1, 0)], sources=[0], targets=[1, 2])) == [0, 1, 2, 3]

    plan = PostPlan(torch.tensor([[0, 1, 1, 1]]), 1)
    probe = StatsRequest(key_groups=torch.tensor([[0, 0, 1, -1]]), n_groups=2)
    request, probe_groups = _merged_request(probe, plan, [0])
    assert probe_groups == 2 and request.output_groups == (0, 2, 4)
    probe.group_outputs = True  # the probe reads every group's output itself
    assert _merged_request(probe, plan, [0])[0].output_groups is None


def test_reference_far_below_the_maximum_keeps_eager_precision():
    """Rows whose maximum lies ~20 bits above their reference scores stay on the reference shift (no max
    pass) and still match eager within 1e-5. Without centring the entropy's dot on log2 l its fp32 sum was
    off by 2e-5 nats here (1e-4 with 1000 keys)."""
    n, dim = 300, 16
    q, k, v = make_qkv(1, 2, 1, n, n, dim, seed=4)
    direction = torch.zeros(dim)
    direction[0] = 1.0
    q = q * 0.3
    q[..., 0] = 2.0  # every query leans the same way
    k = k * 0.3
    k[:, :, 3] = 6.5 * direction  # key 3 scores ~13 nats (~19 bits) above the first and own keys
    mask = MaskSpec(causal=True)
    want = eager_attention_with_stats(q, k, v, mask, 1.0)
    shift = reference_shift(q, k, mask, mask.first_key(1, q.device))
    gap_bits = (want[1].lse - shift)[..., 4:] / 0.6931471805599453  # lse ≥ max: an upper bound on m - c
    assert gap_bits.max() < 24 and (gap_bits > 16).float().mean() > 0.9
    with count_max_passes() as max_passes:
        got = torch_attention_with_stats(q, k, v, mask, 1.0, chunk_size=16)
    assert max_passes == []
    assert_same(got, want, 1e-5)


@pytest.mark.parametrize("rows", [None, "text"])
def test_edit_touches_only_its_key_span(rows):
    """An edit confined to one key span (an image) edits only those columns of each chunk, chunks before the
    span not at all; selected rows or all rows; against eager. An edit that changes nothing is no edit."""
    n = 60
    q, k, v = make_qkv(2, 4, 2, n, n, 8, seed=2)
    labels = torch.full((2, n), 1)
    labels[:, 20:32] = 0  # the span: group 0 boosted and scaled, group 1 (the rest) left alone
    labels[1, 25] = -1  # in no group for one batch row
    mult = torch.tensor([[1.3, 1.0]] * 4)
    add = torch.tensor([[0.4, 0.0]] * 4)
    flags = None if rows is None else torch.arange(n)[None].expand(2, -1) >= 32
    edit = ScoreEdit(labels, mult, add, flags)
    assert torch_backend.edit_tables(edit, 2, q.device).keys == (20, 32)
    mask = MaskSpec(causal=True)
    assert_same(torch_attention_with_stats(q, k, v, mask, 0.5, score_edit=edit, chunk_size=8),
                eager_attention_with_stats(q, k, v, mask, 0.5, score_edit=edit), 1e-5)
    idle = ScoreEdit(labels, torch.ones(4, 2), torch.zeros(4, 2))
    assert torch_backend.edit_tables(idle, 2, q.device).keys == (0, 0)
    assert_same(torch_attention_with_stats(q, k, v, mask, 0.5, score_edit=idle, chunk_size=8),
                torch_attention_with_stats(q, k, v, mask, 0.5, chunk_size=8), 0.0)
