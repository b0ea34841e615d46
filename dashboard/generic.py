"""What every run can show without knowing its analysis: summary, saved figures, tables, report, and
for two runs, their figures side by side and the difference of every [layer, head] tensor they share."""

from __future__ import annotations

from collections.abc import Callable

import plotly.graph_objects as go
import streamlit as st

from headlab.result import Result

from .labels import metric_label, metric_value, model_name
from .plots import difference_heatmap
from .widgets import show_figure, show_table


def run_name(run: Result) -> str:
    return run.path.name if run.path is not None else f"{run.analysis}-{model_name(run.model)}"


def show_header(run: Result, compact: bool = False) -> None:
    """Who made the run and its scalar summary numbers (one caption line when ``compact``, for narrow columns)."""
    st.caption(f"analysis **{run.analysis}** · model **{model_name(run.model)}** · run `{run_name(run)}`")
    # Numbers and flags only; tiles say what a person reads (labels.METRIC_LABELS), not the manifest's keys.
    scalars = {k: v for k, v in run.summary.items() if isinstance(v, (int, float))}
    if compact:
        st.caption(" · ".join(f"{metric_label(k)} **{metric_value(v)}**" for k, v in scalars.items()))
    elif scalars:
        columns = st.columns(min(len(scalars), 6))
        for column, (name, value) in zip(columns, list(scalars.items())[:6], strict=False):
            column.metric(metric_label(name), metric_value(value))
    with st.expander("summary and config (manifest)"):
        st.json({"summary": run.summary, "config": run.config}, expanded=False)


def show_saved_figures(run: Result, key: str, names: list[str] | None = None) -> None:
    for name in names if names is not None else sorted(run.figures):
        # A copy: cached runs are shared between reruns and sessions and must not be mutated.
        show_figure(go.Figure(run.figures[name]), key=f"{key}-fig-{name}", name=f"{run_name(run)}-{name}")


def show_tables(run: Result, key: str, names: list[str] | None = None) -> None:
    for name in names if names is not None else sorted(run.tables):
        table = run.tables[name]
        with st.expander(f"table {name} ({len(table)} rows)"):
            show_table(table, key=f"{key}-table-{name}", name=f"{run_name(run)}-{name}")


def show_report(run: Result) -> None:
    if run.report.strip():
        with st.expander("report.md"):
            st.markdown(run.report)


def render_generic(run: Result, key: str) -> None:
    show_header(run)
    if not run.figures and not run.tables:
        st.info("This run saved no figures and no tables.")
    show_saved_figures(run, key)
    show_tables(run, key)
    show_report(run)


def shared_grids(left: Result, right: Result) -> list[str]:
    """Names of the 2-D tensors (e.g. ``[layer, head]``) both runs hold with the same shape."""
    return sorted(name for name in set(left.tensors) & set(right.tensors)
                  if left.tensors[name].ndim == 2 and left.tensors[name].shape == right.tensors[name].shape
                  and left.tensors[name].is_floating_point())


def show_difference(left, right, title: str, label: str, key: str, name: str) -> None:
    """The right - left heatmap of two ``[layer, head]`` grids, or a warning when the grids differ."""
    if tuple(left.shape) == tuple(right.shape):
        show_figure(difference_heatmap(left, right, title, label), key=key, name=name)
    else:
        st.warning(f"No difference heatmap: the runs have different layer x head grids "
                   f"({tuple(left.shape)} vs {tuple(right.shape)}).")


def side_by_side(left: Result, right: Result, key: str, draw: Callable[[Result, str], None],
                 compact: bool = True) -> None:
    """Two columns, one per run: its name, its header, then ``draw(run, side_key)``."""
    for column, run, side in zip(st.columns(2), (left, right), ("left", "right"), strict=True):
        with column:
            st.subheader(run_name(run))
            show_header(run, compact=compact)
            draw(run, f"{key}-{side}")


def compare_generic(left: Result, right: Result, key: str) -> None:
    grids = shared_grids(left, right)
    if grids:
        name = st.selectbox("tensor to subtract (right - left)", grids, key=f"{key}-grid")
        fig = difference_heatmap(left.tensors[name], right.tensors[name],
                                 f"{name}: {run_name(right)} - {run_name(left)}", f"Δ {name}")
        show_figure(fig, key=f"{key}-diff-{name}", name=f"diff-{name}")
    else:
        st.info("The two runs share no [layer, head] tensor of the same shape, so there is no difference heatmap.")
    side_by_side(left, right, key, show_saved_figures)
