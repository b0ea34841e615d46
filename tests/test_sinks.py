"""analyze sinks on a real pretrained model (MiniLM) and the massive-activation criterion."""

from __future__ import annotations

import pytest
import torch

from headlab.analyses import SinksConfig, analyze_sinks
from headlab.analyses.sinks import _massive_rows
from headlab.probes import ResidualSummary, hidden_state_median, summarize_hidden
from headlab.prompts import bundled_prompts


def test_minilm_cls_is_the_sink(load_model):
    loaded = load_model("minilm")
    result = analyze_sinks(loaded, bundled_prompts(), SinksConfig(max_tokens=16), progress=False)
    alpha = result.tensors["alpha"]  # [layer, head, key]
    middle = alpha[1:5, :, 0].mean(1)
    # Measured: 0.56, 0.57, 0.56, 0.55 at T = 16 (0.39-0.41 at T = 64; the share falls with length).
    assert ((middle > 0.5) & (middle < 0.65)).all(), middle
    # [CLS] receives more than any other of the first positions in every middle layer.
    per_key = alpha[1:5].mean(1)
    assert (per_key.argmax(dim=-1) == 0).all()
    assert result.summary["sink_1_pct"] > 50
    heads = result.tables["sink_heads"]
    assert heads["alpha_first"].is_monotonic_decreasing
    assert heads.iloc[0]["alpha_first"] > 0.6


def test_sink_rate_counts_heads_above_eps(load_model):
    loaded = load_model("minilm")
    prompts = bundled_prompts()[:4]
    result = analyze_sinks(loaded, prompts, SinksConfig(max_tokens=16, batch_size=1), progress=False)
    # With one prompt per batch, recompute Sink_1 from per-prompt alphas by hand.
    per_prompt = [analyze_sinks(loaded, [p], SinksConfig(max_tokens=16), progress=False).tensors["alpha"][:, :, 0]
                  for p in prompts]
    expected = 100 * torch.stack([(a > 0.3).float().mean() for a in per_prompt]).mean()
    assert abs(result.summary["sink_1_pct"] - float(expected)) < 1e-3


def _summary_of(hidden: torch.Tensor) -> ResidualSummary:
    norm, top_value, top_dim, median_abs = (t[None] for t in summarize_hidden(hidden))
    return ResidualSummary(norm, top_value, top_dim, median_abs, hidden_state_median(hidden)[None])


def test_massive_activation_criterion():
    hidden = torch.linspace(0.2, 0.4, 5 * 64).view(1, 5, 64)  # layer median |x| ~0.3
    hidden[0, 0, 7] = -500.0  # massive: |x| > 100 and ~1700x the median
    hidden[0, 3, 9] = 150.0  # only ~500x the median: not massive
    hidden[0, 2, 1] = -99.0  # not above 100
    rows = _massive_rows(_summary_of(hidden), 0, 5, prompt_index=0, tokens=list("abcde"), config=SinksConfig())
    assert [(r["position"], r["dim"], r["value"]) for r in rows] == [(0, 7, -500.0)]


def test_massive_activations_divide_by_the_layer_median_not_the_tokens():
    # Token 0 carries a few huge dims (as a sink token does): its own median is large, the layer's is not.
    hidden = torch.full((1, 6, 8), 0.1)
    hidden[0, 0, :] = torch.tensor([300.0, 200.0, 200.0, 200.0, 0.5, 0.5, 0.5, 0.5])
    summary = _summary_of(hidden)
    # Independent medians: 48 values, 44 of them 0.1 -> 0.1; token 0's own lower median is 0.5.
    assert float(summary.layer_median_abs[0, 0]) == pytest.approx(0.1)
    assert float(summary.median_abs[0, 0, 0]) == pytest.approx(0.5)
    by_layer = _massive_rows(summary, 0, 6, 0, list("abcdef"), SinksConfig())
    assert [(r["position"], r["dim"]) for r in by_layer] == [(0, 0)]
    assert by_layer[0]["ratio_to_layer_median"] == pytest.approx(3000.0, rel=1e-5)
    assert by_layer[0]["ratio_to_token_median"] == pytest.approx(600.0, rel=1e-5)
    assert _massive_rows(summary, 0, 6, 0, list("abcdef"), SinksConfig(massive_median="token")) == []


def test_layer_median_leaves_padding_out():
    hidden = torch.ones(2, 4, 3)
    hidden[1, :3] = 1000.0  # left padding of the second prompt: huge junk that must not count
    valid = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 1]])
    assert hidden_state_median(hidden, valid).tolist() == [1.0, 1.0]
    assert hidden_state_median(hidden).tolist() == [1.0, 1000.0]


def test_tiny_model_run_has_every_table(load_model):
    result = analyze_sinks(load_model("tiny-qwen3"), bundled_prompts()[:3],
                           SinksConfig(max_tokens=24), progress=False)
    assert set(result.tables) == {"sink_heads", "key_importance", "sink_rate", "residual_norms",
                                  "massive_activations", "massive_dims", "tokens", "secondary_sinks",
                                  "secondary_sink_scores", "secondary_sink_windows", "sink_formation",
                                  "sink_levels", "sink_level_histogram", "secondary_flag_share", "sink_categories",
                                  "head_sink_categories", "non_initial_sinks", "massive_carriers"}
    assert result.tensors["alpha"].shape == (4, 4, 8)
    assert len(result.tables["residual_norms"]) == 4


def test_token_alpha_agrees_with_alpha(load_model):
    loaded = load_model("minilm")
    prompts = bundled_prompts()[:5]
    result = analyze_sinks(loaded, prompts, SinksConfig(max_tokens=16, batch_size=2), progress=False)
    token_alpha = result.tensors["token_alpha"]  # [prompt, layer, head, position]
    assert token_alpha.shape == (5, loaded.arch.n_layers, loaded.arch.n_heads, 16)
    # Mean over prompts of per-prompt alpha at the first positions is the run's alpha.
    torch.testing.assert_close(token_alpha[..., :8].nanmean(0), result.tensors["alpha"], atol=1e-5, rtol=1e-5)
    tokens = result.tables["tokens"]
    lengths = tokens.groupby("prompt").size()
    for prompt, length in lengths.items():
        assert not token_alpha[prompt, :, :, :length].isnan().any()
        assert token_alpha[prompt, :, :, length:].isnan().all()
