"""The app's pages (Runs, Run, Compare, Live) and the navigation between them.

Nothing here knows an analysis: a run's page comes from ``registry.get_view(analysis)``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from headlab.errors import HeadlabError
from headlab.result import Result
from headlab.runs import run_path

from .discovery import RunInfo, RunListing, comparison_warnings, discover_runs, load_run
from .labels import MISSING, metric_value, model_name
from .registry import GenericView, broken_views, get_view
from .widgets import show_table

PAGES = {"runs": "Runs", "run": "Run", "compare": "Compare", "live": "Live"}
KEY_FIGURES_MIN_PX = 300


def main(runs_dir: Path) -> None:
    """Draw the whole app for the runs under ``runs_dir``."""
    listing = discover_runs(runs_dir)
    page = _sidebar(listing)
    if page == "runs":
        runs_page(listing)
    elif page == "run":
        run_page(listing)
    elif page == "live":
        from .live import live_page  # imports the model stack only when the page is opened

        live_page()
    else:
        compare_page(listing)


def _sidebar(listing: RunListing) -> str:
    if "page" not in st.session_state:  # first script run of this browser session: honour ?page=
        requested = st.query_params.get("page", "runs")
        st.session_state["page"] = requested if requested in PAGES else "runs"
    with st.sidebar:
        st.title("headlab")
        page = st.radio("page", list(PAGES), format_func=PAGES.get, key="page")
        st.caption(f"runs folder: `{listing.runs_dir.resolve()}`")
        st.caption(f"{len(listing.runs)} runs, {len(listing.broken)} unreadable")
        for module, error in broken_views().items():
            st.warning(f"view {module} failed to load ({error}); its runs use the generic view")
        if st.button("Reload runs", key="reload"):
            _cached_run.clear()
    st.query_params["page"] = page
    return page


def runs_page(listing: RunListing) -> None:
    st.header("Runs")
    if not listing.runs:
        _empty_state(listing)
    else:
        table = runs_table(listing.runs)
        text_col, analysis_col, model_col = st.columns([2, 1, 1])
        text = text_col.text_input("filter", key="runs-filter", placeholder="part of a run name, model or analysis")
        analyses = analysis_col.multiselect("analysis", sorted(table["analysis"].unique()), key="runs-analysis")
        models = model_col.multiselect("model", sorted(table["model"].unique()), key="runs-model")
        shown = filter_runs(table, text, analyses, models)
        st.caption(f"{len(shown)} of {len(table)} runs · open one on the Run page, or two on Compare")
        show_table(shown, key="runs-table", name="runs", column_config=runs_columns(shown))
    if listing.broken:
        st.subheader("Incomplete or corrupt runs")
        st.caption("These folders are not readable runs; they are left as they are.")
        st.dataframe(pd.DataFrame([{"folder": b.name, "reason": b.reason} for b in listing.broken]),
                     hide_index=True, key="broken-table")


def runs_table(runs: list[RunInfo]) -> pd.DataFrame:
    """One row per run, all text: a count the manifest lacks is "—" (not "None"), a model is named, never a path
    (an exported LoFiT model is a folder, a GGUF model a file)."""
    rows = []
    for run in runs:
        figures = get_view(run.analysis).key_figures(run.manifest)
        rows.append({"run": run.name, "analysis": run.analysis, "model": model_name(run.model),
                     "date": run.created[:19].replace("T", " "),
                     "prompts": MISSING if run.n_prompts is None else str(run.n_prompts),
                     "key figures": " · ".join(f"{k}: {metric_value(v)}" for k, v in figures.items() if v is not None)})
    return pd.DataFrame(rows, columns=["run", "analysis", "model", "date", "prompts", "key figures"])


def runs_columns(table: pd.DataFrame) -> dict:
    """Column widths: the short columns narrow, the key figures as wide as their longest line (about 7 px a
    character), so that no run's figures are cut; the table scrolls sideways instead."""
    longest = int(table["key figures"].str.len().max()) if len(table) else 0
    return {"prompts": st.column_config.TextColumn(width="small"),
            "analysis": st.column_config.TextColumn(width="small"),
            "date": st.column_config.TextColumn(width="medium"),
            "key figures": st.column_config.TextColumn(width=max(KEY_FIGURES_MIN_PX, 7 * longest + 24))}


