"""Which columns the current forward call covers: read from the model's own inputs by a pre-hook.

Hooks on o_proj, the layers or the MLP see only ``[batch, query, ...]`` tensors; to resolve absolute
positions they need the padding mask and how many columns the KV cache already holds. A forward
pre-hook on the outer model reads both from the call's arguments before anything is computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from headlab.kernels.positions import Positions, SequenceLayout


@dataclass
class CallLayout:
    """One forward call: ``n_query`` new columns after ``seen`` cached ones, and where the real tokens are."""

    layout: SequenceLayout
    seen: int
    n_query: int
    batch: int

    def rows(self, positions: Positions) -> torch.Tensor:
        """``[batch, query]`` bool: the new rows of this call that ``positions`` picks."""
        return self.layout.choose(positions, self.n_query, self.seen)


def _argument(args: tuple, kwargs: dict, name: str, index: int):
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else None


class LayoutTracker:
    """Keeps the ``CallLayout`` of the outer model's current forward call (the last one, after it ends)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.current: CallLayout | None = None
        self._handle = None

    def install(self, check=None) -> None:
        """Start tracking; ``check(call)`` runs on each call's layout before the model computes anything."""

        def read(module, args, kwargs):
            self.current = self.read_call(args, kwargs)
            if check is not None:
                check(self.current)

        self._handle = self.model.register_forward_pre_hook(read, with_kwargs=True, prepend=True)

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @staticmethod
    def read_call(args: tuple, kwargs: dict) -> CallLayout | None:
        ids = _argument(args, kwargs, "input_ids", 0)
        embeds = kwargs.get("inputs_embeds")
        source = ids if isinstance(ids, torch.Tensor) else embeds
        if not isinstance(source, torch.Tensor) or source.dim() < 2:
            return None
        batch, n_query = source.shape[0], source.shape[1]
        mask = _argument(args, kwargs, "attention_mask", 1)
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            seen = mask.shape[1] - n_query
        else:
            mask = None
            cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5 renamed it
            seen = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        layout = SequenceLayout.from_mask(mask, batch, seen + n_query, source.device)
        return CallLayout(layout, seen, n_query, batch)

    def rows(self, positions: Positions, batch: int, n_query: int, device: torch.device) -> torch.Tensor:
        """Rows of the current call; without a tracked call (a submodule run alone) rows are 0 .. n - 1."""
        call = self.current
        if call is None or call.batch != batch or call.n_query != n_query:
            layout = SequenceLayout.from_mask(None, batch, n_query, device)
            return layout.choose(positions, n_query, 0)
        return call.rows(positions)
