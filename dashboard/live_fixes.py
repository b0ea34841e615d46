"""The training-free LVLM fixes (``headlab.analyses.lvlm_fixes``) as edits of the live page, without Streamlit.

A fix is not a plain intervention: ``generate_fixed`` sets it up per batch (PAINT's patches, VAR's sinks), runs
a no-image reference stream beside the image stream (VHR, PAI's guidance) and installs layer hooks. The page's
forms (``live_forms_lvlm``) return a ``LiveFix`` (one subclass per fix: the page lists edits by class name and
asks each for ``layers()`` and ``validate(arch)``), and ``live_model.greedy`` hands a list of edits that holds
one to ``greedy_fixed``: ``generate_fixed`` on the page's prompt and image.

The page's plain interventions may come along: they go into the same ``intervene`` block as the fixes' edits
(``PlainEdits``), so a conflict between them (two score edits of one layer on different query rows, two
post-softmax edits of one head) is refused before any compute. They edit the image stream only; the no-image
reference stream runs with every edit paused, as VHR and PAI's guidance define it (the plain edits' positions
are the image prompt's, which mean other tokens without the image).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from headlab.analyses.lvlm_fixes import FixContext, FixMethod, generate_fixed
from headlab.errors import InputError


@dataclass
class LiveFix:
    """One fix as a live edit: ``method`` (a ``FixMethod``) on a model of ``n_layers`` layers."""

    method: FixMethod
    n_layers: int

    def layers(self) -> list[int]:
        """The layers the fix edits: its ``layers`` field, or the method's default for this depth."""
        given = getattr(self.method, "layers", None)
        return sorted(set(self.method.default_layers(self.n_layers) if given is None else given))

    def validate(self, arch) -> None:
        bad = [layer for layer in self.layers() if not 0 <= layer < arch.n_layers]
        if arch.n_layers != self.n_layers or bad:
            raise InputError(f"{type(self).__name__}: layers {bad or self.layers()} do not fit a "
                             f"{arch.n_layers}-layer model; draw the form again on this model")


class PAI(LiveFix):
    """PAI (``Pai``): image keys of the last row boosted; optional guidance against the no-image stream."""


class PAINT(LiveFix):
    """PAINT (``Paint``): local and summary patches of the last row boosted."""


class VAF(LiveFix):
    """VAF (``Vaf``): image and system scores scaled in the middle layers."""


class VAR(LiveFix):
    """VAR (``Var``): sink attention moved to the image's other tokens."""


class VHR(LiveFix):
    """VHR (``Vhr``): z of the vision-aware heads scaled."""


@dataclass
class PlainEdits(FixMethod):
    """The page's plain interventions, installed with the fixes' edits in one ``intervene`` block."""

    interventions: list = field(default_factory=list)

    name: ClassVar[str] = "plain"

    def edits(self, ctx: FixContext) -> list:
        return list(self.interventions)


def fix_of(edit) -> FixMethod | None:
    """The ``FixMethod`` an edit stands for (a ``LiveFix``'s method, or a bare one), None for an intervention."""
    if isinstance(edit, LiveFix):
        return edit.method
    return edit if isinstance(edit, FixMethod) else None


def greedy_fixed(loaded, inp, max_new_tokens: int, edits: Sequence) -> list[int]:
    """New token ids of ``generate_fixed(loaded, [inp.sample], fixes, max_new_tokens=…)``, the plain interventions
    among ``edits`` in the same block. ``inp`` (a ``LiveInput``) must have an image: the fixes edit attention to
    it. The model is left bit-exact (``generate_fixed`` removes its edits and hooks on exit, on error too)."""
    fixes = [method for edit in edits if (method := fix_of(edit)) is not None]
    plain = [edit for edit in edits if fix_of(edit) is None]
    if inp.sample is None or not inp.image_spans:
        names = ", ".join(type(f).__name__.upper() for f in fixes)
        raise InputError(f"{names}: the LVLM fixes change attention to the image, and this prompt has none: upload "
                         "an image and press Run, or remove the fixes")
    methods = [*fixes, PlainEdits(plain)] if plain else fixes
    # One sample: generate_fixed builds the same tensors as the page (left padding of one row is none).
    tokens = generate_fixed(loaded, [inp.sample], methods, max_new_tokens=max_new_tokens)
    return tokens[0].tolist()
