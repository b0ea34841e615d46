"""``headlab.trace`` against TransformerLens' ``TransformerBridge`` (an independent oracle) on the same tiny models.

The bridge is built offline around a second copy of the tiny model (``build_tiny`` is seeded, so the
weights are equal) with ``build_bridge_from_module``: ``TransformerBridge.boot_transformers`` would
reload the tokenizer from the hub by name, which the offline byte tokenizer cannot satisfy.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import TEXT

import headlab
from headlab.errors import InputError
from headlab.interventions import KeyKnockout, ScoreBoost
from headlab.probes import VALID_PATTERNS, AttentionProbe
from headlab.zoo.tiny import build_tiny

ARCHITECTURES = {"tiny-llama": "LlamaForCausalLM", "tiny-qwen3": "Qwen3ForCausalLM", "tiny-gpt2": "GPT2LMHeadModel"}
COMPARED = ["hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
            "attn.hook_z", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_pattern"]


@pytest.fixture(scope="module")
def bridge_cache():
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    caches = {}

    def get(name: str, ids: torch.Tensor):
        if name not in caches:
            model, _ = build_tiny(name)  # its own copy: the bridge rewires the modules it wraps
            bridge = build_bridge_from_module(model, ARCHITECTURES[name], hf_config=model.config)
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _, cache = bridge.run_with_cache(ids, names_filter=lambda n: any(n.endswith(c) for c in COMPARED))
            caches[name] = cache
        return caches[name]

    return get


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_trace_equals_transformer_bridge(load_model, bridge_cache, name):
    loaded = load_model(name)
    ids = loaded.text_tokenizer(TEXT[:1], return_tensors="pt").input_ids
    names = [f"blocks.{layer}.{hook}" for layer in (0, 2, 3) for hook in COMPARED]
    with torch.no_grad(), headlab.trace(loaded, names) as t:
        loaded.model(input_ids=ids)
    oracle = bridge_cache(name, ids)
    assert sorted(t.keys()) == sorted(names), "exactly what was asked is kept"
    for key in names:
        assert t[key].shape == oracle[key].shape, key
        torch.testing.assert_close(t[key], oracle[key], atol=2e-5, rtol=1e-4, msg=key)
    assert sorted(t.stats) == list(range(loaded.arch.n_layers))
    assert loaded.model.config._attn_implementation == "sdpa"


def test_stats_are_those_of_the_same_pass(load_model):
    loaded = load_model("tiny-llama")
    enc = loaded.text_tokenizer(TEXT, return_tensors="pt", padding=True)
    with torch.no_grad():
        with AttentionProbe(loaded) as probe:
            loaded.model(**enc)
        with headlab.trace(loaded, ["blocks.1.hook_resid_post"]) as t:
            loaded.model(**enc)
    for layer in range(loaded.arch.n_layers):
        torch.testing.assert_close(t.stats[layer].key_mass, probe.last[layer].key_mass)
    assert torch.equal(t.attention_mask, enc.attention_mask.bool())


def test_only_asked_names_are_kept_and_filters_work(load_model):
    loaded = load_model("tiny-qwen3")
    ids = loaded.text_tokenizer(TEXT[:1], return_tensors="pt").input_ids

    def n_hooks() -> int:
        return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in loaded.model.modules())

    # transformers keeps its own output-recording hooks once a model has run with output_attentions,
    # so count what the trace adds rather than expecting none.
    before = n_hooks()
    with torch.no_grad(), headlab.trace(loaded, lambda n: n.endswith("hook_z"), stats=False) as t:
        assert n_hooks() > before
        loaded.model(input_ids=ids)
    assert sorted(t.keys()) == [f"blocks.{layer}.attn.hook_z" for layer in range(4)]
    assert t.stats == {}
    with pytest.raises(KeyError, match="was not asked for"):
        t["blocks.0.hook_resid_post"]
    assert n_hooks() == before, "the trace removes its hooks on exit"


def test_pattern_sees_active_edits(load_model):
    loaded = load_model("tiny-llama")
    ids = loaded.text_tokenizer(TEXT[:1], return_tensors="pt").input_ids
    names = ["blocks.1.attn.hook_pattern", "blocks.2.attn.hook_pattern"]
    with torch.no_grad():
        with headlab.trace(loaded, names, stats=False) as plain:
            loaded.model(input_ids=ids)
        edits = [KeyKnockout([(1, 0)], keys=[0]), ScoreBoost([(2, None)], keys=[1], alpha=0.8)]
        with headlab.intervene(loaded, *edits), headlab.trace(loaded, names, stats=False) as t:
            loaded.model(input_ids=ids)
    knocked = t["blocks.1.attn.hook_pattern"]
    assert knocked[0, 0, 1:, 0].abs().max() == 0  # key 0 removed from every row that sees another key
    torch.testing.assert_close(knocked.sum(-1), torch.ones_like(knocked.sum(-1)))
    torch.testing.assert_close(knocked[0, 1:], plain["blocks.1.attn.hook_pattern"][0, 1:])  # other heads untouched
    boosted, before = t["blocks.2.attn.hook_pattern"], plain["blocks.2.attn.hook_pattern"]
    assert (boosted[0, :, 1:, 1] - before[0, :, 1:, 1]).abs().max() > 1e-3


def test_bad_names_and_long_patterns_are_refused(load_model):
    loaded = load_model("tiny-llama")
    with pytest.raises(InputError, match="unknown hook name 'blocks.0.attn.hook_zz'; valid names: .*hook_resid_pre"):
        with headlab.trace(loaded, ["blocks.0.attn.hook_zz"]):
            pass
    with pytest.raises(InputError, match=r"layer 7 does not exist; this model has layers 0\.\.3"):
        with headlab.trace(loaded, ["blocks.7.hook_resid_post"]):
            pass
    with pytest.raises(InputError, match="matched no hook"):
        with headlab.trace(loaded, lambda n: False):
            pass
    assert "blocks.{l}.attn.hook_pattern" in VALID_PATTERNS
    ids = loaded.text_tokenizer(TEXT[:1], return_tensors="pt").input_ids
    ran = []
    hook = loaded.arch.layers[0].register_forward_pre_hook(lambda *a: ran.append(1))
    try:
        with pytest.raises(InputError, match=f"only up to 8 tokens, this input has {ids.shape[1]}"):
            with headlab.trace(loaded, ["blocks.0.attn.hook_pattern"], max_pattern_tokens=8):
                loaded.model(input_ids=ids)
    finally:
        hook.remove()
    assert not ran, "refused before the first layer runs"
    assert loaded.model.config._attn_implementation == "sdpa"
