"""The fast path on any device: query chunks, never the full T x T.

Peak extra memory is O(batch · head · chunk · key): one chunk of scores at a time. GQA runs on the
kv heads directly (queries of a group are stacked), so K and V are never expanded. Under a causal
mask (and a sliding window) each chunk only reads the keys its rows can see.
"""

from __future__ import annotations

import os

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

# Two fp32 buffers per chunk (scores, probabilities). A small budget keeps each chunk in cache and
# lets the allocator reuse memory: measured on CPU, 256 MiB chunks were ~2x slower than 16 MiB.
_BYTES_PER_SCORE = 2 * 4
DEFAULT_CHUNK_BYTES = 16 * 2**20
MIN_CHUNK = 16
# Finite stand-in for -inf: exp() gives exactly 0 and 0 * _MASKED stays finite (no NaN in p · s).
_MASKED = torch.finfo(torch.float32).min


def pick_chunk_size(batch: int, n_heads: int, n_keys: int, chunk_bytes: int | None = None) -> int:
    """Query rows per chunk so that the scores fit in ``chunk_bytes`` (env ``HEADLAB_CHUNK_BYTES``)."""
    budget = chunk_bytes or int(os.environ.get("HEADLAB_CHUNK_BYTES", DEFAULT_CHUNK_BYTES))
    return max(MIN_CHUNK, budget // (_BYTES_PER_SCORE * batch * n_heads * max(n_keys, 1)))


def visible_keys(mask: MaskSpec, start: int, stop: int, n_keys: int) -> tuple[int, int]:
    """The key range [lo, hi) that query rows [start, stop) can see at most."""
    hi = min(n_keys, stop + mask.q_offset) if mask.causal else n_keys
    lo = max(0, start + mask.q_offset - mask.window + 1) if mask.window is not None else 0
    return min(lo, hi), max(hi, 0)


# Per-key coefficients [batch, head, key] (mult, add_abs) and the edited rows [batch, query] or None.
_EditTables = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def edit_tables(edit: ScoreEdit, batch: int, device: torch.device) -> _EditTables:
    """What each chunk reads of a ``ScoreEdit``, built once per call: O(batch·head·key), never T x T."""
    mult, add = edit.coefficients(batch, device)
    return mult, add, edit.row_flags(batch, device)


def edit_chunk(scores: torch.Tensor, tables: _EditTables, start: int, stop: int, lo: int, hi: int) -> torch.Tensor:
    """Edited scaled scores ``[batch, head, rows, width]`` of query rows [start, stop) and keys [lo, hi)."""
    mult, add, rows = tables
    # |s| · add + s · mult, with one chunk-sized temporary (the scores are only read).
    edited = scores.abs().mul_(add[:, :, None, lo:hi]).addcmul_(scores, mult[:, :, None, lo:hi])
    if rows is None:
        return edited
    return torch.where(rows[:, None, start:stop, None], edited, scores)


def torch_attention_with_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: MaskSpec,
    scale: float,
    sinks: torch.Tensor | None = None,
    request: StatsRequest | None = None,
    chunk_size: int | None = None,
    score_edit: ScoreEdit | None = None,
) -> tuple[torch.Tensor, AttentionStats]:
    """q ``[batch, head, query, dim]``, k/v ``[batch, kv_head, key, dim]`` -> ``[batch, head, query, dim_v]``.

    ``score_edit`` edits each chunk's scaled scores before masking; every statistic describes the edited
    attention."""
    batch, n_heads, n_q, _ = q.shape
    n_kv, n_k, dim_v = k.shape[1], k.shape[2], v.shape[-1]
    if score_edit is not None:
        score_edit.check(batch, n_heads, n_q, n_k)
    group = n_heads // n_kv
    device = q.device
    chunk = chunk_size or pick_chunk_size(batch, n_heads, n_k)

    # [batch, kv_head, group, query, dim]: the heads sharing one kv head sit together.
    q_grouped = q.view(batch, n_kv, group, n_q, -1)
    k_t = k.float().transpose(-1, -2)  # [batch, kv_head, dim, key]
    v_f = v.float()
    sink_logits = None if sinks is None else sinks.float().view(1, n_heads, 1)
    first_key = mask.first_key(batch, device)

    out = torch.zeros(batch, n_heads, n_q, dim_v, dtype=q.dtype, device=device)
    lse = torch.full((batch, n_heads, n_q), float("-inf"), dtype=torch.float32, device=device)
    entropy = torch.zeros_like(lse)
    first_mass = torch.zeros_like(lse)
    key_mass = torch.zeros(batch, n_heads, n_k, dtype=torch.float32, device=device)
    key_count = torch.zeros(batch, n_k, dtype=torch.float32, device=device)
    row_counted = torch.zeros(batch, n_q, dtype=torch.bool, device=device)
    if request is not None:
        request.check(batch, n_q, n_k, mask.q_offset)
    edit = None if score_edit is None else edit_tables(score_edit, batch, device)
    n_groups = request.group_count() if request is not None else 0
    onehot = group_mass = group_out = None
    if n_groups:
        onehot = group_onehot(request.labels(batch, device), n_groups)  # [batch, key, group]
        group_mass = torch.zeros(batch, n_heads, n_q, n_groups, dtype=torch.float32, device=device)
        if request.group_outputs:
            group_out = torch.zeros(batch, n_heads, n_q, n_groups, dim_v, dtype=q.dtype, device=device)
    distance_mass = distance_count = None
    if request is not None and request.distance:
        n_bins = distance_shape(n_q, n_k, mask.q_offset)
        distance_mass = torch.zeros(batch, n_heads, 2, n_bins, dtype=torch.float32, device=device)
        distance_count = torch.zeros(batch, 2, n_bins, dtype=torch.float32, device=device)

    for start in range(0, n_q, chunk):
        stop = min(start + chunk, n_q)
        rows = stop - start
        lo, hi = visible_keys(mask, start, stop, n_k)
        if hi <= lo:
            continue  # these rows see no key: output 0, lse -inf, nothing counted
        width = hi - lo
        q_chunk = q_grouped[:, :, :, start:stop].float().reshape(batch, n_kv, group * rows, -1)
        scores = (q_chunk @ k_t[..., lo:hi]).view(batch, n_heads, rows, width).mul_(scale)
        if edit is not None:
            scores = edit_chunk(scores, edit, start, stop, lo, hi)
        allowed = mask.allowed(start, stop, n_k, device)[..., lo:hi]  # [batch or 1, 1, rows, width]
        scores.masked_fill_(~allowed, _MASKED)
        sees_any = allowed.any(dim=-1).expand(batch, 1, rows)  # [batch, 1, rows]

        # A row without visible keys has lse -inf (or the sink's logit) and probabilities 0.
        row_lse = torch.logsumexp(scores, dim=-1).masked_fill_(~sees_any, float("-inf"))  # [batch, head, rows]
        if sink_logits is not None:
            row_lse = torch.logaddexp(row_lse, sink_logits.expand_as(row_lse))
        probs = torch.exp(scores - row_lse.nan_to_num(neginf=0.0)[..., None])

        out_chunk = probs.view(batch, n_kv, group * rows, width) @ v_f[:, :, lo:hi]
        out[:, :, start:stop] = out_chunk.view(batch, n_heads, rows, dim_v).to(q.dtype)
        lse[:, :, start:stop] = row_lse
        # Entropy over keys without a log per element: H = lse · sum(p) - sum(p · s).
        row_sum = probs.sum(-1)
        entropy[:, :, start:stop] = torch.where(
            sees_any, row_lse.nan_to_num(neginf=0.0) * row_sum - scores.mul_(probs).sum(-1), 0.0)
        first_in = (first_key >= lo) & (first_key < hi)
        first_idx = (first_key - lo).clamp(0, width - 1).view(batch, 1, 1, 1).expand(-1, n_heads, rows, 1)
        first_mass[:, :, start:stop] = probs.gather(-1, first_idx)[..., 0] * first_in.view(batch, 1, 1)

        if onehot is not None:
            members = onehot[:, None, lo:hi]  # [batch, 1, width, group]
            group_mass[:, :, start:stop] = probs @ members
            if group_out is not None:
                # [batch, head, rows, group, dim_v]: one masked product per group (few groups).
                for g in range(n_groups):
                    masked = (probs * members[..., g][:, :, None, :]).view(batch, n_kv, group * rows, width)
                    part = (masked @ v_f[:, :, lo:hi]).view(batch, n_heads, rows, dim_v)
                    group_out[:, :, start:stop, g] = part.to(q.dtype)

        counted = mask.rows_counted(start, stop, batch, device) & sees_any[:, 0]
        row_counted[:, start:stop] = counted
        counted = column_rows(counted, request, mask.q_offset + start)  # rows that add to the column sums
        weights = counted[:, None, None, :].to(probs.dtype).expand(batch, n_heads, 1, rows)
        key_mass[..., lo:hi] += (weights @ probs)[:, :, 0]
        pairs = allowed[:, 0] & counted[:, :, None]  # [batch, rows, width]
        key_count[:, lo:hi] += pairs.sum(dim=1)
        if distance_mass is not None:
            index = distance_index(start, stop, lo, hi, mask.q_offset, n_bins, device)
            add_distance(distance_mass.view(batch, n_heads, -1), distance_count.view(batch, -1),
                         probs * counted[:, None, :, None], pairs.expand(batch, -1, -1), index)

    stats = AttentionStats(lse, entropy, key_mass, key_count, first_mass, row_counted, first_key,
                           distance_mass, distance_count, group_mass, group_out)
    return out, stats
