"""``Hook(name, fn)``: an edit at any point ``headlab.trace`` reads that holds a value to replace.

``hook`` is a TransformerLens-style name (``headlab.hook_names``): ``blocks.{l}.hook_resid_pre`` /
``hook_resid_post`` / ``hook_mlp_out`` (``[batch, query, d_model]``, the residual site) or
``blocks.{l}.attn.hook_z`` (``[batch, query, head, d_head]``, the z site). ``fn(value)`` returns the new value
(same shape); it acts on the chosen query ``rows`` only, so the edit holds with a KV cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from headlab.errors import InputError
from headlab.hook_names import match_name, parse_name
from headlab.kernels.positions import Positions, PositionSpec

from .base import Bound, Intervention, register_intervention
from .z_site import BoundZEdit, ZCall

# hook name -> (site, the residual site's point)
EDITABLE = {"hook_resid_pre": ("residual", "resid_pre"), "hook_resid_post": ("residual", "resid_post"),
            "hook_mlp_out": ("residual", "mlp_out"), "hook_z": ("z", None)}


@register_intervention("hook")
@dataclass(eq=False)  # holds a function: identity, not field comparison
class Hook(Intervention):
    """value <- ``fn(value)`` at ``hook`` (a hook name) on query ``rows`` (``"all"``, ``"last"``, positions, …)."""

    hook: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    rows: PositionSpec = "all"

    def __post_init__(self) -> None:
        layer, hook = match_name(self.hook) or (None, None)
        if hook not in EDITABLE:
            raise InputError(f"Hook({self.hook!r}): edits act at blocks.{{l}}.hook_resid_pre, hook_resid_post, "
                             "hook_mlp_out and blocks.{l}.attn.hook_z; the other names can be read (headlab.trace), "
                             "not replaced")
        if not callable(self.fn):
            raise InputError(f"Hook({self.hook!r}): fn must be a function of the value, got {type(self.fn).__name__}")
        # Where it acts follows from the name: the residual site's hooks or the z site's pre-hook on o_proj.
        self.site, self.point = EDITABLE[hook]
        self.layer = layer

    def bind(self, arch) -> Bound:
        parse_name(self.hook, arch.n_layers)
        Positions.of(self.rows)
        if self.site == "z":
            return BoundZEdit(self, {self.layer: tuple(range(arch.n_heads))})
        return Bound(self, {self.layer: ()})

    def layers(self) -> list[int]:
        return [self.layer]

    def _apply(self, value: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        new = self.fn(value)
        if not isinstance(new, torch.Tensor) or new.shape != value.shape:
            got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
            raise InputError(f"Hook({self.hook!r}): fn returned {got}, expected a tensor of shape "
                             f"{tuple(value.shape)}")
        rows = rows.to(value.device).reshape(*rows.shape, *([1] * (value.dim() - 2)))
        return torch.where(rows, new.to(value.dtype), value)

    def edit(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The residual site: x ``[batch, query, d_model]``, rows ``[batch, query]`` bool -> edited x."""
        return self._apply(x, rows)

    def edit_z(self, z: torch.Tensor, call: ZCall, bound: BoundZEdit) -> torch.Tensor:
        """The z site: z ``[batch, query, head, d_head]`` -> edited z."""
        return self._apply(z, call.rows(Positions.of(self.rows)))
