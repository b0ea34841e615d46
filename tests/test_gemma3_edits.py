"""Interventions on gemma3-270m, each against a hand computation: transformers' eager attention with the edit
applied by hand to z, to the pre-softmax scores or to the probabilities (a replacement for
``modeling_gemma3.eager_attention_forward``, no headlab code on the reference path); KV-cached generation across
the 512-token window against a no-cache recomputation; LoFiT offsets saved, reloaded and exported.

Gemma-specific: one KV head serves the four query heads (GQA 4:1), so every edit here names query heads and the
hand reference edits exactly those (the other heads of the shared KV head must be left alone); sliding layers keep
only the last 511 keys in the KV cache (``DynamicSlidingWindowLayer``), so while decoding past position 511 a
sliding layer's key column j is position ``kv_offset + j``, not j: the generation test puts key-position edits on
sliding and global layers and crosses that point.

Measured (float32, CPU; IOI prompt, 15 tokens): hand references vs headlab, max |Δlogit| 2.3e-5 .. 3.2e-5;
each test's edits move the logits by far more: 8.5 (head scale / ablation), 2.6 (knockouts; each part alone
1.9 and 2.6), 5.0 (score edits; each part alone 6.4, 2.3, 1.6).
Generation: 506-token prompt + 12 new tokens, max |Δlogit| per step 1.5e-5 .. 3.5e-5 against the recomputation,
while the same knockout shifted by one position differs from it by 0.09 .. 0.19 per step. LoFiT export: the
plain transformers model loaded from the exported folder matches the hooked model to 1.6e-5.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
import torch
import transformers.models.gemma3.modeling_gemma3 as modeling_gemma3
from transformers import AutoModelForCausalLM, AutoTokenizer

import headlab
from headlab.analyses.configs import LofitConfig
from headlab.analyses.generation import greedy
from headlab.analyses.lofit import offsets_of, train_offsets
from headlab.analyses.lofit_data import SFTItem
from headlab.analyses.lofit_export import export_offsets
from headlab.batching import batches
from headlab.interventions import HeadOffsets, HeadScale, KeyKnockout, ScoreBoost, ScoreScale, every_head
from headlab.loading import LoadedModel
from headlab.prompts import bundled_prompts
from headlab.tasks import ioi_prompts

pytestmark = pytest.mark.slow

IOI = "When Mary and John went to the store, John gave a drink to"
TOL = 1e-4  # hand eager vs headlab on the 15-token prompt: measured <= 3.2e-5


@pytest.fixture(scope="module")
def gemma(load_model) -> LoadedModel:
    return load_model("gemma3-270m")


@pytest.fixture(scope="module")
def ioi_ids(gemma) -> torch.Tensor:
    ids = gemma.tokenizer(IOI, return_tensors="pt").input_ids
    assert ids.shape == (1, 15) and int(ids[0, 0]) == gemma.arch.bos_token_id  # Mary at 2, John at 4 and 10
    return ids


@pytest.fixture(scope="module")
def clean(gemma, ioi_ids) -> torch.Tensor:
    with torch.no_grad():
        return gemma.model(input_ids=ioi_ids).logits[0]


Edit = Callable[[int, torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def hand_eager(loaded: LoadedModel, scores: Edit | None = None, probs: Edit | None = None, z: Edit | None = None):
    """The model on transformers' eager attention, computed here: s = q k^T · scaling (GQA: the KV head repeated
    for its query heads), ``scores(layer, s)``, + the model's own additive mask (causal, window 512 on sliding
    layers), softmax, ``probs(layer, p)``, z = p v, ``z(layer, z [batch, query, head, d_head])``."""

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kwargs):
        assert softcap is None and scaling is not None and not module.training
        layer = module.layer_idx
        keys = modeling_gemma3.repeat_kv(key, module.num_key_value_groups)
        values = modeling_gemma3.repeat_kv(value, module.num_key_value_groups)
        s = query @ keys.transpose(2, 3) * scaling  # [batch, head, query, key]
        if scores is not None:
            s = scores(layer, s.clone())
        p = torch.softmax(s + attention_mask, dim=-1)
        if probs is not None:
            p = probs(layer, p.clone())
        out = (p @ values).transpose(1, 2).contiguous()  # [batch, query, head, d_head]: z before o_proj
        if z is not None:
            out = z(layer, out.clone())
        return out, p

    model, original = loaded.model, modeling_gemma3.eager_attention_forward
    previous = model.config._attn_implementation
    modeling_gemma3.eager_attention_forward = attention  # Gemma3Attention looks it up at each call for "eager"
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
        modeling_gemma3.eager_attention_forward = original


def run(loaded, ids, *edits, **hand) -> torch.Tensor:
    """Logits ``[query, vocab]``: headlab with ``edits``, or the hand reference with ``hand`` edits."""
    with torch.no_grad():
        if hand or not edits:
            with hand_eager(loaded, **hand) if hand else contextlib.nullcontext():
                return loaded.model(input_ids=ids).logits[0]
        with headlab.intervene(loaded, *edits):
            return loaded.model(input_ids=ids).logits[0]


def test_hand_reference_is_the_model(gemma, ioi_ids, clean):
    """Without edits the hand eager attention gives the model's (sdpa) logits: the reference is sound."""
    assert (run(gemma, ioi_ids, scores=lambda layer, s: s) - clean).abs().max() < TOL


