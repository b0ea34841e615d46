"""Streaming accumulators over prompts and batches, one small protocol for all (baukit style).

Each has ``add(layer, stats)`` (one layer's ``AttentionStats`` of one forward pass), and from
``headlab.tally.Mergeable`` ``state_dict()``, ``load_state_dict()`` and ``merge()`` (the state of the same
accumulator over other prompts: ranks, shards, a resumed run); results are read with named methods.
"""

from __future__ import annotations

import torch

from headlab.kernels import AttentionStats
from headlab.tally import Mergeable


class KeyImportance(Mergeable):
    """Gu et al.'s importance alpha[l, h, k] of the first ``n_keys`` key positions, per sample.

    For each sample, alpha = mass received by key k / number of queries that see it (the mean
    over queries i >= k under a causal mask, over all queries in an encoder). Positions count from
    the first real token. Sink_k^eps = 100 · mean over samples, layers, heads of 1[alpha > eps].
    """

    merging = {"alpha_sum": "sum", "above": "sum", "samples": "sum", "eps": "equal"}

    def __init__(self, n_layers: int, n_heads: int, n_keys: int, eps: float):
        self.eps = eps
        self.alpha_sum = torch.zeros(n_layers, n_heads, n_keys, dtype=torch.float64)
        self.above = torch.zeros(n_layers, n_heads, n_keys, dtype=torch.float64)
        self.samples = torch.zeros(n_layers, n_keys, dtype=torch.float64)

    def add(self, layer: int, stats: AttentionStats) -> None:
        n_keys = self.alpha_sum.shape[-1]
        last = stats.key_count.shape[-1] - 1
        idx = stats.first_key[:, None] + torch.arange(n_keys, device=stats.first_key.device)  # [batch, k]
        in_range = idx <= last
        idx = idx.clamp(max=last)
        count = stats.key_count.gather(-1, idx)
        present = in_range & (count > 0)
        mass = stats.key_mass.gather(-1, idx[:, None, :].expand(-1, stats.key_mass.shape[1], -1))
        alpha = (mass / count.clamp(min=1)[:, None, :]).double().cpu()
        present = present[:, None, :].cpu()
        self.alpha_sum[layer] += (alpha * present).sum(0)
        self.above[layer] += ((alpha > self.eps) & present).sum(0)
        self.samples[layer] += present[:, 0].sum(0)

    def alpha(self) -> torch.Tensor:
        """``[layer, head, key]`` mean over samples of alpha (NaN where no sample had that position)."""
        return (self.alpha_sum / self.samples[:, None, :]).float()

    def sink_rate(self) -> torch.Tensor:
        """``[key]`` Sink_k^eps in percent."""
        n_heads = self.above.shape[1]
        return (100 * self.above.sum((0, 1)) / (self.samples.sum(0) * n_heads)).float()


class RowMeans(Mergeable):
    """Mean over counted query rows, per (layer, head): row entropy and mass on the first real key."""

    merging = {"entropy_sum": "sum", "first_mass_sum": "sum", "rows": "sum"}

    def __init__(self, n_layers: int, n_heads: int):
        self.entropy_sum = torch.zeros(n_layers, n_heads, dtype=torch.float64)
        self.first_mass_sum = torch.zeros(n_layers, n_heads, dtype=torch.float64)
        self.rows = torch.zeros(n_layers, dtype=torch.float64)

    def add(self, layer: int, stats: AttentionStats) -> None:
        weight = stats.row_counted[:, None, :].to(stats.entropy.dtype)
        self.entropy_sum[layer] += (stats.entropy * weight).sum((0, 2)).double().cpu()
        self.first_mass_sum[layer] += (stats.first_mass * weight).sum((0, 2)).double().cpu()
        self.rows[layer] += float(stats.row_counted.sum())

    def entropy(self) -> torch.Tensor:
        return (self.entropy_sum / self.rows[:, None]).float()

    def first_mass(self) -> torch.Tensor:
        return (self.first_mass_sum / self.rows[:, None]).float()
