"""The run store: one directory per run, written atomically, read only when complete.

Layout: ``manifest.json``, ``tables/*.parquet``, ``tensors.safetensors``, ``figures/*.html`` (and
``*.json`` for re-plotting), ``report.md``. A run is written under a hidden temporary name and
renamed when complete, so a crash never leaves a half-written run that looks finished.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import socket
import tempfile
import unicodedata
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from headlab.errors import RunStoreError

RUNS_ENV = "HEADLAB_RUNS"
MANIFEST = "manifest.json"
COMPLETE = "complete"
TMP_MARKER = ".tmp-"  # runs being written live in ".<name>.tmp-<hex>" until they are renamed
WRITER = ".writer.json"  # inside a temporary run: who writes it (pid, host), so `runs clean` spares live writers
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# File names allow 255 bytes; the temporary name adds "." and ".tmp-" + 8 hex digits. 120 leaves room for
# runs folders on file systems with shorter limits (eCryptfs: 143) and for humans reading listings.
MAX_NAME = 120
_SAFE_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")  # a table or figure name in a manifest


def default_runs_dir() -> Path:
    return Path(os.environ.get(RUNS_ENV, "runs"))


def runs_dir_flag(given: Path | None, flag: str = "--out") -> str:
    """How the user named the runs folder, for messages: ``flag`` when given, else ``$HEADLAB_RUNS`` if set."""
    if given is None and os.environ.get(RUNS_ENV):
        return f"${RUNS_ENV}"
    return flag


def check_runs_dir(runs_dir: Path, flag: str = "--out") -> Path:
    """``runs_dir`` as a path; refuses an existing file (``flag`` is how the user named it)."""
    runs_dir = Path(runs_dir).expanduser()
    if runs_dir.exists() and not runs_dir.is_dir():
        raise RunStoreError(f"{flag} {runs_dir} is an existing file; give a folder for runs (it is created if "
                            "missing)")
    return runs_dir


def check_writable(runs_dir: Path, flag: str = "--out") -> Path:
    """Refuse a runs folder that cannot be written (checked before any model loads).

    A scratch file is written and removed in the folder, or in its nearest existing parent when it does not exist
    yet (nothing is created on the way: a failed run leaves no folder behind); permission bits alone do not tell
    (root, ACLs, read-only mounts).
    """
    runs_dir = check_runs_dir(runs_dir, flag)
    existing = runs_dir.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise RunStoreError(f"{flag} {runs_dir}: {existing} is a file, so the runs folder cannot be created there")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".headlab-write-check-"):
            pass
    except OSError as err:
        raise RunStoreError(f"cannot write runs to {runs_dir} ({err.strerror or err}): give {flag} a folder you "
                            "can write") from err
    return runs_dir


def safe_slug(text: str, limit: int = 48) -> str:
    """A run-name fragment from any text (a model path, a folder with spaces or accents): ASCII letters,
    digits, '.', '_' and '-', starting with a letter or digit, at most ``limit`` characters."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", ascii_text)
    slug = re.sub(r"-{2,}", "-", slug).replace("..", ".")
    slug = slug[:limit].strip("-._")
    return slug or "model"


def default_run_name(analysis: str, model: str, when: dt.datetime | None = None) -> str:
    """``<analysis>-<model>-<UTC time>``, always a valid run name (a model path contributes its last part)."""
    when = when or dt.datetime.now(dt.timezone.utc)
    base = model.rstrip("/\\").replace("\\", "/").split("/")[-1]
    return f"{safe_slug(analysis, 32)}-{safe_slug(base)}-{when:%Y%m%d-%H%M%S}"


def check_new_run(runs_dir: Path, name: str) -> Path:
    """The directory a new run ``name`` will get; refuses a bad or long name and an existing run."""
    final = run_path(runs_dir, name)
    if final.exists():
        raise RunStoreError(f"run {final} already exists; pick another --name or remove it")
    return final


