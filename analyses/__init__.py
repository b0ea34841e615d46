"""The science: each analysis takes a loaded model and inputs and returns a ``Result``."""

from .sinks import SinksConfig, analyze_sinks

__all__ = ["SinksConfig", "analyze_sinks"]
