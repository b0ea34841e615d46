"""The LoFiT pages: head selection (ranking heatmap layer × head, training curve, top heads), head offsets
(‖v‖₂ per head, training curve) and evaluations (accuracy per condition with 95% intervals: clean, offsets,
random-heads and lowest-‖A‖ controls)."""

from __future__ import annotations

import streamlit as st

from headlab.result import Result

from ..generic import show_header, show_report, show_saved_figures, show_tables
from ..plots import layer_head_heatmap, model_title
from ..registry import View, register_view
from ..widgets import show_figure, show_table


@register_view("lofit-select", title="LoFiT head selection")
class LofitSelectView(View):
    def key_figures(self, manifest: dict) -> dict[str, object]:
        summary = manifest.get("summary") or {}
        return {"top head": summary.get("top_head"), "items": summary.get("n_items"), "steps": summary.get("steps"),
                "final loss": summary.get("final_task_loss")}

    def render(self, run: Result, key: str) -> None:
        show_header(run)
        if "a_norm" in run.tensors:
            show_figure(layer_head_heatmap(run.tensors["a_norm"], f"{model_title(run.model)}: ‖A‖₂ per head "
                                           "(LoFiT selection score)", "‖A‖₂"), f"{key}-ranking", "lofit-ranking")
        show_saved_figures(run, key, ["curve"])
        if "ranking" in run.tables:
            show_table(run.tables["ranking"].head(50), f"{key}-top", "lofit-ranking")
        show_report(run)


@register_view("lofit-train", title="LoFiT head offsets")
class LofitTrainView(View):
    def key_figures(self, manifest: dict) -> dict[str, object]:
        summary = manifest.get("summary") or {}
        return {"K": summary.get("k"), "heads": summary.get("head_set"),
                "parameters": summary.get("trained_parameters"), "final loss": summary.get("final_task_loss")}

    def render(self, run: Result, key: str) -> None:
        show_header(run)
        show_saved_figures(run, key, ["offsets", "curve"])
        show_tables(run, key, ["heads"])
        show_report(run)


@register_view("lofit-eval", title="LoFiT evaluation")
class LofitEvalView(View):
    def key_figures(self, manifest: dict) -> dict[str, object]:
        summary = manifest.get("summary") or {}
        accuracies = {k.removeprefix("accuracy_"): v for k, v in summary.items() if k.startswith("accuracy_")}
        return dict(list(accuracies.items())[:4]) or {k: v for k, v in summary.items() if k.startswith("mc")}

    def render(self, run: Result, key: str) -> None:
        show_header(run)
        show_saved_figures(run, key, ["accuracy"])
        if "accuracy" in run.tables:
            show_table(run.tables["accuracy"], f"{key}-accuracy", "lofit-accuracy")
        mc = [name for name in run.tables if name.startswith("mc_")]
        if mc:
            st.subheader("Multiple choice (MC1, MC2) per question")
            show_tables(run, key, mc)
        show_report(run)
