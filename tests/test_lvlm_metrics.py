"""CHAIR, POPE and the paired bootstrap (analyses/hallucination_metrics.py) against hand counts, read from
the synthetic set's public-format files (headlab/lvlm_data.write_dataset)."""

from __future__ import annotations

import numpy as np
import pytest

from headlab.analyses.hallucination_metrics import (
    ChairCounts,
    chair,
    load_coco_objects,
    load_pope,
    load_synonyms,
    mentioned,
    paired_bootstrap_chair_i,
    pope_answer,
    pope_metrics,
)
from headlab.errors import InputError
from headlab.training import lvlm_data as D


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    scenes = [D.Scene(["bat", "cat"], [0, 5]), D.Scene(["moon"], [3]), D.Scene(["key", "hat", "tree"], [1, 2, 9])]
    return scenes, D.write_dataset(tmp_path_factory.mktemp("synth") / "set", scenes)


def test_chair_by_hand(synth):
    scenes, files = synth
    truth = load_coco_objects(files["annotations"])
    assert truth == {"00000.png": {"bat", "cat"}, "00001.png": {"moon"}, "00002.png": {"key", "hat", "tree"}}
    synonyms = load_synonyms(files["synonyms"])
    captions = ["The image shows a bat, a ball and a cat.",  # 3 mentions, 1 hallucinated (ball)
                "The image shows a moon and two stars.",  # plural counts: star hallucinated
                "The image shows a key, a hat and a tree. A key!"]  # repeated key counts once
    counts = chair(captions, [truth[f"{i:05d}.png"] for i in range(3)], synonyms)
    assert counts.mentions.tolist() == [3, 2, 3] and counts.hallucinated.tolist() == [1, 1, 0]
    assert counts.chair_i == pytest.approx(2 / 8) and counts.chair_s == pytest.approx(2 / 3)
    assert mentioned("A Bat and BALLS", synonyms) == ["bat", "ball"]
    with pytest.raises(InputError, match="captions for"):
        chair(captions[:2], [set()], synonyms)


def test_simple_matcher_agrees_with_chair_eval_on_synthetic_captions(synth):
    """The old exact-word matcher and the reference-style matcher (counting each object once) give the same
    counts on the synthetic set's own captions and on typical llava-smol outputs."""
    from headlab.analyses.hallucination_metrics import ChairMatcher, chair_eval, load_synonym_list

    scenes, files = synth
    synonyms = load_synonyms(files["synonyms"])
    truth = [set(s.objects) for s in scenes]
    captions = ["The image shows a bat, a ball and a cat.", "The image shows a moon and two stars.",
                "The image shows a key, a hat and a tree. A key!"]
    old = chair(captions, truth, synonyms)
    new = chair_eval(captions, truth, ChairMatcher(load_synonym_list(files["synonyms"]), "builtin"), count="unique")
    assert old.mentions.tolist() == new.mentions.tolist() and old.hallucinated.tolist() == new.hallucinated.tolist()
    every = chair_eval(captions, truth, ChairMatcher(load_synonym_list(files["synonyms"]), "builtin"))
    assert every.mentions.tolist() == [3, 2, 4]  # the reference counts the repeated key twice


def test_synonym_lines(tmp_path):
    path = tmp_path / "syn.txt"
    path.write_text("person, man, woman\ndog, puppy\n")
    table = load_synonyms(path)
    assert table == {"person": "person", "man": "person", "woman": "person", "dog": "dog", "puppy": "dog"}
    assert mentioned("a woman walks a puppy", table) == ["person", "dog"]
    with pytest.raises(InputError, match="does not exist"):
        load_synonyms(tmp_path / "none.txt")


def test_pope_by_hand(synth, tmp_path):
    _, files = synth
    items = load_pope(files["pope_random"])
    assert len(items) == 2 * (2 + 1 + 3)
    assert pope_answer("Yes.") == "yes" and pope_answer("No, there is not.") == "no"
    assert pope_answer("There is no cat") == "no" and pope_answer("Nothing") == "yes"  # the official word rule
    answers = ["Yes.", "Yes.", "No.", "No."]
    labels = ["yes", "no", "yes", "no"]
    m = pope_metrics(answers, labels)
    assert (m["accuracy"], m["precision"], m["recall"], m["f1"], m["yes_ratio"]) == (0.5, 0.5, 0.5, 0.5, 0.5)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png", "text": "Is there a cat?", "label": "maybe"}\n')
    with pytest.raises(InputError, match="bad.jsonl:1"):
        load_pope(bad)


def test_paired_bootstrap():
    base = ChairCounts(np.array([2, 2, 2, 2]), np.array([1, 0, 1, 0]), np.array([5, 5, 5, 5]))
    same = paired_bootstrap_chair_i(base, base)
    assert same["delta"] == 0 and same["ci_low"] == 0 and same["ci_high"] == 0
    better = ChairCounts(base.mentions, np.array([0, 0, 0, 0]), base.length)
    out = paired_bootstrap_chair_i(base, better, n=500)
    assert out["delta"] == pytest.approx(-0.25)
    assert out["ci_low"] <= -0.25 <= out["ci_high"] <= 0
    with pytest.raises(InputError, match="same images"):
        paired_bootstrap_chair_i(base, ChairCounts(np.array([1]), np.array([0]), np.array([1])))


def test_prior_effect_counts_by_hand():
    from headlab.analyses.llava_smol_eval import prior_effect

    scenes = [D.Scene(["bat"], [0]), D.Scene(["cat", "pen"], [0, 1])]
    captions = ["The image shows a bat and a ball.",  # partner of bat named
                "The image shows a cat, a pen and a moon."]  # moon: absent, partner of nothing present
    out = prior_effect(captions, scenes)
    # absent objects: 15 in scene 0 (1 partner: ball), 14 in scene 1 (2 partners: dog, pencil)
    assert out["table_named_notnamed"] == {"partner": [1, 2], "other": [1, 25]}
    assert out["partner_named_rate"] == pytest.approx(1 / 3)
    assert out["other_absent_named_rate"] == pytest.approx(1 / 26)
