"""Position bias as a graph (Wu et al., ICML 2025): methods.md §6. Theory only, no model.

An attention mask is a directed graph with an edge j -> i when query i may attend to key j. Stacking
layers multiplies the row-stochastic attention matrices, so the cumulative attention after depth t is
P^(t) = A^(t) … A^(0) (attention rollout without residuals); the residual-aware variant replaces each
A by ½A + ½I. Under a causal mask every row of P^(t) drains into the first token as t grows, whatever
the content; a sliding window slows that down, the more the smaller the window. The number of
length-t walks j -> i in a causal graph with self-loops, C(i - j + t - 1, t - 1), is the
combinatorial reason primacy grows with depth.

Everything here is a small dense ``[query, key]`` matrix: theory graphs are for tens to hundreds of
tokens, not for model-sized contexts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from headlab.errors import InputError
from headlab.result import Result, to_json_safe

MASKS = ("causal", "window", "prefix", "decay", "bidirectional")
ENCODINGS = ("none", "rope", "alibi")
MAX_THEORY_TOKENS = 2048  # dense T x T in float64: 32 MiB per matrix at this size


@dataclass
class GraphSpec:
    """A mask and a positional scheme for synthetic, content-free attention over ``n_tokens`` positions.

    - ``mask``: ``causal`` (j <= i), ``window`` (i - w < j <= i, transformers' sliding-window rule),
      ``prefix`` (bidirectional among the first ``prefix`` tokens, causal after), ``decay`` (causal,
      A_ij ∝ gamma^(i - j) exp(score)), ``bidirectional`` (every j).
    - ``encoding``: ``none`` (uniform over the mask), ``rope`` (the same content vector at every
      position, rotated by RoPE with base ``rope_base`` and ``head_dim``; |q| = |k| = ``qk_norm``,
      default sqrt(head_dim), i.e. unit entries), ``alibi`` (score -``alibi_slope`` · |i - j|).
    """

    mask: str = "causal"
    n_tokens: int = 32
    window: int = 8
    prefix: int = 4
    gamma: float = 0.9
    encoding: str = "none"
    rope_base: float = 10000.0
    head_dim: int = 64
    qk_norm: float | None = None
    alibi_slope: float = 0.1

    def check(self) -> None:
        if self.mask not in MASKS:
            raise InputError(f"unknown mask {self.mask!r}: use one of {', '.join(MASKS)}")
        if self.encoding not in ENCODINGS:
            raise InputError(f"unknown positional encoding {self.encoding!r}: use one of {', '.join(ENCODINGS)}")
        if not 1 <= self.n_tokens <= MAX_THEORY_TOKENS:
            raise InputError(f"theory graphs need 1 to {MAX_THEORY_TOKENS} tokens, got {self.n_tokens}")
        if self.mask == "window" and self.window < 1:
            raise InputError(f"a sliding window needs window >= 1, got {self.window}")
        if self.mask == "prefix" and self.prefix < 1:
            raise InputError(f"a prefix mask needs prefix >= 1, got {self.prefix}")
        if self.mask == "decay" and not 0 < self.gamma <= 1:
            raise InputError(f"the decay mask needs 0 < gamma <= 1, got {self.gamma}")
        if self.encoding == "rope" and (self.head_dim < 2 or self.head_dim % 2):
            raise InputError(f"RoPE needs an even head_dim >= 2, got {self.head_dim}")

    def label(self) -> str:
        mask = {"window": f"window w={self.window}", "prefix": f"prefix K={self.prefix}",
                "decay": f"decay gamma={self.gamma}"}.get(self.mask, self.mask)
        encoding = {"rope": f"RoPE base={self.rope_base:g} d={self.head_dim}",
                    "alibi": f"ALiBi slope={self.alibi_slope:g}"}.get(self.encoding, "no PE")
        return f"{mask}, {encoding}"


def mask_graph(spec: GraphSpec) -> torch.Tensor:
    """``[query, key]`` bool adjacency: True where query i may attend to key j (edge j -> i)."""
    spec.check()
    i = torch.arange(spec.n_tokens)[:, None]
    j = torch.arange(spec.n_tokens)[None, :]
    if spec.mask == "bidirectional":
        return torch.ones(spec.n_tokens, spec.n_tokens, dtype=torch.bool)
    causal = j <= i
    if spec.mask == "window":
        return causal & (j > i - spec.window)
    if spec.mask == "prefix":
        return causal | ((i < spec.prefix) & (j < spec.prefix))
    return causal  # causal and decay share the graph; decay only reweights its edges


def rope_scores(n_tokens: int, head_dim: int, base: float, qk_norm: float | None = None) -> torch.Tensor:
    """``[query, key]`` content-free RoPE logits q_i·k_j / sqrt(d) for one fixed content vector.

    With q = k = c before rotation and c's entries all equal (|c| = ``qk_norm``), the rotation by
    angles i·theta_m and j·theta_m leaves q_i·k_j = (2|c|²/d) Σ_m cos((i - j) theta_m),
    theta_m = base^(-2m/d), m = 0 … d/2 - 1: a function of the distance alone that peaks at 0.
    """
    norm = math.sqrt(head_dim) if qk_norm is None else qk_norm
    theta = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # [d/2]
    distance = (torch.arange(n_tokens)[:, None] - torch.arange(n_tokens)[None, :]).double()
    cosines = torch.cos(distance[..., None] * theta).sum(-1)
    return (2 * norm**2 / head_dim) * cosines / math.sqrt(head_dim)


def attention_scores(spec: GraphSpec) -> torch.Tensor:
    """``[query, key]`` float64 pre-softmax scores of the positional scheme (mask not applied)."""
    n = spec.n_tokens
    distance = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).double()
    if spec.encoding == "rope":
        scores = rope_scores(n, spec.head_dim, spec.rope_base, spec.qk_norm)
    elif spec.encoding == "alibi":
        scores = -spec.alibi_slope * distance.abs()
    else:
        scores = torch.zeros(n, n, dtype=torch.float64)
    if spec.mask == "decay":
        # gamma^(i-j) exp(s) = exp(s + (i-j) log gamma); only causal pairs survive the mask.
        scores = scores + distance.clamp(min=0) * math.log(spec.gamma)
    return scores


def synthetic_attention(spec: GraphSpec) -> torch.Tensor:
    """``[query, key]`` float64 row-stochastic attention: softmax of the scheme's scores over the mask."""
    allowed = mask_graph(spec)
    scores = attention_scores(spec).masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1)


