"""``headlab.intervene``: install a set of interventions together, remove them on exit (on error too).

Everything is checked before the first hook goes in: layers and heads exist, caches fit the model,
no two edits claim the same site in conflicting ways, headlab's attention function can be switched
in when an attention-site edit needs it. Nothing touches the model's parameters, so the model is
bit-exact after exit; the attention implementation in force before is restored.

Each edit is bound to the model first (``edit.bind(arch)``); the hooks and plans hold those ``Bound``
objects, never state written on the edits, so the edits come out of the block as they went in.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

from headlab import arch as headlab_arch
from headlab.errors import InputError
from headlab.kernels.attention_function import active_editor, headlab_attention, without_editor
from headlab.kernels.layout import CallLayout, LayoutTracker
from headlab.kernels.positions import Positions

from .attention_call import ActiveEdits
from .base import Bound, Intervention
from .z_site import BoundZEdit, ZCall

# z edits that replace a head's output: two of them on one head cannot both hold.
_REPLACING = ("head_patch", "head_mean_ablate")


def check_conflicts(edits: list[Bound]) -> None:
    """Raise ``InputError`` naming the two edits that claim one site in ways that do not compose.

    ``edits``: bound to one model (``edit.bind(arch)``); two bindings of one edit object (the same edit in an
    outer and an inner block) are the same edit and do not conflict with each other."""
    claims: dict[tuple, Bound] = {}

    def claim(key: tuple, edit: Bound, why: str) -> None:
        other = claims.get(key)
        if other is not None and other.edit is not edit.edit:
            raise InputError(f"{other.describe()} and {edit.describe()} both {why} of layer {key[1]} head {key[2]}; "
                             "they cannot compose: use one, or split them over two intervene blocks run separately")
        claims[key] = edit

    for edit in edits:
        if edit.site == "z" and edit.name in _REPLACING:
            for layer in edit.layers():
                for h in edit.heads_of(layer):
                    claim(("replace", layer, h), edit, "replace z")
        if edit.site == "probs" and edit.group_weights() is None:
            for layer in edit.layers():
                for h in edit.heads_of(layer):
                    claim(("mass-driven", layer, h), edit, "reweight attention from its masses")
    # A mass-driven post-softmax edit (Redistribute) reads the unedited masses: any other on that head breaks it.
    for edit in edits:
        if edit.site != "probs" or edit.group_weights() is None:
            continue
        for layer in edit.layers():
            for h in edit.heads_of(layer):
                other = claims.get(("mass-driven", layer, h))
                if other is not None:
                    raise InputError(f"{other.describe()} and {edit.describe()} are both post-softmax edits of "
                                     f"layer {layer} head {h}; {type(other).__name__} reads the unedited masses, so "
                                     "it cannot compose with another reweighting there")
    _check_score_edits(edits)


def _check_score_edits(edits: list[Bound]) -> None:
    """Pre-softmax edits of one layer become one ScoreEdit: they must share rows, and on keys that may overlap
    they must keep signs (then their order does not matter)."""
    by_layer: dict[int, list] = {}
    for edit in edits:
        if edit.site == "scores":
            for layer in edit.layers():
                by_layer.setdefault(layer, []).append(edit)
    for layer, group in by_layer.items():
        first = group[0]
        for edit in group[1:]:
            if edit.row_positions != first.row_positions:
                raise InputError(f"{first.describe()} and {edit.describe()} edit scores of layer {layer} on "
                                 f"different query rows ({first.rows!r} vs {edit.rows!r}); one layer's score edits "
                                 "share their rows")
        for i, a in enumerate(group):
            for b in group[i + 1:]:
                shared = set(a.heads_of(layer)) & set(b.heads_of(layer))
                apart = Positions.of(a.keys).disjoint(Positions.of(b.keys))  # PAINT: local vs summary tokens
                if shared and not apart and not (a.keeps_sign() and b.keeps_sign()):
                    raise InputError(f"{a.describe()} and {b.describe()} both edit scores of layer {layer} head "
                                     f"{min(shared)} and one of them can flip a score's sign (mult < |add_abs|), "
                                     "so their order would matter; use one edit there")


def _needs_attention_function(edits: list[Bound]) -> bool:
    return any(edit.site in ("scores", "probs") for edit in edits)


def check_switchable(model, arch, layers: list[int]) -> None:
    """Attention-site edits need headlab's attention function; raise before compute when it cannot go in."""
    if not hasattr(model, "set_attn_implementation") or not hasattr(getattr(model, "config", None),
                                                                   "_attn_implementation"):
        raise InputError(f"{type(model).__name__} cannot switch its attention implementation, so attention-site "
                         "edits (ScoreBoost, Reweight, …) cannot run on it; z-site and residual edits still can")
    if getattr(model, "_supports_attention_backend", True) is False:
        raise InputError(f"{type(model).__name__} does not route attention through transformers' "
                         "AttentionInterface, so headlab's attention function cannot be switched in for "
                         "attention-site edits")
    # Where the architecture adapter can tell, each edited layer's attention must call the interface.
    calls_interface = getattr(headlab_arch, "calls_attention_interface", None)
    for layer in layers if calls_interface is not None else []:
        module = arch.attention(layer)
        if not calls_interface(type(module)):
            raise InputError(f"layer {layer}'s attention ({type(module).__name__}) does not call transformers' "
                             "AttentionInterface, so headlab's attention function cannot be switched in there")


class Intervened:
    """What ``intervene`` yields: the edits in force (as given), their bindings to this model (``bound``, in the
    same order), and the trainable parameters among them."""

    def __init__(self, edits: list[Intervention], bound: list[Bound] | None = None):
        self.edits = edits
        self.bound = bound if bound is not None else []

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for edit in self.edits if hasattr(edit, "parameters") for p in edit.parameters()]


