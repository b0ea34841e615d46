"""gemma3-270m (Gemma-3-270M base, from GGUF): what headlab reads on it, each against an independent reference.

The second real model of the zoo differs from smollm2-135m where it matters for attention analyses:
- 15 of its 18 layers are sliding-window layers (window 512: query i sees keys i - 511 .. i), every sixth
  (5, 11, 17) is global; one KV head for four query heads (GQA 4:1), head_dim 256, query-key norms;
- its tokenizer adds ``<bos>``, so the sink is the BOS token, not the first text token as in SmolLM2 (whose
  tokenizer adds none); answers must be tokenized with ``add_special_tokens=False`` (``tokenizer(" Mary")``
  starts with ``<bos>``, where the SmolLM2 tests could take ``input_ids[0]``).

References: transformers' own eager attention (``output_attentions``), hand reductions of it, hand-written theory
graphs, and plain PyTorch hooks on o_proj for path patching. Measured on the bundled prompts joined and cut to
T = 560 tokens (float32, CPU):
- sliding layers put exactly 0 on keys >= 512 back; global layers put 0.46-0.48 of each row there (mostly BOS);
- BOS alpha (mean attention received, Gu et al.) by head in the global layers: 0.35-0.84 (layer 5),
  0.39-0.56 (11), 0.31-0.65 (17); in sliding layers rows >= 512 cannot see BOS and no key takes its place at
  the window's edge: the oldest key in the window gets 5e-6 .. 1.1e-3 on average;
- IOI ("When Mary and John went to the store, John gave a drink to"): top-1 " Mary", logit(" Mary") -
  logit(" John") = 5.22; the 24 bundled IOI prompts: 5.34 +- 0.24 (s.e.), 24 of 24 positive (smollm2: 4.33, 22/24);
- path patching to the logits (scores x100), 8 IOI prompts (seed 0), all 72 heads: 11.3 (75.4), 12.1 (40.8),
  15.2 (23.7), 15.3 (22.8), 15.0 (14.6), 11.2 (10.0); the most negative 15.1 (-48.4), 13.3 (-27.4), 17.2 (-24.3):
  Gemma has strong negative heads on plain IOI, where smollm2's top IOI heads are all positive (23.3, 29.1,
  23.0). Here 4 prompts and the 20 heads of layers 11-15: 11.3 (79.5), 12.1 (36.5), 15.2 (25.4), 15.3 (23.5);
  15.1 (-51.4), 13.3 (-26.8). Clean LD 4.41, 7.96, 5.49, 2.08; counterfactual -6.39, -7.27, -4.92, -5.94.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from headlab.analyses.circuit_tasks import make_task, tokenize_task
from headlab.analyses.path_patching import path_patching
from headlab.analyses.position_bias import PositionBiasConfig, analyze_position_bias
from headlab.analyses.position_graphs import (
    GraphSpec,
    cumulative_attention,
    mask_graph,
    repeated_attention,
    synthetic_attention,
    walk_count_matrix,
)
from headlab.batching import batches
from headlab.kernels import distance_bin_edges, distance_bins
from headlab.loading import LoadedModel
from headlab.probes import AttentionProbe
from headlab.probes.position import relative_bins
from headlab.prompts import bundled_prompts

pytestmark = pytest.mark.slow

WINDOW = 512
GLOBAL = (5, 11, 17)
LONG = 560  # > WINDOW: rows 512 .. 559 have keys beyond the window
IOI = "When Mary and John went to the store, John gave a drink to"


@pytest.fixture(scope="module")
def gemma(load_model) -> LoadedModel:
    return load_model("gemma3-270m")


def is_sliding(layer: int) -> bool:
    return layer not in GLOBAL


def visible(layer: int, n: int) -> torch.Tensor:
    """``[query, key]`` the keys a query sees, from the layer type alone (causal; window 512 on sliding layers)."""
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    return (j <= i) & ((i - j < WINDOW) if is_sliding(layer) else True)


@pytest.fixture(scope="module")
def long_text() -> str:
    return " ".join(bundled_prompts())


@pytest.fixture(scope="module")
def long_ids(gemma, long_text) -> torch.Tensor:
    (batch,) = batches(gemma, [long_text], LONG, 1)  # the ids analyze_position_bias reads too
    assert batch.input_ids.shape == (1, LONG) and batch.tokens[0][0] == "<bos>"
    return batch.input_ids


@pytest.fixture(scope="module")
def eager_long(gemma, long_ids) -> torch.Tensor:
    """``[layer, head, query, key]`` transformers' eager probabilities of the long prompt (one pass, 90 MB)."""
    model = gemma.model
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model.model(input_ids=long_ids, output_attentions=True)  # no lm_head: 262k-vocab logits unused
    finally:
        model.set_attn_implementation(previous)
    return torch.stack([a[0] for a in out.attentions])


