"""Live interventions: a small registry of forms, one per kind of edit, that the live page offers for its
"with edits" generation.

A form draws its widgets into the current Streamlit container and returns the ``headlab.interventions`` it
stands for (raising ``InputError`` when its settings do not make one). Register one with a decorator::

    from headlab.dashboard.live_forms import LiveContext, register_live_intervention

    @register_live_intervention("my_edit", "My edit", description="what it does, one line", needs_image=False)
    def my_edit_form(ctx: LiveContext, key: str) -> list[Intervention]:
        heads = ctx.heads_widget(key)                      # (layer, head) pairs, the clicked head preselected
        alpha = st.slider("alpha", 0.0, 4.0, 2.0, key=f"{key}-alpha")   # widget keys start with key
        return [HeadScale(heads, alpha=alpha)]

in this module or in a module of the dashboard package named ``live_forms_*.py`` (each is imported when the
live page opens; one that fails to import is reported on the page and the others stay usable). ``ctx`` holds
the model, the prompt's tokens, its image spans (LVLMs) and ``ctx.z_trace(layers)`` (z of the prompt, for
edits that need reference activations).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import streamlit as st

from headlab.errors import HeadlabError, InputError
from headlab.interventions import AttentionOverride, HeadMeanAblate, HeadScale, Intervention, KeyKnockout

from .live_model import LiveInput, LiveModel

IMAGE_KEYS = "image tokens"


@dataclass
class LiveContext:
    """What a form may use: the shared model (run forward passes under ``live.lock``), the prompt's input, the
    head picked on the page, and a per-session memo for reference activations."""

    live: LiveModel
    input: LiveInput
    head: tuple[int, int] = (0, 0)
    memo: dict = field(default_factory=dict)

    @property
    def loaded(self):
        return self.live.loaded

    @property
    def n_layers(self) -> int:
        return self.loaded.arch.n_layers

    @property
    def n_heads(self) -> int:
        return self.loaded.arch.n_heads

    def heads_widget(self, key: str, label: str = "heads") -> list[tuple[int, int | None]]:
        """Heads picked as ``layer.head`` (the page's head preselected) plus whole layers; ``InputError`` if none."""
        options = [f"{layer}.{head}" for layer in range(self.n_layers) for head in range(self.n_heads)]
        heads = st.multiselect(f"{label} (layer.head)", options, default=[f"{self.head[0]}.{self.head[1]}"],
                               key=f"{key}-heads", help="the head picked above is preselected")
        layers = st.multiselect("and every head of layers", list(range(self.n_layers)), key=f"{key}-layers")
        chosen = [tuple(int(x) for x in h.split(".")) for h in heads] + [(layer, None) for layer in layers]
        if not chosen:
            raise InputError("pick at least one head or layer")
        return chosen

    def positions_widget(self, key: str, label: str = "query rows") -> str:
        """``"all"`` or ``"last"`` (the prompt's last row at prefill, then every new token)."""
        choices = {"all": "all rows", "last": "last row only (the prompt's last, then each new token)"}
        return st.radio(label, list(choices), format_func=choices.get, horizontal=True, key=f"{key}-rows")

    def keys_widget(self, key: str, label: str = "keys") -> list[int | tuple[int, int]]:
        """Prompt positions (and, with an image, all its tokens at once); ``InputError`` if none."""
        labels = self.input.token_labels()
        options = ([IMAGE_KEYS] if self.input.image_spans else []) + list(range(len(labels)))
        picked = st.multiselect(f"{label} (prompt positions)", options, default=[0], key=f"{key}-keys",
                                format_func=lambda o: o if o == IMAGE_KEYS else labels[o])
        keys: list[int | tuple[int, int]] = []
        for item in picked:
            keys.extend(self.input.image_spans if item == IMAGE_KEYS else [int(item)])
        if not keys:
            raise InputError("pick at least one key position")
        return keys

    def z_trace(self, layers: Sequence[int]):
        """``headlab.trace`` of ``blocks.{l}.attn.hook_z`` on the prompt (memoised per session and prompt)."""
        import torch

        import headlab

        layers = sorted(set(layers))
        memo_key = ("z", self.live.name, self.input.cache_key(), tuple(layers))
        if memo_key not in self.memo:
            names = [f"blocks.{layer}.attn.hook_z" for layer in layers]
            with self.live.lock, torch.no_grad(), headlab.trace(self.loaded, names, stats=False) as t:
                self.loaded.model(**self.input.tensors)
            self.memo[memo_key] = t
        return self.memo[memo_key]


FormFunction = Callable[[LiveContext, str], list[Intervention]]


@dataclass(frozen=True)
class LiveIntervention:
    """One entry of the registry: its ``name`` (widget keys), ``label`` (the page), ``form`` and whether it only
    applies to prompts with an image."""

    name: str
    label: str
    form: FormFunction
    description: str = ""
    needs_image: bool = False


LIVE_INTERVENTIONS: dict[str, LiveIntervention] = {}
_BROKEN_FORMS: dict[str, str] = {}  # module -> error


def register_live_intervention(name: str, label: str, description: str = "",
                               needs_image: bool = False) -> Callable[[FormFunction], FormFunction]:
    """Function decorator: file a form under ``name`` (re-registering the same function is allowed: reruns)."""

    def decorate(form: FormFunction) -> FormFunction:
        existing = LIVE_INTERVENTIONS.get(name)
        if existing is not None and existing.form.__qualname__ != form.__qualname__:
            raise HeadlabError(f"live intervention {name!r} is already the form {existing.form.__qualname__}")
        LIVE_INTERVENTIONS[name] = LiveIntervention(name, label, form, description, needs_image)
        return form

    return decorate


def available(ctx: LiveContext) -> dict[str, LiveIntervention]:
    """The registered forms that apply to this input (image-only ones need an image), after loading extensions."""
    load_forms()
    return {name: form for name, form in LIVE_INTERVENTIONS.items() if not form.needs_image or ctx.input.image_spans}


def load_forms(package: str = "headlab.dashboard", prefix: str = "live_forms_") -> dict[str, str]:
    """Import every ``live_forms_*`` module of the dashboard package; returns the ones that failed, with why."""
    module = importlib.import_module(package)
    for info in pkgutil.iter_modules(module.__path__):
        if info.name.startswith(prefix):
            name = f"{package}.{info.name}"
            try:
                importlib.import_module(name)
                _BROKEN_FORMS.pop(name, None)
            except Exception as err:  # one broken extension must not take the built-in forms down
                _BROKEN_FORMS[name] = f"{type(err).__name__}: {err}"
    return dict(_BROKEN_FORMS)


# ------------------------------------------------------------------------------------------ built-in forms

@register_live_intervention("head_ablation", "Head ablation",
                            "knock heads out: their output z set to zero (scale 0), or to its mean over this "
                            "prompt's tokens (mean ablation)")
def head_ablation_form(ctx: LiveContext, key: str) -> list[Intervention]:
    heads = ctx.heads_widget(key)
    how = st.radio("ablate to", ["zero", "mean"], horizontal=True, key=f"{key}-how",
                   format_func={"zero": "zero (z = 0)", "mean": "the mean z over this prompt's tokens"}.get)
    rows = ctx.positions_widget(key, "positions")
    if how == "zero":
        return [HeadScale(heads, alpha=0.0, rows=rows)]
    layers = [layer for layer, _ in heads]
    return [HeadMeanAblate(heads, source=ctx.z_trace(layers), rows=rows)]


@register_live_intervention("head_scale", "Head scale", "z <- alpha z for chosen heads (VHR-style: alpha = 2)")
def head_scale_form(ctx: LiveContext, key: str) -> list[Intervention]:
    heads = ctx.heads_widget(key)
    alpha = st.number_input("alpha", min_value=-4.0, max_value=10.0, value=2.0, step=0.5, key=f"{key}-alpha")
    rows = ctx.positions_widget(key, "positions")
    return [HeadScale(heads, alpha=float(alpha), rows=rows)]


@register_live_intervention("attention_override", "Attention override",
                            "the chosen rows attend only to the chosen keys (renormalised over them)")
def attention_override_form(ctx: LiveContext, key: str) -> list[Intervention]:
    heads = ctx.heads_widget(key)
    keys = ctx.keys_widget(key, "attend only to")
    rows = ctx.positions_widget(key)
    return [AttentionOverride(heads, keys=keys, rows=rows)]


@register_live_intervention("key_knockout", "Key knockout",
                            "the chosen rows cannot attend to the chosen keys (the rest renormalised)")
def key_knockout_form(ctx: LiveContext, key: str) -> list[Intervention]:
    heads = ctx.heads_widget(key)
    keys = ctx.keys_widget(key, "knock out")
    rows = ctx.positions_widget(key)
    return [KeyKnockout(heads, keys=keys, rows=rows)]
