"""The dashboard: run discovery, view registry, figures, exports, the CLI command, and the app itself
driven through ``streamlit.testing.v1.AppTest`` (figure data read from the element tree)."""

from __future__ import annotations

import dataclasses
import re
import shutil

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch
from dashboard_helpers import array, charts, open_page, texts
from streamlit.testing.v1 import AppTest
from typer.testing import CliRunner

from headlab.analyses import SinksConfig, analyze_sinks
from headlab.cli import headlab_app
from headlab.dashboard import launch, registry
from headlab.dashboard.discovery import discover_runs, load_run
from headlab.dashboard.export import ExportError, figure_image, table_csv
from headlab.dashboard.plots import difference_heatmap, layer_head_heatmap
from headlab.dashboard.views.sinks import token_attention, token_html
from headlab.errors import HeadlabError, RunStoreError
from headlab.prompts import bundled_prompts
from headlab.result import Result

APP = str(launch.APP_FILE)
SINK_RUNS = ["sinks-qwen3-a", "sinks-qwen3-b", "sinks-llama"]


# ----------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory, load_model):
    """Three real sinks runs (tiny models), one run of an analysis without a view, and two broken folders."""
    root = tmp_path_factory.mktemp("runs")
    prompts = bundled_prompts()
    config = SinksConfig(max_tokens=16)
    qwen = load_model("tiny-qwen3")
    analyze_sinks(qwen, prompts[:4], config, progress=False).save(root, "sinks-qwen3-a")
    second = analyze_sinks(qwen, prompts[4:8], config, progress=False)
    # A table this dashboard has never heard of (other analyses add tables): it must be shown, not crash.
    second.tables["secondary_sinks"] = pd.DataFrame({"token": ["x", "y"], "lifetime": [5, 7]})
    second.save(root, "sinks-qwen3-b")
    analyze_sinks(load_model("tiny-llama"), prompts[:3], config, progress=False).save(root, "sinks-llama")
    profile = go.Figure(go.Scatter(x=[0, 1, 2], y=[0.5, 0.3, 0.2], name="mass by distance"))
    Result("example_without_view", "tiny-qwen3", {"n_prompts": 2},
           tables={"profile": pd.DataFrame({"distance": [0, 1, 2], "mass": [0.5, 0.3, 0.2]})},
           tensors={"bias": torch.arange(16.0).reshape(4, 4)}, figures={"profile": profile},
           summary={"slope": -0.15}, report="# position bias\n").save(root, "no-view-run")
    (root / "corrupt").mkdir()
    (root / "corrupt" / "manifest.json").write_text("{not json")
    (root / ".sinks-crashed.tmp-0123abcd").mkdir()
    (root / "notes.txt").write_text("not a run")
    return root


@pytest.fixture()
def app_env(monkeypatch, runs_dir):
    monkeypatch.setenv("HEADLAB_RUNS", str(runs_dir))
    return runs_dir


def open_app(page: str = "runs", **params: str) -> AppTest:
    return open_page(page, **params)


# ------------------------------------------------------------------------------------- run discovery

def test_discovery_lists_complete_runs_and_the_broken_ones_with_a_reason(runs_dir):
    listing = discover_runs(runs_dir)
    assert sorted(listing.names()) == sorted([*SINK_RUNS, "no-view-run"])
    reasons = {broken.name: broken.reason for broken in listing.broken}
    assert set(reasons) == {"corrupt", ".sinks-crashed.tmp-0123abcd"}
    assert "corrupt" in reasons["corrupt"] and "incomplete" in reasons[".sinks-crashed.tmp-0123abcd"]
    assert listing.get("sinks-llama").n_prompts == 3


