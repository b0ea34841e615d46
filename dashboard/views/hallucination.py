"""The hallucination page (runs of ``analyze hallucination``): the metrics of every method with their 95% CIs and
paired differences from ``none``, each fix next to its random control, one plain sentence per method; then the
captions of one image (CHAIR) with the hallucinated objects marked, the answers (POPE) with the wrong ones
marked, and the per-token T-VHD when the run holds it.

Everything shown comes from the run's folder: the synonym list and the images the run was made from are not
read from where they were (a run may name any path); an image is shown only when its file is inside the runs
folder: ``<run>/images/`` or, shared by the runs, ``<runs>/.images/`` (a dot folder: the runs list skips it)."""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from headlab.analyses.hallucination_eval import MIN_CI_N
from headlab.result import Result

from ..export import table_csv
from ..generic import run_name, show_header, show_report, show_tables
from ..plots import model_title
from ..registry import View, register_view
from ..widgets import show_figure, show_table

CONTROL = "-control"
BASELINE = "none"
# Which way is good, for the sentence under the chart (None: neither, e.g. the yes-ratio or caption length).
BETTER = {"chair_s": "lower", "chair_i": "lower", "recall": "higher", "precision": "higher", "f1": "higher",
          "accuracy": "higher", "mean_f1": "higher", "mean_length_words": None, "yes_ratio": None}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp")
SHARED_IMAGES = ".images"  # <runs>/.images/: images shared by the runs (dot folders are not listed as runs)
T_VHD_COLUMNS = ("method", "image", "step", "token", "t_vhd")
MARK_STYLE = "background: #fca5a5; padding: 0 2px; border-radius: 3px"
COLOURS = {"baseline": "#4b5563", "method": "#2563eb", "control": "#93c5fd"}
WRONG = "background-color: #fee2e2"
_SAFE_IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]*$")


# ---------------------------------------------------------------------------------------------------
# Metrics


def method_order(labels: Sequence[str]) -> list[str]:
    """``none`` first, then each method followed by its control (``pai``, ``pai-control``), in run order."""
    seen = list(dict.fromkeys(str(label) for label in labels))
    out = [BASELINE] if BASELINE in seen else []
    for label in seen:
        if label == BASELINE or label in out:
            continue
        if label.endswith(CONTROL) and label.removesuffix(CONTROL) in seen:
            continue  # placed after its method
        out.append(label)
        if f"{label}{CONTROL}" in seen:
            out.append(f"{label}{CONTROL}")
    return out


def fmt(value: object) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{float(value):.3g}"


def interval(value: object, low: object, high: object) -> str:
    """``0.667 [0.167, 1]``; a missing value reads "–"."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{fmt(value)} [{fmt(low)}, {fmt(high)}]"


def splits_of(metrics: pd.DataFrame) -> list[str] | None:
    """POPE's splits in run order ("all" = the mean F1 over splits, last); None for CHAIR (no split column)."""
    if "split" not in metrics.columns:
        return None
    splits = [s for s in dict.fromkeys(metrics["split"].astype(str)) if s != "all"]
    return splits + (["all"] if (metrics["split"] == "all").any() else [])


def metric_rows(metrics: pd.DataFrame, split: str | None) -> pd.DataFrame:
    """The rows of one split (all rows for CHAIR), indexed by (method, metric)."""
    part = metrics if split is None else metrics[metrics["split"].astype(str) == split]
    return part.set_index(["method", "metric"])


def readable_metrics(metrics: pd.DataFrame, split: str | None, delta: bool = False) -> pd.DataFrame:
    """One row per method (controls after their method), one column per metric: "value [95% CI]", or with
    ``delta`` the difference from ``none`` with its paired 95% CI (``none`` itself left out)."""
    rows = metric_rows(metrics, split)
    names = list(dict.fromkeys(rows.index.get_level_values("metric")))
    labels = method_order(rows.index.get_level_values("method"))
    if delta:
        labels = [label for label in labels if label != BASELINE]
    out = []
    for label in labels:
        line = {"method": label}
        for name in names:
            if (label, name) not in rows.index:
                line[name] = "–"
                continue
            r = rows.loc[(label, name)]
            line[name] = (interval(r["delta"], r["delta_ci_low"], r["delta_ci_high"]) if delta
                          else interval(r["value"], r["ci_low"], r["ci_high"]))
        out.append(line)
    return pd.DataFrame(out, columns=["method", *names])


