"""llava-smol: the bundled vision tower + projector on frozen smollm2-135m (headlab/zoo/llava_smol.py).

The language model must be exactly smollm2-135m (same tensors, so the same text-only prior:
P(" ball" | "The image shows a bat and a") = 0.93 under the chat template, measured with
smollm2-135m alone); the checkpoint holds only the trained parts; the key groups come from the token
ids (16 image tokens, SmolLM2's default system turn); and the trained model reads the icons
(teacher-forced answer-token accuracy on held-out captions and questions, threshold below the value
measured on the committed checkpoint, see THRESHOLDS).
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors import safe_open

import headlab
from headlab.errors import ModelFilesError
from headlab.lvlm import LvlmSample, build_inputs
from headlab.training import lvlm_data as D
from headlab.zoo import llava_smol as L

pytestmark = pytest.mark.slow

# Measured on the committed checkpoint (see training.json): caption / question answer-token accuracy
# on 32 held-out samples (seed 999), teacher forced. The thresholds leave a margin for bf16/fp32 noise.
THRESHOLDS = {"caption_token_acc": 0.95, "question_token_acc": 0.95}  # measured 1.0 and 1.0 (step 900)


@pytest.fixture(scope="module")
def llava():
    return headlab.load("llava-smol", dtype="float32", device="cpu")


def test_checkpoint_holds_only_the_trained_parts():
    path = L.FOLDER / L.WEIGHTS
    assert path.stat().st_size < 6_000_000
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith(("model.vision_tower.", "model.multi_modal_projector.")) for k in keys)
    training = json.loads((L.FOLDER / "training.json").read_text())
    assert training["command"].startswith("headlab zoo train llava-smol")
    assert training["language_model"] == "smollm2-135m (frozen)"


def test_language_model_is_smollm2(llava):
    smol = headlab.load("smollm2-135m", dtype="float32", device="cpu")
    theirs = dict(smol.model.model.named_parameters())
    for name, param in llava.model.model.language_model.named_parameters():
        assert torch.equal(param, theirs[name]), name
    tok = llava.text_tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "Describe the image."}], tokenize=False,
                                   add_generation_prompt=True) + "The image shows a bat and a"
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        p = llava.model(input_ids=ids).logits[0, -1].softmax(-1)
    assert p[tok(" ball", add_special_tokens=False).input_ids[0]].item() == pytest.approx(0.93, abs=0.01)


def test_key_groups(llava):
    image = D.render(D.random_scene(random.Random(0)))
    inputs = build_inputs(llava, [LvlmSample(D.CAPTION_PROMPT, [image]), LvlmSample("Hi.")], padding_side="right")
    assert inputs.image_spans == [[(24, 40)], []]
    assert inputs.system_span[0] == (0, 21) and inputs.system_span[1] == (0, 21)
    tok = llava.text_tokenizer
    system = tok.decode(inputs.input_ids[0, :21])
    assert system.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_reads_the_icons(llava):
    from headlab.training.llava_smol import evaluate

    proc = llava.tokenizer
    header = llava.text_tokenizer("<|im_start|>assistant\n", add_special_tokens=False).input_ids
    scores = evaluate(llava.model, proc, header)
    for key, threshold in THRESHOLDS.items():
        assert scores[key] >= threshold, (key, scores)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(ModelFilesError, match="zoo train llava-smol"):
        L.load_vision_state(tmp_path)


def test_probe_reaches_the_language_model(llava):
    """headlab's attention function must run in all 30 LM layers (one config object for the LM) and
    agree with sdpa."""
    from headlab.probes.attention import AttentionProbe

    image = D.render(D.random_scene(random.Random(3)))
    inputs = build_inputs(llava, [LvlmSample(D.CAPTION_PROMPT, [image])])
    with torch.no_grad():
        ref = llava.model(**inputs.tensors).logits
        with AttentionProbe(llava) as probe:
            out = llava.model(**inputs.tensors).logits
    assert sorted(probe.last) == list(range(30))
    assert torch.allclose(out, ref, atol=1e-3)
    assert llava.model.config.text_config._attn_implementation == "sdpa"  # restored
