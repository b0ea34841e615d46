"""Plotly figures of the dashboard's views: layer x head heatmaps (layer on y, head on x), their differences,
legends and clicks. The figures analyses draw too (titles, placeholders) live in ``headlab.figures``."""

from __future__ import annotations

import base64

import numpy as np
import plotly.graph_objects as go

from headlab.figures import empty_figure, is_empty, model_title  # noqa: F401 (the views' names)

HOVER_DIGITS = ".6g"  # hover shows the value to 6 significant digits, the colour only approximates it
MAX_LEGEND_LINES = 12  # more lines than this become a colour scale or a selector
# Layer x head heatmaps grow with the layer count: at plotly's fixed 450 px a 30-layer model got ~250 px of plot
# and its layer labels overlapped. ~20 px a row keeps one readable label per layer; the margins hold the title,
# the head axis and its label; small models keep a usable square-ish plot.
PX_PER_LAYER = 20
HEATMAP_MARGIN_PX = 170
MIN_HEATMAP_PX = 380
LAYER_AXIS_TITLES = ("layer", "creation layer")  # saved heatmaps with layers on y, sized like ours


def layer_head_heatmap(values, title: str, label: str, zmin: float | None = None,
                       zmax: float | None = None, colorscale: str = "Viridis", clickable: bool = False) -> go.Figure:
    """``values [layer, head]`` as a heatmap, layer on y (0 at the bottom, as in the analyses' figures), head on x.

    ``clickable``: an invisible marker at every cell centre (trace 1), because Streamlit's selection events
    do not fire on heatmap cells; clicking a cell selects its marker (x = head, y = layer)."""
    z = _matrix(values)
    n_layers, n_heads = z.shape
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(n_heads)), y=list(range(n_layers)), colorscale=colorscale, zmin=zmin, zmax=zmax,
        colorbar={"title": label},
        hovertemplate=f"layer %{{y}}, head %{{x}}<br>{label} = %{{z:{HOVER_DIGITS}}}<extra></extra>"))
    if clickable:
        layer, head = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
        fig.add_scatter(x=head.ravel(), y=layer.ravel(), customdata=z.ravel(), mode="markers", showlegend=False,
                        marker={"size": 14, "opacity": 0.0, "color": "white"}, name="cells",
                        hovertemplate=f"layer %{{y}}, head %{{x}}<br>{label} = %{{customdata:{HOVER_DIGITS}}}"
                                      "<br>click: open this head<extra></extra>")
    # Integer ticks only: a tick at head 0.5 means nothing. Fixed ranges: the click markers add no padding.
    fig.update_layout(title=title, height=heatmap_height(n_layers),
                      xaxis={"title": "head", "dtick": max(1, n_heads // 16), "range": [-0.5, n_heads - 0.5]},
                      yaxis={"title": "layer", "dtick": max(1, n_layers // 32), "range": [-0.5, n_layers - 0.5]})
    return fig


def heatmap_height(n_layers: int) -> int:
    """Figure height in px for ``n_layers`` rows: PX_PER_LAYER a layer plus the margins, at least MIN_HEATMAP_PX."""
    return max(MIN_HEATMAP_PX, HEATMAP_MARGIN_PX + PX_PER_LAYER * int(n_layers))


def fit_layer_height(fig: go.Figure) -> go.Figure:
    """A saved figure whose heatmap has layers on y (an analysis's own figure) and no height of its own: a copy
    sized by its row count like ``layer_head_heatmap``; any other figure as it is."""
    title = (fig.layout.yaxis.title.text or "").strip().lower()
    rows = [len(_decoded(t.z)) for t in fig.data if t.type == "heatmap" and t.z is not None]
    if fig.layout.height is not None or title not in LAYER_AXIS_TITLES or not rows:
        return fig
    fig = go.Figure(fig)  # saved figures are shared between reruns and sessions
    fig.update_layout(height=heatmap_height(max(rows)))
    return fig


def nothing_to_draw(fig: go.Figure) -> bool:
    """True when ``fig`` would show empty axes: no trace with a point (``headlab.figures.is_empty``), or only
    heatmaps whose cells are all blank (NaN) and lines or bars without a finite value, e.g. a sink-levels
    histogram of a run that found no secondary sink. Reads plotly's typed arrays (saved figures hold them)."""
    if is_empty(fig):
        return True
    return not any(_drawable(trace) for trace in fig.data)


def _drawable(trace) -> bool:
    if getattr(trace, "z", None) is not None:
        return _has_value(trace.z)
    for name in ("values", "y", "x"):
        values = getattr(trace, name, None)
        if values is not None:
            return _has_value(values)
    return False


def _has_value(values) -> bool:
    array = _decoded(values)
    if array.dtype.kind in "fc":
        return bool(np.isfinite(array).any())
    flat = array.ravel()
    return any(v is not None and not (isinstance(v, float) and np.isnan(v)) for v in flat)


def _decoded(values) -> np.ndarray:
    """A plotly data array as numpy: a list, a numpy array, or plotly's typed-array dict ``{dtype, bdata,
    shape}`` that figures read back from JSON hold."""
    if isinstance(values, dict) and "bdata" in values:
        shape = [int(n) for n in str(values.get("shape", "-1")).split(",")]
        return np.frombuffer(base64.b64decode(values["bdata"]), dtype=values["dtype"]).reshape(shape)
    array = np.asarray(values, dtype=object)
    try:
        return array.astype(float)
    except (TypeError, ValueError):  # categories (token labels): kept as objects
        return array


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


def clicked_cell(points: list[dict]) -> tuple[int, int] | None:
    """(layer, head) of the last clicked cell of a ``clickable`` layer x head heatmap, from Streamlit's
    ``event.selection.points`` (x = head, y = layer); None when nothing is selected."""
    for point in reversed(points or []):
        x, y = point.get("x"), point.get("y")
        if isinstance(x, (int, float)) and isinstance(y, (int, float)):
            return int(round(y)), int(round(x))
    return None


def limit_legend(fig: go.Figure, limit: int = MAX_LEGEND_LINES) -> go.Figure:
    """More than ``limit`` legend entries: hide the legend and add a dropdown that shows one entry (or all).

    Entries are legend groups when traces have them (a head drawn as two lines is one entry)."""
    shown = [t for t in fig.data if t.showlegend is not False and t.name]
    groups = list(dict.fromkeys((t.legendgroup or t.name) for t in shown))
    if len(groups) <= limit or fig.layout.updatemenus:
        return fig
    fig = go.Figure(fig)  # a copy: saved figures are shared between reruns
    keys = [(t.legendgroup or t.name) if (t.showlegend is not False and t.name) else None for t in fig.data]
    names = {g: next(t.name for t in shown if (t.legendgroup or t.name) == g) for g in groups}
    buttons = [{"label": f"all {len(groups)}", "method": "restyle", "args": [{"visible": [True] * len(keys)}]}]
    buttons += [{"label": names[g], "method": "restyle",
                 "args": [{"visible": [k is None or k == g for k in keys]}]} for g in groups]
    fig.update_layout(showlegend=False, updatemenus=[{"type": "dropdown", "buttons": buttons, "x": 1.0,
                                                      "xanchor": "right", "y": 1.15, "yanchor": "bottom"}])
    return fig


def line_colours(n: int, colorscale: str = "Viridis") -> list[str]:
    """``n`` colours along a continuous scale: many lines read as a colour scale, not a legend."""
    from plotly.colors import sample_colorscale

    return sample_colorscale(colorscale, [i / max(1, n - 1) for i in range(n)])