def _kind(label: str) -> str:
    return "baseline" if label == BASELINE else "control" if label.endswith(CONTROL) else "method"


def metric_figure(metrics: pd.DataFrame, metric: str, split: str | None, model: str, delta: bool = False) -> go.Figure:
    """One bar per method (controls light, after their method) with its 95% CI as error bars; with ``delta`` the
    difference from ``none`` with its paired CI, and a line at 0."""
    rows = metric_rows(metrics, split)
    labels = [label for label in method_order(rows.index.get_level_values("method"))
              if (label, metric) in rows.index and not (delta and label == BASELINE)]
    part = rows.loc[[(label, metric) for label in labels]] if labels else rows.iloc[:0]
    value, low, high = (("delta", "delta_ci_low", "delta_ci_high") if delta else ("value", "ci_low", "ci_high"))
    y = part[value].astype(float).to_numpy()
    fig = go.Figure(go.Bar(
        x=labels, y=y, marker_color=[COLOURS[_kind(label)] for label in labels],
        marker_pattern_shape=["/" if _kind(label) == "control" else "" for label in labels],
        error_y={"type": "data", "symmetric": False, "array": part[high].astype(float).to_numpy() - y,
                 "arrayminus": y - part[low].astype(float).to_numpy()},
        customdata=part[[low, high]].astype(float).to_numpy(),
        hovertemplate="%{x}: %{y:.4g}<br>95% CI [%{customdata[0]:.4g}, %{customdata[1]:.4g}]<extra></extra>"))
    where = f", {split}" if split is not None else ""
    what = f"Δ {metric} vs {BASELINE} (paired 95% CI)" if delta else f"{metric} (95% bootstrap CI)"
    fig.update_layout(title=f"{model_title(model)}: {what}{where}", yaxis_title=what, xaxis_title="method")
    if delta:
        fig.add_hline(y=0, line_color="black", line_width=1)
    return fig


def _md(text: str) -> str:
    """Text from a run, safe inside Markdown (no emphasis, links or HTML from a label)."""
    return re.sub(r"([\\`*_{}\[\]()<>#+!|~])", r"\\\1", str(text))


def verdicts(metrics: pd.DataFrame, metric: str, split: str | None) -> list[str]:
    """One Markdown sentence per method (not ``none``): does the paired CI of its difference from ``none``
    exclude 0, and do the 95% CIs of its value and its control's value overlap."""
    rows = metric_rows(metrics, split)
    labels = [label for label in method_order(rows.index.get_level_values("method"))
              if label != BASELINE and (label, metric) in rows.index]
    better = BETTER.get(metric)
    hint = f" ({better} is better)" if better else ""
    lines = []
    for label in labels:
        r = rows.loc[(label, metric)]
        name = f"**{_md(label)}**"
        few = "n" in r.index and pd.notna(r["n"]) and int(r["n"]) < MIN_CI_N
        if few:
            # A bootstrap over a handful of items takes a handful of values: its interval says nothing either way.
            lines.append(f"{name}: {metric} {interval(r['value'], r['ci_low'], r['ci_high'])}; no verdict: n = "
                         f"{int(r['n'])} is too few for a bootstrap CI to mean anything (at least {MIN_CI_N}).")
            continue
        if pd.isna(r["delta"]):
            text = f"{name}: {metric} {interval(r['value'], r['ci_low'], r['ci_high'])}; no `none` run to compare with"
        else:
            d, lo, hi = float(r["delta"]), float(r["delta_ci_low"]), float(r["delta_ci_high"])
            moved = "raises" if d > 0 else "lowers" if d < 0 else "leaves"
            by = f" by {fmt(abs(d))}" if d != 0 else " unchanged"
            excludes = lo > 0 or hi < 0
            text = (f"{name} {moved} {metric}{hint}{by} vs none; the paired 95% CI of the difference "
                    f"[{fmt(lo)}, {fmt(hi)}] " + ("**excludes 0**: an effect" if excludes
                                                 else "includes 0: no effect shown"))
        if label.endswith(CONTROL):
            text += " (a random control of the same size)"
        elif (f"{label}{CONTROL}", metric) in rows.index:
            c = rows.loc[(f"{label}{CONTROL}", metric)]
            overlap = not (float(r["ci_high"]) < float(c["ci_low"]) or float(c["ci_high"]) < float(r["ci_low"]))
            text += (f". Against its control ({interval(c['value'], c['ci_low'], c['ci_high'])} vs "
                     f"{interval(r['value'], r['ci_low'], r['ci_high'])}): the 95% CIs "
                     + ("overlap, so it does not differ from its control here" if overlap
                        else "**do not overlap**: it differs from its control"))
        else:
            text += "; no control in this run (`--controls` adds one)"
        lines.append(text + ".")
    return lines


