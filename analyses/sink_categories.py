"""Sink categories (headlab, docs/sinks.md): which tokens hold the attention sink mass, per run and per head.

Per prompt, from the per-key mass and query counts of the statistics pass (no T x T matrix):
- ``bos``: position 0 when it holds the model's BOS token (``arch.bos_token_id``; [CLS] for encoders);
- ``first_text_token``: position 0 when it holds a text token (no BOS, as SmolLM2 or ``--bos none``);
- ``non_initial``: a position k > 0 with alpha[l, h, k] > eps (the run's eps) in at least one head of at least
  one layer where at least ``category_min_queries`` queries see it (a quarter of the prompt when that is
  fewer: ``secondary_sinks.min_queries``; the last keys' alpha is mostly their own rows' self-attention);
Massive-activation carriers away from position 0 (KVSink's non-initial sinks) are tallied per massive dim
(``massive_carriers``), whether or not they receive attention: a dim that sits on most tokens in a few early
layers (gemma3-270m's 400) carries no sink, one that moves to delimiters with the sink (its 163 without BOS)
does, and the per-dim attention share says which.
A category's attention share in head (l, h) is the attention its positions receive, summed over the counted
queries of every prompt, divided by the number of those queries: the mean mass a query puts on it. A head's
dominant category is the one of the first three with the largest share; a category's massive dims are the
dims of the massive-activation table at its positions.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from headlab.tally import Mergeable

from .secondary_sinks import min_queries

CATEGORIES = ("bos", "first_text_token", "non_initial")
NAMES = {"bos": "BOS", "first_text_token": "first text token", "non_initial": "non-initial sinks"}


def prompt_stats(batch_stats: dict[str, dict[int, torch.Tensor]], row: int, length: int) -> dict[str, torch.Tensor]:
    """One prompt's statistics over layers: ``mass [layer, head, key]``, ``count [layer, key]``, ``rows [layer]``."""
    layers = sorted(batch_stats["mass"])
    return {"mass": torch.stack([batch_stats["mass"][la][row, :, :length] for la in layers]).double(),
            "count": torch.stack([batch_stats["count"][la][row, :length] for la in layers]).double(),
            "rows": torch.stack([batch_stats["rows"][la][row] for la in layers]).double()}


def non_initial_sinks(alpha: torch.Tensor, count: torch.Tensor, eps: float, needed: int) -> torch.Tensor:
    """``alpha [layer, head, key]``, ``count [layer, key]`` of one prompt -> ``[layer, key]`` bool: key k > 0 is a
    non-initial sink at layer l if alpha > eps in some head while at least ``needed`` queries see it."""
    hits = (alpha > eps).any(1) & (count >= needed)
    hits[:, 0] = False
    return hits


class _Tally(Mergeable):
    """Attention mass ``[layer, head]`` received by a set of positions, summed over prompts, and what they are."""

    merging = {"mass": "sum", "n_prompts": "sum", "n_tokens": "sum", "n_sink_tokens": "sum", "dims": "counter",
               "tokens": "counter", "layers": "set"}

    def __init__(self, n_layers: int, n_heads: int):
        self.mass = torch.zeros(n_layers, n_heads, dtype=torch.float64)
        self.n_prompts = self.n_tokens = self.n_sink_tokens = 0
        self.dims: dict[int, int] = {}
        self.tokens: dict[str, int] = {}
        self.layers: set[int] = set()

    def add(self, mass: torch.Tensor, where: list[int], n_sinks: int, shown: list[str], hits: list[dict]) -> None:
        self.mass += mass[:, :, where].sum(-1)
        self.n_prompts += 1
        self.n_tokens += len(where)
        self.n_sink_tokens += n_sinks
        for pos in where:
            self.tokens[shown[pos]] = self.tokens.get(shown[pos], 0) + 1
        for hit in hits:
            self.dims[hit["dim"]] = self.dims.get(hit["dim"], 0) + 1
            self.layers.add(hit["layer"])

    def row(self, rows: torch.Tensor) -> dict:
        share = self.mass / rows.clamp(min=1)[:, None]  # mean mass a counted query puts on the positions
        dims = sorted(self.dims.items(), key=lambda kv: -kv[1])
        top = sorted(self.tokens.items(), key=lambda kv: -kv[1])[:8]
        return {"n_prompts": self.n_prompts, "n_tokens": self.n_tokens, "n_sink_tokens": self.n_sink_tokens,
                "attention_share": float(share.mean()), "attention_share_max_head": float(share.max()),
                "massive_dims": ",".join(str(d) for d, _ in dims), "massive_hits": int(sum(n for _, n in dims)),
                "top_tokens": ", ".join(f"{t!r}:{n}" for t, n in top)}