def test_loads_as_gemma3_with_sliding_and_global_layers(gemma):
    arch, config = gemma.arch, gemma.model.config
    assert (arch.model_type, arch.n_layers, arch.n_heads, arch.n_kv_heads, arch.head_dim, arch.hidden_size) == (
        "gemma3_text", 18, 4, 1, 256, 640)
    assert config.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert config.sliding_window == WINDOW and config.attn_logit_softcapping is None
    assert arch.adds_bos and arch.bos_token_id == 2 == gemma.tokenizer(IOI).input_ids[0]
    attention = arch.attention(0)
    assert attention.q_norm is not None and attention.k_norm is not None  # query-key norms
    assert config.query_pre_attn_scalar == arch.head_dim  # scale 1/16 = head_dim ** -0.5


# --------------------------------------------------------------------------------- statistics by layer type


def test_probe_statistics_equal_eager_attention_on_both_layer_types(gemma, long_ids, eager_long):
    """Key mass, alpha, key count, entropy and first-key mass of every query head of every layer equal a hand
    reduction of transformers' eager probabilities, on a prompt longer than the window."""
    with torch.no_grad(), AttentionProbe(gemma) as probe:
        gemma.model.model(input_ids=long_ids)
    assert sorted(probe.last) == list(range(18))
    for layer in range(18):
        p = eager_long[layer].double()  # [head, query, key]
        seen = visible(layer, LONG)
        got = probe.last[layer]
        assert got.key_mass.shape == (1, 4, LONG) and got.entropy.shape == (1, 4, LONG)  # per query head
        key_count = seen.sum(0).double()
        torch.testing.assert_close(got.key_count[0].double(), key_count, atol=0, rtol=0)
        torch.testing.assert_close(got.key_mass[0].double(), p.sum(1), atol=1e-3, rtol=1e-4)
        torch.testing.assert_close((got.key_mass[0] / got.key_count[0]).double(), p.sum(1) / key_count,
                                   atol=2e-6, rtol=1e-4)  # alpha: mean attention received
        entropy = -(p * p.clamp_min(1e-300).log()).sum(-1)
        torch.testing.assert_close(got.entropy[0].double(), entropy, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got.first_mass[0].double(), p[:, :, 0], atol=1e-5, rtol=1e-4)
        # GQA 4:1: the four query heads of the one KV head are four different heads, not one repeated
        assert min((got.key_mass[0, a] - got.key_mass[0, b]).abs().max() for a, b in
                   itertools.combinations(range(4), 2)) > 1e-2
    # A key is seen by at most `window` queries on a sliding layer, by every later query on a global one.
    assert probe.last[0].key_count[0, 0] == WINDOW and probe.last[5].key_count[0, 0] == LONG


