"""headlab's cache folder, ``$HEADLAB_HOME`` (default ``~/.cache/headlab``): converted GGUF checkpoints under
``models/``, the compiled CPU row pass under ``kernels/``."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "HEADLAB_HOME"


def headlab_home() -> Path:
    """headlab's cache folder: ``$HEADLAB_HOME`` or ``~/.cache/headlab``."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".cache" / "headlab").expanduser()
