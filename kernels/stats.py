"""What the fused attention functions return besides the output, and how keys are masked.

Every backend (eager, torch, triton) speaks this one vocabulary, so probes and analyses never know
which backend produced the numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from headlab.errors import InputError

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
    - ``key_groups``: ``[batch, key]`` integer labels (BOS / image / text / sink …), 0 .. n_groups - 1;
      any other label (e.g. -1) belongs to no group. Asks for ``group_mass``.
    - ``n_groups``: number of groups; default ``key_groups.max() + 1`` (one host sync, so pass it on GPU).
    - ``group_outputs``: also the partial outputs ``O_g = sum_{k in g} P_ik V_k`` (``group_out``).
    - ``output_groups``: with ``group_outputs``, the groups whose partial outputs are needed (None = all);
      the others' ``group_out`` entries are 0 on every backend, and cost the torch backend no P·V
      (e.g. a group whose weight is 0 in every edited row of a post-softmax edit).
    - ``query_group``: restrict the column statistics (``key_mass``, ``key_count``, distance profile)
      to queries whose own position carries this label; query row i sits at key position
      i + q_offset, so this needs the keys to cover the queries (self-attention, with or without cache).
    """

    distance: bool = False
    key_groups: torch.Tensor | None = None
    n_groups: int | None = None
    group_outputs: bool = False
    query_group: int | None = None
    output_groups: tuple[int, ...] | None = None

    def group_count(self) -> int:
        """Number of key groups asked for (0 when no labels were given)."""
        if self.key_groups is None:
            return 0
        if self.n_groups is not None:
            return self.n_groups
        return int(self.key_groups.max().item()) + 1 if self.key_groups.numel() else 0

    def check(self, batch: int, n_q: int, n_k: int, q_offset: int) -> None:
        """Raise ``InputError`` when the request does not fit a call with these sizes."""
        labels = self.key_groups
        needs_labels = self.group_outputs or self.query_group is not None
        if labels is None:
            if needs_labels:
                raise InputError("group_outputs and query_group need key labels: pass StatsRequest(key_groups=...) "
                                 "as a [batch, key] integer tensor")
            return
        if labels.dim() != 2 or labels.shape[1] != n_k or labels.shape[0] not in (1, batch):
            raise InputError(f"key_groups must be [batch, key] = [{batch}, {n_k}] (or [1, {n_k}]), "
                             f"got {list(labels.shape)}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise InputError(f"key_groups must hold integer labels, got {labels.dtype}")
        if self.output_groups is not None and not self.group_outputs:
            raise InputError("output_groups names the groups whose partial outputs are needed: it needs "
                             "StatsRequest(group_outputs=True)")
        if self.output_groups is not None:
            n_groups = self.group_count()
            bad = [g for g in self.output_groups if not 0 <= int(g) < n_groups]
            if bad:
                raise InputError(f"output_groups {bad} are not groups of this request (0 .. {n_groups - 1})")
        if self.n_groups is not None and self.n_groups < 1:
            raise InputError(f"n_groups must be at least 1, got {self.n_groups}")
        if self.query_group is not None and q_offset + n_q > n_k:
            raise InputError(f"query_group reads the label of query i at key position i + q_offset, but "
                             f"{n_q} queries at offset {q_offset} run past the {n_k} keys; label the queries' keys")

    def output_mask(self, n_groups: int, device: torch.device) -> torch.Tensor | None:
        """``[group]`` bool: the groups whose partial outputs were asked for, or None for all of them."""
        if self.output_groups is None:
            return None
        wanted = torch.zeros(n_groups, dtype=torch.bool)
        for g in self.output_groups:
            if 0 <= int(g) < n_groups:
                wanted[int(g)] = True
        return wanted.to(device)

    def labels(self, batch: int, device: torch.device) -> torch.Tensor | None:
        """``[batch, key]`` int32 labels on ``device``, or None."""
        if self.key_groups is None:
            return None
        return self.key_groups.to(device=device, dtype=torch.int32).expand(batch, -1).contiguous()


def column_rows(counted: torch.Tensor, request: StatsRequest | None, q_offset: int) -> torch.Tensor:
    """``[batch, query]`` rows that add to the column statistics: counted, and in ``query_group`` if set."""
    if request is None or request.query_group is None:
        return counted
    n_q = counted.shape[1]
    labels = request.labels(counted.shape[0], counted.device)[:, q_offset : q_offset + n_q]
    return counted & (labels == request.query_group)


def group_onehot(labels: torch.Tensor, n_groups: int) -> torch.Tensor:
    """``[batch, key]`` labels -> ``[batch, key, group]`` fp32 membership (labels outside 0..n-1: none)."""
    return (labels[..., None] == torch.arange(n_groups, device=labels.device)).float()


@dataclass
class AttentionStats:
    """Per-(batch, head) statistics of one attention call; fp32 except ``group_out`` (the output dtype).

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
    - ``group_mass`` (if key groups were given): ``[batch, head, query, group]`` mass each row puts on each
      key group (sinks excluded, so a row sums to one minus its sink mass).
    - ``group_out`` (if requested): ``[batch, head, query, group, dim_v]`` partial outputs
      ``O_g = sum_{k in g} P_ik V_k`` in the output's dtype; they sum to the output when every key has a group.

    With ``StatsRequest.query_group`` the column statistics (``key_mass``, ``key_count``, distance) sum
    over the counted queries of that group only; ``row_counted`` still lists every counted row.
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
    group_mass: torch.Tensor | None = None
    group_out: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> AttentionStats:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return AttentionStats(**{k: None if v is None else v.to(device) for k, v in moved.items()})
