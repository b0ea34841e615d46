"""VAR's redistribution (Kang et al., 2025) as an attention-site edit: in rows that attend to the image mostly
through its non-sink tokens, a share of the mass on the sink tokens moves to the image's other tokens.

The key groups (text sinks, visual sinks, the rest of the image) are per sample and found by the fix at
prefill (``headlab.analyses.lvlm_fixes.Var``); the edit itself needs no more than the row masses of its
groups, so it costs no second attention pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from headlab.kernels.positions import Positions

from .attention_site import ProbEdit
from .base import register_intervention


@register_intervention("visual_redistribute")
@dataclass
class VisualRedistribute(ProbEdit):
    """VAR on one layer: key groups text sinks, visual sinks, image non-sinks (per sample, set at prefill by
    ``Var``); rows are selected per head from their unedited masses (image ≥ summ, non-sink share ≥ rho)."""

    layer: int
    rows: Positions
    p: float = 0.6
    summ: float = 0.2
    rho: float = 0.5
    paper_semantics: bool = False
    text_sinks: Positions = field(default_factory=lambda: Positions.of([]))
    visual_sinks: Positions = field(default_factory=lambda: Positions.of([]))
    image_rest: Positions = field(default_factory=lambda: Positions.of([]))
    n_image: torch.Tensor | None = None  # [batch] image tokens per sample
    has_visual_sink: torch.Tensor | None = None  # [batch] bool

    def __post_init__(self):
        self.heads = [(self.layer, None)]

    def key_specs(self):
        return [self.text_sinks, self.visual_sinks, self.image_rest]

    def group_weights(self):
        return None

    def dynamic_weights(self, masses, rest):
        text_sink, visual_sink, image_rest = masses
        image = visual_sink + image_rest
        n_image = self.n_image.to(image.device)[:, None, None].to(image.dtype)
        share = image_rest / (image + 1e-6 * n_image)
        chosen = (image >= self.summ) & (share >= self.rho) & self.has_visual_sink.to(image.device)[:, None, None]
        keep = 1.0 - self.p if self.paper_semantics else self.p
        budget = (1.0 - keep) * (text_sink + visual_sink)
        boost = torch.where(image_rest > 0, 1.0 + budget / image_rest.clamp_min(1e-30), 1.0)
        one = torch.ones_like(rest)
        sink_weight = torch.where(chosen, keep, one)
        return [sink_weight, sink_weight, torch.where(chosen, boost, one)], one