# ---------------------------------------------------------------------------------------------------
# Captions (CHAIR)


def split_objects(text: object) -> list[str]:
    """``"house, dining table"`` (the captions table's lists) → ``["house", "dining table"]``."""
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return []
    return [part.strip() for part in str(text).split(",") if part.strip()]


def _matcher(entries: tuple[tuple[str, str], ...], lemmatizer: str):
    from headlab.analyses.hallucination_metrics import ChairMatcher

    return ChairMatcher(dict(entries), lemmatizer)


_matchers: dict = {}


def mention_spans(caption: str, objects: set[str], synonyms: Mapping[str, str] | None = None,
                  lemmatizer: str = "builtin") -> list[tuple[int, int, str]]:
    """(start, end, object) character spans of ``caption`` that name one of ``objects``, found by CHAIR's own
    matcher (lemmas, so "houses" names "house"; its two-word rules, so "hot dog" does not name "dog").

    ``synonyms``: the run's ``{word: object}`` list when the dashboard has it (headlab's own list); else each
    object is matched by its own name."""
    entries = dict(synonyms or {})
    for name in objects:
        entries.setdefault(name, name)
    key = (tuple(sorted(entries.items())), lemmatizer)
    if key not in _matchers:
        if len(_matchers) > 8:  # one run's captions need one or two lists; keep the cache small
            _matchers.clear()
        _matchers[key] = _matcher(*key)
    matcher = _matchers[key]
    # WORD runs over the lower-cased caption; map each lower-cased character back to its source character.
    from headlab.analyses.hallucination_metrics import WORD

    chars, origin = [], []
    for i, ch in enumerate(caption):
        for low in ch.lower():
            chars.append(low)
            origin.append(i)
    words = list(WORD.finditer("".join(chars)))
    spans = []
    for mention in matcher.mentions(caption):
        if mention.object not in objects:
            continue
        first, last = words[mention.index], words[mention.index + len(mention.text.split()) - 1]
        spans.append((origin[first.start()], origin[last.end() - 1] + 1, mention.object))
    return spans


def highlight_caption(caption: str, hallucinated: Sequence[str], synonyms: Mapping[str, str] | None = None,
                      lemmatizer: str = "builtin") -> tuple[str, list[str]]:
    """The caption as escaped HTML with every mention of a hallucinated object in ``<mark>``, and the
    hallucinated objects that could not be located in the text (named by a synonym the dashboard lacks)."""
    wanted = set(hallucinated)
    spans = mention_spans(caption, wanted, synonyms, lemmatizer) if wanted else []
    out, at = [], 0
    for start, end, obj in spans:
        out.append(html.escape(caption[at:start]))
        out.append(f'<mark style="{MARK_STYLE}" title="{html.escape(obj, quote=True)}">'
                   f'{html.escape(caption[start:end])}</mark>')
        at = end
    out.append(html.escape(caption[at:]))
    found = {obj for _, _, obj in spans}
    return "".join(out), [obj for obj in dict.fromkeys(hallucinated) if obj not in found]


