"""The sinks page: alpha heatmap per key position (click a cell to open that head), Sink_k bars, residual-norm
profile, massive activations, sink categories (BOS / first text token / non-initial, per run and per head),
the secondary-sink criteria (with the warning when the official cos test saturates), per-prompt token view;
and the comparison of two sinks runs with a difference heatmap."""

from __future__ import annotations

import html

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

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
from ..plots import HOVER_DIGITS, layer_head_heatmap, model_title
from ..registry import View, register_view
from ..widgets import show_figure, show_table
from .head import head_picker, render_head, stored_patterns_note

REQUIRED_TENSORS = ("alpha", "sink_rate", "first_token_norm", "median_token_norm")
# What this page draws itself; any other table or saved figure is shown as it is, below.
KNOWN_TABLES = {"sink_heads", "key_importance", "sink_rate", "residual_norms", "massive_activations",
                "massive_dims", "tokens", "head_patterns", "head_pattern_heads", "sink_categories",
                "head_sink_categories", "non_initial_sinks", "massive_carriers", "secondary_flag_share"}
CATEGORY_NAMES = {"bos": "BOS", "first_text_token": "first text token", "non_initial": "non-initial"}
KNOWN_FIGURES = {"alpha_first_token", "residual_norms", "sink_rate"}
MASSIVE_COLUMNS = ["dim", "value", "layer", "token", "position", "prompt", "ratio_to_layer_median",
                   "ratio_to_token_median"]
ALL_HEADS = "mean over heads"


def alpha_heatmap(run: Result, key_position: int, clickable: bool = False) -> go.Figure:
    """alpha[:, :, k] (``alpha [layer, head, key]``): mean attention key k receives from the queries that see it."""
    alpha = run.tensors["alpha"]
    if not 0 <= key_position < alpha.shape[2]:
        raise IndexError(f"key position {key_position} outside the {alpha.shape[2]} saved positions")
    eps = run.config.get("eps")
    title = f"{model_title(run.model)}: alpha of key position {key_position}" + (f" (sink if > {eps})" if eps else "")
    return layer_head_heatmap(alpha[:, :, key_position], title, "alpha", zmin=0.0, zmax=1.0, clickable=clickable)


def sink_rate_bars(runs: list[Result]) -> go.Figure:
    """Sink_k^eps in % (``sink_rate [key]``), one bar group per run."""
    fig = go.Figure()
    for run in runs:
        rate = run.tensors["sink_rate"].float().numpy()
        fig.add_bar(x=list(range(len(rate))), y=rate, name=run_name(run),
                    hovertemplate=f"k = %{{x}}<br>Sink_k = %{{y:{HOVER_DIGITS}}}%"
                                  f"<extra>{model_title(run.model)}</extra>")
    eps = runs[0].config.get("eps", "?")
    fig.update_layout(title=f"Sink_k (eps = {eps}): % of (sample, layer, head) with alpha > eps",
                      xaxis_title="key position k", yaxis_title="Sink_k %", barmode="group",
                      showlegend=len(runs) > 1)
    return fig


def norm_profile(runs: list[Result]) -> go.Figure:
    """Residual-stream norm per layer of the first token and of the median token (``[layer]`` each)."""
    fig = go.Figure()
    for run in runs:
        prefix = f"{run_name(run)}: " if len(runs) > 1 else ""
        for tensor, label, dash in (("first_token_norm", "first token", "solid"),
                                    ("median_token_norm", "median token", "dot")):
            values = run.tensors[tensor].float().numpy()
            fig.add_scatter(x=list(range(len(values))), y=values, mode="lines+markers", name=prefix + label,
                            line={"dash": dash},
                            hovertemplate=f"layer %{{x}}<br>norm = %{{y:{HOVER_DIGITS}}}<extra>{label}</extra>")
    fig.update_layout(title="Residual-stream norm per layer: first token vs median token",
                      xaxis_title="layer", yaxis_title="||h_l||")
    return fig


def massive_table(run: Result) -> pd.DataFrame:
    table = run.tables.get("massive_activations", pd.DataFrame(columns=MASSIVE_COLUMNS))
    columns = [c for c in MASSIVE_COLUMNS if c in table.columns]
    table = table[columns]
    return table.sort_values("value", key=abs, ascending=False, ignore_index=True) if "value" in columns else table


