"""The five training-free LVLM fixes (``headlab.analyses.lvlm_fixes``) as live-page forms, offered when the
prompt has an image (llava-smol, tiny-llava, …). Each form returns one ``live_fixes.LiveFix``; the page's
"with edits" generation then runs through ``generate_fixed`` on its prompt and image (``live_model.greedy``),
so the text equals what ``generate_fixed`` gives for the same sample. Every field a form leaves alone keeps the
method's default (its layers, PAI's plausibility cutoff, PAINT's local fraction, VAR's summ and rho)."""

from __future__ import annotations

import math

import streamlit as st

from headlab.analyses.lvlm_fixes import Pai, Paint, Vaf, Var, Vhr
from headlab.errors import InputError

from .live_fixes import PAI, PAINT, VAF, VAR, VHR, LiveFix
from .live_forms import LiveContext, register_live_intervention

# llava-smol's measured sink profile (SmolLM2-135M backbone, hidden size 576, so phi <= 24): its text sinks sit
# near the ceiling while its image tokens stay below 20, so VAR's default tau finds no visual sink there.
VAR_TAU_HINTS = {"llava-smol": 15.0, "llava-real": 15.0}  # llava-real: the same frozen smollm2-135m


@register_live_intervention("fix_pai", "PAI (LVLM fix)", needs_image=True, description=(
    "Paying more attention to image (Liu et al., ECCV 2024): s += alpha |s| on the image keys of the last query "
    "row, layers 2 … L−1; guidance optionally mixes in the next-token distribution without the image"))
def pai_form(ctx: LiveContext, key: str) -> list[LiveFix]:
    alpha = st.number_input("alpha", min_value=0.0, max_value=50.0, value=0.2, step=0.1, key=f"{key}-alpha")
    cfg = st.checkbox("guidance: gamma log p(y | image) − (gamma − 1) log p(y | no image), over the tokens within "
                      "0.1 x the top probability (a no-image stream runs beside)", key=f"{key}-cfg")
    gamma = st.number_input("gamma", min_value=1.0, max_value=10.0, value=1.1, step=0.1, key=f"{key}-gamma",
                            disabled=not cfg)
    return [PAI(Pai(alpha=float(alpha), cfg=cfg, gamma=float(gamma)), ctx.n_layers)]


@register_live_intervention("fix_paint", "PAINT (LVLM fix)", needs_image=True, description=(
    "Arif et al., 2025: s += alpha |s| on the local patches (top 25% by CLS attention, vision layer 0) and "
    "beta |s| on the summary patches (IQR outliers, second-to-last vision layer), last query row, layers 2 … L−1; "
    "needs a CLIP-style vision tower with a CLS token"))
def paint_form(ctx: LiveContext, key: str) -> list[LiveFix]:
    left, right = st.columns(2)
    alpha = left.number_input("alpha (local)", min_value=0.0, max_value=50.0, value=0.7, step=0.1,
                              key=f"{key}-alpha")
    beta = right.number_input("beta (summary)", min_value=0.0, max_value=50.0, value=0.3, step=0.1,
                              key=f"{key}-beta")
    return [PAINT(Paint(alpha=float(alpha), beta=float(beta)), ctx.n_layers)]


@register_live_intervention("fix_vaf", "VAF (LVLM fix)", needs_image=True, description=(
    "ClearSight (Yin et al., CVPR 2025): before the softmax, image scores x image scale and system-prompt scores "
    "x system scale for the text after the image, in the middle layers (9–14 of 32, scaled with depth)"))
def vaf_form(ctx: LiveContext, key: str) -> list[LiveFix]:
    left, right = st.columns(2)
    image = left.number_input("image scale", min_value=0.0, max_value=10.0, value=1.15, step=0.05,
                              key=f"{key}-image")
    system = right.number_input("system scale", min_value=0.0, max_value=10.0, value=0.95, step=0.05,
                                key=f"{key}-system")
    return [VAF(Vaf(image_scale=float(image), system_scale=float(system)), ctx.n_layers)]


@register_live_intervention("fix_var", "VAR (LVLM fix)", needs_image=True, description=(
    "Visual attention redistribution (Kang et al., ICLR 2025): tokens with phi = max over the sink dimensions "
    "|x_d / RMS(x)| > tau are sinks; in heads that look at the image, sinks keep p of their attention and the "
    "rest goes to the image's other tokens (layers 2 … L−1)"))
def var_form(ctx: LiveContext, key: str) -> list[LiveFix]:
    hidden = ctx.loaded.arch.hidden_size
    left, right = st.columns(2)
    tau = left.number_input("tau", min_value=0.0, max_value=1000.0, value=20.0, step=1.0, key=f"{key}-tau")
    p = right.slider("p (the share sinks keep)", 0.0, 1.0, 0.6, step=0.05, key=f"{key}-p")
    text = st.text_input("sink dimensions (blank: found from the model's massive activations on this prompt)",
                         key=f"{key}-dims", placeholder="e.g. 0, 1, 2")
    notes = [f"phi cannot exceed √d = {math.sqrt(hidden):.3g} here (hidden size d = {hidden}): a tau above that "
             "finds no sink at all."] if hidden else []
    hint = VAR_TAU_HINTS.get(ctx.loaded.name)
    if hint is not None:
        notes.append(f"{ctx.loaded.name} shows no visual sink at tau = 20 (on our test images its image tokens stay "
                     f"below 20 while its text sinks reach the ceiling): try tau = {hint:g}.")
    if notes:
        st.caption(" ".join(notes) + " Where no visual sink is found, VAR edits nothing.")
    return [VAR(Var(tau=float(tau), p=float(p), dims=parse_dims(text, hidden)), ctx.n_layers)]


@register_live_intervention("fix_vhr", "VHR (LVLM fix)", needs_image=True, description=(
    "Vision-aware head reinforcement (He et al., ACL 2025): z of the heads above their layer's median VHD "
    "(the distance from the no-image stream, chosen at every step) x alpha, in layer 1 and the last 14/32"))
def vhr_form(ctx: LiveContext, key: str) -> list[LiveFix]:
    alpha = st.number_input("alpha", min_value=-10.0, max_value=50.0, value=2.0, step=0.5, key=f"{key}-alpha")
    return [VHR(Vhr(alpha=float(alpha)), ctx.n_layers)]


def parse_dims(text: str, hidden: int | None) -> list[int] | None:
    """``"0, 1, 2"`` -> ``[0, 1, 2]``; blank -> None (VAR finds them); anything else is one ``InputError``."""
    if not text.strip():
        return None
    try:
        dims = sorted({int(part) for part in text.replace(",", " ").split()})
    except ValueError:
        raise InputError(f"sink dimensions {text!r}: type integers separated by commas, e.g. 0, 1, 2, "
                         "or leave the box blank") from None
    top = hidden if hidden is not None else math.inf
    bad = [d for d in dims if not 0 <= d < top]
    if bad:
        within = f"0 … {hidden - 1} (the hidden size is {hidden})" if hidden is not None else "0 or more"
        raise InputError(f"sink dimensions {bad} do not exist: use dimensions {within}")
    return dims