def filter_runs(table: pd.DataFrame, text: str, analyses: list[str], models: list[str]) -> pd.DataFrame:
    keep = pd.Series(True, index=table.index)
    if text.strip():
        needle = text.strip().lower()
        haystack = table["run"] + " " + table["analysis"] + " " + table["model"]
        keep &= haystack.str.lower().str.contains(needle, regex=False)
    if analyses:
        keep &= table["analysis"].isin(analyses)
    if models:
        keep &= table["model"].isin(models)
    return table[keep].reset_index(drop=True)


def run_page(listing: RunListing) -> None:
    if not listing.runs:
        st.header("Run")
        _empty_state(listing)
        return
    name = _pick_run(listing, "run", "run", default=0)
    info = listing.get(name)
    view = get_view(info.analysis)
    st.header(f"{view.title}: {name}")
    run = _load_or_report(listing, name)
    if run is not None:
        view.render(run, key=f"run-{name}")


def compare_page(listing: RunListing) -> None:
    st.header("Compare")
    if len(listing.runs) < 2:
        st.info("Compare needs two complete runs; there are "
                f"{len(listing.runs)} in `{listing.runs_dir}`.")
        if not listing.runs:
            _empty_state(listing)
        return
    left_col, right_col = st.columns(2)
    with left_col:
        left_name = _pick_run(listing, "left", "left run", default=1)
    with right_col:
        right_name = _pick_run(listing, "right", "right run", default=0)
    left, right = _load_or_report(listing, left_name), _load_or_report(listing, right_name)
    if left is None or right is None:
        return
    for warning in comparison_warnings(listing.get(left_name), listing.get(right_name)):
        st.warning(warning)  # numbers that differ for reasons other than the models
    if left.analysis == right.analysis:
        get_view(left.analysis).compare(left, right, key=f"cmp-{left_name}-{right_name}")
    else:
        st.info(f"Different analyses ({left.analysis} vs {right.analysis}): showing what both saved side by side.")
        GenericView().compare(left, right, key=f"cmp-{left_name}-{right_name}")


def _pick_run(listing: RunListing, param: str, label: str, default: int) -> str:
    """A run chosen in a selectbox, preselected from the ``?<param>=`` query parameter when it names a run."""
    names = listing.names()
    widget_key = f"pick-{param}"
    requested = st.query_params.get(param)
    if requested is not None and requested not in names:
        st.error(_why_not_a_run(listing.runs_dir, requested))
    elif requested is not None and widget_key not in st.session_state:
        st.session_state[widget_key] = requested
    if widget_key not in st.session_state:
        st.session_state[widget_key] = names[min(default, len(names) - 1)]
    name = st.selectbox(label, names, key=widget_key,
                        format_func=lambda n: f"{n}  ({listing.get(n).analysis} · {model_name(listing.get(n).model)})")
    st.query_params[param] = name
    return name


def _why_not_a_run(runs_dir: Path, name: str) -> str:
    try:
        run_path(runs_dir, name)  # refuses '..', absolute paths, separators
    except HeadlabError as err:
        return f"refused: {err}"
    return f"no complete run named {name!r} in {runs_dir}; pick one below"


def _load_or_report(listing: RunListing, name: str) -> Result | None:
    path = run_path(listing.runs_dir, name)
    try:
        return _cached_run(str(listing.runs_dir), name, (path / "manifest.json").stat().st_mtime_ns)
    except (HeadlabError, OSError) as err:
        st.error(f"cannot read run {name}: {err}")
        return None


@st.cache_resource(max_entries=16, show_spinner="reading the run…")
def _cached_run(runs_dir: str, name: str, manifest_mtime: int) -> Result:
    # manifest_mtime is part of the key: a run replaced under the same name is read again.
    return load_run(Path(runs_dir), name)


def _empty_state(listing: RunListing) -> None:
    where = listing.runs_dir
    if not where.exists():
        st.info(f"The runs folder `{where}` does not exist yet.")
    else:
        st.info(f"No runs yet in `{where}`.")
    st.markdown("Create one, then press **Reload runs** (or refresh the page):")
    st.code(f"analyze sinks --model tiny-qwen3 --out {where}", language="bash")
