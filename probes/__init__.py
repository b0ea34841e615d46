"""What is read from a running model: attention statistics, residual summaries, accumulators."""

from .accumulators import KeyImportance, RowMeans
from .attention import ATTN_IMPLEMENTATION, AttentionProbe, LazyMask, headlab_attention_forward, register
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
    "ResidualProbe",
    "ResidualSummary",
    "RowMeans",
    "headlab_attention_forward",
    "register",
    "hidden_state_median",
    "summarize_hidden",
]