# True inside ``paused()``: every installed edit lets the forward through unchanged.
_PAUSED: contextvars.ContextVar[bool] = contextvars.ContextVar("headlab_interventions_paused", default=False)


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Run forwards inside an ``intervene`` block as if no edit were installed (a reference stream that must
    stay unedited: the no-image branch of PAI's guidance, VHR's no-image z). Hooks stay in place."""
    token = _PAUSED.set(True)
    try:
        with without_editor():
            yield
    finally:
        _PAUSED.reset(token)


def is_paused() -> bool:
    """True inside ``paused()`` (hooks of methods built on interventions check it too)."""
    return _PAUSED.get()


def _z_hook(layer: int, edits: list[BoundZEdit], arch, tracker: LayoutTracker):
    def hook(module, args):
        if _PAUSED.get():
            return None
        x = args[0]
        z = x.view(*x.shape[:-1], arch.n_heads, arch.head_dim)  # [batch, query, head, d_head]
        call = tracker.current
        seen = call.seen if call is not None and call.n_query == x.shape[1] else 0
        zcall = ZCall(layer, seen, lambda p: tracker.rows(p, x.shape[0], x.shape[1], x.device))
        for edit in edits:
            z = edit.edit_z(z, zcall)
        return (z.reshape(x.shape), *args[1:])

    return hook


def _residual_hooks(bound: Bound, arch, tracker: LayoutTracker) -> list:
    edit = bound.edit  # ResidualAdd resolves nothing per model: its binding only checked it
    layer = arch.layers[edit.layer]
    positions = Positions.of(edit.rows)

    def rows(x):
        return tracker.rows(positions, x.shape[0], x.shape[1], x.device)

    if edit.point == "resid_pre":
        def pre(module, args, kwargs):
            if _PAUSED.get():
                return None
            if args:
                return (edit.edit(args[0], rows(args[0])), *args[1:]), kwargs
            hidden = kwargs["hidden_states"]
            return args, {**kwargs, "hidden_states": edit.edit(hidden, rows(hidden))}

        return [layer.register_forward_pre_hook(pre, with_kwargs=True, prepend=True)]

    module = layer if edit.point == "resid_post" else arch.mlp(edit.layer)

    def post(module, args, output):
        if _PAUSED.get():
            return None
        if isinstance(output, tuple):
            return (edit.edit(output[0], rows(output[0])), *output[1:])
        return edit.edit(output, rows(output))

    return [module.register_forward_hook(post, prepend=True)]


@contextlib.contextmanager
def intervene(loaded, *edits: Intervention, backend: str | None = None) -> Iterator[Intervened]:
    """Install ``edits`` on ``loaded`` for the duration of the block.

    ``backend`` picks the attention kernel for attention-site edits (default: the device's; an active
    ``AttentionProbe``'s backend wins). Nested ``intervene`` blocks add their edits to the outer ones.
    """
    arch, model = loaded.arch, loaded.model
    edits = list(edits)
    bound: list[Bound] = []  # what this block runs: each edit resolved for this model, the edit left untouched
    for edit in edits:
        if not isinstance(edit, Intervention):
            raise InputError(f"intervene takes interventions (HeadScale, ScoreBoost, …), got {type(edit).__name__}")
        if edit.site == "composed":
            raise InputError(f"{type(edit).__name__} composes its edits per batch of images: run it with "
                             "headlab.analyses.lvlm_fixes.generate_fixed (or `headlab fix`), or pass its edits")
        bound.append(edit.bind(arch))
        if hasattr(edit, "check_model"):
            edit.check_model(loaded.name)
    outer = active_editor()
    inherited = outer.edits if isinstance(outer, ActiveEdits) and outer.arch is arch else []
    check_conflicts(inherited + bound)
    attention_edits = [b for b in bound if b.site in ("scores", "probs")]
    if attention_edits:
        check_switchable(model, arch, sorted({layer for b in attention_edits for layer in b.layers()}))

    tracker = LayoutTracker(model)
    z_edits = [b for b in bound if isinstance(b, BoundZEdit)]

    def check_call(call: CallLayout | None) -> None:
        if call is not None:
            for z_edit in z_edits:  # HeadPatch checks the cache's shape; the others accept any call
                z_edit.check_call(call.batch, call.n_query, call.seen)

    handles: list = []
    with contextlib.ExitStack() as stack:
        # Cleanups go in before what they undo, so a failure halfway through installing undoes what went in;
        # they run last in, first out: the switch, then the hooks, then the tracker.
        stack.callback(tracker.remove)
        tracker.install(check_call)
        stack.callback(lambda: [handle.remove() for handle in reversed(handles)])
        by_layer: dict[int, list[BoundZEdit]] = {}
        for b in bound:
            if b.site == "z":
                for layer in b.layers():
                    by_layer.setdefault(layer, []).append(b)
        for layer, group in by_layer.items():
            hook = _z_hook(layer, group, arch, tracker)
            # prepend: edits run before any reader (a trace) hooked on the same o_proj.
            handles.append(arch.o_proj(layer).register_forward_pre_hook(hook, prepend=True))
        for b in bound:
            if b.site == "residual":
                handles.extend(_residual_hooks(b, arch, tracker))
        if attention_edits:
            # The one switch: sets the editor, switches to headlab's attention function unless an enclosing
            # probe or block already did, and gives back both on exit, on error too.
            editor = ActiveEdits(arch, inherited + attention_edits, backend, tracker)
            stack.enter_context(headlab_attention(model, editor=editor))
        yield Intervened(edits, bound)
