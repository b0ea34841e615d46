"""The notebooks in notebooks/: committed without outputs, and each runs top to bottom offline.

Each notebook is executed with nbclient in a fresh kernel of this interpreter, behind a guard that makes
any network access fail (``notebook_helpers``); the guard itself is tested on tiny notebooks made here.
Strip outputs before committing: ``python scripts/strip_notebooks.py``.
"""

from __future__ import annotations

import importlib.util
import re
import time
from pathlib import Path

import nbformat
import pytest
from nbclient.exceptions import CellExecutionError
from notebook_helpers import execute

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = {"01_explore_heads", "02_sinks", "03_position_bias", "04_circuits", "05_lofit", "06_lvlm_fixes"}
PLOTLY = "application/vnd.plotly.v1+json"
# A script loaded from the network: an executed notebook must render offline.
REMOTE_SCRIPT = re.compile(r"<script[^>]*\bsrc\s*=\s*[\"']?(https?:)?//", re.IGNORECASE)


def _strip_module():
    spec = importlib.util.spec_from_file_location("strip_notebooks", ROOT / "scripts" / "strip_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _notebook(*sources: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])


def test_the_notebooks_are_there():
    assert EXPECTED <= {p.stem for p in NOTEBOOKS}, f"missing: {EXPECTED - {p.stem for p in NOTEBOOKS}}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{path.name} has no code"
    with_output = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.outputs]
    counted = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.execution_count is not None]
    assert not with_output and not counted, (
        f"{path.name}: cells {with_output} have outputs, cells {counted} execution counts; "
        "run python scripts/strip_notebooks.py")
    assert not _strip_module().strip(nb), f"{path.name} holds run metadata; run python scripts/strip_notebooks.py"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_offline(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    started = time.perf_counter()
    executed = execute(nb, workdir=path.parent, kernel_root=tmp_path)
    seconds = time.perf_counter() - started
    print(f"{path.name}: {seconds:.1f} s")
    outputs = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    # Plots render inline: at least one plotly figure, and nothing fetched from a CDN.
    assert any(PLOTLY in o.get("data", {}) for o in outputs), f"{path.name} shows no plotly figure"
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    remote = [h[:200] for h in html if REMOTE_SCRIPT.search(h)]
    assert not remote, f"{path.name} loads a script from the network: {remote[0]}"
    # Running it left the committed file as it was (outputs go to the executed copy only).
    assert nbformat.read(path, as_version=4) == nb


def test_network_guard_blocks_connections_and_name_lookups(tmp_path):
    connect = _notebook("print('before')", "import socket\nsocket.create_connection(('203.0.113.7', 80), timeout=30)")
    with pytest.raises(CellExecutionError) as err:
        execute(connect, tmp_path, tmp_path / "kernel")
    assert err.value.ename == "NetworkBlocked" and "203.0.113.7" in err.value.evalue

    lookup = _notebook("import urllib.request\nurllib.request.urlopen('https://example.org/', timeout=30)")
    with pytest.raises(CellExecutionError) as err:
        execute(lookup, tmp_path, tmp_path / "kernel")
    assert err.value.ename == "NetworkBlocked" and "example.org" in err.value.evalue


def test_network_guard_fails_a_notebook_that_swallows_the_error(tmp_path):
    quiet = _notebook("import socket\ntry:\n    socket.create_connection(('203.0.113.7', 443), timeout=30)\n"
                      "except Exception:\n    pass  # a library that falls back silently")
    with pytest.raises(CellExecutionError) as err:
        execute(quiet, tmp_path, tmp_path / "kernel")
    assert err.value.ename == "AssertionError" and "tried to reach the network" in err.value.evalue


def test_network_guard_allows_loopback(tmp_path):
    local = _notebook("import socket\nserver = socket.create_server(('127.0.0.1', 0))\n"
                      "client = socket.create_connection(server.getsockname(), timeout=30)\n"
                      "conn, _ = server.accept(); client.sendall(b'ok'); print(conn.recv(2).decode())")
    executed = execute(local, tmp_path, tmp_path / "kernel")
    assert executed.cells[0].outputs[0]["text"] == "ok\n"


def test_strip_script_removes_outputs(tmp_path):
    module = _strip_module()
    nb = _notebook("1 + 1")
    nb.cells[0].outputs = [nbformat.v4.new_output("execute_result", {"text/plain": "2"}, execution_count=1)]
    nb.cells[0].execution_count = 1
    nb.cells[0].metadata["execution"] = {"iopub.status.busy": "2026-01-01T00:00:00Z"}
    path = tmp_path / "run.ipynb"
    nbformat.write(nb, path)
    assert module.main(["--check", str(path)]) == 1
    assert module.main([str(path)]) == 0
    stripped = nbformat.read(path, as_version=4)
    assert stripped.cells[0].outputs == [] and stripped.cells[0].execution_count is None
    assert stripped.cells[0].metadata == {} and stripped.cells[0].source == "1 + 1"
    assert module.main(["--check", str(path)]) == 0


def test_offline_renderer_embeds_plotly_once_and_loads_nothing():
    import plotly.graph_objects as go
    import plotly.io as pio

    from headlab.notebook import PLOTLY_MIMETYPE, RENDERER, offline_plots

    before = pio.renderers.default
    try:
        offline_plots()
        assert pio.renderers.default == RENDERER
        fig = go.Figure(go.Heatmap(z=[[0.0, 1.0], [1.0, 0.0]]))
        # as a notebook shows a figure (plotly renders with a copy of the registered renderer)
        first, second = (fig._repr_mimebundle_() for _ in range(2))
        stock = pio.renderers["notebook"].to_mimebundle(fig.to_dict())["text/html"]
    finally:
        pio.renderers.default = before
    assert REMOTE_SCRIPT.search(stock), "plotly's own notebook renderer loads MathJax from a CDN: the check sees it"
    for bundle in (first, second):
        assert bundle[PLOTLY_MIMETYPE]["data"][0]["type"] == "heatmap"
        assert not REMOTE_SCRIPT.search(bundle["text/html"])
    # plotly.js itself (megabytes) in the first figure only; the second calls the library the first defined
    assert len(first["text/html"]) > 1_000_000 > len(second["text/html"])
    assert "Plotly.newPlot" in second["text/html"]
