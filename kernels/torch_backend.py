"""The fast path on any device: query chunks, never the full T x T.

Peak extra memory is O(batch · head · chunk · key): one chunk of scores at a time. GQA runs on the
kv heads directly (queries of a group are stacked), so K and V are never expanded. Under a causal
mask (and a sliding window) each chunk only reads the keys its rows can see.

One pass per score tile (the chunk body, ``_ChunkBody``): q is scaled once, each score gets one
exponential ``e = exp(s - c)`` with c a per-row shift, and everything else is read from ``e`` without
writing the tile back: the output (``e @ V``), the row sums (lse = c + log l), the entropy term
``Σ e·(s - c)``, the key mass (weighted column sum), the group masses and partial outputs, the first-key
mass and the distance bins, each then scaled per row by ``1 / L``. Causal and window masks only touch the
diagonal (and window-edge) blocks of the tile, the only ones with masked entries; a model's own row mask
(``MaskSpec.row_mask``) still masks the whole tile.

Any shift gives the same softmax; it only has to lie near the row maximum m for range and precision.
Prefill calls take c from a reference score known before the tile (``reference_shift``) and subtract it
inside the score product, so a chunk pays no max pass; a chunk whose row sums show c too far from m redoes
its exponentials with c = m, as short calls and score edits always do. The entropy's dot is then taken on
scores centred on log2 l, which keeps its fp32 sum as precise as under the max shift.

The row pass (exponentials, row sums, the shift's check, the entropy dot, the key mass) runs on CPU as one
compiled loop over each row while it sits in cache (``fused_rows``, falling back per row rather than per
chunk), or as torch ops (``_ChunkBody.row_pass``: on GPUs, without a C compiler, and as its reference).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from headlab.errors import InputError

from . import fused_rows
from .edits import ScoreEdit
from .fused_rows import FusedRows
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
from .threads import CHOOSER

# Query rows per chunk, tied to the cache: the largest power of two (32 .. 128) whose score tile
# (batch · head · rows · key fp32) fits in about one core's L2 (4 MiB here). Measured on smollm2-135m shapes
# (9 heads, head_dim 64, one thread): 64 rows at T = 1k, 32 at 4k and 8k were the fastest of 16..128
# (8k, one attention call against sdpa: 1.39x with 32 rows, 1.48x with 48, 1.63x with 24, 1.88x with 64,
# 1.89x with 16). Override with chunk_size= or $HEADLAB_CHUNK_ROWS.
TILE_BYTES = 4 * 2**20
MIN_CHUNK_ROWS, MAX_CHUNK_ROWS = 32, 128
CHUNK_ROWS_ENV = "HEADLAB_CHUNK_ROWS"
# Finite stand-in for -inf: exp2() gives exactly 0 and 0 * (_MASKED - m) stays finite (no NaN).
_MASKED = torch.finfo(torch.float32).min
# Scores are kept in base-2 units (q pre-scaled by scale · log2 e) and exponentiated with exp2: on CPU,
# torch.exp of an argument below -87 (masked entries, far-off keys) leaves the vectorised path and took
# 100x longer (98 ms instead of 0.8 ms for a 9 x 64 x 4096 tile); exp2 stays fast down to -1e38. The
# score edit s -> mult · s + add · |s| is positively homogeneous, so it holds in either unit.
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
# Calls with at least this many query rows take their exponent shift from reference scores (one per row,
# before the chunks) instead of a max pass per chunk; a chunk whose row sums leave 2^-SHIFT_RANGE ..
# 2^SHIFT_RANGE falls back to the max. Within 24 bits nothing overflows and an exponent's rounding (ulp of
# s - c) costs a probability at most ~1e-6 of its value.
SHIFT_MIN_ROWS = 64
SHIFT_RANGE = 24
_SHIFT_LOW, _SHIFT_HIGH = 2.0 ** -SHIFT_RANGE, 2.0 ** SHIFT_RANGE
# A group whose members fill at most this share of a chunk's keys gets its partial output from just
# those columns (a gather and a thin product) instead of a masked product over the whole tile.
_NARROW = 0.25


def pick_chunk_size(batch: int, n_heads: int, n_keys: int, chunk_rows: int | None = None) -> int:
    """Query rows per chunk: ``chunk_rows``, else ``$HEADLAB_CHUNK_ROWS``, else the cache rule (``TILE_BYTES``)."""
    if chunk_rows is None:
        text = os.environ.get(CHUNK_ROWS_ENV, "")
        try:
            chunk_rows = int(text) if text else None
        except ValueError:
            raise InputError(f"${CHUNK_ROWS_ENV} must be a whole number of query rows, got {text!r}") from None
    if chunk_rows is None:
        fit = TILE_BYTES // (4 * batch * n_heads * max(n_keys, 1))
        return min(MAX_CHUNK_ROWS, max(MIN_CHUNK_ROWS, 1 << max(fit, 1).bit_length() - 1))
    if chunk_rows < 1:
        raise InputError(f"chunk size must be at least 1 query row, got {chunk_rows} "
                         f"(chunk_size= or ${CHUNK_ROWS_ENV})")
    return chunk_rows


def visible_keys(mask: MaskSpec, start: int, stop: int, n_keys: int) -> tuple[int, int]:
    """The key range [lo, hi) that query rows [start, stop) can see at most."""
    hi = min(n_keys, stop + mask.q_offset) if mask.causal else n_keys
    lo = max(0, start + mask.q_offset - mask.window + 1) if mask.window is not None else 0
    return min(lo, hi), max(hi, 0)


def partial_block(mask: MaskSpec, start: int, stop: int, lo: int, hi: int) -> tuple[int, int]:
    """Keys [a, b) within [lo, hi) that the causal / window rule hides from some of rows [start, stop).

    Every other key of [lo, hi) is visible to every row (before padding): causally the keys up to row
    ``start``'s own position, under a window the keys from row ``stop - 1``'s window start. One range
    (the union of the diagonal block and the window edge), at most 2 · rows wide; empty when a == b.
    """
    a, b = hi, lo
    if mask.causal:  # row i sees j <= i + q_offset: keys after the first row's position are partial
        a, b = min(a, start + mask.q_offset + 1), max(b, hi)
    if mask.window is not None:  # row i sees j > i + q_offset - window: keys before the last row's start
        a, b = min(a, lo), max(b, stop + mask.q_offset - mask.window)
    a, b = max(a, lo), min(b, hi)
    return (a, b) if a < b else (lo, lo)


def structural_allowed(mask: MaskSpec, start: int, stop: int, a: int, b: int, device: torch.device) -> torch.Tensor:
    """``[rows, b - a]`` bool: the causal / window rule alone for query rows [start, stop) and keys [a, b)."""
    rows = torch.arange(start, stop, device=device)[:, None] + mask.q_offset
    keys = torch.arange(a, b, device=device)[None, :]
    allowed = torch.ones(stop - start, b - a, dtype=torch.bool, device=device)
    if mask.causal:
        allowed &= keys <= rows
    if mask.window is not None:
        allowed &= keys > rows - mask.window
    return allowed


def reference_shift(q: torch.Tensor, k: torch.Tensor, mask: MaskSpec, first_key: torch.Tensor) -> torch.Tensor:
    """``[batch, head, query]`` each row's score ``q·k`` (unscaled) on its first real key or on its own
    position's key, whichever is larger among those it sees (0 if neither): a cheap stand-in for the row
    maximum (in causal LMs the first key is the sink, the own key one of the near ones), O(query · dim)
    instead of a pass over the row."""
    batch, n_heads, n_q, dim = q.shape
    n_kv, n_k = k.shape[1], k.shape[2]
    q_grouped = q.view(batch, n_kv, n_heads // n_kv, n_q, dim)
    k = k.float()
    k_first = k[torch.arange(batch, device=k.device), :, first_key]  # [batch, kv_head, dim]
    first = torch.einsum("bkgqd,bkd->bkgq", q_grouped, k_first)
    position = torch.arange(n_q, device=k.device) + mask.q_offset  # each row's own key
    if 0 <= mask.q_offset and mask.q_offset + n_q <= n_k:
        k_own = k[:, :, mask.q_offset : mask.q_offset + n_q]
    else:
        k_own = k.index_select(2, position.clamp(0, n_k - 1))
    own = (q_grouped * k_own[:, :, None]).sum(dim=-1)  # 1.5x faster than the einsum
    # A reference the row cannot see (outside the window, past the row, padding) must not set its shift.
    first_seen = torch.ones(batch, n_q, dtype=torch.bool, device=k.device)
    if mask.causal:
        first_seen &= first_key[:, None] <= position
    if mask.window is not None:
        first_seen &= first_key[:, None] > position - mask.window
    own_seen = ((position >= 0) & (position < n_k))[None].expand(batch, -1)
    if mask.key_padding is not None:
        padding = mask.key_padding.to(device=k.device, dtype=torch.bool).expand(batch, -1)
        own_seen = own_seen & padding[:, position.clamp(0, n_k - 1)]
    first = first.masked_fill(~first_seen[:, None, None], float("-inf"))
    own = own.masked_fill(~own_seen[:, None, None], float("-inf"))
    shift = torch.maximum(first, own)
    return shift.masked_fill(shift == float("-inf"), 0.0).view(batch, n_heads, n_q)


def row_sees_any(mask: MaskSpec, batch: int, n_q: int, n_k: int, device: torch.device) -> torch.Tensor:
    """``[batch, query]`` bool: rows with at least one visible key (no row mask), from prefix sums of the padding."""
    rows = torch.arange(n_q, device=device) + mask.q_offset
    first = (rows - mask.window + 1).clamp_min(0) if mask.window is not None else torch.zeros_like(rows)
    last = rows.clamp_max(n_k - 1) if mask.causal else torch.full_like(rows, n_k - 1)
    nonempty = (first <= last)[None].expand(batch, -1)
    if mask.key_padding is None:
        return nonempty.clone()
    padding = mask.key_padding.to(device=device, dtype=torch.long).expand(batch, -1)
    prefix = torch.nn.functional.pad(padding.cumsum(-1), (1, 0))  # [batch, key + 1]
    inside = prefix.gather(1, (last + 1).clamp(0, n_k)[None].expand(batch, -1)) - \
        prefix.gather(1, first.clamp(0, n_k)[None].expand(batch, -1))
    return nonempty & (inside > 0)


@dataclass
class _EditTables:
    """What each chunk reads of a ``ScoreEdit``, built once per call: O(batch·head·key), never T x T.

    ``mult`` / ``add`` ``[batch, head, key]`` per-key coefficients, ``rows`` ``[batch, query]`` the edited rows
    (None: all), ``keys`` the one key range [a, b) holding every key the edit changes (an image span, say):
    a chunk edits only those columns."""

    mult: torch.Tensor
    add: torch.Tensor
    rows: torch.Tensor | None
    keys: tuple[int, int]


def edit_tables(edit: ScoreEdit, batch: int, device: torch.device) -> _EditTables:
    """The tables of one call's edit, with the key range it changes (empty when it changes nothing)."""
    mult, add = edit.coefficients(batch, device)
    changed = ((mult != 1.0) | (add != 0.0)).flatten(0, 1).any(0).nonzero()[:, 0]
    keys = (int(changed[0]), int(changed[-1]) + 1) if changed.numel() else (0, 0)
    return _EditTables(mult, add, edit.row_flags(batch, device), keys)