def category_heatmap(run: Result) -> go.Figure | None:
    """The dominant sink category of each head (``head_sink_categories``), coloured by category, its share on hover."""
    heads = run.tables.get("head_sink_categories")
    if heads is None or not {"layer", "head", "category", "mass"} <= set(heads.columns) or heads.empty:
        return None
    names = list(CATEGORY_NAMES)
    code = heads.pivot(index="layer", columns="head", values="category").apply(lambda c: c.map(names.index))
    mass = heads.pivot(index="layer", columns="head", values="mass")
    fig = go.Figure(go.Heatmap(
        z=code.to_numpy(), x=list(code.columns), y=list(code.index), zmin=0, zmax=len(names) - 1,
        colorscale=[[0, "#2563eb"], [0.5, "#16a34a"], [1, "#dc2626"]], customdata=mass.to_numpy(),
        text=code.apply(lambda c: c.map(lambda i: CATEGORY_NAMES[names[i]])).to_numpy(),
        colorbar={"tickvals": list(range(len(names))), "ticktext": list(CATEGORY_NAMES.values())},
        hovertemplate="layer %{y}, head %{x}<br>%{text}: %{customdata:.3f} of the attention<extra></extra>"))
    fig.update_layout(title=f"{model_title(run.model)}: dominant sink category per head", xaxis_title="head",
                      yaxis_title="layer")
    return fig


def token_attention(run: Result, prompt: int, layer: int, head: int | None) -> tuple[list[str], np.ndarray]:
    """Readable tokens of ``prompt`` and the mean attention each receives in (layer, head) (``head=None``: mean
    over heads).

    Reads ``token_alpha [prompt, layer, head, position]`` (NaN past the prompt's length) and the tokens table
    (``token`` readable, ``token_raw`` raw; runs older than ``token_raw`` saved the raw token in ``token``).
    """
    tokens_table = run.tables["tokens"]
    rows = tokens_table[tokens_table["prompt"] == prompt].sort_values("position")
    per_head = run.tensors["token_alpha"][prompt, layer]  # [head, position]
    values = per_head.mean(0) if head is None else per_head[head]
    values = values[: len(rows)].float().numpy()
    return rows["token"].astype(str).tolist(), values


def prompt_preview(tokens, length: int = 60, readable: bool = False) -> str:
    """Text of a prompt from its tokens: readable ones (``headlab.tokens``) are joined; raw ones (runs saved
    before readable tokens) have byte-level (Ġ) and sentencepiece (▁) marks turned into spaces, WordPiece ##
    joined."""
    tokens = list(tokens)
    if readable:
        return "".join(tokens).replace("\n", " ").strip()[:length]
    if any(t.startswith(("Ġ", "▁")) for t in tokens):
        text = "".join(tokens).replace("Ġ", " ").replace("▁", " ").replace("Ċ", " ")
    elif all(len(t) == 1 for t in tokens):  # character-level tokenizers (the tiny zoo models)
        text = "".join(tokens)
    else:
        text = " ".join(tokens).replace(" ##", "")
    return text.strip()[:length]


def token_html(tokens: list[str], values: np.ndarray, raw: list[str] | None = None) -> str:
    """Tokens as spans whose red shade is their attention received, relative to the largest in the prompt.

    ``raw``: the raw tokens, shown on hover (``data-raw``); a leading byte piece of a character (readable
    text "") shows as a faint dot."""
    top = float(np.nanmax(values)) if len(values) and np.isfinite(values).any() else 0.0
    spans = []
    raw = raw if raw is not None else [None] * len(tokens)
    for token, value, raw_token in zip(tokens, values, raw, strict=True):
        shade = 0.0 if top <= 0 or not np.isfinite(value) else float(value) / top
        # Token text is user data: escape it, and make whitespace visible.
        text = html.escape(token).replace(" ", "&nbsp;").replace("\n", "\\n") or '<span style="opacity: 0.4">·</span>'
        extra = f' data-raw="{html.escape(raw_token, quote=True)}"' if raw_token is not None else ""
        spans.append(f'<span title="{value:.6g}"{extra} style="background: rgba(220, 38, 38, {shade:.3f}); '
                     f'padding: 1px 2px; margin: 1px; border-radius: 3px; font-family: monospace; '
                     f'display: inline-block">{text}</span>')
    legend = (f'<div style="font-size: 0.8em; color: gray">colour: 0 (white) to {top:.4g} (red); '
              'hover a token for its value</div>')
    return f'<div class="headlab-tokens" style="line-height: 1.9">{"".join(spans)}</div>{legend}'


