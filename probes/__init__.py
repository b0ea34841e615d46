"""What is read from a running model: attention statistics, activations by name, residual summaries, accumulators."""

from headlab.bare_imports import refuse_bare

refuse_bare(__name__)  # headlab.bare_imports says why

from headlab.kernels.attention_function import (  # the attention function lives in kernels; names kept here
    ATTN_IMPLEMENTATION,
    LazyMask,
    PatternReader,
    headlab_attention_forward,
    register,
)

from .accumulators import KeyImportance, RowMeans
from .activations import VALID_PATTERNS, Trace, trace
from .attention import AttentionProbe
from .layer_parts import PARTS, LayerPartsProbe, LayerPartsSummary
from .residual import ResidualProbe, ResidualSummary, hidden_state_median, summarize_hidden

__all__ = [
    "ATTN_IMPLEMENTATION",
    "AttentionProbe",
    "KeyImportance",
    "LayerPartsProbe",
    "LayerPartsSummary",
    "LazyMask",
    "PARTS",
    "PatternReader",
    "ResidualProbe",
    "ResidualSummary",
    "RowMeans",
    "Trace",
    "VALID_PATTERNS",
    "headlab_attention_forward",
    "register",
    "hidden_state_median",
    "summarize_hidden",
    "trace",
]
