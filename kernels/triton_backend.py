"""The ``triton`` backend: fused attention with statistics on CUDA, O(batch·head·T) extra memory.

Host side of ``triton_kernels``: checks the inputs, derives the per-row and per-key counts that do not
depend on the head from the mask structure (prefix sums, O(batch·T)), launches the forward kernel
(output, lse, entropy, first-key mass, group masses), the optional group-output kernel and the column
kernel (mass received per key, distance profile), and assembles ``AttentionStats``.

A ``MaskSpec.row_mask`` (a model's own mask function, evaluated row block by row block on the host) has
no device-side form here, so such calls go to the torch backend; transformers' plain causal and
bidirectional masks arrive as structure and stay on Triton.
"""

from __future__ import annotations

import torch
import triton
from triton import knobs

from headlab.errors import InputError

from . import triton_kernels as kern
from .stats import AttentionStats, MaskSpec, StatsRequest, column_rows, distance_shape
from .torch_backend import torch_attention_with_stats

# Whether the kernels above were decorated for the interpreter (TRITON_INTERPRET=1 at import).
INTERPRETED = bool(knobs.runtime.interpret)


def _block_sizes(head_dim: int, on_gpu: bool) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): 64 x 64 tiles on a GPU (32 keys at head_dim > 128, to stay in registers);
    16 x 16 under the interpreter, where each program is numpy and small tiles keep tests fast."""
    if not on_gpu:
        return 16, 16
    return 64, 64 if head_dim <= 128 else 32


def _check_device(q: torch.Tensor) -> None:
    if q.device.type == "cuda" and not INTERPRETED:
        return
    if q.device.type == "cpu" and INTERPRETED:
        return
    if INTERPRETED:
        raise InputError("the triton backend was imported with TRITON_INTERPRET=1 and runs on CPU tensors only; "
                         f"got {q.device} tensors: unset TRITON_INTERPRET for GPU runs")
    raise InputError(f"the triton backend needs CUDA tensors, got {q.device}: use backend 'torch' (the default "
                     "off GPU), or set TRITON_INTERPRET=1 before importing headlab to test the kernels on CPU")


def rows_seeing_keys(mask: MaskSpec, padding: torch.Tensor | None, batch: int, n_q: int, n_k: int,
                     device: torch.device) -> torch.Tensor:
    """``[batch, query]`` whether each row has at least one visible key (structured masks only)."""
    rows = torch.arange(n_q, device=device) + mask.q_offset
    lo = (rows - mask.window + 1).clamp(0, n_k) if mask.window is not None else torch.zeros_like(rows)
    hi = (rows + 1).clamp(0, n_k) if mask.causal else torch.full_like(rows, n_k)
    hi = torch.maximum(hi, lo)
    if padding is None:
        return (hi > lo).expand(batch, -1)
    cum = torch.nn.functional.pad(padding.long().cumsum(-1), (1, 0))  # [batch, key + 1]
    return (cum[:, hi] - cum[:, lo]) > 0


def visible_query_counts(mask: MaskSpec, padding: torch.Tensor | None, columns: torch.Tensor,
                         n_k: int) -> torch.Tensor:
    """``[batch, key]`` number of rows in ``columns`` ``[batch, query]`` that can see each key."""
    batch, n_q = columns.shape
    keys = torch.arange(n_k, device=columns.device)
    # Key j is visible to rows i with i >= j - q_offset (causal) and i < j + window - q_offset (window).
    lo = (keys - mask.q_offset).clamp(0, n_q) if mask.causal else torch.zeros_like(keys)
    hi = (keys + mask.window - mask.q_offset).clamp(0, n_q) if mask.window is not None else torch.full_like(keys, n_q)
    hi = torch.maximum(hi, lo)
    cum = torch.nn.functional.pad(columns.long().cumsum(-1), (1, 0))  # [batch, query + 1]
    counts = (cum[:, hi] - cum[:, lo]).float()
    return counts if padding is None else counts * padding


def triton_attention_with_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: MaskSpec,
    scale: float,
    sinks: torch.Tensor | None = None,
    request: StatsRequest | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, AttentionStats]:
    """q ``[batch, head, query, dim]``, k/v ``[batch, kv_head, key, dim]`` -> ``[batch, head, query, dim_v]``."""
    if mask.row_mask is not None:
        # No device-side form of an arbitrary mask callback: the chunked torch path handles it exactly.
        return torch_attention_with_stats(q, k, v, mask, scale, sinks, request=request)
    _check_device(q)
    batch, n_heads, n_q, head_dim = q.shape
    n_kv, n_k, dim_v = k.shape[1], k.shape[2], v.shape[-1]
    if n_heads % n_kv:
        raise InputError(f"{n_heads} query heads cannot share {n_kv} kv heads evenly")
    if request is not None:
        request.check(batch, n_q, n_k, mask.q_offset)
    device = q.device
    default_m, default_n = _block_sizes(max(head_dim, dim_v), device.type == "cuda")
    block_m, block_n = block_m or default_m, block_n or default_n
    precision = "ieee" if q.dtype == torch.float32 else "tf32"

    padding = None
    if mask.key_padding is not None:
        padding = mask.key_padding.to(device=device, dtype=torch.bool).expand(batch, -1).contiguous()
    pad_arg = padding.to(torch.int8) if padding is not None else torch.empty(1, dtype=torch.int8, device=device)
    first_key = mask.first_key(batch, device)
    n_groups = request.group_count() if request is not None else 0
    labels = request.labels(batch, device) if n_groups else None
    labels_arg = labels if labels is not None else torch.empty(1, dtype=torch.int32, device=device)
    sinks_arg = sinks.float().contiguous() if sinks is not None else torch.empty(1, device=device)
    window = mask.window if mask.window is not None else 0
    flags = dict(GROUP=n_heads // n_kv, CAUSAL=mask.causal, HAS_WINDOW=mask.window is not None,
                 HAS_PAD=padding is not None)
    dims = dict(HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=precision,
                UPCAST=INTERPRETED and q.dtype == torch.bfloat16)
    q_strides, k_strides, v_strides = q.stride(), k.stride(), v.stride()

    out = torch.empty(batch, n_heads, n_q, dim_v, dtype=q.dtype, device=device)
    lse = torch.empty(batch, n_heads, n_q, dtype=torch.float32, device=device)
    entropy = torch.empty_like(lse)
    first_mass = torch.empty_like(lse)
    group_mass = torch.empty(batch, n_heads, n_q, max(n_groups, 1), dtype=torch.float32, device=device)
    q_grid = (triton.cdiv(n_q, block_m), batch * n_heads)
    kern.forward_kernel[q_grid](
        q, k, v, out, lse, entropy, first_mass, group_mass, pad_arg, first_key.to(torch.int32), labels_arg,
        sinks_arg, *q_strides, *k_strides, *v_strides, n_heads, n_q, n_k, mask.q_offset, window, scale,
        HAS_SINK=sinks is not None, N_GROUPS=n_groups, G_PAD=max(16, triton.next_power_of_2(max(n_groups, 1))),
        DIM_V=dim_v, BLOCK_DV=max(16, triton.next_power_of_2(dim_v)), **flags, **dims,
    )

    group_out = None
    if request is not None and request.group_outputs and n_groups:
        group_out = torch.empty(batch, n_heads, n_q, n_groups, dim_v, dtype=q.dtype, device=device)
        kern.group_output_kernel[q_grid + (n_groups,)](
            q, k, v, lse, group_out, pad_arg, labels_arg, *q_strides, *k_strides, *v_strides,
            n_heads, n_q, n_k, mask.q_offset, window, scale, N_GROUPS=n_groups, DIM_V=dim_v,
            BLOCK_DV=max(16, triton.next_power_of_2(dim_v)), **flags, **dims,
        )

    row_counted = mask.rows_counted(0, n_q, batch, device) & rows_seeing_keys(mask, padding, batch, n_q, n_k, device)
    columns = column_rows(row_counted, request, mask.q_offset)
    distance = request is not None and request.distance
    n_bins = distance_shape(n_q, n_k, mask.q_offset) if distance else 1
    bins_pad = triton.next_power_of_2(2 * n_bins)
    n_key_blocks = triton.cdiv(n_k, block_n)
    key_mass = torch.empty(batch, n_heads, n_k, dtype=torch.float32, device=device)
    dist_mass = torch.zeros(batch, n_heads, n_key_blocks if distance else 1, bins_pad, device=device)
    dist_count = torch.zeros(batch, n_key_blocks if distance else 1, bins_pad, device=device)
    kern.column_kernel[(n_key_blocks, batch * n_heads)](
        q, k, lse, columns.to(torch.int8).contiguous(), pad_arg, key_mass, dist_mass, dist_count,
        *q_strides, *k_strides, n_heads, n_q, n_k, mask.q_offset, window, scale, n_bins, n_key_blocks,
        DISTANCE=distance, BINS_PAD=bins_pad, **flags, **dims,
    )

    stats = AttentionStats(
        lse=lse,
        entropy=entropy,
        key_mass=key_mass,
        key_count=visible_query_counts(mask, padding, columns, n_k),
        first_mass=first_mass,
        row_counted=row_counted,
        first_key=first_key,
        distance_mass=dist_mass.sum(2)[..., : 2 * n_bins].view(batch, n_heads, 2, n_bins) if distance else None,
        distance_count=dist_count.sum(1)[..., : 2 * n_bins].view(batch, 2, n_bins) if distance else None,
        group_mass=group_mass if n_groups else None,
        group_out=group_out,
    )
    return out, stats
