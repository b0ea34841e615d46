"""Edits inside headlab's attention function: pre-softmax score edits and post-softmax group reweighting.

Pre-softmax (site ``"scores"``): ``ScoreBoost`` (PAI / PAINT, s += alpha |s|) and ``ScoreScale``
(VAF, s *= gamma) on a key group; all of one layer compile to one ``ScoreEdit`` per call, which every
kernel backend applies where it forms the scores. Either may carry a per-sample ``strength`` ``[batch]``
in [0, 1], read at every call (the adaptive PAI / VAF of the LVLM fixes set it at each decoding step):
0 leaves the sample's scores as they are, 1 is the edit as written.

Post-softmax (site ``"probs"``): ``Reweight`` (p' = p · w / sum p · w, per key group, with a weight for
the rest), and the edits built on it: ``KeyKnockout`` (w = 0 on the keys), ``AttentionOverride``
(w = 1 on the keys, 0 elsewhere) and ``Redistribute`` (VAR: sinks x p, the freed mass to targets in
proportion to their attention). They run as a recombination of the kernels' group partial outputs
and masses (``recombine.py``): no second attention pass, no T x T.

Keys and rows are ``Positions`` (counted from the first real token); heads are (layer, head) pairs.
``edit.bind(arch)`` gives a ``BoundAttentionEdit`` (heads per layer and rows of that model); the compiled
plans (``attention_call.LayerPlan``) read it, and through it the edit's coefficients and weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from headlab.errors import InputError
from headlab.kernels.positions import Positions, PositionSpec

from .base import Bound, HeadSpec, Intervention, register_intervention, resolve_heads, spec_layers


class BoundAttentionEdit(Bound):
    """An attention-site edit bound to one model: its heads per layer and its query rows (``row_positions``);
    the rest (key groups, coefficients, weights) is read from the edit at each call, so an edit whose key sets
    change while the forward runs (VAR's sinks) is seen as it is then."""

    @property
    def row_positions(self) -> Positions:
        return self.state["rows"]

    @property
    def keys(self) -> PositionSpec:
        return self.edit.keys

    @property
    def rows(self) -> PositionSpec:
        return self.edit.rows

    def key_specs(self) -> list[PositionSpec]:
        return self.edit.key_specs()

    def coefficients(self) -> tuple[float, float]:
        return self.edit.coefficients()

    @property
    def strength(self) -> torch.Tensor | None:
        return self.edit.strength

    def sample_coefficients(self, strength: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.edit.sample_coefficients(strength)

    def keeps_sign(self) -> bool:
        return self.edit.keeps_sign()

    def group_weights(self) -> list[float] | None:
        return self.edit.group_weights()

    def rest_weight(self) -> float:
        return self.edit.rest_weight()

    def dynamic_weights(self, masses: list[torch.Tensor],
                        rest: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        return self.edit.dynamic_weights(masses, rest)


class AttentionEdit(Intervention):
    """Common part: ``heads`` [(layer, head or None)], query ``rows`` (default every row)."""

    heads: HeadSpec
    rows: PositionSpec

    def bind(self, arch) -> BoundAttentionEdit:
        by_layer = resolve_heads(self.heads, arch, type(self).__name__)
        rows = Positions.of(self.rows)
        for spec in self.key_specs():
            Positions.of(spec)
        return BoundAttentionEdit(self, by_layer, {"rows": rows})

    def layers(self) -> list[int]:
        return spec_layers(self.heads)

    def key_specs(self) -> list[PositionSpec]:
        """The key groups this edit names, in order."""
        raise NotImplementedError


class ScoreEditPart(AttentionEdit):
    """A pre-softmax edit of one key group: s' = mult · s + add_abs · |s| on its keys.

    ``strength``: None (the edit as written, for every sample), or ``[batch]`` fp32 in [0, 1], how much of the
    edit each sample of the call gets: (mult, add_abs) move linearly from the identity (1, 0) at 0 to the
    edit's own coefficients at 1. Read at every call, so whoever holds the edit may change it between decoding
    steps; in [0, 1] an edit that keeps signs (``keeps_sign``) still does."""

    site = "scores"
    keys: PositionSpec
    strength: torch.Tensor | None = None

    def key_specs(self) -> list[PositionSpec]:
        return [self.keys]

    def coefficients(self) -> tuple[float, float]:
        """(mult, add_abs) of this edit."""
        raise NotImplementedError

    def sample_coefficients(self, strength: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mult, add_abs) per sample ``[batch]`` fp32 at ``strength`` ``[batch]``: mult·w + 1 − w, add_abs·w.

        Written so that w = 1 gives exactly ``coefficients()`` and w = 0 exactly the identity (1, 0) in fp32:
        where the edit alone covers a key, a full-strength step is the plain edit bit for bit and a
        zero-strength step no edit."""
        mult, add = self.coefficients()
        w = strength.float()
        return mult * w + (1.0 - w), add * w

    def keeps_sign(self) -> bool:
        """True when s -> mult · s + add_abs · |s| never flips a score's sign (then edits compose)."""
        mult, add = self.coefficients()
        return mult >= abs(add)


@register_intervention("score_boost")
@dataclass
class ScoreBoost(ScoreEditPart):
    """PAI / PAINT: s += alpha · |s| on ``keys`` for ``rows`` (PAINT: last row, alpha 0.7 local, 0.3 summary);
    with ``strength`` w ``[batch]``: s += alpha · w_b · |s|."""

    heads: HeadSpec
    keys: PositionSpec
    alpha: float
    rows: PositionSpec = "all"
    strength: torch.Tensor | None = field(default=None, compare=False)

    def coefficients(self) -> tuple[float, float]:
        return 1.0, float(self.alpha)


@register_intervention("score_scale")
@dataclass
class ScoreScale(ScoreEditPart):
    """VAF-style scaling: s *= gamma on ``keys`` for ``rows``; with ``strength`` w ``[batch]``:
    s *= gamma · w_b + 1 − w_b."""

    heads: HeadSpec
    gamma: float
    keys: PositionSpec = "all"
    rows: PositionSpec = "all"
    strength: torch.Tensor | None = field(default=None, compare=False)

    def coefficients(self) -> tuple[float, float]:
        return float(self.gamma), 0.0


class ProbEdit(AttentionEdit):
    """A post-softmax edit: per-row weights on its key groups and on the rest (other keys and the sink)."""

    site = "probs"

    def group_weights(self) -> list[float] | None:
        """Static weight of each key group, or None when the weights depend on the row's masses."""
        raise NotImplementedError

    def rest_weight(self) -> float:
        return 1.0

    def dynamic_weights(self, masses: list[torch.Tensor],
                        rest: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Weights from the row masses of its groups ``[batch, head, query]`` each (and the rest's)."""
        raise NotImplementedError


@register_intervention("reweight")
@dataclass
class Reweight(ProbEdit):
    """p' = p · w / sum p · w: weight ``w`` per key group (``groups`` = [(keys, w), ...]), ``rest`` elsewhere.

    ``rest`` also weighs a learned sink logit's mass (``s_aux``); weights must be >= 0. A key named by
    two groups of one edit belongs to the first.
    """

    heads: HeadSpec
    groups: list[tuple[PositionSpec, float]]
    rest: float = 1.0
    rows: PositionSpec = "all"

    def bind(self, arch) -> BoundAttentionEdit:
        bound = super().bind(arch)
        weights = [w for _, w in self.groups] + [self.rest]
        if any(float(w) < 0 for w in weights):
            raise InputError(f"{type(self).__name__}: weights must be >= 0, got {weights}")
        return bound

    def key_specs(self) -> list[PositionSpec]:
        return [keys for keys, _ in self.groups]

    def group_weights(self) -> list[float]:
        return [float(w) for _, w in self.groups]

    def rest_weight(self) -> float:
        return float(self.rest)


@register_intervention("key_knockout")
@dataclass
class KeyKnockout(ProbEdit):
    """``keys`` removed from chosen rows, the rows renormalised over what is left (the sink keeps weight 1)."""

    heads: HeadSpec
    keys: PositionSpec
    rows: PositionSpec = "all"

    def key_specs(self) -> list[PositionSpec]:
        return [self.keys]

    def group_weights(self) -> list[float]:
        return [0.0]


@register_intervention("attention_override")
@dataclass
class AttentionOverride(ProbEdit):
    """Rows put onto ``keys`` only: their attention renormalised over those keys (the sink gets none).

    Rows whose chosen keys are all invisible (masked, or outside the sequence) keep their output.
    """

    heads: HeadSpec
    keys: PositionSpec
    rows: PositionSpec = "all"

    def key_specs(self) -> list[PositionSpec]:
        return [self.keys]

    def group_weights(self) -> list[float]:
        return [1.0]

    def rest_weight(self) -> float:
        return 0.0


@register_intervention("redistribute")
@dataclass
class Redistribute(ProbEdit):
    """VAR: sink keys x ``p``; the freed mass (1 - p) · m_sinks goes to ``targets`` in proportion to their
    attention, so rows still sum to one. ``paper_semantics``: sinks x (1 - p), budget p · m_sinks.

    Keys in both groups count as sources. A row with no target mass keeps the freed mass out (renormalised).
    """

    heads: HeadSpec
    sources: PositionSpec
    targets: PositionSpec
    p: float = 0.6
    rows: PositionSpec = "all"
    paper_semantics: bool = False

    def bind(self, arch) -> BoundAttentionEdit:
        bound = super().bind(arch)
        if not 0.0 <= self.p <= 1.0:
            raise InputError(f"Redistribute: p must lie in [0, 1], got {self.p}")
        return bound

    def key_specs(self) -> list[PositionSpec]:
        return [self.sources, self.targets]

    def group_weights(self) -> None:
        return None

    def dynamic_weights(self, masses, rest):
        keep = 1.0 - self.p if self.paper_semantics else self.p
        sinks, targets = masses
        budget = (1.0 - keep) * sinks
        target_weight = torch.where(targets > 0, 1.0 + budget / targets.clamp_min(1e-30), 1.0)
        return [torch.full_like(sinks, keep), target_weight], torch.ones_like(rest)
