"""What a run needs to be reproduced: its prompts and where they came from, the settings the model ran
under, and the software (torch / transformers / headlab versions, the git commit of a checkout).

``Result.save`` writes this into ``manifest.json`` under ``provenance``; prompts above ``INLINE_LIMIT``
characters go to ``prompts.json`` in the run (a JSON list: prompts may hold newlines) and the manifest
names that file.
"""

from __future__ import annotations

import functools
import importlib.metadata
import platform
import subprocess
from pathlib import Path

INLINE_LIMIT = 32_000  # characters of prompt text kept in the manifest itself; more goes to prompts.json
PROMPTS_FILE = "prompts.json"


def describe_source(source: str | None, default: Path | None = None) -> dict:
    """Where the prompts came from: ``{"kind": file|stdin|bundled, "path": …}``.

    ``source`` is what the user passed to ``--prompts`` (None: the default set; ``default`` is the model's
    own bundled prompt file, if it has one)."""
    from headlab.prompts import BUNDLED, STDIN, resolve_source

    if source is None:
        if default is not None:
            return {"kind": "bundled", "path": default.name}
        return {"kind": "bundled", "path": "data/prompts.txt"}
    kind, path = resolve_source(source)
    if kind == STDIN:
        return {"kind": "stdin"}
    if kind == BUNDLED:
        return {"kind": "bundled", "path": "data/prompts.txt"}
    file = Path(path).expanduser()
    if not file.is_file():  # a pipe, /dev/fd/N, <(…): its name means nothing later; the texts are recorded
        return {"kind": "pipe", "path": str(path)}
    return {"kind": "file", "path": str(file.resolve())}


def package_versions() -> dict[str, str | None]:
    from headlab import __version__

    versions: dict[str, str | None] = {"headlab": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "safetensors"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@functools.lru_cache(maxsize=1)
def git_state() -> dict | None:
    """The commit of the checkout headlab runs from (and whether it has local changes); None if installed
    from a wheel or git is unavailable."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(dirty)}


def environment() -> dict:
    """Versions and the git state: filled in by ``Result.save`` for every run, CLI or Python."""
    return {"versions": package_versions(), "git": git_state()}


def model_settings(loaded, *, dtype: str | None = None, device: str | None = None, backend: str | None = None,
                   backend_used: str | None = None, threads: int | None = None) -> dict:
    """How the model ran: requested and actual dtype/device, the attention backend (``backend_used``: what the
    kernel dispatcher chose, ``headlab.kernels.backend_in_use``), the CPU threads."""
    import torch

    actual_device = loaded.device
    return {
        "dtype": str(loaded.model.dtype).removeprefix("torch."),
        "dtype_requested": dtype,
        "device": str(actual_device),
        "device_requested": device,
        "backend": backend_used or backend,
        "backend_requested": backend or "auto",
        "threads": threads if threads is not None else torch.get_num_threads(),
        "source": loaded.source,
        "revision": loaded.revision,
    }


def prompts_record(prompts: list[str], source: dict | None = None) -> tuple[dict, list[str] | None]:
    """The manifest's ``prompts`` entry, and the list to write to ``prompts.json`` when it is too long to inline."""
    from headlab.prompts import hash_inputs

    record = {"n": len(prompts), "hash": hash_inputs(prompts), "source": source or {"kind": "python"}}
    if sum(len(p) for p in prompts) <= INLINE_LIMIT:
        record["texts"] = list(prompts)
        return record, None
    record["file"] = PROMPTS_FILE
    return record, list(prompts)
