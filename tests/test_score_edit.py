"""Pre-softmax score edits (``ScoreEdit``) in the three backends, against a hand-written reference.

The reference builds the scores with einsum and edits them key column by key column with plain tensor
ops (not ``ScoreEdit.apply``, which the eager backend uses), then masks, adds the sink, softmaxes and
reduces the probabilities with ``stats_from_probs``. The Triton kernels run under the interpreter on
CPU (``TRITON_INTERPRET`` is set before the kernel module is first imported, as in test_triton.py), so
their shapes stay tiny.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from kernel_helpers import FIELDS, assert_same, make_qkv  # noqa: E402

from headlab.errors import InputError  # noqa: E402
from headlab.kernels import (  # noqa: E402
    MaskSpec,
    ScoreEdit,
    StatsRequest,
    attention_with_stats,
    eager_attention_with_stats,
    stats_from_probs,
    torch_attention_with_stats,
)

HAS_TRITON = importlib.util.find_spec("triton") is not None
BACKENDS = ["eager", "torch"] + (["triton"] if HAS_TRITON else [])
SCALE = 0.3


@pytest.fixture(scope="module")
def run_triton():
    """The interpreted Triton backend (reloaded if something imported the kernels without the interpreter)."""
    if not HAS_TRITON:
        pytest.skip("needs the triton package")
    from headlab.kernels import triton_backend, triton_kernels

    if not triton_backend.INTERPRETED:
        importlib.reload(triton_kernels)
        importlib.reload(triton_backend)
    return triton_backend.triton_attention_with_stats


def run_backend(name: str, run_triton, *args, **kwargs):
    """One backend on the eager signature; torch with small chunks so that chunk edges cut the edit."""
    if name == "eager":
        return eager_attention_with_stats(*args, **kwargs)
    if name == "torch":
        return torch_attention_with_stats(*args, chunk_size=3, **kwargs)
    return run_triton(*args, **kwargs)


def hand_edit(scores: torch.Tensor, labels: torch.Tensor, mult: torch.Tensor, add_abs: torch.Tensor,
              rows: torch.Tensor | None) -> torch.Tensor:
    """s' = mult[h, g] s + add_abs[h, g] |s| on the selected rows, one (batch, head, key) column at a time."""
    batch, n_heads, n_q, n_k = scores.shape
    labels = labels.expand(batch, -1)
    rows = torch.ones(batch, n_q, dtype=torch.bool) if rows is None else rows.expand(batch, -1)
    edited = scores.clone()
    for b in range(batch):
        for j in range(n_k):
            g = int(labels[b, j])
            if not 0 <= g < mult.shape[1]:
                continue  # a key in no group keeps its score
            for h in range(n_heads):
                column = scores[b, h, :, j]
                new = mult[h, g] * column + add_abs[h, g] * column.abs()
                edited[b, h, :, j] = torch.where(rows[b], new, column)
    return edited


def hand_reference(q, k, v, mask: MaskSpec, sinks, request: StatsRequest | None, edit: ScoreEdit):
    """(output, AttentionStats) of the edited attention, computed without any backend."""
    batch, n_heads, n_q, _ = q.shape
    n_k, group = k.shape[2], n_heads // k.shape[1]
    k_full, v_full = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k_full) * SCALE
    logits = hand_edit(scores, edit.labels, edit.mult, edit.add_abs, edit.rows)
    logits = logits.masked_fill(~mask.allowed(0, n_q, n_k, q.device), float("-inf"))
    if sinks is not None:
        logits = torch.cat([logits, sinks.view(1, n_heads, 1, 1).expand(batch, -1, n_q, 1)], dim=-1)
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)[..., :n_k]
    out = torch.einsum("bhqk,bhkd->bhqd", probs, v_full)
    stats = stats_from_probs(probs, mask, lse, request)
    if request is not None and request.group_outputs:
        labels = request.key_groups.expand(batch, -1)
        onehot = (labels[..., None] == torch.arange(request.group_count())).float()
        stats.group_out = torch.einsum("bhqk,bkg,bhkd->bhqgd", probs, onehot, v_full)
    return out, stats


