"""What is changed in a running model: one protocol, three sites (z, attention, residual).

``with headlab.intervene(loaded, *edits):`` installs edits together and removes them on exit.
Each edit is a small dataclass found through ``INTERVENTIONS`` by its registered name.
"""

from headlab.bare_imports import refuse_bare

refuse_bare(__name__)  # headlab.bare_imports says why

from headlab.kernels.positions import Positions, SequenceLayout

from .attention_call import ActiveEdits, AttentionCall, LayerPlan, run_edited
from .attention_site import (
    AttentionOverride,
    BoundAttentionEdit,
    KeyKnockout,
    ProbEdit,
    Redistribute,
    Reweight,
    ScoreBoost,
    ScoreEditPart,
    ScoreScale,
)
from .base import (
    INTERVENTIONS,
    Bound,
    Intervention,
    every_head,
    head_list,
    register_intervention,
    resolve_heads,
    spec_layers,
)
from .context import Intervened, intervene, paused
from .hook_site import Hook
from .recombine import recombine, reweight_probs
from .residual_site import RESIDUAL_POINTS, ResidualAdd
from .visual_redistribute import VisualRedistribute
from .z_site import BoundZEdit, HeadMeanAblate, HeadOffsets, HeadPatch, HeadScale, ZAffine, ZEdit

__all__ = [
    "INTERVENTIONS",
    "RESIDUAL_POINTS",
    "ActiveEdits",
    "AttentionCall",
    "AttentionOverride",
    "Bound",
    "BoundAttentionEdit",
    "BoundZEdit",
    "HeadMeanAblate",
    "HeadOffsets",
    "HeadPatch",
    "HeadScale",
    "Hook",
    "Intervened",
    "Intervention",
    "KeyKnockout",
    "LayerPlan",
    "Positions",
    "ProbEdit",
    "Redistribute",
    "ResidualAdd",
    "Reweight",
    "ScoreBoost",
    "ScoreEditPart",
    "ScoreScale",
    "SequenceLayout",
    "ZAffine",
    "VisualRedistribute",
    "ZEdit",
    "every_head",
    "head_list",
    "intervene",
    "paused",
    "recombine",
    "register_intervention",
    "resolve_heads",
    "reweight_probs",
    "run_edited",
    "spec_layers",
]