def test_head_scale_and_ablation_equal_hand_edited_z(gemma, ioi_ids, clean):
    edits = [HeadScale([(3, 0), (5, 1), (11, 2)], alpha=[2.5, 0.0, 0.0]),  # scale one head, ablate two
             HeadScale([(8, 3)], alpha=0.0, rows="last")]  # the last row only

    def z(layer, z):
        for lay, head, alpha in ((3, 0, 2.5), (5, 1, 0.0), (11, 2, 0.0)):
            if layer == lay:
                z[:, :, head] *= alpha
        if layer == 8:
            z[:, -1, 3] = 0
        return z

    got, want = run(gemma, ioi_ids, *edits), run(gemma, ioi_ids, z=z)
    assert (got - want).abs().max() < TOL
    assert (want - clean).abs().max() > 1.0  # measured 8.5: the edit matters
    assert torch.equal(run(gemma, ioi_ids), clean)  # bit-exact after


def test_key_knockout_equals_hand_renormalised_probabilities(gemma, ioi_ids, clean):
    """BOS (the sink) and " Mary" removed from the last row of every head of a sliding (3) and a global (5) layer,
    and keys 1..3 from every row of one query head (8.1) of the shared KV head; rows renormalised by hand."""
    edits = [KeyKnockout(every_head([3, 5]), keys=[0, 2], rows="last"), KeyKnockout([(8, 1)], keys=(1, 4))]

    def probs(layer, p):
        if layer in (3, 5):
            last = p[:, :, -1]
            last[..., [0, 2]] = 0
            p[:, :, -1] = last / last.sum(-1, keepdim=True)
        if layer == 8:
            head = p[:, 1]
            head[..., 1:4] = 0
            p[:, 1] = head / head.sum(-1, keepdim=True)
        return p

    got, want = run(gemma, ioi_ids, *edits), run(gemma, ioi_ids, probs=probs)
    assert (got - want).abs().max() < TOL
    assert (want - clean).abs().max() > 1.0  # measured 2.6
    assert torch.equal(run(gemma, ioi_ids), clean)


def test_score_edits_equal_hand_edited_scores(gemma, ioi_ids, clean):
    """ScoreBoost (PAI / PAINT: s += alpha |s|) on keys 1..3 of two query heads of a sliding layer, ScoreScale
    (s *= gamma) on every key of every head of a global layer; s is the scaled logit q k^T / 16, before the mask."""
    edits = [ScoreBoost([(4, 0), (4, 2)], keys=(1, 4), alpha=0.7), ScoreScale(every_head([11]), gamma=0.5),
             ScoreBoost([(14, 3)], keys=0, alpha=0.5, rows="last")]

    def scores(layer, s):
        if layer == 4:
            part = s[:, [0, 2], :, 1:4]
            s[:, [0, 2], :, 1:4] = part + 0.7 * part.abs()
        if layer == 11:
            s = s * 0.5
        if layer == 14:
            s[:, 3, -1, 0] += 0.5 * s[:, 3, -1, 0].abs()
        return s

    got, want = run(gemma, ioi_ids, *edits), run(gemma, ioi_ids, scores=scores)
    assert (got - want).abs().max() < TOL
    assert (want - clean).abs().max() > 1.0  # measured 5.0
    assert torch.equal(run(gemma, ioi_ids), clean)


# ----------------------------------------------------------------------------- generation across the window

PROMPT = 506
NEW = 12  # decoding steps read positions 506 .. 516; from 512 on, the sliding cache no longer starts at position 0


