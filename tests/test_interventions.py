"""Interventions against hand-built references: z site, attention site (every edit), residual site, the protocol."""

from __future__ import annotations

import math
import os
import types

import pytest
import torch
from conftest import TEXT
from transformers.masking_utils import causal_mask_function

import headlab
from headlab.errors import InputError
from headlab.interventions import (
    INTERVENTIONS,
    AttentionOverride,
    HeadMeanAblate,
    HeadOffsets,
    HeadPatch,
    HeadScale,
    KeyKnockout,
    Positions,
    Redistribute,
    ResidualAdd,
    Reweight,
    ScoreBoost,
    ScoreScale,
    SequenceLayout,
    every_head,
    recombine,
    reweight_probs,
)
from headlab.kernels import StatsRequest
from headlab.kernels.attention_function import headlab_attention_forward, headlab_mask
from headlab.probes import AttentionProbe

# The tests run on CPU tensors; the Triton backend joins with HEADLAB_TEST_TRITON=1 TRITON_INTERPRET=1 set before
# the run (the interpreter must be chosen before the kernels are first imported, so it cannot be switched on here).
BACKENDS = ["eager", "torch"] + (["triton"] if os.environ.get("HEADLAB_TEST_TRITON") else [])


def encode(loaded, texts, side="right"):
    tok = loaded.text_tokenizer
    tok.padding_side = side
    try:
        return tok(texts, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = "right"


def test_positions_count_from_the_first_real_token():
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])  # left-padded, right-padded
    layout = SequenceLayout.from_mask(mask, 2, 6, torch.device("cpu"))

    def chosen(spec, n=6, offset=0, on=layout):
        return on.choose(Positions.of(spec), n, offset).nonzero().tolist()

    assert chosen("last") == [[0, 5], [1, 4]]
    assert chosen([0, (2, 4)]) == [[0, 2], [0, 4], [0, 5], [1, 0], [1, 2], [1, 3]]
    assert chosen("from:3") == [[0, 5], [1, 3], [1, 4]]
    assert chosen("all") == [[b, c] for b in range(2) for c in range(6)]  # padding too: it never matters
    # A decoding step: one new column (6) after six cached ones; it is the last real token of both rows.
    grown = SequenceLayout.from_mask(torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1), 2, 7,
                                     torch.device("cpu"))
    assert chosen("last", 1, 6, grown) == [[0, 0], [1, 0]]
    assert chosen(4, 1, 6, grown) == [[0, 0]]  # column 6 is position 4 of the left-padded row only
    assert Positions.of(torch.tensor([1, 2])) == Positions.of([1, 2])
    for bad in (-1, (3, 2), "first", 1.5):
        with pytest.raises(InputError):
            Positions.of(bad)


# --------------------------------------------------------------------------------------------------
# The hand-built attention reference: materialise scores, edit, softmax (with the sink), reweight, A · V.

def positions_mask(spec, padding: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``[batch, n]`` which columns a position spec picks, counted from each sequence's first real token."""
    first = padding.int().argmax(dim=-1)[:, None]
    last = padding.sum(dim=-1)[:, None] - 1
    rel = columns[None, :] - first
    real = padding[:, columns]
    if spec == "all":
        return real
    if spec == "last":
        return real & (rel == last)
    if isinstance(spec, str) and spec.startswith("from:"):
        return real & (rel >= int(spec[5:]))
    items = spec if isinstance(spec, list) else [spec]
    chosen = torch.zeros_like(real)
    for item in items:
        lo, hi = (item, item + 1) if isinstance(item, int) else item
        chosen |= (rel >= lo) & (rel < hi)
    return chosen & real


def reference_attention(q, k, v, padding, q_offset, scale, sinks, pre=(), post=()):
    """q ``[batch, head, query, dim]``, k/v ``[batch, kv_head, key, dim]``; padding ``[batch, key]``.

    pre: (heads, rows spec, keys spec, mult, add); post: (heads, rows spec, key weight fn) where the fn
    maps (probs with the sink column, key masks) to per-key weights. Returns ``[batch, head, query, dim]``.
    """
    batch, n_heads, n_q, _ = q.shape
    n_k = k.shape[2]
    group = n_heads // k.shape[1]
    kf, vf = k.repeat_interleave(group, 1).double(), v.repeat_interleave(group, 1).double()
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), kf) * scale
    rows_cols = torch.arange(n_q) + q_offset
    keys_cols = torch.arange(n_k)
    for heads, rows, keys, mult, add in pre:
        sel = (torch.zeros(n_heads, dtype=torch.bool).index_fill(0, torch.tensor(heads), True)[None, :, None, None]
               & positions_mask(rows, padding, rows_cols)[:, None, :, None]
               & positions_mask(keys, padding, keys_cols)[:, None, None, :])
        scores = torch.where(sel, mult * scores + add * scores.abs(), scores)
    allowed = (keys_cols[None, :] <= rows_cols[:, None])[None, None] & padding[:, None, None, :]
    scores = scores.masked_fill(~allowed, -math.inf)
    sink = (sinks.double() if sinks is not None else torch.full((n_heads,), -math.inf, dtype=torch.float64))
    full = torch.cat([scores, sink.view(1, n_heads, 1, 1).expand(batch, n_heads, n_q, 1)], dim=-1)
    probs = torch.softmax(full, dim=-1).nan_to_num(0.0)  # [batch, head, query, key + 1]
    for heads, rows, weight_fn in post:
        weights = weight_fn(probs)  # [batch, head, query, key + 1]
        new = probs * weights
        new = new / new.sum(-1, keepdim=True)
        sel = (torch.zeros(n_heads, dtype=torch.bool).index_fill(0, torch.tensor(heads), True)[None, :, None, None]
               & positions_mask(rows, padding, rows_cols)[:, None, :, None])
        probs = torch.where(sel, new, probs)
    return torch.einsum("bhqk,bhkd->bhqd", probs[..., :n_k], vf)


