"""The empirical position-bias graph of a real model: methods.md §6 (b) and §8.

Three parts, one run:
1. from the statistics path (no T x T, any length): attention by query-key distance and by key
   position per layer and head, the lost-in-the-middle curve (mass against relative position, beside
   uniform attention under the same mask) and the recency trend fit f(i) = a·exp(-k i) per layer with
   debiasing weights w_i = f(0)/f(i) = exp(k i);
2. the head-averaged cumulative rollout P^(t) over the model's layers, from eager attention on the
   first ``rollout_tokens`` tokens of a few prompts (T x T per layer: short prompts only), with the
   theoretical P^(t) for the model's mask and positional scheme beside it;
3. the key-value retrieval probe task (``retrieval_task``) by position of the queried pair.

Each part is a ``headlab.tally`` pass (``run_pass``), so ranks, job-array shards and resumed runs split it and
merge to the result of one run: "profile" (the statistics, one unit per batch: ``PositionProfile`` and
``TokenCount``), "rollout" (one unit per prompt: ``RolloutRows``) and "retrieval" (one unit per item:
``retrieval_task.RetrievalRows``). In a job-array shard only the first, "profile", is split; the other two run
whole when the parts are merged. Every table is built from the accumulators after their pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from tqdm.auto import tqdm

from headlab.analyses.configs import PositionBiasConfig
from headlab.batching import batches, check_max_tokens
from headlab.errors import InputError
from headlab.figures import model_title
from headlab.kernels import StatsRequest, distance_bin_edges
from headlab.kernels.dispatch import backend_in_use
from headlab.loading import LoadedModel
from headlab.probes import AttentionProbe
from headlab.probes.position import SEGMENTS, PositionProfile, head_mean_attention
from headlab.prompts import as_prompt_list, hash_inputs
from headlab.provenance import model_settings
from headlab.result import Result, to_json_safe
from headlab.tally import Mergeable, Pass, run_pass

from .position_graphs import (
    GraphSpec,
    cumulative_attention,
    cumulative_heatmaps,
    first_mass_figure,
    pick_depths,
    repeated_attention,
    synthetic_attention,
)
from .retrieval_task import (
    ABSENT,
    PLACEMENTS,
    RetrievalConfig,
    retrieval_figure,
    run_retrieval,
)

SIDES = ("before", "after")  # keys at or before the query (d = i - j), keys after it (d = j - i)


# ----------------------------------------------------------------------------------------------- trend fit


@dataclass
class ExpTrend:
    """f(i) = a·exp(-k i); k > 0: attention falls with position (primacy), k < 0: it rises (recency)."""

    a: float
    k: float
    r2: float  # weighted R² of the fit in log space
    n_points: int

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        return self.a * np.exp(-self.k * np.asarray(positions, dtype=float))

    def debias_weights(self, n_positions: int) -> np.ndarray:
        """w_i = f(0) / f(i) = exp(k i), i = 0 … n - 1 (methods.md §8)."""
        return np.exp(self.k * np.arange(n_positions))


def fit_exponential_trend(positions, values, weights=None) -> ExpTrend:
    """Weighted least squares of log f(i) = log a - k i over the points with a positive value.

    A log-linear fit (not nonlinear least squares on f) so that each position counts by its relative
    error, whatever its magnitude; ``weights`` (e.g. the number of (query, key) pairs behind each
    mean) weight the squared log residuals. Needs at least two distinct positions.
    """
    x = np.asarray(positions, dtype=float)
    y = np.asarray(values, dtype=float)
    w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=float)
    keep = np.isfinite(y) & (y > 0) & np.isfinite(w) & (w > 0)
    x, y, w = x[keep], y[keep], w[keep]
    if len(np.unique(x)) < 2:
        raise InputError("the trend fit needs at least two positions with positive attention; "
                         "use longer prompts or --max-tokens")
    log_y = np.log(y)
    design = np.stack([np.ones_like(x), -x], axis=1)
    root = np.sqrt(w)
    (log_a, k), *_ = np.linalg.lstsq(design * root[:, None], log_y * root, rcond=None)
    residual = log_y - design @ np.array([log_a, k])
    mean = np.average(log_y, weights=w)
    total = np.sum(w * (log_y - mean) ** 2)
    r2 = 1.0 - np.sum(w * residual**2) / total if total > 0 else 1.0
    return ExpTrend(float(np.exp(log_a)), float(k), float(r2), int(len(x)))


def layer_trends(profile: PositionProfile, skip_first: int) -> list[ExpTrend | None]:
    """Per layer, the trend of the head-averaged mean attention received vs key position (None: too few points)."""
    mean = (profile.key_mass.mean(1) / profile.key_count).numpy()  # [layer, position]
    counts = profile.key_count.numpy()
    positions = np.arange(mean.shape[1])
    trends = []
    for layer in range(mean.shape[0]):
        keep = positions >= skip_first
        try:
            trends.append(fit_exponential_trend(positions[keep], mean[layer, keep], counts[layer, keep]))
        except InputError:
            trends.append(None)
    return trends


# ----------------------------------------------------------------------------------------------- rollout


def _text_config(loaded: LoadedModel):
    config = loaded.model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def layer_windows(loaded: LoadedModel) -> list[int | None]:
    """The sliding-window size of each layer (None: the full mask), from the config's ``layer_types`` (Gemma 2/3,
    Qwen, gpt-oss: ``sliding_attention`` layers use ``sliding_window``); without ``layer_types`` a model with a
    ``sliding_window`` slides in every layer (Mistral's rule)."""
    text, n_layers = _text_config(loaded), loaded.arch.n_layers
    window = getattr(text, "sliding_window", None)
    if not window or not loaded.arch.causal:
        return [None] * n_layers
    layer_types = getattr(text, "layer_types", None)
    if not layer_types:
        return [int(window)] * n_layers
    return [int(window) if kind == "sliding_attention" else None for kind in layer_types][:n_layers]


def model_graph_spec(loaded: LoadedModel, n_tokens: int) -> tuple[GraphSpec, GraphSpec | None]:
    """Theory graphs matching the model: uniform attention under its mask, content-free RoPE if it uses RoPE.

    A model that mixes sliding and global layers (Gemma 3: 5 : 1) gets the mask and the RoPE base of its most
    common layer type: one mask for every layer is the theory's premise, and it is then exact for those layers
    at any length (and for all of them while ``n_tokens`` fits the window)."""
    text = _text_config(loaded)
    windows = layer_windows(loaded)
    sliding = sum(w is not None for w in windows)
    mostly_sliding = sliding > len(windows) - sliding
    window = next((w for w in windows if w is not None), None)
    mask = "window" if mostly_sliding else ("causal" if loaded.arch.causal else "bidirectional")
    uniform = GraphSpec(mask, n_tokens=n_tokens, window=window or 8)
    rope = getattr(text, "rope_parameters", None) or {}
    if isinstance(rope, dict) and isinstance(rope.get("sliding_attention"), dict):  # one entry per layer type
        rope = rope["sliding_attention" if mostly_sliding else "full_attention"]
    base = rope.get("rope_theta") if isinstance(rope, dict) else None
    base = base or getattr(text, "rope_theta", None)
    if base is None:
        return uniform, None
    return uniform, GraphSpec(mask, n_tokens=n_tokens, window=window or 8, encoding="rope", rope_base=float(base),
                              head_dim=loaded.arch.head_dim)


class RolloutRows(Mergeable):
    """What the rollout keeps per prompt: ``first_mass``, one ``[variant, layer]`` per prompt (first-token mass
    averaged over query rows), and ``example``, the first prompt's ``[variant, layer, T, T]``.

    ``example`` is a list that only prompt 0's unit fills (at most one entry): as rows it merges to that one
    tensor whichever shard or rank ran prompt 0, where a plain field would need a rule for "the first one seen"."""

    merging = {"first_mass": "rows", "example": "rows"}

    def __init__(self) -> None:
        self.first_mass: list[torch.Tensor] = []
        self.example: list[torch.Tensor] = []


def empirical_rollout(loaded: LoadedModel, prompts: list[str], config: PositionBiasConfig,
                      on_prompt: Callable[[], None] | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Head-averaged P^(t) over the model's layers on each prompt's first ``rollout_tokens`` tokens.

    Returns (first-token mass ``[variant, layer]`` averaged over prompts and query rows, the first
    prompt's ``[variant, layer, T, T]``, the number of prompts used); variant 0 is the plain rollout,
    1 the residual-aware one. One pass named "rollout" (``headlab.tally.run_pass``), one unit per prompt.
    """
    n_tokens = min(config.max_tokens, config.rollout_tokens)
    # Tokenised before any forward pass (as the statistics pass does): the pass indexes its units.
    units = list(batches(loaded, prompts[:config.rollout_prompts], n_tokens, batch_size=1))
    rows = RolloutRows()

    def step(unit: int) -> None:
        layers = head_mean_attention(loaded, units[unit].input_ids)
        variants = torch.stack([cumulative_attention(layers), cumulative_attention(layers, residual=True)])
        rows.first_mass.append(variants[..., 0].mean(-1))  # [variant, layer]
        if unit == 0:
            rows.example.append(variants)

    run_pass(Pass("rollout", len(units), step, {"rollout": rows}),
             on_unit=None if on_prompt is None else lambda unit: on_prompt())
    # Read the fields only now: merged or loaded states replace them (the object stays).
    return torch.stack(rows.first_mass).mean(0), rows.example[0], len(rows.first_mass)


# ----------------------------------------------------------------------------------------------- analysis


class _Cost:
    """Announces what a part will cost: after its first step, the time per step times the steps left."""

    def __init__(self, log: Callable[[str], None] | None, part: str, n_steps: int, unit: tuple[str, str], skip: str):
        self.log, self.part, self.n_steps, self.unit, self.skip = log, part, n_steps, unit, skip
        self.start = time.perf_counter()
        self.done = 0

    def step(self) -> None:
        self.done += 1
        if self.done == 1 and self.log is not None and self.n_steps > 1:
            first = time.perf_counter() - self.start
            self.log(f"{self.part}: {self.n_steps} {self.unit[1]}, about {_duration(first * self.n_steps)} at "
                     f"{first:.2g} s per {self.unit[0]}" + (f"; {self.skip}" if self.skip else ""))


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


class TokenCount(Mergeable):
    """The real (unpadded) tokens the statistics pass read, for the summary."""

    merging = {"n_tokens": "sum"}

    def __init__(self) -> None:
        self.n_tokens = 0


def analyze_position_bias(loaded: LoadedModel, prompts: list[str], config: PositionBiasConfig | None = None,
                          progress: bool = True, log: Callable[[str], None] | None = None) -> Result:
    """``log`` receives one line per long part, with its estimated cost, before the bulk of it runs."""
    config = config or PositionBiasConfig()
    prompts = as_prompt_list(prompts)
    config.check()
    check_max_tokens(loaded, config.max_tokens)
    arch = loaded.arch
    profile = PositionProfile(arch.n_layers, arch.n_heads, config.max_tokens, config.n_relative, arch.causal,
                              windows=layer_windows(loaded))
    units = list(batches(loaded, prompts, config.max_tokens, config.batch_size))  # tokenised (and checked) first
    counted = TokenCount()
    accumulators = {"profile": profile, "tokens": counted}
    bar = tqdm(total=len(prompts), unit="prompt", desc=f"position bias {loaded.title}", disable=not progress)
    cost = _Cost(log, "attention statistics", len(units), ("batch", "batches"), "")

    def step(unit: int) -> None:
        batch = units[unit]
        # The probe adds every layer's statistics of this forward into ``profile``.
        loaded.model(input_ids=batch.input_ids.to(loaded.device), attention_mask=batch.attention_mask.to(loaded.device))
        counted.n_tokens += int(batch.attention_mask.sum())

    def on_unit(unit: int) -> None:
        bar.update(len(units[unit].indices))
        cost.step()

    with torch.no_grad(), AttentionProbe(loaded, profile.add, backend=config.backend,
                                         request=StatsRequest(distance=True)):
        run_pass(Pass("profile", len(units), step, accumulators), on_unit=on_unit)
    bar.close()
    # Read the accumulators only now: merged or loaded states replace their fields (the objects stay).
    n_tokens = counted.n_tokens

    trends = layer_trends(profile, config.fit_skip_first)
    notes: list[str] = []
    tensors = _profile_tensors(profile, trends, config)
    tables = _profile_tables(profile, trends)

    rollout = None
    if config.rollout_tokens:
        cost = _Cost(log, "rollout", min(config.rollout_prompts, len(prompts)), ("prompt", "prompts"),
                     "--rollout-tokens 0 skips it")
        first_mass, example, used = empirical_rollout(loaded, prompts, config, cost.step)
        rollout = _rollout_parts(loaded, first_mass, example, used)
        tensors.update(rollout["tensors"])
        tables["rollout_first_mass"] = rollout["table"]
        cap = min(config.max_tokens, config.rollout_tokens)
        where = f"rollout on at most the first {cap} tokens of {used} prompts (T x T per layer)"
        if loaded.arch.causal:
            notes.append(f"{where}: under a causal mask the same attention as in the full prompts at those positions")
        else:
            notes.append(f"{where}: this model is bidirectional, so truncated prompts are inputs of their own")
    else:
        notes.append("rollout off (--rollout-tokens 0)")

    retrieval = None
    if config.retrieval_trials and not loaded.generates:
        notes.append(f"retrieval task skipped: {loaded.name} is not a causal language model")
    elif config.retrieval_trials:
        retrieval_config = RetrievalConfig(config.retrieval_trials, config.retrieval_pairs, config.seed,
                                           config.batch_size)
        n_items = config.retrieval_trials * (len(PLACEMENTS) + 1)  # + one absent-key item per trial
        rbar = tqdm(total=n_items, unit="item", desc="retrieval task", disable=not progress)
        cost = _Cost(log, "retrieval task", n_items, ("item", "items"), "--retrieval-trials 0 skips it")

        class _Progress:
            def update(self, n: int) -> None:
                rbar.update(n)
                cost.step()

        trials, by_placement, absent_trials, baseline = run_retrieval(loaded, retrieval_config, _Progress())
        rbar.close()
        tables["retrieval_trials"], tables["retrieval_by_placement"] = trials, by_placement
        tables["retrieval_absent_trials"], tables["retrieval_absent_baseline"] = absent_trials, baseline
        retrieval = (by_placement, baseline)
    else:
        notes.append("retrieval task off (--retrieval-trials 0)")

    summary = _summary(loaded, prompts, n_tokens, tensors, trends, rollout, retrieval, notes)
    summary["max_tokens"] = config.max_tokens
    figures = _figures(loaded.title, profile, tensors, trends, rollout, retrieval and retrieval[0], config)
    return Result(
        analysis="position_bias",
        model=loaded.name,
        revision=loaded.revision,
        config={**asdict(config), "bos": arch.bos, "n_prompts": len(prompts), "source": loaded.source},
        tables=tables,
        tensors=tensors,
        figures=figures,
        summary=summary,
        report=_report(summary, tables),
        input_hash=hash_inputs(prompts),
        prompts=prompts,
        provenance={"settings": model_settings(loaded, backend=config.backend,
                                               backend_used=backend_in_use(loaded.device, config.backend))},
    )


def _profile_tensors(profile: PositionProfile, trends, config) -> dict[str, torch.Tensor]:
    relative, relative_uniform = profile.relative_mean()
    segments, segments_uniform = profile.segment_mean()
    n_positions = profile.key_count.shape[-1]
    nan = float("nan")
    return {
        "distance_mass": profile.distance_mass.float(),
        "distance_count": profile.distance_count.float(),
        "distance_mean": profile.distance_mean(),
        "distance_share": profile.distance_share(),
        "position_mean": profile.position_mean(),
        "position_pairs": profile.key_count.float(),
        "relative_mean": relative,
        "relative_uniform": relative_uniform,
        "segment_mean": segments,
        "segment_uniform": segments_uniform,
        "trend_a": torch.tensor([t.a if t else nan for t in trends]),
        "trend_k": torch.tensor([t.k if t else nan for t in trends]),
        "debias_weights": torch.tensor(np.stack([t.debias_weights(n_positions) if t else np.full(n_positions, nan)
                                                 for t in trends]), dtype=torch.float32),
    }


def _profile_tables(profile: PositionProfile, trends) -> dict[str, pd.DataFrame]:
    n_layers, n_heads, _, n_bins = profile.distance_mass.shape
    edges = distance_bin_edges(n_bins + 1)
    mean, share = profile.distance_mean(), profile.distance_share()
    layer, head, side, bin_ = np.meshgrid(np.arange(n_layers), np.arange(n_heads), np.arange(2), np.arange(n_bins),
                                          indexing="ij")
    pairs = profile.distance_count[:, None].expand(-1, n_heads, -1, -1)
    distance = pd.DataFrame({
        "layer": layer.ravel(), "head": head.ravel(), "side": np.array(SIDES)[side.ravel()], "bin": bin_.ravel(),
        "d_min": np.array(edges[:-1])[bin_.ravel()], "d_max": np.array(edges[1:])[bin_.ravel()] - 1,
        "pairs": pairs.numpy().ravel(), "mean_attention": mean.numpy().ravel(), "mass_share": share.numpy().ravel(),
    })
    distance = distance[distance["pairs"] > 0].reset_index(drop=True)

    position_mean = (profile.key_mass.mean(1) / profile.key_count).float().numpy()  # [layer, position]
    layer, position = np.meshgrid(np.arange(n_layers), np.arange(position_mean.shape[1]), indexing="ij")
    positions = pd.DataFrame({"layer": layer.ravel(), "position": position.ravel(),
                              "pairs": profile.key_count.numpy().ravel(), "mean_attention": position_mean.ravel()})
    positions = positions[positions["pairs"] > 0].reset_index(drop=True)
    for name, column in (("a", "a"), ("k", "k")):
        values = {i: getattr(t, column) for i, t in enumerate(trends) if t}
        positions[f"trend_{name}"] = positions["layer"].map(values)
    positions["trend"] = positions["trend_a"] * np.exp(-positions["trend_k"] * positions["position"])
    positions["debias_weight"] = np.exp(positions["trend_k"] * positions["position"])
    positions = positions.drop(columns=["trend_a", "trend_k"])

    relative, relative_uniform = profile.relative_mean()
    n_rel = relative.shape[-1]
    rel_rows = [{"layer": lay, "bin": b, "rel_start": b / n_rel, "rel_end": (b + 1) / n_rel,
                 "mean_attention": float(relative[lay, :, b].mean()), "uniform": float(relative_uniform[lay, b]),
                 "ratio_to_uniform": float(relative[lay, :, b].mean() / relative_uniform[lay, b])}
                for lay in range(n_layers) for b in range(n_rel)]
    segments, segments_uniform = profile.segment_mean()
    seg_rows = [{"layer": lay, "head": h, "segment": name, "mean_attention": float(segments[lay, h, s]),
                 "uniform": float(segments_uniform[lay, s]),
                 "ratio_to_uniform": float(segments[lay, h, s] / segments_uniform[lay, s])}
                for lay in range(n_layers) for h in range(n_heads) for s, name in enumerate(SEGMENTS)]
    trend_rows = [{"layer": lay, "a": t.a if t else None, "k": t.k if t else None, "r2": t.r2 if t else None,
                   "n_positions": t.n_points if t else 0} for lay, t in enumerate(trends)]
    return {"distance_profile": distance, "position_profile": positions, "relative_profile": pd.DataFrame(rel_rows),
            "segments": pd.DataFrame(seg_rows), "trend": pd.DataFrame(trend_rows)}


def _rollout_parts(loaded: LoadedModel, first_mass: torch.Tensor, example: torch.Tensor, used: int) -> dict:
    """Empirical rollout tensors and table, with the theory for the model's mask and positional scheme."""
    n_layers, n_tokens = example.shape[1], example.shape[-1]
    uniform_spec, rope_spec = model_graph_spec(loaded, n_tokens)
    theory = {}
    for label, spec in (("uniform", uniform_spec), ("rope", rope_spec)):
        if spec is None:
            continue
        attention = synthetic_attention(spec)
        for variant, residual in (("rollout", False), ("residual", True)):
            theory[f"{label}_{variant}"] = repeated_attention(attention, n_layers, residual)[..., 0].mean(-1)
    rows = []
    for depth in range(n_layers):
        row = {"depth": depth, "rollout": float(first_mass[0, depth]), "residual": float(first_mass[1, depth])}
        row.update({f"theory_{name}": float(values[depth]) for name, values in theory.items()})
        rows.append(row)
    return {
        "tensors": {"rollout_first_mass": first_mass.float(), "rollout_example": example.float()},
        "table": pd.DataFrame(rows), "theory": theory, "specs": (uniform_spec, rope_spec),
        "n_tokens": n_tokens, "prompts": used,
    }


def _summary(loaded, prompts, n_tokens, tensors, trends, rollout, retrieval, notes) -> dict:
    relative = tensors["relative_mean"].mean((0, 1)) / tensors["relative_uniform"].mean(0)  # [bin]
    n_rel = len(relative)
    third = max(1, n_rel // 3)
    first_part, last_part = relative[:third].mean(), relative[-third:].mean()
    ends = torch.cat([relative[:third], relative[-third:]]).mean()
    middle = relative[third:n_rel - third].mean() if n_rel > 2 * third else relative[n_rel // 2]
    first_vs_middle, last_vs_middle = float(first_part / middle), float(last_part / middle)
    segment = tensors["segment_mean"].mean((0, 1)) / tensors["segment_uniform"].mean(0)
    ks = [t.k for t in trends if t]
    out = {
        "model": loaded.name,
        "n_prompts": len(prompts),
        "n_tokens": n_tokens,
        "n_layers": loaded.arch.n_layers,
        "n_heads": loaded.arch.n_heads,
        "causal": loaded.arch.causal,
        "trend_k_mean": float(np.mean(ks)) if ks else None,
        "trend_k_by_layer": [t.k if t else None for t in trends],
        "trend_r2_by_layer": [t.r2 if t else None for t in trends],
        "segment_ratio_to_uniform": dict(zip(SEGMENTS, segment.tolist(), strict=True)),
        "middle_vs_ends": float(middle / ends),  # kept for old readers; it cannot tell U-shaped from monotone
        "first_vs_middle": first_vs_middle,
        "last_vs_middle": last_vs_middle,
        "position_shape": position_shape(first_vs_middle, last_vs_middle),
        "mean_prompt_tokens": n_tokens / len(prompts),
        "notes": notes,
    }
    if rollout is not None:
        first = rollout["tensors"]["rollout_first_mass"]
        out.update(rollout_example_tokens=rollout["n_tokens"], rollout_prompts=rollout["prompts"],
                   rollout_first_mass_final=float(first[0, -1]), rollout_residual_first_mass_final=float(first[1, -1]),
                   theory_uniform_first_mass_final=float(rollout["theory"]["uniform_rollout"][-1]),
                   rollout_separation={
                       variant: rollout_separation(first[index], rollout["theory"][f"uniform_{variant}"])
                       for index, variant in enumerate(("rollout", "residual"))})
    if retrieval is not None:
        by_placement, baseline = retrieval
        out["retrieval_accuracy"] = dict(zip(by_placement["placement"], by_placement["accuracy"], strict=True))
        out["retrieval_mean_logprob"] = dict(zip(by_placement["placement"], by_placement["mean_logprob"], strict=True))
        out["retrieval_chance"] = float(by_placement["chance"].iloc[0])
        if baseline is not None:
            out["retrieval_absent_pick"] = dict(zip(baseline["picked"], baseline["share"], strict=True))
            out["retrieval_absent_trials"] = int(baseline["n"].iloc[0])
    return to_json_safe(out)


FLAT = 0.02  # ratios within 2% of 1 count as "no difference" (a random-init model gives 1 +- 1e-3)


def position_shape(first_vs_middle: float, last_vs_middle: float) -> str:
    """The lost-in-the-middle curve in words: "U-shaped" only when both ends receive more than the middle."""
    if abs(first_vs_middle - 1) <= FLAT and abs(last_vs_middle - 1) <= FLAT:
        return "flat (no preference by position)"
    if first_vs_middle > 1 + FLAT and last_vs_middle > 1 + FLAT:
        return "U-shaped (both ends above the middle: lost in the middle)"
    if last_vs_middle > 1 + FLAT:
        return "rises toward the last keys (recency), not U-shaped"
    if first_vs_middle > 1 + FLAT:
        return "falls from the first keys (primacy), not U-shaped"
    return "peaks in the middle, not U-shaped"


def rollout_separation(model: torch.Tensor, theory: torch.Tensor) -> dict:
    """Where the model's first-token rollout mass ``[layer]`` and the uniform-attention theory's differ.

    Both approach 1 with depth (every rollout converges to the first token), so the final value cannot tell
    them apart; the layers at which each reaches 0.5 and 0.9, and the largest gap, can. Layers count from 1.
    """
    def reach(values: torch.Tensor, level: float) -> int | None:
        above = (values >= level).nonzero()
        return int(above[0]) + 1 if len(above) else None

    gap = model.double() - theory.double()
    at = int(gap.abs().argmax())
    return {"model_layer_0.5": reach(model, 0.5), "theory_layer_0.5": reach(theory, 0.5),
            "model_layer_0.9": reach(model, 0.9), "theory_layer_0.9": reach(theory, 0.9),
            "max_gap_layer": at + 1, "max_gap_model": float(model[at]), "max_gap_theory": float(theory[at])}


# ----------------------------------------------------------------------------------------------- figures


def _figures(model, profile, tensors, trends, rollout, retrieval, config) -> dict[str, go.Figure]:
    figures = {
        "distance_profile": _distance_figure(model, profile),
        "position_profile": _position_figure(model, profile, trends),
        "segments": _segments_figure(model, tensors),
        "lost_in_the_middle": _relative_figure(model, tensors),
    }
    if rollout is not None:
        example = rollout["tensors"]["rollout_example"]
        depths = pick_depths(example.shape[1])
        figures["rollout"] = cumulative_heatmaps(example[0], depths, f"{model}: head-mean rollout (first prompt)")
        figures["rollout_residual"] = cumulative_heatmaps(example[1], depths,
                                                          f"{model}: residual-aware rollout (first prompt)")
        first = rollout["tensors"]["rollout_first_mass"]
        curves = {"model: rollout": first[0], "model: residual-aware": first[1]}
        names = {"uniform": rollout["specs"][0].label(),
                 "rope": rollout["specs"][1].label() if rollout["specs"][1] else ""}
        for key, values in rollout["theory"].items():
            kind, variant = key.split("_")
            curves[f"theory ({names[kind]}){', residual-aware' if variant == 'residual' else ''}"] = values
        title = (f"{model}: mass on the first token vs depth (model: mean over prompts; theory at "
                 f"T = {rollout['n_tokens']})")
        figures["first_mass_vs_depth"] = first_mass_figure(curves, title)
    if retrieval is not None:
        figures["retrieval"] = retrieval_figure(model, retrieval)
    return figures


def _distance_figure(model: str, profile: PositionProfile) -> go.Figure:
    mean = profile.distance_mean().mean(1)  # [layer, side, bin]
    n_bins = mean.shape[-1]
    x = np.array(distance_bin_edges(n_bins)) + 1
    fig = go.Figure()
    for layer in range(mean.shape[0]):
        for side, dash in ((0, "solid"), (1, "dash")):
            pairs = profile.distance_count[layer, side] > 0
            if not pairs.any():
                continue
            fig.add_trace(go.Scatter(x=x[pairs.numpy()], y=mean[layer, side][pairs].numpy(), mode="lines+markers",
                                     name=f"layer {layer}" + (" (keys after)" if side else ""),
                                     line={"dash": dash}, legendgroup=str(layer)))
    fig.update_layout(title=f"{model}: mean attention of one key vs distance (head mean; dashed: keys after)",
                      xaxis_title="1 + |i - j| (bin left edge)", yaxis_title="mean attention per key",
                      xaxis_type="log", yaxis_type="log")
    return fig


def _position_figure(model: str, profile: PositionProfile, trends) -> go.Figure:
    mean = (profile.key_mass.mean(1) / profile.key_count).numpy()
    positions = np.arange(mean.shape[1])
    fig = go.Figure()
    for layer, trend in enumerate(trends):
        seen = profile.key_count[layer].numpy() > 0
        fig.add_trace(go.Scatter(x=positions[seen], y=mean[layer, seen], mode="lines", name=f"layer {layer}",
                                 legendgroup=str(layer)))
        if trend is not None:
            fig.add_trace(go.Scatter(x=positions[seen], y=trend(positions[seen]), mode="lines",
                                     line={"dash": "dot"}, name=f"fit k={trend.k:.4g}", legendgroup=str(layer)))
    fig.update_layout(title=f"{model}: mean attention received vs key position (head mean; dotted: a·exp(-k i))",
                      xaxis_title="key position i", yaxis_title="mean attention received", yaxis_type="log")
    return fig


def _segments_figure(model: str, tensors) -> go.Figure:
    ratio = tensors["segment_mean"].mean(1) / tensors["segment_uniform"]  # [layer, segment]
    fig = go.Figure([go.Bar(x=list(range(ratio.shape[0])), y=ratio[:, s].numpy(), name=name)
                     for s, name in enumerate(SEGMENTS)])
    fig.add_hline(y=1.0, line_dash="dot")
    fig.update_layout(title=f"{model}: attention received by segment, relative to uniform attention (1 = none)",
                      xaxis_title="layer", yaxis_title="mean attention / uniform", barmode="group", yaxis_type="log")
    return fig


def _relative_figure(model: str, tensors) -> go.Figure:
    ratio = tensors["relative_mean"].mean(1) / tensors["relative_uniform"]  # [layer, bin]
    n_rel = ratio.shape[-1]
    x = (np.arange(n_rel) + 0.5) / n_rel
    fig = go.Figure([go.Scatter(x=x, y=ratio[layer].numpy(), mode="lines", name=f"layer {layer}", opacity=0.6)
                     for layer in range(ratio.shape[0])])
    fig.add_trace(go.Scatter(x=x, y=ratio.nanmean(0).numpy(), mode="lines+markers", name="mean over layers",
                             line={"width": 4, "color": "black"}))
    fig.add_hline(y=1.0, line_dash="dot")
    fig.update_layout(title=f"{model}: lost in the middle: attention received vs relative key position "
                            "(first token left out), relative to uniform attention",
                      xaxis_title="relative key position", yaxis_title="mean attention / uniform")
    return fig


def _report(summary: dict, tables: dict[str, pd.DataFrame]) -> str:
    k = summary["trend_k_mean"]
    lines = [
        f"# Position bias: {model_title(summary['model'])}",
        "",
        f"- prompts: {summary['n_prompts']}, tokens: {summary['n_tokens']}, "
        f"{'causal' if summary['causal'] else 'bidirectional'}",
        "- attention received relative to uniform attention: "
        + ", ".join(f"{name} {value:.3g}" for name, value in summary["segment_ratio_to_uniform"].items()),
        f"- tokens per prompt: T <= {summary.get('max_tokens')} (mean {summary['mean_prompt_tokens']:.1f})",
        f"- relative position (first token left out): first third / middle {summary['first_vs_middle']:.3g}, "
        f"last third / middle {summary['last_vs_middle']:.3g}: {summary['position_shape']}",
        f"- trend f(i) = a·exp(-k i), mean k over layers: {'n/a' if k is None else f'{k:.4g}'} "
        "(k > 0: earlier keys get more; debiasing weights w_i = exp(k i))",
    ]
    if "rollout_first_mass_final" in summary:
        lines.append(f"- rollout over {summary['n_layers']} layers (first prompt: T = "
                     f"{summary['rollout_example_tokens']}, mean over prompts): first-token "
                     f"mass {summary['rollout_first_mass_final']:.3f} (residual-aware "
                     f"{summary['rollout_residual_first_mass_final']:.3f}; uniform-attention theory "
                     f"{summary['theory_uniform_first_mass_final']:.3f})")
    if "rollout_separation" in summary:
        lines.append(f"- {rollout_sentence(summary)}")
    if "retrieval_accuracy" in summary:
        acc = ", ".join(f"{p} {a:.2f}" for p, a in summary["retrieval_accuracy"].items())
        lines.append(f"- retrieval accuracy by placement: {acc} (chance {summary['retrieval_chance']:.3f})")
    if "retrieval_absent_pick" in summary:
        lines.append(f"- {absent_sentence(summary)}")
    lines += [f"- note: {note}" for note in summary["notes"]]
    lines += ["", "## Trend fit per layer", "", "```", tables["trend"].to_string(index=False), "```"]
    if "retrieval_by_placement" in tables:
        lines += ["", "## Retrieval task", "", "```", tables["retrieval_by_placement"].to_string(index=False), "```"]
    if tables.get("retrieval_absent_baseline") is not None:
        lines += ["", f"## Retrieval: queried key absent ({ABSENT} trials)", "", "```",
                  tables["retrieval_absent_baseline"].to_string(index=False), "```"]
    return "\n".join(lines) + "\n"


def rollout_sentence(summary: dict) -> str:
    """The rollout in one line: the layers where model and uniform theory reach 0.5 and 0.9, and their largest gap."""
    def layer(value: int | None) -> str:
        return "never" if value is None else str(value)

    parts = []
    for variant, label in (("rollout", "rollout"), ("residual", "residual-aware")):
        sep = summary["rollout_separation"][variant]
        parts.append(f"{label}: reaches 0.5 / 0.9 at layer {layer(sep['model_layer_0.5'])} / "
                     f"{layer(sep['model_layer_0.9'])} (uniform theory {layer(sep['theory_layer_0.5'])} / "
                     f"{layer(sep['theory_layer_0.9'])}), largest gap at layer "
                     f"{sep['max_gap_layer']}: {sep['max_gap_model']:.3f} vs {sep['max_gap_theory']:.3f}")
    return (f"first-token mass in the rollout over {summary['n_layers']} layers (T = "
            f"{summary['rollout_example_tokens']}): " + "; ".join(parts))


def absent_sentence(summary: dict) -> str:
    pick = summary["retrieval_absent_pick"]
    return (f"queried key absent ({summary['retrieval_absent_trials']} trials): the model still picks the first value "
            f"{pick['first']:.2f}, middle {pick['middle']:.2f}, last {pick['last']:.2f}, other slots "
            f"{pick['other']:.2f} of the time (chance {summary['retrieval_chance']:.3f} per slot): a placement's "
            "accuracy near its pick rate here is a default preference, not retrieval")


__all__ = ["ExpTrend", "PositionBiasConfig", "analyze_position_bias", "fit_exponential_trend"]