def test_discovery_catches_missing_files_and_unreadable_tensors(tmp_path, runs_dir):
    shutil.copytree(runs_dir / "sinks-qwen3-a", tmp_path / "no-table")
    (tmp_path / "no-table" / "tables" / "sink_rate.parquet").unlink()
    shutil.copytree(runs_dir / "sinks-qwen3-a", tmp_path / "bad-tensors")
    (tmp_path / "bad-tensors" / "tensors.safetensors").write_bytes(b"garbage")
    listing = discover_runs(tmp_path)
    assert [b.name for b in listing.broken] == ["no-table"]
    assert "tables/sink_rate.parquet" in listing.broken[0].reason
    # Damage only a full read can see is a RunStoreError with the reason, not a library traceback.
    with pytest.raises(RunStoreError, match="cannot be read"):
        load_run(tmp_path, "bad-tensors")


def test_missing_runs_folder_is_an_empty_listing_and_a_file_is_refused(tmp_path):
    assert discover_runs(tmp_path / "nothing").runs == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunStoreError, match="existing file"):
        discover_runs(tmp_path / "file")


@pytest.mark.parametrize("name", ["../sinks-qwen3-a", "..", "/etc", "/etc/passwd", "a/../../b", "sub/run"])
def test_run_names_that_leave_the_runs_folder_are_refused(runs_dir, name):
    with pytest.raises(RunStoreError, match="not allowed|outside"):
        load_run(runs_dir, name)


# ------------------------------------------------------------------------------------------ registry

def test_views_register_through_the_decorator_and_unknown_analyses_fall_back(monkeypatch):
    registry.load_views()  # register every real view first: the copy below is thrown away after the test
    monkeypatch.setattr(registry, "_VIEWS", dict(registry._VIEWS))

    @registry.register_view("toy_analysis", title="Toy")
    class ToyView(registry.View):
        def key_figures(self, manifest):
            return {"answer": 42}

    assert isinstance(registry.get_view("toy_analysis"), ToyView)
    assert registry.get_view("toy_analysis").title == "Toy"
    assert registry.get_view("toy_analysis").key_figures({}) == {"answer": 42}
    assert "sinks" in registry.registered_views()  # its view module is named in the analysis registry
    assert isinstance(registry.get_view("never_heard_of_it"), registry.GenericView)
    assert "headlab.dashboard.views.sinks" not in registry.broken_views()

    class Other(registry.View):
        pass

    with pytest.raises(HeadlabError, match="already has the view"):
        registry.register_view("toy_analysis")(Other)
    with pytest.raises(HeadlabError, match="View subclasses"):
        registry.register_view("x")(lambda run, key: None)


