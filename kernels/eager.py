"""The readable oracle: materialise the full ``[batch, head, query, key]`` probabilities, then reduce.

O(H·T²) memory; used by tests and for small T. The fast paths must agree with it.
"""

from __future__ import annotations

import torch

from .edits import ScoreEdit
from .stats import (
    AttentionStats,
    MaskSpec,
    StatsRequest,
    add_distance,
    column_rows,
    distance_index,
    distance_shape,
    group_onehot,
)


def expand_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``[batch, kv_head, key, dim]`` -> ``[batch, head, key, dim]`` (head h reads kv head h // group)."""
    return x.repeat_interleave(n_heads // x.shape[1], dim=1)


def attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    mask: MaskSpec,
    scale: float,
    sinks: torch.Tensor | None = None,
    score_edit: ScoreEdit | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full probabilities ``[batch, head, query, key]`` (fp32), log-sum-exp and visibility.

    ``score_edit`` edits the scaled scores before masking (the sinks' logits stay as they are)."""
    batch, n_heads, n_q, _ = q.shape
    n_k = k.shape[2]
    if score_edit is not None:
        score_edit.check(batch, n_heads, n_q, n_k)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), expand_kv(k, n_heads).float()) * scale
    if score_edit is not None:
        scores = score_edit.apply(scores, 0, 0, n_k)
    allowed = mask.allowed(0, n_q, n_k, q.device).expand(batch, 1, n_q, n_k)
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        sink_col = sinks.float().view(1, n_heads, 1, 1).expand(batch, n_heads, n_q, 1)
        scores = torch.cat([scores, sink_col], dim=-1)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)[..., :n_k]
    return probs, lse, allowed


def stats_from_probs(probs: torch.Tensor, mask: MaskSpec, lse: torch.Tensor | None = None,
                     request: StatsRequest | None = None) -> AttentionStats:
    """Reduce materialised probabilities ``[batch, head, query, key]`` into ``AttentionStats``.

    Also the bridge from other sources of probabilities (``output_attentions``) to the same numbers.
    """
    batch, n_heads, n_q, n_k = probs.shape
    probs = probs.float()
    allowed = mask.allowed(0, n_q, n_k, probs.device).expand(batch, 1, n_q, n_k)
    counted = mask.rows_counted(0, n_q, batch, probs.device) & allowed.any(dim=-1)[:, 0]
    if request is not None:
        request.check(batch, n_q, n_k, mask.q_offset)
    columns = column_rows(counted, request, mask.q_offset)  # rows summed into the column statistics
    weight = columns[:, None, :, None].float()
    first = mask.first_key(batch, probs.device)
    if lse is None:
        lse = torch.full((batch, n_heads, n_q), float("nan"), device=probs.device)
    distance_mass = distance_count = None
    if request is not None and request.distance:
        n_bins = distance_shape(n_q, n_k, mask.q_offset)
        distance_mass = torch.zeros(batch, n_heads, 2, n_bins, device=probs.device)
        distance_count = torch.zeros(batch, 2, n_bins, device=probs.device)
        index = distance_index(0, n_q, 0, n_k, mask.q_offset, n_bins, probs.device)
        add_distance(distance_mass.view(batch, n_heads, -1), distance_count.view(batch, -1), probs * weight,
                     allowed[:, 0] & columns[:, :, None], index)
    group_mass = None
    if request is not None and request.key_groups is not None:
        onehot = group_onehot(request.labels(batch, probs.device), request.group_count())
        group_mass = torch.einsum("bhqk,bkg->bhqg", probs, onehot)
    return AttentionStats(
        lse=lse.float(),
        entropy=torch.special.entr(probs).sum(-1),
        key_mass=(probs * weight).sum(dim=2),
        key_count=(allowed[:, 0] & columns[:, :, None]).sum(dim=1).float(),
        first_mass=probs.gather(-1, first.view(batch, 1, 1, 1).expand(batch, n_heads, n_q, 1))[..., 0],
        row_counted=counted,
        first_key=first,
        distance_mass=distance_mass,
        distance_count=distance_count,
        group_mass=group_mass,
    )


def eager_attention_with_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: MaskSpec,
    scale: float,
    sinks: torch.Tensor | None = None,
    request: StatsRequest | None = None,
    score_edit: ScoreEdit | None = None,
) -> tuple[torch.Tensor, AttentionStats]:
    """q ``[batch, head, query, dim]``, k/v ``[batch, kv_head, key, dim]`` -> output ``[batch, head, query, dim_v]``.

    Every statistic describes the attention after ``score_edit`` (if given)."""
    probs, lse, _ = attention_probs(q, k, mask, scale, sinks, score_edit)
    v_full = expand_kv(v, q.shape[1]).float()
    out = torch.einsum("bhqk,bhkd->bhqd", probs, v_full).to(q.dtype)
    stats = stats_from_probs(probs, mask, lse, request)
    if request is not None and request.group_outputs:
        n_groups = request.group_count()
        onehot = group_onehot(request.labels(q.shape[0], q.device), n_groups)
        wanted = request.output_mask(n_groups, q.device)
        if wanted is not None:  # groups not asked for read as 0, as on every backend
            onehot = onehot * wanted.float()
        stats.group_out = torch.einsum("bhqk,bkg,bhkd->bhqgd", probs, onehot, v_full).to(q.dtype)
    return out, stats
