"""The probe that collects the statistics of headlab's attention function.

``AttentionProbe`` switches a model to the ``"headlab"`` attention implementation through
``headlab.kernels.attention_function.headlab_attention`` (the one switch), as its statistics reader:
every attention layer of the language model returns its output from ``headlab.kernels`` and hands its
``AttentionStats`` to the probe. Inside ``headlab.intervene`` the same function applies the
attention-site edits first, so the probe sees the edited call. ``output_attentions`` is never used,
and no T x T matrix is built on the default path.

The attention function, ``LazyMask``, ``PatternReader`` and ``register`` live in
``headlab.kernels.attention_function`` (``headlab.probes`` re-exports them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from headlab.kernels import AttentionStats, StatsRequest
from headlab.kernels.attention_function import headlab_attention


class AttentionProbe:
    """Context manager: while active, the model runs headlab attention and statistics flow to ``on_stats``.

    ``on_stats(layer, stats)`` is called once per probed layer per forward pass; by default the
    statistics of the last forward are kept in ``self.last`` (``{layer: AttentionStats}``).
    ``request`` asks the kernels for optional statistics (e.g. ``StatsRequest(distance=True)``).
    It is a ``headlab.kernels.attention_function.StatsReader``.
    """

    def __init__(self, loaded, on_stats: Callable[[int, AttentionStats], None] | None = None,
                 backend: str | None = None, layers: list[int] | None = None,
                 request: StatsRequest | None = None):
        self.model = loaded.model
        self.arch = loaded.arch
        self.backend = backend
        self.request = request
        self.on_stats = on_stats
        self.layers = set(range(self.arch.n_layers) if layers is None else layers)
        self.last: dict[int, AttentionStats] = {}
        self._switch: contextlib.AbstractContextManager | None = None

    def layer_of(self, module: torch.nn.Module) -> int | None:
        layer = self.arch.layer_of(module)
        return layer if layer in self.layers else None

    def record(self, layer: int, stats: AttentionStats) -> None:
        if self.on_stats is not None:
            self.on_stats(layer, stats)
        else:
            self.last[layer] = stats

    def __enter__(self) -> AttentionProbe:
        switch = headlab_attention(self.model, reader=self)
        switch.__enter__()
        self._switch = switch
        return self

    def __exit__(self, *exc) -> None:
        switch, self._switch = self._switch, None
        switch.__exit__(*exc)
