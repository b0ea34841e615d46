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


def distance_bins(distance: torch.Tensor) -> torch.Tensor:
    """Bin index of non-negative integer distances: exact for 0..3, then two bins per octave.

    Left edges 0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, …: log-spaced, so a 32k context needs 30 bins.
    ``frexp`` makes it exact (no float log): d = m · 2^e with m in [0.5, 1), bin = 2(e - 1) + [m >= 0.75].
    """
    mantissa, exponent = torch.frexp(distance.double())
    binned = 2 * (exponent.long() - 1) + (mantissa >= 0.75).long()
    return torch.where(distance < 2, distance.long(), binned)


def n_distance_bins(max_distance: int) -> int:
    return int(distance_bins(torch.tensor(max(max_distance, 0)))) + 1


def distance_bin_edges(n_bins: int) -> list[int]:
    """Left edge (smallest distance) of each of ``n_bins`` bins."""
    edges = [0, 1]
    while len(edges) < n_bins:
        octave = 2 ** (len(edges) // 2)
        edges.append(octave if len(edges) % 2 == 0 else 3 * octave // 2)
    return edges[:n_bins]


def distance_shape(n_q: int, n_k: int, q_offset: int) -> int:
    """Bins per side for a call with these sizes; every backend must use this same number."""
    return n_distance_bins(max(n_k - 1, n_q - 1 + q_offset))


def distance_index(q_start: int, q_end: int, k_start: int, k_end: int, q_offset: int, n_bins: int,
                   device: torch.device) -> torch.Tensor:
    """``[rows, keys]`` flat index side · n_bins + bin of each (query, key) pair of a tile."""
    rows = torch.arange(q_start, q_end, device=device)[:, None] + q_offset
    keys = torch.arange(k_start, k_end, device=device)[None, :]
    signed = rows - keys
    return (signed < 0).long() * n_bins + distance_bins(signed.abs())


def add_distance(mass: torch.Tensor, count: torch.Tensor, probs: torch.Tensor, pairs: torch.Tensor,
                 index: torch.Tensor) -> None:
    """Scatter one tile into the distance accumulators (in place).

    mass ``[batch, head, 2 · bins]``; count ``[batch, 2 · bins]``; probs ``[batch, head, rows, keys]``
    already zero on rows that are not counted; pairs ``[batch, rows, keys]`` counted and visible;
    index ``[rows, keys]`` from ``distance_index``.
    """
    batch, n_heads = probs.shape[:2]
    flat = index.reshape(1, -1)
    mass.view(batch * n_heads, -1).scatter_add_(1, flat.expand(batch * n_heads, -1),
                                                probs.reshape(batch * n_heads, -1).float())
    count.scatter_add_(1, flat.expand(batch, -1), pairs.reshape(batch, -1).float())


@dataclass
class StatsRequest:
    """Optional statistics a caller asks for on top of the always-computed ones.

    - ``distance``: attention mass binned by query–key distance (``distance_bins``), per head.
    """

    distance: bool = False


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
    - ``distance_mass`` (if requested): ``[batch, head, side, bin]`` mass summed over counted rows by
      distance bin; side 0 holds keys at or before the query (d = i - j >= 0, i in absolute positions,
      q_offset included), side 1 keys after it (d = j - i > 0; zero under a causal mask).
    - ``distance_count`` (if requested): ``[batch, side, bin]`` number of (counted query, visible key)
      pairs per bin, so ``distance_mass / distance_count`` is the mean attention of one key at that distance.
    """

    lse: torch.Tensor
    entropy: torch.Tensor
    key_mass: torch.Tensor
    key_count: torch.Tensor
    first_mass: torch.Tensor
    row_counted: torch.Tensor
    first_key: torch.Tensor
    distance_mass: torch.Tensor | None = None
    distance_count: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> AttentionStats:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return AttentionStats(**{k: None if v is None else v.to(device) for k, v in moved.items()})
