"""Sink levels (Wong et al.): the 2-D histogram of (creation layer, lifetime) and a count of its clusters.

The paper reads the levels off the histogram by eye (3 in QwQ-32B, 6 in Qwen3-14B). headlab counts
them with DBSCAN (scikit-learn) on the integer grid: distinct (creation, lifetime) cells weighted by
how many sink tokens fall in them, radius ``eps`` = 1.5 so that a cell joins its 8 neighbours, and a
level needs at least ``max(min_tokens, min_fraction · n)`` tokens around a core cell; cells that
reach no level are left as outliers (-1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from sklearn.cluster import DBSCAN


@dataclass
class Levels:
    """``labels``: level of each input point (-1 = outlier); ``n_levels``; ``table``: one row per level."""

    labels: np.ndarray
    n_levels: int
    table: pd.DataFrame


def histogram(creation: np.ndarray, lifetime: np.ndarray, n_layers: int) -> np.ndarray:
    """``[creation layer, lifetime]`` counts; lifetime runs 0..n_layers."""
    counts = np.zeros((n_layers, n_layers + 1), dtype=np.int64)
    np.add.at(counts, (np.asarray(creation, dtype=int), np.asarray(lifetime, dtype=int)), 1)
    return counts


def count_levels(creation: np.ndarray, lifetime: np.ndarray, eps: float = 1.5, min_fraction: float = 0.02,
                 min_tokens: int = 3) -> Levels:
    creation = np.asarray(creation, dtype=int)
    lifetime = np.asarray(lifetime, dtype=int)
    columns = ["level", "n_tokens", "creation_mean", "creation_min", "creation_max", "lifetime_mean",
               "lifetime_min", "lifetime_max"]
    if len(creation) == 0:
        return Levels(np.zeros(0, dtype=int), 0, pd.DataFrame(columns=columns))
    points = np.stack([creation, lifetime], axis=1)
    cells, inverse, weight = np.unique(points, axis=0, return_inverse=True, return_counts=True)
    min_samples = max(min_tokens, int(np.ceil(min_fraction * len(points))))
    cell_labels = DBSCAN(eps=eps, min_samples=min_samples).fit(cells, sample_weight=weight).labels_
    # Number levels by creation layer then lifetime, so the numbering does not depend on DBSCAN's order.
    found = sorted({int(v) for v in cell_labels if v >= 0},
                   key=lambda v: tuple(np.average(cells[cell_labels == v], axis=0, weights=weight[cell_labels == v])))
    renumber = {old: new for new, old in enumerate(found)}
    labels = np.array([renumber.get(int(v), -1) for v in cell_labels])[inverse.ravel()]
    rows = []
    for level in range(len(found)):
        c, lt = creation[labels == level], lifetime[labels == level]
        rows.append({"level": level, "n_tokens": len(c), "creation_mean": float(c.mean()), "creation_min": int(c.min()),
                     "creation_max": int(c.max()), "lifetime_mean": float(lt.mean()), "lifetime_min": int(lt.min()),
                     "lifetime_max": int(lt.max())})
    return Levels(labels, len(found), pd.DataFrame(rows, columns=columns))


def levels_figure(model: str, counts: np.ndarray, levels: Levels) -> go.Figure:
    """Heatmap of the histogram (lifetime on x, creation layer on y) with the level centres marked."""
    n_layers = counts.shape[0]
    z = np.where(counts > 0, np.log10(np.maximum(counts, 1)) + 1, np.nan)
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(counts.shape[1])), y=list(range(n_layers)), colorscale="Viridis",
        customdata=counts, colorbar={"title": "log10(n) + 1"},
        hovertemplate="created at layer %{y}, lifetime %{x}<br>%{customdata} tokens<extra></extra>"))
    table = levels.table
    if len(table):
        fig.add_trace(go.Scatter(
            x=table["lifetime_mean"], y=table["creation_mean"], mode="markers+text",
            text=[f"level {v}" for v in table["level"]], textposition="top center",
            marker={"symbol": "x", "size": 12, "color": "red"}, name="levels"))
    fig.update_layout(title=f"{model}: sink levels ({levels.n_levels}), creation layer x lifetime",
                      xaxis_title="lifetime (layers)", yaxis_title="creation layer")
    return fig
