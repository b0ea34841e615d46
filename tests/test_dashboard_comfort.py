"""Dashboard comfort: heatmaps as tall as their layers, tiles and tables a person reads (labels, yes/no, "—",
model names instead of paths), "nothing found" instead of empty axes, honest head drill-down text, the live
page's edit labels and conflict note, and one-line errors for image bombs and models transformers refuses."""

from __future__ import annotations

import dataclasses
import json
import struct
import zlib

import dashboard_helpers
import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
import pytest
import torch
from dashboard_helpers import charts, texts
from streamlit.testing.v1 import AppTest

from headlab.analyses import SinksConfig, analyze_sinks
from headlab.analyses.sink_levels import count_levels, levels_figure
from headlab.dashboard import launch, live, live_edits, live_errors, live_model
from headlab.dashboard.labels import metric_label, metric_value, model_name
from headlab.dashboard.plots import fit_layer_height, heatmap_height, layer_head_heatmap, nothing_to_draw
from headlab.dashboard.views.circuits import score_heatmap
from headlab.dashboard.views.sinks import alpha_heatmap
from headlab.errors import InputError
from headlab.interventions import AttentionOverride, HeadMeanAblate, HeadScale, KeyKnockout, every_head
from headlab.prompts import bundled_prompts
from headlab.result import Result

APP = str(launch.APP_FILE)
KEY = "run-sinks"


def open_page(page: str, **params: str) -> AppTest:
    return dashboard_helpers.open_page(page, timeout=180, **params)


def chart_titled(at: AppTest, part: str) -> dict:
    found = [c for c in charts(at) if part in ((c["layout"].get("title") or {}).get("text") or "")]
    assert found, f"no chart titled with {part!r}"
    return found[0]


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory, load_model):
    """A real sinks run, the same run without stored patterns and with an empty sink-levels histogram, and
    manifest-only runs of analyses that record no prompt count (circuits, hallucination) or a model path."""
    root = tmp_path_factory.mktemp("comfort-runs")
    run = analyze_sinks(load_model("tiny-qwen3"), bundled_prompts()[:3], SinksConfig(max_tokens=16), progress=False)
    run.save(root, "sinks")
    empty_levels = levels_figure("tiny-qwen3", np.zeros((4, 5), dtype=int), count_levels([], []))
    bare = {k: v for k, v in run.tensors.items() if k not in {"head_patterns", "head_pattern_heads"}}
    dataclasses.replace(run, tensors=bare, figures={**run.figures, "sink_levels": empty_levels},
                        path=None).save(root, "sinks-bare")
    Result("circuits", "tiny-llama", {"tasks": ["ioi"], "n": 8, "method": "attribution"},
           summary={"tasks": ["ioi"], "method": "attribution", "circuit_size": 2}).save(root, "circuits-run")
    Result("lofit-eval", "/srv/exports/my-lofit", {}, summary={"accuracy_clean": 0.5, "n_items": 5},
           tables={"accuracy": pd.DataFrame({"condition": ["clean"], "accuracy": [0.5]})}).save(root, "lofit-run")
    methods = {"none": {"chair_i": 0.2}, "pai": {"chair_i": 0.1, "delta_chair_i": [-0.1, -0.2, 0.0]}}
    Result("hallucination", "/models/llava-v1.6.Q4_K_M.gguf", {"n": 20, "bench": "chair"},
           summary={"bench": "chair", "methods": methods}).save(root, "hallucination-run")
    return root


@pytest.fixture()
def app_env(monkeypatch, runs_dir):
    monkeypatch.setenv("HEADLAB_RUNS", str(runs_dir))
    return runs_dir


# --------------------------------------------------------------------------- 1. heatmaps sized by layers