def test_cached_generation_across_the_window_equals_recomputation(gemma):
    """Greedy generation with edits, KV cache on (transformers' sliding-window cache drops keys older than 511),
    against recomputation without a cache: one causal forward over prompt + new tokens gives at row p exactly the
    logits of a no-cache forward over the first p + 1 tokens (causal and sliding masks look back only), so its last
    ``NEW`` rows are every step of a no-cache greedy loop. The edits act on every row, name key positions on
    sliding (2, 4) and global (5, 11) layers, and ablate a head."""
    (batch,) = batches(gemma, [" ".join(bundled_prompts())], PROMPT, 1)
    ids = batch.input_ids
    edits = [KeyKnockout(every_head([2, 5]), keys=(300, 310)),
             ScoreBoost([(4, None), (11, 1)], keys=(200, 220), alpha=0.5),
             HeadScale([(7, 1)], alpha=0.0)]
    cached: list[tuple[int, int]] = []

    def spy(module, args, kwargs, output):  # how many keys the sliding layer 0 holds at each step
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        cached.append((kwargs["hidden_states"].shape[1], int(cache.layers[0].keys.shape[-2])))

    handle = gemma.arch.attention(0).register_forward_hook(spy, with_kwargs=True)
    try:
        new, step_scores = greedy(gemma, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, NEW,
                                  edits=edits, return_scores=True)
    finally:
        handle.remove()
    assert new.shape == (1, NEW)
    # the premise: the last steps ran on a sliding cache holding 511 of the 517 positions processed
    assert cached[0] == (PROMPT, PROMPT) and cached[-1] == (1, 511) and len(cached) == NEW

    sequence = torch.cat([ids, new], dim=1)
    with torch.no_grad(), headlab.intervene(gemma, *edits):
        recomputed = gemma.model(input_ids=sequence[:, :-1], logits_to_keep=NEW).logits[0]
    assert torch.equal(recomputed.argmax(-1), new[0])
    diff = (recomputed - step_scores[0]).abs().max(dim=-1).values
    assert diff.max() < 1e-3, diff  # measured <= 3.5e-5; a knockout off by one position: >= 0.09 per step


# --------------------------------------------------------------------------------------------- LoFiT round trip


def test_lofit_offsets_round_trip_and_export(gemma, tmp_path, ioi_ids, clean):
    """LoFiT step 2 on four IOI items (2 steps), then: save -> load gives bit-identical edits; exported into o_proj's
    bias (Gemma3's o_proj has none: ``attention_bias`` adds it, and zero q/k/v biases), the folder loads with plain
    transformers and gives the hooked model's logits (fp32, 18 layers: measured max |Δlogit| 1.6e-5)."""
    items = [SFTItem(e.prompt, e.correct) for e in ioi_prompts()[:4]]
    pairs = [(11, 3), (12, 1), (15, 2)]
    trained = train_offsets(gemma, items, pairs, LofitConfig(lr=5e-2, lambda_l1=0.0, epochs=2, batch_size=4))
    curve = trained.tables["curve"]["task_loss"].tolist()
    assert len(curve) == 2 and curve[-1] < curve[0], curve  # measured 0.39 -> 0.07
    offsets = offsets_of(trained)
    assert offsets.pairs == pairs and tuple(offsets.v.shape) == (3, 256) and not offsets.A.abs().any()

    hooked = run(gemma, ioi_ids, offsets)
    assert (hooked - clean).abs().max() > 1.0  # measured 5.9
    assert torch.equal(run(gemma, ioi_ids), clean)
    path = offsets.save(tmp_path / "offsets.safetensors")
    again = HeadOffsets.load(path)
    assert again.pairs == pairs and torch.equal(again.v, offsets.v) and torch.equal(again.A, offsets.A)
    assert torch.equal(run(gemma, ioi_ids, again), hooked)

    folder = export_offsets(gemma, offsets, tmp_path / "exported")
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert type(plain).__name__ == "Gemma3ForCausalLM" and plain.config.attention_bias
    biased = {layer for layer in range(18) if plain.model.layers[layer].self_attn.o_proj.bias.abs().max() > 0}
    assert biased == {11, 12, 15}
    assert AutoTokenizer.from_pretrained(folder)(IOI).input_ids == ioi_ids[0].tolist()
    with torch.no_grad():
        exported = plain(input_ids=ioi_ids).logits[0]
    assert (exported - hooked).abs().max() < 2e-4
    assert torch.equal(run(gemma, ioi_ids), clean)  # the loaded model untouched by the export