def residual_aware(attention: torch.Tensor) -> torch.Tensor:
    """½A + ½I for ``[..., query, key]`` square attention: half the signal skips the layer."""
    eye = torch.eye(attention.shape[-1], dtype=attention.dtype, device=attention.device)
    return 0.5 * attention + 0.5 * eye


def cumulative_attention(layers: torch.Tensor, residual: bool = False) -> torch.Tensor:
    """P^(t) = A^(t) … A^(0) for every depth t.

    ``layers``: ``[depth, query, key]`` (layer 0 first) -> ``[depth, query, key]``, entry t = P^(t).
    """
    if layers.ndim != 3 or layers.shape[-1] != layers.shape[-2]:
        raise InputError(f"cumulative attention needs [depth, T, T] attention, got shape {tuple(layers.shape)}")
    steps = residual_aware(layers) if residual else layers
    out = torch.empty_like(steps)
    product = steps[0]
    out[0] = product
    for t in range(1, steps.shape[0]):
        product = steps[t] @ product
        out[t] = product
    return out


def repeated_attention(attention: torch.Tensor, depth: int, residual: bool = False) -> torch.Tensor:
    """P^(t) for the same ``[query, key]`` attention at every layer: ``[depth, query, key]``."""
    if depth < 1:
        raise InputError(f"depth must be at least 1, got {depth}")
    return cumulative_attention(attention.expand(depth, -1, -1), residual)


