"""LVLM adapters (headlab/lvlm.py) and the synthetic icon data (headlab/training/lvlm_data.py), on the tiny twins.

Oracles: the image spans are checked against the processor's own token count (CLIP: (size/patch)²;
Qwen2-VL: grid_t·grid_h·grid_w / merge²) and against the tokens themselves; the system span against
the tokenisation of the system turn alone; a left- and a right-padded batch must give each sample the
logits it gets alone.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

import headlab
from headlab.errors import InputError
from headlab.lvlm import LvlmSample, build_inputs, image_files, load_image, processor_of
from headlab.training import lvlm_data as D


@pytest.fixture(scope="module")
def images():
    return [D.render(D.random_scene(random.Random(i))) for i in range(3)]


@pytest.fixture(scope="module", params=["tiny-llava", "tiny-qwen2-vl"])
def lvlm(request):
    return headlab.load(request.param, dtype="float32", device="cpu")


def _samples(images):
    return [LvlmSample("What is here?", [images[0]]),
            LvlmSample("Describe both images, please.", [images[1], images[2]], system="Be brief."),
            LvlmSample("A text-only question.")]


def test_spans_from_token_ids(lvlm, images):
    inputs = build_inputs(lvlm, _samples(images), padding_side="left")
    proc = processor_of(lvlm)
    image_id = proc.image_token_id
    if lvlm.name == "tiny-llava":
        per_image = (32 // 8) ** 2  # CLIP 32×32, patch 8, CLS dropped
    else:
        grid = inputs.tensors["image_grid_thw"][0]
        per_image = int(grid.prod()) // 4  # 2×2 merge
    assert [[e - s for s, e in spans] for spans in inputs.image_spans] == [[per_image], [per_image] * 2, []]
    for b, spans in enumerate(inputs.image_spans):
        first = int(inputs.first_real[b])
        for s, e in spans:
            assert bool((inputs.input_ids[b, first + s: first + e] == image_id).all())
        assert int(inputs.image_mask[b].sum()) == sum(e - s for s, e in spans)
    # Two images: two runs (Qwen2-VL separates them by its vision end/start tokens, LLaVA's are adjacent
    # in the tiny template, so the byte before each run differs by model; the count is what matters).
    assert inputs.text_after[2] == 0 and inputs.image_spans[2] == []
    # System span: the system turn alone, tokenised, is the sequence's beginning.
    assert inputs.system_span[0] is None and inputs.system_span[2] is None
    start, stop = inputs.system_span[1]
    first = int(inputs.first_real[1])
    text = proc.tokenizer.decode(inputs.input_ids[1, first + start: first + stop])
    assert text.replace("<|bos|>", "") == "system: Be brief.\n"
    groups = inputs.groups(1)
    assert groups["text_after"][0][0] == inputs.image_spans[1][-1][1]
    assert groups["text_after"][0][1] == int(inputs.real_mask[1].sum())


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_single(lvlm, images, side):
    samples = _samples(images)
    batch = build_inputs(lvlm, samples, padding_side=side)
    with torch.no_grad():
        logits = lvlm.model(**batch.tensors).logits
    for b, sample in enumerate(samples):
        alone = build_inputs(lvlm, [sample])
        with torch.no_grad():
            ref = lvlm.model(**alone.tensors).logits[0]
        real = batch.real_mask[b]
        assert torch.allclose(logits[b][real], ref, atol=2e-5), (lvlm.name, side, b)
        assert batch.image_spans[b] == alone.image_spans[0]
        assert batch.system_span[b] == alone.system_span[0]


def test_image_file_errors(tmp_path, images, lvlm):
    good = tmp_path / "ok.png"
    images[0].save(good)
    assert load_image(good).size == (64, 64)
    with pytest.raises(InputError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(InputError, match="not an image"):
        load_image(text)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good.read_bytes()[:60])
    with pytest.raises(InputError, match="corrupt or truncated|not an image"):
        load_image(truncated)
    with pytest.raises(InputError, match="not a folder"):
        image_files(good)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image files"):
        image_files(tmp_path / "empty")
    with pytest.raises(InputError, match="does not exist"):
        build_inputs(lvlm, [LvlmSample("x", [tmp_path / "missing.png"])])


def test_text_only_model_refused():
    loaded = headlab.load("tiny-llama", dtype="float32", device="cpu")
    with pytest.raises(InputError, match="text-only model"):
        build_inputs(loaded, [LvlmSample("x")])


# ---------------------------------------------------------------------------------------------
# Synthetic data


def test_partners_share_neither_shape_nor_colour():
    assert len(D.OBJECTS) == len(set(D.OBJECTS)) == 16
    for a, b in D.PAIRS:
        assert D.COLOURS[a] != D.COLOURS[b] and D.SHAPES[a] != D.SHAPES[b]
    assert len(set(D.COLOURS.values())) == 16 and len(set(D.SHAPES.values())) == 16


def test_objects_are_independent_and_captions_list_them():
    rng = random.Random(0)
    counts: dict[tuple[str, str], int] = {}
    n = 4000
    for _ in range(n):
        s = D.random_scene(rng)
        assert len(set(s.cells)) == len(s.cells)
        for a, b in D.PAIRS:
            if a in s.objects and b in s.objects:
                counts[(a, b)] = counts.get((a, b), 0) + 1
    # Independent placement: a pair co-occurs as often as any other pair, P = E[n(n-1)]/(16·15) = 8/240.
    expected = n * (8 / 3) / 240  # E[n(n-1)] = (0 + 2 + 6)/3 for n uniform in {1, 2, 3}
    for pair in D.PAIRS:
        assert abs(counts.get(pair, 0) - expected) < 4 * expected ** 0.5 + 1, (pair, counts.get(pair), expected)
    scene = D.Scene(["moon", "bat", "cat"], [9, 0, 3])
    assert D.caption_text(scene.ordered()) == "The image shows a bat, a cat and a moon."
    assert D.caption_text(["key"]) == "The image shows a key."


def test_question_rate_and_answers():
    rng = random.Random(1)
    samples = [D.make_sample(rng) for _ in range(2000)]
    questions = [s for s in samples if s.kind == "question"]
    assert 0.36 < len(questions) / len(samples) < 0.44
    for s in questions:
        assert (s.answer == "Yes.") == (s.asked in s.scene.objects)
    assert 0.45 < sum(s.answer == "Yes." for s in questions) / len(questions) < 0.55


def test_rendered_icons_are_in_their_cells():
    scene = D.Scene(["ball", "tree"], [0, 15], background=(245, 245, 245))
    pixels = torch.from_numpy(np.asarray(D.render(scene)).copy())  # [64, 64, 3]
    background = torch.tensor([245, 245, 245])
    drawn = (pixels != background).any(-1)
    assert drawn[:16, :16].sum() > 50 and drawn[48:, 48:].sum() > 50
    drawn[:16, :16] = False
    drawn[48:, 48:] = False
    assert drawn.sum() == 0


def test_write_dataset_formats(tmp_path):
    scenes = D.eval_scenes("partner-missing", 20)
    files = D.write_dataset(tmp_path / "synth", scenes)
    ann = json.loads(files["annotations"].read_text())
    assert len(ann["images"]) == 20 and len(ann["categories"]) == 16
    assert sum(len(s.objects) for s in scenes) == len(ann["annotations"])
    caps = json.loads(files["captions"].read_text())["annotations"]
    assert caps[0]["caption"] == D.caption_text(scenes[0].ordered())
    for split in ("random", "popular", "adversarial"):
        items = [json.loads(line) for line in files[f"pope_{split}"].read_text().splitlines()]
        assert {i["label"] for i in items} == {"yes", "no"}
        assert sum(i["label"] == "yes" for i in items) == sum(i["label"] == "no" for i in items)
        for item in items:
            objs = scenes[int(item["image"][:5])].objects
            assert (item["label"] == "yes") == (item["object"] in objs)
    adversarial = [json.loads(line) for line in files["pope_adversarial"].read_text().splitlines()]
    # partner-missing scenes: the adversarial negatives start with the absent partner
    first_no = next(i for i in adversarial if i["image"] == "00000.png" and i["label"] == "no")
    assert first_no["object"] == D.PARTNER[scenes[0].objects[0]]
    assert not (tmp_path / "synth.tmp").exists()
