"""One head of a run, opened by clicking its layer x head cell (or picking it): its full pattern on a prompt of
the run where the run kept one (``head_patterns``: sinks runs keep them only for their top sink heads, on their
first prompts; the page says so for every other head), the attention
each token receives from it (``token_alpha``), and its entropy, key-position and distance profiles where the
run has them. Any analysis view can call ``head_picker`` + ``render_head``."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from headlab.result import Result
from headlab.tokens import token_label

from ..labels import metric_value
from ..plots import HOVER_DIGITS, clicked_cell, empty_figure, model_title
from ..widgets import show_figure

SCALARS = {  # [layer, head] tensors shown as tiles: name -> label
    "entropy": "entropy (nats)", "first_mass": "mass on the first token", "sink_heads": "sink head (alpha > eps)",
}
FLAGS = {"sink_heads"}  # 0/1 tensors (uint8): a tile says yes or no, not 1


def prompt_tokens(run: Result, prompt: int) -> tuple[list[str], list[str]]:
    """Readable and raw tokens of a kept prompt (older runs saved the raw token only, in ``token``)."""
    table = run.tables.get("tokens", pd.DataFrame(columns=["prompt", "position", "token"]))
    rows = table[table["prompt"] == prompt].sort_values("position")
    shown = rows["token"].astype(str).tolist()
    raw = rows["token_raw"].astype(str).tolist() if "token_raw" in rows else shown
    return shown, raw


def saved_pattern_heads(run: Result) -> list[tuple[int, int]]:
    """(layer, head) of the heads whose patterns the run kept (``head_pattern_heads [head, 2]``)."""
    if "head_patterns" not in run.tensors or "head_pattern_heads" not in run.tensors:
        return []
    return [(int(layer), int(head)) for layer, head in run.tensors["head_pattern_heads"].tolist()]


def head_pattern(run: Result, prompt: int, layer: int, head: int) -> np.ndarray | None:
    """``[query, key]`` of (layer, head) on kept prompt ``prompt``, cut to the prompt's length; None if not kept."""
    heads = saved_pattern_heads(run)
    if (layer, head) not in heads or prompt >= run.tensors["head_patterns"].shape[0]:
        return None
    pattern = run.tensors["head_patterns"][prompt, heads.index((layer, head))].float().numpy()
    n = int(np.isfinite(pattern[:, 0]).sum())  # NaN rows past the prompt's length
    return pattern[:n, :n]


def pattern_figure(run: Result, prompt: int, layer: int, head: int) -> go.Figure:
    title = f"{model_title(run.model)}: layer {layer}, head {head}, attention pattern of prompt #{prompt}"
    pattern = head_pattern(run, prompt, layer, head)
    if pattern is None or pattern.size == 0:
        return empty_figure(title, "nothing found: the run kept no pattern of this head")
    shown, _ = prompt_tokens(run, prompt)
    labels = [token_label(i, t) for i, t in enumerate(shown[: len(pattern)])]
    if len(labels) < len(pattern):  # tokens table shorter than the pattern (should not happen): positions only
        labels = [str(i) for i in range(len(pattern))]
    fig = go.Figure(go.Heatmap(z=pattern, x=labels, y=labels, colorscale="Viridis", zmin=0.0, zmax=1.0,
                               colorbar={"title": "attention"},
                               hovertemplate="query %{y}<br>key %{x}<br>p = %{z:.4g}<extra></extra>"))
    fig.update_layout(title=title, xaxis={"title": "key", "tickangle": -60},
                      yaxis={"title": "query", "autorange": "reversed"}, height=min(800, 300 + 12 * len(labels)))
    return fig


def received_values(run: Result, prompt: int, layer: int, head: int) -> np.ndarray | None:
    """Mean attention each token of ``prompt`` receives from (layer, head) (``token_alpha``), or None."""
    if "token_alpha" not in run.tensors or prompt >= run.tensors["token_alpha"].shape[0]:
        return None
    shown, _ = prompt_tokens(run, prompt)
    return run.tensors["token_alpha"][prompt, layer, head, : len(shown)].float().numpy()


