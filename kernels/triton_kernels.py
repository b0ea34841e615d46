"""The Triton programs behind the ``triton`` backend (launched from ``triton_backend``).

Three kernels, all with fp32 accumulators and K/V read per kv head (GQA is an index, never a copy):

- ``forward_kernel``: FlashAttention-2 style online softmax over key blocks, one program per
  (query block, batch·head). Besides the output it keeps, with the same rescaling as the row sum,
  ``sum p·(s - m)`` (entropy), the mass on the first real key and the mass per key group.
- ``group_output_kernel``: one program per (query block, batch·head, group); with the final lse
  known it sums ``exp(s - lse) · V`` over the keys of one group (partial outputs O_g).
- ``column_kernel``: the second pass, one program per (key block, batch·head), like the backward's
  dK/dV loop: it recomputes the scores of the queries that can see its keys from the saved lse
  (never reads V) and sums the mass each key receives, and by distance bin the mass and pair counts.

A ``ScoreEdit`` reaches every kernel that forms scores as per-(batch, head, key) coefficient vectors and a
per-(batch, query) row flag (``HAS_EDIT`` / ``EDIT_ROWS`` constexprs: without an edit the code is the plain
one); it is applied right after ``qk * scale``, before the mask, so all three kernels see the same
edited scores and every statistic describes the edited attention.

``TRITON_INTERPRET`` is read when ``triton.jit`` decorates, i.e. when this module is imported:
set it before the first import to run these kernels on CPU. The kernels call only triton's builtins
and jit functions of this module (reductions through ``tl.reduce``, no ``tl.sum``/``tl.zeros``): those
library helpers are themselves jit functions, decorated when torch first imports triton, so they would
not run under an interpreter switched on later.
"""

from __future__ import annotations

import triton
import triton.language as tl

# triton's own combiners (what tl.sum / tl.max / tl.min reduce with): the interpreter recognises them
# and reduces with numpy; a combiner of ours would make it loop element by element in Python.
_add = tl.standard._sum_combine
_max = tl.standard._elementwise_max
_min = tl.standard._elementwise_min


