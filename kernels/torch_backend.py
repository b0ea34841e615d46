"""The fast path on any device: query chunks, never the full T x T.

Peak extra memory is O(batch · head · chunk · key): one chunk of scores at a time. GQA runs on the
kv heads directly (queries of a group are stacked), so K and V are never expanded.
"""

from __future__ import annotations

import os

import torch

from .stats import AttentionStats, MaskSpec

# Scores, probabilities and one temporary per chunk, fp32.
_BYTES_PER_SCORE = 3 * 4
DEFAULT_CHUNK_BYTES = 256 * 2**20


def pick_chunk_size(batch: int, n_heads: int, n_keys: int, chunk_bytes: int | None = None) -> int:
    """Largest query chunk whose scores fit in ``chunk_bytes`` (env ``HEADLAB_CHUNK_BYTES``)."""
    budget = chunk_bytes or int(os.environ.get("HEADLAB_CHUNK_BYTES", DEFAULT_CHUNK_BYTES))
    return max(1, budget // (_BYTES_PER_SCORE * batch * n_heads * max(n_keys, 1)))


def torch_attention_with_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: MaskSpec,
    scale: float,
    sinks: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, AttentionStats]:
    """q ``[batch, head, query, dim]``, k/v ``[batch, kv_head, key, dim]`` -> output ``[batch, head, query, dim_v]``."""
    batch, n_heads, n_q, _ = q.shape
    n_kv, n_k, dim_v = k.shape[1], k.shape[2], v.shape[-1]
    group = n_heads // n_kv
    device = q.device
    chunk = chunk_size or pick_chunk_size(batch, n_heads, n_k)

    # [batch, kv_head, group, query, dim]: the heads sharing one kv head sit together.
    q_grouped = q.view(batch, n_kv, group, n_q, -1)
    k_t = k.float().transpose(-1, -2)  # [batch, kv_head, dim, key]
    v_f = v.float()
    sink_logits = None if sinks is None else sinks.float().view(1, n_heads, 1)
    first_key = mask.first_key(batch, device)
    first = first_key.view(batch, 1, 1, 1).expand(batch, n_heads, -1, 1)

    out = torch.empty(batch, n_heads, n_q, dim_v, dtype=q.dtype, device=device)
    lse = torch.empty(batch, n_heads, n_q, dtype=torch.float32, device=device)
    entropy = torch.empty_like(lse)
    first_mass = torch.empty_like(lse)
    key_mass = torch.zeros(batch, n_heads, n_k, dtype=torch.float32, device=device)
    key_count = torch.zeros(batch, n_k, dtype=torch.float32, device=device)
    row_counted = torch.empty(batch, n_q, dtype=torch.bool, device=device)

    for start in range(0, n_q, chunk):
        stop = min(start + chunk, n_q)
        rows = stop - start
        q_chunk = q_grouped[:, :, :, start:stop].float().reshape(batch, n_kv, group * rows, -1)
        scores = (q_chunk @ k_t).view(batch, n_heads, rows, n_k) * scale
        allowed = mask.allowed(start, stop, n_k, device)  # [batch or 1, 1, rows, key]
        scores = scores.masked_fill(~allowed, float("-inf"))

        row_lse = torch.logsumexp(scores, dim=-1)  # [batch, head, rows]
        if sink_logits is not None:
            row_lse = torch.logaddexp(row_lse, sink_logits.expand_as(row_lse))
        # A row that sees no key (padding) has lse = -inf: its probabilities are all zero, not NaN.
        safe_lse = torch.where(torch.isfinite(row_lse), row_lse, torch.zeros_like(row_lse))
        probs = torch.exp(scores - safe_lse[..., None])

        out_chunk = probs.view(batch, n_kv, group * rows, n_k) @ v_f
        out[:, :, start:stop] = out_chunk.view(batch, n_heads, rows, dim_v).to(q.dtype)
        lse[:, :, start:stop] = row_lse
        entropy[:, :, start:stop] = torch.special.entr(probs).sum(-1)
        first_mass[:, :, start:stop] = probs.gather(-1, first.expand(-1, -1, rows, -1))[..., 0]

        counted = mask.rows_counted(start, stop, batch, device) & allowed.any(dim=-1)[:, 0]
        row_counted[:, start:stop] = counted
        key_mass += (probs * counted[:, None, :, None]).sum(dim=2)
        key_count += (allowed[:, 0] & counted[:, :, None]).sum(dim=1)

    stats = AttentionStats(lse, entropy, key_mass, key_count, first_mass, row_counted, first_key)
    return out, stats