class SinkCategories(Mergeable):
    """Streams prompts in: attention mass per category and per massive dim carried at positions > 0, and the
    non-initial sink tokens; tables and summary at the end. Definitions: the module docstring."""

    merging = {"rows": "sum", "categories": "children", "carriers": "children", "sink_rows": "rows"}

    def child(self, name: str) -> _Tally:
        return _Tally(*self.shape)

    def __init__(self, n_layers: int, n_heads: int, eps: float, min_queries: int, bos_id: int | None):
        self.shape = (n_layers, n_heads)
        self.eps, self.min_queries, self.bos_id = eps, min_queries, bos_id
        self.rows = torch.zeros(n_layers, dtype=torch.float64)
        self.categories = {c: _Tally(*self.shape) for c in CATEGORIES}
        self.carriers: dict[int, _Tally] = {}
        self.sink_rows: list[dict] = []

    def first_category(self, first_id: int) -> str:
        return "bos" if self.bos_id is not None and first_id == self.bos_id else "first_text_token"

    def add(self, prompt: int, ids: list[int], stats: dict[str, torch.Tensor], massive: list[dict],
            tokens: list[str], shown: list[str]) -> dict[str, list[int]]:
        """One prompt: ``stats`` from ``prompt_stats``, ``massive`` its massive-activation rows. Returns the
        positions of each category."""
        mass, count = stats["mass"], stats["count"]
        alpha = mass / count.clamp(min=1)[:, None, :]
        sinks = non_initial_sinks(alpha, count, self.eps, min_queries(self.min_queries, len(ids)))
        positions = {self.first_category(ids[0]): [0], "non_initial": sinks.any(0).nonzero()[:, 0].tolist()}
        self.rows += stats["rows"]
        for category, where in positions.items():
            if where:
                n_sinks = len(where) if category == "non_initial" else int((alpha[:, :, 0] > self.eps).any())
                self.categories[category].add(mass, where, n_sinks, shown,
                                              [r for r in massive if r["position"] in where])
        for dim in sorted({r["dim"] for r in massive if r["position"] > 0}):
            hits = [r for r in massive if r["dim"] == dim and r["position"] > 0]
            where = sorted({r["position"] for r in hits})
            n_sinks = len(set(where) & set(positions["non_initial"]))
            self.carriers.setdefault(dim, _Tally(*self.shape)).add(mass, where, n_sinks, shown, hits)
        for pos in positions["non_initial"]:
            layers = sinks[:, pos].nonzero()[:, 0]
            layer, head = divmod(int(alpha[:, :, pos].argmax()), alpha.shape[1])
            self.sink_rows.append({
                "prompt": prompt, "position": pos, "token": shown[pos], "token_raw": tokens[pos],
                "n_queries": int(count[:, pos].min()), "max_alpha": float(alpha[layer, head, pos]),
                "layer": layer, "head": head, "n_layers": len(layers), "first_layer": int(layers[0]),
                "massive_dims": ",".join(map(str, sorted({r["dim"] for r in massive if r["position"] == pos}))),
            })
        return positions

    def head_table(self) -> pd.DataFrame:
        """Per (layer, head): each category's share and the dominant one (largest share)."""
        shares = torch.stack([t.mass / self.rows.clamp(min=1)[:, None] for t in self.categories.values()])
        layer, head = np.meshgrid(np.arange(self.shape[0]), np.arange(self.shape[1]), indexing="ij")
        return pd.DataFrame({"layer": layer.ravel(), "head": head.ravel(),
                             "category": [CATEGORIES[i] for i in shares.argmax(0).numpy().ravel()],
                             "mass": shares.max(0).values.numpy().ravel(),
                             **{f"{c}_mass": shares[i].numpy().ravel() for i, c in enumerate(CATEGORIES)},
                             "sink_mass": shares.sum(0).numpy().ravel()})

    def tables(self) -> dict[str, pd.DataFrame]:
        heads = self.head_table()
        dominant = heads["category"].value_counts()
        categories = pd.DataFrame([{"category": c, **t.row(self.rows), "n_heads_dominant": int(dominant.get(c, 0))}
                                   for c, t in self.categories.items()])
        n_prompts = max(1, int(sum(t.n_prompts for c, t in self.categories.items() if c != "non_initial")))
        carriers = pd.DataFrame([{"dim": dim, **t.row(self.rows), "first_layer": min(t.layers),
                                  "last_layer": max(t.layers)} for dim, t in self.carriers.items()],
                                columns=["dim", "n_prompts", "n_tokens", "n_sink_tokens", "attention_share",
                                         "attention_share_max_head", "massive_dims", "massive_hits", "top_tokens",
                                         "first_layer", "last_layer"]).drop(columns="massive_dims")
        # Share per carrier token: the dim's share over the mean number of its carriers per prompt.
        carriers.insert(5, "share_per_token", carriers["attention_share"] / (carriers["n_tokens"] / n_prompts))
        carriers = carriers.rename(columns={"n_sink_tokens": "n_non_initial_sinks"})
        sinks = pd.DataFrame(self.sink_rows, columns=["prompt", "position", "token", "token_raw", "n_queries",
                                                      "max_alpha", "layer", "head", "n_layers", "first_layer",
                                                      "massive_dims"])
        return {"sink_categories": categories, "head_sink_categories": heads, "non_initial_sinks": sinks,
                "massive_carriers": carriers.sort_values("attention_share", ascending=False, ignore_index=True)}

    def summary(self, tables: dict[str, pd.DataFrame]) -> dict:
        by = tables["sink_categories"].set_index("category")
        ranked = sorted(CATEGORIES, key=lambda c: (by.loc[c, "n_heads_dominant"], by.loc[c, "attention_share"]),
                        reverse=True)
        dominant = ranked[0] if by.loc[ranked[0], "n_tokens"] else None
        return {"sink_category_share": {c: float(by.loc[c, "attention_share"]) for c in CATEGORIES},
                "sink_category_tokens": {c: int(by.loc[c, "n_tokens"]) for c in CATEGORIES},
                "sink_category_dims": {c: by.loc[c, "massive_dims"] for c in CATEGORIES},
                "sink_category_heads": {c: int(by.loc[c, "n_heads_dominant"]) for c in CATEGORIES},
                "dominant_sink_category": dominant,
                "sink_category_sentence": category_sentence(by, dominant, tables["massive_carriers"])}


def category_sentence(by: pd.DataFrame, dominant: str | None, carriers: pd.DataFrame) -> str:
    """One line: each present category's share of attention and massive dims, who dominates the heads, and the
    massive dims carried away from position 0."""
    parts = []
    for category in CATEGORIES:
        row = by.loc[category]
        if row["n_tokens"]:
            count = f" ({row['n_tokens']} tokens)" if category == "non_initial" else ""
            dims = f", dims {row['massive_dims']}" if row["massive_dims"] else ""
            parts.append(f"{NAMES[category]} {row['attention_share']:.1%} of attention{count}{dims}")
    if dominant:
        n_heads = int(by.loc[list(CATEGORIES), "n_heads_dominant"].sum())
        parts.append(f"{NAMES[dominant]} dominate{'' if dominant == 'non_initial' else 's'} "
                     f"{by.loc[dominant, 'n_heads_dominant']} of {n_heads} heads")
    if len(carriers):
        parts.append("massive dims at positions > 0: " + ", ".join(
            f"{row.dim} on {row.n_tokens} tokens ({row.share_per_token:.2%} of attention each)"
            for row in carriers.head(3).itertuples()))
    return "; ".join(parts)
