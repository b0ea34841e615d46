"""The science: each analysis takes a loaded model and inputs and returns a ``Result``."""

from headlab.bare_imports import refuse_bare

refuse_bare(__name__)  # headlab.bare_imports says why

from .circuits import CircuitsConfig, analyze_circuits
from .lofit import LofitConfig, select_heads, train_offsets
from .position_bias import PositionBiasConfig, analyze_position_bias, fit_exponential_trend
from .position_graphs import GraphSpec, TheoryConfig, analyze_position_graphs
from .retrieval_task import RetrievalConfig, run_retrieval
from .sinks import SinksConfig, analyze_sinks

__all__ = [
    "CircuitsConfig",
    "analyze_circuits",
    "GraphSpec",
    "LofitConfig",
    "PositionBiasConfig",
    "RetrievalConfig",
    "SinksConfig",
    "TheoryConfig",
    "analyze_position_bias",
    "analyze_position_graphs",
    "analyze_sinks",
    "fit_exponential_trend",
    "run_retrieval",
    "select_heads",
    "train_offsets",
]