def run_synonyms(run: Result) -> dict[str, str] | None:
    """The run's synonym list: its ``synonyms`` table (runs store the list they used), else headlab's own list
    when the run used it; None otherwise (the dashboard reads nothing outside the runs folder)."""
    table = run.tables.get("synonyms")
    if table is not None and {"word", "object"} <= set(table.columns):
        return dict(zip(table["word"], table["object"], strict=True))
    described = run.summary.get("synonyms") or run.config.get("synonyms") or {}
    if isinstance(described, dict) and described.get("headlab_default"):
        from headlab.analyses.hallucination_metrics import load_synonym_list

        return load_synonym_list().entries
    return None


def run_lemmatizer(run: Result) -> str:
    return "auto" if run.summary.get("lemmatizer") == "nltk-wordnet" else "builtin"


def find_image(run: Result, name: object) -> Path | None:
    """The image file ``name`` if it is inside the runs folder (``<run>/images/`` or ``<runs>/.images/``), else
    None. Names with a path, hidden names and links that lead out of the runs folder are refused."""
    if run.path is None or not isinstance(name, str) or not _SAFE_IMAGE.match(name) or ".." in name:
        return None
    if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
        return None
    root = run.path.parent.resolve()
    for folder in (run.path / "images", run.path.parent / SHARED_IMAGES):
        candidate = (folder / name).resolve()
        if candidate.is_relative_to(root) and candidate.is_file():
            return candidate
    return None


def captions_html(rows: pd.DataFrame, synonyms: Mapping[str, str] | None, lemmatizer: str) -> str:
    """One block per method: its name, the hallucinated objects, the caption with their mentions marked."""
    blocks = []
    for row in rows.itertuples(index=False):
        hallucinated = split_objects(getattr(row, "hallucinated_objects", None))
        caption = "" if pd.isna(row.caption) else str(row.caption)
        body, unplaced = highlight_caption(caption, hallucinated, synonyms, lemmatizer)
        note = (f"{len(hallucinated)} hallucinated: {html.escape(', '.join(dict.fromkeys(hallucinated)))}"
                if hallucinated else "no hallucinated object")
        if unplaced:
            note += f" (not located in the text: {html.escape(', '.join(unplaced))})"
        colour = COLOURS[_kind(str(row.method))]
        blocks.append(f'<div style="margin: 0.4em 0; padding-left: 0.6em; border-left: 4px solid {colour}">'
                      f'<div><b>{html.escape(str(row.method))}</b> '
                      f'<span style="color: gray; font-size: 0.85em">{note}</span></div>'
                      f'<div style="white-space: pre-wrap">{body or "<i>(empty caption)</i>"}</div></div>')
    return f'<div class="headlab-captions" style="line-height: 1.7">{"".join(blocks)}</div>'


# ---------------------------------------------------------------------------------------------------
# Answers (POPE) and T-VHD


def answers_frame(answers: pd.DataFrame, splits: Sequence[str], methods: Sequence[str],
                  wrong_only: bool) -> pd.DataFrame:
    """The answers of the chosen splits and methods, with ``correct`` (read_as == label)."""
    part = answers[answers["split"].astype(str).isin(splits) & answers["method"].astype(str).isin(methods)].copy()
    part["correct"] = part["read_as"].astype(str) == part["label"].astype(str)
    if wrong_only:
        part = part[~part["correct"]]
    order = {label: i for i, label in enumerate(method_order(answers["method"]))}
    part = part.sort_values("method", key=lambda s: s.astype(str).map(order), kind="stable")  # splits as run
    columns = [c for c in ("method", "split", "question_id", "image", "question", "label", "read_as", "answer",
                           "correct") if c in part.columns]
    return part[columns].reset_index(drop=True)


def t_vhd_figure(table: pd.DataFrame, model: str, method: str, image: str) -> go.Figure:
    """T-VHD of each generated token of one caption, in order (x: step and token)."""
    part = table[(table["method"].astype(str) == method) & (table["image"].astype(str) == image)].sort_values("step")
    x = [f"{int(s)}: {t}" for s, t in zip(part["step"], part["token"].astype(str), strict=True)]
    fig = go.Figure(go.Bar(x=x, y=part["t_vhd"].astype(float), marker_color=COLOURS[_kind(method)],
                           hovertemplate="step %{x}<br>T-VHD %{y:.4g}<extra></extra>"))
    fig.update_layout(title=f"{model_title(model)}: T-VHD per token, {method}, {image}", xaxis_title="step: token",
                      yaxis_title="T-VHD")
    return fig


