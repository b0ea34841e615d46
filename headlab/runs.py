"""The run store: one directory per run, written atomically, read only when complete.

Layout: ``manifest.json``, ``tables/*.parquet``, ``tensors.safetensors``, ``figures/*.html`` (and
``*.json`` for re-plotting), ``report.md``. A run is written under a hidden temporary name and
renamed when complete, so a crash never leaves a half-written run that looks finished.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from .errors import RunStoreError

RUNS_ENV = "HEADLAB_RUNS"
MANIFEST = "manifest.json"
COMPLETE = "complete"
TMP_MARKER = ".tmp-"  # runs being written live in ".<name>.tmp-<hex>" until they are renamed
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def default_runs_dir() -> Path:
    return Path(os.environ.get(RUNS_ENV, "runs"))


def check_runs_dir(runs_dir: Path) -> Path:
    runs_dir = Path(runs_dir).expanduser()
    if runs_dir.exists() and not runs_dir.is_dir():
        raise RunStoreError(f"--out {runs_dir} is an existing file; pass a folder for runs (it is created if missing)")
    return runs_dir


def run_path(runs_dir: Path, name: str) -> Path:
    """The directory of run ``name``; refuses names that would leave the runs folder."""
    if not _SAFE_NAME.match(name) or ".." in name:
        raise RunStoreError(
            f"run name {name!r} is not allowed: use letters, digits, '.', '_' and '-' only (no paths, no '..')"
        )
    root = Path(runs_dir).resolve()
    path = (root / name).resolve()
    if path.parent != root:
        raise RunStoreError(f"run name {name!r} points outside the runs folder {root}")
    return path


def write_run(runs_dir: Path, name: str, write: Callable[[Path], dict]) -> Path:
    """Call ``write(tmp_dir)`` (which returns the manifest), then publish the run by renaming.

    On any error the temporary directory is removed and nothing is left behind.
    """
    runs_dir = check_runs_dir(runs_dir)
    final = run_path(runs_dir, name)
    if final.exists():
        raise RunStoreError(f"run {final} already exists; pick another --name or remove it")
    runs_dir.mkdir(parents=True, exist_ok=True)
    tmp = runs_dir.resolve() / f".{name}{TMP_MARKER}{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        manifest = write(tmp)
        manifest["status"] = COMPLETE
        _write_json_atomic(tmp / MANIFEST, manifest)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_manifest(path: Path) -> dict:
    """The manifest of a complete run; a clear error for anything else."""
    path = Path(path)
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise RunStoreError(f"{path} is not a headlab run (no {MANIFEST}); it may be incomplete")
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunStoreError(f"{manifest_file} is corrupt ({err}); delete the run and run it again") from err
    if manifest.get("status") != COMPLETE:
        raise RunStoreError(f"run {path} is not complete (status {manifest.get('status')!r})")
    return manifest


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)
