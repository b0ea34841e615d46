"""analyze sinks on a real pretrained model (MiniLM) and the massive-activation criterion."""

from __future__ import annotations

import torch

from headlab.analyses import SinksConfig, analyze_sinks
from headlab.analyses.sinks import _massive_rows
from headlab.probes import ResidualSummary, summarize_hidden
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


def test_massive_activation_criterion():
    hidden = torch.randn(1, 5, 64) * 0.05
    hidden[0, 0, 7] = -500.0  # massive: |x| > 100 and >> median
    hidden[0, 3, 9] = 150.0
    hidden[0, 3, :] += torch.linspace(1, 2, 64)  # median |x| ~1.5: 150 is only ~100x, not massive
    norm, top_value, top_dim, median_abs = (t[None] for t in summarize_hidden(hidden))
    summary = ResidualSummary(norm, top_value, top_dim, median_abs)
    rows = _massive_rows(summary, 0, 5, prompt_index=0, tokens=list("abcde"), config=SinksConfig())
    assert [(r["position"], r["dim"], r["value"]) for r in rows] == [(0, 7, -500.0)]


def test_tiny_model_run_has_every_table(load_model):
    result = analyze_sinks(load_model("tiny-qwen3"), bundled_prompts()[:3],
                           SinksConfig(max_tokens=24), progress=False)
    assert set(result.tables) == {"sink_heads", "key_importance", "sink_rate", "residual_norms",
                                  "massive_activations", "massive_dims", "tokens", "secondary_sinks",
                                  "secondary_sink_scores", "secondary_sink_windows", "sink_formation",
                                  "sink_levels", "sink_level_histogram"}
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
