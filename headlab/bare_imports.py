"""The card's top-level folders (``kernels/``, ``probes/``, …) are ``headlab.*`` subpackages, never bare modules.

Python started in the repository root (a REPL, a notebook saved there, ``python -m pytest``) puts the root
first on ``sys.path``, so ``import kernels`` would find the project's ``kernels/`` folder before HF's kernel
hub, the top-level ``kernels`` package that transformers (>= 5.25) imports. Each folder's ``__init__`` checks
the name it was imported under first: ``kernels/`` hands a bare ``kernels`` over to the installed package, the
others refuse a bare import, so nothing of headlab runs twice under two names.
"""

from __future__ import annotations

import importlib.util
import sys
from importlib.machinery import PathFinder
from pathlib import Path


def refuse_bare(name: str) -> None:
    """Raise ``ImportError`` unless ``name`` (a folder's ``__name__``) is its ``headlab.*`` name."""
    if not name.startswith("headlab."):
        raise ImportError(f"{name!r} is headlab's folder {name}/, importable only as 'headlab.{name}'")


def yield_to_installed(name: str, init_file: str) -> None:
    """Load the installed top-level package ``name`` from ``sys.path`` without the folder holding ``init_file``,
    and leave it in ``sys.modules``, where the import statement that ran ``init_file`` picks it up."""
    root = Path(init_file).resolve().parent.parent
    others = [entry for entry in sys.path if Path(entry or ".").resolve() != root]
    spec = PathFinder.find_spec(name, others)
    if spec is None or spec.loader is None:
        raise ImportError(f"No module named {name!r} installed; the folder {root / name} is 'headlab.{name}'",
                          name=name)
    module = importlib.util.module_from_spec(spec)
    # The package's own absolute imports (``from kernels.x import y``) must see it under its name while it runs.
    sys.modules[name] = module
    spec.loader.exec_module(module)
