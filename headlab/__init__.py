"""headlab: a workbench for attention heads."""

from .arch import Arch
from .errors import HeadlabError
from .loading import LoadedModel, load

__version__ = "0.1.0"

__all__ = ["Arch", "HeadlabError", "LoadedModel", "__version__", "load"]