def test_sliding_layers_respect_the_window_and_global_layers_do_not(eager_long):
    i, j = torch.arange(LONG)[:, None], torch.arange(LONG)[None, :]
    beyond = i - j >= WINDOW  # keys 512 or more positions back
    for layer in range(18):
        p = eager_long[layer]
        mass_beyond = (p * beyond).sum(-1)[:, WINDOW:]  # [head, rows 512 .. T-1]
        if is_sliding(layer):
            assert p[:, beyond].abs().max() == 0, layer
            # BOS is out of sight for these rows, and nothing takes its place at the window's edge
            oldest = torch.stack([p[:, r, r - WINDOW + 1] for r in range(WINDOW, LONG)], dim=-1)
            assert oldest.mean() < 0.01, (layer, float(oldest.mean()))  # measured <= 1.1e-3
        else:
            assert mass_beyond.mean() > 0.3, (layer, float(mass_beyond.mean()))  # measured 0.46-0.48
            bos_alpha = p[:, :, 0].sum(-1) / LONG  # the BOS sink: alpha of key 0, per head
            assert bos_alpha.mean() > 0.4, (layer, bos_alpha)  # measured 0.61, 0.50, 0.53


# --------------------------------------------------------------------------------------------- position bias


def test_position_bias_profiles_equal_eager_attention_per_layer_type(gemma, long_text, eager_long):
    """analyze_position_bias on the long prompt: distance and key-position profiles equal a hand reduction of eager
    attention; sliding layers have neither pairs nor mass at distances >= 512, the global layers have both."""
    config = PositionBiasConfig(max_tokens=LONG, batch_size=1, rollout_tokens=16, rollout_prompts=1,
                                retrieval_trials=0)
    result = analyze_position_bias(gemma, [long_text], config, progress=False)
    got_mass, got_count = result.tensors["distance_mass"].double(), result.tensors["distance_count"].double()
    n_bins = got_mass.shape[-1]
    i, j = torch.arange(LONG)[:, None], torch.arange(LONG)[None, :]
    bins = distance_bins(i - j)
    far_bins = [b for b, edge in enumerate(distance_bin_edges(n_bins)) if edge >= WINDOW]
    assert far_bins, "the prompt reaches distances beyond the window"
    for layer in range(18):
        seen = visible(layer, LONG)
        p = eager_long[layer].double()
        mass = torch.zeros(4, n_bins, dtype=torch.float64).index_add_(1, bins[seen], p[:, seen])
        count = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins[seen], torch.ones(int(seen.sum()),
                                                                                                dtype=torch.float64))
        torch.testing.assert_close(got_count[layer, 0], count, atol=0, rtol=0)
        # fp32 sums of up to 31k pairs per bin in the kernel: measured relative error up to 1.3e-4
        torch.testing.assert_close(got_mass[layer, :, 0], mass, atol=1e-3, rtol=5e-4)
        assert got_mass[layer, :, 1].abs().max() == 0  # causal: no key after the query
        torch.testing.assert_close(result.tensors["position_mean"][layer, :, :LONG].double(),
                                   p.sum(1) / seen.sum(0), atol=2e-6, rtol=1e-4)
        far_mass, far_pairs = got_mass[layer, :, 0, far_bins], got_count[layer, 0, far_bins]
        if is_sliding(layer):
            assert far_pairs.sum() == 0 and far_mass.abs().max() == 0, layer
        else:
            assert far_pairs.sum() == (LONG - WINDOW) * (LONG - WINDOW + 1) / 2 and far_mass.min() > 0, layer
    assert result.summary["rollout_example_tokens"] == 16
    # The uniform baseline under each layer's own mask: sliding layers get the window's, global layers the causal
    # one (a hand computation from the visibility mask; they differ once the prompt is longer than the window).
    segment_uniform = result.tensors["segment_uniform"].double()
    for layer in range(18):
        seen = visible(layer, LONG).double()
        received = (seen / seen.sum(-1, keepdim=True)).sum(0) / seen.sum(0)
        segment = relative_bins(LONG, 3) + 1
        want = torch.stack([received[segment == s].mean() for s in range(4)])
        torch.testing.assert_close(segment_uniform[layer], want, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(segment_uniform[0], segment_uniform[5])


def test_window_theory_graph_equals_a_hand_computation():
    """GraphSpec's sliding window (i - w < j <= i): uniform attention, its rollout over depth, walk counts and
    content-free RoPE scores equal hand computations for a small window (n = 10, w = 3)."""
    n, w = 10, 3
    spec = GraphSpec("window", n_tokens=n, window=w)
    hand = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(max(0, i - w + 1), i + 1):
            hand[i, j] = 1 / min(i + 1, w)
    assert torch.equal(mask_graph(spec), hand > 0)
    torch.testing.assert_close(synthetic_attention(spec), hand, atol=1e-15, rtol=0)
    rollout = repeated_attention(synthetic_attention(spec), 5)
    residual = repeated_attention(synthetic_attention(spec), 5, residual=True)
    half = (hand + torch.eye(n, dtype=torch.float64)) / 2
    for t in range(5):
        torch.testing.assert_close(rollout[t], torch.linalg.matrix_power(hand, t + 1))
        torch.testing.assert_close(residual[t], torch.linalg.matrix_power(half, t + 1))
    torch.testing.assert_close(cumulative_attention(hand.expand(5, n, n)), rollout)
    # every row drains towards the first token, slowly under a window: the rollout's first column grows with depth
    assert (rollout[4][:, 0] >= rollout[0][:, 0] - 1e-12).all() and rollout[4][-1, 0] > 0
    # walks of length t from j to i along edges j -> i (i may attend to j), enumerated one path at a time
    edges = hand > 0
    for t in (1, 2, 3):
        counts = walk_count_matrix(edges, t)
        for i, j in itertools.product(range(n), repeat=2):
            paths = sum(all(edges[b, a] for a, b in zip((j, *mid), (*mid, i), strict=True))
                        for mid in itertools.product(range(n), repeat=t - 1))
            assert counts[i, j] == paths, (t, i, j)


def test_window_rope_theory_equals_gemmas_own_rotary_embedding(gemma):
    """The content-free RoPE graph for a window equals scores from Gemma's own sliding-layer RoPE (base 10000)
    applied to one constant vector, softmaxed over the window by hand."""
    n, w, d = 12, 4, gemma.arch.head_dim
    rotary = gemma.model.model.rotary_emb
    positions = torch.arange(n)[None]
    x = torch.ones(1, n, d)
    cos, sin = rotary(x, positions, "sliding_attention")
    c = torch.ones(n, d, dtype=torch.float64)
    rotated = c * cos[0].double() + torch.cat([-c[:, d // 2:], c[:, : d // 2]], dim=-1) * sin[0].double()
    scores = rotated @ rotated.T / math.sqrt(d)
    allowed = visible(0, n) & (torch.arange(n)[:, None] - torch.arange(n)[None, :] < w)
    hand = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    spec = GraphSpec("window", n_tokens=n, window=w, encoding="rope", rope_base=10000.0, head_dim=d)
    assert gemma.model.config.rope_parameters["sliding_attention"]["rope_theta"] == 10000.0
    torch.testing.assert_close(synthetic_attention(spec), hand, atol=1e-5, rtol=1e-5)  # fp32 cos/sin of the model
    assert float(hand[-1, -1]) > float(hand[-1, -w])  # within-window recency


# ------------------------------------------------------------------------------------------------------- IOI


def test_ioi_prompt_prefers_the_indirect_object(gemma):
    tok = gemma.tokenizer
    enc = tok(IOI, return_tensors="pt")
    with torch.no_grad():
        logits = gemma.model(**enc, logits_to_keep=1).logits[0, -1]
    mary, john = (tok(name, add_special_tokens=False).input_ids for name in (" Mary", " John"))
    assert len(mary) == len(john) == 1
    assert tok.decode(int(logits.argmax())) == " Mary"
    assert float(logits[mary[0]] - logits[john[0]]) > 2.0  # measured 5.22


SENDERS = [(layer, h) for layer in range(11, 16) for h in range(4)]  # where the full scan's top and bottom heads sit


@pytest.fixture(scope="module")
def ioi_batch(gemma):
    return tokenize_task(gemma, make_task("ioi", 4, seed=0, tokenizer=gemma.text_tokenizer))


def _final_z_and_ld(gemma, batch, ids, patch=None):
    """Plain o_proj pre-hooks, no headlab: record z ``{layer: [batch, H * d]}`` at the final column, or set it there
    from ``patch``; returns (z, LD [batch], whether the answer is the top-1 token [batch]), with
    LD = logit(answer) - logit(cf answer)."""
    arch, recorded = gemma.arch, {}

    def hook_of(layer):
        def hook(module, args):
            recorded[layer] = args[0][:, -1].clone()
            if patch is not None:
                x = args[0].clone()
                x[:, -1] = patch[layer]
                return (x, *args[1:])
            return None

        return hook

    handles = [arch.o_proj(layer).register_forward_pre_hook(hook_of(layer)) for layer in range(arch.n_layers)]
    try:
        with torch.no_grad():
            logits = gemma.model(input_ids=ids, attention_mask=batch.attention_mask, logits_to_keep=1).logits[:, -1]
    finally:
        for handle in handles:
            handle.remove()
    rows = torch.arange(len(ids))
    ld = (logits[rows, batch.answer_ids] - logits[rows, batch.cf_answer_ids]).double()
    return recorded, ld, logits.argmax(-1) == batch.answer_ids


def test_path_patching_equals_a_hand_computation_and_finds_the_movers(gemma, ioi_batch):
    """Exact path patching to the logits (KV-cached single-token passes, several senders per pass) against plain
    hooks on full forwards: score = 100 (mean LD_patched - mean LD_clean) / (mean LD_cf - mean LD_clean), with
    the sender's z at the final position from the counterfactual run and every other head's frozen to clean.
    The total effect: every head patched at once gives the counterfactual run exactly (the final token is the same
    in both prompts), i.e. LD_clean - LD_patched = LD_clean - LD_cf, a score of 100."""
    batch = ioi_batch
    clean_z, ld_clean, top1 = _final_z_and_ld(gemma, batch, batch.clean_ids)
    cf_z, ld_cf, _ = _final_z_and_ld(gemma, batch, batch.cf_ids)
    assert bool(top1.all()) and bool((ld_clean > 0).all()) and bool((ld_cf < 0).all())
    scores = path_patching(gemma, batch, SENDERS, senders_per_pass=len(SENDERS))
    ranked = [SENDERS[int(i)] for i in torch.argsort(scores, descending=True)]
    by_head = dict(zip(SENDERS, scores.tolist(), strict=True))
    assert ranked[0] == (11, 3) and 50 < by_head[(11, 3)] < 100, by_head  # measured 79.5
    assert (12, 1) in ranked[:3], ranked[:6]  # measured 36.5, second
    assert ranked[-1] == (15, 1) and by_head[(15, 1)] < -20, by_head  # a negative mover: measured -51.4
    _, ld_all, _ = _final_z_and_ld(gemma, batch, batch.clean_ids, patch=cf_z)
    torch.testing.assert_close(ld_all, ld_cf, atol=2e-3, rtol=0)
    d = gemma.arch.head_dim
    for layer, head in [(11, 3), (15, 1)]:
        patch = {k: v.clone() for k, v in clean_z.items()}
        patch[layer][:, head * d:(head + 1) * d] = cf_z[layer][:, head * d:(head + 1) * d]
        _, ld, _ = _final_z_and_ld(gemma, batch, batch.clean_ids, patch=patch)
        want = 100 * (ld.mean() - ld_clean.mean()) / (ld_cf.mean() - ld_clean.mean())
        assert by_head[(layer, head)] == pytest.approx(float(want), abs=0.05), (layer, head)