def test_layer_head_heatmaps_grow_with_the_layer_count():
    small, deep = layer_head_heatmap(np.zeros((4, 4)), "t", "v"), layer_head_heatmap(np.zeros((30, 16)), "t", "v")
    assert small.layout.height == heatmap_height(4) >= 350  # a usable minimum for small models
    # ~20 px per layer: 30 layers no longer share plotly's default 450 px (about 250 px of plot).
    assert deep.layout.height == heatmap_height(30) >= 30 * 18 + 120
    assert heatmap_height(60) - heatmap_height(30) == 30 * 20

    alpha = torch.rand(30, 8, 4)
    sinks = Result("sinks", "m", {"eps": 0.3}, tensors={"alpha": alpha})
    assert alpha_heatmap(sinks, 0).layout.height == heatmap_height(30)
    circuits = Result("circuits", "m", {"method": "attribution"}, tensors={"scores.ioi": torch.randn(30, 8)},
                      tables={"circuits": pd.DataFrame({"task": ["ioi"], "layer": [3], "head": [1]})})
    assert score_heatmap(circuits, "ioi").layout.height == heatmap_height(30)


def test_a_saved_layer_heatmap_without_a_height_is_sized_too():
    saved = go.Figure(go.Heatmap(z=np.random.rand(32, 8)))
    saved.update_layout(xaxis_title="head", yaxis_title="layer")
    saved = pio.from_json(pio.to_json(saved))  # as a run reads it back: z is a typed array
    assert fit_layer_height(saved).layout.height == heatmap_height(32) and saved.layout.height is None
    other = go.Figure(go.Heatmap(z=np.random.rand(32, 8)))
    other.update_layout(yaxis_title="query")
    assert fit_layer_height(other) is other


def test_sinks_page_heatmap_has_the_layer_height(app_env):
    at = open_page("run", run="sinks")
    heatmap = chart_titled(at, "key position 0")
    assert heatmap["layout"]["height"] == heatmap_height(4)


# ----------------------------------------------------------------------------------- 2. tiles a person reads

def test_metric_labels_and_values_read_as_words():
    assert metric_label("n_prompts") == "prompts" and metric_label("sink_1_pct") == "Sink₁ (%)"
    assert metric_label("n_images") == "images" and metric_label("yes_ratio_pct") == "yes ratio (%)"
    assert metric_value(True) == "yes" and metric_value(False) == "no"
    assert metric_value(0.123456) == "0.1235" and metric_value(None) == "—" and metric_value(7) == "7"


def test_run_header_tiles_and_the_sink_head_tile_are_labelled(app_env):
    run = Result.load(app_env / "sinks")
    at = open_page("run", run="sinks")
    labels = [m.label for m in at.metric]
    assert {"prompts", "tokens", "layers", "heads"} <= set(labels)
    assert not any("_" in label for label in labels), labels  # no raw manifest key on a tile
    tiles = {m.label: m.value for m in at.metric}
    layer = at.selectbox(key=f"{KEY}-head-layer").value
    head = at.selectbox(key=f"{KEY}-head-head").value
    expected = "yes" if int(run.tensors["sink_heads"][layer, head]) else "no"
    assert tiles["sink head (alpha > eps)"] == expected  # not "1" or "0"


# ------------------------------------------------------------------------------------------- 3. runs table

def test_runs_table_shows_counts_or_a_dash_and_model_names_not_paths(app_env):
    at = open_page("runs")
    table = at.dataframe[0].value.set_index("run")
    assert table.loc["sinks", "prompts"] == "3"
    assert table.loc["lofit-run", "prompts"] == "5"  # LoFiT: one prompt per item
    assert table.loc["circuits-run", "prompts"] == "—" and table.loc["hallucination-run", "prompts"] == "—"
    assert not table["prompts"].astype(str).str.contains("None").any()
    assert table.loc["lofit-run", "model"] == "my-lofit"
    assert table.loc["hallucination-run", "model"] == "llava-v1.6.Q4_K_M"
    assert not table["model"].str.contains("/").any()
    assert "Sink₁ (%)" in table.loc["sinks", "key figures"]
    # The key figures column is as wide as its longest text (about 7 px a character): nothing is cut.
    config = json.loads(at.dataframe[0].proto.columns)
    width = config["key figures"]["width"]
    assert isinstance(width, int) and width >= 7 * table["key figures"].str.len().max()
    # The model filter offers the names too.
    assert "my-lofit" in at.multiselect(key="runs-model").options


