"""The dashboard in a real browser: ``headlab dashboard`` served on a free localhost port, driven by
Playwright through Debian's chromium (never ``playwright install``)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from headlab.analyses import SinksConfig, analyze_sinks
from headlab.prompts import bundled_prompts

CHROMIUM = "/usr/bin/chromium"
HEADLAB = Path(sys.executable).with_name("headlab")  # the console script of this environment
HEATMAP = ".js-plotly-plot .hm"  # plotly draws a heatmap trace into <g class="hm">
READ_FIRST_PLOT = """() => {
    const plot = document.querySelector('.js-plotly-plot');
    return JSON.stringify({title: plot.layout.title.text, z: plot.data[0].z});
}"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, server: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"headlab dashboard exited with code {server.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"headlab dashboard did not listen on port {port} within {timeout:.0f} s")


@pytest.fixture()
def runs_dir(tmp_path, load_model):
    runs = tmp_path / "runs"
    analyze_sinks(load_model("tiny-qwen3"), bundled_prompts()[:3], SinksConfig(max_tokens=16),
                  progress=False).save(runs, "sinks-browser")
    return runs


def test_dashboard_in_a_real_browser(runs_dir, tmp_path):
    assert os.access(CHROMIUM, os.X_OK), "the browser test needs Debian's chromium: apt-get install chromium"
    port = free_port()
    # Its own session (process group): the CLI and the streamlit server it starts are stopped together.
    server = subprocess.Popen([str(HEADLAB), "dashboard", "--runs", str(runs_dir), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(port, server)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-background-networking"])
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(f"http://127.0.0.1:{port}/?page=run&run=sinks-browser")
                page.wait_for_selector(HEATMAP, timeout=90_000)
                # Plots render one by one: the head view below may be drawn before the alpha heatmap above it.
                page.wait_for_function(
                    "() => (document.querySelector('.js-plotly-plot').layout.title.text || '')"
                    ".includes('key position')", timeout=60_000)
                before = json.loads(page.evaluate(READ_FIRST_PLOT))
                assert "key position 0" in before["title"]

                page.get_by_role("radiogroup", name="key position k").get_by_text("3", exact=True).click()
                page.wait_for_function(
                    "() => document.querySelector('.js-plotly-plot').layout.title.text.includes('key position 3')",
                    timeout=60_000)
                page.wait_for_selector(HEATMAP, timeout=30_000)
                after = json.loads(page.evaluate(READ_FIRST_PLOT))
                assert after["z"] != before["z"]  # alpha of another key position, not only a new title

                # Clicking the cell of layer 2, head 1 (of 4 x 4) opens that head below the heatmap.
                plot = page.locator(".js-plotly-plot").first
                plot.scroll_into_view_if_needed()
                box = plot.locator(".nsewdrag").first.bounding_box()
                page.mouse.click(box["x"] + box["width"] * 1.5 / 4, box["y"] + box["height"] * (1 - 2.5 / 4))
                page.wait_for_function(
                    "() => Array.from(document.querySelectorAll('.js-plotly-plot')).some("
                    "p => (p.layout.title.text || '').includes('layer 2, head 1, attention received by key'))",
                    timeout=60_000)
                shot = tmp_path / "sinks-run.png"
                page.screenshot(path=str(shot))
                assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            finally:
                browser.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=5)
    output = server.stdout.read().decode(errors="replace")
    assert f"http://127.0.0.1:{port}" in output
