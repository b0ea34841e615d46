"""headlab's cache folder, ``$HEADLAB_HOME`` (default ``~/.cache/headlab``): converted GGUF checkpoints under
``models/``, the compiled CPU row pass under ``kernels/``."""

from __future__ import annotations

import os
from pathlib import Path

from headlab.errors import CacheFolderError

HOME_ENV = "HEADLAB_HOME"


def headlab_home() -> Path:
    """headlab's cache folder: ``$HEADLAB_HOME`` or ``~/.cache/headlab``, created if missing.

    Checked on every call (the variable may change between calls; the checks are two system calls): a file
    there, or a folder that cannot be created or written, is one ``CacheFolderError`` naming the variable,
    instead of a PermissionError / NotADirectoryError from whichever cache write comes first."""
    configured = os.environ.get(HOME_ENV)
    path = Path(configured or Path.home() / ".cache" / "headlab").expanduser()
    where = f"${HOME_ENV}={path}" if configured else f"headlab's cache folder {path} (${HOME_ENV} is not set)"
    advice = f"set {HOME_ENV} to a folder you can write"
    if path.exists() and not path.is_dir():
        raise CacheFolderError(f"{where} is a file, not a folder: {advice}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file on the way (NotADirectoryError), no permission, a read-only file system
        raise CacheFolderError(f"{where} cannot be created ({err.strerror or err}): {advice}") from None
    if not os.access(path, os.W_OK | os.X_OK):  # root passes: it can write there, so nothing would fail
        raise CacheFolderError(f"{where} cannot be written (no write permission, or a read-only file system): "
                               f"{advice}")
    return path
