"""Secondary sinks: when the official cos test saturates, and headlab's attention criterion (docs/sinks.md).

Hand-built inputs (cosines, norms, attention statistics written directly) for the rules; gemma3-270m for the
case that motivated them: with BOS every token's residual is within |cos| > 0.9 of BOS's in layers 7-15.
"""

from __future__ import annotations

import pytest
import torch

from headlab.analyses.configs import SecondarySinksConfig
from headlab.analyses.secondary_sinks import (
    SecondarySinkCollector,
    attention_test,
    final_label,
    min_queries,
    suffix_means,
)
from headlab.errors import InputError
from headlab.probes import PARTS, LayerPartsSummary

N_LAYERS, N_HEADS, LENGTH = 6, 2, 8
WINDOW = (1, 4)  # from BOS_NORM: the largest rise after layer 0, the largest drop after layer 3
BOS_NORM = [1.0, 10.0, 11.0, 12.0, 2.0, 2.0]


def _parts(flagged: dict[int, list[int]]) -> LayerPartsSummary:
    """One prompt of LENGTH tokens; token t (> 0) has |cos| 0.95 with BOS at the layers ``flagged[t]``, else 0.1."""
    cos = torch.full((len(PARTS), N_LAYERS, 1, 3, LENGTH), 0.1)
    cos[:, :, :, 0, 0] = 1.0
    for token, layers in flagged.items():
        cos[:, layers, 0, 0, token] = 0.95
    norm = torch.ones(len(PARTS), N_LAYERS, 1, LENGTH)
    norm[:, :, 0, 0] = torch.tensor(BOS_NORM)
    return LayerPartsSummary(cos, norm)


def _attention(received: dict[int, float], bos_row: float = 0.5):
    """alpha ``[1, head, key]`` per layer (BOS gets ``bos_row`` from every query, token t ``received[t]``), the mass
    rows put on BOS ``[1, head, query]`` and the causal query counts ``[1, key]``."""
    alpha = torch.full((1, N_HEADS, LENGTH), 0.01)
    alpha[:, :, 0] = bos_row
    for token, value in received.items():
        alpha[:, :, token] = value
    first = torch.full((1, N_HEADS, LENGTH), bos_row)
    count = (LENGTH - torch.arange(LENGTH, dtype=torch.float32))[None]
    return ({la: alpha for la in range(N_LAYERS)}, {la: first for la in range(N_LAYERS)},
            {la: count for la in range(N_LAYERS)})


def _collect(flagged, received, config=None) -> SecondarySinkCollector:
    collector = SecondarySinkCollector(N_LAYERS, config or SecondarySinksConfig(lifetime_bounds=(1, 3)))
    alpha, first, count = _attention(received)
    tokens = [f"t{i}" for i in range(LENGTH)]
    found = collector.add(_parts(flagged), alpha, 0, LENGTH, 0, tokens, first_mass=first, key_count=count)
    assert found.window == WINDOW
    return collector


def test_final_label_needs_both_tests_unless_official():
    assert final_label("secondary", True, "both") == "secondary"
    assert final_label("secondary", False, "both") == "low_attention"
    assert final_label("primary_like", False, "both") == "low_attention"
    assert final_label("noise", False, "both") == "noise"  # noise claims no sink: nothing to refuse
    assert final_label("secondary", False, "official") == "secondary"


def test_attention_test_ratio_queries_and_missing_statistics():
    assert attention_test(0.10, 0.5, 16, 16, 0.2)  # exactly 0.2 x BOS
    assert not attention_test(0.099, 0.5, 16, 16, 0.2)
    assert not attention_test(0.40, 0.5, 15, 16, 0.2)  # too few queries see it: its own rows dominate
    assert attention_test(float("nan"), 0.5, 1, 16, 0.2)  # no statistics: the official label stands
    assert min_queries(16, 64) == 16 and min_queries(16, 11) == 3 and min_queries(16, 2) == 1
    rows = torch.tensor([[0.4, 0.2, 0.6, 0.0]])
    torch.testing.assert_close(suffix_means(rows), torch.tensor([[0.3, 0.8 / 3, 0.3, 0.0]]))