def check_part_name(name: object, what: str) -> str:
    """A table or figure name from a manifest: one plain file-name part (no '/', no '..')."""
    if not isinstance(name, str) or not _SAFE_PART.match(name) or ".." in name:
        raise RunStoreError(f"the manifest lists a {what} named {name!r}, which is not a plain file name; "
                            "headlab reads nothing outside a run's folder: the run is damaged or not from headlab")
    return name


def run_path(runs_dir: Path, name: str) -> Path:
    """The directory of run ``name``; refuses names that would leave the runs folder."""
    if not _SAFE_NAME.match(name) or ".." in name:
        raise RunStoreError(
            f"run name {name!r} is not allowed: use letters, digits, '.', '_' and '-' only (no paths, no '..')"
        )
    if len(name) > MAX_NAME:
        raise RunStoreError(f"run name is {len(name)} characters long; keep --name to at most {MAX_NAME}")
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
    final = check_new_run(runs_dir, name)
    runs_dir.mkdir(parents=True, exist_ok=True)
    tmp = runs_dir.resolve() / f".{name}{TMP_MARKER}{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_json_atomic(tmp / WRITER, {"pid": os.getpid(), "host": socket.gethostname(),
                                          "started": dt.datetime.now(dt.timezone.utc).isoformat()})
        manifest = write(tmp)
        (tmp / WRITER).unlink()
        manifest["status"] = COMPLETE
        _write_json_atomic(tmp / MANIFEST, manifest)
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished run into place; never over a run of the same name that finished meanwhile.

    ``os.rename`` onto a directory replaces it only when it is empty, so a second run that finishes with the
    same name fails here (ENOTEMPTY/EEXIST); an empty directory in the way is refused as well.
    """
    try:
        if final.exists():  # os.rename would replace an empty directory
            raise FileExistsError(final)
        os.rename(tmp, final)
    except OSError as err:
        if not final.exists():
            raise
        raise RunStoreError(f"run {final} was written by another run while this one computed; this run is not "
                            "saved: run it again with another --name") from err


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


@dataclass(frozen=True)
class Leftover:
    """A temporary run folder, and whether its writer is still alive."""

    path: Path
    writer_alive: bool
    writer: str


def leftovers(runs_dir: Path) -> list[Leftover]:
    """Temporary run folders under ``runs_dir`` (``.<name>.tmp-<hex>``): killed runs, or runs being written."""
    runs_dir = check_runs_dir(runs_dir)
    if not runs_dir.is_dir():
        return []
    found = []
    for entry in sorted(runs_dir.iterdir()):
        if not (entry.name.startswith(".") and TMP_MARKER in entry.name) or entry.is_symlink() or not entry.is_dir():
            continue
        alive, who = _writer_state(entry / WRITER)
        found.append(Leftover(entry, alive, who))
    return found


def clean_leftovers(runs_dir: Path, *, dry_run: bool = False, flag: str = "--runs") -> tuple[list[Path],
                                                                                            list[Leftover]]:
    """Remove the leftovers of killed runs; spare those whose writer still runs. Returns (removed, spared).
    A runs folder that does not exist is refused: a typo would otherwise look like a clean folder."""
    runs_dir = check_runs_dir(runs_dir, flag)
    if not runs_dir.is_dir():
        raise RunStoreError(f"{flag} {runs_dir}: no such folder, so there is nothing to clean; give the folder "
                            "that holds your runs")
    removed, spared = [], []
    for item in leftovers(runs_dir):
        if item.writer_alive:
            spared.append(item)
            continue
        if not dry_run:
            shutil.rmtree(item.path, ignore_errors=True)
        removed.append(item.path)
    return removed, spared


def _writer_state(path: Path) -> tuple[bool, str]:
    """(alive, description) of the process named in a temporary run's writer file."""
    try:
        writer = json.loads(path.read_text(encoding="utf-8"))
        pid, host = int(writer["pid"]), str(writer["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return False, "no writer recorded"
    if host != socket.gethostname():
        # Another machine (a shared folder): its process cannot be checked from here, so leave it alone.
        return True, f"pid {pid} on {host}"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False, f"pid {pid} (gone)"
    except PermissionError:
        return True, f"pid {pid} (another user's)"
    return True, f"pid {pid}"