def test_model_names():
    assert model_name("/data/exports/my-lofit/") == "my-lofit"
    assert model_name("~/q/qwen3-0.6b.Q8_0.gguf") == "qwen3-0.6b.Q8_0"
    assert model_name("smollm2-135m") == "smollm2-135m" and model_name("Qwen/Qwen3-14B") == "Qwen/Qwen3-14B"


# ------------------------------------------------------------------------------- 4. nothing found, not axes

def test_an_all_blank_heatmap_is_nothing_to_draw():
    empty = pio.from_json(pio.to_json(levels_figure("m", np.zeros((4, 5), dtype=int), count_levels([], []))))
    assert nothing_to_draw(empty)
    counts = np.zeros((4, 5), dtype=int)
    counts[1, 2] = 3
    assert not nothing_to_draw(pio.from_json(pio.to_json(levels_figure("m", counts, count_levels([1], [2])))))
    assert nothing_to_draw(go.Figure(go.Scatter(x=[0, 1], y=[float("nan")] * 2)))
    assert not nothing_to_draw(go.Figure(go.Bar(x=["a", "b"], y=[0.0, 1.0])))


def test_sink_levels_without_any_sink_say_nothing_found(app_env):
    at = open_page("run", run="sinks-bare")
    levels = chart_titled(at, "sink levels")
    assert not levels["data"], "the empty histogram was drawn as axes"
    assert levels["layout"]["annotations"][0]["text"] == "nothing found"


# ------------------------------------------------------------------------------ 5. the head drill-down text

def test_head_view_says_which_heads_have_a_stored_pattern(app_env):
    run = Result.load(app_env / "sinks")
    saved = [tuple(x) for x in run.tensors["head_pattern_heads"].tolist()]
    listed = ", ".join(f"L{layer}H{head}" for layer, head in saved)
    at = open_page("run", run="sinks")
    assert f"only for its {len(saved)} heads" in texts(at.caption) and listed in texts(at.caption)
    unsaved = next((la, h) for la in range(4) for h in range(4) if (la, h) not in saved)
    at.selectbox(key=f"{KEY}-head-layer").set_value(unsaved[0]).run()
    at.selectbox(key=f"{KEY}-head-head").set_value(unsaved[1]).run()
    note = texts(at.info)
    assert f"No stored pattern for layer {unsaved[0]}, head {unsaved[1]}" in note
    assert f"keeps full attention patterns only for its {len(saved)} heads" in note and listed in note
    assert not any("attention pattern of prompt" in (c["layout"].get("title") or {}).get("text", "")
                   for c in charts(at))

    bare = open_page("run", run="sinks-bare")
    assert "keeps no full attention pattern of any head" in texts(bare.info)


# ------------------------------------------------------------------------------- 6. edits: labels, conflicts

def test_edits_are_described_as_a_person_reads_them():
    describe = live_edits.describe_edit
    assert describe(HeadScale(every_head([2]), alpha=0.0)) == "zero-ablate (scale 0): every head of layer 2"
    assert describe(HeadScale([(1, 0), (1, 3)], alpha=6.0, rows="last")) == "scale ×6: L1H0, L1H3, last row only"
    assert describe(HeadMeanAblate(every_head([0, 1, 2]))) == "mean-ablate: every head of layers 0-2"
    assert describe(KeyKnockout([(0, 0)], keys=[0])) == "key knockout: L0H0"
    assert "HeadScale" not in describe(HeadScale([(0, 1)], alpha=0.0))


def test_two_edits_of_one_head_are_a_conflict_note():
    class Arch:
        n_layers, n_heads = 4, 4

    labelled = [("Attention override", AttentionOverride([(0, 0)], keys=[1])),
                ("Key knockout", KeyKnockout([(0, 0), (1, 2)], keys=[0])),
                ("Head scale", HeadScale(every_head([3]), alpha=2.0))]
    conflicts = live_edits.head_conflicts(labelled, Arch())
    assert list(conflicts) == [(0, 0)]
    note = live_edits.conflict_note(conflicts)
    assert "L0H0" in note and "Attention override" in note and "Key knockout" in note and "L1H2" not in note
    assert live_edits.conflict_note(live_edits.head_conflicts(labelled[1:], Arch())) is None


