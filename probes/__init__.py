"""What is read from a running model: attention statistics, residual summaries, accumulators."""

from .accumulators import KeyImportance, RowMeans
from .attention import ATTN_IMPLEMENTATION, AttentionProbe, LazyMask, headlab_attention_forward, register
from .residual import ResidualProbe, ResidualSummary, summarize_hidden

__all__ = [
    "ATTN_IMPLEMENTATION",
    "AttentionProbe",
    "KeyImportance",
    "LazyMask",
    "ResidualProbe",
    "ResidualSummary",
    "RowMeans",
    "headlab_attention_forward",
    "register",
    "summarize_hidden",
]