def received_figure(run: Result, prompt: int, layer: int, head: int) -> go.Figure:
    title = f"{model_title(run.model)}: layer {layer}, head {head}, attention received per token, prompt #{prompt}"
    values = received_values(run, prompt, layer, head)
    if values is None or not len(values):
        return empty_figure(title, "nothing found: the run kept no per-token attention for this prompt")
    shown, raw = prompt_tokens(run, prompt)
    fig = go.Figure(go.Bar(x=[token_label(i, t) for i, t in enumerate(shown)], y=values, customdata=raw,
                           hovertemplate=f"%{{x}} (raw %{{customdata}})<br>received = %{{y:{HOVER_DIGITS}}}"
                                         "<extra></extra>"))
    fig.update_layout(title=title, xaxis={"title": "key token", "tickangle": -60},
                      yaxis_title="mean attention received")
    return fig


def key_position_figure(run: Result, layer: int, head: int) -> go.Figure:
    """alpha of the first key positions (``alpha [layer, head, key]``) for one head."""
    title = f"{model_title(run.model)}: layer {layer}, head {head}, attention received by key position (alpha)"
    if "alpha" not in run.tensors:
        return empty_figure(title)
    alpha = run.tensors["alpha"][layer, head].float().numpy()
    fig = go.Figure(go.Bar(x=list(range(len(alpha))), y=alpha,
                           hovertemplate=f"k = %{{x}}<br>alpha = %{{y:{HOVER_DIGITS}}}<extra></extra>"))
    eps = run.config.get("eps")
    if eps:
        fig.add_hline(y=eps, line_dash="dot", annotation_text=f"eps = {eps}")
    fig.update_layout(title=title, xaxis_title="key position k", yaxis_title="alpha", yaxis_range=[0, 1])
    return fig


def distance_figure(run: Result, layer: int, head: int) -> go.Figure:
    """Mean attention of one key vs distance for one head (``distance_mean [layer, head, side, bin]``)."""
    from headlab.kernels import distance_bin_edges

    title = f"{model_title(run.model)}: layer {layer}, head {head}, mean attention of one key vs distance"
    if "distance_mean" not in run.tensors:
        return empty_figure(title)
    mean = run.tensors["distance_mean"][layer, head].float().numpy()  # [side, bin]
    pairs = run.tensors["distance_count"][layer].float().numpy() > 0 if "distance_count" in run.tensors \
        else np.isfinite(mean)
    x = np.array(distance_bin_edges(mean.shape[-1])) + 1
    fig = go.Figure()
    for side, label in ((0, "keys before"), (1, "keys after")):
        if pairs[side].any():
            fig.add_scatter(x=x[pairs[side]], y=mean[side, pairs[side]], mode="lines+markers", name=label,
                            hovertemplate=f"1 + |i-j| = %{{x}}<br>mean = %{{y:{HOVER_DIGITS}}}<extra></extra>")
    fig.update_layout(title=title, xaxis_title="1 + |i - j| (bin left edge)", yaxis_title="mean attention per key",
                      xaxis_type="log", yaxis_type="log")
    return fig


def head_picker(run: Result, key: str, points: list[dict] | None, default: tuple[int, int] = (0, 0)) -> tuple[int, int]:
    """(layer, head) from a click on a ``clickable`` heatmap (``points``), else from two selectboxes.

    A new click moves the selectboxes; the selectboxes stay free to change while the click stays the same."""
    n_layers, n_heads = run_grid(run)
    layer_key, head_key, click_key = f"{key}-head-layer", f"{key}-head-head", f"{key}-head-click"
    cell = clicked_cell(points or [])
    if cell is not None and cell != st.session_state.get(click_key) and 0 <= cell[0] < n_layers \
            and 0 <= cell[1] < n_heads:
        st.session_state[click_key] = cell
        st.session_state[layer_key], st.session_state[head_key] = cell
    st.session_state.setdefault(layer_key, min(default[0], n_layers - 1))
    st.session_state.setdefault(head_key, min(default[1], n_heads - 1))
    left, right = st.columns(2)
    layer = left.selectbox("layer", list(range(n_layers)), key=layer_key)
    head = right.selectbox("head", list(range(n_heads)), key=head_key)
    return int(layer), int(head)


