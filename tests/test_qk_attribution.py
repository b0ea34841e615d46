"""Exact QK attribution (``analyses/qk_attribution.py``): the contributions add up to the score the model computed.

Each supported family gets a tiny random model (the zoo's tiny-llama / tiny-qwen3, and qwen2, mistral, gemma,
gemma3_text built here from small configs, norm gains randomised so that a wrong gain would show). The scores
are held to the model's own attention probabilities (``hook_pattern``, softmax of the scores) so the score read
and the GQA mapping are checked against something the attribution does not compute; a hand computation checks
layer 0 from the weights alone; zeroing a head's o_proj block zeroes its row and column.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from headlab.analyses.qk_attribution import (
    component_labels,
    mean_qk_attribution,
    qk_attribution,
    qk_attributions,
    top_contributors,
)
from headlab.arch import Arch
from headlab.errors import InputError
from headlab.loading import LoadedModel
from headlab.probes import trace
from headlab.zoo.tokenizer import byte_tokenizer

PROMPT = "Mary and John went to the store; John gave"
TOL = 1e-4  # on |sum - score| / max(1, |score|)
SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256, bos_token_id=256, eos_token_id=257,
             pad_token_id=258, tie_word_embeddings=True)
EXTRA = {
    "qwen2": {},  # q/k/v biases
    "mistral": dict(sliding_window=8),
    "gemma": {},  # (1 + weight) gains, embeddings scaled by sqrt(d) in the model's forward
    # Sandwich norms, q/k norms, scale 1/sqrt(query_pre_attn_scalar) != 1/sqrt(head_dim), sliding layers.
    "gemma3_text": dict(query_pre_attn_scalar=24, sliding_window=6, layer_types=["sliding_attention",
                                                                                 "sliding_attention",
                                                                                 "full_attention"]),
    "llama": dict(attention_bias=True),  # o_proj bias: an L{l}.attn_bias component
}


def close(a, b) -> bool:
    return abs(a - b) <= TOL * max(1.0, abs(b))


def built(model_type: str) -> LoadedModel:
    """A tiny random model of ``model_type`` with random norm gains (seeded), as a ``LoadedModel``."""
    config = AutoConfig.for_model(model_type, **{**SMALL, **EXTRA[model_type]})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().eval()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.add_(0.3 * torch.randn_like(param))
                elif name.endswith("bias"):
                    param.normal_(0, 0.1)
    tokenizer = byte_tokenizer(add_bos=True)
    return LoadedModel(f"tiny-{model_type}", model, tokenizer, Arch.from_model(model, tokenizer), "test")


@pytest.fixture(scope="module")
def models(load_model):
    cache: dict[str, LoadedModel] = {}

    def get(name: str) -> LoadedModel:
        if name not in cache:
            cache[name] = load_model(name) if name in ("tiny-llama", "tiny-qwen3") else built(name)
        return cache[name]

    return get


FAMILIES = ["tiny-llama", "tiny-qwen3", "qwen2", "mistral", "gemma", "gemma3_text", "llama"]


@pytest.mark.parametrize("name", FAMILIES)
def test_contributions_sum_to_the_models_score(models, name):
    loaded = models(name)
    last = loaded.arch.n_layers - 1
    for layer, head, (i, j) in [(0, 1, (9, 4)), (1, 2, (12, 0)), (last, 3, (-1, -1)), (last, 0, (-1, 5))]:
        a = qk_attribution(loaded, PROMPT, layer, head, i, j)
        assert a.contributions.shape == (len(a.query_labels), len(a.key_labels))
        assert close(a.total, a.score), (name, layer, head, a.total, a.score)
        assert abs(a.residual) == pytest.approx(abs(a.total - a.score))
        assert a.reconstruction_error < 1e-5
        assert a.kv_head == head // 2  # 4 query heads on 2 kv heads


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3", "qwen2", "gemma3_text"])
def test_scores_are_the_heads_pre_softmax_scores(models, name):
    """softmax over keys of the attributed scores == the model's attention pattern of that head, for every head
    (two query heads share each kv head: a wrong GQA mapping would give another head's pattern)."""
    loaded = models(name)
    layer, i = loaded.arch.n_layers - 1, 5  # gemma3_text: the full-attention layer (no window to mask keys)
    with torch.no_grad(), trace(loaded, names=[f"blocks.{layer}.attn.hook_pattern"], stats=False) as t:
        loaded.model(input_ids=torch.tensor([loaded.text_tokenizer(PROMPT).input_ids]))
    pattern = t[f"blocks.{layer}.attn.hook_pattern"][0]  # [head, query, key]
    for head in range(loaded.arch.n_heads):
        found = qk_attributions(loaded, PROMPT, layer, head, [(i, j) for j in range(i + 1)])
        scores = torch.tensor([a.score for a in found])
        torch.testing.assert_close(scores.softmax(0).float(), pattern[head, i, :i + 1], atol=1e-5, rtol=1e-4)
        assert close(sum(a.total for a in found), float(scores.sum()))


def test_layer_zero_by_hand(models):
    """Layer 0 of tiny-llama from the weights alone: embedding, RMSNorm, projection, RoPE written out here."""
    loaded = models("tiny-llama")
    model, arch = loaded.model, loaded.arch
    ids = loaded.text_tokenizer(PROMPT).input_ids
    i, j, head = 7, 3, 3
    a = qk_attribution(loaded, ids, 0, head, i, j)
    assert a.query_labels == a.key_labels == ["embed"]

    layer = model.model.layers[0]
    eps = model.config.rms_norm_eps
    x = model.model.embed_tokens.weight.detach().double()[ids]  # [pos, d_model]
    u = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * layer.input_layernorm.weight.detach().double()
    d = arch.head_dim
    inv_freq = 1.0 / model.config.rope_parameters["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d)

    def rope(v: torch.Tensor, pos: int) -> torch.Tensor:
        angle = pos * inv_freq
        first, second = v[: d // 2], v[d // 2:]  # Llama's "rotate half" pairing (i, i + d/2)
        return torch.cat([first * torch.cos(angle) - second * torch.sin(angle),
                          second * torch.cos(angle) + first * torch.sin(angle)])

    kv = head // (arch.n_heads // arch.n_kv_heads)
    q = rope(layer.self_attn.q_proj.weight.detach().double()[head * d:(head + 1) * d] @ u[i], i)
    k = rope(layer.self_attn.k_proj.weight.detach().double()[kv * d:(kv + 1) * d] @ u[j], j)
    expected = float(q @ k) / math.sqrt(d)
    assert float(a.contributions[0, 0]) == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert a.score == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_a_zeroed_head_contributes_nothing(models):
    """o_proj's column block of L1.H2 set to 0: its row and column are exactly 0, and the sum still holds."""
    loaded = models("tiny-qwen3")
    o_proj = loaded.arch.o_proj(1)
    d = loaded.arch.head_dim
    saved = o_proj.weight.detach().clone()
    try:
        with torch.no_grad():
            o_proj.weight[:, 2 * d:3 * d] = 0
        a = qk_attribution(loaded, PROMPT, 3, 1, 11, 6)
    finally:
        with torch.no_grad():
            o_proj.weight.copy_(saved)
    row, col = a.query_labels.index("L1.H2"), a.key_labels.index("L1.H2")
    assert torch.all(a.contributions[row] == 0) and torch.all(a.contributions[:, col] == 0)
    assert a.contributions[a.query_labels.index("L1.H1")].abs().sum() > 0
    assert close(a.total, a.score)


def test_labels_name_every_component(models):
    assert component_labels(models("tiny-llama"), 2) == [
        "embed", "L0.H0", "L0.H1", "L0.H2", "L0.H3", "L0.mlp", "L1.H0", "L1.H1", "L1.H2", "L1.H3", "L1.mlp"]
    qwen2 = qk_attribution(models("qwen2"), PROMPT, 1, 0, 8, 2)
    assert qwen2.query_labels[-1] == "q_bias" and qwen2.key_labels[-1] == "k_bias"
    assert "L0.attn_bias" in qk_attribution(models("llama"), PROMPT, 1, 0, 8, 2).query_labels


def test_mean_and_top_contributors(models):
    loaded = models("tiny-qwen3")
    items = [(PROMPT, 10, 2), (PROMPT, 12, 0), ("Another short prompt", 8, 8)]
    mean = mean_qk_attribution(loaded, items, 2, 1)
    single = [qk_attribution(loaded, p, 2, 1, i, j) for p, i, j in items]
    assert mean.n == 3 and mean.query_pos is None
    torch.testing.assert_close(mean.contributions, sum(a.contributions for a in single) / 3)
    assert mean.score == pytest.approx(sum(a.score for a in single) / 3)
    assert close(mean.total, mean.score)
    top = top_contributors(mean, 5)
    assert len(top) == 5 and [abs(c.value) for c in top] == sorted((abs(c.value) for c in top), reverse=True)
    assert abs(top[0].value) == pytest.approx(float(mean.contributions.abs().max()))
    best = top_contributors(mean, 1, signed=True)[0]
    assert best.value == pytest.approx(float(mean.contributions.max()))
    assert mean.contributions[mean.query_labels.index(best.query), mean.key_labels.index(best.key)] == best.value


def test_bad_inputs_are_refused(models, load_model):
    loaded = models("tiny-llama")
    n = len(loaded.text_tokenizer(PROMPT).input_ids)
    cases = [
        (dict(layer=4, head=0, query_pos=3, key_pos=1), "layer 4 does not exist.*0..3"),
        (dict(layer=-1, head=0, query_pos=3, key_pos=1), "layer -1 does not exist"),
        (dict(layer=1, head=4, query_pos=3, key_pos=1), "head 4 does not exist.*0..3"),
        (dict(layer=1, head=0, query_pos=n, key_pos=1), f"query position {n} is outside.*{n} tokens"),
        (dict(layer=1, head=0, query_pos=3, key_pos=-n - 1), "key position .* is outside"),
        (dict(layer=1, head=0, query_pos=3, key_pos=5), "key position 5 comes after query position 3"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InputError, match=message):
            qk_attribution(loaded, PROMPT, **kwargs)
    with pytest.raises(InputError, match="no tokens"):
        qk_attribution(loaded, [], 0, 0, 0, 0)
    with pytest.raises(InputError, match="position 2.5 is outside"):
        qk_attribution(loaded, PROMPT, 1, 0, 2.5, 1)
    with pytest.raises(InputError, match="does not support model type 'gpt2' .*LayerNorm.*llama"):
        qk_attribution(load_model("tiny-gpt2"), PROMPT, 1, 0, 3, 1)
    with pytest.raises(InputError, match="at least one"):
        mean_qk_attribution(loaded, [], 1, 0)
    with pytest.raises(InputError, match="k must be positive"):
        top_contributors(qk_attribution(loaded, PROMPT, 1, 0, 3, 1), 0)


@pytest.mark.slow
def test_smollm2_contributions_sum_to_the_score(load_model):
    loaded = load_model("smollm2-135m")
    a = qk_attribution(loaded, "When Mary and John went to the store, John gave a drink to", 12, 4, -1, 3)
    assert len(a.query_labels) == 1 + 12 * (9 + 1) and a.kv_head == 4 // 3
    assert close(a.total, a.score), (a.total, a.score)
    assert a.reconstruction_error < 1e-5