def key_weights(padding, groups, rest):
    """Static per-key weights: ``groups`` [(keys spec, w)], the first group a key is in wins; sink = rest."""
    n_k = padding.shape[1]
    weights = torch.full((padding.shape[0], n_k + 1), float(rest), dtype=torch.float64)
    taken = torch.zeros(padding.shape[0], n_k, dtype=torch.bool)
    for keys, w in groups:
        member = positions_mask(keys, padding, torch.arange(n_k)) & ~taken
        weights[:, :n_k] = torch.where(member, w, weights[:, :n_k])
        taken |= member
    return lambda probs: weights[:, None, None, :].expand_as(probs)


def redistribute_weights(padding, sources, targets, p):
    n_k = padding.shape[1]
    src = positions_mask(sources, padding, torch.arange(n_k))
    tgt = positions_mask(targets, padding, torch.arange(n_k)) & ~src

    def fn(probs):
        m_s = (probs[..., :n_k] * src[:, None, None, :]).sum(-1, keepdim=True)
        m_t = (probs[..., :n_k] * tgt[:, None, None, :]).sum(-1, keepdim=True)
        w_t = torch.where(m_t > 0, 1 + (1 - p) * m_s / m_t.clamp_min(1e-300), 1.0)
        weights = torch.ones_like(probs)
        weights[..., :n_k] = torch.where(src[:, None, None, :], p, torch.where(tgt[:, None, None, :], w_t, 1.0))
        return weights

    return fn


def call_attention(loaded, layer, q, k, v, padding, q_offset, scale, sinks=None):
    """Run headlab's attention function as transformers would, for one layer's module."""
    batch, _, n_q, _ = q.shape
    mask = headlab_mask(batch, n_q, k.shape[2], q_offset, 0, causal_mask_function, padding)
    out, _ = headlab_attention_forward(loaded.arch.attention(layer), q, k, v, mask, scaling=scale, s_aux=sinks)
    return out.transpose(1, 2)  # [batch, head, query, dim]


def random_qkv(n_heads=4, n_kv=2, batch=2, n_q=9, n_k=9, dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, n_heads, n_q, dim, generator=gen) * 2
    k = torch.randn(batch, n_kv, n_k, dim, generator=gen) * 2
    v = torch.randn(batch, n_kv, n_k, dim, generator=gen)
    return q, k, v


LEFT_PADDING = torch.tensor([[True] * 9, [False] * 3 + [True] * 6])
RIGHT_PADDING = torch.tensor([[True] * 9, [True] * 6 + [False] * 3])

