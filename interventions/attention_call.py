"""One attention call with edits: positions resolved, edits compiled, the kernel run once, outputs recombined.

headlab's attention function (``headlab.kernels.attention_function``) asks the editor in force, an
``ActiveEdits`` that ``headlab.intervene`` installs through the kernels' switch, whether a layer has
attention-site edits (``plan_for``); if so it hands the call to ``ActiveEdits.run``, i.e. ``run_edited``:
1. resolve the edits' rows and key groups for this call (``AttentionCall``: absolute positions from
   the padding mask and the call's offsets, so the same edit holds at prefill and while decoding);
2. compile the pre-softmax edits into one ``ScoreEdit`` (keys labelled by which edits cover them);
3. label the keys of the post-softmax edits, ask the kernel for those groups' masses and partial
   outputs (merged with any key groups a probe asked for), and recombine the output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from headlab.errors import InputError
from headlab.kernels import AttentionStats, MaskSpec, StatsRequest, attention_with_stats
from headlab.kernels.attention_function import eager_pattern
from headlab.kernels.positions import Positions, SequenceLayout

from .attention_site import BoundAttentionEdit
from .recombine import recombine, reweight_probs

# Bit labels give 2^n - 1 groups for n key sets; this bounds the groups a kernel call accumulates.
MAX_KEY_SETS = 6


@dataclass
class AttentionCall:
    """Where the rows and keys of one attention call sit.

    Query row r is column ``row_offset + r`` of the sequence, key j is column ``key_offset + j``;
    ``layout`` says where each sequence's real tokens start.
    """

    layer: int
    batch: int
    n_heads: int
    n_q: int
    n_k: int
    row_offset: int
    key_offset: int
    layout: SequenceLayout

    @classmethod
    def of(cls, layer: int, query: torch.Tensor, key: torch.Tensor, attention_mask, tracker=None) -> AttentionCall:
        batch, n_heads, n_q = query.shape[:3]
        n_k = key.shape[2]
        if hasattr(attention_mask, "q_offset") and hasattr(attention_mask, "kv_offset"):  # headlab's LazyMask
            row_offset, key_offset = attention_mask.q_offset, attention_mask.kv_offset
            padding = attention_mask.attention_mask
            n_columns = max(key_offset + n_k, row_offset + n_q)
            layout = SequenceLayout.from_mask(padding, batch, n_columns, query.device)
        else:
            row_offset, key_offset = n_k - n_q, 0
            current = tracker.current if tracker is not None else None
            if current is not None and current.batch == batch and current.seen + current.n_query == n_k:
                layout = current.layout
            else:
                layout = SequenceLayout.from_mask(None, batch, n_k, query.device)
        return cls(layer, batch, n_heads, n_q, n_k, row_offset, key_offset, layout)

    def rows(self, positions: Positions) -> torch.Tensor:
        """``[batch, query]`` bool."""
        return self.layout.choose(positions, self.n_q, self.row_offset)

    def keys(self, positions: Positions) -> torch.Tensor:
        """``[batch, key]`` bool."""
        return self.layout.choose(positions, self.n_k, self.key_offset)


def bit_labels(members: list[torch.Tensor]) -> torch.Tensor:
    """``[batch, key]`` group of each key: (bitmask of the sets holding it) - 1, so -1 = in no set."""
    bits = torch.zeros_like(members[0], dtype=torch.long)
    for i, member in enumerate(members):
        bits |= member.long() << i
    return bits - 1


def compose(coefficients: list[tuple[float, float]]) -> tuple[float, float]:
    """(mult, add_abs) of several sign-keeping score edits applied one after the other.

    s -> mult · s + add · |s| is c+ · s for s >= 0 and c- · s for s < 0 (c± = mult ± add); when no
    edit flips a sign the slopes multiply.
    """
    if len(coefficients) == 1:
        return coefficients[0]
    plus = minus = 1.0
    for mult, add in coefficients:
        plus, minus = plus * (mult + add), minus * (mult - add)
    return (plus + minus) / 2, (plus - minus) / 2


@dataclass
class PostPlan:
    """The post-softmax part of one call: key labels and the per-row weights of every group.

    Keys covered by the edits' key sets carry a cell label 0 .. n_cells - 1 (which sets hold them);
    every other key carries ``n_cells``, the rest, so each key is in exactly one group.
    """

    labels: torch.Tensor  # [batch, key] in 0 .. n_cells
    n_cells: int
    weights: torch.Tensor | None = None  # [batch, head, query, n_cells + 1] once finalised

    @property
    def n_groups(self) -> int:
        return self.n_cells + 1


class LayerPlan:
    """The attention-site edits of one layer (bound to the model, ``edit.bind(arch)``), compiled per call."""

    def __init__(self, layer: int, edits: list[BoundAttentionEdit], n_heads: int):
        self.layer = layer
        self.pre: list[BoundAttentionEdit] = [e for e in edits if e.site == "scores"]
        self.post: list[BoundAttentionEdit] = [e for e in edits if e.site == "probs"]
        self.post_sets = [(i, j, Positions.of(spec)) for i, e in enumerate(self.post) for j, spec in
                          enumerate(e.key_specs())]
        if len(self.pre) > MAX_KEY_SETS or len(self.post_sets) > MAX_KEY_SETS:
            raise InputError(f"layer {layer}: at most {MAX_KEY_SETS} pre-softmax key groups and {MAX_KEY_SETS} "
                             "post-softmax key groups per layer; merge edits that share keys")
        # Everything that does not depend on the call is worked out once, not at every decoding step.
        self.score_coefficients = self._score_coefficients(n_heads) if self.pre else None
        self.score_cover = self._score_cover(n_heads) if self.pre else None
        n_cells = 2 ** len(self.post_sets) - 1
        self.own_groups = [torch.tensor(self._groups_of(i, n_cells)) for i in range(len(self.post))]
        self.post_heads = [torch.tensor(e.heads_of(layer)) for e in self.post]
        self.needed_cells = self._needed_cells(n_cells)

    def _needed_cells(self, n_cells: int) -> list[int]:
        """Cells (and the rest, last) whose partial outputs a recombination reads: a cell whose static weight is
        0 in every post edit has weight 0 in every edited row, so its O_g is never used (no P·V for it)."""
        needed = []
        for g in range(n_cells + 1):
            for i, edit in enumerate(self.post):
                static = edit.group_weights()
                own = self.own_groups[i][g] if g < n_cells else -1
                if static is None or (static + [edit.rest_weight()])[own] != 0:
                    needed.append(g)
                    break
        return needed

    def _score_coefficients(self, n_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mult, add_abs) ``[head, group]``: group g holds the keys of the pre edits in bitmask g + 1."""
        n_groups = 2 ** len(self.pre) - 1
        mult = torch.ones(n_heads, n_groups)
        add = torch.zeros(n_heads, n_groups)
        for g in range(n_groups):
            covering = [e for i, e in enumerate(self.pre) if (g + 1) >> i & 1]
            for h in range(n_heads):
                parts = [e.coefficients() for e in covering if h in e.heads_of(self.layer)]
                if parts:
                    mult[h, g], add[h, g] = compose(parts)
        return mult, add

    def _score_cover(self, n_heads: int) -> torch.Tensor:
        """``[edit, head, group]`` bool: pre edit i acts on head h and on the keys of group g (bitmask g + 1)."""
        n_groups = 2 ** len(self.pre) - 1
        cover = torch.zeros(len(self.pre), n_heads, n_groups, dtype=torch.bool)
        for i, e in enumerate(self.pre):
            heads = e.heads_of(self.layer)
            for g in range(n_groups):
                if (g + 1) >> i & 1:
                    cover[i, heads, g] = True
        return cover

    def score_edit(self, call: AttentionCall):
        """The layer's pre-softmax edits for this call as one ``ScoreEdit``, or None."""
        if not self.pre:
            return None
        from headlab.kernels.edits import ScoreEdit

        labels = bit_labels([call.keys(Positions.of(e.keys)) for e in self.pre])
        device = call.layout.first.device
        rows = call.rows(self.pre[0].row_positions)  # the install check made every pre edit share its rows
        if all(e.strength is None for e in self.pre):
            mult, add = (c.to(device) for c in self.score_coefficients)
            return ScoreEdit(labels, mult, add, rows)
        labels, mult, add = self._per_sample(call, labels, device)
        return ScoreEdit(labels, mult, add, rows)

    def _per_sample(self, call: AttentionCall, labels: torch.Tensor,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Labels ``[batch, key]`` and (mult, add_abs) ``[head, batch · groups]`` when an edit has a per-sample
        ``strength``: the kernels' coefficients are per (head, group), so each sample gets groups of its own
        (sample b's group g is label b · G + g); the kernels read per-(batch, head, key) tables either way.

        Several edits on one group compose as in ``compose`` (slopes c± = mult ± add multiply); a group one edit
        covers takes that edit's coefficients as they are, so full strength equals the static plan bit for bit."""
        batch, n_groups = call.batch, 2 ** len(self.pre) - 1
        cover = self.score_cover.to(device)[:, None]  # [edit, 1, head, group]
        plus = torch.ones(batch, *cover.shape[2:], device=device)
        minus = torch.ones_like(plus)
        single_mult, single_add = torch.zeros_like(plus), torch.zeros_like(plus)
        for i, e in enumerate(self.pre):
            strength = e.strength
            if strength is None:
                strength = torch.ones(batch)
            if strength.shape != (batch,):
                raise InputError(f"{e.describe()}: strength must be [batch] = [{batch}], got {list(strength.shape)}")
            m, a = (c.to(device)[:, None, None] for c in e.sample_coefficients(strength))  # [batch, 1, 1]
            plus = torch.where(cover[i], plus * (m + a), plus)
            minus = torch.where(cover[i], minus * (m - a), minus)
            single_mult = torch.where(cover[i], m.expand_as(plus), single_mult)
            single_add = torch.where(cover[i], a.expand_as(plus), single_add)
        count = cover.sum(dim=0)  # [1, head, group]
        mult = torch.where(count == 1, single_mult, torch.where(count == 0, 1.0, (plus + minus) / 2))
        add = torch.where(count == 1, single_add, torch.where(count == 0, 0.0, (plus - minus) / 2))
        labels = labels.expand(batch, -1)
        offset = torch.arange(batch, device=labels.device)[:, None] * n_groups
        labels = torch.where(labels >= 0, labels + offset, -1)  # [batch, key]
        flat = (mult.permute(1, 0, 2).reshape(mult.shape[1], batch * n_groups),  # [head, batch · group]
                add.permute(1, 0, 2).reshape(add.shape[1], batch * n_groups))
        return labels, *flat

    def post_plan(self, call: AttentionCall) -> PostPlan | None:
        if not self.post:
            return None
        # Key sets are read from the edits at every call: an edit may set them while the forward runs (VAR finds
        # each layer's sinks on that layer's input at prefill); how many sets there are stays fixed.
        labels = bit_labels([call.keys(Positions.of(self.post[i].key_specs()[j])) for i, j, _ in self.post_sets])
        n_cells = 2 ** len(self.post_sets) - 1
        return PostPlan(torch.where(labels < 0, n_cells, labels), n_cells)

    def _groups_of(self, edit_index: int, n_cells: int) -> list[int]:
        """For each cell (and the rest, last), the edit's own group there: its first set present, or -1."""
        own = []
        for g in range(n_cells):
            mine = [j for s, (i, j, _) in enumerate(self.post_sets) if i == edit_index and (g + 1) >> s & 1]
            own.append(mine[0] if mine else -1)
        return own + [-1]

    def finalise(self, plan: PostPlan, call: AttentionCall, group_mass: torch.Tensor) -> torch.Tensor:
        """Per-row weights ``[batch, head, query, n_cells + 1]`` from the static weights and the row masses.

        group_mass ``[batch, head, query, n_cells + 1]``: the unedited masses of the cells and the rest.
        """
        device = group_mass.device
        weights = torch.ones(call.batch, call.n_heads, call.n_q, plan.n_groups, device=device)
        for i, edit in enumerate(self.post):
            own = self.own_groups[i].to(device)
            static = edit.group_weights()
            if static is not None:
                table = torch.tensor(static + [edit.rest_weight()], device=device)
                factor = table[own].expand_as(weights)  # index -1 reads the rest weight
            else:
                n_own = len(edit.key_specs())
                masses = [group_mass[..., own == j].sum(dim=-1) for j in range(n_own)]
                rest = (1.0 - sum(masses)).clamp_min(0.0)
                per_group, rest_weight = edit.dynamic_weights(masses, rest)
                table = torch.stack(per_group + [rest_weight], dim=-1)  # [batch, head, query, n_own + 1]
                factor = table[..., own]
            heads = self.post_heads[i].to(device)
            rows = call.rows(edit.row_positions).to(device)[:, None, :, None]
            weights[:, heads] = torch.where(rows, weights[:, heads] * factor[:, heads], weights[:, heads])
        plan.weights = weights
        return weights


@dataclass
class EditedCall:
    """What the pattern reader needs to redo the same edit on materialised probabilities."""

    score_edit: object  # headlab.kernels.ScoreEdit or None
    post: PostPlan | None


def _merged_request(probe_request: StatsRequest | None, plan: PostPlan,
                    needed: list[int] | None = None) -> tuple[StatsRequest, int]:
    """A request for the edit's groups crossed with the probe's (label = (probe label + 1) · groups + edit label).

    ``needed``: the edit's groups whose partial outputs the recombination reads (None = all); a probe that
    asks for group outputs itself reads every group."""
    cells = plan.n_groups
    probe_groups = 0
    labels = plan.labels
    if probe_request is not None and probe_request.key_groups is not None:
        if probe_request.query_group is not None:
            raise InputError("a probe with StatsRequest.query_group cannot run on a layer with post-softmax "
                             "edits (its key labels are merged with the edit's); drop query_group or the edit")
        probe_groups = probe_request.group_count()
        probe_labels = probe_request.labels(labels.shape[0], labels.device).long()
        probe_labels = torch.where((probe_labels >= 0) & (probe_labels < probe_groups), probe_labels, -1)
        labels = (probe_labels + 1) * cells + labels
    distance = probe_request.distance if probe_request is not None else False
    output_groups = None
    if needed is not None and len(needed) < cells and not (probe_request is not None and probe_request.group_outputs):
        output_groups = tuple(p * cells + g for p in range(probe_groups + 1) for g in needed)
    request = StatsRequest(distance=distance, key_groups=labels, n_groups=(probe_groups + 1) * cells,
                           group_outputs=True, output_groups=output_groups)
    return request, probe_groups


def run_edited(plan: LayerPlan, call: AttentionCall, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               mask: MaskSpec, scale: float | None, sinks: torch.Tensor | None, backend: str | None,
               probe_request: StatsRequest | None) -> tuple[torch.Tensor, AttentionStats, EditedCall]:
    """Edited attention output ``[batch, head, query, dim_v]`` and the statistics of the edited call."""
    score_edit = plan.score_edit(call)
    post = plan.post_plan(call)
    # score_edit goes to the kernels only when there is one, so calls without it never depend on it.
    edit_kwargs = {"score_edit": score_edit} if score_edit is not None else {}
    if post is None:
        out, stats = attention_with_stats(query, key, value, scale=scale, sinks=sinks, backend=backend, mask=mask,
                                          request=probe_request, **edit_kwargs)
        return out, stats, EditedCall(score_edit, None)

    request, probe_groups = _merged_request(probe_request, post, plan.needed_cells)
    out, stats = attention_with_stats(query, key, value, scale=scale, sinks=sinks, backend=backend, mask=mask,
                                      request=request, **edit_kwargs)
    cells = post.n_groups
    batch, n_heads, n_q = out.shape[:3]
    crossed_mass = stats.group_mass.view(batch, n_heads, n_q, probe_groups + 1, cells)
    crossed_out = stats.group_out.view(batch, n_heads, n_q, probe_groups + 1, cells, -1)
    mass = crossed_mass.sum(dim=3)
    parts = crossed_out.float().sum(dim=3)
    weights = plan.finalise(post, call, mass)
    sink_mass = None
    if sinks is not None:  # exact, from the row's log-sum-exp (which includes the sink logit)
        sink_mass = torch.exp(sinks.float().view(1, -1, 1) - stats.lse).nan_to_num(0.0)
    new_out, denominator, edited = recombine(out, parts, mass, weights, sink_mass)
    _reweight_stats(stats, post, weights, denominator, edited, crossed_mass, crossed_out, probe_request, probe_groups)
    return new_out, stats, EditedCall(score_edit, post)


def _reweight_stats(stats: AttentionStats, post: PostPlan, weights: torch.Tensor, denominator: torch.Tensor,
                    edited: torch.Tensor, crossed_mass: torch.Tensor, crossed_out: torch.Tensor,
                    probe_request: StatsRequest | None, probe_groups: int) -> None:
    """Row statistics a recombination can give exactly: the probe's group masses and outputs, first_mass.

    ``lse``, ``entropy`` and the per-key column sums stay those of the unedited probabilities: a
    recombination knows each row's group totals, not each key's new share.
    """
    scale = torch.where(edited, 1.0 / torch.where(edited, denominator, 1.0), 1.0)
    cell_weights = torch.where(edited[..., None], weights, 1.0)
    first = stats.first_key  # [batch]
    first_label = post.labels.gather(1, first[:, None].to(post.labels.device))[:, 0]  # [batch]
    first_weight = weights.gather(-1, first_label.view(-1, 1, 1, 1).expand(*weights.shape[:3], 1))[..., 0]
    stats.first_mass = torch.where(edited, stats.first_mass * first_weight * scale, stats.first_mass)
    if probe_request is None or probe_request.key_groups is None:
        stats.group_mass = stats.group_out = None
        return
    mass = (crossed_mass * cell_weights[..., None, :]).sum(dim=-1) * scale[..., None]
    stats.group_mass = mass[..., 1:].float()
    if probe_request.group_outputs:
        out = (crossed_out.float() * cell_weights[..., None, :, None]).sum(dim=-2) * scale[..., None, None]
        stats.group_out = out[..., 1:, :].to(crossed_out.dtype)
    else:
        stats.group_out = None


def edited_pattern(query: torch.Tensor, key: torch.Tensor, mask: MaskSpec, scale: float | None,
                   sinks: torch.Tensor | None, edited: EditedCall) -> torch.Tensor:
    """Full probabilities ``[batch, head, query, key]`` (fp32) with the call's edits, via the eager backend."""
    probs = eager_pattern(query, key, mask, scale, sinks, edited.score_edit)
    if edited.post is not None and edited.post.weights is not None:
        probs = reweight_probs(probs, edited.post.labels.to(probs.device), edited.post.weights)
    return probs


class ActiveEdits:
    """The attention-site edits in force, bound to ``arch``, by layer, and the backend they run on.

    It is the ``AttentionEditor`` of ``headlab.kernels.attention_function``: ``intervene`` hands it to
    ``headlab_attention(model, editor=...)`` and the attention function calls ``plan_for``, ``run`` and
    ``pattern``."""

    def __init__(self, arch, edits: list, backend: str | None = None, tracker=None):
        self.arch = arch
        self.edits = edits
        self.backend = backend
        self.tracker = tracker
        by_layer: dict[int, list] = {}
        for edit in edits:
            for layer in edit.layers():
                by_layer.setdefault(layer, []).append(edit)
        self.plans = {layer: LayerPlan(layer, group, arch.n_heads) for layer, group in by_layer.items()}

    def plan_for(self, module: torch.nn.Module) -> tuple[int | None, LayerPlan | None]:
        layer = self.arch.layer_of(module)
        plan = self.plans.get(layer) if layer is not None else None
        return (layer, plan) if plan is not None else (None, None)

    def run(self, layer: int, plan: LayerPlan, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            attention_mask, mask: MaskSpec, scale: float | None, sinks: torch.Tensor | None, backend: str | None,
            request: StatsRequest | None) -> tuple[torch.Tensor, AttentionStats, EditedCall]:
        """One edited call: q ``[batch, head, query, dim]`` -> output ``[batch, head, query, dim_v]``, the edited
        call's statistics and what ``pattern`` needs. ``attention_mask``: the model's (a LazyMask, dense, None)."""
        call = AttentionCall.of(layer, query, key, attention_mask, self.tracker)
        return run_edited(plan, call, query, key, value, mask, scale, sinks, backend, request)

    def pattern(self, query: torch.Tensor, key: torch.Tensor, mask: MaskSpec, scale: float | None,
                sinks: torch.Tensor | None, edited: EditedCall) -> torch.Tensor:
        """``[batch, head, query, key]`` fp32 probabilities of a call ``run`` edited."""
        return edited_pattern(query, key, mask, scale, sinks, edited)

