"""Plain-torch code that runs inside an nnsight trace, locally or on a remote NDIF server.

A remote server executes only code whose imports it trusts (torch, numpy, math, collections, typing,
einops, pandas, enum …): not headlab, and not dataclasses, functools or abc. So this module imports
torch and math only (not even ``__future__``), defines functions only (no classes), returns plain dicts of
tensors, and is shipped to the server by value (``nnsight.register``). ``tests/test_nnsight_backend.py``
executes its source under an import hook that refuses every other module.

- ``attention_statistics``: given one attention call's q and k (after RoPE, as the model hands them
  to its attention function) and its mask, the O(H·T) statistics of ``headlab.kernels.AttentionStats``
  (log-sum-exp, entropy, key mass with its causal normaliser, first-key mass, distance profile),
  computed in chunks of query rows: peak memory is one ``[batch, head, chunk, key]`` tile, and only
  the statistics leave the server.
- ``edit_z``: one z-site edit (``[batch, query, head, d_head]``, the input of o_proj) in the form every
  z edit of headlab compiles to: z <- scale · z + shift on chosen (row, head) pairs.
"""

import math

import torch

DEFAULT_CHUNK_ROWS = 64
STAT_NAMES = ("lse", "entropy", "key_mass", "key_count", "first_mass", "row_counted", "first_key")


def distance_bins(distance: torch.Tensor) -> torch.Tensor:
    """Bin of non-negative integer distances: exact for 0..3, then two bins per octave (as headlab's kernels)."""
    mantissa, exponent = torch.frexp(distance.double())
    binned = 2 * (exponent.long() - 1) + (mantissa >= 0.75).long()
    return torch.where(distance < 2, distance.long(), binned)


def distance_bin_count(n_q: int, n_k: int, q_offset: int) -> int:
    """Bins per side of a call: the bin of the largest distance it can hold, plus one."""
    largest = max(n_k - 1, n_q - 1 + q_offset, 0)
    return int(distance_bins(torch.tensor(largest))) + 1


def visibility(mask, batch: int, start: int, stop: int, n_k: int, q_offset: int, causal: bool,
               key_padding, device) -> torch.Tensor:
    """``[batch, 1, rows, key]`` bool for query rows [start, stop): True = the row may attend to the key.

    ``mask``: what the model passed to its attention function: None (sdpa's causal shortcut), a bool
    mask (True = attend) or an additive float mask ``[batch or 1, 1, query, key]``, or a ``[batch, key]``
    padding mask (flash attention; the causal rule then applies). ``key_padding``
    ``[batch, key]`` (True = real token) is AND-ed in, so padding keys never count.
    """
    rows = stop - start
    if mask is not None and mask.dim() == 2:  # flash-attention style: a [batch, key] padding mask, causal rule
        padding = mask[:, :n_k].to(device=device, dtype=torch.bool)
        key_padding = padding if key_padding is None else key_padding.to(device=device, dtype=torch.bool) & padding
        mask = None
    if mask is None:
        query = torch.arange(start, stop, device=device)[:, None] + q_offset
        keys = torch.arange(n_k, device=device)[None, :]
        allowed = keys <= query if causal else torch.ones(rows, n_k, dtype=torch.bool, device=device)
        allowed = allowed[None, None].expand(batch, 1, rows, n_k)
    else:
        part = mask[:, :, start:stop, :n_k].to(device)
        if part.dtype != torch.bool:
            part = part > torch.finfo(part.dtype).min / 2
        allowed = part.expand(batch, 1, rows, n_k)
    if key_padding is not None:
        allowed = allowed & key_padding.to(device=device, dtype=torch.bool)[:, None, None, :n_k]
    return allowed


def attention_statistics(query: torch.Tensor, key: torch.Tensor, mask=None, scaling=None, key_padding=None,
                         sinks=None, causal: bool = True, distance: bool = False,
                         chunk_rows: int = DEFAULT_CHUNK_ROWS) -> dict:
    """The statistics of one attention call, without its ``[batch, head, query, key]`` probabilities.

    query ``[batch, head, query, dim]``; key ``[batch, kv_head, key, dim]`` (GQA: head h reads kv head
    h // (head / kv_head)); ``scaling``: the model's score scale (default dim^-0.5); ``sinks`` ``[head]``:
    learned sink logits in each row's denominator; ``causal``: the model's rule when ``mask`` is None.
    Query row r sits at key position r + (key - query). Returns a dict of fp32 tensors named as the
    fields of ``headlab.kernels.AttentionStats`` (``row_counted`` bool, ``first_key`` long).
    """
    with torch.no_grad():  # a remote server runs the trace body with autograd on
        return _statistics(query, key, mask, scaling, key_padding, sinks, causal, distance, chunk_rows)