def edit_chunk(scores: torch.Tensor, tables: _EditTables, start: int, stop: int, lo: int, hi: int,
               work: torch.Tensor | None = None) -> torch.Tensor:
    """Edit the scaled scores ``[batch, head, rows, width]`` of query rows [start, stop) and keys [lo, hi) in
    place and return them. Only the columns of the edit's key range are touched (measured at 4k with a
    576-key image span: the edited call cost 2.11x sdpa when the whole tile was edited).

    ``work``: a buffer of at least the tile's size for the temporary (else a new one)."""
    a, b = max(lo, tables.keys[0]), min(hi, tables.keys[1])
    if a >= b:
        return scores
    part = scores[..., a - lo : b - lo]  # [batch, head, rows, b - a], a strided view of the tile
    edited = work.view(-1)[: part.numel()].view(part.shape) if work is not None else torch.empty_like(part)
    # |s| · add + s · mult
    torch.abs(part, out=edited).mul_(tables.add[:, :, None, a:b]).addcmul_(part, tables.mult[:, :, None, a:b])
    if tables.rows is None:
        part.copy_(edited)
    else:
        torch.where(tables.rows[:, None, start:stop, None], edited, part, out=part)
    return scores


@dataclass
class _GroupColumns:
    """Where one key group's members sit, worked out once per call (host side) for the partial outputs.

    ``members`` / ``outsiders``: sorted key indices that are in the group for some batch row / out of it
    for some batch row; ``uniform``: every batch row has the same labels (then the two partition the keys).
    """

    members: torch.Tensor
    outsiders: torch.Tensor
    uniform: bool

    @classmethod
    def of(cls, labels: torch.Tensor, group: int, uniform: bool) -> _GroupColumns:
        inside = (labels == group).cpu()
        return cls(inside.any(0).nonzero()[:, 0], (~inside).any(0).nonzero()[:, 0], uniform)

    @staticmethod
    def within(columns: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """The sorted ``columns`` in [lo, hi), shifted to the chunk's own key index."""
        a, b = torch.searchsorted(columns, torch.tensor([lo, hi])).tolist()
        return columns[a:b] - lo


def output_groups(request: StatsRequest, n_groups: int) -> list[int]:
    """The groups whose partial outputs a request asks for (all of them unless ``output_groups`` says)."""
    if request.output_groups is None:
        return list(range(n_groups))
    return sorted({int(g) for g in request.output_groups if 0 <= int(g) < n_groups})


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
    attention. ``chunk_size``: query rows per chunk (default ``pick_chunk_size``)."""
    batch, n_heads, n_q, _ = q.shape
    n_k = k.shape[2]
    if score_edit is not None:
        score_edit.check(batch, n_heads, n_q, n_k)
    if request is not None:
        request.check(batch, n_q, n_k, mask.q_offset)
    chunk = pick_chunk_size(batch, n_heads, n_k, chunk_size)
    fused = fused_rows.pick(q.device)
    with CHOOSER.loop(batch * n_heads * n_q * n_k) as threads:  # one thread or torch's, whichever is faster now
        body = _ChunkBody(q, k, v, mask, scale, sinks, request, score_edit, chunk, fused, threads)
        for start in range(0, n_q, chunk):
            body.run(start, min(start + chunk, n_q))
        return body.result()


class _QueryBlocks:
    """The scaled queries laid out block by block: the rows of each full chunk are one contiguous
    ``[batch, kv_head, group · rows, dim]`` matrix (the heads of a kv head stacked), where a slice of the usual
    layout would be strided and cost a copy per chunk. With a ``shift`` each row carries ``-c`` as an extra
    last column."""

    def __init__(self, q: torch.Tensor, n_kv: int, scale: float, chunk: int, shift: torch.Tensor | None):
        batch, n_heads, n_q, dim = q.shape
        group, width, n_blocks = n_heads // n_kv, dim + (shift is not None), n_q // chunk
        self.chunk, self.shape = chunk, (batch, n_kv, -1, width)
        q = q.float()
        self.blocks = torch.empty(batch, n_kv, n_blocks, group, chunk, width, dtype=torch.float32, device=q.device)
        into = self.blocks.permute(0, 1, 3, 2, 4, 5)  # [batch, kv_head, group, block, row, width]
        split = n_blocks * chunk
        torch.mul(q[:, :, :split].view(batch, n_kv, group, n_blocks, chunk, dim), scale, out=into[..., :dim])
        if shift is not None:
            torch.neg(shift[:, :, :split].view(batch, n_kv, group, n_blocks, chunk), out=into[..., dim])
        self.tail = None  # the rows after the last full chunk
        if split < n_q:
            tail = q[:, :, split:] * scale
            if shift is not None:
                tail = torch.cat([tail, -shift[:, :, split:, None]], dim=-1)
            self.tail = tail.reshape(self.shape)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """``[batch, kv_head, group · rows, width]`` query rows [start, stop) of one chunk (chunk-aligned)."""
        if stop - start == self.chunk:
            return self.blocks[:, :, start // self.chunk].view(self.shape)
        return self.tail


class _ChunkBody:
    """The accumulators of one call and the work of one chunk of query rows (``run``).

    Chunks store unnormalised sums (``e @ V``, Σe, Σe·(s - m), e on the first key, group sums) with the row
    maximum; ``result`` turns them into probabilities' statistics with one per-row scale for the whole call.
    Only the key mass (a sum over rows) is normalised inside the chunk.
    """

    def __init__(self, q, k, v, mask: MaskSpec, scale: float, sinks, request: StatsRequest | None,
                 score_edit: ScoreEdit | None, chunk: int, fused: FusedRows | None = None, threads: int = 1):
        batch, n_heads, n_q, _ = q.shape
        n_kv, n_k, dim_v = k.shape[1], k.shape[2], v.shape[-1]
        device = q.device
        f32 = dict(dtype=torch.float32, device=device)
        self.shape = (batch, n_heads, n_kv, n_heads // n_kv, n_q, n_k, dim_v)
        self.mask, self.request, self.dtype, self.device = mask, request, q.dtype, device
        self.sinks = None if sinks is None else sinks.float().view(1, n_heads, 1) * _LOG2E  # base 2
        self.fused, self.threads = fused, threads
        self.first_key = mask.first_key(batch, device)
        self.v = v.float()
        self.shift = None
        if score_edit is None and n_q >= SHIFT_MIN_ROWS:
            # Each row's exponent shift is known before its scores are: a reference score c (see
            # reference_shift), subtracted inside the score product through one extra column
            # ([q, -c] . [k, 1] = s - c), so no chunk pays a max pass.
            self.shift = reference_shift(q.float(), k, mask, self.first_key).mul_(scale * _LOG2E)
            dim = k.shape[-1]
            self.k_t = torch.empty(batch, n_kv, dim + 1, n_k, **f32)  # [batch, kv_head, dim + 1, key]
            self.k_t[:, :, :dim] = k.transpose(-1, -2)
            self.k_t[:, :, dim] = 1.0
        else:  # score edits read the raw scores; short calls (decoding) skip the per-call copy of K
            self.k_t = k.float().transpose(-1, -2)  # [batch, kv_head, dim, key]
        self.q = _QueryBlocks(q, n_kv, scale * _LOG2E, chunk, self.shift)
        first = self.first_key.unique() if batch > 1 else self.first_key
        self.first_column = int(first[0]) if first.numel() == 1 else None  # one column for every batch row
        self.edit = None if score_edit is None else edit_tables(score_edit, batch, device)
        self.padding = None if mask.key_padding is None else \
            mask.key_padding.to(device=device, dtype=torch.bool).expand(batch, -1)
        # Causal, window and padding have a structure; only a model's own row mask needs the whole tile.
        self.dense = mask.row_mask is not None
        if self.dense:  # filled chunk by chunk
            self.sees = torch.zeros(batch, n_q, dtype=torch.bool, device=device)
            self.row_counted = torch.zeros_like(self.sees)
            self.column_weight = torch.zeros(batch, n_q, **f32)
            self.key_count = torch.zeros(batch, n_k, **f32)
            self.all_see = False
        else:
            self.sees = row_sees_any(mask, batch, n_q, n_k, device)
            self.all_see = bool(self.sees.all())
            self.row_counted = mask.rows_counted(0, n_q, batch, device) & self.sees
            self.column_weight = column_rows(self.row_counted, request, mask.q_offset).float()
            self.key_count = None  # from the mask's structure, at the end
        self.blocks: dict[tuple[int, int, int], torch.Tensor] = {}

        # Two tile buffers (scores, exponentials) reused by every chunk: a fresh multi-MiB tensor per chunk
        # costs page faults (measured: a 64 x 4k score product took 3.8 ms into a new tensor, 2.2 ms into one).
        self.work = [torch.empty(batch * n_heads * min(n_q, chunk) * n_k, **f32) for _ in range(2)]
        # Every row is written by its chunk, except rows that see no key (their output stays 0).
        self.out = (torch.empty if self.all_see else torch.zeros)(batch, n_heads, n_q, dim_v, dtype=q.dtype,
                                                                   device=device)
        self.out_sum = self.out if q.dtype == torch.float32 else torch.zeros(batch, n_heads, n_q, dim_v, **f32)
        # Each row's exponent shift: the reference (rewritten where a chunk falls back) or the chunk's maximum.
        self.row_max = self.shift if self.shift is not None else torch.zeros(batch, n_heads, n_q, **f32)
        self.row_sum = torch.zeros_like(self.row_max)
        self.row_dot = torch.zeros_like(self.row_max)
        # The entropy's dot is taken against (s - c) - t: t per row (see row_pass), 0 where it is not centred.
        self.dot_center = torch.zeros_like(self.row_max)
        self.first_sum = torch.zeros_like(self.row_max)
        self.key_mass = torch.zeros(batch, n_heads, n_k, **f32)

        n_groups = request.group_count() if request is not None else 0
        self.onehot = self.group_sum = self.group_out_sum = None
        self.columns: dict[int, _GroupColumns] = {}
        if n_groups:
            labels = request.labels(batch, device)
            self.onehot = group_onehot(labels, n_groups)  # [batch, key, group]
            self.group_sum = torch.zeros(batch, n_heads, n_q, n_groups, **f32)
            if request.group_outputs:
                self.group_out_sum = torch.zeros(batch, n_heads, n_q, n_groups, dim_v, **f32)
                uniform = batch == 1 or bool((labels == labels[:1]).all())
                self.columns = {g: _GroupColumns.of(labels, g, uniform) for g in output_groups(request, n_groups)}
        self.distance_mass = self.distance_count = None
        if request is not None and request.distance:
            self.n_bins = distance_shape(n_q, n_k, mask.q_offset)
            self.distance_mass = torch.zeros(batch, n_heads, 2, self.n_bins, **f32)
            self.distance_count = torch.zeros(batch, 2, self.n_bins, **f32)

    def result(self) -> tuple[torch.Tensor, AttentionStats]:
        """Normalise the per-row sums: lse = m + log2 L (sinks added), p = e / L; natural units out."""
        sees = self.sees[:, None]
        row_max, row_sum = self.row_max, self.row_sum
        # log2 L relative to the row maximum, never as lse - m: with logits in the hundreds that difference
        # would cancel away the precision of a sink's small share (and with it the entropy).
        log_total = row_sum.log2()
        if self.sinks is not None:
            log_total = torch.logaddexp2(log_total, self.sinks - row_max)
        lse2 = torch.where(sees, row_max + log_total, float("-inf"))
        if self.sinks is not None:
            lse2 = torch.where(sees, lse2, self.sinks.expand_as(lse2))  # a row without keys: the sink alone
        inv = torch.where(sees, torch.exp2(-log_total), 0.0)  # 1 / L; 0 on rows without keys
        # Entropy over keys (sink excluded): H = lse · Σp - Σ p·s = (l · (log L - t) - Σ e·(s - c - t)) / L in
        # nats, for the row's shift c and dot centre t.
        entropy = torch.where(sees, (row_sum * (log_total - self.dot_center) - self.row_dot) * inv * _LN2, 0.0)
        self.out_sum.mul_(inv[..., None])
        if self.out_sum is not self.out:
            self.out.copy_(self.out_sum)
        group_mass = group_out = None
        if self.group_sum is not None:
            group_mass = self.group_sum.mul_(inv[..., None])
        if self.group_out_sum is not None:
            group_out = self.group_out_sum.mul_(inv[..., None, None]).to(self.dtype)
        key_count = self.key_count if self.key_count is not None else self.structural_key_count()
        stats = AttentionStats(lse2 * _LN2, entropy, self.key_mass, key_count, self.first_sum.mul_(inv),
                               self.row_counted, self.first_key, self.distance_mass, self.distance_count,
                               group_mass, group_out)
        return self.out, stats

    def structural_key_count(self) -> torch.Tensor:
        """``[batch, key]`` counted rows that see each key, from prefix sums over rows (causal / window / padding).

        Key j is seen by rows i with i >= j - q_offset (causal) and i < j - q_offset + window (window)."""
        batch, _, _, _, n_q, n_k, _ = self.shape
        mask = self.mask
        prefix = torch.nn.functional.pad(self.column_weight.cumsum(-1), (1, 0))  # [batch, query + 1]
        shift = torch.arange(n_k, device=self.device) - mask.q_offset
        first = shift.clamp(0, n_q) if mask.causal else torch.zeros_like(shift)
        last = (shift + mask.window).clamp(0, n_q) if mask.window is not None else torch.full_like(shift, n_q)
        last = torch.maximum(first, last)
        count = prefix[:, last] - prefix[:, first]
        return count * self.padding if self.padding is not None else count

    def block(self, start: int, stop: int, a: int, b: int) -> torch.Tensor:
        """The causal / window block of rows [start, stop) and keys [a, b), cached by its relative position."""
        key = (stop - start, b - a, start + self.mask.q_offset - a)
        if key not in self.blocks:
            self.blocks[key] = ~structural_allowed(self.mask, start, stop, a, b, self.device)
        return self.blocks[key]

    def scores(self, start: int, stop: int, lo: int, hi: int) -> torch.Tensor:
        """Scaled (base 2), edited, masked scores ``[batch, head, rows, width]`` in the first tile buffer;
        on the dense path it also records which rows see a key and which are counted."""
        batch, n_heads, n_kv, group, _, n_k, _ = self.shape
        rows, width = stop - start, hi - lo
        q_chunk = self.q.rows(start, stop)
        size = batch * n_heads * rows * width
        scores = self.work[0][:size].view(batch, n_kv, group * rows, width)
        torch.matmul(q_chunk, self.k_t[..., lo:hi], out=scores)
        scores = scores.view(batch, n_heads, rows, width)
        if self.edit is not None:
            edit_chunk(scores, self.edit, start, stop, lo, hi, self.work[1])
        if self.dense:
            allowed = self.mask.allowed(start, stop, n_k, self.device)[..., lo:hi]  # [batch or 1, 1, rows, width]
            scores.masked_fill_(~allowed, _MASKED)
            sees = allowed.any(dim=-1)[:, 0].expand(batch, rows)
            self.sees[:, start:stop] = sees
            counted = self.mask.rows_counted(start, stop, batch, self.device) & sees
            self.row_counted[:, start:stop] = counted
            counted = column_rows(counted, self.request, self.mask.q_offset + start)
            self.column_weight[:, start:stop] = counted
            self.key_count[:, lo:hi] += (allowed[:, 0] & counted[:, :, None]).sum(dim=1)
            return scores
        if self.padding is not None:
            scores.masked_fill_(~self.padding[:, None, None, lo:hi], _MASKED)
        a, b = partial_block(self.mask, start, stop, lo, hi)
        if b > a:  # only the diagonal block (and the window edge) holds masked entries
            scores[..., a - lo : b - lo].masked_fill_(self.block(start, stop, a, b), _MASKED)
        return scores

    def visible_pairs(self, start: int, stop: int, lo: int, hi: int) -> torch.Tensor:
        """``[batch, rows, width]`` bool visibility of the tile (only for the distance profile)."""
        batch, n_k = self.shape[0], self.shape[5]
        allowed = self.mask.allowed(start, stop, n_k, self.device)[:, 0, :, lo:hi]
        return allowed.expand(batch, -1, -1)

    def run(self, start: int, stop: int) -> None:
        batch, n_heads, n_kv, group, _, n_k, dim_v = self.shape
        rows = stop - start
        lo, hi = visible_keys(self.mask, start, stop, n_k)
        if hi <= lo:
            return  # these rows see no key: output 0, lse -inf, nothing counted
        width = hi - lo
        scores = self.scores(start, stop, lo, hi)
        if self.fused is not None:  # the same row pass, compiled: each row read while in cache
            e = self.work[1][: scores.numel()].view_as(scores)
            self.fused.run(scores, e, self.row_max, self.row_sum, self.row_dot, self.dot_center, start,
                           self.column_weight, None if self.sinks is None else self.sinks.view(-1), self.key_mass,
                           lo, self.shift is not None, self.threads)
        else:
            e = self.row_pass(scores, start, stop, lo, hi)
        e_rows = e.view(batch, n_kv, group * rows, width)  # the GQA view every product reads
        self.out_sum[:, :, start:stop] = (e_rows @ self.v[:, :, lo:hi]).view(batch, n_heads, rows, dim_v)
        self.first_sum[:, :, start:stop] = self.first_e(e, lo, hi)

        if self.onehot is not None:
            self.group_sum[:, :, start:stop] = e @ self.onehot[:, None, lo:hi]
            for g, columns in self.columns.items():
                part = self.group_output(e, e_rows, g, columns, lo, hi)
                if part is not None:
                    self.group_out_sum[:, :, start:stop, g] = part.view(batch, n_heads, rows, dim_v)

        if self.distance_mass is not None:
            pairs = self.visible_pairs(start, stop, lo, hi) & (self.column_weight[:, start:stop, None] > 0)
            index = distance_index(start, stop, lo, hi, self.mask.q_offset, self.n_bins, self.device)
            add_distance(self.distance_mass.view(batch, n_heads, -1), self.distance_count.view(batch, -1),
                         e * self.row_weights(start, stop)[..., None], pairs, index)

    def row_pass(self, scores: torch.Tensor, start: int, stop: int, lo: int, hi: int) -> torch.Tensor:
        """The row pass as torch ops (the reference for the compiled one in ``fused_rows.c``): the
        exponentials of a chunk's scores in the second tile buffer, with the row shifts, sums, entropy dots
        and the key mass written."""
        batch, n_heads, rows, width = scores.shape
        # One exponential per score: e = 2^(s - c), s in base-2 units, c the row's shift: the reference
        # score when it is close enough to the row maximum m (checked from the row sums), else m itself.
        shifted, on_reference = scores, self.shift is not None
        if on_reference:
            e, row_sum = self.exponentials(shifted)
            on_reference = self.shift_in_range(row_sum, start, stop)
        if not on_reference:
            base = None if self.shift is None else self.shift[:, :, start:stop]
            shifted, self.row_max[:, :, start:stop] = self.subtract_max(shifted, base, start, stop)
            e, row_sum = self.exponentials(shifted)
        self.row_sum[:, :, start:stop] = row_sum
        if on_reference:
            # The entropy's dot Σ e·x sums terms of size ~2^(m-c)·(m-c) in fp32, so with m far above c its error
            # grew with m - c (1e-4 nats at 20 bits and 1000 keys, against 1e-6 with the max shift). Centring x on
            # t = log2 l (m <= c + t <= m + log2 width) brings the terms back to the max shift's scale.
            center = row_sum.log2()
            if not self.all_see:
                center = torch.where(self.sees[:, None, start:stop], center, 0.0)
            shifted.sub_(center[..., None])
            self.dot_center[:, :, start:stop] = center
        # Σ e·x per row: one 1 x k by k x 1 product per row, the second factor read as a transposed row
        # (as a k x 1 column it was 7x slower).
        dots = torch.bmm(e.view(-1, 1, width), shifted.view(-1, 1, width).transpose(1, 2))
        self.row_dot[:, :, start:stop] = dots.view(batch, n_heads, rows)
        # The key mass (a sum over rows) needs each row's 1 / L: l plus the sink's share.
        self.key_mass[..., lo:hi] += (self.row_weights(start, stop)[:, :, None] @ e)[:, :, 0]
        return e

    def row_weights(self, start: int, stop: int) -> torch.Tensor:
        """``[batch, head, rows]`` each row's weight in the column sums: counted / L (l plus the sink's share),
        0 on rows not counted or without keys."""
        row_sum, row_max = self.row_sum[:, :, start:stop], self.row_max[:, :, start:stop]
        total = row_sum if self.sinks is None else row_sum + torch.exp2(self.sinks - row_max)
        weights = self.column_weight[:, None, start:stop] / total
        if not self.all_see:
            weights = torch.where(self.sees[:, None, start:stop], weights, 0.0)
        return weights

    def exponentials(self, shifted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``e = 2^shifted`` in the second tile buffer and its row sums ``[batch, head, rows]``."""
        e = torch.exp2(shifted, out=self.work[1][: shifted.numel()].view_as(shifted))
        return e, e.sum(dim=-1)

    def subtract_max(self, shifted: torch.Tensor, base: torch.Tensor | None, start: int, stop: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Shift the rows by their maximum (in place); returns them and the total shift ``base + max``.
        A row without keys gets a zero maximum, so its exponentials stay 0."""
        row_max = shifted.amax(dim=-1)  # [batch, head, rows]
        if not self.all_see:
            row_max = torch.where(self.sees[:, None, start:stop], row_max, 0.0)
        shifted.sub_(row_max[..., None])
        return shifted, row_max if base is None else base + row_max

    def shift_in_range(self, row_sum: torch.Tensor, start: int, stop: int) -> bool:
        """Whether every row that sees a key has 2^-SHIFT_RANGE <= l <= 2^SHIFT_RANGE, i.e. its maximum
        lies within about SHIFT_RANGE bits of its reference shift (l >= 2^(m - c) >= l / width)."""
        if self.all_see:
            low, high = torch.aminmax(row_sum)
            return _SHIFT_LOW <= float(low) and float(high) <= _SHIFT_HIGH  # false for NaN
        ok = (row_sum >= _SHIFT_LOW) & (row_sum <= _SHIFT_HIGH)
        return bool((ok | ~self.sees[:, None, start:stop]).all())

    def first_e(self, e: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """``[batch, head, rows]`` unnormalised weight of each row on its first real key (0 outside [lo, hi))."""
        batch, n_heads, rows, width = e.shape
        if self.first_column is not None:
            if lo <= self.first_column < hi:
                return e[..., self.first_column - lo]
            return e.new_zeros(batch, n_heads, rows)
        first = self.first_key
        first_in = ((first >= lo) & (first < hi)).view(batch, 1, 1)
        index = (first - lo).clamp(0, width - 1).view(batch, 1, 1, 1).expand(-1, n_heads, rows, 1)
        return e.gather(-1, index)[..., 0] * first_in

    def group_output(self, e: torch.Tensor, e_rows: torch.Tensor, g: int, columns: _GroupColumns,
                     lo: int, hi: int) -> torch.Tensor | None:
        """Unnormalised ``Σ_{k in g} e_ik V_k`` ``[batch, kv_head, group · rows, dim_v]`` of one chunk, or None
        when no key of [lo, hi) is in the group: from the member columns when they are few, by zeroing
        the few outsiders (and restoring them) when the group fills most of the chunk, else masked."""
        batch, n_kv, width = self.shape[0], self.shape[2], hi - lo
        v = self.v[:, :, lo:hi]
        inside = _GroupColumns.within(columns.members, lo, hi)
        if inside.numel() == 0:
            return None
        if inside.numel() <= _NARROW * width:
            inside = inside.to(self.device)
            picked = e.index_select(-1, inside)
            if not columns.uniform:  # a column in the group for one batch row may be out of it for another
                picked = picked * self.onehot[:, None, None, lo:hi, g].index_select(-1, inside)
            return picked.view(batch, n_kv, -1, inside.numel()) @ v.index_select(-2, inside)
        outside = _GroupColumns.within(columns.outsiders, lo, hi)
        if outside.numel() == 0:
            return e_rows @ v
        if columns.uniform and outside.numel() <= _NARROW * width:
            outside = outside.to(self.device)
            saved = e.index_select(-1, outside)
            e.index_fill_(-1, outside, 0.0)
            part = e_rows @ v
            e.index_copy_(-1, outside, saved)
            return part
        masked = e * self.onehot[:, None, None, lo:hi, g]
        return masked.view(batch, n_kv, -1, width) @ v
