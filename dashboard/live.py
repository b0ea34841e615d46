"""The Live page: a model loaded in the dashboard (cached while the server runs), one prompt, its layer x head
statistics from headlab's statistics probe (click a cell to open that head's pattern), the prompt's readable
tokens, and greedy generations side by side without and with edits picked from the live-intervention forms
(``live_forms``). ``?page=live&model=NAME`` preselects a catalog name (never a path)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import streamlit as st
import torch
from PIL import Image

from headlab.errors import HeadlabError
from headlab.zoo.catalog import default_prompt_file

from .labels import model_name
from .live_edits import conflict_note, describe_edit, head_conflicts
from .live_errors import capture_load_report, load_error_message, short_error
from .live_forms import LiveContext, available, load_forms
from .live_model import (
    DEFAULT_NEW_TOKENS,
    IMAGE_TYPES,
    MAX_NEW_TOKENS,
    STATISTICS,
    LiveInput,
    LiveModel,
    build_input,
    check_model_source,
    decode,
    first_difference,
    greedy,
    head_pattern,
    live_model_names,
    load_live_model,
    prompt_limit,
    prompt_statistics,
    read_image,
    statistic_grid,
)
from .plots import clicked_cell, layer_head_heatmap, model_title
from .views.sinks import token_html
from .widgets import show_figure, show_table

LOCAL = "local folder or .gguf file…"
TEXT_PROMPT = "When Mary and John went to the store, John gave a drink to"
IMAGE_PROMPT = "What is in the image?"
MEMO_ENTRIES = 32  # per session: statistics, patterns and reference traces of recent prompts
SHORT_LABELS = {"entropy": "entropy", "first_token_mass": "first-token mass",
                "previous_token_mass": "previous-token mass", "image_mass": "image mass"}


@st.cache_resource(max_entries=2, show_spinner="loading the model…")
def cached_model(source: str) -> LiveModel:
    # Keyed by the checked name (a catalog name or a resolved path); two models at most stay in memory.
    return load_live_model(source)


def live_page() -> None:
    st.header("Live")
    st.caption("A model on this machine: the attention statistics of one prompt, one head's pattern, and greedy "
               "generations without and with edits. The page reads only the model folder and the image you give.")
    live = model_section()
    if live is None:
        return
    inp = prompt_section(live)
    if inp is None:
        return
    table = _memo(("stats", live.name, inp.cache_key()), lambda: _locked(live, prompt_statistics, inp),
                  "computing the statistics…")
    if table is None:
        return
    layer, head = statistics_section(live, inp, table)
    head_section(live, inp, table, layer, head)
    generation_section(live, inp, (layer, head))


# ------------------------------------------------------------------------------------------------ model

def model_section() -> LiveModel | None:
    names = live_model_names()
    if "live-model" not in st.session_state:
        requested = st.query_params.get("model")  # a catalog name only: a link never makes the page read a path
        st.session_state["live-model"] = requested if requested in names else names[0]
    left, right = st.columns([2, 3])
    choice = left.selectbox("model", [*names, LOCAL], key="live-model")
    path = right.text_input("local folder or .gguf file", key="live-path", disabled=choice != LOCAL,
                            placeholder="~/models/my-model (a Hugging Face folder: config.json, *.safetensors)")
    if st.button("Load model", key="live-load"):
        st.session_state["live-source"] = path if choice == LOCAL else choice
        st.session_state.pop("live-load-error", None)
    source = st.session_state.get("live-source")
    if source is None:
        error = st.session_state.get("live-load-error")
        if error:
            st.error(error)
        else:
            st.info("Pick a model and press **Load model**. Catalog names load offline (aliases only from the "
                    "local Hugging Face cache); a local folder loads from the path you type.")
        return None
    try:
        with capture_load_report() as report:
            live = cached_model(check_model_source(source))
    except Exception as err:  # any failure to load is one line on the page, not a traceback with the server's paths
        st.session_state["live-load-error"] = f"cannot load {model_name(source)!r}: {load_error_message(err, report)}"
        st.session_state.pop("live-source")  # do not retry a failing load on every rerun
        st.error(st.session_state["live-load-error"])
        return None
    if st.session_state.get("live-current") != live.name:
        _reset_for(live)
    st.caption(f"`{live.loaded!r}`")
    return live


def _reset_for(live: LiveModel) -> None:
    """A new model: its default prompt, head (0, 0), no stale prompt, edits or generation."""
    stale = {"live-edits", "live-layer", "live-head", "live-click", "live-request", "live-generation"}
    for key in [k for k in st.session_state if k in stale or k.startswith("live-form-")]:
        del st.session_state[key]
    st.session_state["live-prompt"] = default_prompt(live.loaded)
    st.session_state["live-current"] = live.name


def default_prompt(loaded) -> str:
    if loaded.arch.is_multimodal:
        return IMAGE_PROMPT
    bundled = default_prompt_file(loaded.name)
    if bundled is not None:  # a task model: a sequence of its own task, half its context long
        line = next(t for t in bundled.read_text().splitlines() if t.strip() and not t.startswith("#"))
        return " ".join(line.split()[: max(4, prompt_limit(loaded) // 2)])
    return TEXT_PROMPT


# ----------------------------------------------------------------------------------------------- prompt

def prompt_section(live: LiveModel) -> LiveInput | None:
    loaded = live.loaded
    st.text_area("prompt", key="live-prompt", height=90)
    image, chat = None, False
    if loaded.arch.is_multimodal:
        image = st.file_uploader("image (optional; an LVLM answers about it)", type=list(IMAGE_TYPES),
                                 key="live-image")
    elif getattr(loaded.text_tokenizer, "chat_template", None):
        chat = st.checkbox("wrap the prompt in the chat template (one user turn)", key="live-chat")
    image_note = " (the image's tokens included)" if loaded.arch.is_multimodal else ""
    st.caption(f"At most {prompt_limit(loaded)} tokens{image_note}: one head's pattern is T x T.")
    if st.button("Run", key="live-run", type="primary"):
        data = image.getvalue() if image is not None else None
        st.session_state["live-request"] = {"prompt": st.session_state["live-prompt"], "chat": chat,
                                            "image": data, "image_name": image.name if image is not None else None}
        st.session_state.pop("live-generation", None)
    request = st.session_state.get("live-request")
    if request is None:
        st.info("Type a prompt and press **Run**.")
        return None
    if request["prompt"] != st.session_state["live-prompt"]:
        st.warning("The prompt has changed since the last Run: the figures below are for the previous one.")
    digest = hashlib.sha256(request["image"]).hexdigest()[:16] if request["image"] is not None else None
    key = ("input", live.name, request["prompt"], request["chat"], digest)

    def build() -> LiveInput:
        picture = read_image(request["image"], request["image_name"]) if request["image"] is not None else None
        return build_input(loaded, request["prompt"], picture, request["chat"])

    return _memo(key, build, "tokenising…")


# ------------------------------------------------------------------------------------------- statistics

def statistics_section(live: LiveModel, inp: LiveInput, table) -> tuple[int, int]:
    st.subheader("Layer x head statistics of the prompt")
    columns = [c for c in STATISTICS if c in table.columns]
    metric = st.radio("statistic", columns, format_func=SHORT_LABELS.get, horizontal=True, key="live-metric",
                      help="; ".join(f"{SHORT_LABELS[c]}: {STATISTICS[c]}" for c in columns))
    grid = statistic_grid(table, metric)
    bounds = (0.0, None) if metric == "entropy" else (0.0, 1.0)
    title = f"{model_title(live.name)}: {STATISTICS[metric]} ({inp.n_tokens} tokens)"
    fig = layer_head_heatmap(grid, title, SHORT_LABELS[metric], *bounds, clickable=True)
    event = show_figure(fig, key="live-heatmap", name=f"{model_title(live.name)}-live-{metric}", select=True)
    with st.expander(f"all {len(table)} heads as a table"):
        show_table(table, key="live-table", name=f"{model_title(live.name)}-live-statistics")
    st.caption("From headlab's statistics probe (the fused path: no T x T matrix). Click a cell to open that "
               "head, or pick it below.")
    points = event.selection.points if event is not None else None
    return pick_head(live.loaded.arch.n_layers, live.loaded.arch.n_heads, points)


def pick_head(n_layers: int, n_heads: int, points: list[dict] | None) -> tuple[int, int]:
    """(layer, head) from a click on the heatmap; the two selectboxes are the fallback and follow the click."""
    cell = clicked_cell(points or [])
    if cell is not None and cell != st.session_state.get("live-click") and 0 <= cell[0] < n_layers \
            and 0 <= cell[1] < n_heads:
        st.session_state["live-click"] = cell
        st.session_state["live-layer"], st.session_state["live-head"] = cell
    st.session_state.setdefault("live-layer", 0)
    st.session_state.setdefault("live-head", 0)
    left, right = st.columns(2)
    layer = left.selectbox("layer", list(range(n_layers)), key="live-layer")
    head = right.selectbox("head", list(range(n_heads)), key="live-head")
    return int(layer), int(head)


def head_section(live: LiveModel, inp: LiveInput, table, layer: int, head: int) -> None:
    st.subheader(f"Layer {layer}, head {head}")
    row = table[(table["layer"] == layer) & (table["head"] == head)].iloc[0]
    columns = [c for c in STATISTICS if c in table.columns]
    for column, name in zip(st.columns(len(columns)), columns, strict=True):
        column.metric(SHORT_LABELS[name], f"{row[name]:.4g}")
    pattern = _memo(("pattern", live.name, inp.cache_key(), layer, head),
                    lambda: _locked(live, head_pattern, inp, layer, head), "computing the pattern…")
    if pattern is None:
        return
    show_figure(pattern.figure(head), key="live-pattern", name=f"{model_title(live.name)}-L{layer}H{head}-pattern")
    st.markdown("**The prompt's tokens**, shaded by the attention each receives from this head "
                "(mean over the queries that see it); hover a token for the value and its raw form")
    st.html(token_html(inp.tokens, pattern.received()[0], inp.raw_tokens))


# ------------------------------------------------------------------------------------------- generation

def generation_section(live: LiveModel, inp: LiveInput, head: tuple[int, int]) -> None:
    loaded = live.loaded
    st.subheader("Greedy generation without and with edits")
    if not loaded.arch.causal:
        st.info(f"{loaded.name} is an encoder: it does not generate text.")
        return
    ctx = LiveContext(live, inp, head, memo=_session_memo())
    forms = available(ctx)
    for module, error in load_forms().items():
        st.warning(f"live interventions in {module} failed to load ({error}); the others work")
    chosen = st.multiselect("edits", list(forms), format_func=lambda n: forms[n].label, key="live-edits",
                            help="each edit has its own form; all chosen edits apply together")
    edits, labelled, problems = [], [], []
    for name in chosen:
        form = forms[name]
        with st.container(border=True):
            st.markdown(f"**{form.label}**: {form.description}")
            try:
                made = form.form(ctx, f"live-form-{name}")
                for edit in made:
                    edit.validate(loaded.arch)
                edits.extend(made)
                labelled.extend((form.label, edit) for edit in made)
            except HeadlabError as err:
                st.error(f"{form.label}: {err}")
                problems.append(name)
    conflict = conflict_note(head_conflicts(labelled, loaded.arch))
    if conflict:
        st.warning(conflict)
    new_tokens = st.number_input("new tokens", min_value=1, max_value=MAX_NEW_TOKENS, value=DEFAULT_NEW_TOKENS,
                                 key="live-new-tokens")
    st.caption(f"Greedy decoding of at most {MAX_NEW_TOKENS} new tokens, twice (without, then with the edits); "
               "the edits are removed afterwards and the model is bit-exact again.")
    signature = (live.name, inp.cache_key())
    if st.button("Generate", key="live-generate", disabled=bool(problems)):
        try:
            with st.spinner("generating…"), live.lock:
                without = greedy(loaded, inp, int(new_tokens))
                edited = greedy(loaded, inp, int(new_tokens), edits) if edits else None
        except (HeadlabError, torch.OutOfMemoryError) as err:
            st.error(f"generation failed: {err}")
            return
        st.session_state["live-generation"] = {"signature": signature, "without": without, "with": edited,
                                               "edits": [describe_edit(e) for e in edits]}
    shown = st.session_state.get("live-generation")
    if shown is None or shown["signature"] != signature:
        return
    left, right = st.columns(2)
    with left:
        st.markdown("**without edits**")
        st.code(decode(loaded, inp, shown["without"])[0], language=None, wrap_lines=True)
    with right:
        st.markdown("**with edits**" + (f" ({'; '.join(shown['edits'])})" if shown["edits"] else ""))
        if shown["with"] is None:
            st.info("No edit was chosen: pick one above and generate again.")
            return
        st.code(decode(loaded, inp, shown["with"])[0], language=None, wrap_lines=True)
    where = first_difference(shown["without"], shown["with"])
    st.caption("The two continuations are identical." if where is None
               else f"The continuations part at new token {where}.")


# ------------------------------------------------------------------------------------------------ helpers

def _session_memo() -> dict:
    memo = st.session_state.setdefault("live-memo", {})
    if len(memo) > MEMO_ENTRIES:
        memo.clear()
    return memo


def _memo(key: tuple, compute: Callable[[], object], spinner: str):
    """``compute()`` once per session and key; a ``HeadlabError`` (or running out of memory) is an error on the
    page and None."""
    memo = _session_memo()
    if key not in memo:
        try:
            with st.spinner(spinner):
                memo[key] = compute()
        except (HeadlabError, torch.OutOfMemoryError) as err:
            st.error(str(err))
            return None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            # read_image refuses such images first; this keeps any other reader of the upload to one line too
            st.error(f"the image cannot be read: {short_error(err)}")
            return None
    return memo[key]


def _locked(live: LiveModel, function, *args):
    with live.lock:
        return function(live.loaded, *args)