def _statistics(query, key, mask, scaling, key_padding, sinks, causal, distance, chunk_rows) -> dict:
    batch, n_heads, n_q, dim = query.shape
    n_kv, n_k = key.shape[1], key.shape[2]
    group = n_heads // n_kv
    device = query.device
    scale = dim ** -0.5 if scaling is None else float(scaling)
    q_offset = n_k - n_q
    chunk_rows = max(1, int(chunk_rows))
    keys = key.float()

    if key_padding is None:
        first_key = torch.zeros(batch, dtype=torch.long, device=device)
        query_valid = torch.ones(batch, n_q, dtype=torch.bool, device=device)
    else:
        padding = key_padding.to(device=device, dtype=torch.bool)
        first_key = padding.int().argmax(dim=-1)
        query_valid = padding[:, q_offset:q_offset + n_q]

    lse = torch.empty(batch, n_heads, n_q, device=device)
    entropy = torch.empty(batch, n_heads, n_q, device=device)
    first_mass = torch.empty(batch, n_heads, n_q, device=device)
    row_counted = torch.empty(batch, n_q, dtype=torch.bool, device=device)
    key_mass = torch.zeros(batch, n_heads, n_k, device=device)
    key_count = torch.zeros(batch, n_k, device=device)
    n_bins = distance_bin_count(n_q, n_k, q_offset) if distance else 0
    distance_mass = torch.zeros(batch, n_heads, 2 * n_bins, device=device)
    distance_count = torch.zeros(batch, 2 * n_bins, device=device)
    sink_column = None if sinks is None else sinks.float().to(device).view(1, n_heads, 1, 1)

    for start in range(0, n_q, chunk_rows):
        stop = min(n_q, start + chunk_rows)
        rows = stop - start
        # GQA without expanding K: the query heads of one kv head are stacked along the rows.
        q = query[:, :, start:stop].float().reshape(batch, n_kv, group * rows, dim)
        scores = torch.matmul(q, keys.transpose(-1, -2)).reshape(batch, n_heads, rows, n_k) * scale
        allowed = visibility(mask, batch, start, stop, n_k, q_offset, causal, key_padding, device)
        scores = scores.masked_fill(~allowed, -math.inf)
        if sink_column is not None:
            scores = torch.cat([scores, sink_column.expand(batch, n_heads, rows, 1)], dim=-1)
        row_lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - row_lse[..., None]).nan_to_num(0.0)[..., :n_k]  # fully masked rows: 0
        counted = query_valid[:, start:stop] & allowed[:, 0].any(dim=-1)  # [batch, rows]
        weight = counted[:, None, :, None].float()

        lse[:, :, start:stop] = row_lse
        entropy[:, :, start:stop] = torch.special.entr(probs).sum(-1)
        first_mass[:, :, start:stop] = probs.gather(
            -1, first_key.view(batch, 1, 1, 1).expand(batch, n_heads, rows, 1))[..., 0]
        row_counted[:, start:stop] = counted
        key_mass += (probs * weight).sum(dim=2)
        pairs = allowed[:, 0] & counted[:, :, None]  # [batch, rows, key]
        key_count += pairs.sum(dim=1).float()
        if distance:
            signed = (torch.arange(start, stop, device=device)[:, None] + q_offset) - \
                torch.arange(n_k, device=device)[None, :]
            index = ((signed < 0).long() * n_bins + distance_bins(signed.abs())).reshape(1, -1)
            distance_mass.view(batch * n_heads, -1).scatter_add_(
                1, index.expand(batch * n_heads, -1), (probs * weight).reshape(batch * n_heads, -1))
            distance_count.scatter_add_(1, index.expand(batch, -1), pairs.reshape(batch, -1).float())

    out = {"lse": lse, "entropy": entropy, "key_mass": key_mass, "key_count": key_count,
           "first_mass": first_mass, "row_counted": row_counted, "first_key": first_key}
    if distance:
        out["distance_mass"] = distance_mass.view(batch, n_heads, 2, n_bins)
        out["distance_count"] = distance_count.view(batch, 2, n_bins)
    return out


def edit_z(x: torch.Tensor, n_heads: int, selected: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
           scale_is_offset: bool = False) -> torch.Tensor:
    """o_proj's input ``[batch, query, head · d_head]`` with z <- scale · z + shift where ``selected``.

    ``selected`` ``[batch, query, head]`` bool; ``scale`` and ``shift`` broadcast to
    ``[batch, query, head, d_head]`` and are cast to z's dtype first; ``scale_is_offset``: the factor is
    1 + scale (LoFiT's (1 + A) ⊙ z + v), added in z's dtype as headlab's own edit does. Returns a new tensor.
    """
    z = x.reshape(x.shape[0], x.shape[1], n_heads, x.shape[-1] // n_heads)
    factor = scale.to(device=z.device, dtype=z.dtype)
    if scale_is_offset:
        factor = 1 + factor
    edited = z * factor + shift.to(device=z.device, dtype=z.dtype)
    return torch.where(selected.to(z.device)[..., None], edited, z).reshape(x.shape)
