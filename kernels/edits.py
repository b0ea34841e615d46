"""Edits applied where the attention scores are formed: the kernel side of attention-site interventions.

A ``ScoreEdit`` changes the scaled pre-softmax scores of one attention call, per (head, key group),
on chosen query rows:

    s'[b, h, i, j] = mult[h, g] * s + add_abs[h, g] * |s|     where g = labels[b, j], rows[b, i] True

Keys whose label is outside ``0 .. n_groups - 1`` (e.g. -1) and rows that are not selected keep their
score. A PAI / PAINT boost (s += alpha |s|) sets ``add_abs``; a VAF scaling sets ``mult``.
The edit is applied before masking, so masked keys stay masked, and learned sinks are not edited.
Every backend (eager, torch, triton) applies it inside its score tile; only the eager oracle holds the
full T x T scores. Rows and labels index the query rows and keys of this call: while decoding with a
KV cache (``q_offset``), ``rows`` covers the new queries and ``labels`` every cached key.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from headlab.errors import InputError


def _expect_shape(name: str, tensor: torch.Tensor, batch: int, size: int, what: str) -> None:
    """``tensor`` must be ``[batch or 1, size]``."""
    if tensor.dim() != 2 or tensor.shape[1] != size or tensor.shape[0] not in (1, batch):
        raise InputError(f"ScoreEdit.{name} must be [batch, {what}] = [{batch}, {size}] (or [1, {size}]), "
                         f"got {list(tensor.shape)}")


@dataclass
class ScoreEdit:
    """Pre-softmax score edit of one attention call.

    - ``labels``: ``[batch or 1, key]`` integer key group per key (absolute key positions of this call).
    - ``mult``: ``[head, n_groups]`` multiplier of the score (1 = unchanged).
    - ``add_abs``: ``[head, n_groups]`` coefficient of ``|s|`` added to the score (0 = unchanged).
    - ``rows``: ``[batch or 1, query]`` bool, the query rows edited (None = every row).

    The coefficients are applied in fp32 (the kernels' score precision) whatever the input dtype.
    """

    labels: torch.Tensor
    mult: torch.Tensor
    add_abs: torch.Tensor
    rows: torch.Tensor | None = None

    @property
    def n_groups(self) -> int:
        return self.mult.shape[1]

    def check(self, batch: int, n_heads: int, n_q: int, n_k: int) -> None:
        """Raise ``InputError`` when the edit does not fit a call with these sizes (no host sync)."""
        _expect_shape("labels", self.labels, batch, n_k, "key")
        if self.labels.dtype.is_floating_point or self.labels.dtype == torch.bool:
            raise InputError(f"ScoreEdit.labels must hold integer key groups, got {self.labels.dtype}")
        for name in ("mult", "add_abs"):
            coef = getattr(self, name)
            if coef.dim() != 2 or coef.shape[0] != n_heads or coef.shape[1] < 1:
                raise InputError(f"ScoreEdit.{name} must be [head, group] with {n_heads} heads and at least "
                                 f"one group, got {list(coef.shape)}")
            if not coef.dtype.is_floating_point:
                raise InputError(f"ScoreEdit.{name} must be a floating tensor, got {coef.dtype}")
        if self.mult.shape != self.add_abs.shape:
            raise InputError(f"ScoreEdit.mult {list(self.mult.shape)} and add_abs {list(self.add_abs.shape)} differ")
        if self.rows is not None:
            _expect_shape("rows", self.rows, batch, n_q, "query")
            if self.rows.dtype != torch.bool:
                raise InputError(f"ScoreEdit.rows must be a bool mask of the edited query rows, got {self.rows.dtype}")

    def coefficients(self, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-key coefficients ``[batch, head, key]`` fp32 contiguous (mult, add_abs); identity (1, 0) outside
        every group. O(batch·head·key): what the chunked and tiled backends read instead of the labels."""
        labels = self.labels.to(device=device, dtype=torch.long).expand(batch, -1)
        inside = (labels >= 0) & (labels < self.n_groups)
        index = labels.clamp(0, self.n_groups - 1)
        mult = self.mult.to(device=device, dtype=torch.float32)[:, index].permute(1, 0, 2)  # [batch, head, key]
        add = self.add_abs.to(device=device, dtype=torch.float32)[:, index].permute(1, 0, 2)
        inside = inside[:, None, :]
        return (torch.where(inside, mult, 1.0).contiguous(), torch.where(inside, add, 0.0).contiguous())

    def row_flags(self, batch: int, device: torch.device) -> torch.Tensor | None:
        """``[batch, query]`` bool edited rows on ``device`` (contiguous), or None when every row is edited."""
        if self.rows is None:
            return None
        return self.rows.to(device=device, dtype=torch.bool).expand(batch, -1).contiguous()

    def apply(self, scores: torch.Tensor, q_start: int, k_lo: int, k_hi: int,
              coefficients: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Edit a tile of scaled scores ``[batch, head, rows, keys]`` for query rows from ``q_start`` and
        keys ``[k_lo, k_hi)``; returns a new tensor (the readable reference every backend must match)."""
        batch, _, n_rows, _ = scores.shape
        mult, add = coefficients or self.coefficients(batch, scores.device)
        mult, add = mult[:, :, None, k_lo:k_hi], add[:, :, None, k_lo:k_hi]
        edited = scores * mult + add * scores.abs()
        if self.rows is None:
            return edited
        rows = self.rows[:, q_start : q_start + n_rows].to(device=scores.device, dtype=torch.bool)
        return torch.where(rows[:, None, :, None], edited, scores)
