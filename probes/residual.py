"""The residual probe: per layer and position, hidden-state norm and the largest activation.

Reads the output of each decoder layer (``hook_resid_post``) with a forward hook and keeps only
O(layer · batch · position) numbers per forward pass: enough for massive activations
(Sun et al.: |x| > 100 and >= ~1000x the median |x| of its hidden state) and norm profiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ResidualSummary:
    """All ``[layer, batch, position]``: L2 norm, the largest-|x| activation (signed), its
    dimension, and the median |x| of the hidden state."""

    norm: torch.Tensor
    top_value: torch.Tensor
    top_dim: torch.Tensor
    median_abs: torch.Tensor


def summarize_hidden(hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """hidden ``[batch, position, d_model]`` -> norm, top value, top dim, median |x|, each ``[batch, position]``."""
    h = hidden.float()
    absolute = h.abs()
    top_dim = absolute.argmax(dim=-1)
    top_value = h.gather(-1, top_dim[..., None])[..., 0]
    return h.norm(dim=-1), top_value, top_dim, absolute.median(dim=-1).values


class ResidualProbe:
    """Context manager with forward hooks on every decoder layer; ``summary()`` after a forward."""

    def __init__(self, loaded):
        self.arch = loaded.arch
        self._rows: dict[int, tuple[torch.Tensor, ...]] = {}
        self._handles: list = []

    def _hook(self, layer: int):
        def hook(_module, _inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            self._rows[layer] = tuple(t.cpu() for t in summarize_hidden(hidden.detach()))

        return hook

    def summary(self) -> ResidualSummary:
        """The last forward pass, stacked over layers; clears the buffer."""
        rows = [self._rows[i] for i in range(self.arch.n_layers)]
        self._rows = {}
        return ResidualSummary(*(torch.stack(parts) for parts in zip(*rows, strict=True)))

    def __enter__(self) -> ResidualProbe:
        self._handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.arch.layers)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
