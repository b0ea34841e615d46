"""The testbed's measurements against hand computations: the partner effect's counts and intervals, POPE's false
yes per split, and visual sinks by origin (an encoder outlier made on purpose must be found, and nothing else)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from headlab.analyses.cooccurrence import (
    auc,
    auc_interval,
    false_yes_by_partner,
    false_yes_by_split,
    opportunities,
    partner_effect,
    wilson,
    yes_margin_table,
)

VOCAB = ["dog", "cat", "saw", "hammer", "apple", "key"]
PARTNER = {"dog": "cat", "cat": "dog", "saw": "hammer", "hammer": "saw"}


def test_wilson_interval_matches_the_formula():
    low, high = wilson(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)
    assert np.isnan(wilson(0, 0)[0])


def test_partner_effect_counts_by_hand():
    captions = ["The image shows a dog and a cat.", "The image shows a saw and an apple.",
                "The image shows an apple and a key."]
    present = [{"dog"}, {"saw"}, {"apple"}]
    counts = opportunities(captions, present, PARTNER, VOCAB, {w: w for w in VOCAB})
    # image 0: cat is a partner opportunity, named; saw, hammer, apple, key: others, none named.
    # image 1: hammer a partner opportunity, not named; dog, cat, key: others not named; apple named (other).
    # image 2: no partner opportunity; dog, cat, saw, hammer not named, key named.
    assert counts.tolist() == [[1, 0, 0, 4], [0, 1, 1, 3], [0, 0, 1, 4]]
    effect = partner_effect(captions, present, PARTNER, VOCAB, resamples=200)
    assert effect["partner_named_rate"] == pytest.approx(1 / 2)
    assert effect["other_named_rate"] == pytest.approx(2 / 13)
    assert effect["rate_ratio"] == pytest.approx((1 / 2) / (2 / 13))
    low, high = effect["rate_difference_ci"]
    assert low <= effect["rate_difference"] <= high


def test_auc_counts_pairs_by_hand():
    # pairs (a, b): 3 > 1, 3 > 2, 3 = 3 (half), 2 > 1, 2 = 2 (half), 2 < 3: (3 + 2 · 0.5) / 6
    assert auc([3, 2], [1, 2, 3]) == pytest.approx(4 / 6)
    assert auc([1, 1], [2]) == 0.0 and auc([0.5], [0.5]) == 0.5
    value, low, high = auc_interval([3, 2, 4, 5], [1, 2, 0, 1], resamples=300)
    assert value == pytest.approx(15.5 / 16) and low <= value <= high <= 1


def test_yes_margin_table_reads_grounding_and_co_occurrence():
    margins = [2.0, 1.5, 0.5, -0.2, 0.1, 0.3, -1.0, -2.0, -0.5]
    kinds = ["present"] * 3 + ["partner"] * 3 + ["other"] * 3
    table = yes_margin_table(margins, kinds, resamples=200)
    assert table["present"]["yes_rate"] == 1.0 and table["partner"]["yes_rate"] == pytest.approx(2 / 3)
    assert table["other"]["yes_rate"] == 0.0 and table["other"]["mean_margin"] == pytest.approx(-3.5 / 3)
    assert table["auc_partner_vs_other"]["auc"] == 1.0  # every partner margin above every other one
    # present vs the six absent: 2.0, 1.5 and 0.5 are above every absent margin (the largest is 0.3)
    assert table["auc_present_vs_absent"]["auc"] == pytest.approx(18 / 18)


def test_false_yes_by_partner_counts_by_hand():
    said = ["yes", "no", "yes", "yes", "no", "no"]
    objects = ["cat", "hammer", "dog", "key", "apple", "saw"]
    present = [{"dog"}, {"saw"}, {"dog"}, {"dog"}, {"saw"}, {"dog"}]
    # cat | dog: partner, yes; hammer | saw: partner, no; dog | dog: present, skipped; key, apple, saw: other
    out = false_yes_by_partner(said, objects, present, PARTNER)
    assert (out["partner"]["false_yes"], out["partner"]["no_questions"]) == (1, 2)
    assert (out["other"]["false_yes"], out["other"]["no_questions"]) == (1, 3)
    assert 0 < out["fisher_p_partner_more"] <= 1


def test_false_yes_by_split():
    questions = {"random": [{"label": "no"}] * 4 + [{"label": "yes"}] * 2,
                 "adversarial": [{"label": "no"}] * 4 + [{"label": "yes"}] * 2}
    answers = {"random": ["No", "No", "No", "Yes", "Yes", "Yes"],
               "adversarial": ["Yes", "Yes", "Yes", "No", "Yes", "No"]}
    out = false_yes_by_split(answers, questions)
    assert out["random"]["false_yes_rate"] == pytest.approx(0.25)
    assert out["adversarial"]["false_yes_rate"] == pytest.approx(0.75)
    assert 0 < out["adversarial"]["fisher_p_more_than_random"] < 0.5


def test_sinks_by_origin_finds_an_encoder_outlier_made_on_purpose():
    import headlab
    from headlab.analyses.visual_sink_origin import encoder_outliers, sinks_by_origin
    from headlab.analyses.visual_sinks import visual_sinks
    from headlab.lvlm import LvlmSample, build_inputs
    from headlab.training import lvlm_data as D

    loaded = headlab.load("tiny-llava", dtype="float32", device="cpu")
    images = [D.render(s).resize((32, 32)) for s in D.eval_scenes("in-distribution", 2, seed=3)]
    inputs = build_inputs(loaded, [LvlmSample("Describe the image.", [im]) for im in images])
    tower = loaded.model.model.vision_tower
    layer = loaded.model.config.vision_feature_layer
    encoder_layers = getattr(tower, "vision_model", tower).encoder.layers
    # hidden_states[layer] is the output of encoder layer (layer - 1) counted from the embeddings: scale patch 5
    # (token 6, after CLS) of image 0 tenfold there.
    target = encoder_layers[len(encoder_layers) + layer] if layer < 0 else encoder_layers[layer - 1]

    def boost(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        hidden[0, 6] *= 10
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = target.register_forward_hook(boost)
    try:
        norms, cosine = encoder_outliers(loaded, inputs.tensors["pixel_values"])
        with torch.no_grad():
            hidden = tower(inputs.tensors["pixel_values"], output_hidden_states=True).hidden_states[layer][:, 1:]
        assert torch.allclose(norms, hidden.norm(dim=-1), atol=1e-5)
        found = sinks_by_origin(loaded, inputs, tau=2.0)
        lm = visual_sinks(loaded, inputs, tau=2.0)
    finally:
        handle.remove()
    flagged = found.table[found.table.vit_high_norm]
    assert list(zip(flagged["sample"], flagged["patch"], strict=True)) == [(0, 5)]
    # The LM side is visual_sinks' own verdict, token by token.
    expected = int(lm.visual.any(dim=0).sum())
    assert int(found.table.lm_sink.sum()) == expected == found.summary["lm_sink_tokens"]
    assert found.summary["encoder_high_norm_tokens"] == 1
