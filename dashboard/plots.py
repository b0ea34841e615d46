"""Plotly figures shared by the views: layer x head heatmaps (layer on y, head on x) and their differences."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

HOVER_DIGITS = ".6g"  # hover shows the value to 6 significant digits, the colour only approximates it


def layer_head_heatmap(values, title: str, label: str, zmin: float | None = None,
                       zmax: float | None = None, colorscale: str = "Viridis") -> go.Figure:
    """``values [layer, head]`` as a heatmap, layer on y (0 at the bottom, as in the analyses' figures), head on x."""
    z = _matrix(values)
    n_layers, n_heads = z.shape
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(n_heads)), y=list(range(n_layers)), colorscale=colorscale, zmin=zmin, zmax=zmax,
        colorbar={"title": label},
        hovertemplate=f"layer %{{y}}, head %{{x}}<br>{label} = %{{z:{HOVER_DIGITS}}}<extra></extra>"))
    # Integer ticks only: a tick at head 0.5 means nothing.
    fig.update_layout(title=title, xaxis={"title": "head", "dtick": max(1, n_heads // 16)},
                      yaxis={"title": "layer", "dtick": max(1, n_layers // 16)})
    return fig


def difference_heatmap(left, right, title: str, label: str) -> go.Figure:
    """``right - left`` per (layer, head) on a diverging scale centred at 0 (blue below, red above)."""
    left, right = _matrix(left), _matrix(right)
    if left.shape != right.shape:
        raise ValueError(f"cannot subtract a {left.shape} grid from a {right.shape} grid")
    diff = right - left
    finite = np.abs(diff[np.isfinite(diff)])
    bound = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    # Symmetric limits keep white at exactly 0 even when all differences have one sign.
    return layer_head_heatmap(diff, title, label, zmin=-bound, zmax=bound, colorscale="RdBu_r")


def _matrix(values) -> np.ndarray:
    array = values.detach().cpu().float().numpy() if hasattr(values, "detach") else np.asarray(values, dtype=float)
    if array.ndim != 2:
        raise ValueError(f"a layer x head heatmap needs a 2-D [layer, head] array, got shape {array.shape}")
    return array