@register_view("sinks", title="Attention sinks")
class SinksView(View):
    def key_figures(self, manifest: dict) -> dict[str, object]:
        summary = manifest.get("summary") or {}
        dims = summary.get("massive_dims") or []
        figures = {"Sink₁ (%)": summary.get("sink_1_pct"), "sink heads": summary.get("n_sink_heads"),
                   "layers x heads": f"{summary.get('n_layers')} x {summary.get('n_heads')}",
                   "massive dims": ", ".join(map(str, dims[:4])) or "none"}
        if summary.get("dominant_sink_category"):
            figures["dominant sink"] = CATEGORY_NAMES.get(summary["dominant_sink_category"],
                                                          summary["dominant_sink_category"])
        if summary.get("official_saturated"):
            figures["secondary scan"] = "official criterion saturates"
        return figures

    def render(self, run: Result, key: str) -> None:
        missing = [name for name in REQUIRED_TENSORS if name not in run.tensors]
        if missing:
            st.warning(f"This sinks run lacks the tensors {', '.join(missing)} (an older or partial run); "
                       "showing what it saved instead.")
            super().render(run, key)
            return
        show_header(run)
        n_keys = run.tensors["alpha"].shape[2]
        k = st.radio("key position k", list(range(n_keys)), horizontal=True, key=f"{key}-k",
                     help="alpha of this key position: 0 is the first token")
        event = show_figure(alpha_heatmap(run, k, clickable=True), key=f"{key}-alpha",
                            name=f"{run_name(run)}-alpha-k{k}", select=True)
        left, right = st.columns(2)
        with left:
            show_figure(sink_rate_bars([run]), key=f"{key}-rate", name=f"{run_name(run)}-sink-rate")
        with right:
            show_figure(norm_profile([run]), key=f"{key}-norms", name=f"{run_name(run)}-residual-norms")
        st.subheader("One head")
        st.caption(f"Click a cell of the alpha heatmap above, or pick the layer and head here. "
                   f"{stored_patterns_note(run)}")
        top = run.tables["sink_heads"].iloc[0] if len(run.tables.get("sink_heads", [])) else None
        default = (int(top["layer"]), int(top["head"])) if top is not None else (0, 0)
        points = event.selection.points if event is not None else None
        layer, head = head_picker(run, key, points, default)
        render_head(run, layer, head, key)
        st.subheader("Massive activations")
        st.caption("|x| > 100 and >= 1000x the median |x| of the same hidden state (Sun et al.)")
        massive = massive_table(run)
        if massive.empty:
            st.info("No massive activations in this run.")
        else:
            show_table(massive, key=f"{key}-massive", name=f"{run_name(run)}-massive-activations")
        self._categories(run, key)
        self._secondary(run, key)
        self._token_view(run, key)
        if "sink_heads" in run.tables:
            with st.expander("sink heads (all heads, by alpha of the first token)"):
                show_table(run.tables["sink_heads"], key=f"{key}-heads", name=f"{run_name(run)}-sink-heads")
        extra_tables = sorted(set(run.tables) - KNOWN_TABLES)
        extra_figures = sorted(set(run.figures) - KNOWN_FIGURES)
        if extra_tables or extra_figures:
            st.subheader("More from this run")
            show_saved_figures(run, key, extra_figures)
            show_tables(run, key, extra_tables)
        show_report(run)

    def _categories(self, run: Result, key: str) -> None:
        if "sink_categories" not in run.tables:
            return
        st.subheader("Sink categories")
        sentence = run.summary.get("sink_category_sentence")
        st.caption((f"{sentence}. " if sentence else "") + "BOS: position 0 is the BOS token; first text token: "
                   "position 0 is text (no BOS); non-initial: a later position with alpha > eps in some head, seen "
                   f"by at least {run.config.get('category_min_queries', 16)} queries (a quarter of a shorter prompt; "
                   "docs/sinks.md). Share: the mean attention a query puts on the category.")
        show_table(run.tables["sink_categories"], key=f"{key}-categories", name=f"{run_name(run)}-sink-categories")
        figure = category_heatmap(run)
        if figure is not None:
            show_figure(figure, key=f"{key}-category-heads", name=f"{run_name(run)}-sink-category-heads")
        for table, title in (("non_initial_sinks", "non-initial sink tokens"),
                             ("massive_carriers", "massive dims carried at positions > 0 (KVSink)"),
                             ("head_sink_categories", "sink category of every head")):
            if table in run.tables and len(run.tables[table]):
                with st.expander(title):
                    show_table(run.tables[table], key=f"{key}-{table}", name=f"{run_name(run)}-{table}")

    def _secondary(self, run: Result, key: str) -> None:
        note, counts = run.summary.get("secondary_saturation_note"), run.summary.get("secondary_counts_note")
        if not (note or counts):
            return
        st.subheader("Secondary sinks: official and attention criteria")
        if note:
            st.warning(note)
        if counts:
            st.caption(f"{counts} (labels: criterion {run.summary.get('secondary_criterion', 'both')}).")
        shares = run.tables.get("secondary_flag_share")
        if shares is not None and len(shares):
            with st.expander("share of scanned tokens the cos test flags, per layer"):
                show_table(shares, key=f"{key}-flag-share", name=f"{run_name(run)}-secondary-flag-share")

    def _token_view(self, run: Result, key: str) -> None:
        st.subheader("Attention received per token")
        if "token_alpha" not in run.tensors or "tokens" not in run.tables:
            st.info("This run did not keep per-token attention (token_alpha); run the analysis again to get it.")
            return
        token_alpha = run.tensors["token_alpha"]  # [prompt, layer, head, position]
        tokens = run.tables["tokens"]
        n_prompts, n_layers, n_heads, _ = token_alpha.shape
        readable = "token_raw" in tokens.columns
        previews = {p: prompt_preview(tokens[tokens["prompt"] == p].sort_values("position")["token"].astype(str),
                                      readable=readable) for p in range(n_prompts)}
        prompt_col, layer_col, head_col = st.columns([3, 1, 1])
        prompt = prompt_col.selectbox("prompt", list(range(n_prompts)), key=f"{key}-prompt",
                                      format_func=lambda p: f"#{p}: {previews[p]}")
        layer = layer_col.selectbox("layer", list(range(n_layers)), key=f"{key}-tok-layer")
        head = head_col.selectbox("head", [ALL_HEADS, *range(n_heads)], key=f"{key}-tok-head")
        words, values = token_attention(run, prompt, layer, None if head == ALL_HEADS else int(head))
        raw = None
        if readable:
            raw = tokens[tokens["prompt"] == prompt].sort_values("position")["token_raw"].astype(str).tolist()
        st.html(token_html(words, values, raw))

    def compare(self, left: Result, right: Result, key: str) -> None:
        runs = [left, right]
        if any(name not in run.tensors for run in runs for name in REQUIRED_TENSORS):
            st.warning("One of the runs lacks the sinks tensors; comparing what they saved instead.")
            super().compare(left, right, key)
            return
        n_keys = min(run.tensors["alpha"].shape[2] for run in runs)
        k = st.radio("key position k", list(range(n_keys)), horizontal=True, key=f"{key}-k")
        a_left, a_right = (run.tensors["alpha"][:, :, k] for run in runs)
        show_difference(a_left, a_right, f"alpha at k = {k}: {run_name(right)} - {run_name(left)}", "Δ alpha",
                        key=f"{key}-diff", name=f"diff-alpha-k{k}")
        side_by_side(left, right, key, lambda run, side: show_figure(
            alpha_heatmap(run, k), key=f"{side}-alpha", name=f"{run_name(run)}-alpha-k{k}"))
        show_figure(sink_rate_bars(runs), key=f"{key}-rate", name="compare-sink-rate")
        show_figure(norm_profile(runs), key=f"{key}-norms", name="compare-residual-norms")