def first_position_mass(cumulative: torch.Tensor) -> torch.Tensor:
    """``[..., query, key]`` -> ``[..., query]``: P^(t)[i, 0], the mass each row puts on the first token."""
    return cumulative[..., 0]


def depth_to_reach(first_mass: torch.Tensor, threshold: float = 0.5) -> int | None:
    """Smallest depth t (0-based) at which every row holds >= ``threshold`` on the first token, else None.

    ``first_mass``: ``[depth, query]`` from ``first_position_mass``.
    """
    reached = (first_mass >= threshold).all(dim=-1).nonzero()
    return int(reached[0]) if len(reached) else None


def walk_count(distance: int, t: int) -> int:
    """Number of length-t walks j -> i (i - j = ``distance``) in a causal graph with self-loops.

    A walk is a non-decreasing sequence j = v_0 <= v_1 <= … <= v_t = i: ``distance`` unit steps
    spread over t moves, C(distance + t - 1, t - 1). Zero for j > i.
    """
    if t < 1:
        raise InputError(f"walks have length t >= 1, got {t}")
    return math.comb(distance + t - 1, t - 1) if distance >= 0 else 0


def walk_count_matrix(adjacency: torch.Tensor, t: int) -> np.ndarray:
    """``[query, key]`` exact (Python int) number of length-t walks key -> query along ``adjacency``.

    Walks follow edges j -> i where ``adjacency[i, j]``; this is the t-th power of the adjacency
    matrix, computed in arbitrary-precision integers because the counts overflow int64 quickly.
    """
    if t < 1:
        raise InputError(f"walks have length t >= 1, got {t}")
    edges = adjacency.numpy().astype(int).astype(object)
    counts = edges
    for _ in range(t - 1):
        counts = edges.dot(counts)
    return counts


# ----------------------------------------------------------------------------------------------- plots


def cumulative_heatmaps(cumulative: torch.Tensor, depths: list[int], title: str) -> go.Figure:
    """P^(t)[i, j] heatmaps (``[depth, query, key]``) for the chosen depths, one slider step per depth."""
    fig = go.Figure()
    for n, t in enumerate(depths):
        fig.add_trace(go.Heatmap(
            z=cumulative[t].float().numpy(), colorscale="Viridis", zmin=0, zmax=1, visible=n == 0,
            colorbar={"title": "P"}, name=f"t = {t}",
            hovertemplate=f"t = {t}<br>query %{{y}}, key %{{x}}<br>P = %{{z:.4f}}<extra></extra>"))
    steps = [{"method": "update", "label": str(t),
              "args": [{"visible": [m == n for m in range(len(depths))]}, {"title": f"{title}: P^({t})"}]}
             for n, t in enumerate(depths)]
    fig.update_layout(title=f"{title}: P^({depths[0]})", xaxis_title="key j", yaxis_title="query i",
                      yaxis_autorange="reversed",
                      sliders=[{"active": 0, "currentvalue": {"prefix": "depth t = "}, "steps": steps}])
    return fig


def first_mass_figure(curves: dict[str, torch.Tensor], title: str) -> go.Figure:
    """Mean over query rows of P^(t)[i, 0] against depth t; ``curves``: label -> ``[depth]``."""
    fig = go.Figure()
    for label, values in curves.items():
        fig.add_trace(go.Scatter(x=list(range(len(values))), y=values.float().numpy(), mode="lines+markers",
                                 name=label))
    fig.update_layout(title=title, xaxis_title="depth t (layers)", yaxis_title="mean_i P^(t)[i, 0]",
                      yaxis_range=[0, 1.02])
    return fig


