"""The circuits page: the clean model per task, a layer x head score heatmap per task with its circuit
marked, the overlap of the circuits, role tags, the ablation check and attribution's agreement with path patching."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from headlab.result import Result

from ..generic import run_name, show_header, show_report, show_tables
from ..plots import layer_head_heatmap, model_title
from ..registry import View, register_view
from ..widgets import show_figure, show_table


def score_heatmap(run: Result, task: str) -> go.Figure:
    """``scores.{task} [layer, head]`` (×100, signed, centred at 0) with the circuit's heads circled."""
    scores = run.tensors[f"scores.{task}"]
    limit = float(scores.abs().max()) or 1.0
    method = run.config.get("method", "?")
    fig = layer_head_heatmap(scores, f"{model_title(run.model)}: {task}, {method} patching score ×100", "score",
                             zmin=-limit, zmax=limit, colorscale="RdBu")
    fig.data[0].zmid = 0
    circuit = run.tables["circuits"]
    circuit = circuit[circuit["task"] == task]
    fig.add_scatter(x=circuit["head"], y=circuit["layer"], mode="markers", name="circuit",
                    marker={"symbol": "circle-open", "size": 14, "color": "black", "line": {"width": 2}},
                    hovertemplate="circuit head %{y}.%{x}<extra></extra>")
    return fig


def overlap_matrix(run: Result) -> pd.DataFrame:
    """One row per head in any circuit, one column per task: whether the head is in that task's circuit."""
    circuits = run.tables["circuits"]
    tasks = list(dict.fromkeys(circuits["task"]))
    heads = sorted({(int(r.layer), int(r.head)) for r in circuits.itertuples()})
    rows = []
    for layer, head in heads:
        member = {t: bool(((circuits.task == t) & (circuits.layer == layer) & (circuits["head"] == head)).any())
                  for t in tasks}
        rows.append({"head": f"{layer}.{head}", **member, "shared": all(member.values())})
    return pd.DataFrame(rows)


@register_view("circuits", title="Circuits")
class CircuitsView(View):
    def render(self, run: Result, key: str) -> None:
        show_header(run)
        st.subheader("Clean model")
        show_table(run.tables["clean"], key=f"{key}-clean", name=f"{run_name(run)}-clean")
        tasks = list(run.summary.get("tasks", []))
        for task in tasks:
            if f"scores.{task}" in run.tensors:
                show_figure(score_heatmap(run, task), key=f"{key}-heat-{task}", name=f"{run_name(run)}-{task}")
        if len(tasks) > 1 and len(run.tables.get("overlap", [])):
            st.subheader("Overlap")
            show_table(run.tables["overlap"], key=f"{key}-overlap", name=f"{run_name(run)}-overlap")
            show_table(overlap_matrix(run), key=f"{key}-members", name=f"{run_name(run)}-members")
        if "roles" in run.tables:
            st.subheader("Role tags from attention")
            show_table(run.tables["roles"], key=f"{key}-roles", name=f"{run_name(run)}-roles")
        if "ablation" in run.tables:
            st.subheader("Ablating the circuit vs random heads")
            show_table(run.tables["ablation"], key=f"{key}-ablation", name=f"{run_name(run)}-ablation")
        if "agreement" in run.tables:
            st.subheader("Attribution vs exact path patching")
            show_table(run.tables["agreement"], key=f"{key}-agreement", name=f"{run_name(run)}-agreement")
        show_tables(run, key, ["scores", "circuits"])
        show_report(run)

    def key_figures(self, manifest: dict) -> dict[str, object]:
        summary = manifest.get("summary") or {}
        out = {"method": summary.get("method"), "circuit size": summary.get("circuit_size")}
        if "iou" in summary:
            out["IoU"] = summary["iou"]
        return {k: v for k, v in out.items() if v is not None}
