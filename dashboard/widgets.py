"""Streamlit building blocks used by every view: a figure with its PNG/SVG downloads, a table with its CSV."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from .export import IMAGE_FORMATS, figure_image, find_browser, table_csv
from .plots import empty_figure, fit_layer_height, limit_legend, nothing_to_draw


def show_figure(fig: go.Figure, key: str, name: str, select: bool = False):
    """Plot ``fig`` and offer it as PNG and SVG (rendered only when a button is clicked).

    A figure with nothing to draw (no point, or only blank cells) says "nothing found" instead of showing empty
    axes; a saved heatmap with layers on y is as tall as its layers need; more than
    ``MAX_LEGEND_LINES`` legend entries become a dropdown. ``select``: clicking a point reruns the app and
    the selection is returned (``event.selection.points``); otherwise None."""
    if nothing_to_draw(fig):
        fig = empty_figure(fig.layout.title.text or name)
    fig = limit_legend(fit_layer_height(fig))
    if select:
        event = st.plotly_chart(fig, key=key, width="stretch", on_select="rerun", selection_mode="points")
    else:
        event = None
        st.plotly_chart(fig, key=key, width="stretch")
    if find_browser() is None:
        st.caption("PNG/SVG export needs chromium (apt-get install chromium) or BROWSER_PATH.")
        return event
    columns = st.columns(len(IMAGE_FORMATS) + 4)
    for column, (fmt, mime) in zip(columns, IMAGE_FORMATS.items(), strict=False):
        with column:
            # A callable defers kaleido (~1 s) to the click, so reruns stay fast.
            st.download_button(fmt.upper(), data=_renderer(fig, fmt), file_name=f"{name}.{fmt}", mime=mime,
                               key=f"{key}-{fmt}", on_click="ignore")
    return event


def show_table(table: pd.DataFrame, key: str, name: str, height: int | None = None,
               column_config: dict | None = None) -> None:
    """The table (``column_config``: Streamlit's per-column widths and formats), and its raw rows as CSV."""
    st.dataframe(table, hide_index=True, key=key, height=height or "auto", column_config=column_config)
    st.download_button("CSV", data=table_csv(table), file_name=f"{name}.csv", mime="text/csv",
                       key=f"{key}-csv", on_click="ignore")


def _renderer(fig: go.Figure, fmt: str):
    def render() -> bytes:
        return figure_image(fig, fmt)

    return render
