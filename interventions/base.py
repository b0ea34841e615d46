"""The protocol every intervention follows, the registry that names them, and head selections.

An intervention is a small ``@dataclass`` with one job. Its ``site`` says where it acts:
- ``"z"``: the per-head output before o_proj, ``[batch, query, head, d_head]``;
- ``"scores"``: the pre-softmax scores inside headlab's attention function (compiled to one ``ScoreEdit``);
- ``"probs"``: the post-softmax probabilities, as a recombination of group partial outputs;
- ``"residual"``: the residual stream, MLP output or logits, through ordinary PyTorch hooks.
``headlab.intervene`` groups them by site and installs them together.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

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


class Intervention:
    """Base of every intervention: a site, a check against the model, and the layers it touches."""

    site: ClassVar[str] = ""
    name: ClassVar[str] = ""

    def validate(self, arch) -> None:
        """Raise ``InputError`` when the intervention does not fit this model (before any compute)."""

    def layers(self) -> list[int]:
        return []

    def describe(self) -> str:
        """Short name for messages: the class and the layers it touches."""
        layers = self.layers()
        where = f" on layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))}" if layers else ""
        return f"{type(self).__name__}{where}"


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
