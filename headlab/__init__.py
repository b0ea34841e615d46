"""headlab: a workbench for attention heads."""

from .arch import Arch
from .errors import HeadlabError
from .interventions import intervene
from .loading import LoadedModel, load
from .patterns import AttentionPattern, attention
from .probes import trace

__version__ = "0.1.0"

__all__ = ["Arch", "AttentionPattern", "HeadlabError", "LoadedModel", "__version__", "attention", "intervene",
           "load", "trace"]