def run_grid(run: Result) -> tuple[int, int]:
    for name in ("alpha", "entropy", "distance_mean", "segment_mean"):
        if name in run.tensors:
            return int(run.tensors[name].shape[0]), int(run.tensors[name].shape[1])
    return int(run.summary.get("n_layers", 1)), int(run.summary.get("n_heads", 1))


def render_head(run: Result, layer: int, head: int, key: str) -> None:
    """The head panel: scalar metrics, pattern on a kept prompt, attention received per token, profiles."""
    st.markdown(f"**Layer {layer}, head {head}**")
    metrics = [(label, _tile(name, float(run.tensors[name][layer, head]))) for name, label in SCALARS.items()
               if name in run.tensors and run.tensors[name].ndim == 2]
    if "alpha" in run.tensors:
        metrics.insert(0, ("alpha of the first token", f"{float(run.tensors['alpha'][layer, head, 0]):.4g}"))
    if metrics:
        for column, (label, value) in zip(st.columns(len(metrics)), metrics, strict=True):
            column.metric(label, value)
    saved = saved_pattern_heads(run)
    n_prompts = int(run.tensors["head_patterns"].shape[0]) if saved else 0
    n_token_prompts = int(run.tensors["token_alpha"].shape[0]) if "token_alpha" in run.tensors else 0
    if n_prompts or n_token_prompts:
        prompt = st.selectbox("prompt of the run", list(range(max(n_prompts, n_token_prompts))),
                              key=f"{key}-head-prompt", format_func=lambda p: _prompt_caption(run, p))
        if (layer, head) in saved and prompt < n_prompts:
            show_figure(pattern_figure(run, prompt, layer, head), key=f"{key}-head-pattern",
                        name=f"{_name(run)}-L{layer}H{head}-pattern-p{prompt}")
        else:
            on_prompt = f" on prompt #{prompt}" if (layer, head) in saved else ""
            st.info(f"No stored pattern for layer {layer}, head {head}{on_prompt}. {stored_patterns_note(run)} "
                    "For this head, compute its pattern in Python, or open the model on the Live page:")
            st.code(f'import headlab\nloaded = headlab.load("{run.model}")\n'
                    f'headlab.attention(loaded, "your prompt", layer={layer}, head={head})', language="python")
        if prompt < n_token_prompts:
            show_figure(received_figure(run, prompt, layer, head), key=f"{key}-head-received",
                        name=f"{_name(run)}-L{layer}H{head}-received-p{prompt}")
    if "alpha" in run.tensors:
        show_figure(key_position_figure(run, layer, head), key=f"{key}-head-keys",
                    name=f"{_name(run)}-L{layer}H{head}-alpha")
    if "distance_mean" in run.tensors:
        show_figure(distance_figure(run, layer, head), key=f"{key}-head-distance",
                    name=f"{_name(run)}-L{layer}H{head}-distance")


def stored_patterns_note(run: Result) -> str:
    """Which heads the run kept full patterns of, and on which prompts: a sinks run keeps them only for its top
    sink heads (``head_pattern_heads``) on its first prompts, so the page must not promise one for any head."""
    saved = saved_pattern_heads(run)
    if not saved:
        return "This run keeps no full attention pattern of any head."
    n_prompts = int(run.tensors["head_patterns"].shape[0])
    heads = ", ".join(f"L{layer}H{head}" for layer, head in saved)
    prompts = "prompt #0" if n_prompts == 1 else f"prompts #0–#{n_prompts - 1}"
    return (f"This run keeps full attention patterns only for its {len(saved)} heads with the largest alpha of the "
            f"first token ({heads}), on {prompts}.")


def _tile(name: str, value: float) -> str:
    return metric_value(bool(value)) if name in FLAGS else f"{value:.4g}"


def _prompt_caption(run: Result, prompt: int) -> str:
    shown, _ = prompt_tokens(run, prompt)
    text = "".join(shown).replace("\n", " ").strip()
    return f"#{prompt}: {text[:60]}"


def _name(run: Result) -> str:
    return run.path.name if run.path is not None else f"{run.analysis}-{model_title(run.model)}"