def random_edit(batch: int, n_heads: int, n_q: int, n_k: int, n_groups: int, seed: int, rows: bool = True,
                identity_heads: tuple[int, ...] = ()) -> ScoreEdit:
    """Labels in -1 .. n_groups - 1 (-1: no group), mult in [0.5, 1.5], add_abs in [-0.5, 1], half the rows."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(-1, n_groups, (batch, n_k), generator=gen)
    mult = torch.rand(n_heads, n_groups, generator=gen) + 0.5
    add_abs = 1.5 * torch.rand(n_heads, n_groups, generator=gen) - 0.5
    for h in identity_heads:
        mult[h], add_abs[h] = 1.0, 0.0
    chosen = torch.rand(batch, n_q, generator=gen) < 0.5 if rows else None
    return ScoreEdit(labels, mult, add_abs, chosen)


def left_padding(batch: int, n_k: int, pad: int) -> torch.Tensor:
    """``[batch, key]``: the last sequence starts ``pad`` keys late."""
    padding = torch.ones(batch, n_k, dtype=torch.bool)
    padding[-1, :pad] = False
    return padding


# name -> (n_q, n_k, causal, window, left pad, sinks, edited rows subset, identity heads)
CASES = {
    "causal": (19, 19, True, None, 0, False, False, ()),
    "bidirectional_padded_rows": (18, 18, False, None, 3, False, True, ()),
    "decode_step": (1, 21, True, None, 4, True, False, ()),
    "cache_chunk_rows": (5, 20, True, None, 2, False, True, (1,)),
    "window_sinks_identity_heads": (20, 20, True, 6, 2, True, True, (0, 3)),
    "bidirectional_window_sinks": (17, 17, False, 5, 0, True, False, ()),
}


def case_inputs(name: str):
    """q, k, v (4 heads on 2 kv heads), mask, sinks, request (groups unlike the edit's) and edit of a case."""
    n_q, n_k, causal, window, pad, sinks, rows, identity = CASES[name]
    q, k, v = make_qkv(2, 4, 2, n_q, n_k, 16, seed=n_q + n_k)
    padding = left_padding(2, n_k, pad)
    q_offset = n_k - n_q
    mask = MaskSpec(causal=causal, window=window, q_offset=q_offset, key_padding=padding,
                    query_valid=padding[:, q_offset:])
    sink_logits = torch.linspace(-1.0, 1.0, 4) if sinks else None
    request = StatsRequest(distance=True, key_groups=(torch.arange(n_k) % 3)[None], n_groups=3, group_outputs=True)
    edit = random_edit(2, 4, n_q, n_k, 3, seed=n_k, rows=rows, identity_heads=identity)
    return q, k, v, mask, sink_logits, request, edit


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_backends_match_the_hand_reference(case, backend, request):
    q, k, v, mask, sinks, stats_request, edit = case_inputs(case)
    want = hand_reference(q, k, v, mask, sinks, stats_request, edit)
    triton_fn = request.getfixturevalue("run_triton") if backend == "triton" else None
    got = run_backend(backend, triton_fn, q, k, v, mask, SCALE, sinks, request=stats_request, score_edit=edit)
    assert_same(got, want, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_outputs_carry_the_edit(backend, request):
    # Boost one group strongly: its partial output and mass grow, and the parts still sum to the output.
    q, k, v = make_qkv(1, 4, 2, 16, 16, 16, seed=3)
    labels = (torch.arange(16) % 2)[None]
    mask = MaskSpec(causal=False)
    stats_request = StatsRequest(key_groups=labels, n_groups=2, group_outputs=True)
    edit = ScoreEdit(labels, torch.ones(4, 2), torch.tensor([[0.0, 2.0]]).expand(4, 2))
    triton_fn = request.getfixturevalue("run_triton") if backend == "triton" else None
    plain = run_backend(backend, triton_fn, q, k, v, mask, SCALE, request=stats_request)
    out, stats = run_backend(backend, triton_fn, q, k, v, mask, SCALE, request=stats_request, score_edit=edit)
    assert (stats.group_mass[..., 1] > plain[1].group_mass[..., 1]).all()
    assert not torch.allclose(stats.group_out, plain[1].group_out, atol=1e-3)
    torch.testing.assert_close(stats.group_out.sum(3), out, atol=1e-5, rtol=1e-5)
    assert_same((out, stats), hand_reference(q, k, v, mask, None, stats_request, edit), atol=1e-5)


@pytest.mark.parametrize("rows", [False, True])
def test_identity_edit_is_bit_identical_on_torch(rows):
    q, k, v, mask, sinks, stats_request, _ = case_inputs("window_sinks_identity_heads")
    gen = torch.Generator().manual_seed(0)
    edit = ScoreEdit(torch.randint(-1, 2, (2, 20), generator=gen), torch.ones(4, 2), torch.zeros(4, 2),
                     torch.rand(2, 20, generator=gen) < 0.5 if rows else None)
    plain = torch_attention_with_stats(q, k, v, mask, SCALE, sinks, request=stats_request)
    edited = torch_attention_with_stats(q, k, v, mask, SCALE, sinks, request=stats_request, score_edit=edit)
    assert torch.equal(edited[0], plain[0])
    for name in FIELDS:
        assert torch.equal(getattr(edited[1], name), getattr(plain[1], name)), name


def test_identity_heads_are_untouched_on_torch():
    # Heads 0 and 3 carry mult 1, add 0: their numbers are exactly those of the unedited call.
    q, k, v, mask, sinks, stats_request, edit = case_inputs("window_sinks_identity_heads")
    plain = torch_attention_with_stats(q, k, v, mask, SCALE, sinks, request=stats_request)
    edited = torch_attention_with_stats(q, k, v, mask, SCALE, sinks, request=stats_request, score_edit=edit)
    for heads, same in (([0, 3], True), ([1, 2], False)):
        assert torch.equal(edited[0][:, heads], plain[0][:, heads]) == same
        assert torch.equal(edited[1].lse[:, heads], plain[1].lse[:, heads]) == same


@pytest.mark.parametrize("backend", BACKENDS)
def test_dispatch_passes_the_edit(backend, request):
    if backend == "triton":
        request.getfixturevalue("run_triton")
    q, k, v, mask, sinks, stats_request, edit = case_inputs("cache_chunk_rows")
    got = attention_with_stats(q, k, v, mask=mask, scale=SCALE, sinks=sinks, backend=backend,
                               request=stats_request, score_edit=edit)
    assert_same(got, hand_reference(q, k, v, mask, sinks, stats_request, edit), atol=1e-5)


BAD_EDITS = {
    "labels_too_short": lambda: ScoreEdit(torch.zeros(1, 7, dtype=torch.long), torch.ones(4, 2), torch.zeros(4, 2)),
    "labels_batch": lambda: ScoreEdit(torch.zeros(3, 8, dtype=torch.long), torch.ones(4, 2), torch.zeros(4, 2)),
    "float_labels": lambda: ScoreEdit(torch.zeros(1, 8), torch.ones(4, 2), torch.zeros(4, 2)),
    "mult_heads": lambda: ScoreEdit(torch.zeros(1, 8, dtype=torch.long), torch.ones(2, 2), torch.zeros(2, 2)),
    "mult_vs_add": lambda: ScoreEdit(torch.zeros(1, 8, dtype=torch.long), torch.ones(4, 2), torch.zeros(4, 3)),
    "no_groups": lambda: ScoreEdit(torch.zeros(1, 8, dtype=torch.long), torch.ones(4, 0), torch.zeros(4, 0)),
    "rows_length": lambda: ScoreEdit(torch.zeros(1, 8, dtype=torch.long), torch.ones(4, 2), torch.zeros(4, 2),
                                     torch.ones(1, 8, dtype=torch.bool)),
    "rows_not_bool": lambda: ScoreEdit(torch.zeros(1, 8, dtype=torch.long), torch.ones(4, 2), torch.zeros(4, 2),
                                       torch.ones(2, 3)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", sorted(BAD_EDITS))
def test_wrong_shaped_edit_raises_input_error(bad, backend, request):
    # 2 sequences, 4 heads, 3 new queries over 8 keys (a cache of 5).
    q, k, v = make_qkv(2, 4, 2, 3, 8, 16)
    triton_fn = request.getfixturevalue("run_triton") if backend == "triton" else None
    with pytest.raises(InputError, match="ScoreEdit"):
        run_backend(backend, triton_fn, q, k, v, MaskSpec(q_offset=5), SCALE, score_edit=BAD_EDITS[bad]())
    with pytest.raises(InputError, match="ScoreEdit"):
        attention_with_stats(q, k, v, q_offset=5, backend=backend, score_edit=BAD_EDITS[bad]())


@settings(max_examples=25, deadline=None)
@given(
    n_q=st.integers(1, 12),
    extra_keys=st.integers(0, 8),
    group=st.sampled_from([1, 2]),
    causal=st.booleans(),
    window=st.one_of(st.none(), st.integers(1, 10)),
    pad=st.integers(0, 5),
    n_groups=st.integers(1, 3),
    rows=st.booleans(),
    sinks=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_property_torch_and_eager_equal_hand(n_q, extra_keys, group, causal, window, pad, n_groups, rows, sinks,
                                             seed):
    n_k = n_q + extra_keys
    q, k, v = make_qkv(2, 2 * group, 2, n_q, n_k, 8, seed=seed)
    padding = left_padding(2, n_k, min(pad, n_k - 1))
    mask = MaskSpec(causal=causal, window=window, q_offset=extra_keys, key_padding=padding,
                    query_valid=padding[:, extra_keys:])
    sink_logits = torch.linspace(-1.0, 1.0, 2 * group) if sinks else None
    edit = random_edit(2, 2 * group, n_q, n_k, n_groups, seed, rows=rows)
    stats_request = StatsRequest(key_groups=edit.labels, n_groups=n_groups, group_outputs=True)
    want = hand_reference(q, k, v, mask, sink_logits, stats_request, edit)
    for fn in (eager_attention_with_stats, torch_attention_with_stats):
        got = fn(q, k, v, mask, SCALE, sink_logits, request=stats_request, score_edit=edit)
        assert_same(got, want, atol=1e-5)


# Compiled kernels (no interpreter): run in a fresh process so that triton.jit decorates for the GPU.
GPU_CHECK = """
import torch
from headlab.kernels import MaskSpec, ScoreEdit, StatsRequest, eager_attention_with_stats
from headlab.kernels.triton_backend import triton_attention_with_stats
device, n = "{device}", {n}
for dtype, atol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
    for dim in (64, 128):
        g = torch.Generator(device=device).manual_seed(dim)
        q = torch.randn(2, 8, n, dim, device=device, generator=g).to(dtype)
        k = torch.randn(2, 2, 3 * n // 2, dim, device=device, generator=g).to(dtype)
        v = torch.randn(2, 2, 3 * n // 2, dim, device=device, generator=g).to(dtype)
        pad = torch.ones(2, 3 * n // 2, dtype=torch.bool, device=device)
        pad[1, :17] = False
        mask = MaskSpec(causal=True, window=n // 3, q_offset=n // 2, key_padding=pad, query_valid=pad[:, n // 2:])
        labels = (torch.arange(3 * n // 2, device=device) % 4 - 1)[None]
        req = StatsRequest(distance=True, key_groups=labels, n_groups=3, group_outputs=True)
        edit = ScoreEdit(labels, torch.rand(8, 3, device=device, generator=g) + 0.5,
                         torch.rand(8, 3, device=device, generator=g) - 0.3,
                         torch.rand(2, n, device=device, generator=g) < 0.5)
        sinks = torch.linspace(-1, 1, 8, device=device)
        a = triton_attention_with_stats(q, k, v, mask, dim ** -0.5, sinks, request=req, score_edit=edit)
        b = eager_attention_with_stats(q, k, v, mask, dim ** -0.5, sinks, request=req, score_edit=edit)
        torch.testing.assert_close(a[0].float(), b[0].float(), atol=atol, rtol=atol)
        for name in ("lse", "entropy", "key_mass", "first_mass", "distance_mass", "group_mass", "group_out"):
            x, y = getattr(a[1], name).float(), getattr(b[1], name).float()
            finite = torch.isfinite(y)
            torch.testing.assert_close(x[finite], y[finite], atol=atol, rtol=atol, msg=name)
print("ok")
"""


@pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs a CUDA GPU (compiled kernels)")
def test_compiled_kernels_apply_the_edit_on_gpu():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    script = GPU_CHECK.format(device="cuda", n=300)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
