"""What position bias reads from a running model.

- ``PositionProfile``: a streaming accumulator (``add``, and ``state_dict`` / ``load_state_dict`` / ``merge``
  from ``headlab.tally.Mergeable``, as in ``accumulators.py``) of attention received by key position and by
  query-key distance, from the statistics path (O(H·T) per layer, any T).
- ``head_mean_attention``: the head-averaged T x T attention of every layer for one short prompt,
  from the model's own eager attention, for the cumulative rollout P^(t) over layers. It materialises
  ``[layer, head, T, T]``, so callers cap T.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from headlab.kernels import AttentionStats
from headlab.kernels.attention_function import other_attention
from headlab.kernels.stats import n_distance_bins
from headlab.tally import Mergeable

SEGMENTS = ("first token", "first third", "middle third", "last third")


def uniform_alpha(length: int, causal: bool, window: int | None = None) -> torch.Tensor:
    """``[position]`` mean attention each key receives if every query attends uniformly to what it sees.

    Causal: query i spreads 1/(i+1) over keys 0..i, so key p receives mean_{i >= p} 1/(i+1)
    = (H_L - H_p) / (L - p) with harmonic numbers H; bidirectional: 1/L everywhere. A sliding ``window`` w
    (transformers' rule: query i sees keys i - w < j <= i) gives query i the weight 1/min(i+1, w) and key p the
    queries p .. min(L, p + w) - 1. The baseline that separates a model's own position preference from what the
    mask alone produces.
    """
    if not causal:
        return torch.full((length,), 1.0 / length, dtype=torch.float64)
    queries = torch.arange(length, dtype=torch.float64)
    weight = 1.0 / (queries + 1 if window is None else torch.clamp(queries + 1, max=window))
    total = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(weight, 0)])
    positions = torch.arange(length)
    end = torch.full_like(positions, length) if window is None else torch.clamp(positions + window, max=length)
    return (total[end] - total[positions]) / (end - positions)  # queries positions .. end - 1


def relative_bins(length: int, n_bins: int) -> torch.Tensor:
    """``[position]`` relative-position bin of keys 1..L-1 (key 0, the first token, gets -1).

    Key p >= 1 sits at (p - 1) / (L - 1) in [0, 1) among the keys after the first token; the first
    token is left out because it is a sink in most trained models and would swamp the first bin.
    """
    positions = torch.arange(length)
    rel = (positions - 1).clamp(min=0).double() / max(length - 1, 1)
    bins = (rel * n_bins).floor().long().clamp(max=n_bins - 1)
    bins[0] = -1
    return bins


class PositionProfile(Mergeable):
    """Attention received by key position and by distance, per (layer, head), over prompts and batches.

    Positions count from the first real token. Per layer and head:
    - by distance: mass and (query, key) pair counts per log-spaced distance bin, both sides
      (``distance_mass [layer, head, side, bin]``, ``distance_count [layer, side, bin]``);
    - by key position: mass and counts pooled over prompts (``key_mass [layer, head, position]``,
      ``key_count [layer, position]``), so ``key_mass / key_count`` is the mean attention a key at that
      position receives from the queries that see it;
    - by relative position (lost in the middle) and by segment (first token, thirds of the rest): the
      mean over prompts of each prompt's mean attention received in that bin, with the same numbers
      for uniform attention under the model's mask (``uniform_alpha``) beside them.

    Every statistic is a sum over prompts (the means are taken when read), so the profiles of disjoint sets of
    prompts merge by adding; the mask settings must agree, or the uniform baselines would mix two masks.
    """

    merging = {"distance_mass": "sum", "distance_count": "sum", "rows": "sum", "key_mass": "sum", "key_count": "sum",
               "relative_sum": "sum", "relative_uniform_sum": "sum", "relative_prompts": "sum", "segment_sum": "sum",
               "segment_uniform_sum": "sum", "segment_prompts": "sum",
               "causal": "equal", "windows": "equal", "n_relative": "equal"}

    def __init__(self, n_layers: int, n_heads: int, max_tokens: int, n_relative: int = 10, causal: bool = True,
                 windows: list[int | None] | None = None):
        self.causal = causal
        # Sliding-window size of each layer (None: the full causal mask), for the uniform baseline.
        self.windows = list(windows) if windows is not None else [None] * n_layers
        self.n_relative = n_relative
        n_bins = n_distance_bins(max_tokens - 1)
        f64 = {"dtype": torch.float64}
        self.distance_mass = torch.zeros(n_layers, n_heads, 2, n_bins, **f64)
        self.distance_count = torch.zeros(n_layers, 2, n_bins, **f64)
        self.rows = torch.zeros(n_layers, **f64)
        self.key_mass = torch.zeros(n_layers, n_heads, max_tokens, **f64)
        self.key_count = torch.zeros(n_layers, max_tokens, **f64)
        self.relative_sum = torch.zeros(n_layers, n_heads, n_relative, **f64)
        self.relative_uniform_sum = torch.zeros(n_layers, n_relative, **f64)
        self.relative_prompts = torch.zeros(n_layers, n_relative, **f64)
        self.segment_sum = torch.zeros(n_layers, n_heads, len(SEGMENTS), **f64)
        self.segment_uniform_sum = torch.zeros(n_layers, len(SEGMENTS), **f64)
        self.segment_prompts = torch.zeros(n_layers, len(SEGMENTS), **f64)

    def add(self, layer: int, stats: AttentionStats) -> None:
        if stats.distance_mass is None:
            raise ValueError("PositionProfile needs distance statistics: probe with StatsRequest(distance=True)")
        n_bins = stats.distance_mass.shape[-1]
        if n_bins > self.distance_mass.shape[-1]:
            raise ValueError(f"a batch is longer than the {self.key_count.shape[-1]} positions this profile holds")
        self.distance_mass[layer, :, :, :n_bins] += stats.distance_mass.sum(0).double().cpu()
        self.distance_count[layer, :, :n_bins] += stats.distance_count.sum(0).double().cpu()
        self.rows[layer] += float(stats.row_counted.sum())

        max_tokens = self.key_count.shape[-1]
        last = stats.key_count.shape[-1] - 1
        idx = stats.first_key[:, None] + torch.arange(max_tokens, device=stats.first_key.device)  # [batch, pos]
        in_range = idx <= last
        idx = idx.clamp(max=last)
        count = stats.key_count.gather(-1, idx).double().cpu()
        present = in_range.cpu() & (count > 0)
        n_heads = stats.key_mass.shape[1]
        mass = stats.key_mass.gather(-1, idx[:, None, :].expand(-1, n_heads, -1)).double().cpu()
        mass = mass * present[:, None, :]
        self.key_mass[layer] += mass.sum(0)
        self.key_count[layer] += (count * present).sum(0)
        alpha = mass / count.clamp(min=1)[:, None, :]  # [batch, head, pos]
        for row in range(alpha.shape[0]):
            self._add_prompt(layer, alpha[row], int(present[row].sum()))

    def _add_prompt(self, layer: int, alpha: torch.Tensor, length: int) -> None:
        """One prompt's mean attention received ``alpha [head, position]`` (first ``length`` positions real)."""
        if length == 0:
            return
        alpha = alpha[:, :length]
        uniform = uniform_alpha(length, self.causal, self.windows[layer])
        rel = relative_bins(length, self.n_relative)
        segment = relative_bins(length, 3) + 1  # 0 = first token, 1..3 = thirds of the rest
        for index, n, sums, uniform_sums, prompts in (
            (rel, self.n_relative, self.relative_sum, self.relative_uniform_sum, self.relative_prompts),
            (segment, len(SEGMENTS), self.segment_sum, self.segment_uniform_sum, self.segment_prompts),
        ):
            keep = index >= 0
            index, values, base = index[keep], alpha[:, keep], uniform[keep]
            members = torch.zeros(n, dtype=torch.float64).index_add_(0, index, torch.ones_like(base))
            filled = members > 0
            per_bin = torch.zeros(alpha.shape[0], n, dtype=torch.float64).index_add_(1, index, values)
            base_bin = torch.zeros(n, dtype=torch.float64).index_add_(0, index, base)
            sums[layer, :, filled] += per_bin[:, filled] / members[filled]
            uniform_sums[layer, filled] += base_bin[filled] / members[filled]
            prompts[layer, filled] += 1

    def distance_mean(self) -> torch.Tensor:
        """``[layer, head, side, bin]`` mean attention one key receives at that distance (NaN: no pairs)."""
        return (self.distance_mass / self.distance_count[:, None]).float()

    def distance_share(self) -> torch.Tensor:
        """``[layer, head, side, bin]`` share of a query row's mass that lands in the bin (sums to 1)."""
        return (self.distance_mass / self.rows[:, None, None, None]).float()

    def position_mean(self) -> torch.Tensor:
        """``[layer, head, position]`` mean attention received by a key at that position (NaN: unseen)."""
        return (self.key_mass / self.key_count[:, None]).float()

    def relative_mean(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``[layer, head, bin]`` mean attention received by relative position, and the uniform ``[layer, bin]``."""
        return ((self.relative_sum / self.relative_prompts[:, None]).float(),
                (self.relative_uniform_sum / self.relative_prompts).float())

    def segment_mean(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``[layer, head, segment]`` (``SEGMENTS``) mean attention received, and the uniform ``[layer, segment]``."""
        return ((self.segment_sum / self.segment_prompts[:, None]).float(),
                (self.segment_uniform_sum / self.segment_prompts).float())


@contextmanager
def eager_attention(model) -> Iterator[None]:
    """Run ``model`` with transformers' eager attention inside the block; the previous one comes back, on error too.

    The one switch of ``headlab.kernels.attention_function`` does it, so a rollout inside a probe or an
    ``intervene`` block gives back exactly the implementation they set."""
    with other_attention(model, "eager"):
        yield


def head_mean_attention(loaded, input_ids: torch.Tensor) -> torch.Tensor:
    """``[layer, query, key]`` float64 head-averaged attention of one prompt (``input_ids [1, T]``, no padding).

    Reads the model's own eager probabilities (``output_attentions``), one layer at a time into the
    head mean; peak memory is the model's ``[layer, head, T, T]`` attentions of this one prompt.
    """
    if input_ids.shape[0] != 1:
        raise ValueError("head_mean_attention reads one unpadded prompt at a time")
    with torch.no_grad(), eager_attention(loaded.model):
        out = loaded.model(input_ids=input_ids.to(loaded.device), output_attentions=True)
    attentions = out.attentions
    if attentions is None or len(attentions) != loaded.arch.n_layers:
        raise ValueError(f"{loaded.name} returned no per-layer attentions for the rollout")
    return torch.stack([a[0].double().mean(0).cpu() for a in attentions])
