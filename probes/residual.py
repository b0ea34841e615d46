"""The residual probe: per layer and position, hidden-state norm and the largest activation.

Reads the output of each decoder layer (``hook_resid_post``) with a forward hook and keeps only
O(layer · batch · position) numbers per forward pass: enough for massive activations and norm profiles.
Massive activations (Sun et al.): |x| > 100 and >= ~1000x the median |x| of the layer's whole hidden
state for that input, over all real positions and dimensions, as their code counts it. A token's own
median is kept too: a sink token's vector is dominated by a few huge dimensions, so the ratio to its own
median is far smaller (SmolLM2-135M, dim 507 of the first token: ~10,700x the layer median, ~500x its own).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ResidualSummary:
    """``[layer, batch, position]``: L2 norm, the largest-|x| activation (signed), its dimension, and the
    median |x| of that token's vector; ``layer_median_abs`` ``[layer, batch]``: the median |x| over the
    whole hidden state of the input (real positions only, every dimension)."""

    norm: torch.Tensor
    top_value: torch.Tensor
    top_dim: torch.Tensor
    median_abs: torch.Tensor
    layer_median_abs: torch.Tensor


def summarize_hidden(hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """hidden ``[batch, position, d_model]`` -> norm, top value, top dim, median |x|, each ``[batch, position]``."""
    h = hidden.float()
    absolute = h.abs()
    top_dim = absolute.argmax(dim=-1)
    top_value = h.gather(-1, top_dim[..., None])[..., 0]
    return h.norm(dim=-1), top_value, top_dim, absolute.median(dim=-1).values


def hidden_state_median(hidden: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """hidden ``[batch, position, d_model]``, valid ``[batch, position]`` (True = real token) -> ``[batch]``
    median |x| over every real position and dimension (``torch.median``: the lower middle value)."""
    absolute = hidden.float().abs()
    if valid is None:
        return absolute.flatten(1).median(dim=1).values
    return torch.stack([absolute[row][valid[row].to(torch.bool)].median() for row in range(hidden.shape[0])])


class ResidualProbe:
    """Context manager with forward hooks on every decoder layer; ``summary()`` after a forward."""

    def __init__(self, loaded):
        self.arch = loaded.arch
        self.model = loaded.model
        self._rows: dict[int, tuple[torch.Tensor, ...]] = {}
        self._valid: torch.Tensor | None = None
        self._handles: list = []

    def _capture_mask(self, _module, _args, kwargs):
        # The padding mask of this forward: padding positions must not enter the layer median.
        mask = kwargs.get("attention_mask")
        self._valid = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def _hook(self, layer: int):
        def hook(_module, _inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = hidden.detach()
            valid = None
            if self._valid is not None and self._valid.shape == hidden.shape[:2]:
                valid = self._valid.to(hidden.device)
            rows = (*summarize_hidden(hidden), hidden_state_median(hidden, valid))
            self._rows[layer] = tuple(t.cpu() for t in rows)

        return hook

    def summary(self) -> ResidualSummary:
        """The last forward pass, stacked over layers; clears the buffer."""
        rows = [self._rows[i] for i in range(self.arch.n_layers)]
        self._rows = {}
        return ResidualSummary(*(torch.stack(parts) for parts in zip(*rows, strict=True)))

    def __enter__(self) -> ResidualProbe:
        self._handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.arch.layers)]
        self._handles.append(self.model.register_forward_pre_hook(self._capture_mask, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
