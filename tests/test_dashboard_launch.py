"""Issue 12: the dashboard's launcher and run discovery under bad conditions (a busy port, SIGTERM, runs that try
to read outside the runs folder) and the compare page's warnings."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from headlab.cli import headlab_app
from headlab.dashboard.discovery import comparison_warnings, discover_runs
from headlab.dashboard.launch import check_port_free
from headlab.errors import InputError
from headlab.result import Result


def _listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def test_a_port_in_use_is_one_error_line_and_no_url(tmp_path):
    with _listening_socket() as busy:
        port = busy.getsockname()[1]
        with pytest.raises(InputError, match=f"port {port} on 127.0.0.1 is already in use"):
            check_port_free("127.0.0.1", port)
        result = CliRunner().invoke(headlab_app, ["dashboard", "--runs", str(tmp_path), "--port", str(port)])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error:") and "already in use" in result.output
    assert "http://" not in result.output, "never print a URL that serves another process"


def test_a_free_port_passes():
    with _listening_socket() as probe:
        port = probe.getsockname()[1]
    check_port_free("127.0.0.1", port)  # closed again: free


PARENT = textwrap.dedent("""
    import sys
    from headlab.dashboard.launch import run_child

    child = [sys.executable, "-c", "import os, time; print(os.getpid(), flush=True); time.sleep(120)"]
    sys.exit(run_child(child))
""")


def test_sigterm_stops_the_child_too():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    child_pid = int(parent.stdout.readline())
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=30) == 128 + signal.SIGTERM
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"child {child_pid} still runs after its parent got SIGTERM")


# --------------------------------------------------------------------------------------- discovery


def _run(runs: Path, name: str, **manifest_changes) -> Path:
    result = Result("sinks", "tiny", {"max_tokens": 16}, tables={"t": pd.DataFrame({"a": [1]})},
                    tensors={"x": torch.zeros(2)}, summary={}, report="# r\n", input_hash="h1")
    path = result.save(runs, name)
    if manifest_changes:
        manifest = json.loads((path / "manifest.json").read_text())
        manifest.update(manifest_changes)
        (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def test_runs_that_would_read_outside_the_runs_folder_are_unreadable_with_a_reason(tmp_path):
    runs, elsewhere = tmp_path / "runs", tmp_path / "elsewhere"
    _run(runs, "good")
    outside = _run(elsewhere, "outside")
    (runs / "linked").symlink_to(outside, target_is_directory=True)
    odd = _run(elsewhere, "odd")
    odd.rename(runs / "my run [copy]")
    _run(runs, "traversal", tables=["../../secret"])
    leaky = _run(runs, "leaky")
    (leaky / "tables" / "t.parquet").unlink()
    (leaky / "tables" / "t.parquet").symlink_to(outside / "tables" / "t.parquet")

    listing = discover_runs(runs)
    assert listing.names() == ["good"]
    reasons = {b.name: b.reason for b in listing.broken}
    assert "symbolic link" in reasons["linked"]
    assert "rename the folder" in reasons["my run [copy]"]
    assert "not a plain file name" in reasons["traversal"]
    assert "links outside the run folder" in reasons["leaky"]


# --------------------------------------------------------------------------------------- compare warnings


def test_compare_warns_about_prompts_model_settings_and_version(tmp_path):
    runs = tmp_path / "runs"
    _run(runs, "a")
    _run(runs, "same")
    _run(runs, "b", input_hash="h2", model="other", config={"max_tokens": 64}, headlab_version="0.0.1")
    listing = discover_runs(runs)
    a, same, b = (listing.get(n) for n in ("a", "same", "b"))
    assert comparison_warnings(a, same) == []
    warnings = " | ".join(comparison_warnings(a, b))
    assert "different prompts" in warnings and "different models: tiny vs other" in warnings
    assert "different --max-tokens (16 vs 64)" in warnings and "Sink_1" in warnings
    assert "different headlab versions" in warnings and "b 0.0.1" in warnings
    assert "another headlab version than this one" in warnings


def test_compare_page_shows_the_warnings(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    runs = tmp_path / "runs"
    _run(runs, "a")
    _run(runs, "b", input_hash="h2", config={"max_tokens": 64})
    monkeypatch.setenv("HEADLAB_RUNS", str(runs))
    app = Path(__file__).resolve().parent.parent / "dashboard" / "app.py"
    at = AppTest.from_file(str(app), default_timeout=60)
    at.query_params["page"] = "compare"
    at.run()
    shown = " ".join(w.value for w in at.warning)
    assert "different prompts" in shown and "different --max-tokens (16 vs 64)" in shown
