"""The position-bias page: per-head distance profiles, segment ratios per (layer, head), the lost-in-the-middle
curve, rollout and retrieval figures; and the comparison of two position-bias runs."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from headlab.kernels import distance_bin_edges
from headlab.result import Result

from ..generic import (
    run_name,
    show_difference,
    show_header,
    show_report,
    show_saved_figures,
    show_tables,
    side_by_side,
)
from ..plots import HOVER_DIGITS, MAX_LEGEND_LINES, layer_head_heatmap, line_colours, model_title
from ..registry import View, register_view
from ..widgets import show_figure
from .head import head_picker, render_head

REQUIRED_TENSORS = ("distance_mean", "distance_count", "segment_mean", "segment_uniform", "relative_mean",
                    "relative_uniform")
SEGMENTS = ("first token", "first third", "middle third", "last third")  # headlab.probes.position.SEGMENTS
# Saved figures this page shows in its own order; the distance and segment views are drawn from tensors.
SAVED_FIGURES = ("lost_in_the_middle", "position_profile", "first_mass_vs_depth", "rollout", "rollout_residual",
                 "retrieval")
KNOWN_TABLES = {"trend", "retrieval_by_placement"}


def head_distance_figure(run: Result, layer: int) -> go.Figure:
    """Mean attention of one key vs distance, every head of ``layer`` (``distance_mean [layer, head, side, bin]``)."""
    mean = run.tensors["distance_mean"][layer].float().numpy()  # [head, side, bin]
    pairs = run.tensors["distance_count"][layer].float().numpy() > 0  # [side, bin]
    x = np.array(distance_bin_edges(mean.shape[-1])) + 1
    n_heads = mean.shape[0]
    n_lines = n_heads * (int(pairs[0].any()) + int(pairs[1].any()))  # numpy bools would add as "or"
    # Many heads (e.g. 9 heads x 2 sides, 40 on a 14B model): colour by head on a scale, no legend.
    scale = n_lines > MAX_LEGEND_LINES
    colours = line_colours(n_heads) if scale else [None] * n_heads
    fig = go.Figure()
    for head in range(n_heads):
        for side, dash in ((0, "solid"), (1, "dash")):
            if not pairs[side].any():
                continue
            fig.add_scatter(x=x[pairs[side]], y=mean[head, side, pairs[side]], mode="lines+markers",
                            line={"dash": dash, "color": colours[head]}, legendgroup=str(head),
                            marker={"size": 4} if scale else None, showlegend=not scale,
                            name=f"head {head}" + (" (keys after)" if side else ""),
                            hovertemplate=f"1 + |i-j| = %{{x}}<br>mean = %{{y:{HOVER_DIGITS}}}"
                                          f"<extra>head {head}</extra>")
    if scale:  # the colour bar of the heads: an invisible trace carries it
        fig.add_scatter(x=[x[0]], y=[float(np.nanmax(mean[:, 0]))], mode="markers", showlegend=False,
                        hoverinfo="skip", marker={"color": [0], "cmin": 0, "cmax": n_heads - 1, "opacity": 0,
                                                  "colorscale": "Viridis", "showscale": True,
                                                  "colorbar": {"title": "head"}})
    fig.update_layout(title=f"{model_title(run.model)}: layer {layer}, mean attention of one key vs distance "
                            "(dashed: keys after)",
                      xaxis_title="1 + |i - j| (bin left edge)", yaxis_title="mean attention per key",
                      xaxis_type="log", yaxis_type="log")
    return fig


def segment_ratio(run: Result, segment: int):
    """``[layer, head]`` attention received by a segment relative to uniform attention under the same mask."""
    return run.tensors["segment_mean"][:, :, segment] / run.tensors["segment_uniform"][:, None, segment]


def segment_heatmap(run: Result, segment: int, clickable: bool = False) -> go.Figure:
    ratio = segment_ratio(run, segment)
    fig = layer_head_heatmap(np.log10(ratio.float().clamp(min=1e-12).numpy()),
                             f"{model_title(run.model)}: {SEGMENTS[segment]}, log10(attention received / uniform)",
                             "log10 ratio", colorscale="RdBu_r", clickable=clickable)
    bound = float(np.nanmax(np.abs(fig.data[0].z))) or 1.0
    fig.update_traces(zmin=-bound, zmax=bound, selector={"type": "heatmap"})  # diverging, 0 = uniform attention
    return fig


def relative_curves(runs: list[Result]) -> go.Figure:
    """Lost-in-the-middle curve (mean over layers and heads, relative to uniform) of each run."""
    fig = go.Figure()
    for run in runs:
        ratio = (run.tensors["relative_mean"].mean(1) / run.tensors["relative_uniform"]).nanmean(0).numpy()
        x = (np.arange(len(ratio)) + 0.5) / len(ratio)
        fig.add_scatter(x=x, y=ratio, mode="lines+markers", name=run_name(run),
                        hovertemplate=f"relative position %{{x:.2f}}<br>ratio = %{{y:{HOVER_DIGITS}}}<extra></extra>")
    fig.add_hline(y=1.0, line_dash="dot")
    fig.update_layout(title="Attention received vs relative key position (first token left out), / uniform",
                      xaxis_title="relative key position", yaxis_title="mean attention / uniform")
    return fig


@register_view("position_bias", title="Position bias")
class PositionBiasView(View):
    def key_figures(self, manifest: dict) -> dict[str, object]:
        summary = manifest.get("summary") or {}
        accuracy = summary.get("retrieval_accuracy") or {}
        # first/last vs middle separately: one "middle vs ends" ratio cannot tell U-shaped from monotone.
        figures = {"first third / middle": summary.get("first_vs_middle"),
                   "last third / middle": summary.get("last_vs_middle"),
                   "shape": summary.get("position_shape"), "trend k": summary.get("trend_k_mean"),
                   "retrieval acc. (middle)": accuracy.get("middle")}
        return {name: value for name, value in figures.items() if value is not None}

    def render(self, run: Result, key: str) -> None:
        missing = [name for name in REQUIRED_TENSORS if name not in run.tensors]
        if missing:
            st.warning(f"This position-bias run lacks the tensors {', '.join(missing)}; showing what it saved.")
            super().render(run, key)
            return
        show_header(run)
        for note in run.summary.get("notes", []):
            st.caption(f"note: {note}")
        n_layers = run.tensors["distance_mean"].shape[0]
        st.subheader("Attention by distance, per head")
        layer = st.slider("layer", 0, n_layers - 1, 0, key=f"{key}-layer") if n_layers > 1 else 0
        show_figure(head_distance_figure(run, layer), key=f"{key}-dist", name=f"{run_name(run)}-distance-l{layer}")
        st.subheader("Attention received by segment, per (layer, head)")
        segment = st.radio("segment", list(range(len(SEGMENTS))), format_func=lambda s: SEGMENTS[s],
                           horizontal=True, key=f"{key}-segment")
        event = show_figure(segment_heatmap(run, segment, clickable=True), key=f"{key}-seg",
                            name=f"{run_name(run)}-segment-{segment}", select=True)
        st.subheader("One head")
        st.caption("Click a cell of the heatmap above, or pick the layer and head here.")
        picked = head_picker(run, key, event.selection.points if event is not None else None)
        render_head(run, *picked, key)
        show_saved_figures(run, key, [name for name in SAVED_FIGURES if name in run.figures])
        show_tables(run, key, [name for name in sorted(KNOWN_TABLES) if name in run.tables])
        other_tables = sorted(set(run.tables) - KNOWN_TABLES)
        if other_tables:
            st.subheader("All tables")
            show_tables(run, key, other_tables)
        show_report(run)

    def compare(self, left: Result, right: Result, key: str) -> None:
        runs = [left, right]
        if any(name not in run.tensors for run in runs for name in REQUIRED_TENSORS):
            st.warning("One of the runs lacks the position-bias tensors; comparing what they saved instead.")
            super().compare(left, right, key)
            return
        show_figure(relative_curves(runs), key=f"{key}-relative", name="compare-lost-in-the-middle")
        segment = st.radio("segment", list(range(len(SEGMENTS))), format_func=lambda s: SEGMENTS[s],
                           horizontal=True, key=f"{key}-segment")
        a, b = (segment_ratio(run, segment) for run in runs)
        show_difference(a, b, f"{SEGMENTS[segment]} / uniform: {run_name(right)} - {run_name(left)}", "Δ ratio",
                        key=f"{key}-diff", name=f"diff-segment-{segment}")
        side_by_side(left, right, key, lambda run, side: show_saved_figures(
            run, side, [n for n in ("first_mass_vs_depth", "retrieval") if n in run.figures]), compact=False)
