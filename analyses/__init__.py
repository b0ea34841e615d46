"""The science: each analysis takes a loaded model and inputs and returns a ``Result``."""

from .position_graphs import GraphSpec, TheoryConfig, analyze_position_graphs
from .sinks import SinksConfig, analyze_sinks

__all__ = ["GraphSpec", "SinksConfig", "TheoryConfig", "analyze_position_graphs", "analyze_sinks"]
