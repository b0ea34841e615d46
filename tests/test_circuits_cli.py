"""``analyze circuits`` on tiny-llama with JSONL tasks: a run directory, graph JSON files, and bad input refused."""

from __future__ import annotations

import json

from circuit_helpers import byte_task
from typer.testing import CliRunner

from headlab.cli import analyze_app
from headlab.result import Result

runner = CliRunner()




def test_circuits_command_writes_a_run_and_graphs(tmp_path, monkeypatch):
    first, second = byte_task(tmp_path, "first", 0), byte_task(tmp_path, "second", 1)
    result = runner.invoke(analyze_app, ["circuits", "--model", "tiny-llama", "--tasks", f"{first},{second}",
                                         "--n", "6", "--top", "0.25", "--method", "path", "--draws", "3",
                                         "--graph-dir", str(tmp_path / "graphs"), "--out", str(tmp_path / "runs"),
                                         "--name", "c1", "--quiet"])
    assert result.exit_code == 0, result.output
    run = Result.load(tmp_path / "runs" / "c1")
    assert set(run.tables) >= {"clean", "scores", "circuits", "overlap", "ablation", "agreement", "roles"}
    n_heads = run.tensors["scores.first"].numel()
    assert len(run.tables["circuits"]) == 2 * -(-n_heads // 4)  # ceil(25% of heads) per task
    row = run.tables["overlap"].iloc[0]
    assert row.n_shared == len(row.shared.split()) and 0 <= row.iou <= 1
    graph = json.loads((tmp_path / "graphs" / "first.json").read_text())
    in_graph = {k for k, v in graph["nodes"].items() if v["in_graph"] and k.startswith("a")}
    circuit = run.tables["circuits"][run.tables["circuits"].task == "first"]
    assert in_graph == {f"a{r.layer}.h{r.head}" for r in circuit.itertuples()}
    assert "Overlap" in result.output and "run written to" in result.output
    _dashboard_shows(tmp_path / "runs", run, monkeypatch)


def _dashboard_shows(runs_dir, run: Result, monkeypatch) -> None:
    """The circuits page: one score heatmap per task (z = the saved scores, circuit marked), no exception."""
    import numpy as np
    from streamlit.testing.v1 import AppTest

    from headlab.dashboard import launch

    monkeypatch.setenv("HEADLAB_RUNS", str(runs_dir))
    at = AppTest.from_file(str(launch.APP_FILE), default_timeout=120)
    at.query_params["page"] = "run"
    at.query_params["run"] = "c1"
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    charts = [json.loads(element.proto.spec) for element in at.get("plotly_chart")]
    heat = [c for c in charts if "first" in c["layout"]["title"]["text"]]
    assert heat, [c["layout"]["title"]["text"] for c in charts]
    z = _array(heat[0]["data"][0]["z"]).reshape(run.tensors["scores.first"].shape)
    np.testing.assert_allclose(z, run.tensors["scores.first"].numpy(), rtol=1e-5)
    circuit = run.tables["circuits"][run.tables["circuits"].task == "first"]
    np.testing.assert_array_equal(_array(heat[0]["data"][1]["x"]), circuit["head"].to_numpy())  # the circled heads


def _array(value):
    """A plotly JSON array: a list, or plotly's typed-array encoding {dtype, bdata}."""
    import base64

    import numpy as np

    if isinstance(value, dict):
        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"]).astype(float)
    return np.asarray(value, dtype=float)


def test_circuits_command_refuses_bad_input_before_writing(tmp_path):
    out = tmp_path / "runs"
    twice = byte_task(tmp_path, "same", 0)
    for args, message in ((["--method", "exact"], "--method must be one of"),
                          (["--top", "0"], "--top is a share"),
                          (["--tasks", "ioi"], "one-token names"),
                          (["--tasks", "nope"], "unknown task"),
                          (["--tasks", f"{twice},{twice}"], "twice")):
        result = runner.invoke(analyze_app, ["circuits", "--model", "tiny-llama", "--n", "4", "--out", str(out),
                                             "--quiet", *args])
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
        assert not out.exists() or not any(out.iterdir())
