"""The science: each analysis takes a loaded model and inputs and returns a ``Result``.

``registry.ANALYSES`` lists them for the CLI and the dashboard. The names below are imported lazily
(PEP 562), so that reading the registry (``analyze --help``) does not pay for torch.
"""

from headlab.bare_imports import refuse_bare

refuse_bare(__name__)  # headlab.bare_imports says why

import importlib

# public name -> module that defines it
_LAZY = {
    "CircuitsConfig": ".circuits",
    "analyze_circuits": ".circuits",
    "GraphSpec": ".position_graphs",
    "TheoryConfig": ".position_graphs",
    "analyze_position_graphs": ".position_graphs",
    "LofitConfig": ".lofit",
    "select_heads": ".lofit",
    "train_offsets": ".lofit",
    "PositionBiasConfig": ".position_bias",
    "analyze_position_bias": ".position_bias",
    "fit_exponential_trend": ".position_bias",
    "RetrievalConfig": ".retrieval_task",
    "run_retrieval": ".retrieval_task",
    "SinksConfig": ".sinks",
    "analyze_sinks": ".sinks",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
