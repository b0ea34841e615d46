"""headlab: a workbench for attention heads.

The public names are imported lazily (PEP 562): ``import headlab`` and the CLI's ``--help`` do not pay
for torch and transformers; the first use of ``headlab.load`` (or any name below) does.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "Arch": ".arch",
    "AttentionPattern": ".probes.patterns",
    "attention": ".probes.patterns",
    "HeadlabError": ".errors",
    "LoadedModel": ".loading",
    "load": ".loading",
    "intervene": ".interventions",
    "trace": ".probes",
}

__all__ = ["Arch", "AttentionPattern", "HeadlabError", "LoadedModel", "__version__", "attention", "intervene", "load",
           "trace"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'headlab' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
