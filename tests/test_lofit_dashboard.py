"""The LoFiT dashboard pages render real lofit-select / lofit-train / lofit-eval runs (tiny-llama) without errors,
and the selection heatmap shows the run's ‖A‖₂ per (layer, head)."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

import headlab
from headlab.analyses.lofit import LofitConfig, offsets_of, select_heads, top_pairs, train_offsets
from headlab.analyses.lofit_data import SFTItem
from headlab.analyses.lofit_eval import accuracy_result, exact_match
from headlab.dashboard import launch

ITEMS = [SFTItem(f"cat dog {w}", f" {w}") for w in ("sun", "map", "pen", "cup", "box", "hat", "cat", "dog")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs")
    loaded = headlab.load("tiny-llama")
    selection = select_heads(loaded, ITEMS, LofitConfig(epochs=1, batch_size=4))
    selection.save(folder, "sel")
    trained = train_offsets(loaded, ITEMS, top_pairs(selection.tables["ranking"], 3),
                            LofitConfig(lr=1e-2, lambda_l1=0, epochs=1, batch_size=4))
    trained.save(folder, "off")
    outcomes = {"clean": exact_match(loaded, ITEMS), "offsets": exact_match(loaded, ITEMS, offsets_of(trained))}
    accuracy_result(loaded.name, outcomes, [i.prompt for i in ITEMS], {}).save(folder, "ev")
    return folder, selection


def _open(run: str) -> AppTest:
    at = AppTest.from_file(str(launch.APP_FILE), default_timeout=120)
    at.query_params["page"] = "run"
    at.query_params["run"] = run
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def _array(value) -> np.ndarray:
    if isinstance(value, dict):
        shape = [int(n) for n in str(value.get("shape", "-1")).split(",")]
        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"]).reshape(shape)
    return np.asarray(value, dtype=float)


def test_lofit_pages_render(runs, monkeypatch):
    folder, selection = runs
    monkeypatch.setenv("HEADLAB_RUNS", str(folder))
    at = _open("sel")
    assert at.header[0].value.startswith("LoFiT head selection")
    heatmap = json.loads(at.get("plotly_chart")[0].proto.spec)["data"][0]
    np.testing.assert_allclose(_array(heatmap["z"]), selection.tensors["a_norm"].numpy(), rtol=1e-6)
    assert _open("off").header[0].value.startswith("LoFiT head offsets")
    at = _open("ev")
    assert at.header[0].value.startswith("LoFiT evaluation")
    bars = json.loads(at.get("plotly_chart")[0].proto.spec)["data"][0]
    assert list(bars["x"]) == ["clean", "offsets"]
