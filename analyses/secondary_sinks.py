"""Secondary attention sinks (Wong et al., 2025): detection, lifetime, labels, sink score and MLP formation.

methods.md §1, following the official code (src/hidden_state_base.py):
- h_l(t) is the output of decoder layer l (embeddings dropped).
- BOS position: 0; with a chat template the one of the first three positions with the highest mean
  norm across layers.
- Scan window from the BOS norm profile n(l) = ||h_l(BOS)||, d(l) = n(l+1) - n(l):
  l_start = argmax d + 1, l_end = (argmin over l >= l_start of d) + 1, layers [l_start, l_end).
- Token t > BOS is flagged at layer l of the window if |cos(h_l(t), h_l(BOS))| > 0.9; lifetime =
  number of flagged layers, creation layer = first flagged layer.
- Labels: secondary if lo < lifetime < hi, primary-like if lifetime >= hi, else noise; the paper's
  bounds are lo = 4, hi = L - 15. They only make sense for deep models (hi <= lo for L <= 19), so
  below ``paper_bounds_min_layers`` (24) headlab scales them with depth, as Qwen3-14B's 40 layers
  give them: lo = max(1, L // 10), hi = max(lo + 2, ceil(5 L / 8)).
- Sink score at layer l: mean over heads of the mean attention the sink receives from the queries
  that see it (i >= s: key_mass / key_count from the statistics path, the sink's own row included);
  the sink's score is the mean over its flagged layers.
- Formation: at the creation layer, cos with h_c(BOS) of the MLP input, attention output, MLP output
  and residual, and the MLP output's L2 norm.

headlab's extensions (docs/sinks.md), because the cos test alone can flag nearly every token (gemma3-270m:
every residual is within |cos| > 0.9 of BOS's in layers 7-15):
- Saturation: the share of scanned tokens (after BOS) flagged at each layer of the window and at any layer;
  above ``saturation_share`` the summary says the official criterion saturates.
- Attention criterion: a flagged token passes if at least ``attention_min_queries`` queries see it (a quarter
  of the prompt when that is fewer: ``min_queries``) and its sink score is at least ``attention_ratio`` x
  BOS's score from the same queries (i >= s, read from the per-row mass on the first key) over the same
  layers. ``official_label`` is the cos test's label, ``attention_pass`` the attention test, ``label`` the
  final one: with ``criterion="both"`` a secondary or primary-like token that fails the attention test is
  labelled ``low_attention``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from headlab.analyses.configs import SecondarySinksConfig
from headlab.probes import PARTS, LayerPartsSummary
from headlab.tally import Mergeable

OFFICIAL_LABELS = ("secondary", "primary_like", "noise")
LABELS = (*OFFICIAL_LABELS, "low_attention")  # low_attention: flagged by cos, too little attention (criterion both)


def lifetime_bounds(n_layers: int, config: SecondarySinksConfig) -> tuple[int, int, str]:
    """(lo, hi, rule): secondary if lo < lifetime < hi, primary-like if lifetime >= hi."""
    if config.lifetime_bounds is not None:
        return (*config.lifetime_bounds, "given")
    if n_layers >= config.paper_bounds_min_layers:
        return 4, n_layers - 15, "paper: 4 and L - 15"
    lo = max(1, n_layers // 10)
    return lo, max(lo + 2, math.ceil(5 * n_layers / 8)), "scaled: max(1, L // 10) and max(lo + 2, ceil(5L/8))"


def label_of(lifetime: int, bounds: tuple[int, int]) -> str:
    lo, hi = bounds
    if lifetime >= hi:
        return "primary_like"
    if lifetime > lo:
        return "secondary"
    return "noise"


def final_label(official: str, attention_pass: bool, criterion: str) -> str:
    """The label a run reports: the official one, unless ``criterion`` is both and a sink-like token
    (secondary or primary-like) fails the attention test. Noise stays noise: it claims no sink."""
    if criterion == "official" or official == "noise" or attention_pass:
        return official
    return "low_attention"


def min_queries(configured: int, length: int) -> int:
    """Queries that must see a token before its mean attention received counts: ``configured`` (16), or a
    quarter of the prompt when that is fewer. A late token's alpha averages few rows, its own among them (its
    self-attention alone at the last position), so it is no evidence of a sink; short prompts keep a quarter."""
    return max(1, min(configured, math.ceil(length / 4)))


def attention_test(score: float, bos_score: float, n_queries: int, needed: int, ratio: float) -> bool:
    """headlab's attention criterion: at least ``needed`` queries see the token, and it gets at least
    ``ratio`` x what BOS gets from them. Without attention statistics (NaN score) the test cannot run and
    passes, so the official label stands."""
    if math.isnan(score) or math.isnan(bos_score):
        return True
    return n_queries >= needed and score >= ratio * bos_score


def suffix_means(rows: torch.Tensor) -> torch.Tensor:
    """``[..., query]`` -> ``[..., query]``: entry s is the mean over rows i >= s (BOS's score from the
    queries that see a token at s, given ``rows`` = the mass each row puts on BOS)."""
    n = rows.shape[-1]
    total = rows.flip(-1).cumsum(-1).flip(-1)
    return total / torch.arange(n, 0, -1, dtype=total.dtype)


def choose_bos(norm: torch.Tensor, max_norm: bool, n_candidates: int = 3) -> int:
    """norm ``[layer, position]`` of one prompt -> BOS position (0, or the highest mean norm of the first few)."""
    if not max_norm:
        return 0
    means = norm[:, :n_candidates].mean(0)
    return int(torch.argmax(means))


def scan_window(bos_norm: np.ndarray) -> tuple[int, int]:
    """BOS norm per layer ``[layer]`` -> [start, end) of the layers scanned (first extremum wins ties)."""
    n_layers = len(bos_norm)
    if n_layers < 2:
        return 0, n_layers
    d = np.diff(bos_norm)
    start = int(np.argmax(d)) + 1
    if start >= n_layers - 1:
        return start, n_layers
    return start, start + int(np.argmin(d[start:])) + 1


@dataclass
class SinkToken:
    position: int
    creation: int
    lifetime: int
    layers: list[int]
    label: str


@dataclass
class PromptSinks:
    bos: int
    window: tuple[int, int]
    flags: torch.Tensor  # [layer, position] bool
    sinks: list[SinkToken]


def detect(cos: torch.Tensor, norm: torch.Tensor, length: int, bounds: tuple[int, int],
           config: SecondarySinksConfig, chat_template: bool = False, tokens: list[str] | None = None) -> PromptSinks:
    """One prompt: ``cos [layer, reference, position]`` of h_l with h_l(reference), ``norm [layer, position]``
    of h_l, over the first ``length`` (real) positions; ``tokens`` only for ``skip_bos_repeats``."""
    use_max = config.bos_position == "max_norm" or (config.bos_position == "auto" and chat_template)
    bos = choose_bos(norm[:, :length], use_max, min(config.bos_candidates, cos.shape[1], length))
    start, end = scan_window(norm[:, bos].double().numpy())
    n_layers = norm.shape[0]
    in_window = torch.zeros(n_layers, 1, dtype=torch.bool)
    in_window[start:end] = True
    after_bos = torch.arange(length) > bos
    if config.skip_bos_repeats and tokens is not None:
        after_bos &= torch.tensor([tok != tokens[bos] for tok in tokens[:length]])
    flags = (cos[:, bos, :length].abs() > config.cos_threshold) & in_window & after_bos
    sinks = []
    for pos in flags.any(0).nonzero()[:, 0].tolist():
        layers = flags[:, pos].nonzero()[:, 0].tolist()
        sinks.append(SinkToken(pos, layers[0], len(layers), layers, label_of(len(layers), bounds)))
    return PromptSinks(bos, (start, end), flags, sinks)


class SecondarySinkCollector(Mergeable):
    """Streams batches in, keeps one row per sink token occurrence; builds tables and figures at the end."""

    merging = {"sink_rows": "rows", "score_rows": "rows", "window_rows": "rows", "n_tokens": "sum",
               "layer_scanned": "sum", "layer_flagged": "sum"}

    def __init__(self, n_layers: int, config: SecondarySinksConfig, chat_template: bool = False):
        config.check()
        self.n_layers = n_layers
        self.config = config
        self.chat_template = chat_template
        lo, hi, rule = lifetime_bounds(n_layers, config)
        self.bounds = (lo, hi)
        self.bounds_rule = rule
        self.sink_rows: list[dict] = []
        self.score_rows: list[dict] = []
        self.window_rows: list[dict] = []
        self.n_tokens = 0
        # Saturation: per layer, tokens scanned (the layer in the prompt's window) and flagged there.
        self.layer_scanned = np.zeros(n_layers, dtype=np.int64)
        self.layer_flagged = np.zeros(n_layers, dtype=np.int64)

    def add(self, parts: LayerPartsSummary, alpha: dict[int, torch.Tensor], row: int, length: int,
            prompt: int, tokens: list[str], shown: list[str] | None = None,
            first_mass: dict[int, torch.Tensor] | None = None,
            key_count: dict[int, torch.Tensor] | None = None) -> PromptSinks:
        """One prompt of a batch. ``alpha``: per layer ``[batch, head, key]`` mean attention received;
        ``tokens``: the raw tokens (``token_raw``), ``shown``: readable ones (``token``; default the raw).
        ``first_mass``: per layer ``[batch, head, query]`` mass each row puts on the first key, for BOS's score
        from the same queries (without it, or with BOS elsewhere, BOS's alpha over all its queries);
        ``key_count``: per layer ``[batch, key]`` queries that see each key (without it: causal, length - s)."""
        shown = tokens if shown is None else shown
        resid = PARTS.index("resid")
        found = detect(parts.cos[resid, :, row], parts.norm[resid, :, row], length, self.bounds, self.config,
                       self.chat_template, tokens)
        n_scanned = max(0, length - found.bos - 1)
        self.n_tokens += n_scanned
        start, end = found.window
        self.layer_scanned[start:end] += n_scanned
        self.layer_flagged += found.flags.sum(1).numpy()
        self.window_rows.append({"prompt": prompt, "bos_position": found.bos, "scan_start": found.window[0],
                                 "scan_end": found.window[1], "n_sinks": len(found.sinks)})
        needed = min_queries(self.config.attention_min_queries, length)
        bos_from = None
        if first_mass and found.bos == 0:  # first_mass is the mass on position 0: BOS's only when BOS is there
            bos_from = {layer: suffix_means(m[row, :, :length].double()).mean(0) for layer, m in first_mass.items()}
        for sink in found.sinks:
            scores = [float(alpha[layer][row, :, sink.position].mean()) for layer in sink.layers] if alpha else []
            self.score_rows += [{"prompt": prompt, "position": sink.position, "layer": layer, "score": score}
                                for layer, score in zip(sink.layers, scores, strict=True)]
            c = sink.creation
            score = float(np.mean(scores)) if scores else float("nan")
            bos_alpha = float(np.mean([float(alpha[layer][row, :, found.bos].mean()) for layer in sink.layers])) \
                if alpha else float("nan")
            bos_score = float(np.mean([float(bos_from[layer][sink.position]) for layer in sink.layers])) \
                if bos_from else bos_alpha
            n_queries = min(int(key_count[layer][row, sink.position]) for layer in sink.layers) if key_count \
                else length - sink.position
            passed = attention_test(score, bos_score, n_queries, needed, self.config.attention_ratio)
            record = {
                "prompt": prompt, "position": sink.position, "token": shown[sink.position],
                "token_raw": tokens[sink.position],
                "creation_layer": c, "lifetime": sink.lifetime, "last_layer": sink.layers[-1],
                "label": final_label(sink.label, passed, self.config.criterion),
                "sink_score": score,
                "sink_score_max": float(np.max(scores)) if scores else float("nan"),
                "bos_alpha": bos_alpha,
                "official_label": sink.label, "attention_pass": passed, "bos_score_same_queries": bos_score,
                "score_to_bos": _ratio(score, bos_score), "n_queries": n_queries,
            }
            for i, part in enumerate(PARTS):
                record[f"cos_{part}"] = float(parts.cos[i, c, row, found.bos, sink.position])
            record["mlp_out_norm"] = float(parts.norm[PARTS.index("mlp_out"), c, row, sink.position])
            record["resid_norm"] = float(parts.norm[resid, c, row, sink.position])
            self.sink_rows.append(record)
        return found

    def sinks_table(self) -> pd.DataFrame:
        # The columns recorded before the attention criterion come first, in their order (tests/golden).
        columns = ["prompt", "position", "token", "token_raw", "creation_layer", "lifetime", "last_layer", "label",
                   "sink_score", "sink_score_max", "bos_alpha", *[f"cos_{p}" for p in PARTS], "mlp_out_norm",
                   "resid_norm", "official_label", "attention_pass", "bos_score_same_queries", "score_to_bos",
                   "n_queries"]
        return pd.DataFrame(self.sink_rows, columns=columns)

    def flag_share_table(self) -> pd.DataFrame:
        """Per layer scanned in some prompt: tokens scanned, flagged by the cos test, and the share."""
        layers = np.flatnonzero(self.layer_scanned)
        return pd.DataFrame({"layer": layers, "n_tokens": self.layer_scanned[layers],
                             "n_flagged": self.layer_flagged[layers],
                             "share": self.layer_flagged[layers] / self.layer_scanned[layers]})

    def tables(self) -> dict[str, pd.DataFrame]:
        sinks = self.sinks_table()
        tables = {
            "secondary_sinks": sinks,
            "secondary_sink_scores": pd.DataFrame(self.score_rows, columns=["prompt", "position", "layer", "score"]),
            "secondary_sink_windows": pd.DataFrame(
                self.window_rows, columns=["prompt", "bos_position", "scan_start", "scan_end", "n_sinks"]),
            "secondary_flag_share": self.flag_share_table(),
        }
        if self.config.formation:
            tables["sink_formation"] = formation_table(sinks)
        return tables

    def summary(self) -> dict:
        sinks = self.sinks_table()
        counts = sinks["label"].value_counts()
        official = sinks["official_label"].value_counts()
        passed = sinks[sinks["attention_pass"].astype(bool)]
        shares = self.flag_share_table()
        share = len(sinks) / self.n_tokens if self.n_tokens else 0.0
        summary = {
            "lifetime_bounds": list(self.bounds),
            "lifetime_bounds_rule": self.bounds_rule,
            "n_sink_tokens": int(len(sinks)),
            "n_scanned_tokens": self.n_tokens,
            **{f"n_{label}": int(counts.get(label, 0)) for label in LABELS},
            "secondary_criterion": self.config.criterion,
            **{f"n_official_{label}": int(official.get(label, 0)) for label in OFFICIAL_LABELS},
            "n_attention_pass": int(len(passed)),
            "n_both_secondary": int((passed["official_label"] == "secondary").sum()),
            "attention_ratio": self.config.attention_ratio,
            "attention_min_queries": self.config.attention_min_queries,
            "mean_sink_score_official_secondary": _mean(sinks.loc[sinks["official_label"] == "secondary",
                                                                  "sink_score"]),
            "mean_sink_score_secondary": _mean(sinks.loc[sinks["label"] == "secondary", "sink_score"]),
            "mean_bos_score": _mean(sinks["bos_score_same_queries"]),
            "official_flag_share": share,
            "official_flag_share_by_layer": dict(zip(shares["layer"].tolist(), shares["share"].tolist(), strict=True)),
            "saturation_share": self.config.saturation_share,
            "official_saturated": bool(share > self.config.saturation_share),
        }
        summary["secondary_counts_note"] = counts_sentence(summary)
        summary["secondary_saturation_note"] = saturation_sentence(summary)
        return summary

    def figures(self, model: str) -> dict[str, go.Figure]:
        return {"sink_formation": formation_figure(model, self.sinks_table())} if self.config.formation else {}


def _ratio(score: float, bos_score: float) -> float:
    if math.isnan(score) or math.isnan(bos_score):
        return float("nan")
    return score / bos_score if bos_score > 0 else float("inf")


def _mean(values: pd.Series) -> float | None:
    values = values.dropna()
    return float(values.mean()) if len(values) else None


def saturation_sentence(summary: dict) -> str | None:
    """The warning the summary, report, CLI and dashboard give when the cos test flags most tokens; None otherwise."""
    if not summary.get("official_saturated"):
        return None
    by_layer = summary.get("official_flag_share_by_layer") or {}
    peak = max(by_layer.items(), key=lambda kv: kv[1]) if by_layer else None
    at_peak = f", {peak[1]:.0%} at layer {peak[0]}" if peak else ""
    flagged = f"{summary['official_flag_share']:.0%} of the {summary['n_scanned_tokens']} scanned tokens"
    kept = f"{summary['n_both_secondary']} of its {summary['n_official_secondary']} secondary sinks"
    return (f"The official secondary-sink criterion saturates: |cos| with BOS flags {flagged} (more than "
            f"{summary['saturation_share']:.0%}{at_peak}), so it does not single out sinks here; {kept} also "
            f"pass the attention test (>= {summary['attention_ratio']:g}x BOS's attention), which "
            f"--secondary-criterion both requires.")


def counts_sentence(summary: dict) -> str:
    """Counts under each criterion, one line (CLI and report)."""
    return (f"official (cos) criterion: {summary['n_official_secondary']} secondary, "
            f"{summary['n_official_primary_like']} primary-like, {summary['n_official_noise']} noise; attention "
            f"criterion (>= {summary['attention_ratio']:g}x BOS, >= {summary['attention_min_queries']} queries or a "
            f"quarter of a shorter prompt): {summary['n_attention_pass']} pass; both: "
            f"{summary['n_both_secondary']} secondary")


def formation_table(sinks: pd.DataFrame) -> pd.DataFrame:
    """Per label: how the MLP output norm, the sink score and the lifetime move together.

    Spearman correlations over sink occurrences (NaN with fewer than three), plus the per-label means of
    the cos-to-BOS of each part at the creation layer.
    """
    rows = []
    for label, group in [("all", sinks), *sinks.groupby("label")]:
        row = {"label": label, "n": len(group)}
        for part in PARTS:
            row[f"mean_cos_{part}"] = float(group[f"cos_{part}"].mean()) if len(group) else float("nan")
        row["mean_mlp_out_norm"] = float(group["mlp_out_norm"].mean()) if len(group) else float("nan")
        pairs = [("mlp_out_norm", "sink_score"), ("mlp_out_norm", "lifetime"), ("sink_score", "lifetime")]
        for a, b in pairs:
            ok = len(group) >= 3 and group[a].nunique() > 1 and group[b].nunique() > 1
            row[f"spearman_{a}_{b}"] = float(group[a].corr(group[b], method="spearman")) if ok else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def formation_figure(model: str, sinks: pd.DataFrame) -> go.Figure:
    title = f"{model}: secondary sinks, MLP output norm at creation vs sink score"
    if sinks.empty:
        from headlab.figures import empty_figure

        return empty_figure(title, "nothing found: no secondary sink token in these prompts")
    fig = go.Figure(go.Scatter(
        x=sinks["mlp_out_norm"], y=sinks["sink_score"], mode="markers",
        marker={"color": sinks["lifetime"], "colorscale": "Viridis", "showscale": True,
                "colorbar": {"title": "lifetime"}},
        text=[f"prompt {p}, pos {q}, {t!r}, created at {c}, {lab}" for p, q, t, c, lab in zip(
            sinks["prompt"], sinks["position"], sinks["token"], sinks["creation_layer"], sinks["label"],
            strict=True)],
        hovertemplate="%{text}<br>||mlp_out|| = %{x:.3g}<br>score = %{y:.3g}<extra></extra>"))
    fig.update_layout(title=title,
                      xaxis_title="||MLP output|| at the creation layer", yaxis_title="sink score (mean attention)")
    return fig
