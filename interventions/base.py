"""The protocol every intervention follows, the registry that names them, and head selections.

An intervention is a small ``@dataclass`` with one job. Its ``site`` says where it acts:
- ``"z"``: the per-head output before o_proj, ``[batch, query, head, d_head]``;
- ``"scores"``: the pre-softmax scores inside headlab's attention function (compiled to one ``ScoreEdit``);
- ``"probs"``: the post-softmax probabilities, as a recombination of group partial outputs;
- ``"residual"``: the residual stream, MLP output or logits, through ordinary PyTorch hooks.
``headlab.intervene`` groups them by site and installs them together.

Binding: an edit is a description, never tied to a model. ``edit.bind(arch)`` checks it against one model
and returns a ``Bound``: the edit plus what a run on that model needs (per-layer heads, per-head alphas,
means, …). The sites run the bound state; the edit itself is left as it was, so one edit object may be
installed on two models in turn, or at once (nested ``intervene`` blocks), each with its own resolution.
``validate(arch)`` only checks (it binds and drops the result).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, ClassVar

from headlab.errors import InputError

INTERVENTIONS: dict[str, type[Intervention]] = {}

# (layer, head); head None means every head of that layer.
HeadSpec = Sequence[tuple[int, int | None]]


def register_intervention(name: str):
    """Class decorator: file an intervention class under ``name`` in ``INTERVENTIONS``."""

    def add(cls: type[Intervention]) -> type[Intervention]:
        if name in INTERVENTIONS and INTERVENTIONS[name] is not cls:
            raise ValueError(f"intervention name {name!r} is already taken by {INTERVENTIONS[name].__name__}")
        cls.name = name
        INTERVENTIONS[name] = cls
        return cls

    return add


@dataclasses.dataclass(frozen=True, eq=False)
class Bound:
    """One intervention resolved against one model: what a run needs, held apart from the edit.

    ``edit``: the intervention (read, never written); ``by_layer``: ``{layer: (head, ...)}`` sorted, the heads
    it edits on this model (a ``None`` head expanded to the model's head count); ``state``: read-only
    per-edit values resolved for this model (e.g. HeadScale's ``alpha`` ``{(layer, head): float}``).
    Frozen, and compared by identity: two bindings of one edit are two objects.
    """

    edit: Intervention
    by_layer: Mapping[int, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    state: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        # Read-only views: a site must not change the resolution it was handed (nor the edit's own lists).
        object.__setattr__(self, "by_layer", MappingProxyType({int(k): tuple(v) for k, v in self.by_layer.items()}))
        object.__setattr__(self, "state", MappingProxyType(dict(self.state)))

    @property
    def site(self) -> str:
        return self.edit.site

    @property
    def name(self) -> str:
        return self.edit.name

    def layers(self) -> list[int]:
        """The layers this binding edits, ascending."""
        return sorted(self.by_layer)

    def heads_of(self, layer: int) -> list[int]:
        """The heads edited on ``layer`` (ascending; empty when the layer is not edited)."""
        return list(self.by_layer.get(layer, ()))

    def describe(self) -> str:
        return self.edit.describe()

    def with_state(self, **values: Any) -> Bound:
        """A copy with ``values`` added to ``state`` (the same class, edit and heads)."""
        return dataclasses.replace(self, state={**self.state, **values})


class Intervention:
    """Base of every intervention: a site, a binding to a model (``bind``), and the layers it names."""

    site: ClassVar[str] = ""
    name: ClassVar[str] = ""

    def bind(self, arch) -> Bound:
        """Check the edit against ``arch`` and return what a run on that model needs; ``InputError`` when it does
        not fit (before any compute). Must not change ``self``: everything resolved goes into the ``Bound``."""
        return Bound(self)

    def validate(self, arch) -> None:
        """Raise ``InputError`` when the intervention does not fit this model; changes nothing (binds, drops)."""
        self.bind(arch)

    def layers(self) -> list[int]:
        """The layers the edit names, without a model (a bound edit's ``layers()`` are the resolved ones)."""
        return []

    def describe(self) -> str:
        """Short name for messages: the class and the layers it touches."""
        layers = self.layers()
        where = f" on layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))}" if layers else ""
        return f"{type(self).__name__}{where}"


def spec_layers(heads: HeadSpec) -> list[int]:
    """The distinct layers a head spec names, ascending, without checking them against a model."""
    if isinstance(heads, tuple) and len(heads) == 2 and isinstance(heads[0], int):
        heads = [heads]  # one (layer, head) pair given bare
    return sorted({item[0] for item in heads if isinstance(item, tuple | list) and len(item) == 2
                   and isinstance(item[0], int)})


def every_head(layers: Sequence[int]) -> list[tuple[int, None]]:
    """A head spec naming every head of ``layers``: ``[(layer, None), ...]``."""
    return [(layer, None) for layer in layers]


def resolve_heads(heads: HeadSpec, arch, what: str) -> dict[int, list[int]]:
    """``[(layer, head or None)]`` -> ``{layer: sorted heads}``, checked against the model.

    Raises ``InputError`` naming the valid range for a layer or head that does not exist.
    """
    if isinstance(heads, tuple) and len(heads) == 2 and isinstance(heads[0], int):
        heads = [heads]  # one (layer, head) pair given bare
    by_layer: dict[int, set[int]] = {}
    for item in heads:
        if not (isinstance(item, tuple | list) and len(item) == 2):
            raise InputError(f"{what}: heads are (layer, head) pairs (head None = every head), got {item!r}")
        layer, head = item
        if not isinstance(layer, int) or not 0 <= layer < arch.n_layers:
            raise InputError(f"{what}: layer {layer} does not exist; this model has layers 0..{arch.n_layers - 1}")
        if head is None:
            by_layer.setdefault(layer, set()).update(range(arch.n_heads))
            continue
        if not isinstance(head, int) or not 0 <= head < arch.n_heads:
            raise InputError(f"{what}: head {head} of layer {layer} does not exist; this model has heads "
                             f"0..{arch.n_heads - 1}")
        by_layer.setdefault(layer, set()).add(head)
    if not by_layer:
        raise InputError(f"{what}: no heads given")
    return {layer: sorted(hs) for layer, hs in sorted(by_layer.items())}


def head_list(heads: HeadSpec, arch) -> list[tuple[int, int]]:
    """Every (layer, head) pair of a spec, in layer then head order."""
    return [(layer, h) for layer, hs in resolve_heads(heads, arch, "heads").items() for h in hs]
