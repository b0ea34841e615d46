"""What the fused attention functions return besides the output, and how keys are masked.

Every backend (eager, torch, triton) speaks this one vocabulary, so probes and analyses never know
which backend produced the numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

# A lazy, row-chunked mask: called with (q_start, q_end) it returns the extra boolean mask for those
# query rows, [batch or 1, 1, q_end - q_start, key] (True = may attend). It lets a model's own mask
# function (packed sequences, prefix-LM, chunked attention…) reach the kernels without a T x T tensor.
RowMaskFn = Callable[[int, int], torch.Tensor]


@dataclass
class MaskSpec:
    """Which keys each query may see; the structured parts stay scalars so no T x T mask is built.

    - ``causal``: key j visible to query i only if j <= i + q_offset.
    - ``window``: sliding window; j visible only if j > i + q_offset - window (transformers' rule).
    - ``q_offset``: absolute key position of query row 0 (decoding with a cache: K - Q).
    - ``key_padding``: ``[batch, key]`` bool, True for real tokens.
    - ``query_valid``: ``[batch, query]`` bool, rows that count in the accumulated statistics
      (padding queries still get an output, but add nothing to the statistics).
    - ``row_mask``: optional extra mask, see ``RowMaskFn``; AND-ed with the rest. It must not depend
      on the head (``key_count`` is per batch and key).
    """

    causal: bool = True
    window: int | None = None
    q_offset: int = 0
    key_padding: torch.Tensor | None = None
    query_valid: torch.Tensor | None = None
    row_mask: RowMaskFn | None = None

    def allowed(self, q_start: int, q_end: int, n_keys: int, device: torch.device) -> torch.Tensor:
        """Boolean visibility for query rows [q_start, q_end): ``[batch or 1, 1, rows, key]``."""
        rows = torch.arange(q_start, q_end, device=device)[:, None] + self.q_offset
        keys = torch.arange(n_keys, device=device)[None, :]
        allowed = torch.ones(q_end - q_start, n_keys, dtype=torch.bool, device=device)
        if self.causal:
            allowed &= keys <= rows
        if self.window is not None:
            allowed &= keys > rows - self.window
        allowed = allowed[None, None]
        if self.key_padding is not None:
            allowed = allowed & self.key_padding[:, None, None, :].to(device=device, dtype=torch.bool)
        if self.row_mask is not None:
            allowed = allowed & self.row_mask(q_start, q_end).to(device=device, dtype=torch.bool)
        return allowed

    def rows_counted(self, q_start: int, q_end: int, batch: int, device: torch.device) -> torch.Tensor:
        """``[batch, rows]`` bool: which query rows add to the statistics."""
        if self.query_valid is None:
            return torch.ones(batch, q_end - q_start, dtype=torch.bool, device=device)
        return self.query_valid[:, q_start:q_end].to(device=device, dtype=torch.bool).expand(batch, -1)

    def first_key(self, batch: int, device: torch.device) -> torch.Tensor:
        """``[batch]`` index of the first real key (the BOS / [CLS] slot under left padding)."""
        if self.key_padding is None:
            return torch.zeros(batch, dtype=torch.long, device=device)
        padding = self.key_padding.to(device=device, dtype=torch.bool).expand(batch, -1)
        return padding.int().argmax(dim=-1)


@dataclass
class AttentionStats:
    """Per-(batch, head) statistics of one attention call; all fp32.

    - ``lse``: ``[batch, head, query]`` natural-log log-sum-exp of the scaled logits (sinks included).
    - ``entropy``: ``[batch, head, query]`` entropy (nats) of each row's distribution over keys.
    - ``key_mass``: ``[batch, head, key]`` attention received by each key, summed over counted queries.
    - ``key_count``: ``[batch, key]`` number of counted queries that can see each key, so that
      ``key_mass / key_count`` is the mean attention received (Gu et al.'s alpha under a causal mask).
    - ``first_mass``: ``[batch, head, query]`` mass each row puts on the first real key.
    - ``row_counted``: ``[batch, query]`` which rows were counted (real queries with a visible key).
    - ``first_key``: ``[batch]`` index of the first real key, so readers need not know the padding side.
    """

    lse: torch.Tensor
    entropy: torch.Tensor
    key_mass: torch.Tensor
    key_count: torch.Tensor
    first_mass: torch.Tensor
    row_counted: torch.Tensor
    first_key: torch.Tensor

    def to(self, device: torch.device | str) -> AttentionStats:
        return AttentionStats(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})