@triton.jit
def _mma(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` with fp32 accumulation. ``UPCAST`` (set for bf16 under the interpreter only): triton 3.9's
    interpreter multiplies bf16 tiles wrongly, so there the rounded bf16 values are multiplied in fp32."""
    if UPCAST:
        product = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        product = tl.dot(a, b, input_precision=PRECISION)
    return product


@triton.jit
def _tile(base, offs_rows, offs_cols, stride_row, stride_col, rows_ok, n_cols):
    """``[rows, cols]`` tile of a row-major view (Q rows x dims, V keys x dims); 0 outside."""
    return tl.load(base + offs_rows[:, None] * stride_row + offs_cols[None, :] * stride_col,
                   mask=rows_ok[:, None] & (offs_cols[None, :] < n_cols), other=0.0)


@triton.jit
def _tile_t(base, offs_rows, offs_cols, stride_row, stride_col, rows_ok, n_cols):
    """``[cols, rows]``: the transposed tile, loaded transposed (K as dims x keys for ``q @ k``); 0 outside."""
    return tl.load(base + offs_rows[None, :] * stride_row + offs_cols[:, None] * stride_col,
                   mask=rows_ok[None, :] & (offs_cols[:, None] < n_cols), other=0.0)


@triton.jit
def _visible(offs_m, offs_n, row_ok, key_ok, q_offset, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """``[BLOCK_M, BLOCK_N]`` visibility of a tile (MaskSpec's rule; padding is folded into ``key_ok``)."""
    pos = offs_m + q_offset  # absolute key position of each query row
    allowed = row_ok[:, None] & key_ok[None, :]
    if CAUSAL:
        allowed = allowed & (offs_n[None, :] <= pos[:, None])
    if HAS_WINDOW:
        allowed = allowed & (offs_n[None, :] > pos[:, None] - window)
    return allowed


@triton.jit
def _key_ok(Pad, b, offs_n, n_k, HAS_PAD: tl.constexpr):
    """``[BLOCK_N]`` keys that exist and are not padding."""
    ok = offs_n < n_k
    if HAS_PAD:
        ok = ok & (tl.load(Pad + b * n_k + offs_n, mask=ok, other=0) != 0)
    return ok


@triton.jit
def _key_range(q_start, q_stop, n_k, q_offset, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """Key blocks [lo, hi) that query rows [q_start, q_stop) can see at most (lo aligned to BLOCK_N)."""
    lo = 0
    hi = n_k
    if CAUSAL:
        hi = tl.minimum(n_k, q_stop + q_offset)
    if HAS_WINDOW:
        lo = tl.maximum(0, q_start + q_offset - window + 1)
        lo = (lo // BLOCK_N) * BLOCK_N
    return lo, hi


@triton.jit
def _edit_keys(EditMult, EditAdd, pid_bh, offs_n, in_range, n_k):
    """``[BLOCK_N]`` score edit coefficients (mult, add_abs) of these keys for one (batch, head); identity
    past the last key. EditMult/EditAdd are ``[batch, head, key]`` contiguous, so (b, h) is ``pid_bh``."""
    mult = tl.load(EditMult + pid_bh * n_k + offs_n, mask=in_range, other=1.0)
    add = tl.load(EditAdd + pid_bh * n_k + offs_n, mask=in_range, other=0.0)
    return mult, add


@triton.jit
def _edit_rows(EditRows, b, offs_m, row_ok, n_q, EDIT_ROWS: tl.constexpr):
    """``[BLOCK_M]`` query rows the edit applies to: all (``EDIT_ROWS`` off) or those flagged in
    EditRows ``[batch, query]``."""
    rows = row_ok
    if EDIT_ROWS:
        rows = rows & (tl.load(EditRows + b * n_q + offs_m, mask=row_ok, other=0) != 0)
    return rows


@triton.jit
def _edited(s, mult, add, rows):
    """``mult · s + add · |s|`` on the edited rows of a ``[BLOCK_M, BLOCK_N]`` tile of scaled scores."""
    return tl.where(rows[:, None], s * mult[None, :] + add[None, :] * tl.abs(s), s)


@triton.jit
def forward_kernel(
    Q, K, V, Out, Lse, Ent, FirstMass, GroupMass, Pad, FirstKey, Labels, Sinks, EditMult, EditAdd, EditRows,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    n_heads, n_q, n_k, q_offset, window, scale,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_PAD: tl.constexpr,
    HAS_SINK: tl.constexpr, N_GROUPS: tl.constexpr, G_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    HAS_EDIT: tl.constexpr, EDIT_ROWS: tl.constexpr,
):
    """Out ``[batch, head, query, dim_v]`` (contiguous), Lse/Ent/FirstMass ``[batch, head, query]``,
    GroupMass ``[batch, head, query, group]``; Pad/Labels ``[batch, key]``; FirstKey ``[batch]``; Sinks ``[head]``;
    EditMult/EditAdd ``[batch, head, key]``, EditRows ``[batch, query]`` (read only with ``HAS_EDIT``)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # int64 offsets: batch · head · T · dim can pass 2^31
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    kv_h = h // GROUP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < n_q
    q = _tile(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qm, stride_qd, row_ok, HEAD_DIM)
    k_base = K + b * stride_kb + kv_h * stride_kh
    v_base = V + b * stride_vb + kv_h * stride_vh
    first = tl.load(FirstKey + b)
    if HAS_EDIT:
        edit_rows = _edit_rows(EditRows, b, offs_m, row_ok, n_q, EDIT_ROWS)

    # Running max m, row sum l = sum exp(s - m), a = sum exp(s - m)·(s - m), all rescaled together.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    a_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    f_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_DV], 0.0, dtype=tl.float32)
    g_acc = tl.full([BLOCK_M, G_PAD], 0.0, dtype=tl.float32)

    q_start = pid_m * BLOCK_M
    lo, hi = _key_range(q_start, tl.minimum(q_start + BLOCK_M, n_q), n_k, q_offset, window,
                        CAUSAL, HAS_WINDOW, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_range = offs_n < n_k
        key_ok = _key_ok(Pad, b, offs_n, n_k, HAS_PAD)
        k = _tile_t(k_base, offs_n, offs_d, stride_kn, stride_kd, in_range, HEAD_DIM)  # [BLOCK_D, BLOCK_N]
        s = _mma(q, k, PRECISION, UPCAST) * scale
        if HAS_EDIT:
            mult, add = _edit_keys(EditMult, EditAdd, pid_bh, offs_n, in_range, n_k)
            s = _edited(s, mult, add, edit_rows)
        allowed = _visible(offs_m, offs_n, row_ok, key_ok, q_offset, window, CAUSAL, HAS_WINDOW)
        m_new = tl.maximum(m_i, tl.reduce(tl.where(allowed, s, float("-inf")), 1, _max))
        # A row that has seen no key yet keeps m = -inf; shift by 0 so nothing turns into NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        shifted = tl.where(allowed, s - m_safe[:, None], 0.0)
        p = tl.where(allowed, tl.exp(shifted), 0.0)
        # a is relative to m: moving m to m_new adds l·(m - m_new) before rescaling (l = 0 while m = -inf).
        a_i = alpha * (a_i + l_i * (tl.where(m_i == float("-inf"), m_safe, m_i) - m_safe))
        a_i += tl.reduce(p * shifted, 1, _add)
        l_i = l_i * alpha + tl.reduce(p, 1, _add)
        f_i = f_i * alpha + tl.reduce(tl.where(offs_n[None, :] == first, p, 0.0), 1, _add)

        v = _tile(v_base, offs_n, offs_dv, stride_vn, stride_vd, in_range, DIM_V)  # [BLOCK_N, BLOCK_DV]
        acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, PRECISION, UPCAST)
        if N_GROUPS > 0:
            labels = tl.load(Labels + b * n_k + offs_n, mask=in_range, other=-1)
            members = (labels[:, None] == tl.arange(0, G_PAD)[None, :]).to(tl.float32)  # [BLOCK_N, G_PAD]
            g_acc = g_acc * alpha[:, None] + tl.dot(p, members, input_precision="ieee")
        m_i = m_new

    if HAS_SINK:
        # The sink is one more logit in the denominator, with no value and no entropy term of its own.
        sink = tl.load(Sinks + h).to(tl.float32)
        m_fin = tl.maximum(m_i, sink)
        alpha = tl.exp(m_i - m_fin)
        a_i = alpha * (a_i + l_i * (tl.where(m_i == float("-inf"), m_fin, m_i) - m_fin))
        l_i = l_i * alpha
        f_i = f_i * alpha
        acc = acc * alpha[:, None]
        g_acc = g_acc * alpha[:, None]
        denom = l_i + tl.exp(sink - m_fin)
        m_i = m_fin
    else:
        denom = l_i

    sees = denom > 0
    denom_safe = tl.where(sees, denom, 1.0)
    log_denom = tl.log(denom_safe)
    lse = tl.where(sees, m_i + log_denom, float("-inf"))
    # H = sum_k p_k (lse - s_k) = (log(denom)·l - a) / denom with p_k = exp(s_k - m) / denom.
    entropy = tl.where(sees, (log_denom * l_i - a_i) / denom_safe, 0.0)

    row_index = pid_bh * n_q + offs_m
    tl.store(Lse + row_index, lse, mask=row_ok)
    tl.store(Ent + row_index, entropy, mask=row_ok)
    tl.store(FirstMass + row_index, f_i / denom_safe, mask=row_ok)
    out = acc / denom_safe[:, None]
    tl.store(Out + row_index[:, None] * DIM_V + offs_dv[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < DIM_V))
    if N_GROUPS > 0:
        offs_g = tl.arange(0, G_PAD)
        tl.store(GroupMass + row_index[:, None] * N_GROUPS + offs_g[None, :], g_acc / denom_safe[:, None],
                 mask=row_ok[:, None] & (offs_g[None, :] < N_GROUPS))


@triton.jit
def group_output_kernel(
    Q, K, V, Lse, GroupOut, Pad, Labels, EditMult, EditAdd, EditRows,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    n_heads, n_q, n_k, q_offset, window, scale,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_PAD: tl.constexpr,
    N_GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, HAS_EDIT: tl.constexpr, EDIT_ROWS: tl.constexpr,
):
    """GroupOut ``[batch, head, query, group, dim_v]`` (contiguous) from the saved Lse ``[batch, head, query]``
    (of the edited scores, which are recomputed here with the same ``EditMult/EditAdd/EditRows``)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # int64 offsets: batch · head · T · dim can pass 2^31
    g = tl.program_id(2)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    kv_h = h // GROUP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < n_q
    q = _tile(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qm, stride_qd, row_ok, HEAD_DIM)
    lse = tl.load(Lse + pid_bh * n_q + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + kv_h * stride_kh
    v_base = V + b * stride_vb + kv_h * stride_vh
    acc = tl.full([BLOCK_M, BLOCK_DV], 0.0, dtype=tl.float32)
    if HAS_EDIT:
        edit_rows = _edit_rows(EditRows, b, offs_m, row_ok, n_q, EDIT_ROWS)

    q_start = pid_m * BLOCK_M
    lo, hi = _key_range(q_start, tl.minimum(q_start + BLOCK_M, n_q), n_k, q_offset, window,
                        CAUSAL, HAS_WINDOW, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_range = offs_n < n_k
        labels = tl.load(Labels + b * n_k + offs_n, mask=in_range, other=-1)
        key_ok = _key_ok(Pad, b, offs_n, n_k, HAS_PAD) & (labels == g)
        k = _tile_t(k_base, offs_n, offs_d, stride_kn, stride_kd, in_range, HEAD_DIM)
        s = _mma(q, k, PRECISION, UPCAST) * scale
        if HAS_EDIT:
            mult, add = _edit_keys(EditMult, EditAdd, pid_bh, offs_n, in_range, n_k)
            s = _edited(s, mult, add, edit_rows)
        allowed = _visible(offs_m, offs_n, row_ok, key_ok, q_offset, window, CAUSAL, HAS_WINDOW)
        p = tl.where(allowed, tl.exp(s - lse[:, None]), 0.0)
        v = _tile(v_base, offs_n, offs_dv, stride_vn, stride_vd, in_range, DIM_V)
        acc += _mma(p.to(v.dtype), v, PRECISION, UPCAST)

    out_rows = (pid_bh * n_q + offs_m) * N_GROUPS + g
    tl.store(GroupOut + out_rows[:, None] * DIM_V + offs_dv[None, :], acc.to(GroupOut.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < DIM_V))


@triton.jit
def _distance_side(acc, count, p, pairs, bins, base, offs_bins):
    """Add one side's tile mass (and pair counts) to the local per-bin vectors at ``base + bin``.

    Only the bins present in this tile are visited: far from the diagonal a tile spans one or two.
    """
    lo = tl.reduce(tl.where(pairs, bins, 1 << 30), None, _min)
    hi = tl.reduce(tl.where(pairs, bins, -1), None, _max)
    for bin_id in range(lo, hi + 1):
        chosen = pairs & (bins == bin_id)
        slot = offs_bins == base + bin_id
        acc += tl.where(slot, tl.reduce(tl.where(chosen, p, 0.0), None, _add), 0.0)
        count += tl.where(slot, tl.reduce(chosen.to(tl.float32), None, _add), 0.0)
    return acc, count


@triton.jit
def column_kernel(
    Q, K, Lse, Columns, Pad, KeyMass, DistMass, DistCount, EditMult, EditAdd, EditRows,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    n_heads, n_q, n_k, q_offset, window, scale, n_bins, n_key_blocks,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_PAD: tl.constexpr,
    DISTANCE: tl.constexpr, BINS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    HAS_EDIT: tl.constexpr, EDIT_ROWS: tl.constexpr,
):
    """KeyMass ``[batch, head, key]``; Columns ``[batch, query]`` rows summed; Lse ``[batch, head, query]``;
    DistMass ``[batch, head, key_block, BINS_PAD]`` and DistCount ``[batch, key_block, BINS_PAD]`` partial
    sums per key block (flat index side · n_bins + bin), added up on the host so the result is deterministic.
    With ``HAS_EDIT`` the scores are edited as in the forward kernel (whose lse they are normalised by)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # int64 offsets: batch · head · T · dim can pass 2^31
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    kv_h = h // GROUP

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    in_range = offs_n < n_k
    key_ok = _key_ok(Pad, b, offs_n, n_k, HAS_PAD)
    k = _tile_t(K + b * stride_kb + kv_h * stride_kh, offs_n, offs_d, stride_kn, stride_kd, in_range,
                HEAD_DIM)  # [BLOCK_D, BLOCK_N]
    q_base = Q + b * stride_qb + h * stride_qh
    if HAS_EDIT:  # this program's keys are fixed: their coefficients are read once
        mult, add = _edit_keys(EditMult, EditAdd, pid_bh, offs_n, in_range, n_k)

    # Queries that can see some key of this block: causal needs i + q_offset >= j, a window
    # i + q_offset < j + window.
    k_first = pid_n * BLOCK_N
    k_last = tl.minimum(k_first + BLOCK_N, n_k) - 1
    q_lo = 0
    q_hi = n_q
    if CAUSAL:
        q_lo = (tl.maximum(0, k_first - q_offset) // BLOCK_M) * BLOCK_M
    if HAS_WINDOW:
        q_hi = tl.minimum(n_q, k_last + window - q_offset)

    mass = tl.full([BLOCK_N], 0.0, dtype=tl.float32)
    offs_bins = tl.arange(0, BINS_PAD)
    dist = tl.full([BINS_PAD], 0.0, dtype=tl.float32)
    dist_count = tl.full([BINS_PAD], 0.0, dtype=tl.float32)
    for start_m in range(q_lo, q_hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < n_q
        summed = tl.load(Columns + b * n_q + offs_m, mask=row_ok, other=0) != 0
        lse = tl.load(Lse + pid_bh * n_q + offs_m, mask=row_ok, other=0.0)
        q = _tile(q_base, offs_m, offs_d, stride_qm, stride_qd, row_ok, HEAD_DIM)
        s = _mma(q, k, PRECISION, UPCAST) * scale
        if HAS_EDIT:
            s = _edited(s, mult, add, _edit_rows(EditRows, b, offs_m, row_ok, n_q, EDIT_ROWS))
        pairs = _visible(offs_m, offs_n, row_ok & summed, key_ok, q_offset, window, CAUSAL, HAS_WINDOW)
        p = tl.where(pairs, tl.exp(s - lse[:, None]), 0.0)
        mass += tl.reduce(p, 0, _add)
        if DISTANCE:
            signed = (offs_m + q_offset)[:, None] - offs_n[None, :]
            dist_abs = tl.abs(signed)
            # distance_bins without a float log: exponent and top mantissa bit of the exact fp32 value.
            bits = dist_abs.to(tl.float32).to(tl.int32, bitcast=True)
            binned = 2 * ((bits >> 23) - 127) + ((bits >> 22) & 1)
            bins = tl.where(dist_abs < 2, dist_abs, binned)
            dist, dist_count = _distance_side(dist, dist_count, p, pairs & (signed >= 0), bins, 0, offs_bins)
            if not CAUSAL:
                dist, dist_count = _distance_side(dist, dist_count, p, pairs & (signed < 0), bins, n_bins,
                                                  offs_bins)

    tl.store(KeyMass + pid_bh * n_k + offs_n, mass, mask=in_range)
    if DISTANCE:
        tl.store(DistMass + (pid_bh * n_key_blocks + pid_n) * BINS_PAD + offs_bins, dist)
        # Pair counts do not depend on the head: head 0 of each batch row writes them.
        tl.store(DistCount + (b * n_key_blocks + pid_n) * BINS_PAD + offs_bins, dist_count,
                 mask=offs_bins < tl.where(h == 0, BINS_PAD, 0))
