"""Secondary sinks (Wong et al.): the detector against a hand-built model, levels, bounds, the run directory."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from headlab.analyses.secondary_sinks import (
    SecondarySinkCollector,
    SecondarySinksConfig,
    choose_bos,
    label_of,
    lifetime_bounds,
    scan_window,
)
from headlab.analyses.sink_levels import count_levels, histogram
from headlab.analyses.sinks import SinksConfig, analyze_sinks
from headlab.errors import InputError
from headlab.probes import PARTS, AttentionProbe, LayerPartsProbe
from headlab.result import Result
from headlab.training.constructed import ConstructedSpec, SinkSpec, build_constructed

# Three built sinks, one per label under the paper's bounds for 24 layers (4 and 24 - 15 = 9).
BUILT = [SinkSpec(7, 5, 6), SinkSpec(9, 3, 12), SinkSpec(11, 10, 2)]
EXPECTED_LABEL = {7: "secondary", 9: "primary_like", 11: "noise"}
PROMPTS = ["w1 w7 w2 w3 w9 w4 w11 w5 w7 w6", "w7 w0 w9 w12 w13", "w2 w3 w4 w5"]


@pytest.fixture(scope="module")
def constructed():
    return build_constructed(ConstructedSpec(sinks=BUILT))


def _detect(loaded, text: str, config: SecondarySinksConfig | None = None):
    enc = loaded.tokenizer([text], return_tensors="pt")
    alpha: dict[int, torch.Tensor] = {}
    first: dict[int, torch.Tensor] = {}
    count: dict[int, torch.Tensor] = {}

    def on_stats(layer, stats):
        alpha[layer] = stats.key_mass / stats.key_count.clamp(min=1)[:, None, :]
        first[layer], count[layer] = stats.first_mass, stats.key_count

    with torch.no_grad(), AttentionProbe(loaded, on_stats), LayerPartsProbe(loaded) as parts:
        loaded.model(**enc)
    collector = SecondarySinkCollector(loaded.arch.n_layers, config or SecondarySinksConfig())
    tokens = loaded.tokenizer.convert_ids_to_tokens(enc.input_ids[0])
    found = collector.add(parts.summary(), alpha, 0, enc.input_ids.shape[1], 0, tokens, first_mass=first,
                          key_count=count)
    return found, collector.sinks_table()


def test_detector_recovers_the_built_sinks_exactly(constructed):
    found, table = _detect(constructed, PROMPTS[0])
    assert found.bos == 0
    assert found.window == (1, 23)  # BOS norm jumps at layer 1 and drops at the last layer (23)
    words = PROMPTS[0].split()
    built = {s.token: s for s in BUILT}
    expected = [(i + 1, int(w[1:])) for i, w in enumerate(words) if int(w[1:]) in built]  # +1: BOS first
    assert table["position"].tolist() == [pos for pos, _ in expected]
    for (_, token), row in zip(expected, table.itertuples(), strict=True):
        spec = built[token]
        assert row.token == f"w{token}"
        assert row.creation_layer == spec.creation
        assert row.lifetime == spec.lifetime
        assert row.last_layer == spec.creation + spec.lifetime - 1
        assert row.official_label == EXPECTED_LABEL[token]
    # The attention criterion keeps every built sink but the last w7 (position 9 of 11): only two queries see
    # it, fewer than a quarter of the prompt, so its mean attention received is no evidence (low_attention).
    assert table["label"].tolist() == ["secondary", "primary_like", "noise", "low_attention"]
    assert table["attention_pass"].tolist() == [True, True, True, False]
    # Built sinks get 0.6-0.7 of what BOS gets from the same queries (gemma3-270m cos-flagged tokens: <= 0.17).
    assert (table.loc[table["official_label"] != "noise", "score_to_bos"] > 0.6).all()
    # Formation at the creation layer: the MLP wrote the BOS-aligned vector, attention wrote nothing.
    assert np.allclose(table["mlp_out_norm"], 6.0, rtol=1e-4)
    assert (table["cos_mlp_out"] > 0.999).all()
    assert (table["cos_attn_out"] == 0).all()
    assert (table["cos_mlp_in"].abs() < 0.1).all()
    assert (table["cos_resid"] > 0.9).all()


def test_no_sink_without_the_built_tokens(constructed):
    found, table = _detect(constructed, PROMPTS[2])
    assert table.empty and not found.flags.any()


def test_sink_score_rises_with_the_written_norm():
    scores = []
    # RMSNorm normalises the key, so the score saturates once the written vector dominates the residual
    # (measured: 0.310, 0.368, 0.384 for norms 3.5, 6, 12, and 0.383 at 24): test the rising part.
    for norm in (3.5, 6.0, 12.0):
        loaded = build_constructed(ConstructedSpec(sinks=[SinkSpec(7, 5, 6, norm)]))
        _, table = _detect(loaded, "w1 w2 w7 w3 w4 w5 w6")
        assert len(table) == 1 and table["lifetime"].item() == 6
        assert table["mlp_out_norm"].item() == pytest.approx(norm, rel=1e-4)
        scores.append(table["sink_score"].item())
    assert all(a < b for a, b in zip(scores, scores[1:], strict=False)), scores
    assert scores[0] > 0.05  # a real share of the attention, not a rounding effect


def test_sink_score_is_mean_attention_received_oracle(constructed):
    """The score from the statistics path equals the mean over heads and queries i >= s of eager A[l, h, i, s]."""
    enc = constructed.tokenizer([PROMPTS[1]], return_tensors="pt")
    _, table = _detect(constructed, PROMPTS[1])
    model = constructed.model
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attn = model(**enc, output_attentions=True).attentions  # oracle only: [batch, head, query, key] per layer
    model.set_attn_implementation("sdpa")
    for row in table.itertuples():
        s = row.position
        layers = range(row.creation_layer, row.last_layer + 1)
        expected = np.mean([attn[layer][0, :, s:, s].mean().item() for layer in layers])
        assert row.sink_score == pytest.approx(expected, rel=1e-4)


def test_layer_parts_residual_matches_hidden_states():
    import headlab

    loaded = headlab.load("tiny-llama")
    enc = loaded.tokenizer(["some text to probe"], return_tensors="pt")
    with torch.no_grad(), LayerPartsProbe(loaded) as parts:
        hidden = loaded.model(**enc, output_hidden_states=True).hidden_states
    summary = parts.summary()
    resid = PARTS.index("resid")
    for layer in range(loaded.arch.n_layers - 1):  # the last hidden state has the final norm applied
        h = hidden[layer + 1][0]
        cos = torch.nn.functional.cosine_similarity(h, h[1][None], dim=-1)
        assert torch.allclose(summary.cos[resid, layer, 0, 1], cos, atol=1e-5)
        assert torch.allclose(summary.norm[resid, layer, 0], h.norm(dim=-1), rtol=1e-5)


def test_bos_choice_and_scan_window():
    norm = torch.tensor([[1.0, 5.0, 2.0, 1.0], [1.0, 9.0, 2.0, 1.0]])  # [layer, position]
    assert choose_bos(norm, max_norm=False) == 0
    assert choose_bos(norm, max_norm=True) == 1
    # jump after layer 1, drop after layer 4: scan layers [2, 5)
    assert scan_window(np.array([1.0, 1.5, 20.0, 21.0, 22.0, 10.0, 10.5])) == (2, 5)
    assert scan_window(np.array([1.0, 2.0])) == (1, 2)
    assert scan_window(np.array([3.0])) == (0, 1)


def test_lifetime_bounds_rule():
    config = SecondarySinksConfig()
    assert lifetime_bounds(40, config)[:2] == (4, 25)  # the paper's 4 and L - 15 (Qwen3-14B)
    assert lifetime_bounds(64, config)[:2] == (4, 49)
    assert lifetime_bounds(4, config)[:2] == (1, 3)  # scaled below 24 layers
    assert lifetime_bounds(12, config)[:2] == (1, 8)
    assert lifetime_bounds(12, SecondarySinksConfig(lifetime_bounds=(2, 5)))[:2] == (2, 5)
    assert [label_of(n, (4, 9)) for n in (1, 4, 5, 8, 9, 20)] == [
        "noise", "noise", "secondary", "secondary", "primary_like", "primary_like"]
    with pytest.raises(InputError):
        SecondarySinksConfig(cos_threshold=1.5).check()
    with pytest.raises(InputError):
        SecondarySinksConfig(lifetime_bounds=(5, 2)).check()


@pytest.mark.parametrize("n_levels", [1, 3, 6])
def test_level_clustering_recovers_the_number_of_levels(n_levels):
    rng = np.random.default_rng(n_levels)
    centres = [(3, 6), (9, 14), (15, 5), (21, 20), (27, 10), (33, 3)][:n_levels]
    creation, lifetime = [], []
    for c, lt in centres:
        size = int(rng.integers(80, 300))
        creation += list(np.clip(np.rint(rng.normal(c, 0.8, size)), 0, 39))
        lifetime += list(np.clip(np.rint(rng.normal(lt, 0.8, size)), 1, 40))
    creation += list(rng.integers(0, 40, 15))  # scattered outliers do not make levels
    lifetime += list(rng.integers(1, 40, 15))
    levels = count_levels(np.array(creation), np.array(lifetime))
    assert levels.n_levels == n_levels
    assert sorted(levels.table["creation_mean"].round().astype(int)) == sorted(c for c, _ in centres)
    assert levels.table["n_tokens"].sum() >= 0.95 * (len(creation) - 15)


def test_level_clustering_edge_cases():
    assert count_levels(np.array([]), np.array([])).n_levels == 0
    assert count_levels(np.array([5, 20]), np.array([3, 9])).n_levels == 0  # two tokens are no level
    counts = histogram(np.array([1, 1, 2]), np.array([3, 3, 4]), n_layers=4)
    assert counts.shape == (4, 5) and counts[1, 3] == 2 and counts[2, 4] == 1 and counts.sum() == 3


def test_analyze_sinks_writes_the_new_tables_and_figures(constructed, tmp_path):
    result = analyze_sinks(constructed, PROMPTS, SinksConfig(max_tokens=16), progress=False)
    path = result.save(tmp_path)
    loaded = Result.load(path)
    for table in ("secondary_sinks", "secondary_sink_scores", "secondary_sink_windows", "sink_formation",
                  "sink_levels", "sink_level_histogram", "tokens", "sink_heads"):
        assert (path / "tables" / f"{table}.parquet").is_file(), table
    for figure in ("sink_formation", "sink_levels", "alpha_first_token"):
        assert (path / "figures" / f"{figure}.html").is_file(), figure
    sinks = loaded.tables["secondary_sinks"]
    assert sorted(sinks["token_raw"].unique()) == ["w11", "w7", "w9"]
    assert sorted(sinks["token"].unique()) == [" w11", " w7", " w9"]  # readable: the text each token adds
    assert pd.Series(sinks["official_label"]).value_counts().to_dict() == {"secondary": 3, "primary_like": 2,
                                                                           "noise": 1}
    # The attention criterion (default: both) drops the w7 that only two queries see (position 9 of 11).
    assert pd.Series(sinks["label"]).value_counts().to_dict() == {"secondary": 2, "primary_like": 2, "noise": 1,
                                                                  "low_attention": 1}
    # Levels cluster the final secondary and primary-like sinks: four tokens on cells (5, 6) and (3, 12), too
    # far apart for one level and each below level_min_tokens (3); under the official labels one level of three.
    assert loaded.tables["sink_levels"].empty
    official = analyze_sinks(constructed, PROMPTS, SinksConfig(
        max_tokens=16, secondary=SecondarySinksConfig(criterion="official")), progress=False)
    assert official.tables["sink_levels"]["n_tokens"].tolist() == [3]
    assert official.summary["n_secondary"] == 3 and official.summary["n_low_attention"] == 0
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["config"]["lifetime_bounds_used"] == [4, 9]
    assert manifest["config"]["secondary"]["cos_threshold"] == 0.9
    assert result.summary["n_secondary"] == 2 and result.summary["n_official_secondary"] == 3
    assert "token_alpha" in loaded.tensors and "sink_level_histogram" in loaded.tensors


def test_parts_switch_off(constructed):
    off = SinksConfig(max_tokens=16, secondary=SecondarySinksConfig(enabled=False))
    result = analyze_sinks(constructed, PROMPTS[:1], off, progress=False)
    assert "secondary_sinks" not in result.tables and "sink_levels" not in result.figures
    partial = SinksConfig(max_tokens=16, secondary=SecondarySinksConfig(levels=False, formation=False))
    result = analyze_sinks(constructed, PROMPTS[:1], partial, progress=False)
    assert "secondary_sinks" in result.tables
    assert "sink_levels" not in result.tables and "sink_formation" not in result.tables


def test_generation_mode_analyses_prompt_and_continuation():
    import headlab
    from headlab.analyses.generation import prompt_token_ids
    from headlab.batching import encode

    loaded = headlab.load("tiny-llama")
    config = SinksConfig(max_tokens=40, generate=6)
    ids = prompt_token_ids(loaded, ["hello there", "abc"], config, progress=False)
    for prompt, row in zip(["hello there", "abc"], ids, strict=True):
        prefix = encode(loaded, prompt, 40)
        assert row[: len(prefix)] == prefix and len(row) == len(prefix) + 6
    result = analyze_sinks(loaded, ["hello there", "abc"], config, progress=False, token_ids=ids)
    assert result.tables["tokens"].groupby("prompt").size().tolist() == [len(r) for r in ids]
    with pytest.raises(InputError, match="no chat template"):
        prompt_token_ids(loaded, ["x"], SinksConfig(chat_template=True), progress=False)


def test_cli_flags_switch_parts_and_set_bounds(tmp_path):
    from typer.testing import CliRunner

    from headlab.cli import analyze_app

    base = ["sinks", "--model", "tiny-qwen3", "--n-prompts", "2", "--max-tokens", "16", "--quiet", "--out",
            str(tmp_path)]
    result = CliRunner().invoke(analyze_app, [*base, "--name", "r", "--no-levels", "--lifetime-low", "1",
                                              "--lifetime-high", "3"])
    assert result.exit_code == 0, result.output
    assert "secondary-sink scan" in result.output
    run = Result.load(tmp_path / "r")
    assert run.config["lifetime_bounds_used"] == [1, 3] and run.config["lifetime_bounds_rule"] == "given"
    assert "secondary_sinks" in run.tables and "sink_levels" not in run.tables
    bad = CliRunner().invoke(analyze_app, [*base, "--bos-position", "middle"])
    assert bad.exit_code == 2 and " ".join(bad.output.split()).startswith("error: --bos-position must be")


def test_repeats_of_the_bos_token_can_be_skipped(constructed):
    # A repeat of the BOS-position token has its residual and passes the cos test trivially (in a model
    # without BOS every repeat of the first word does). Here <bos> is written again at position 3.
    text = "w1 w7 <bos> w2"
    _, kept = _detect(constructed, text)
    _, skipped = _detect(constructed, text, SecondarySinksConfig(skip_bos_repeats=True))
    assert 3 in kept["position"].tolist() and 3 not in skipped["position"].tolist()
    assert 2 in skipped["position"].tolist()
