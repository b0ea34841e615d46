"""Sink categories (BOS, first text token, non-initial sinks), per run and per head (docs/sinks.md).

Hand-built attention statistics for the definitions; real models for the regimes: gemma3-270m with BOS (a BOS
sink), gemma3-270m without it (delimiter sinks carrying dim 163), smollm2-135m (no BOS: a first-text-token sink).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from headlab.analyses.sink_categories import SinkCategories, non_initial_sinks

BOS_ID = 1
N_LAYERS, N_HEADS, LENGTH = 2, 2, 8
COUNT = LENGTH - torch.arange(LENGTH, dtype=torch.float64)  # causal: queries that see key k


def _stats(alpha: torch.Tensor) -> dict[str, torch.Tensor]:
    """``alpha [layer, head, key]`` -> the per-prompt statistics ``SinkCategories.add`` reads (causal, LENGTH rows)."""
    count = COUNT.expand(N_LAYERS, LENGTH).clone()
    return {"mass": alpha * count[:, None, :], "count": count, "rows": torch.full((N_LAYERS,), float(LENGTH))}


def _massive(position: int, dim: int, layer: int = 0) -> dict:
    return {"position": position, "dim": dim, "layer": layer}


def test_non_initial_sinks_need_eps_and_enough_queries():
    alpha = torch.full((N_LAYERS, N_HEADS, LENGTH), 0.05)
    alpha[:, :, 0] = 0.9  # position 0 is never non-initial
    alpha[1, 0, 3] = 0.4  # one head of one layer is enough
    alpha[0, 1, 7] = 0.9  # the last key: one query, its own row
    alpha[0, 0, 5] = 0.3  # not above eps
    hits = non_initial_sinks(alpha, COUNT.expand(N_LAYERS, LENGTH), eps=0.3, needed=2)
    assert hits.nonzero().tolist() == [[1, 3]]
    assert non_initial_sinks(alpha, COUNT.expand(N_LAYERS, LENGTH), eps=0.3, needed=1)[0, 7]


def test_categories_shares_dims_and_dominant_heads():
    tally = SinkCategories(N_LAYERS, N_HEADS, eps=0.3, min_queries=2, bos_id=BOS_ID)
    # Prompt 0 starts with BOS, which gets 0.5 of every query in every head; token 2 gets alpha 0.4 in head 1
    # (a non-initial sink) and carries massive dim 7; token 4 carries dim 9 but receives little.
    bos = torch.full((N_LAYERS, N_HEADS, LENGTH), 0.01)
    bos[:, :, 0] = 0.5
    bos[:, 1, 2] = 0.4
    found = tally.add(0, [BOS_ID, 5, 6, 7, 8, 9, 10, 11], _stats(bos),
                      [_massive(0, 7), _massive(2, 7), _massive(2, 7, 1), _massive(4, 9)], list("abcdefgh"),
                      list("abcdefgh"))
    assert found == {"bos": [0], "non_initial": [2]}
    # Prompt 1 has no BOS: its first text token gets 0.1, token 5 gets 0.6 in head 0 of layer 1 only.
    text = torch.full((N_LAYERS, N_HEADS, LENGTH), 0.01)
    text[:, :, 0] = 0.1
    text[1, 0, 5] = 0.6
    found = tally.add(1, [5, 6, 7, 8, 9, 10, 11, 12], _stats(text), [], list("ABCDEFGH"), list("ABCDEFGH"))
    assert found == {"first_text_token": [0], "non_initial": [5]}

    tables = tally.tables()
    cats = tables["sink_categories"].set_index("category")
    rows = 2 * LENGTH  # counted queries over both prompts
    # Share = mass received / queries: BOS 0.5 x 8 queries in prompt 0 only -> 4 / 16 in every head.
    assert cats.loc["bos", "attention_share"] == pytest.approx(4 / rows)
    assert cats.loc["first_text_token", "attention_share"] == pytest.approx(0.1 * LENGTH / rows)
    # Non-initial: token 2 of prompt 0 (0.4 x 6 queries in head 1, 0.01 x 6 in head 0) and token 5 of prompt 1
    # (0.6 x 3 queries in head 0 of layer 1, else 0.01 x 3), averaged over the 4 (layer, head) pairs.
    expected = (2 * (0.4 * 6 + 0.01 * 6) + (0.6 * 3 + 3 * 0.01 * 3)) / 4 / rows
    assert cats.loc["non_initial", "attention_share"] == pytest.approx(expected)
    assert cats.loc["bos", "n_tokens"] == 1 and cats.loc["bos", "n_sink_tokens"] == 1
    assert cats.loc["first_text_token", "n_sink_tokens"] == 0  # 0.1 < eps: position 0 there is no sink
    assert cats.loc["non_initial", "n_tokens"] == 2
    assert cats.loc["bos", "massive_dims"] == "7" and cats.loc["non_initial", "massive_dims"] == "7"
    assert cats.loc["non_initial", "massive_hits"] == 2 and cats.loc["first_text_token", "massive_dims"] == ""
    # Per head: BOS's 0.25 beats the non-initial sinks' largest shares ((1.8 + 0.06) / 16 in layer 1 head 0,
    # (2.4 + 0.03) / 16 in head 1) and the first text token's 0.05: BOS dominates every head.
    heads = tables["head_sink_categories"].set_index(["layer", "head"])
    assert (heads["category"] == "bos").all() and cats.loc["bos", "n_heads_dominant"] == 4
    assert heads.loc[(1, 0), "non_initial_mass"] == pytest.approx((0.01 * 6 + 0.6 * 3) / rows)
    assert heads.loc[(0, 1), "sink_mass"] == pytest.approx((4 + 0.8 + 0.4 * 6 + 0.01 * 3) / rows)
    # Massive carriers per dim: dim 7 on token 2 (a non-initial sink), dim 9 on token 4 (not one).
    carriers = tables["massive_carriers"].set_index("dim")
    assert carriers.loc[7, "n_tokens"] == 1 and carriers.loc[7, "n_non_initial_sinks"] == 1
    assert carriers.loc[9, "n_non_initial_sinks"] == 0
    assert carriers.loc[9, "attention_share"] == pytest.approx(0.01 * 4 / rows)
    assert (carriers.loc[7, "first_layer"], carriers.loc[7, "last_layer"]) == (0, 1)
    sinks = tables["non_initial_sinks"]
    assert sinks[["prompt", "position", "layer", "head", "n_layers", "first_layer"]].values.tolist() == [
        [0, 2, 0, 1, 2, 0], [1, 5, 1, 0, 1, 1]]
    summary = tally.summary(tables)
    assert summary["dominant_sink_category"] == "bos"
    assert summary["sink_category_sentence"].startswith("BOS 25.0% of attention, dims 7;")


def test_a_head_dominated_by_non_initial_sinks():
    tally = SinkCategories(N_LAYERS, N_HEADS, eps=0.3, min_queries=2, bos_id=BOS_ID)
    alpha = torch.full((N_LAYERS, N_HEADS, LENGTH), 0.02)
    alpha[:, 1, 3] = 0.7  # head 1 looks at token 3, not at position 0 (a text token here)
    tally.add(0, [5] * LENGTH, _stats(alpha), [], list("abcdefgh"), list("abcdefgh"))
    heads = tally.tables()["head_sink_categories"].set_index(["layer", "head"])
    assert heads.loc[(0, 1), "category"] == "non_initial" and heads.loc[(1, 1), "category"] == "non_initial"
    assert heads.loc[(0, 0), "category"] == "first_text_token"  # 0.02 x 8 on position 0 beats 0.02 x 5 on 3
    assert heads.loc[(0, 1), "mass"] == pytest.approx(0.7 * 5 / LENGTH)
    assert tally.summary(tally.tables())["sink_category_heads"] == {"bos": 0, "first_text_token": 2,
                                                                   "non_initial": 2}


def test_categories_switch_off_and_tiny_model_run(load_model):
    from headlab.analyses.sinks import SinksConfig, analyze_sinks

    loaded = load_model("tiny-llama")
    on = analyze_sinks(loaded, ["hello there, how are you", "abc def"], SinksConfig(max_tokens=16), progress=False)
    cats = on.tables["sink_categories"]
    assert cats["category"].tolist() == ["bos", "first_text_token", "non_initial"]
    assert cats["n_tokens"].iloc[:2].sum() == 2  # position 0 of each prompt is in exactly one category
    assert len(on.tables["head_sink_categories"]) == loaded.arch.n_layers * loaded.arch.n_heads
    assert "sink categories:" in on.report
    off = analyze_sinks(loaded, ["hello"], SinksConfig(max_tokens=16, categories=False), progress=False)
    assert "sink_categories" not in off.tables and "sink_category_sentence" not in off.summary


# --------------------------------------------------------------------------------------------- real models

def _run(loaded, n_prompts: int = 8):
    from headlab.analyses.configs import SecondarySinksConfig
    from headlab.analyses.sinks import SinksConfig, analyze_sinks
    from headlab.prompts import bundled_prompts

    config = SinksConfig(pattern_prompts=0, secondary=SecondarySinksConfig(enabled=False))
    return analyze_sinks(loaded, bundled_prompts()[:n_prompts], config, progress=False)


@pytest.mark.slow
def test_gemma3_with_bos_has_a_dominant_bos_sink(load_model):
    result = _run(load_model("gemma3-270m"))
    summary, cats = result.summary, result.tables["sink_categories"].set_index("category")
    # Measured (8 prompts, T = 64): BOS gets 45.8% of all attention and dominates all 72 heads; no later
    # position reaches eps; dim 163 sits on BOS only, dim 400 on 440 ordinary tokens at ~uniform attention.
    assert summary["dominant_sink_category"] == "bos"
    assert cats.loc["bos", "n_tokens"] == 8 and cats.loc["first_text_token", "n_tokens"] == 0
    assert cats.loc["bos", "attention_share"] > 0.35
    assert cats.loc["bos", "n_heads_dominant"] >= 0.9 * 72
    assert cats.loc["non_initial", "attention_share"] < 0.02
    assert "163" in cats.loc["bos", "massive_dims"].split(",")
    carriers = result.tables["massive_carriers"].set_index("dim")
    assert 163 not in carriers.index
    assert carriers.loc[400, "share_per_token"] < 1 / 64  # below uniform: not a sink


@pytest.mark.slow
def test_gemma3_without_bos_first_token_collapses_and_delimiters_take_the_sink(load_model):
    loaded = load_model("gemma3-270m")
    none = dataclasses.replace(loaded, arch=dataclasses.replace(loaded.arch, bos="none"))  # as --bos none
    result = _run(none)
    summary, cats = result.summary, result.tables["sink_categories"].set_index("category")
    # Measured (8 prompts): the first word gets 3.6% of attention (BOS: 45.8%), 17 non-initial sinks
    # (',', '.', '\n', ' ') 11.6% and dominate 70 of 72 heads; dim 163 moves to 9 delimiters.
    assert cats.loc["bos", "n_tokens"] == 0 and cats.loc["first_text_token", "n_tokens"] == 8
    assert cats.loc["first_text_token", "attention_share"] < 0.1
    assert cats.loc["first_text_token", "n_sink_tokens"] == 0
    assert cats.loc["non_initial", "n_tokens"] >= 5
    assert cats.loc["non_initial", "attention_share"] > 2 * cats.loc["first_text_token", "attention_share"]
    assert summary["dominant_sink_category"] == "non_initial"
    assert "163" in cats.loc["non_initial", "massive_dims"].split(",")
    carriers = result.tables["massive_carriers"].set_index("dim")
    assert carriers.loc[163, "share_per_token"] > 3 / 64  # dim-163 carriers receive several times uniform
    sinks = result.tables["non_initial_sinks"]
    assert sinks["token"].str.strip().isin([",", ".", "", ":", "'"]).mean() > 0.5  # mostly delimiters


@pytest.mark.slow
def test_smollm2_has_a_first_text_token_sink(load_model):
    result = _run(load_model("smollm2-135m"))
    summary, cats = result.summary, result.tables["sink_categories"].set_index("category")
    # Measured (8 prompts): the first text token gets 46.5% of attention, dominates 239 of 270 heads and carries
    # dim 507; 14 non-initial sinks (' the', '.', ' ') get 9.4%.
    assert summary["dominant_sink_category"] == "first_text_token"
    assert cats.loc["bos", "n_tokens"] == 0 and cats.loc["first_text_token", "n_sink_tokens"] == 8
    assert cats.loc["first_text_token", "attention_share"] > 0.35
    assert cats.loc["first_text_token", "massive_dims"] == "507"


def test_dashboard_sinks_page_shows_categories_and_the_saturation_warning(load_model, tmp_path, monkeypatch):
    from dashboard_helpers import charts, open_page, texts
    from streamlit.testing.v1 import AppTest

    from headlab.analyses.sinks import SinksConfig, analyze_sinks

    run = analyze_sinks(load_model("tiny-qwen3"), ["hello there, how are you", "abc def ghi"],
                        SinksConfig(max_tokens=16), progress=False)
    note = "The official secondary-sink criterion saturates: |cos| with BOS flags 97% of the 30 scanned tokens"
    run.summary["secondary_saturation_note"] = note  # a tiny random model does not saturate by itself
    run.save(tmp_path, "sinks")
    monkeypatch.setenv("HEADLAB_RUNS", str(tmp_path))

    def page(name: str) -> AppTest:
        return open_page("run", run=name)

    at = page("sinks")
    assert "Sink categories" in texts(at.subheader) and note in texts(at.warning)
    assert run.summary["secondary_counts_note"] in texts(at.caption)
    heatmap = next(c for c in charts(at) if "dominant sink category" in c["layout"]["title"]["text"])
    assert len(heatmap["data"][0]["y"]) == 4  # tiny-qwen3's layers
    del run.summary["secondary_saturation_note"]
    run.save(tmp_path, "quiet")
    assert "saturates" not in texts(page("quiet").warning)
