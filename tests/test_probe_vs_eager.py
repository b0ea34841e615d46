"""The statistics path inside real models equals statistics computed from eager ``output_attentions``."""

from __future__ import annotations

import pytest
import torch
from conftest import TEXT

from headlab.kernels import MaskSpec, stats_from_probs
from headlab.probes import AttentionProbe, KeyImportance

MODELS = ["tiny-qwen3", "tiny-llama", "tiny-gpt2", "minilm"]


def encode(loaded, side: str):
    tok = loaded.text_tokenizer
    tok.padding_side = side
    try:
        return tok(TEXT, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = "right"


def run_eager(loaded, enc):
    model = loaded.model
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(**enc, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    return out


def output_of(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name", MODELS)
def test_stats_equal_eager_output_attentions(load_model, name, side):
    loaded = load_model(name)
    enc = encode(loaded, side)
    eager = run_eager(loaded, enc)
    with torch.no_grad(), AttentionProbe(loaded) as probe:
        loaded.model(**enc)
    padding = enc.attention_mask.bool()
    mask = MaskSpec(causal=loaded.arch.causal, key_padding=padding, query_valid=padding)
    assert sorted(probe.last) == list(range(loaded.arch.n_layers))
    for layer, probs in enumerate(eager.attentions):
        want = stats_from_probs(probs, mask)
        got = probe.last[layer]
        rows = got.row_counted
        assert torch.equal(rows, want.row_counted)
        torch.testing.assert_close(got.key_mass, want.key_mass, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got.key_count, want.key_count)
        for field in ("entropy", "first_mass"):
            torch.testing.assert_close(getattr(got, field).transpose(1, 2)[rows],
                                       getattr(want, field).transpose(1, 2)[rows], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_outputs_equal_sdpa(load_model, name):
    loaded = load_model(name)
    enc = encode(loaded, "right")
    with torch.no_grad():
        ref = output_of(loaded.model(**enc))
        with AttentionProbe(loaded):
            got = output_of(loaded.model(**enc))
    valid = enc.attention_mask.bool()
    torch.testing.assert_close(got[valid], ref[valid], atol=1e-5, rtol=1e-4)
    assert loaded.model.config._attn_implementation == "sdpa", "the probe must restore the implementation"


def test_bfloat16_model_matches_sdpa():
    import headlab

    loaded = headlab.load("tiny-qwen3", dtype="bfloat16", device="cpu")
    enc = loaded.text_tokenizer(TEXT[:1], return_tensors="pt")
    with torch.no_grad():
        ref = loaded.model(**enc).logits.float()
        with AttentionProbe(loaded) as probe:
            got = loaded.model(**enc).logits.float()
    torch.testing.assert_close(got, ref, atol=5e-2, rtol=2e-2)
    assert probe.last[0].key_mass.dtype == torch.float32


def test_backends_agree_inside_the_model(load_model):
    loaded = load_model("tiny-llama")
    enc = encode(loaded, "right")
    results = {}
    for backend in ("torch", "eager"):
        acc = KeyImportance(loaded.arch.n_layers, loaded.arch.n_heads, 6, 0.3)
        with torch.no_grad(), AttentionProbe(loaded, acc.add, backend=backend):
            loaded.model(**enc)
        results[backend] = acc.alpha()
    torch.testing.assert_close(results["torch"], results["eager"], atol=1e-5, rtol=1e-5)


def test_probe_leaves_vision_tower_alone(load_model):
    loaded = load_model("tiny-llava")
    config = loaded.model.config
    n_image = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    ids = torch.tensor([[loaded.arch.bos_token_id] + [loaded.arch.image_token_id] * n_image + list(b"a cat")])
    pixels = torch.randn(1, 3, config.vision_config.image_size, config.vision_config.image_size)
    with torch.no_grad():
        ref = loaded.model(input_ids=ids, pixel_values=pixels).logits
        with AttentionProbe(loaded) as probe:
            got = loaded.model(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    assert sorted(probe.last) == list(range(loaded.arch.n_layers))
    assert probe.last[0].key_mass.shape == (1, loaded.arch.n_heads, ids.shape[1])
    assert loaded.arch.image_mask(ids).sum() == n_image


def test_sliding_window_layers_use_the_models_own_mask():
    # Sliding-window layers get transformers' composed mask function: the lazy row-mask path.
    from transformers import AutoConfig, AutoModelForCausalLM

    from headlab.arch import Arch
    from headlab.loading import LoadedModel
    from headlab.zoo.tokenizer import byte_tokenizer

    config = AutoConfig.for_model(
        "qwen3", vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, use_sliding_window=True, sliding_window=5,
        layer_types=["sliding_attention", "full_attention"], pad_token_id=258,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    tok = byte_tokenizer(add_bos=False)
    loaded = LoadedModel("window", model, tok, Arch.from_model(model, tok), "test")
    enc = tok(TEXT, return_tensors="pt", padding=True)
    eager = run_eager(loaded, enc)
    with torch.no_grad(), AttentionProbe(loaded) as probe:
        got_logits = model(**enc).logits
    valid = enc.attention_mask.bool()
    torch.testing.assert_close(got_logits[valid], eager.logits[valid], atol=1e-5, rtol=1e-4)
    for layer, window in ((0, 5), (1, None)):
        mask = MaskSpec(causal=True, window=window, key_padding=valid, query_valid=valid)
        want = stats_from_probs(eager.attentions[layer], mask)
        torch.testing.assert_close(probe.last[layer].key_mass, want.key_mass, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(probe.last[layer].key_count, want.key_count)
    assert probe.last[0].key_count[0, 0] == 5  # a key is seen by exactly `window` queries
