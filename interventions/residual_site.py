"""Edits of the residual stream, through ordinary PyTorch hooks on a layer or its MLP."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from headlab.errors import InputError
from headlab.kernels.positions import Positions, PositionSpec

from .base import Bound, Intervention, register_intervention

# Where a residual edit acts (TransformerLens names): the input of a layer, its output, its MLP's output.
RESIDUAL_POINTS = ("resid_pre", "resid_post", "mlp_out")


@register_intervention("residual_add")
@dataclass(eq=False)  # holds a tensor: identity, not elementwise comparison
class ResidualAdd(Intervention):
    """Steering: x <- x + scale · vector at ``point`` of ``layer`` on chosen rows.

    ``vector``: ``[d_model]``; ``point``: resid_pre (layer input), resid_post (layer output) or
    mlp_out (the MLP's output, before it joins the residual).
    """

    layer: int
    vector: torch.Tensor
    point: str = "resid_post"
    scale: float = 1.0
    rows: PositionSpec = "all"
    site = "residual"

    def bind(self, arch) -> Bound:
        if not isinstance(self.layer, int) or not 0 <= self.layer < arch.n_layers:
            raise InputError(f"ResidualAdd: layer {self.layer} does not exist; this model has layers "
                             f"0..{arch.n_layers - 1}")
        if self.point not in RESIDUAL_POINTS:
            raise InputError(f"ResidualAdd: point must be one of {', '.join(RESIDUAL_POINTS)}, got {self.point!r}")
        if tuple(self.vector.shape) != (arch.hidden_size,):
            raise InputError(f"ResidualAdd: vector has shape {list(self.vector.shape)}, expected [{arch.hidden_size}]")
        Positions.of(self.rows)
        return Bound(self, {self.layer: ()})  # nothing per model to resolve: the hooks read the edit

    def layers(self) -> list[int]:
        return [self.layer]

    def edit(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """x ``[batch, query, d_model]``, rows ``[batch, query]`` bool -> edited x."""
        delta = (self.scale * self.vector).to(device=x.device, dtype=x.dtype)
        return torch.where(rows[:, :, None].to(x.device), x + delta, x)
