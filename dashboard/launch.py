"""Starting the dashboard: the checks ``headlab dashboard`` makes and the streamlit command it runs."""

from __future__ import annotations

import errno
import signal
import socket
import subprocess
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


def check_port_free(host: str, port: int) -> None:
    """Refuse a port another process listens on (streamlit would fail, or the printed URL would serve that process).

    Binds the way a server does (SO_REUSEADDR, so a port in TIME_WAIT counts as free; on Linux an active
    listener still blocks the bind) and releases it at once."""
    check_port(port)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise InputError(f"--host {host} is not an address this machine can listen on ({err.strerror})") from err
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise InputError(f"port {port} on {host} is already in use by another process: pass --port with "
                                 "a free port (e.g. --port 8502), or stop that process") from err
            if err.errno == errno.EACCES:
                raise InputError(f"port {port} needs administrator rights on this machine: use a port above "
                                 "1023, e.g. --port 8501") from err
            raise InputError(f"cannot listen on {host}:{port} ({err.strerror}): pass another --host or --port") \
                from err


def run_child(command: list[str], grace_s: float = 5.0) -> int:
    """Run ``command`` until it exits; Ctrl+C or SIGTERM stop it too (terminate, then kill after ``grace_s``).

    Returns the child's exit code (0 when stopped by Ctrl+C, 143 by SIGTERM)."""
    def on_sigterm(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    child = subprocess.Popen(command)
    try:
        return child.wait()
    except KeyboardInterrupt:
        return 0
    except SystemExit as stop:
        return int(stop.code) if isinstance(stop.code, int) else 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


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