def test_saturation_is_reported_per_layer_and_overall():
    # 6 of the 7 tokens after BOS flagged at layers 1-3 (one only at layer 2): the cos test saturates.
    flagged = {t: [1, 2, 3] for t in (1, 2, 3, 4, 5)} | {6: [2]}
    collector = _collect(flagged, {})
    shares = collector.flag_share_table()
    assert shares["layer"].tolist() == [1, 2, 3]  # the scan window only
    assert shares["n_tokens"].tolist() == [7, 7, 7]
    assert shares["n_flagged"].tolist() == [5, 6, 5]
    summary = collector.summary()
    assert summary["official_flag_share"] == pytest.approx(6 / 7)
    assert summary["official_saturated"]
    assert summary["secondary_saturation_note"].startswith("The official secondary-sink criterion saturates")
    assert "86% of the 7 scanned tokens" in summary["secondary_saturation_note"]
    # Two flagged tokens of seven: no saturation, no note.
    quiet = _collect({1: [1, 2, 3], 2: [1, 2, 3]}, {}).summary()
    assert quiet["official_flag_share"] == pytest.approx(2 / 7)
    assert not quiet["official_saturated"] and quiet["secondary_saturation_note"] is None
    # The threshold is the config's.
    strict = _collect({1: [1, 2, 3], 2: [1, 2, 3]}, {}, SecondarySinksConfig(lifetime_bounds=(1, 3),
                                                                           saturation_share=0.25)).summary()
    assert strict["official_saturated"]


def test_attention_criterion_labels_only_tokens_that_pass_both():
    # Three tokens pass the cos test with lifetime 2 (secondary under bounds 1 and 3). Token 1 receives 0.3
    # (0.6 x BOS's 0.5), token 2 0.05 (0.1 x BOS), token 7 0.4 but only its own row sees it.
    flagged = {1: [1, 2], 2: [2, 3], 7: [1, 2]}
    collector = _collect(flagged, {1: 0.3, 2: 0.05, 7: 0.4})
    table = collector.sinks_table().set_index("position")
    assert table["official_label"].tolist() == ["secondary"] * 3
    assert table["attention_pass"].tolist() == [True, False, False]
    assert table["label"].tolist() == ["secondary", "low_attention", "low_attention"]
    assert table["score_to_bos"].tolist() == pytest.approx([0.6, 0.1, 0.8])
    assert table["n_queries"].tolist() == [7, 6, 1]
    assert table["bos_score_same_queries"].tolist() == pytest.approx([0.5] * 3)
    summary = collector.summary()
    assert (summary["n_official_secondary"], summary["n_attention_pass"], summary["n_both_secondary"]) == (3, 1, 1)
    assert (summary["n_secondary"], summary["n_low_attention"]) == (1, 2)
    assert "both: 1 secondary" in summary["secondary_counts_note"]
    # The official criterion alone keeps the cos test's labels and still records the attention test.
    official = _collect(flagged, {1: 0.3, 2: 0.05, 7: 0.4}, SecondarySinksConfig(lifetime_bounds=(1, 3),
                                                                                criterion="official"))
    assert official.sinks_table()["label"].tolist() == ["secondary"] * 3
    assert official.sinks_table()["attention_pass"].tolist() == [True, False, False]


def test_bos_score_comes_from_the_same_queries():
    # BOS gets 0.9 from the first four rows and 0.1 from the last four: a token at 4 is compared with 0.1.
    collector = SecondarySinkCollector(N_LAYERS, SecondarySinksConfig(lifetime_bounds=(1, 3)))
    alpha, first, count = _attention({4: 0.05})
    rows = torch.tensor([0.9] * 4 + [0.1] * 4).expand(1, N_HEADS, LENGTH)
    collector.add(_parts({4: [1, 2]}), alpha, 0, LENGTH, 0, [f"t{i}" for i in range(LENGTH)],
                  first_mass={la: rows for la in range(N_LAYERS)}, key_count=count)
    row = collector.sinks_table().iloc[0]
    assert row["bos_score_same_queries"] == pytest.approx(0.1)
    assert row["score_to_bos"] == pytest.approx(0.5) and row["attention_pass"]
    assert row["bos_alpha"] == pytest.approx(0.5)  # BOS's alpha over all its queries, as recorded before


