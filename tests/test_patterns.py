"""``headlab.attention`` (one layer's full pattern on a short prompt), ``Result.top_heads`` and the short reprs.

Oracle: transformers' own eager attention (``attn_implementation="eager"``, ``output_attentions=True``) on
the same model; headlab reads its pattern through ``headlab.trace`` with its own eager kernel. On
smollm2-135m (float32, CPU) they agree to < 1e-5 (measured: max |diff| 1.8e-6 over all 30 layers of the
14-token IOI prompt below).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import headlab
from headlab.analyses import SinksConfig, analyze_sinks
from headlab.errors import InputError
from headlab.interventions import KeyKnockout
from headlab.probes.patterns import AttentionPattern
from headlab.probes.position import eager_attention
from headlab.prompts import bundled_prompts

IOI = "When Mary and John went to the store, John gave a drink to"



def hf_attentions(loaded, ids: list[int]) -> tuple[torch.Tensor, ...]:
    with torch.no_grad(), eager_attention(loaded.model):
        out = loaded.model(input_ids=torch.tensor([ids]), output_attentions=True)
    return out.attentions  # per layer [batch, head, query, key]


@pytest.mark.slow
def test_pattern_matches_transformers_eager_attention(load_model):
    loaded = load_model("smollm2-135m")
    pattern = headlab.attention(loaded, IOI, layer=3)
    assert isinstance(pattern, AttentionPattern) and pattern.heads == list(range(9))
    expected = hf_attentions(loaded, pattern.token_ids)[3][0]
    assert pattern.shape == tuple(expected.shape) == (9, len(pattern.token_ids), len(pattern.token_ids))
    torch.testing.assert_close(pattern.pattern, expected.float(), atol=1e-5, rtol=1e-5)
    array = np.asarray(pattern)
    assert array.dtype == np.float32 and np.allclose(array.sum(-1), 1, atol=1e-5)
    assert np.triu(array, 1).max() == 0  # causal: no query sees a later key
    # One head, or a few, by their index in the model.
    one = headlab.attention(loaded, IOI, layer=3, head=7)
    np.testing.assert_allclose(one.numpy()[0], expected[7].numpy(), atol=1e-5)
    np.testing.assert_allclose(headlab.attention(loaded, IOI, layer=3, head=[8, 2]).head(2), expected[2].numpy(),
                               atol=1e-5)
    # Readable tokens beside the raw ones.
    assert pattern.tokens[:4] == ["When", " Mary", " and", " John"]
    assert pattern.raw_tokens[:4] == ["When", "ĠMary", "Ġand", "ĠJohn"]


@pytest.mark.slow
def test_received_and_entropy_against_hand_computation(load_model):
    loaded = load_model("smollm2-135m")
    pattern = headlab.attention(loaded, IOI, layer=5, head=[0, 4])
    p = pattern.numpy()
    t = p.shape[-1]
    for n in range(2):
        for k in (0, 3, t - 1):
            assert pattern.received()[n, k] == pytest.approx(sum(p[n, i, k] for i in range(k, t)) / (t - k), rel=1e-5)
        row = p[n, t - 1]
        assert pattern.entropy()[n, t - 1] == pytest.approx(-(row[row > 0] * np.log(row[row > 0])).sum(), rel=1e-5)
    assert pattern.entropy()[0, 0] == pytest.approx(0.0, abs=1e-6)  # the first query sees one key


@pytest.mark.slow
def test_encoder_pattern_has_every_key_and_a_t_normaliser(load_model):
    loaded = load_model("minilm")
    pattern = headlab.attention(loaded, "the old man walked home", layer=1, head=0)
    expected = hf_attentions(loaded, pattern.token_ids)[1][0, 0]
    np.testing.assert_allclose(pattern.head(0), expected.numpy(), atol=1e-5)
    assert not pattern.causal and pattern.tokens[:2] == ["[CLS]", " the"]
    np.testing.assert_allclose(pattern.received()[0], expected.numpy().mean(0), rtol=1e-5)


def test_active_interventions_show_in_the_pattern(load_model):
    loaded = load_model("tiny-llama")
    plain = headlab.attention(loaded, "hello there", layer=1, head=0)
    with headlab.intervene(loaded, KeyKnockout([(1, 0)], keys=[0])):
        knocked = headlab.attention(loaded, "hello there", layer=1, head=0)
    assert knocked.numpy()[0, 1:, 0].max() == 0 and plain.numpy()[0, 1:, 0].min() > 0
    np.testing.assert_allclose(knocked.numpy().sum(-1), 1, atol=1e-5)


def test_long_prompts_and_bad_arguments_are_refused_before_the_model_runs(load_model):
    loaded = load_model("tiny-llama")
    ran = []
    hook = loaded.arch.layers[0].register_forward_pre_hook(lambda *a: ran.append(1))
    try:
        with pytest.raises(InputError, match=r"this prompt has 601 tokens, the limit is 512.*statistics path"):
            headlab.attention(loaded, "x" * 600, layer=0)  # 600 bytes + BOS
        with pytest.raises(InputError, match=r"layer 9 does not exist; tiny-llama has layers 0\.\.3"):
            headlab.attention(loaded, "hi", layer=9)
        with pytest.raises(InputError, match=r"head 4 does not exist; tiny-llama has heads 0\.\.3"):
            headlab.attention(loaded, "hi", layer=0, head=[1, 4])
        with pytest.raises(InputError, match="prompt is empty"):
            headlab.attention(loaded, "  ", layer=0)
        with pytest.raises(InputError, match="no token ids"):
            headlab.attention(loaded, [], layer=0)
    finally:
        hook.remove()
    assert not ran
    # The limit is a keyword away, and token ids work as a prompt.
    assert headlab.attention(loaded, list(range(5, 25)), layer=0, max_tokens=20).shape == (4, 20, 20)


def test_pattern_renders_with_a_head_selector_and_a_short_repr(load_model):
    loaded = load_model("tiny-qwen3")
    pattern = headlab.attention(loaded, "ab c", layer=2)
    fig = pattern.figure()
    assert len(fig.data) == loaded.arch.n_heads and [t.visible for t in fig.data].count(True) == 1
    buttons = fig.layout.updatemenus[0].buttons
    assert [b.label for b in buttons] == [f"head {h}" for h in range(loaded.arch.n_heads)]
    assert list(fig.data[0].x) == ["0 a", "1 b", "2 ␣", "3 c"]  # readable, unique, whitespace visible
    np.testing.assert_allclose(np.asarray(fig.data[1].z), pattern.head(1))
    assert fig.layout.title.text == "tiny-qwen3: layer 2, head 0 attention pattern"
    assert len(pattern.figure(head=3).data) == 1
    html = pattern._repr_html_()
    assert "plotly" in html.lower() and "<div" in html
    assert repr(pattern) == "AttentionPattern(model='tiny-qwen3', layer=2, heads=0..3, tokens=4, shape=[4, 4, 4])"
    with pytest.raises(InputError, match="holds heads"):
        headlab.attention(loaded, "ab", layer=0, head=1).head(2)


@pytest.fixture(scope="module")
def sinks_run(load_model):
    return analyze_sinks(load_model("tiny-llama"), bundled_prompts()[:3], SinksConfig(max_tokens=16), progress=False)


def test_top_heads_ranks_tensors_and_table_columns(sinks_run):
    top = sinks_run.top_heads("entropy", 5)
    entropy = sinks_run.tensors["entropy"].numpy()  # [layer, head]
    order = np.argsort(-entropy.ravel(), kind="stable")[:5]
    assert list(zip(top["layer"], top["head"], strict=True)) == [divmod(int(i), entropy.shape[1]) for i in order]
    np.testing.assert_allclose(top["entropy"], entropy.ravel()[order])
    low = sinks_run.top_heads("alpha_first", 3, largest=False)  # a column of the sink_heads table
    heads = sinks_run.tables["sink_heads"].sort_values("alpha_first")
    assert low["alpha_first"].tolist() == heads["alpha_first"].head(3).tolist()
    assert "alpha_first" in sinks_run.head_metrics() and "first_mass" in sinks_run.head_metrics()
    assert "key_importance" not in sinks_run.head_metrics()  # several rows per head: not a head metric
    with pytest.raises(InputError, match="no per-head metric 'nope'; it has: .*entropy"):
        sinks_run.top_heads("nope", 3)
    with pytest.raises(InputError, match="positive number of heads"):
        sinks_run.top_heads("entropy", 0)


def test_reprs_are_short(sinks_run, load_model):
    text = repr(sinks_run)
    assert text.startswith("Result(analysis='sinks', model='tiny-llama')")
    assert "alpha [4, 4, 8]" in text and "sink_heads (16 rows)" in text and len(text.splitlines()) == 5
    loaded = repr(load_model("tiny-llama"))
    assert loaded.startswith("LoadedModel('tiny-llama': LlamaForCausalLM, 4 layers x 4 heads")
    assert "\n" not in loaded and "Linear" not in loaded
