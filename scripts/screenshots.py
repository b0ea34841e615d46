"""Screenshots of the dashboard's pages for the docs: Runs, a sinks run, Compare.

    .venv/bin/python scripts/screenshots.py [--out docs/screenshots] [--runs DIR]

Without ``--runs`` it first writes demo runs into a temporary folder (MiniLM, the real pretrained model
that runs offline, on the first and the second half of the bundled prompts; a tiny-qwen3 run; one
corrupt folder), then serves them with ``headlab dashboard`` and photographs each page with Playwright
driving Debian's chromium.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
HEATMAP = ".js-plotly-plot .hm"


def make_demo_runs(runs: Path) -> tuple[str, str]:
    import headlab
    from headlab.analyses import SinksConfig, analyze_sinks
    from headlab.prompts import bundled_prompts

    prompts = bundled_prompts()
    half = len(prompts) // 2
    minilm = headlab.load("minilm")
    config = SinksConfig(max_tokens=64)
    analyze_sinks(headlab.load("tiny-qwen3"), prompts, SinksConfig(max_tokens=32), progress=False).save(
        runs, "sinks-tiny-qwen3")
    analyze_sinks(minilm, prompts[half:], config, progress=False).save(runs, "sinks-minilm-second-half")
    analyze_sinks(minilm, prompts[:half], config, progress=False).save(runs, "sinks-minilm-first-half")
    (runs / "sinks-interrupted").mkdir()
    (runs / "sinks-interrupted" / "manifest.json").write_text('{"status": "running"}')
    return "sinks-minilm-first-half", "sinks-minilm-second-half"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.3)
    raise SystemExit(f"the dashboard did not start on port {port}")


def shoot(runs: Path, out: Path, first: str, second: str) -> list[Path]:
    from playwright.sync_api import sync_playwright

    port = free_port()
    headlab_cli = Path(sys.executable).with_name("headlab")
    server = subprocess.Popen([str(headlab_cli), "dashboard", "--runs", str(runs), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    pages = [("runs.png", "/?page=runs", "[data-testid='stDataFrame']", 1100),
             ("sinks-run.png", f"/?page=run&run={first}", HEATMAP, 2600),
             ("compare.png", f"/?page=compare&left={first}&right={second}", HEATMAP, 2000)]
    written = []
    try:
        wait_for_port(port)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-background-networking"])
            try:
                for name, url, ready, height in pages:
                    page = browser.new_page(viewport={"width": 1400, "height": height})
                    page.goto(base + url)
                    page.wait_for_selector(ready, timeout=120_000)
                    page.wait_for_timeout(1500)  # let every chart on the page finish drawing
                    page.screenshot(path=str(out / name))
                    written.append(out / name)
                    page.close()
            finally:
                browser.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=15)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    parser.add_argument("--runs", type=Path, help="photograph these runs instead of demo runs")
    parser.add_argument("--first", help="run for the sinks page and the left of Compare (with --runs)")
    parser.add_argument("--second", help="run for the right of Compare (with --runs)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.runs:
            if not (args.first and args.second):
                parser.error("--runs needs --first and --second")
            runs, first, second = args.runs, args.first, args.second
        else:
            runs = Path(tmp) / "runs"
            first, second = make_demo_runs(runs)
        for path in shoot(runs, args.out, first, second):
            print(path)


if __name__ == "__main__":
    main()
