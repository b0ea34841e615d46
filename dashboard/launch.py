"""Starting the dashboard: the checks ``headlab dashboard`` makes and the streamlit command it runs."""

from __future__ import annotations

import sys
from pathlib import Path

from headlab.errors import InputError, RunStoreError

APP_FILE = Path(__file__).with_name("app.py")
LOCALHOST = "127.0.0.1"


def check_dashboard_runs(runs_dir: Path) -> Path:
    """The runs folder the dashboard will browse; it must exist (an empty one is fine)."""
    runs_dir = Path(runs_dir).expanduser()
    if not runs_dir.exists():
        raise RunStoreError(f"runs folder {runs_dir} does not exist; create runs with "
                            f"`analyze sinks --out {runs_dir}` or pass --runs DIR")
    if not runs_dir.is_dir():
        raise RunStoreError(f"--runs {runs_dir} is a file, not a folder; pass the folder that holds the runs")
    return runs_dir.resolve()


def check_port(port: int) -> int:
    if not 1 <= port <= 65535:
        raise InputError(f"--port must lie between 1 and 65535, got {port}")
    return port


def streamlit_command(runs_dir: Path, host: str = LOCALHOST, port: int = 8501) -> list[str]:
    """``python -m streamlit run app.py … -- --runs DIR``: headless, no telemetry, no file watcher."""
    return [
        sys.executable, "-m", "streamlit", "run", str(APP_FILE),
        "--server.address", host,
        "--server.port", str(check_port(port)),
        "--server.headless", "true",
        "--browser.gatherUsageStats", "false",
        # Nobody edits the app while it serves runs; watching files only costs CPU.
        "--server.fileWatcherType", "none",
        # A local research tool: no "Deploy" button or developer menu in the toolbar.
        "--client.toolbarMode", "minimal",
        "--", "--runs", str(runs_dir),
    ]


def dashboard_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
