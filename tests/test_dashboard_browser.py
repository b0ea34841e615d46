"""The dashboard in a real browser: ``headlab dashboard`` served on a free localhost port, driven by
Playwright through Debian's chromium (never ``playwright install``).

Every wait is for a specific element or state, each with ``STEP_TIMEOUT_S`` (``$HEADLAB_BROWSER_TIMEOUT_S``,
default 300 s): on a busy 2-core machine one step (starting streamlit, importing torch, loading a model, a
rerun) can take minutes. A click on a heatmap cell is repeated until its head opens, since a click that lands
while Streamlit re-renders the chart is lost; the checks themselves are unchanged."""

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
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import sync_playwright

from headlab.analyses import SinksConfig, analyze_sinks
from headlab.prompts import bundled_prompts

CHROMIUM = "/usr/bin/chromium"
HEADLAB = Path(sys.executable).with_name("headlab")  # the console script of this environment
HEATMAP = ".js-plotly-plot .hm"  # plotly draws a heatmap trace into <g class="hm">
STEP_TIMEOUT_S = float(os.environ.get("HEADLAB_BROWSER_TIMEOUT_S", "300"))
STEP_MS = int(STEP_TIMEOUT_S * 1000)
CLICK_RETRY_MS = 30_000  # how long one click on a cell may take to open its head before it is clicked again
READ_FIRST_PLOT = """() => {
    const plot = document.querySelector('.js-plotly-plot');
    return JSON.stringify({title: plot.layout.title.text, z: plot.data[0].z});
}"""
FIRST_TITLE_HAS = ("() => {{ const p = document.querySelector('.js-plotly-plot'); "
                   "return !!p && !!p.layout && ((p.layout.title && p.layout.title.text) || '').includes('{part}'); }}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, server: subprocess.Popen, timeout: float = STEP_TIMEOUT_S) -> None:
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


def launch_browser(playwright):
    browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, timeout=STEP_MS,
                                         args=["--no-sandbox", "--disable-background-networking"])
    return browser


def new_page(browser):
    """A page whose every wait (navigation, clicks, selectors, functions) may take ``STEP_TIMEOUT_S``."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(STEP_MS)
    page.set_default_navigation_timeout(STEP_MS)
    return page


def plot_titled(part: str) -> str:
    """A JS predicate: some plotly plot on the page has ``part`` in its title."""
    return ("() => Array.from(document.querySelectorAll('.js-plotly-plot')).some("
            f"p => ((p.layout && p.layout.title && p.layout.title.text) || '').includes({part!r}))")


def click_cell_until(page, layer: int, head: int, n_layers: int, n_heads: int, opened: str) -> None:
    """Click the (layer, head) cell of the first layer x head heatmap until a plot titled with ``opened``
    appears (at most ``STEP_TIMEOUT_S``); the cell's box is measured again before every click."""
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while True:
        page.wait_for_selector(HEATMAP, state="visible")
        plot = page.locator(".js-plotly-plot").first
        plot.scroll_into_view_if_needed()
        box = plot.locator(".nsewdrag").first.bounding_box()
        assert box is not None, "the heatmap has no drag layer to click"
        page.mouse.click(box["x"] + box["width"] * (head + 0.5) / n_heads,
                         box["y"] + box["height"] * (1 - (layer + 0.5) / n_layers))
        left_ms = int((deadline - time.monotonic()) * 1000)
        try:
            page.wait_for_function(plot_titled(opened), timeout=max(1, min(CLICK_RETRY_MS, left_ms)))
            return
        except PlaywrightTimeout:
            if time.monotonic() >= deadline:
                raise


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
            browser = launch_browser(playwright)
            try:
                page = new_page(browser)
                page.goto(f"http://127.0.0.1:{port}/?page=run&run=sinks-browser")
                page.wait_for_selector(HEATMAP)
                # Plots render one by one: the head view below may be drawn before the alpha heatmap above it.
                page.wait_for_function(FIRST_TITLE_HAS.format(part="key position"))
                before = json.loads(page.evaluate(READ_FIRST_PLOT))
                assert "key position 0" in before["title"]

                page.get_by_role("radiogroup", name="key position k").get_by_text("3", exact=True).click()
                page.wait_for_function(FIRST_TITLE_HAS.format(part="key position 3"))
                page.wait_for_selector(HEATMAP)
                after = json.loads(page.evaluate(READ_FIRST_PLOT))
                assert after["z"] != before["z"]  # alpha of another key position, not only a new title

                # Clicking the cell of layer 2, head 1 (of 4 x 4) opens that head below the heatmap.
                click_cell_until(page, 2, 1, 4, 4, "layer 2, head 1, attention received by key")
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