# (edits, reference pre list, reference post list builder(padding)); layer 1, heads 0 and 3 (GQA: two kv groups).
CASES = {
    "score_boost": (lambda: [ScoreBoost([(1, 0), (1, 3)], keys=[0, (3, 5)], alpha=0.7, rows="last")],
                    [([0, 3], "last", [0, (3, 5)], 1.0, 0.7)], lambda pad: []),
    "score_boost_all_rows": (lambda: [ScoreBoost([(1, None)], keys="from:2", alpha=0.3)],
                             [([0, 1, 2, 3], "all", "from:2", 1.0, 0.3)], lambda pad: []),
    "score_scale": (lambda: [ScoreScale([(1, 1)], gamma=0.4, keys=[1, 2, 4], rows="from:3")],
                    [([1], "from:3", [1, 2, 4], 0.4, 0.0)], lambda pad: []),
    "two_score_edits": (lambda: [ScoreBoost([(1, 0)], keys=[0, 1], alpha=0.5),
                                 ScoreScale([(1, 0), (1, 2)], gamma=0.5, keys=[1, 2])],
                        [([0], "all", [0, 1], 1.0, 0.5), ([0, 2], "all", [1, 2], 0.5, 0.0)], lambda pad: []),
    "key_knockout": (lambda: [KeyKnockout([(1, 0), (1, 2)], keys=[0, 2], rows="from:4")], [],
                     lambda pad: [([0, 2], "from:4", key_weights(pad, [([0, 2], 0.0)], 1.0))]),
    "attention_override": (lambda: [AttentionOverride([(1, 3)], keys=[1, 2], rows="last")], [],
                           lambda pad: [([3], "last", key_weights(pad, [([1, 2], 1.0)], 0.0))]),
    "reweight": (lambda: [Reweight([(1, 1)], groups=[(0, 0.2), ((2, 4), 3.0)], rest=0.5)], [],
                 lambda pad: [([1], "all", key_weights(pad, [(0, 0.2), ((2, 4), 3.0)], 0.5))]),
    "redistribute": (lambda: [Redistribute([(1, 0), (1, 1)], sources=0, targets="from:3", p=0.6)], [],
                     lambda pad: [([0, 1], "all", redistribute_weights(pad, 0, "from:3", 0.6))]),
    "boost_and_knockout": (lambda: [ScoreBoost([(1, 2)], keys=[0], alpha=0.9),
                                    KeyKnockout([(1, 2), (1, 3)], keys=[3], rows="from:5")],
                           [([2], "all", [0], 1.0, 0.9)],
                           lambda pad: [([2, 3], "from:5", key_weights(pad, [([3], 0.0)], 1.0))]),
}


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_attention_edit_matches_hand_reference(load_model, case, backend, padding):
    loaded = load_model("tiny-llama")
    make, pre, post = CASES[case]
    pad = LEFT_PADDING if padding == "left" else RIGHT_PADDING
    q, k, v = random_qkv()
    scale = 0.25
    want = reference_attention(q, k, v, pad, 0, scale, None, pre, post(pad))
    with headlab.intervene(loaded, *make(), backend=backend):
        got = call_attention(loaded, 1, q, k, v, pad, 0, scale)
    plain = reference_attention(q, k, v, pad, 0, scale, None)
    real = pad[:, None, :, None].expand_as(got)  # padding rows' outputs are not defined
    torch.testing.assert_close(got[real].double(), want[real], atol=1e-5, rtol=1e-5)
    assert (want - plain)[real].abs().max() > 1e-3, "the case must change the output"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["score_boost", "reweight", "redistribute", "attention_override"])
def test_attention_edit_at_a_decode_step(load_model, case, backend):
    """One new row after 8 cached columns (q_offset 8), left padding: positions count from the first real token."""
    loaded = load_model("tiny-llama")
    make, pre, post = CASES[case]
    q, k, v = random_qkv(n_q=1)
    want = reference_attention(q, k, v, LEFT_PADDING, 8, 0.25, None, pre, post(LEFT_PADDING))
    with headlab.intervene(loaded, *make(), backend=backend):
        got = call_attention(loaded, 1, q, k, v, LEFT_PADDING, 8, 0.25)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_learned_sink_keeps_its_weight(load_model, backend):
    """s_aux (gpt-oss style sink logits): reweighting keeps the sink's mass at weight 1 (0 for an override)."""
    loaded = load_model("tiny-llama")
    q, k, v = random_qkv()
    sinks = torch.tensor([0.5, 2.0, -1.0, 1.0])
    for case in ("reweight", "attention_override", "key_knockout"):
        make, pre, post = CASES[case]
        want = reference_attention(q, k, v, RIGHT_PADDING, 0, 0.25, sinks, pre, post(RIGHT_PADDING))
        with headlab.intervene(loaded, *make(), backend=backend):
            got = call_attention(loaded, 1, q, k, v, RIGHT_PADDING, 0, 0.25, sinks)
        real = RIGHT_PADDING[:, None, :, None].expand_as(got)
        torch.testing.assert_close(got[real].double(), want[real], atol=1e-5, rtol=1e-5)


def test_unedited_layers_and_heads_are_untouched(load_model):
    loaded = load_model("tiny-llama")
    q, k, v = random_qkv()
    with torch.no_grad():
        base = call_attention(loaded, 1, q, k, v, RIGHT_PADDING, 0, 0.25)  # no edit: plain sdpa
        with headlab.intervene(loaded, KeyKnockout([(1, 0)], keys=[0]), backend="torch"):
            other_layer = call_attention(loaded, 2, q, k, v, RIGHT_PADDING, 0, 0.25)
            edited = call_attention(loaded, 1, q, k, v, RIGHT_PADDING, 0, 0.25)
    torch.testing.assert_close(other_layer, base, atol=1e-6, rtol=1e-6)
    real = RIGHT_PADDING[:, None, :, None].expand(-1, 3, -1, 16)
    torch.testing.assert_close(edited[:, 1:][real], base[:, 1:][real], atol=1e-5, rtol=1e-5)
    assert (edited[:, 0] - base[:, 0]).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------
# Post-softmax recombination: an oracle on explicit probabilities.

