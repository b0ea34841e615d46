"""Fused attention with statistics: the output plus what analyses need, without T x T memory."""

if __name__ != "headlab.kernels":
    # A bare `kernels` is HF's kernel hub, which transformers imports; Python started in the repository root
    # finds this folder first (headlab.bare_imports says more).
    from headlab.bare_imports import yield_to_installed

    yield_to_installed(__name__, __file__)
else:
    from .dispatch import (
        BACKEND_ENV,
        BACKENDS,
        BackendError,
        attention_with_stats,
        check_environment,
        register_backend,
        resolve_backend,
    )
    from .eager import attention_probs, eager_attention_with_stats, stats_from_probs
    from .edits import ScoreEdit
    from .stats import AttentionStats, MaskSpec, StatsRequest, distance_bin_edges, distance_bins
    from .torch_backend import torch_attention_with_stats

    __all__ = [
        "BACKENDS",
        "BACKEND_ENV",
        "AttentionStats",
        "BackendError",
        "MaskSpec",
        "ScoreEdit",
        "StatsRequest",
        "attention_probs",
        "attention_with_stats",
        "check_environment",
        "distance_bin_edges",
        "distance_bins",
        "eager_attention_with_stats",
        "register_backend",
        "resolve_backend",
        "stats_from_probs",
        "torch_attention_with_stats",
    ]
