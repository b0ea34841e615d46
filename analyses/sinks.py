"""Attention sinks (Gu et al.) and massive activations (Sun et al.): methods.md §1.

alpha[l, h, k] = mean over queries that see key k of A[l, h, i, k]; Sink_k^eps = 100 · mean over
samples, layers and heads of 1[alpha > eps]. Everything streams from the statistics path: no
attention matrix is materialised.

Secondary sinks, sink levels and their MLP formation (Wong et al.) come from the same forward passes:
see ``secondary_sinks.py`` and ``sink_levels.py``; ``SinksConfig.secondary`` switches parts off.

Sink categories (BOS, first text token, non-initial sinks) come from the same statistics: ``sink_categories.py``.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import asdict

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from tqdm.auto import tqdm

from headlab.analyses.configs import SinksConfig
from headlab.batching import batches, check_max_tokens, id_batches
from headlab.errors import InputError
from headlab.figures import model_title
from headlab.loading import LoadedModel
from headlab.probes import AttentionProbe, KeyImportance, LayerPartsProbe, ResidualProbe, RowMeans, trace
from headlab.prompts import as_prompt_list, hash_inputs
from headlab.result import Result, to_json_safe
from headlab.tally import Mergeable, Pass, run_pass
from headlab.tokens import display_tokens

from .secondary_sinks import SecondarySinkCollector, SecondarySinksConfig
from .sink_categories import SinkCategories, prompt_stats
from .sink_levels import count_levels, histogram, levels_figure


def analyze_sinks(loaded: LoadedModel, prompts: list[str], config: SinksConfig | None = None,
                  progress: bool = True, token_ids: list[list[int]] | None = None) -> Result:
    """``token_ids``: the inputs as ids (chat template, generations: ``analyses.generation``), one list per
    prompt, at most ``config.max_tokens`` long; without it the prompts are tokenized under the BOS policy."""
    config = config or SinksConfig()
    prompts = as_prompt_list(prompts)  # a bare str would be read one character per prompt
    config.check()
    check_max_tokens(loaded, config.max_tokens)
    if token_ids is not None and len(token_ids) != len(prompts):
        raise InputError(f"{len(token_ids)} token id lists for {len(prompts)} prompts: give one per prompt")
    arch = loaded.arch
    secondary = SecondarySinkCollector(arch.n_layers, config.secondary, config.chat_template) \
        if config.secondary.enabled else None
    importance = KeyImportance(arch.n_layers, arch.n_heads, config.n_keys, config.eps)
    rows = RowMeans(arch.n_layers, arch.n_heads)
    categories = SinkCategories(arch.n_layers, arch.n_heads, config.eps, config.category_min_queries,
                                arch.bos_token_id) if config.categories else None

    n_kept = min(len(prompts), config.token_view_prompts)
    n_pattern_prompts = min(len(prompts), max(0, config.pattern_prompts))
    prompt_rows = PromptRows(n_kept, arch.n_layers, arch.n_heads, config.max_tokens)
    source = batches(loaded, prompts, config.max_tokens, config.batch_size) if token_ids is None else \
        id_batches(loaded, [ids[: config.max_tokens] for ids in token_ids], config.batch_size)
    units = list(source)  # tokenised (and checked) before any forward pass
    accumulators = {"importance": importance, "rows": rows, "prompts": prompt_rows,
                    **({"secondary": secondary} if secondary else {}),
                    **({"categories": categories} if categories else {})}

    batch_alpha: dict[int, torch.Tensor] = {}
    batch_stats: dict[str, dict[int, torch.Tensor]] = {"mass": {}, "count": {}, "first": {}, "rows": {}}
    need_alpha = False  # set per batch: only the secondary scan, the categories and the token views read them

    def on_stats(layer, stats):
        importance.add(layer, stats)
        rows.add(layer, stats)
        if need_alpha:
            # Mean attention each key receives, per prompt: alpha at every position, not only the first n_keys.
            batch_alpha[layer] = (stats.key_mass / stats.key_count.clamp(min=1)[:, None, :]).float().cpu()
            batch_stats["mass"][layer] = stats.key_mass.float().cpu()
            batch_stats["count"][layer] = stats.key_count.float().cpu()
            batch_stats["first"][layer] = stats.first_mass.float().cpu()
            batch_stats["rows"][layer] = stats.row_counted.sum(-1).float().cpu()

    def step(unit: int) -> None:
        nonlocal need_alpha
        batch = units[unit]
        need_alpha = secondary is not None or categories is not None or batch.indices[0] < n_kept
        loaded.model(input_ids=batch.input_ids.to(loaded.device), attention_mask=batch.attention_mask.to(loaded.device))
        summary = resid.summary()
        part_summary = parts.summary() if parts else None
        for row, prompt_index in enumerate(batch.indices):
            length = int(batch.attention_mask[row].sum())
            ids = batch.input_ids[row, :length].tolist()
            shown = display_tokens(loaded.text_tokenizer, ids)  # readable; batch.tokens are the raw ones
            if prompt_index < n_pattern_prompts:
                prompt_rows.pattern_ids.append(ids)
            prompt_rows.n_tokens += length
            norms = summary.norm[:, row, :length]  # [layer, position]
            prompt_rows.first_norms.append(norms[:, 0])
            prompt_rows.median_norms.append(norms.median(dim=1).values)
            found = _massive_rows(summary, row, length, prompt_index, batch.tokens[row], config, shown)
            prompt_rows.massive += found
            if secondary:
                secondary.add(part_summary, batch_alpha, row, length, prompt_index, batch.tokens[row], shown,
                              first_mass=batch_stats["first"], key_count=batch_stats["count"])
            if categories:
                categories.add(prompt_index, ids, prompt_stats(batch_stats, row, length), found,
                               batch.tokens[row], shown)
            if prompt_index < n_kept:
                for layer, alpha_b in batch_alpha.items():
                    prompt_rows.token_alpha[prompt_index, layer, :, :length] = alpha_b[row, :, :length]
                prompt_rows.token_rows += [{"prompt": prompt_index, "position": pos, "token": text, "token_raw": raw}
                                           for pos, (text, raw) in enumerate(zip(shown, batch.tokens[row][:length],
                                                                                 strict=True))]
        batch_alpha.clear()
        for kept in batch_stats.values():
            kept.clear()

    bar = tqdm(total=len(prompts), unit="prompt", desc=f"sinks {loaded.title}", disable=not progress)
    with torch.no_grad(), ExitStack() as stack:
        stack.enter_context(AttentionProbe(loaded, on_stats, backend=config.backend))
        resid = stack.enter_context(ResidualProbe(loaded))
        parts = stack.enter_context(LayerPartsProbe(loaded, config.secondary.bos_candidates)) if secondary else None
        run_pass(Pass("sinks", len(units), step, accumulators),
                 on_unit=lambda unit: bar.update(len(units[unit].indices)))
    bar.close()
    importance, rows, prompt_rows = accumulators["importance"], accumulators["rows"], accumulators["prompts"]
    secondary, categories = accumulators.get("secondary"), accumulators.get("categories")
    first_norms, median_norms, massive, n_tokens = (prompt_rows.first_norms, prompt_rows.median_norms,
                                                     prompt_rows.massive, prompt_rows.n_tokens)
    token_alpha, token_rows, pattern_ids = prompt_rows.token_alpha, prompt_rows.token_rows, prompt_rows.pattern_ids

    alpha = importance.alpha()  # [layer, head, key]
    sink_rate = importance.sink_rate()
    entropy, first_mass = rows.entropy(), rows.first_mass()
    first_norm = torch.stack(first_norms).mean(0)
    median_norm = torch.stack(median_norms).mean(0)
    tables = _tables(alpha, sink_rate, entropy, first_mass, first_norm, median_norm, massive, config)
    tables["tokens"] = pd.DataFrame(token_rows, columns=["prompt", "position", "token", "token_raw"])
    figures = _figures(model_title(loaded.name), alpha, sink_rate, first_norm, median_norm, config)
    tensors = _head_patterns(loaded, pattern_ids, tables["sink_heads"], config)
    extra_config = {}
    if categories:
        tables.update(categories.tables())
    if secondary:
        tables.update(secondary.tables())
        figures.update(secondary.figures(model_title(loaded.name)))
        extra_config = {"lifetime_bounds_used": list(secondary.bounds), "lifetime_bounds_rule": secondary.bounds_rule}
        if config.secondary.levels:
            level_tables, level_tensors, level_figures = _levels(model_title(loaded.name), tables["secondary_sinks"],
                                                                 arch.n_layers, config.secondary)
            tables.update(level_tables)
            tensors.update(level_tensors)
            figures.update(level_figures)
    summary = _summary(loaded, prompts, n_tokens, alpha, sink_rate, tables, config)
    if secondary:
        summary.update(to_json_safe(secondary.summary()))
        if config.secondary.levels:
            summary["n_sink_levels"] = int(len(tables["sink_levels"]))
    if categories:
        summary.update(to_json_safe(categories.summary(tables)))
    return Result(
        analysis="sinks",
        model=loaded.name,
        revision=loaded.revision,
        config={**asdict(config), **extra_config, "bos": arch.bos, "n_prompts": len(prompts),
                "source": loaded.source},
        tables=tables,
        tensors={"alpha": alpha, "sink_rate": sink_rate, "entropy": entropy, "first_mass": first_mass,
                 "sink_heads": (alpha[:, :, 0] > config.eps).to(torch.uint8),
                 "first_token_norm": first_norm, "median_token_norm": median_norm,
                 "token_alpha": token_alpha, **tensors},
        figures=figures,
        summary=summary,
        report=_report(summary, tables),
        input_hash=hash_inputs(prompts),
    )


class PromptRows(Mergeable):
    """What sinks keeps per prompt: residual norms of the first and the median token ``[layer]``, massive-activation
    rows, the token view of the first ``n_kept`` prompts (``token_alpha [prompt, layer, head, key]``, NaN where
    unseen, and their tokens) and the ids of the prompts the pattern pass reads."""

    merging = {"first_norms": "rows", "median_norms": "rows", "massive": "rows", "token_rows": "rows",
               "pattern_ids": "rows", "n_tokens": "sum", "token_alpha": "fill"}

    def __init__(self, n_kept: int, n_layers: int, n_heads: int, max_tokens: int):
        self.first_norms: list[torch.Tensor] = []
        self.median_norms: list[torch.Tensor] = []
        self.massive: list[dict] = []
        self.token_rows: list[dict] = []
        self.pattern_ids: list[list[int]] = []
        self.n_tokens = 0
        self.token_alpha = torch.full((n_kept, n_layers, n_heads, max_tokens), float("nan"))


def _head_patterns(loaded: LoadedModel, prompt_ids: list[list[int]], heads: pd.DataFrame,
                   config: SinksConfig) -> dict[str, torch.Tensor]:
    """Full patterns of the ``pattern_heads`` heads with the largest alpha_first on the first prompts.

    ``head_patterns [prompt, head, query, key]`` (NaN past a prompt's length, T <= ``pattern_tokens``) and
    ``head_pattern_heads [head, 2]`` (layer, head). One eager forward per prompt through ``headlab.trace``
    (``hook_pattern`` of the chosen layers only), after the statistics pass: the main pass never
    materialises T x T."""
    n_heads = min(max(0, config.pattern_heads), len(heads))
    if not prompt_ids or n_heads == 0 or config.pattern_tokens <= 0:
        return {}
    chosen = heads.head(n_heads)[["layer", "head"]].to_numpy().astype(np.int64)  # sink_heads: by alpha_first
    width = min(config.pattern_tokens, max(len(ids) for ids in prompt_ids))
    patterns = torch.full((len(prompt_ids), n_heads, width, width), float("nan"))
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in sorted(set(chosen[:, 0].tolist()))]
    for index, ids in enumerate(prompt_ids):
        ids = ids[:width]
        input_ids = torch.tensor([ids], device=loaded.device)
        with torch.no_grad(), trace(loaded, names, stats=False, backend=config.backend,
                                    max_pattern_tokens=width) as t:
            loaded.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
        for n, (layer, head) in enumerate(chosen.tolist()):
            patterns[index, n, : len(ids), : len(ids)] = t[f"blocks.{layer}.attn.hook_pattern"][0, head].float().cpu()
    return {"head_patterns": patterns, "head_pattern_heads": torch.from_numpy(chosen)}


def _levels(model: str, sinks: pd.DataFrame, n_layers: int, config: SecondarySinksConfig):
    """Histogram over every detected sink token; levels clustered over the labels in ``config.level_labels``."""
    counts = histogram(sinks["creation_layer"].to_numpy(), sinks["lifetime"].to_numpy(), n_layers)
    chosen = sinks[sinks["label"].isin(config.level_labels)]
    levels = count_levels(chosen["creation_layer"].to_numpy(), chosen["lifetime"].to_numpy(), config.level_eps,
                          config.level_min_fraction, config.level_min_tokens)
    hist_rows = [{"creation_layer": int(c), "lifetime": int(lt), "n_tokens": int(counts[c, lt])}
                 for c, lt in zip(*counts.nonzero(), strict=True)]
    tables = {"sink_levels": levels.table,
              "sink_level_histogram": pd.DataFrame(hist_rows, columns=["creation_layer", "lifetime", "n_tokens"])}
    figures = {"sink_levels": levels_figure(model, counts, levels)}
    return tables, {"sink_level_histogram": torch.from_numpy(counts)}, figures


def _massive_rows(summary, row, length, prompt_index, tokens, config, shown=None) -> list[dict]:
    """Massive activations of one prompt: the top |x| of each (layer, token) against both medians;
    ``config.massive_median`` picks the one the criterion uses. ``tokens`` raw, ``shown`` readable."""
    shown = tokens if shown is None else shown
    value = summary.top_value[:, row, :length]  # [layer, position]
    to_layer = value.abs() / summary.layer_median_abs[:, row, None].clamp(min=1e-12)
    to_token = value.abs() / summary.median_abs[:, row, :length].clamp(min=1e-12)
    ratio = to_layer if config.massive_median == "layer" else to_token
    hits = (value.abs() > config.massive_abs) & (ratio >= config.massive_ratio)
    return [
        {"prompt": prompt_index, "layer": int(layer), "position": int(pos), "token": shown[pos],
         "token_raw": tokens[pos],
         "dim": int(summary.top_dim[layer, row, pos]), "value": float(value[layer, pos]),
         "ratio_to_layer_median": float(to_layer[layer, pos]), "ratio_to_token_median": float(to_token[layer, pos])}
        for layer, pos in hits.nonzero().tolist()
    ]


def _tables(alpha, sink_rate, entropy, first_mass, first_norm, median_norm, massive, config):
    n_layers, n_heads, n_keys = alpha.shape
    layer, head = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
    heads = pd.DataFrame({
        "layer": layer.ravel(), "head": head.ravel(),
        "alpha_first": alpha[:, :, 0].numpy().ravel(),
        "first_mass": first_mass.numpy().ravel(),
        "entropy": entropy.numpy().ravel(),
    })
    heads["is_sink"] = heads["alpha_first"] > config.eps
    heads = heads.sort_values("alpha_first", ascending=False, ignore_index=True)
    layer, head, key = np.meshgrid(np.arange(n_layers), np.arange(n_heads), np.arange(n_keys), indexing="ij")
    importance = pd.DataFrame({"layer": layer.ravel(), "head": head.ravel(), "key": key.ravel(),
                               "alpha": alpha.numpy().ravel()})
    rates = pd.DataFrame({"key": np.arange(n_keys), "sink_rate_pct": sink_rate.numpy()})
    norms = pd.DataFrame({"layer": np.arange(n_layers), "first_token_norm": first_norm.numpy(),
                          "median_token_norm": median_norm.numpy()})
    columns = ["prompt", "layer", "position", "token", "token_raw", "dim", "value", "ratio_to_layer_median",
               "ratio_to_token_median"]
    massive_table = pd.DataFrame(massive, columns=columns)
    dims = (massive_table.groupby("dim")
            .agg(count=("value", "size"), first_layer=("layer", "min"),
                 max_abs_value=("value", lambda v: float(v.abs().max())),
                 positions=("position", lambda p: ",".join(map(str, sorted(set(p))[:10]))))
            .reset_index().sort_values("count", ascending=False, ignore_index=True))
    return {"sink_heads": heads, "key_importance": importance, "sink_rate": rates,
            "residual_norms": norms, "massive_activations": massive_table, "massive_dims": dims}


def _summary(loaded, prompts, n_tokens, alpha, sink_rate, tables, config) -> dict:
    heads = tables["sink_heads"]
    dims = tables["massive_dims"]
    return to_json_safe({
        "model": loaded.name,
        "n_prompts": len(prompts),
        "n_tokens": n_tokens,
        "n_layers": loaded.arch.n_layers,
        "n_heads": loaded.arch.n_heads,
        "eps": config.eps,
        "sink_1_pct": float(sink_rate[0]),
        "n_sink_heads": int(heads["is_sink"].sum()),
        "first_token_alpha_by_layer": alpha[:, :, 0].mean(1).tolist(),
        "top_sink_heads": heads.head(config.top_heads)[["layer", "head", "alpha_first"]].to_dict("records"),
        "massive_dims": dims["dim"].tolist(),
        "massive_criterion": f"|x| > {config.massive_abs:g} and >= {config.massive_ratio:g}x the median |x| of the "
                             + ("layer's whole hidden state (Sun et al.)" if config.massive_median == "layer"
                                else "token's own vector"),
        "first_massive_layer": int(tables["massive_activations"]["layer"].min()) if len(dims) else None,
    })


def _figures(model, alpha, sink_rate, first_norm, median_norm, config) -> dict[str, go.Figure]:
    n_layers, n_heads, n_keys = alpha.shape
    heatmap = go.Figure(go.Heatmap(
        z=alpha[:, :, 0].numpy(), x=list(range(n_heads)), y=list(range(n_layers)), colorscale="Viridis",
        zmin=0, zmax=1, colorbar={"title": "alpha"},
        hovertemplate="layer %{y}, head %{x}<br>alpha = %{z:.4f}<extra></extra>"))
    heatmap.update_layout(title=f"{model}: attention received by the first token (alpha, Gu et al.)",
                          xaxis_title="head", yaxis_title="layer")
    norms = go.Figure([
        go.Scatter(x=list(range(n_layers)), y=first_norm.numpy(), mode="lines+markers", name="first token"),
        go.Scatter(x=list(range(n_layers)), y=median_norm.numpy(), mode="lines+markers", name="median token"),
    ])
    norms.update_layout(title=f"{model}: residual-stream norm per layer", xaxis_title="layer",
                        yaxis_title="||h_l||")
    rate = go.Figure(go.Bar(x=list(range(n_keys)), y=sink_rate.numpy()))
    rate.update_layout(title=f"{model}: Sink_k (eps = {config.eps}), % of (sample, layer, head)",
                       xaxis_title="key position k", yaxis_title="Sink_k %")
    return {"alpha_first_token": heatmap, "residual_norms": norms, "sink_rate": rate}


def _report(summary: dict, tables: dict[str, pd.DataFrame]) -> str:
    secondary_lines, secondary_sections = _secondary_report(summary, tables)
    category_lines, category_sections = _categories_report(summary, tables)
    lines = [
        f"# Attention sinks: {model_title(summary['model'])}",
        "",
        f"- prompts: {summary['n_prompts']}, tokens: {summary['n_tokens']}",
        f"- Sink_1 (eps = {summary['eps']}): {summary['sink_1_pct']:.1f}% of (sample, layer, head)",
        f"- sink heads (alpha_first > eps): {summary['n_sink_heads']} of "
        f"{summary['n_layers'] * summary['n_heads']}",
        f"- massive activation dims: {summary['massive_dims'] or 'none'} ({summary['massive_criterion']})",
        *category_lines,
        *secondary_lines,
        *category_sections,
        *secondary_sections,
        "",
        "## Top heads by attention received by the first token",
        "",
        "```",
        tables["sink_heads"].head(10).to_string(index=False),
        "```",
    ]
    return "\n".join(lines) + "\n"


def _secondary_report(summary: dict, tables: dict[str, pd.DataFrame]) -> tuple[list[str], list[str]]:
    """(bullet lines, sections) of the secondary-sink scan."""
    if "n_sink_tokens" not in summary:
        return [], []
    lines = [
        f"- secondary-sink scan (Wong et al.): {summary['n_sink_tokens']} sink token occurrences: "
        f"{summary['n_secondary']} secondary, {summary['n_primary_like']} primary-like, {summary['n_noise']} noise"
        + (f", {summary['n_low_attention']} low attention" if summary.get("n_low_attention") else "")
        + f" (lifetime bounds {summary['lifetime_bounds']}, {summary['lifetime_bounds_rule']}; labels: criterion "
        f"{summary.get('secondary_criterion', 'official')})",
    ]
    if "n_official_secondary" in summary:
        lines.append(f"- {summary['secondary_counts_note']}; the cos test flags "
                     f"{summary['official_flag_share']:.1%} of the {summary['n_scanned_tokens']} scanned tokens")
    if summary.get("secondary_saturation_note"):
        lines.append(f"- **{summary['secondary_saturation_note']}**")
    if "n_sink_levels" in summary:
        lines.append(f"- sink levels (DBSCAN on creation layer x lifetime): {summary['n_sink_levels']}")
    sinks, sections = tables["secondary_sinks"], []
    if len(sinks):
        top = sinks.sort_values("sink_score", ascending=False).head(10)
        columns = ["prompt", "position", "token", "creation_layer", "lifetime", "official_label", "attention_pass",
                   "label", "sink_score", "score_to_bos", "n_queries", "mlp_out_norm", "cos_mlp_out"]
        sections = ["", "## Secondary sinks with the highest sink score", "", "```",
                    top[[c for c in columns if c in top.columns]].to_string(index=False), "```"]
    if "secondary_flag_share" in tables and len(tables["secondary_flag_share"]):
        sections += ["", "## Share of scanned tokens the cos test flags, per layer", "", "```",
                     tables["secondary_flag_share"].to_string(index=False), "```"]
    return lines, sections


def _categories_report(summary: dict, tables: dict[str, pd.DataFrame]) -> tuple[list[str], list[str]]:
    """(bullet lines, sections) of the sink categories."""
    if "sink_categories" not in tables:
        return [], []
    lines = [f"- sink categories: {summary['sink_category_sentence']}"]
    sections = ["", "## Sink categories", "", "```", tables["sink_categories"].to_string(index=False), "```"]
    non_initial = tables["non_initial_sinks"]
    if len(non_initial):
        sections += ["", "## Non-initial sinks with the largest alpha", "", "```",
                     non_initial.sort_values("max_alpha", ascending=False).head(10).to_string(index=False), "```"]
    return lines, sections