def test_a_view_module_that_fails_to_import_is_reported_not_fatal(tmp_path, monkeypatch):
    package = tmp_path / "more_views"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "good.py").write_text("from headlab.dashboard.registry import View, register_view\n"
                                     "@register_view('good_analysis')\nclass GoodView(View):\n    pass\n")
    (package / "bad.py").write_text("raise ImportError('needs a package that is not installed')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.load_views()  # register every real view first: the copy below is thrown away after the test
    monkeypatch.setattr(registry, "_VIEWS", dict(registry._VIEWS))
    monkeypatch.setattr(registry, "_BROKEN_VIEWS", {})
    from headlab.analyses import registry as analyses

    monkeypatch.setattr(analyses, "ANALYSES", {
        "good_analysis": analyses.Analysis("good_analysis", "Good", "x:run", view="more_views.good"),
        "bad_analysis": analyses.Analysis("bad_analysis", "Bad", "x:run", view="more_views.bad")})
    registry.load_views()  # the views the analysis registry names, and only those
    assert registry._BROKEN_VIEWS == {"more_views.bad": "ImportError: needs a package that is not installed"}
    assert type(registry.get_view("good_analysis")).__name__ == "GoodView"


def test_generic_key_figures_keep_scalars_only():
    manifest = {"summary": {"a": 1.5, "flag": True, "items": [1, 2], "name": "m", "n": 3}}
    assert registry.GenericView().key_figures(manifest) == {"a": 1.5, "name": "m", "n": 3}


# ------------------------------------------------------------------------------------------- figures

def test_layer_head_heatmap_puts_layers_on_y_and_shows_exact_values_on_hover():
    values = torch.arange(6.0).reshape(3, 2)  # [layer, head]
    trace = layer_head_heatmap(values, "t", "alpha").data[0]
    assert list(trace.y) == [0, 1, 2] and list(trace.x) == [0, 1]
    np.testing.assert_array_equal(trace.z, values.numpy())
    assert "%{z:.6g}" in trace.hovertemplate


def test_difference_heatmap_is_right_minus_left_on_a_scale_centred_at_zero():
    left = torch.tensor([[0.1, 0.5], [0.2, 0.2]])
    right = torch.tensor([[0.4, 0.5], [0.0, 0.3]])
    trace = difference_heatmap(left, right, "d", "Δ").data[0]
    np.testing.assert_allclose(trace.z, (right - left).numpy(), atol=1e-7)
    assert trace.zmin == pytest.approx(-0.3) and trace.zmax == pytest.approx(0.3)
    assert trace.colorscale[0][1] != trace.colorscale[-1][1]  # two-sided (RdBu), not a one-colour ramp
    with pytest.raises(ValueError, match="cannot subtract"):
        difference_heatmap(left, torch.zeros(3, 2), "d", "Δ")


def test_token_view_values_are_token_alpha_and_html_is_escaped(runs_dir):
    run = load_run(runs_dir, "sinks-qwen3-a")
    tokens, values = token_attention(run, prompt=1, layer=2, head=3)
    expected = run.tables["tokens"].query("prompt == 1").sort_values("position")["token"].tolist()
    assert tokens == expected
    np.testing.assert_allclose(values, run.tensors["token_alpha"][1, 2, 3, : len(tokens)].numpy())
    _, mean = token_attention(run, prompt=1, layer=2, head=None)
    np.testing.assert_allclose(mean, run.tensors["token_alpha"][1, 2, :, : len(tokens)].mean(0).numpy(), rtol=1e-6)
    page = token_html(["<b>", "a"], np.array([0.5, 0.25]))
    assert "&lt;b&gt;" in page and "<b>" not in page
    assert 'rgba(220, 38, 38, 1.000)' in page and 'rgba(220, 38, 38, 0.500)' in page


# ------------------------------------------------------------------------------------------- exports

def test_figures_export_as_real_png_and_svg():
    fig = layer_head_heatmap(torch.rand(2, 3), "export", "alpha")
    png = figure_image(fig, "png", width=300, height=200)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    svg = figure_image(fig, "svg", width=300, height=200).decode("utf-8")
    assert re.search(r"<svg[^>]*xmlns=\"http://www.w3.org/2000/svg\"", svg) and svg.rstrip().endswith("</svg>")
    with pytest.raises(ExportError, match="png, svg"):
        figure_image(fig, "gif")


def test_tables_export_as_csv():
    table = pd.DataFrame({"layer": [0, 1], "token": ["a,b", "c"]})
    assert table_csv(table).decode() == 'layer,token\n0,"a,b"\n1,c\n'


# ------------------------------------------------------------------------------------------------ CLI

def test_dashboard_command_refuses_a_missing_or_file_runs_folder(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(headlab_app, ["dashboard", "--runs", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "error:" in missing.output and "does not exist" in missing.output
    (tmp_path / "file").write_text("x")
    file = runner.invoke(headlab_app, ["dashboard", "--runs", str(tmp_path / "file")])
    assert file.exit_code == 2 and "not a folder" in file.output
    port = runner.invoke(headlab_app, ["dashboard", "--runs", str(tmp_path), "--port", "70000"])
    assert port.exit_code == 2 and "--port" in port.output


def test_dashboard_command_starts_streamlit_on_localhost(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("headlab.dashboard.launch.run_child", lambda command: calls.append(command) or 0)
    monkeypatch.setattr("headlab.dashboard.launch.check_port_free", lambda host, port: None)  # tested on its own
    result = CliRunner().invoke(headlab_app, ["dashboard", "--runs", str(tmp_path), "--port", "8765"])
    assert result.exit_code == 0, result.output
    assert "http://127.0.0.1:8765" in result.output
    [command] = calls
    assert command[1:5] == ["-m", "streamlit", "run", APP]
    assert command[command.index("--server.address") + 1] == "127.0.0.1"
    assert command[command.index("--server.port") + 1] == "8765"
    assert command[command.index("--server.headless") + 1] == "true"
    assert command[command.index("--browser.gatherUsageStats") + 1] == "false"
    assert command[-3:] == ["--", "--runs", str(tmp_path.resolve())]
    calls.clear()
    CliRunner().invoke(headlab_app, ["dashboard", "--runs", str(tmp_path), "--host", "0.0.0.0"])
    assert calls[0][calls[0].index("--server.address") + 1] == "0.0.0.0"


# --------------------------------------------------------------------------------------- the app

def test_app_with_no_runs_shows_a_friendly_empty_state(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADLAB_RUNS", str(tmp_path))
    for page in ("runs", "run", "compare"):
        at = open_app(page)
        assert "No runs yet" in texts(at.info)
        assert "analyze sinks" in texts(at.code)
        assert not at.error and not charts(at)
    monkeypatch.setenv("HEADLAB_RUNS", str(tmp_path / "later"))
    assert "does not exist yet" in texts(open_app("runs").info)


def test_runs_page_lists_runs_filters_them_and_lists_broken_runs_apart(app_env):
    at = open_app("runs")
    runs, broken = at.dataframe[0].value, at.dataframe[1].value
    assert sorted(runs["run"]) == sorted([*SINK_RUNS, "no-view-run"])
    assert set(runs.columns) >= {"analysis", "model", "date", "prompts", "key figures"}
    sinks_row = runs.set_index("run").loc["sinks-llama"]
    assert sinks_row["prompts"] == "3" and "Sink₁ (%)" in sinks_row["key figures"]
    assert set(broken["folder"]) == {"corrupt", ".sinks-crashed.tmp-0123abcd"}
    assert broken.set_index("folder").loc["corrupt", "reason"].endswith("run it again")

    at.text_input(key="runs-filter").input("llama").run()
    assert at.dataframe[0].value["run"].tolist() == ["sinks-llama"]
    at.text_input(key="runs-filter").input("").run()
    at.multiselect(key="runs-analysis").select("example_without_view").run()
    assert at.dataframe[0].value["run"].tolist() == ["no-view-run"]


def test_sinks_page_plots_alpha_of_the_chosen_key_position(app_env):
    run = load_run(app_env, "sinks-qwen3-a")
    at = open_app("run", run="sinks-qwen3-a")
    assert at.header[0].value == "Attention sinks: sinks-qwen3-a"
    heatmap, rate, norms = charts(at)[:3]
    np.testing.assert_allclose(array(heatmap["data"][0]["z"]), run.tensors["alpha"][:, :, 0].numpy())
    assert heatmap["layout"]["yaxis"]["title"]["text"] == "layer"
    assert heatmap["layout"]["xaxis"]["title"]["text"] == "head"
    np.testing.assert_allclose(array(rate["data"][0]["y"]), run.tensors["sink_rate"].numpy())
    np.testing.assert_allclose(array(norms["data"][0]["y"]), run.tensors["first_token_norm"].numpy(), rtol=1e-6)
    np.testing.assert_allclose(array(norms["data"][1]["y"]), run.tensors["median_token_norm"].numpy(), rtol=1e-6)

    at.radio(key="run-sinks-qwen3-a-k").set_value(3).run()
    moved = array(charts(at)[0]["data"][0]["z"])
    np.testing.assert_allclose(moved, run.tensors["alpha"][:, :, 3].numpy())
    assert not np.allclose(moved, run.tensors["alpha"][:, :, 0].numpy())
    assert "key position 3" in charts(at)[0]["layout"]["title"]["text"]


def test_sinks_token_view_follows_prompt_layer_and_head(app_env):
    run = load_run(app_env, "sinks-qwen3-a")
    at = open_app("run", run="sinks-qwen3-a")

    def shown() -> np.ndarray:
        return np.array([float(v) for v in re.findall(r'title="([^"]+)"', at.get("html")[0].proto.body)])

    n = len(run.tables["tokens"].query("prompt == 0"))
    np.testing.assert_allclose(shown(), run.tensors["token_alpha"][0, 0, :, :n].mean(0).numpy(), rtol=1e-5)
    at.selectbox(key="run-sinks-qwen3-a-tok-layer").set_value(2).run()
    at.selectbox(key="run-sinks-qwen3-a-tok-head").set_value(1).run()
    np.testing.assert_allclose(shown(), run.tensors["token_alpha"][0, 2, 1, :n].numpy(), rtol=1e-5)
    at.selectbox(key="run-sinks-qwen3-a-prompt").set_value(3).run()
    n3 = len(run.tables["tokens"].query("prompt == 3"))
    np.testing.assert_allclose(shown(), run.tensors["token_alpha"][3, 2, 1, :n3].numpy(), rtol=1e-5)


def test_sinks_page_shows_tables_it_does_not_know_instead_of_crashing(app_env):
    at = open_app("run", run="sinks-qwen3-b")
    assert "More from this run" in texts(at.subheader)
    assert any("table secondary_sinks (2 rows)" == e.label for e in at.expander)


def test_run_of_an_analysis_without_a_view_renders_generically(app_env):
    at = open_app("run", run="no-view-run")
    assert at.header[0].value == "Run (generic view): no-view-run"
    [profile] = charts(at)
    np.testing.assert_allclose(array(profile["data"][0]["y"]), [0.5, 0.3, 0.2])
    assert any(e.label.startswith("table profile") for e in at.expander)
    assert [m.label for m in at.metric] == ["slope"]


def test_compare_shows_a_difference_heatmap_of_alpha(app_env):
    a, b = load_run(app_env, "sinks-qwen3-a"), load_run(app_env, "sinks-qwen3-b")
    at = open_app("compare", left="sinks-qwen3-a", right="sinks-qwen3-b")
    diff = charts(at)[0]["data"][0]
    expected = (b.tensors["alpha"][:, :, 0] - a.tensors["alpha"][:, :, 0]).numpy()
    np.testing.assert_allclose(array(diff["z"]), expected, atol=1e-7)
    assert diff["zmin"] == pytest.approx(-diff["zmax"]) and diff["zmax"] == pytest.approx(np.abs(expected).max())
    left, right = charts(at)[1:3]
    np.testing.assert_allclose(array(left["data"][0]["z"]), a.tensors["alpha"][:, :, 0].numpy())
    np.testing.assert_allclose(array(right["data"][0]["z"]), b.tensors["alpha"][:, :, 0].numpy())

    key = "cmp-sinks-qwen3-a-sinks-qwen3-b-k"
    at.radio(key=key).set_value(1).run()
    expected = (b.tensors["alpha"][:, :, 1] - a.tensors["alpha"][:, :, 1]).numpy()
    np.testing.assert_allclose(array(charts(at)[0]["data"][0]["z"]), expected, atol=1e-7)


def test_compare_of_different_grids_and_different_analyses_explains_itself(app_env, tmp_path, monkeypatch):
    run = load_run(app_env, "sinks-qwen3-a")
    smaller = {k: (v[:3] if k in {"alpha", "first_token_norm", "median_token_norm"} else v)
               for k, v in run.tensors.items()}
    dataclasses.replace(run, tensors=smaller, path=None).save(tmp_path, "three-layers")
    shutil.copytree(app_env / "sinks-qwen3-a", tmp_path / "sinks-qwen3-a")
    monkeypatch.setenv("HEADLAB_RUNS", str(tmp_path))
    at = open_app("compare", left="sinks-qwen3-a", right="three-layers")
    assert "different layer x head grids" in texts(at.warning)

    monkeypatch.setenv("HEADLAB_RUNS", str(app_env))
    at = open_app("compare", left="sinks-qwen3-a", right="no-view-run")
    assert "Different analyses" in texts(at.info)
    assert charts(at)  # both runs' saved figures, side by side


@pytest.mark.parametrize("name", ["../etc", "/etc/passwd", "..", "corrupt"])
def test_app_refuses_unsafe_or_unreadable_run_names_without_crashing(app_env, name):
    at = open_app("run", run=name)
    message = texts(at.error)
    assert ("refused" in message) if name != "corrupt" else ("no complete run named 'corrupt'" in message)
    # The page stays usable: a real run is preselected for the user to pick from.
    assert at.selectbox(key="pick-run").value in discover_runs(app_env).names()


# ------------------------------------------------------------------------- one head, readable tokens

def chart_titled(at: AppTest, part: str) -> dict:
    found = [c for c in charts(at) if part in (c["layout"].get("title") or {}).get("text", "")]
    assert found, f"no chart titled with {part!r}: {[c['layout'].get('title') for c in charts(at)]}"
    return found[0]


def test_head_view_shows_the_picked_heads_pattern_and_received_attention(app_env):
    run = load_run(app_env, "sinks-qwen3-a")
    saved = [tuple(x) for x in run.tensors["head_pattern_heads"].tolist()]  # top heads by alpha_first
    top = run.tables["sink_heads"].iloc[0]
    assert saved[0] == (top["layer"], top["head"]) and len(saved) == 8
    at = open_app("run", run="sinks-qwen3-a")
    key = "run-sinks-qwen3-a"
    # Opens on the strongest sink head, prompt 0.
    assert (at.selectbox(key=f"{key}-head-layer").value, at.selectbox(key=f"{key}-head-head").value) == saved[0]
    n = len(run.tables["tokens"].query("prompt == 0"))
    pattern = array(chart_titled(at, "attention pattern of prompt #0")["data"][0]["z"])
    np.testing.assert_allclose(pattern, run.tensors["head_patterns"][0, 0, :n, :n].numpy(), rtol=1e-6)
    np.testing.assert_allclose(pattern.sum(-1), 1, atol=1e-5)
    received = chart_titled(at, "attention received per token")["data"][0]
    np.testing.assert_allclose(array(received["y"]), run.tensors["token_alpha"][0, saved[0][0], saved[0][1], :n])

    layer, head = saved[3]
    at.selectbox(key=f"{key}-head-layer").set_value(layer).run()
    at.selectbox(key=f"{key}-head-head").set_value(head).run()
    at.selectbox(key=f"{key}-head-prompt").set_value(2).run()
    n2 = len(run.tables["tokens"].query("prompt == 2"))
    chart = chart_titled(at, f"layer {layer}, head {head}, attention pattern of prompt #2")
    np.testing.assert_allclose(array(chart["data"][0]["z"]), run.tensors["head_patterns"][2, 3, :n2, :n2].numpy(),
                               rtol=1e-6)
    keys = chart_titled(at, f"layer {layer}, head {head}, attention received by key position")
    np.testing.assert_allclose(array(keys["data"][0]["y"]), run.tensors["alpha"][layer, head].numpy(), rtol=1e-6)
    assert [m.label for m in at.metric][-4:] == ["alpha of the first token", "entropy (nats)",
                                                "mass on the first token", "sink head (alpha > eps)"]

    unsaved = next((la, h) for la in range(4) for h in range(4) if (la, h) not in saved)
    at.selectbox(key=f"{key}-head-layer").set_value(unsaved[0]).run()
    at.selectbox(key=f"{key}-head-head").set_value(unsaved[1]).run()
    assert "keeps full attention patterns only for its 8 heads" in texts(at.info)
    assert f"layer={unsaved[0]}, head={unsaved[1]}" in texts(at.code)
    assert not at.exception


def test_clicks_on_the_alpha_heatmap_land_on_a_cell():
    from headlab.dashboard.plots import clicked_cell

    fig = layer_head_heatmap(torch.rand(5, 3), "t", "alpha", clickable=True)
    heat, cells = fig.data
    assert heat.type == "heatmap" and cells.type == "scatter" and len(cells.x) == 15
    assert (cells.x[7], cells.y[7]) == (1, 2)  # cell centres, head on x, layer on y
    assert list(fig.layout.yaxis.range) == [-0.5, 4.5]  # the markers add no padding
    assert clicked_cell([]) is None and clicked_cell(None) is None
    assert clicked_cell([{"x": 1, "y": 2, "curve_number": 1}, {"x": 2.0, "y": 4.0}]) == (4, 2)


def test_empty_figures_say_nothing_found_and_long_legends_become_a_dropdown():
    from headlab.dashboard.plots import limit_legend
    from headlab.figures import empty_figure, is_empty, model_title

    assert is_empty(go.Figure(go.Scatter(x=[], y=[]))) and not is_empty(go.Figure(go.Bar(x=[0], y=[1])))
    fig = empty_figure("m: profile")
    assert fig.layout.annotations[0].text == "nothing found" and not fig.data
    lines = go.Figure([go.Scatter(x=[0, 1], y=[i, i], name=f"line {i}") for i in range(20)])
    limited = limit_legend(lines)
    assert limited.layout.showlegend is False and lines.layout.showlegend is None  # a copy is changed
    buttons = limited.layout.updatemenus[0].buttons
    assert len(buttons) == 21 and buttons[3].args[0]["visible"] == [i == 2 for i in range(20)]
    few = go.Figure([go.Scatter(x=[0], y=[i], name=f"l{i}") for i in range(12)])
    assert limit_legend(few) is few
    assert model_title("/home/me/checkpoints/llama-7b/") == "llama-7b"
    assert model_title("Qwen/Qwen3-14B") == "Qwen/Qwen3-14B"


def test_position_bias_distance_lines_of_many_heads_use_a_colour_scale():
    from headlab.dashboard.views.head import distance_figure
    from headlab.dashboard.views.position_bias import head_distance_figure

    mean = torch.rand(2, 9, 2, 6)  # [layer, head, side, bin]
    run = Result("position_bias", "/abs/path/to/my-model", {},
                 tensors={"distance_mean": mean, "distance_count": torch.ones(2, 2, 6)})
    fig = head_distance_figure(run, 1)
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    assert len(lines) == 18 and not any(t.showlegend for t in lines)
    assert fig.data[-1].marker.showscale and fig.data[-1].marker.colorbar.title.text == "head"
    assert lines[0].line.color != lines[-1].line.color
    assert fig.layout.title.text.startswith("my-model: layer 1") and "/abs" not in fig.layout.title.text
    one = distance_figure(run, 1, 4)
    np.testing.assert_allclose(one.data[0].y, mean[1, 4, 0].numpy(), rtol=1e-6)


def test_sinks_tables_keep_readable_and_raw_tokens(runs_dir, load_model):
    from headlab.batching import encode

    run = load_run(runs_dir, "sinks-qwen3-a")
    tokens = run.tables["tokens"]
    assert {"token", "token_raw"} <= set(tokens.columns)
    prompt = bundled_prompts()[0]
    first = tokens.query("prompt == 0").sort_values("position")
    tok = load_model("tiny-qwen3").text_tokenizer
    assert "".join(first["token"]) == tok.decode(encode(load_model("tiny-qwen3"), prompt, 16))
    assert first["token_raw"].tolist() == tok.convert_ids_to_tokens(encode(load_model("tiny-qwen3"), prompt, 16))
    page = token_html(["", " old"], np.array([0.1, 0.2]), raw=["ä½", "Ġold"])
    assert 'data-raw="Ġold"' in page and "&nbsp;old" in page and "·" in page