def test_config_and_cli_refuse_a_bad_criterion(tmp_path):
    from typer.testing import CliRunner

    from headlab.cli import analyze_app

    with pytest.raises(InputError, match="--secondary-criterion"):
        SecondarySinksConfig(criterion="either").check()
    with pytest.raises(InputError, match="--attention-ratio"):
        SecondarySinksConfig(attention_ratio=-1).check()
    with pytest.raises(InputError, match="saturation_share"):
        SecondarySinksConfig(saturation_share=0).check()
    base = ["sinks", "--model", "tiny-qwen3", "--n-prompts", "2", "--max-tokens", "16", "--quiet", "--out",
            str(tmp_path)]
    bad = CliRunner().invoke(analyze_app, [*base, "--secondary-criterion", "either"])
    assert bad.exit_code == 2 and "--secondary-criterion must be official or both" in " ".join(bad.output.split())
    ok = CliRunner().invoke(analyze_app, [*base, "--name", "o", "--secondary-criterion", "official",
                                          "--attention-ratio", "0.3"])
    assert ok.exit_code == 0, ok.output
    assert "official (cos) criterion:" in " ".join(ok.output.split())
    from headlab.result import Result

    run = Result.load(tmp_path / "o")
    assert run.config["secondary"]["criterion"] == "official" and run.config["secondary"]["attention_ratio"] == 0.3
    assert run.summary["secondary_criterion"] == "official"


def test_cli_summary_warns_when_the_official_criterion_saturates():
    from headlab.cli.output import console
    from headlab.cli.summaries import print_sinks_summary

    summary = {"model": "m", "top_sink_heads": [], "n_tokens": 64, "n_prompts": 1, "eps": 0.3, "sink_1_pct": 50.0,
               "n_sink_heads": 1, "n_layers": 2, "n_heads": 2, "massive_dims": [], "massive_criterion": "x",
               "first_massive_layer": None, "n_sink_tokens": 60, "n_secondary": 0, "n_primary_like": 0,
               "n_noise": 2, "n_low_attention": 58, "lifetime_bounds": [1, 3], "secondary_criterion": "both",
               "secondary_counts_note": "official (cos) criterion: 58 secondary",
               "secondary_saturation_note": "The official secondary-sink criterion saturates: it flags 95%"}
    with console.capture() as captured:
        print_sinks_summary(summary, None, 64)
    text = " ".join(captured.get().split())
    assert "58 low attention" in text and "official (cos) criterion: 58 secondary" in text
    assert "warning: The official secondary-sink criterion saturates" in text
    summary["secondary_saturation_note"] = None
    with console.capture() as captured:
        print_sinks_summary(summary, None, 64)
    assert "saturates" not in captured.get()


# ------------------------------------------------------------------------------------------- gemma3-270m

@pytest.mark.slow
def test_gemma3_official_criterion_saturates_and_both_flags_far_fewer(load_model):
    from headlab.analyses.sinks import SinksConfig, analyze_sinks
    from headlab.prompts import bundled_prompts

    loaded = load_model("gemma3-270m")
    config = SinksConfig(pattern_prompts=0, secondary=SecondarySinksConfig(levels=False, formation=False))
    result = analyze_sinks(loaded, bundled_prompts()[:8], config, progress=False)
    summary, sinks = result.summary, result.tables["secondary_sinks"]
    # Measured (8 prompts, T = 64): the cos test flags all 504 tokens after BOS, 499 as secondary, 0 pass both.
    assert summary["official_flag_share"] > 0.9 and summary["official_saturated"]
    assert "saturates" in summary["secondary_saturation_note"] and "saturates" in result.report
    assert summary["n_official_secondary"] > 0.9 * summary["n_scanned_tokens"]
    # Their attention is small: mean sink score ~0.025 against BOS's ~0.4 from the same queries.
    assert summary["mean_sink_score_official_secondary"] < 0.1 * summary["mean_bos_score"]
    assert summary["n_secondary"] <= 0.05 * summary["n_official_secondary"]
    assert (sinks["label"] == "secondary").sum() == summary["n_secondary"]
    assert set(sinks.loc[~sinks["attention_pass"].astype(bool), "label"]) <= {"low_attention", "noise"}
    # Per layer of the scan window (measured on 18 prompts: 0.7% at layer 6, 75% at 7, 100% at 10, 57% at 15).
    shares = result.tables["secondary_flag_share"].set_index("layer")["share"]
    assert shares.max() > 0.9 and (shares > 0.5).sum() >= 5
