"""Figure pieces shared by the analyses and the dashboard: the model name a title shows, and a placeholder
figure that says "nothing found" in place of empty axes."""

from __future__ import annotations

import re

import numpy as np
import plotly.graph_objects as go


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
