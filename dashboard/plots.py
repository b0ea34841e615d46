"""Plotly figures shared by the views and analyses: layer x head heatmaps (layer on y, head on x), their
differences, "nothing found" placeholders, and the model name that figure titles show."""

from __future__ import annotations

import re

import numpy as np
import plotly.graph_objects as go

HOVER_DIGITS = ".6g"  # hover shows the value to 6 significant digits, the colour only approximates it
MAX_LEGEND_LINES = 12  # more lines than this become a colour scale or a selector


def model_title(model: str) -> str:
    """The model's name for a figure title: a local folder or file becomes its last part, never a full path.

    ``"smollm2-135m"`` and ``"Qwen/Qwen3-14B"`` stay as they are; ``"/home/me/ckpt/llama-7b/"`` becomes
    ``"llama-7b"`` and ``"~/m/model.gguf"`` becomes ``"model.gguf"``."""
    text = str(model).strip()
    if text.startswith(("/", "~", ".", "\\")) or (len(text) > 1 and text[1] == ":") or text.count("/") > 1:
        return re.split(r"[\\/]", text.rstrip("/\\"))[-1] or text
    return text


def empty_figure(title: str, message: str = "nothing found") -> go.Figure:
    """A figure that says ``message`` in place of empty axes (no data, no sink token, no head above threshold)."""
    fig = go.Figure()
    fig.update_layout(title=title, xaxis={"visible": False}, yaxis={"visible": False}, height=260,
                      annotations=[{"text": message, "showarrow": False, "font": {"size": 18, "color": "gray"},
                                    "xref": "paper", "yref": "paper", "x": 0.5, "y": 0.5}])
    return fig


def is_empty(fig: go.Figure) -> bool:
    """True when no trace of ``fig`` has a single point to draw."""
    for trace in fig.data:
        for name in ("z", "y", "x", "values"):
            values = getattr(trace, name, None)
            if values is not None and np.asarray(values, dtype=object).size:
                return False
    return True


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