def test_live_page_notes_conflicting_edits_and_labels_the_ablation():
    live.cached_model.clear()
    at = open_page("live", model="backcopy")
    at.button(key="live-load").click().run()
    at.button(key="live-run").click().run()
    assert not at.exception and chart_titled(at, "backcopy: entropy")["layout"]["height"] == heatmap_height(4)
    # Like "Select all": the override and the knockout both preselect the picked head (0, 0).
    at.multiselect(key="live-edits").set_value(["attention_override", "key_knockout"]).run()
    note = texts(at.warning)
    assert "Conflict" in note and "L0H0" in note and "Attention override" in note and "Key knockout" in note
    at.multiselect(key="live-edits").set_value(["head_ablation"]).run()
    assert "Conflict" not in texts(at.warning)
    at.number_input(key="live-new-tokens").set_value(2)
    at.button(key="live-generate").click().run()
    assert not at.exception and not at.error
    shown = texts(at.markdown)
    assert "zero-ablate (scale 0): L0H0" in shown and "HeadScale" not in shown


# ------------------------------------------------------------------------------------ 7. one-line errors

def png_bomb(width: int, height: int) -> bytes:
    """A real PNG of width x height black 1-bit pixels: a few hundred kB that claim a huge image."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def test_an_image_bomb_is_one_input_error():
    bomb = png_bomb(20000, 20000)
    assert len(bomb) < 1_000_000
    with pytest.raises(InputError, match="pixel limit"):
        live_model.read_image(bomb, "bomb.png")
    with pytest.raises(InputError, match="10000×10000 pixels, over the"):  # Pillow only warns here
        live_model.read_image(png_bomb(10000, 10000), "big.png")


def test_an_image_bomb_on_the_live_page_is_one_line(load_model):
    live.cached_model.clear()
    at = open_page("live", model="tiny-llava")
    at.button(key="live-load").click().run()
    at.file_uploader(key="live-image").set_value(("bomb.png", png_bomb(20000, 20000), "image/png"))
    at.button(key="live-run").click().run()
    assert not at.exception
    [error] = at.error
    assert "bomb.png" in error.value and "pixel limit" in error.value
    assert "\n" not in error.value and "Traceback" not in error.value and "site-packages" not in error.value
    assert not charts(at)


def test_load_errors_are_one_line():
    report = ["LlamaForCausalLM LOAD REPORT from: /srv/x/broken",
              "model.layers.{0, 1}.mlp.up_proj.weight | MISMATCH | Reinit due to size mismatch - ckpt: "
              "torch.Size([128, 64]) vs model:torch.Size([256, 64])"]
    above = RuntimeError("You set `ignore_mismatched_sizes` to `False`, thus raising an error. For details look "
                         "at the above report!")
    message = live_errors.load_error_message(above, report)
    assert "above report" not in message and "[128, 64] in the checkpoint but [256, 64]" in message
    assert "config.json" in message
    assert "above report" not in live_errors.load_error_message(above, [])
    odd = ValueError("first line\n  File \"/srv/headlab/x.py\", line 3\nmore")
    assert live_errors.load_error_message(odd, []) == "ValueError: first line"
    assert live_errors.load_error_message(InputError("no model given"), []) == "no model given"


def test_a_model_transformers_refuses_is_one_line_naming_it(tmp_path, load_model):
    tiny = load_model("tiny-llama")
    folder = tmp_path / "broken-llama"
    tiny.model.save_pretrained(folder)
    tiny.text_tokenizer.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] *= 2  # the weights no longer fit the architecture config.json describes
    (folder / "config.json").write_text(json.dumps(config))
    live.cached_model.clear()
    at = open_page("live")
    at.selectbox(key="live-model").set_value(live.LOCAL).run()
    at.text_input(key="live-path").input(str(folder))
    at.button(key="live-load").click().run()
    assert not at.exception
    [error] = at.error
    # Named by the folder's name, the architecture problem said (not transformers' "look at the above report",
    # whose report the page does not show), one line without a traceback.
    assert error.value.startswith("cannot load 'broken-llama': ")
    assert "config.json" in error.value and "above report" not in error.value
    assert "\n" not in error.value and "Traceback" not in error.value and "site-packages" not in error.value