def walk_count_figure(max_distance: int, depths: list[int]) -> go.Figure:
    """C(i - j + t - 1, t - 1) against i - j for several t (log y): primacy grows with depth."""
    fig = go.Figure()
    distances = list(range(max_distance + 1))
    for t in depths:
        fig.add_trace(go.Scatter(x=distances, y=[float(walk_count(d, t)) for d in distances], mode="lines",
                                 name=f"t = {t}"))
    fig.update_layout(title="Causal graph: number of length-t walks j -> i, C(i-j+t-1, t-1)",
                      xaxis_title="i - j", yaxis_title="walks", yaxis_type="log")
    return fig


def pick_depths(depth: int, n: int = 6) -> list[int]:
    """Up to ``n`` depths spread over 0 … depth - 1, always the first and the last."""
    return sorted({round(x) for x in np.linspace(0, depth - 1, min(n, depth))})


# ----------------------------------------------------------------------------------------------- result


@dataclass
class TheoryConfig:
    graph: GraphSpec
    depth: int = 16
    threshold: float = 0.5  # first-token mass that counts as "converged" in depth_to_reach


def theory_tables(spec: GraphSpec, depth: int, threshold: float) -> tuple[dict, dict, dict]:
    """P^(t) with and without residuals for one spec: (tensors, tables, summary)."""
    if depth < 1:
        raise InputError(f"depth must be at least 1, got {depth}")
    attention = synthetic_attention(spec)
    plain = repeated_attention(attention, depth)
    resid = repeated_attention(attention, depth, residual=True)
    first = {"rollout": first_position_mass(plain), "residual-aware": first_position_mass(resid)}
    rows = [{"variant": variant, "depth": t, "query": i, "first_mass": float(mass[t, i])}
            for variant, mass in first.items() for t in range(depth) for i in range(spec.n_tokens)]
    summary = {
        "graph": spec.label(),
        "depth": depth,
        "first_mass_final": float(first["rollout"][-1].mean()),
        "first_mass_final_residual": float(first["residual-aware"][-1].mean()),
        "depth_to_reach": depth_to_reach(first["rollout"], threshold),
        "depth_to_reach_residual": depth_to_reach(first["residual-aware"], threshold),
        "threshold": threshold,
    }
    tensors = {"attention": attention.float(), "cumulative": plain.float(), "cumulative_residual": resid.float()}
    return tensors, {"first_mass": pd.DataFrame(rows)}, summary


def analyze_position_graphs(config: TheoryConfig) -> Result:
    """The theoretical graph of one mask and positional scheme: P^(t), first-token mass, walk counts."""
    spec = config.graph
    tensors, tables, summary = theory_tables(spec, config.depth, config.threshold)
    label = spec.label()
    depths = pick_depths(config.depth)
    figures = {
        "cumulative": cumulative_heatmaps(tensors["cumulative"], depths, f"{label}, rollout"),
        "cumulative_residual": cumulative_heatmaps(tensors["cumulative_residual"], depths,
                                                   f"{label}, residual-aware"),
        "first_mass": first_mass_figure(
            {"rollout": tensors["cumulative"][..., 0].mean(-1),
             "residual-aware (½A + ½I)": tensors["cumulative_residual"][..., 0].mean(-1)},
            f"{label}: mass on the first token vs depth"),
        "walk_counts": walk_count_figure(spec.n_tokens - 1, [t for t in (1, 2, 4, 8, 16) if t <= config.depth]),
    }
    summary = to_json_safe(summary)
    report = "\n".join([
        f"# Position-bias graph (theory): {label}",
        "",
        f"- tokens: {spec.n_tokens}, depth: {config.depth}",
        f"- mean first-token mass at depth {config.depth}: rollout {summary['first_mass_final']:.4f}, "
        f"residual-aware {summary['first_mass_final_residual']:.4f}",
        f"- first depth with every row >= {config.threshold} on the first token: rollout "
        f"{summary['depth_to_reach']}, residual-aware {summary['depth_to_reach_residual']} (None = not reached)",
    ]) + "\n"
    return Result(analysis="position_graphs", model="theory", config={**asdict(config)}, tables=tables,
                  tensors=tensors, figures=figures, summary=summary, report=report)