def test_recombination_equals_explicit_reweighted_softmax():
    gen = torch.Generator().manual_seed(3)
    batch, heads, n_q, n_k, dim, n_groups = 2, 3, 5, 7, 4, 4  # the last group is the rest
    logits = torch.randn(batch, heads, n_q, n_k + 1, generator=gen, dtype=torch.float64)  # last column: a sink
    probs = torch.softmax(logits, dim=-1)
    v = torch.randn(batch, heads, n_k, dim, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, n_groups, (batch, n_k), generator=gen)
    weights = torch.rand(batch, heads, n_q, n_groups, generator=gen, dtype=torch.float64) * 2
    onehot = (labels[..., None] == torch.arange(n_groups)).double()  # [batch, key, group]
    p = probs[..., :n_k]
    group_mass = torch.einsum("bhqk,bkg->bhqg", p, onehot)
    group_out = torch.einsum("bhqk,bkg,bhkd->bhqgd", p, onehot, v)
    got, _, edited = recombine(p @ v, group_out, group_mass, weights, sink_mass=probs[..., -1])

    per_key = weights.gather(-1, labels[:, None, None, :].expand(batch, heads, n_q, n_k))
    explicit = torch.cat([p * per_key, probs[..., -1:] * weights[..., -1:]], dim=-1)
    explicit = explicit / explicit.sum(-1, keepdim=True)
    assert edited.all()
    torch.testing.assert_close(got, explicit[..., :n_k] @ v, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(reweight_probs(p, labels, weights).double(), explicit[..., :n_k], atol=1e-6, rtol=1e-5)


def test_recombination_leaves_rows_with_unit_weights_bit_exact():
    out = torch.randn(1, 2, 3, 4)
    group_out = torch.randn(1, 2, 3, 2, 4) * 0.1
    group_mass = torch.rand(1, 2, 3, 2) * 0.3
    weights = torch.ones(1, 2, 3, 2)
    weights[0, 1, 2, 0] = 0.0
    got, _, edited = recombine(out, group_out, group_mass, weights)
    assert edited.sum() == 1 and edited[0, 1, 2]
    assert torch.equal(got[0, 0], out[0, 0]) and torch.equal(got[0, 1, :2], out[0, 1, :2])


# --------------------------------------------------------------------------------------------------
# Whole models: generate with a KV cache, padding, probes seeing the edit.

ATTENTION_EDITS = {
    "score_boost": lambda rows: [ScoreBoost(every_head([1, 2]), keys=[0, 1], alpha=0.8, rows=rows)],
    "redistribute": lambda rows: [Redistribute(every_head([1, 3]), sources=0, targets="from:2", p=0.3, rows=rows)],
    "override": lambda rows: [AttentionOverride([(2, 0), (2, 1)], keys=[0, 2], rows=rows)],
}


def generate_logits(loaded, enc, new):
    """Greedy generate() with the KV cache: tokens ``[batch, prompt + new]``, logits ``[batch, new, vocab]``."""
    out = loaded.model.generate(**enc, max_new_tokens=new, do_sample=False, pad_token_id=258,
                                output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("edit", sorted(ATTENTION_EDITS))
def test_generate_with_cache_equals_recomputing_each_step(load_model, edit):
    """rows="all": decoding with the KV cache must edit exactly what a full recompute of each step edits."""
    loaded = load_model("tiny-qwen3")
    enc = encode(loaded, TEXT[:2], side="left")
    new = 4
    with torch.no_grad(), headlab.intervene(loaded, *ATTENTION_EDITS[edit]("all"), backend="torch"):
        generated, logits = generate_logits(loaded, enc, new)
        ids, mask, steps = enc.input_ids, enc.attention_mask, []
        for _ in range(new):
            steps.append(loaded.model(input_ids=ids, attention_mask=mask).logits[:, -1])
            ids = torch.cat([ids, steps[-1].argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    assert torch.equal(generated, ids)
    torch.testing.assert_close(logits, torch.stack(steps, dim=1), atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        _, plain = generate_logits(loaded, enc, new)
    assert (plain - logits).abs().max() > 1e-4, "the edit should change the logits"


def test_generate_edits_the_last_row_at_every_step(load_model):
    """rows="last": generate() equals a manual cached loop whose every step edits its one new row."""
    loaded = load_model("tiny-llama")
    enc = encode(loaded, TEXT[:2], side="left")
    edits = ATTENTION_EDITS["score_boost"]("last") + ATTENTION_EDITS["redistribute"]("last")
    with torch.no_grad(), headlab.intervene(loaded, *edits, backend="eager"):
        generated, logits = generate_logits(loaded, enc, 3)
        out = loaded.model(**enc, use_cache=True)
        ids, mask, cache = enc.input_ids, enc.attention_mask, out.cache
        steps = [out.logits[:, -1]]
        for _ in range(2):
            token = steps[-1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, token], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = loaded.model(input_ids=token, attention_mask=mask, cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits[:, -1])
    torch.testing.assert_close(logits, torch.stack(steps, dim=1), atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        _, plain = generate_logits(loaded, enc, 3)
    assert (plain - logits).abs().max() > 1e-4


@pytest.mark.parametrize("edit", sorted(ATTENTION_EDITS))
def test_left_padding_equals_the_sequence_alone(load_model, edit):
    """Positions count from the first real token, so a left-padded row is edited like the same text alone."""
    loaded = load_model("tiny-llama")
    enc = encode(loaded, TEXT[:2], side="left")
    alone = encode(loaded, TEXT[1:2])
    with torch.no_grad(), headlab.intervene(loaded, *ATTENTION_EDITS[edit]("last")):
        batched = loaded.model(**enc).logits[1, -alone.input_ids.shape[1]:]
        single = loaded.model(**alone).logits[0]
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        plain = loaded.model(**alone).logits[0]
    assert (plain - single).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-qwen3"])
def test_edits_run_on_other_architectures(load_model, name):
    loaded = load_model(name)
    enc = encode(loaded, TEXT[:2])
    with torch.no_grad():
        plain = loaded.model(**enc).logits
        with headlab.intervene(loaded, ScoreBoost(every_head([0, 1]), keys=[0], alpha=0.5),
                               KeyKnockout([(2, 1)], keys="last"), HeadScale([(3, 0)], alpha=2.0)):
            edited = loaded.model(**enc).logits
    assert (plain - edited).abs().max() > 1e-4
    assert loaded.model.config._attn_implementation == "sdpa"


def test_probe_inside_intervene_sees_the_edited_attention(load_model):
    loaded = load_model("tiny-llama")
    enc = encode(loaded, TEXT[:2])
    boost = ScoreBoost([(1, None)], keys=[0], alpha=0.9)
    groups = (torch.arange(enc.input_ids.shape[1]) == 0).long()[None].expand(2, -1) - 1  # key 0: group 0
    request = StatsRequest(key_groups=groups + 1, n_groups=2)  # group 1 = BOS, 0 = the rest
    with torch.no_grad():
        with AttentionProbe(loaded, backend="eager", request=request) as plain:
            loaded.model(**enc)
        with headlab.intervene(loaded, boost, KeyKnockout([(2, 0)], keys=[0], rows="from:3")), \
                AttentionProbe(loaded, backend="eager", request=request) as probe, \
                headlab.trace(loaded, ["blocks.1.attn.hook_pattern", "blocks.2.attn.hook_pattern"], stats=False) as t:
            loaded.model(**enc)
    rows = probe.last[1].row_counted
    # Pre-softmax edit: every statistic is of the edited probabilities (the trace's eager pattern).
    pattern = t["blocks.1.attn.hook_pattern"]
    entropy = torch.special.entr(pattern).sum(-1)
    torch.testing.assert_close(probe.last[1].entropy.transpose(1, 2)[rows], entropy.transpose(1, 2)[rows],
                               atol=1e-5, rtol=1e-5)
    assert (probe.last[1].first_mass - plain.last[1].first_mass).transpose(1, 2)[rows].abs().max() > 1e-3
    # Post-softmax edit: the row statistics a recombination knows (group masses, first_mass) are edited.
    knocked = t["blocks.2.attn.hook_pattern"][:, 0]  # [batch, query, key]
    torch.testing.assert_close(probe.last[2].first_mass[:, 0][rows], knocked[..., 0][rows], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probe.last[2].group_mass[:, 0, :, 1][rows], knocked[..., 0][rows], atol=1e-5,
                               rtol=1e-5)
    assert probe.last[2].first_mass[:, 0, 3:][rows[:, 3:]].abs().max() < 1e-6  # knocked out from row 3 on


def test_probe_outside_intervene_also_sees_edits(load_model):
    loaded = load_model("tiny-llama")
    enc = encode(loaded, TEXT[:1])
    with torch.no_grad(), AttentionProbe(loaded, backend="torch") as probe:
        loaded.model(**enc)
        before = probe.last[1].first_mass.clone()
        with headlab.intervene(loaded, AttentionOverride([(1, 2)], keys=[0], rows="from:1")):
            loaded.model(**enc)
        assert loaded.model.config._attn_implementation == "headlab"
    torch.testing.assert_close(probe.last[1].first_mass[0, 2, 1:], torch.ones(before.shape[-1] - 1))
    assert loaded.model.config._attn_implementation == "sdpa"


# --------------------------------------------------------------------------------------------------
# z site against o_proj applied by hand.

def z_and_attn_out(loaded, enc, layer, *edits):
    names = [f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.hook_attn_out"]
    with torch.no_grad(), headlab.intervene(loaded, *edits), headlab.trace(loaded, names, stats=False) as t:
        loaded.model(**enc)
    return t[names[0]], t[names[1]]


def o_proj(loaded, layer, z):
    return loaded.arch.o_proj(layer)(z.reshape(*z.shape[:2], -1))


def test_head_scale_is_o_proj_of_scaled_z(load_model):
    loaded = load_model("tiny-llama")
    enc = encode(loaded, TEXT[:2])
    z, _ = z_and_attn_out(loaded, enc, 2)
    edit = HeadScale([(2, 1), (2, 3)], alpha=[2.0, -0.5], rows="from:4")
    _, out = z_and_attn_out(loaded, enc, 2, edit)
    scaled = z.clone()
    chosen = enc.attention_mask.bool()[..., None]  # positions >= 4 of real tokens only (right padding)
    chosen[:, :4] = False
    scaled[:, :, 1] = torch.where(chosen, 2.0 * z[:, :, 1], z[:, :, 1])
    scaled[:, :, 3] = torch.where(chosen, -0.5 * z[:, :, 3], z[:, :, 3])
    with torch.no_grad():
        torch.testing.assert_close(out, o_proj(loaded, 2, scaled), atol=1e-6, rtol=1e-5)
    z_edited, _ = z_and_attn_out(loaded, enc, 2, edit)
    assert torch.equal(z_edited, scaled), "a trace inside intervene reads the edited z"


def test_head_scale_zero_on_every_head_zeroes_the_attention_output(load_model):
    loaded = load_model("tiny-llama")  # o_proj has no bias
    enc = encode(loaded, TEXT[:2])
    _, out = z_and_attn_out(loaded, enc, 1, HeadScale(every_head([1]), alpha=0.0))
    assert torch.count_nonzero(out) == 0
    _, plain = z_and_attn_out(loaded, enc, 1)
    assert plain.abs().max() > 0


def test_head_offsets_are_lofit_and_trainable(load_model):
    loaded = load_model("tiny-llama")
    enc = encode(loaded, TEXT[:1])
    z, _ = z_and_attn_out(loaded, enc, 3)
    offsets = HeadOffsets.create(loaded.arch, [(3, 2), (3, 0)], init="normal",
                                 generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        offsets.A.mul_(100)  # N(0, 1e-3) is LoFiT's init; larger values make the check sharp
        offsets.v.mul_(100)
    _, out = z_and_attn_out(loaded, enc, 3, offsets)
    want = z.clone()
    want[:, :, 2] = (1 + offsets.A[0]) * z[:, :, 2] + offsets.v[0]  # rows follow the order of the pairs
    want[:, :, 0] = (1 + offsets.A[1]) * z[:, :, 0] + offsets.v[1]
    with torch.no_grad():
        torch.testing.assert_close(out, o_proj(loaded, 3, want), atol=1e-6, rtol=1e-5)
    with headlab.intervene(loaded, offsets) as handle:
        loss = loaded.model(**enc).logits.square().mean()
    loss.backward()
    assert handle.parameters() == [offsets.A, offsets.v]
    assert offsets.A.grad.abs().sum() > 0 and offsets.v.grad.abs().sum() > 0
    loaded.model.zero_grad(set_to_none=True)


def test_head_offsets_zeros_are_identity_and_round_trip(load_model, tmp_path):
    loaded = load_model("tiny-llama")
    enc = encode(loaded, TEXT[:1])
    offsets = HeadOffsets.create(loaded.arch, every_head([0]))
    assert offsets.A.shape == (loaded.arch.n_heads, loaded.arch.head_dim)
    with torch.no_grad():
        plain = loaded.model(**enc).logits
        with headlab.intervene(loaded, offsets):
            same = loaded.model(**enc).logits
    assert torch.equal(plain, same)
    offsets.v.data.normal_()
    offsets.save(tmp_path / "offsets.safetensors")
    back = HeadOffsets.load(tmp_path / "offsets.safetensors")
    assert back.pairs == offsets.pairs and torch.equal(back.v, offsets.v)


def test_head_patch_same_input_changes_nothing_and_other_input_is_hand_computed(load_model):
    loaded = load_model("tiny-llama")
    clean = encode(loaded, ["The cat sat on the mat."])
    corrupt = encode(loaded, ["The dog ran to the car."])
    assert clean.input_ids.shape == corrupt.input_ids.shape
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(4)]
    with torch.no_grad():
        with headlab.trace(loaded, names, stats=False) as clean_cache:
            plain = loaded.model(**clean).logits
        with headlab.trace(loaded, names, stats=False) as corrupt_cache:
            loaded.model(**corrupt)
        with headlab.intervene(loaded, HeadPatch(every_head([0, 1, 2, 3]), clean_cache)):
            same = loaded.model(**clean).logits
    assert torch.equal(plain, same)

    patch = HeadPatch([(2, 1), (2, 3)], corrupt_cache, rows=[(2, 5)])
    z_clean, _ = z_and_attn_out(loaded, clean, 2)
    _, out = z_and_attn_out(loaded, clean, 2, patch)
    want = z_clean.clone()
    for h in (1, 3):
        want[:, 2:5, h] = corrupt_cache["blocks.2.attn.hook_z"][:, 2:5, h]
    with torch.no_grad():
        torch.testing.assert_close(out, o_proj(loaded, 2, want), atol=1e-6, rtol=1e-5)


def test_head_mean_ablate_uses_the_mean_over_real_tokens(load_model):
    loaded = load_model("tiny-llama")
    reference = encode(loaded, TEXT)  # right padding: the mean skips padding tokens
    with torch.no_grad(), headlab.trace(loaded, ["blocks.1.attn.hook_z"], stats=False) as ref:
        loaded.model(**reference)
    z_ref = ref["blocks.1.attn.hook_z"]
    real = reference.attention_mask.bool()
    mean = z_ref[real].mean(dim=0)  # [head, d_head]
    enc = encode(loaded, TEXT[:1])
    z, _ = z_and_attn_out(loaded, enc, 1)
    _, out = z_and_attn_out(loaded, enc, 1, HeadMeanAblate([(1, 2)], source=ref))
    want = z.clone()
    want[:, :, 2] = mean[2]
    with torch.no_grad():
        torch.testing.assert_close(out, o_proj(loaded, 1, want), atol=1e-5, rtol=1e-5)
    _, given = z_and_attn_out(loaded, enc, 1, HeadMeanAblate([(1, 2)], mean={(1, 2): mean[2]}))
    torch.testing.assert_close(given, out, atol=1e-6, rtol=1e-6)


def test_residual_add_steers_the_chosen_rows(load_model):
    loaded = load_model("tiny-qwen3")
    enc = encode(loaded, TEXT[:2], side="left")
    vector = torch.randn(loaded.arch.hidden_size, generator=torch.Generator().manual_seed(1))
    names = ["blocks.1.hook_resid_post", "blocks.2.hook_mlp_out", "blocks.3.hook_resid_pre"]
    with torch.no_grad():
        with headlab.trace(loaded, names, stats=False) as plain:
            loaded.model(**enc)
        edits = [ResidualAdd(1, vector, "resid_post", scale=2.0, rows="last"),
                 ResidualAdd(2, vector, "mlp_out", rows=[0])]
        with headlab.intervene(loaded, *edits), headlab.trace(loaded, names, stats=False) as steered:
            loaded.model(**enc)
    last = torch.zeros(enc.input_ids.shape, dtype=torch.bool)
    last[:, -1] = True
    want = plain["blocks.1.hook_resid_post"] + 2.0 * vector * last[..., None]
    torch.testing.assert_close(steered["blocks.1.hook_resid_post"], want, atol=1e-6, rtol=1e-6)
    first = enc.attention_mask.int().argmax(-1)  # position 0 = the first real token under left padding
    diff = (steered["blocks.2.hook_mlp_out"] - plain["blocks.2.hook_mlp_out"]).abs().amax(-1)
    for b in range(2):
        assert diff[b, first[b]] > 1.0
    assert (steered["blocks.3.hook_resid_pre"] - plain["blocks.3.hook_resid_pre"]).abs().max() > 0.1


# --------------------------------------------------------------------------------------------------
# The protocol: bit-exact after exit, registry, errors before compute.

@pytest.mark.parametrize("fail", [False, True])
def test_model_is_bit_exact_after_exit(load_model, fail):
    loaded = load_model("tiny-llama")
    enc = encode(loaded, TEXT[:2])
    before_state = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    with torch.no_grad():
        before = loaded.model(**enc).logits
    hooks_before = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in loaded.model.modules())
    edits = [HeadScale([(0, 1)], alpha=3.0), ScoreBoost([(1, None)], keys=[0], alpha=0.5),
             Redistribute([(2, 0)], sources=0, targets="from:1"),
             ResidualAdd(3, torch.ones(loaded.arch.hidden_size), "resid_pre")]
    with pytest.raises(RuntimeError) if fail else torch.no_grad():
        with torch.no_grad(), headlab.intervene(loaded, *edits):
            inside = loaded.model(**enc).logits
            assert (inside - before).abs().max() > 1e-3
            if fail:
                raise RuntimeError("body failed")
    assert loaded.model.config._attn_implementation == "sdpa"
    hooks_after = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in loaded.model.modules())
    assert hooks_after == hooks_before
    after_state = loaded.model.state_dict()
    assert after_state.keys() == before_state.keys()
    assert all(torch.equal(after_state[k], before_state[k]) for k in before_state)
    with torch.no_grad():
        assert torch.equal(loaded.model(**enc).logits, before)


def test_registry_names_every_intervention():
    expected = {"head_scale", "head_mean_ablate", "head_offsets", "head_patch", "score_boost", "score_scale",
                "reweight", "key_knockout", "attention_override", "redistribute", "residual_add"}
    assert expected <= set(INTERVENTIONS)
    assert INTERVENTIONS["score_boost"] is ScoreBoost and ScoreBoost.name == "score_boost"


def assert_input_error(match, loaded, *edits):
    with pytest.raises(InputError, match=match), headlab.intervene(loaded, *edits):
        pytest.fail("the block must not run")


def test_bad_heads_and_layers_name_the_valid_range(load_model):
    loaded = load_model("tiny-llama")
    assert_input_error(r"layer 9 does not exist; this model has layers 0\.\.3", loaded, HeadScale([(9, 0)]))
    assert_input_error(r"head 4 of layer 1 does not exist; this model has heads 0\.\.3", loaded,
                       ScoreBoost([(1, 4)], keys=0, alpha=1.0))
    assert_input_error("unknown position spec", loaded, KeyKnockout([(1, 0)], keys="first"))
    assert_input_error("expected \\[64\\]", loaded, ResidualAdd(0, torch.ones(3)))


def test_patch_cache_from_another_model_or_length_is_refused(load_model):
    llama, gpt2 = load_model("tiny-llama"), load_model("tiny-gpt2")
    enc = encode(llama, ["The cat sat."])
    with torch.no_grad(), headlab.trace(gpt2, ["blocks.1.attn.hook_z"], stats=False) as other:
        gpt2.model(**encode(gpt2, ["The cat sat."]))
    assert_input_error("recorded on 'tiny-gpt2', this model is 'tiny-llama'", llama, HeadPatch([(1, 0)], other))
    fake = {"blocks.1.attn.hook_z": torch.zeros(1, 5, 8, 8)}
    assert_input_error(r"shape \[1, 5, 8, 8\], expected \[batch, pos, 4, 16\]", llama, HeadPatch([(1, 0)], fake))
    short = {"blocks.1.attn.hook_z": torch.zeros(1, 3, 4, 16)}
    calls = []
    hook = llama.arch.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(InputError, match=r"holds \[batch, pos\] = \[1, 3\], this input is \[1, \d+\]"):
            with torch.no_grad(), headlab.intervene(llama, HeadPatch([(1, 0)], short)):
                llama.model(**enc)
    finally:
        hook.remove()
    assert not calls, "the mismatch is caught before the first layer runs"


def test_conflicting_edits_name_both(load_model):
    loaded = load_model("tiny-llama")
    cache = {"blocks.1.attn.hook_z": torch.zeros(1, 4, 4, 16)}
    assert_input_error("HeadPatch on layer 1 and HeadMeanAblate on layer 1 both replace z of layer 1 head 2",
                       loaded, HeadPatch([(1, 2)], cache), HeadMeanAblate([(1, None)], mean={
                           (1, h): torch.zeros(16) for h in range(4)}))
    assert_input_error("Redistribute on layer 2 and KeyKnockout on layer 2 are both post-softmax edits of layer 2 "
                       "head 1", loaded, Redistribute([(2, 1)], sources=0, targets="all"),
                       KeyKnockout([(2, 1)], keys=3))
    assert_input_error("different query rows", loaded, ScoreBoost([(1, 0)], keys=0, alpha=0.5, rows="last"),
                       ScoreScale([(1, 1)], gamma=2.0, rows="all"))
    assert_input_error("flip a score's sign", loaded, ScoreBoost([(1, 0)], keys=0, alpha=1.5),
                       ScoreScale([(1, 0)], gamma=2.0))
    with headlab.intervene(loaded, KeyKnockout([(2, 1)], keys=3)):  # reweightings compose with each other ...
        with headlab.intervene(loaded, AttentionOverride([(2, 1)], keys=[0, 1])):
            pass
        # ... but nested blocks are checked against the outer edits too.
        assert_input_error("both post-softmax edits", loaded, Redistribute([(2, 1)], sources=0, targets="all"))


def test_attention_edit_needs_a_switchable_model(load_model):
    loaded = load_model("tiny-llama")
    plain = types.SimpleNamespace(name="plain", model=torch.nn.Linear(2, 2), arch=loaded.arch)
    assert_input_error("cannot switch its attention implementation", plain, KeyKnockout([(1, 0)], keys=0))
    with headlab.intervene(plain, HeadScale([(1, 0)], alpha=2.0)):  # z edits need no attention function
        pass


def test_many_spans_select_as_the_span_loop():
    """Scattered positions (> 4 spans) go through a lookup table; it must pick exactly what the loop picks."""
    from headlab.kernels.positions import Positions

    gen = torch.Generator().manual_seed(0)
    picks = sorted(set(torch.randint(0, 40, (15,), generator=gen).tolist()))
    many, few = Positions.of(picks), [Positions.of([p]) for p in picks]
    rel = torch.arange(-3, 45)[None].repeat(2, 1)
    real = torch.rand(2, rel.shape[1], generator=gen) > 0.2
    last = torch.tensor([44, 30])
    expected = torch.zeros_like(real)
    for one in few:
        expected |= one.select(rel, real, last)
    assert len(many.items) > 4 and torch.equal(many.select(rel, real, last), expected)
    per_sample = Positions.per_sample([picks, [(0, 2)]])
    assert torch.equal(per_sample.select(rel, real, last)[0], expected[0])
