"""The ``triton`` backend: fused attention with statistics on CUDA, O(batch·head·T) extra memory.

Host side of ``triton_kernels``: checks the inputs, derives the per-row and per-key counts that do not
depend on the head from the mask structure (prefix sums, O(batch·T)), launches the forward kernel
(output, lse, entropy, first-key mass, group masses), the optional group-output kernel and the column
kernel (mass received per key, distance profile), and assembles ``AttentionStats``. A ``ScoreEdit``
reaches all three as per-(batch, head, key) coefficients and a per-(batch, query) row flag, O(batch·head·T).

A ``MaskSpec.row_mask`` (a model's own mask function, evaluated row block by row block on the host) has
no device-side form here, so such calls go to the torch backend; transformers' plain causal and
bidirectional masks arrive as structure and stay on Triton.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

from headlab.errors import InputError

from . import triton_kernels as kern
from .edits import ScoreEdit
from .stats import AttentionStats, MaskSpec, StatsRequest, column_rows, distance_shape
from .torch_backend import torch_attention_with_stats


def _interpreting() -> bool:
    """Whether ``triton.jit`` decorates for the interpreter now (``triton.knobs``, or the variable in older triton)."""
    try:
        from triton import knobs
    except ImportError:
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return bool(knobs.runtime.interpret)


# Whether the kernels of ``triton_kernels`` were decorated for the interpreter (TRITON_INTERPRET=1 at import).
INTERPRETED = _interpreting()


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


@dataclass
class _Call:
    """One call's sizes and kernel arguments, shared by the three launches."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: MaskSpec
    scale: float
    sinks: torch.Tensor | None
    request: StatsRequest | None
    padding: torch.Tensor | None  # [batch, key] bool
    first_key: torch.Tensor  # [batch]
    n_groups: int
    args: dict  # pointer-free arguments and constexprs common to all kernels
    edit: ScoreEdit | None = None

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """(batch, head, query, key, dim_v)."""
        return (*self.q.shape[:3], self.k.shape[2], self.v.shape[-1])

    @property
    def block_m(self) -> int:
        return self.args["BLOCK_M"]

    @property
    def block_n(self) -> int:
        return self.args["BLOCK_N"]

    def pad_arg(self) -> torch.Tensor:
        if self.padding is None:
            return torch.empty(1, dtype=torch.int8, device=self.q.device)
        return self.padding.to(torch.int8)

    def labels_arg(self) -> torch.Tensor:
        if not self.n_groups:
            return torch.empty(1, dtype=torch.int32, device=self.q.device)
        return self.request.labels(self.q.shape[0], self.q.device)

    def edit_args(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """EditMult, EditAdd ``[batch, head, key]`` fp32 and EditRows ``[batch, query]`` int8 (placeholders
        when absent: ``HAS_EDIT`` / ``EDIT_ROWS`` keep the kernels from reading them)."""
        device = self.q.device
        if self.edit is None:
            unused = torch.empty(1, dtype=torch.float32, device=device)
            return unused, unused, torch.empty(1, dtype=torch.int8, device=device)
        mult, add = self.edit.coefficients(self.q.shape[0], device)
        rows = self.edit.row_flags(self.q.shape[0], device)
        rows = torch.empty(1, dtype=torch.int8, device=device) if rows is None else rows.to(torch.int8)
        return mult, add, rows


def _prepare(q, k, v, mask: MaskSpec, scale: float, sinks, request, block_m, block_n,
             score_edit: ScoreEdit | None = None) -> _Call:
    _check_device(q)
    batch, n_heads, n_q, head_dim = q.shape
    n_kv, n_k, dim_v = k.shape[1], k.shape[2], v.shape[-1]
    if n_heads % n_kv:
        raise InputError(f"{n_heads} query heads cannot share {n_kv} kv heads evenly")
    if request is not None:
        request.check(batch, n_q, n_k, mask.q_offset)
    if score_edit is not None:
        score_edit.check(batch, n_heads, n_q, n_k)
    default_m, default_n = _block_sizes(max(head_dim, dim_v), q.device.type == "cuda")
    padding = None
    if mask.key_padding is not None:
        padding = mask.key_padding.to(device=q.device, dtype=torch.bool).expand(batch, -1).contiguous()
    args = dict(
        GROUP=n_heads // n_kv, CAUSAL=mask.causal, HAS_WINDOW=mask.window is not None, HAS_PAD=padding is not None,
        HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_M=block_m or default_m, BLOCK_N=block_n or default_n,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=INTERPRETED and q.dtype == torch.bfloat16,
        HAS_EDIT=score_edit is not None, EDIT_ROWS=score_edit is not None and score_edit.rows is not None,
        # Untuned (no GPU was at hand when this was written): fewer pipeline stages for wide fp32 tiles so
        # that Q plus the staged K and V tiles fit in shared memory. The interpreter ignores launch options.
        num_stages=1 if q.element_size() * max(head_dim, dim_v) > 512 else 2,
    )
    n_groups = request.group_count() if request is not None else 0
    return _Call(q, k, v, mask, scale, sinks, request, padding, mask.first_key(batch, q.device), n_groups, args,
                 score_edit)


def _scalars(call: _Call, with_v: bool = True) -> tuple:
    """Strides and sizes in the order the kernels take them (after their pointers); the column kernel has no V."""
    mask = call.mask
    window = mask.window if mask.window is not None else 0
    v_strides = call.v.stride() if with_v else ()
    return (*call.q.stride(), *call.k.stride(), *v_strides, call.q.shape[1], call.q.shape[2],
            call.k.shape[2], mask.q_offset, window, call.scale)


def _launch_forward(call: _Call, edit: tuple) -> tuple[torch.Tensor, ...]:
    """Output ``[batch, head, query, dim_v]``, lse, entropy, first mass ``[batch, head, query]``, group mass;
    ``edit`` is ``_Call.edit_args()`` (shared with the later launches)."""
    batch, n_heads, n_q, _, dim_v = call.shape
    device = call.q.device
    out = torch.empty(batch, n_heads, n_q, dim_v, dtype=call.q.dtype, device=device)
    lse = torch.empty(batch, n_heads, n_q, dtype=torch.float32, device=device)
    entropy = torch.empty_like(lse)
    first_mass = torch.empty_like(lse)
    group_mass = torch.empty(batch, n_heads, n_q, max(call.n_groups, 1), dtype=torch.float32, device=device)
    sinks = call.sinks.float().contiguous() if call.sinks is not None else torch.empty(1, device=device)
    grid = (triton.cdiv(n_q, call.block_m), batch * n_heads)
    kern.forward_kernel[grid](
        call.q, call.k, call.v, out, lse, entropy, first_mass, group_mass, call.pad_arg(),
        call.first_key.to(torch.int32), call.labels_arg(), sinks, *edit, *_scalars(call),
        HAS_SINK=call.sinks is not None, N_GROUPS=call.n_groups,
        G_PAD=max(16, triton.next_power_of_2(max(call.n_groups, 1))),
        DIM_V=dim_v, BLOCK_DV=max(16, triton.next_power_of_2(dim_v)), **call.args,
    )
    return out, lse, entropy, first_mass, group_mass


def _launch_group_outputs(call: _Call, lse: torch.Tensor, edit: tuple) -> torch.Tensor:
    """Partial outputs ``[batch, head, query, group, dim_v]`` from the saved lse."""
    batch, n_heads, n_q, _, dim_v = call.shape
    group_out = torch.empty(batch, n_heads, n_q, call.n_groups, dim_v, dtype=call.q.dtype, device=call.q.device)
    grid = (triton.cdiv(n_q, call.block_m), batch * n_heads, call.n_groups)
    kern.group_output_kernel[grid](
        call.q, call.k, call.v, lse, group_out, call.pad_arg(), call.labels_arg(), *edit, *_scalars(call),
        N_GROUPS=call.n_groups, DIM_V=dim_v, BLOCK_DV=max(16, triton.next_power_of_2(dim_v)), **call.args,
    )
    return group_out


def _launch_columns(call: _Call, lse: torch.Tensor, columns: torch.Tensor, distance: bool, edit: tuple):
    """Key mass ``[batch, head, key]`` and, if asked, distance mass ``[batch, head, 2, bin]`` and counts."""
    batch, n_heads, n_q, n_k, _ = call.shape
    device = call.q.device
    n_bins = distance_shape(n_q, n_k, call.mask.q_offset) if distance else 1
    bins_pad = triton.next_power_of_2(2 * n_bins)
    n_key_blocks = triton.cdiv(n_k, call.block_n)
    key_mass = torch.empty(batch, n_heads, n_k, dtype=torch.float32, device=device)
    dist_mass = torch.zeros(batch, n_heads, n_key_blocks if distance else 1, bins_pad, device=device)
    dist_count = torch.zeros(batch, n_key_blocks if distance else 1, bins_pad, device=device)
    kern.column_kernel[(n_key_blocks, batch * n_heads)](
        call.q, call.k, lse, columns.to(torch.int8).contiguous(), call.pad_arg(), key_mass, dist_mass, dist_count,
        *edit, *_scalars(call, with_v=False), n_bins, n_key_blocks, DISTANCE=distance, BINS_PAD=bins_pad, **call.args,
    )
    if not distance:
        return key_mass, None, None
    return (key_mass, dist_mass.sum(2)[..., : 2 * n_bins].view(batch, n_heads, 2, n_bins),
            dist_count.sum(1)[..., : 2 * n_bins].view(batch, 2, n_bins))


def triton_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: MaskSpec, scale: float,
                   sinks: torch.Tensor | None = None,
                   score_edit: ScoreEdit | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward kernel alone (benchmarks): output ``[batch, head, query, dim_v]``, lse ``[batch, head, query]``."""
    call = _prepare(q, k, v, mask, scale, sinks, None, None, None, score_edit)
    out, lse, *_ = _launch_forward(call, call.edit_args())
    return out, lse


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
    score_edit: ScoreEdit | None = None,
) -> tuple[torch.Tensor, AttentionStats]:
    """q ``[batch, head, query, dim]``, k/v ``[batch, kv_head, key, dim]`` -> ``[batch, head, query, dim_v]``.

    ``score_edit`` is applied in every kernel's score tile; every statistic describes the edited attention."""
    if mask.row_mask is not None:
        # No device-side form of an arbitrary mask callback: the chunked torch path handles it exactly.
        return torch_attention_with_stats(q, k, v, mask, scale, sinks, request=request, score_edit=score_edit)
    call = _prepare(q, k, v, mask, scale, sinks, request, block_m, block_n, score_edit)
    batch, _, n_q, n_k, _ = call.shape
    edit = call.edit_args()  # built once, read by all three launches
    out, lse, entropy, first_mass, group_mass = _launch_forward(call, edit)
    group_out = None
    if request is not None and request.group_outputs and call.n_groups:
        group_out = _launch_group_outputs(call, lse, edit)
        wanted = request.output_mask(call.n_groups, q.device)
        if wanted is not None:  # every group is computed; those not asked for read as 0, as on every backend
            group_out = group_out * wanted.view(1, 1, 1, -1, 1).to(group_out.dtype)

    row_counted = mask.rows_counted(0, n_q, batch, q.device)
    row_counted = row_counted & rows_seeing_keys(mask, call.padding, batch, n_q, n_k, q.device)
    columns = column_rows(row_counted, request, mask.q_offset)
    distance = request is not None and request.distance
    key_mass, distance_mass, distance_count = _launch_columns(call, lse, columns, distance, edit)
    stats = AttentionStats(
        lse=lse,
        entropy=entropy,
        key_mass=key_mass,
        key_count=visible_query_counts(mask, call.padding, columns, n_k),
        first_mass=first_mass,
        row_counted=row_counted,
        first_key=call.first_key,
        distance_mass=distance_mass,
        distance_count=distance_count,
        group_mass=group_mass if call.n_groups else None,
        group_out=group_out,
    )
    return out, stats