# ---------------------------------------------------------------------------------------------------
# The view


@register_view("hallucination", title="Hallucination fixes")
class HallucinationView(View):
    def key_figures(self, manifest: dict) -> dict[str, object]:
        summary = manifest.get("summary") or {}
        methods = summary.get("methods") or {}
        out: dict[str, object] = {"bench": summary.get("bench"), "methods": ", ".join(methods) or None}
        headline = "chair_i" if summary.get("bench") == "chair" else "mean_f1"
        base = methods.get(BASELINE, {}).get(headline)
        if base is not None:
            out[f"{headline} (none)"] = base
        deltas = {label: entry[f"delta_{headline}"][0] for label, entry in methods.items()
                  if isinstance(entry, dict) and isinstance(entry.get(f"delta_{headline}"), list)
                  and not label.endswith(CONTROL)}
        if deltas:
            pick = min if headline == "chair_i" else max
            label = pick(deltas, key=deltas.get)
            out[f"best Δ {headline}"] = f"{label} {deltas[label]:+.3g}"
        return {k: v for k, v in out.items() if v is not None}

    def render(self, run: Result, key: str) -> None:
        metrics = run.tables.get("metrics")
        needed = {"method", "metric", "value", "ci_low", "ci_high", "delta", "delta_ci_low", "delta_ci_high"}
        if metrics is None or not needed <= set(metrics.columns) or metrics.empty:
            st.warning("This hallucination run has no readable metrics table (method, metric, value, CI, delta); "
                       "showing what it saved instead.")
            super().render(run, key)
            return
        show_header(run)
        self._metrics(run, metrics, key)
        if "captions" in run.tables:
            self._captions(run, key)
        if "answers" in run.tables:
            self._answers(run, key)
        if "t_vhd" in run.tables:
            self._t_vhd(run, key)
        show_tables(run, key)
        show_report(run)

    def _metrics(self, run: Result, metrics: pd.DataFrame, key: str) -> None:
        st.subheader("Metrics per method")
        splits = splits_of(metrics)
        split = None
        if splits:
            split = st.radio("POPE split", splits, horizontal=True, key=f"{key}-split",
                             help='"all": the F1 averaged over the splits')
        st.caption("value [95% percentile bootstrap CI] over the run's images (CHAIR) or questions (POPE); "
                   "a control (method-control) is the same edit on random keys, patches or heads of the same size.")
        show_table(readable_metrics(metrics, split), key=f"{key}-metrics", name=f"{run_name(run)}-metrics")
        if metrics["delta"].notna().any():
            st.caption("Difference from none [paired 95% CI]: both runs resampled with the same draw.")
            show_table(readable_metrics(metrics, split, delta=True), key=f"{key}-deltas",
                       name=f"{run_name(run)}-deltas")
        names = list(dict.fromkeys(metric_rows(metrics, split).index.get_level_values("metric")))
        metric_col, mode_col = st.columns([2, 1])
        metric = metric_col.selectbox("metric", names, key=f"{key}-metric")
        delta = mode_col.radio("plot", ["value", f"Δ vs {BASELINE}"], horizontal=True, key=f"{key}-mode",
                               disabled=not metrics["delta"].notna().any()) != "value"
        tag = f"{metric}-{split}" if split else metric
        show_figure(metric_figure(metrics, metric, split, run.model, delta), key=f"{key}-bars-{tag}",
                    name=f"{run_name(run)}-{'delta-' if delta else ''}{tag}")
        for line in verdicts(metrics, metric, split):
            st.markdown(f"- {line}")

    def _captions(self, run: Result, key: str) -> None:
        captions = run.tables["captions"]
        st.subheader("Captions per image")
        missing = [c for c in ("method", "image", "caption", "hallucinated_objects") if c not in captions.columns]
        if missing:
            st.warning(f"The captions table lacks {', '.join(missing)}; it is shown as it is below.")
            return
        images = list(dict.fromkeys(run.tables["images"]["image"].astype(str))) if "images" in run.tables else []
        images += [i for i in dict.fromkeys(captions["image"].astype(str)) if i not in images]
        if not images:
            st.info("This run has no captions.")
            return
        counts = {image: sum(len(split_objects(h)) for h in captions.loc[captions["image"].astype(str) == image,
                                                                         "hallucinated_objects"])
                  for image in images}
        default = next((i for i, image in enumerate(images) if counts[image]), 0)
        image = st.selectbox("image", images, index=default, key=f"{key}-image",
                             format_func=lambda i: f"{i} ({counts[i]} hallucinated mentions over all methods)")
        rows = captions[captions["image"].astype(str) == image]
        order = {label: i for i, label in enumerate(method_order(captions["method"]))}
        rows = rows.sort_values("method", key=lambda s: s.map(order), kind="stable")
        synonyms = run_synonyms(run)
        picture, text = st.columns([1, 3])
        with picture:
            path = find_image(run, image)
            if path is not None:
                st.image(str(path), caption=image, width="stretch")
            else:
                st.caption(f"The image file {image} is not in the runs folder, so only the captions are shown "
                           f"(copy it to `{run_name(run)}/images/` or `{SHARED_IMAGES}/` in the runs folder to see "
                           "it; the dashboard reads nothing outside the runs folder).")
        with text:
            st.html(captions_html(rows, synonyms, run_lemmatizer(run)))
            if synonyms is None:
                st.caption("Marked: mentions of each hallucinated object by its own name (plurals included); the "
                           "run's synonym list is not in the runs folder, so synonyms are not marked.")

    def _answers(self, run: Result, key: str) -> None:
        answers = run.tables["answers"]
        st.subheader("Answers per question")
        missing = [c for c in ("method", "split", "question", "label", "read_as") if c not in answers.columns]
        if missing:
            st.warning(f"The answers table lacks {', '.join(missing)}; it is shown as it is below.")
            return
        splits = list(dict.fromkeys(answers["split"].astype(str)))
        methods = method_order(answers["method"])
        split_col, method_col, wrong_col = st.columns([2, 3, 1])
        chosen_splits = split_col.multiselect("split", splits, default=splits, key=f"{key}-ans-split")
        chosen_methods = method_col.multiselect("method", methods, default=methods, key=f"{key}-ans-method")
        wrong_only = wrong_col.toggle("only wrong", key=f"{key}-ans-wrong")
        table = answers_frame(answers, chosen_splits, chosen_methods, wrong_only)
        wrong = int((~table["correct"]).sum())
        st.caption(f"{len(table)} answers, {wrong} wrong (read_as ≠ label, highlighted); read_as is the answer as "
                   f"the run's parser ({run.summary.get('parser', run.config.get('parser', '?'))}) read it.")
        styled = table.style.apply(lambda r: [WRONG if not r["correct"] else ""] * len(r), axis=1)
        st.dataframe(styled, hide_index=True, key=f"{key}-answers")
        st.download_button("CSV", data=table_csv(table), file_name=f"{run_name(run)}-answers.csv", mime="text/csv",
                           key=f"{key}-answers-csv", on_click="ignore")

    def _t_vhd(self, run: Result, key: str) -> None:
        table = run.tables["t_vhd"]
        st.subheader("T-VHD per generated token")
        missing = [c for c in T_VHD_COLUMNS if c not in table.columns]
        if missing:
            st.warning(f"The t_vhd table lacks {', '.join(missing)}; it is shown as it is below.")
            return
        if table.empty:
            st.info("The t_vhd table of this run is empty.")
            return
        method_col, image_col = st.columns(2)
        method = method_col.selectbox("method", method_order(table["method"]), key=f"{key}-tvhd-method")
        images = list(dict.fromkeys(table.loc[table["method"].astype(str) == method, "image"].astype(str)))
        image = image_col.selectbox("image", images, key=f"{key}-tvhd-image")
        show_figure(t_vhd_figure(table, run.model, method, image), key=f"{key}-tvhd",
                    name=f"{run_name(run)}-t-vhd-{method}-{image}")
