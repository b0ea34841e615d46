"""Circuits of tasks and their overlap (Merullo et al. 2024, methods.md §5), as a ``Result``.

For each task: the clean model's accuracy and mean LD first, then a score per head (attribution
patching, or exact path patching to the logits; see ``path_patching``), the circuit = the top ``top``
share of heads by score, and a check that the circuit matters: mean-ablating it against mean-ablating
as many random heads (``draws`` draws). Across tasks: the overlap table (shared / task-only), IoU and
the share of each circuit inside the other (the paper: 25 of 32 heads = 78%). ``circuit_graph``
writes a circuit in the EAP-IG / MIB graph JSON.

Cost is counted in passes (forward passes over a task's prompts): clean runs 2, attribution ~4, path
~0.075 x (heads + 1) more, role tags 3 on at most 16 prompts, the ablation test ``draws + 3``, most of
a default run. Each phase has a bar; each task's estimate is logged once its clean runs are timed.

Scale (``headlab.tally``): the run is two passes. ``scores``: every task's clean runs (one unit per prompt
chunk), attribution patching (one per chunk) and, with ``method="path"``, path patching (one per prompt chunk x
sender group): the cost of a run, split over ranks and job-array shards alike. ``ablation``: one unit per
mean-ablation run of every task (each random draw, the clean model, the circuit); it depends on the circuits, so
it runs after the scores are merged: split over ranks, whole in a job array's merge. The role tags (3 passes on
at most 16 prompts) stay a plain loop between them. Every split gives the tables of one run.
"""

from __future__ import annotations

import bisect
import contextlib
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import pandas as pd
import plotly.graph_objects as go
import torch
from tqdm.auto import tqdm

from headlab.analyses.configs import CircuitsConfig
from headlab.errors import InputError
from headlab.interventions import HeadMeanAblate, intervene
from headlab.result import Result
from headlab.tally import Mergeable, Pass, run_pass, tally

from .circuit_roles import ROLE_PASSES, tag_roles
from .circuit_tasks import TaskBatch, make_task, tokenize_task
from .path_patching import (
    AttributionPatching,
    Filled,
    Head,
    Runs,
    SenderPatching,
    all_heads,
    clean_and_cf,
    final_logits,
    logit_diff,
    z_names,
)


def top_heads(scores: torch.Tensor, top: float = 0.02, k: int | None = None) -> list[Head]:
    """The ``k`` heads of highest score (default: ``ceil(top · n_heads)``), best first.

    ``scores``: ``[layer, head]``."""
    if k is None:
        if not 0 < top <= 1:
            raise InputError(f"--top is a share of heads in (0, 1], got {top}")
        k = max(1, math.ceil(top * scores.numel()))
    order = torch.argsort(scores.flatten(), descending=True, stable=True)[:k]
    n_heads = scores.shape[1]
    return [(int(i) // n_heads, int(i) % n_heads) for i in order]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two score tensors of the same shape (average ranks for ties)."""
    return float(pd.Series(a.flatten().tolist()).corr(pd.Series(b.flatten().tolist()), method="spearman"))


def overlap(a: Sequence[Head], b: Sequence[Head]) -> dict:
    """Shared and task-only heads, IoU, and the share of each circuit inside the other."""
    sa, sb = set(map(tuple, a)), set(map(tuple, b))
    shared = sorted(sa & sb)
    return {"shared": shared, "only_a": sorted(sa - sb), "only_b": sorted(sb - sa),
            "iou": len(shared) / max(1, len(sa | sb)), "share_a_in_b": len(shared) / max(1, len(sa)),
            "share_b_in_a": len(shared) / max(1, len(sb))}


def circuit_graph(scores: torch.Tensor, circuit: Sequence[Head], d_model: int | None = None) -> dict:
    """The EAP-IG / MIB graph JSON of a head circuit: ``{"cfg", "nodes", "edges"}``.

    Nodes ``input``, ``a{L}.h{H}``, ``m{L}``, ``logits``; edges ``src->dst`` (``<q|k|v>`` suffix into a
    head) from every earlier node, each ``{"score", "in_graph"}``. In the graph: input, logits, every
    MLP (headlab scores heads only, MLPs are kept) and the circuit's heads, and the edges between them.
    Scores: the head's score (×100) on its edge to the logits, where headlab measured it; 0 elsewhere.
    """
    n_layers, n_heads = scores.shape
    chosen = set(map(tuple, circuit))
    nodes = {"input": {"in_graph": True}}
    for layer in range(n_layers):
        for h in range(n_heads):
            nodes[f"a{layer}.h{h}"] = {"in_graph": (layer, h) in chosen}
        nodes[f"m{layer}"] = {"in_graph": True}
    nodes["logits"] = {"in_graph": True}
    edges: dict[str, dict] = {}
    upstream = ["input"]
    for layer in range(n_layers):
        heads = [f"a{layer}.h{h}" for h in range(n_heads)]
        for dst in heads:
            for src in upstream:
                for part in "qkv":
                    edges[f"{src}->{dst}<{part}>"] = {"score": 0.0,
                                                      "in_graph": nodes[src]["in_graph"] and nodes[dst]["in_graph"]}
        for src in upstream + heads:  # an MLP reads its own layer's heads too (not parallel attn/MLP)
            edges[f"{src}->m{layer}"] = {"score": 0.0, "in_graph": nodes[src]["in_graph"]}
        upstream = upstream + heads + [f"m{layer}"]
    for src in upstream:
        score = 0.0
        if src.startswith("a"):
            layer, h = (int(x) for x in src[1:].split(".h"))
            score = float(scores[layer, h])
        edges[f"{src}->logits"] = {"score": score, "in_graph": nodes[src]["in_graph"]}
    cfg = {"n_layers": n_layers, "n_heads": n_heads, "parallel_attn_mlp": False}
    if d_model is not None:
        cfg["d_model"] = d_model
    return {"cfg": cfg, "nodes": nodes, "edges": edges}


@torch.no_grad()
def mean_ld(loaded, batch: TaskBatch, edits=(), batch_size: int = 32) -> float:
    total = 0.0
    for part in batch.chunks(batch_size):
        with intervene(loaded, *edits) if edits else contextlib.nullcontext():
            total += float(logit_diff(final_logits(loaded, part.clean_ids, part.attention_mask), part).sum())
    return total / len(batch)


@torch.no_grad()
def mean_z(loaded, batch: TaskBatch, batch_size: int = 32) -> dict[Head, torch.Tensor]:
    """``{(layer, head): [d_head]}`` mean z over the real tokens of the clean prompts (the ablation value)."""
    from headlab.probes import trace

    arch = loaded.arch
    total = torch.zeros(arch.n_layers, arch.n_heads, arch.head_dim)
    count = 0
    for part in batch.chunks(batch_size):
        with trace(loaded, names=z_names(arch), stats=False) as t:
            final_logits(loaded, part.clean_ids, part.attention_mask)
        real = part.attention_mask.bool()
        for layer, name in enumerate(z_names(arch)):
            total[layer] += t[name][real].float().sum(dim=0).cpu()
        count += int(real.sum())
    mean = total / count
    return {(layer, h): mean[layer, h] for layer in range(arch.n_layers) for h in range(arch.n_heads)}


def ablation_passes(draws: int) -> int:
    """Forward passes over the task's prompts of ``ablation_test``: the mean z, each draw, clean, the circuit."""
    return draws + 3


class AblationRuns:
    """``ablation_test`` of one task as units of work: unit ``i`` is one mean LD over the task's prompts, with
    the ``i``-th of ``draws`` random head sets mean-ablated, then (``i = draws``) the clean model, then the
    circuit. The random sets are drawn here, from ``seed`` alone, so they do not depend on which units run in
    this process. The mean z (the ablation value) is computed by the first unit that runs in this process
    (one pass over the prompts, the same in every process). Accumulator ``lds``: ``[draws + 2]`` float64.

    ``tick``: called after the mean z and after each unit (``ablation_passes(draws)`` calls in a whole run)."""

    def __init__(self, loaded, batch: TaskBatch, circuit: Sequence[Head], draws: int = 20, seed: int = 0,
                 batch_size: int = 32, tick: Callable[[], object] | None = None):
        self.loaded, self.batch, self.batch_size, self.draws = loaded, batch, batch_size, draws
        self.tick = tick or (lambda: None)
        self.circuit = [tuple(h) for h in circuit]
        rng = random.Random(seed)
        heads = all_heads(loaded.arch)
        # None: the clean model (no head ablated)
        self.sets: list[list[Head] | None] = [rng.sample(heads, len(self.circuit)) for _ in range(draws)]
        self.sets += [None, self.circuit]
        self.n_units = len(self.sets)
        # float64: mean_ld is a Python float, kept exactly
        self.lds = Filled(self.n_units, (), self.n_units, dtype=torch.float64)
        self._means: dict[Head, torch.Tensor] | None = None

    def as_pass(self, name: str = "ablation") -> Pass:
        return Pass(name, self.n_units, self.step, {"lds": self.lds})

    def step(self, unit: int) -> None:
        if self._means is None:
            self._means = mean_z(self.loaded, self.batch, self.batch_size)
            self.tick()
        chosen = self.sets[unit]
        edits = () if chosen is None else [HeadMeanAblate(chosen, mean={h: self._means[h] for h in chosen})]
        self.lds.put(unit, unit, mean_ld(self.loaded, self.batch, edits, self.batch_size))
        self.tick()
        if unit + 1 == self.n_units:
            self._means = None  # the last unit: nothing more reads them

    def result(self) -> dict:
        """The table row of ``ablation_test``, once every unit ran (or was merged in)."""
        lds = [float(x) for x in self.lds.complete()]
        random_lds, clean, ld_circuit = lds[:self.draws], lds[self.draws], lds[self.draws + 1]
        drops = torch.tensor([clean - x for x in random_lds])
        draws = self.draws
        return {"ld_clean": clean, "ld_circuit_ablated": ld_circuit, "drop_circuit": clean - ld_circuit,
                "drop_random_mean": float(drops.mean()), "drop_random_std": float(drops.std()) if draws > 1 else 0.0,
                "drop_random_max": float(drops.max()), "draws": draws,
                "random_at_least_circuit": int((drops >= clean - ld_circuit).sum())}


def ablation_test(loaded, batch: TaskBatch, circuit: Sequence[Head], draws: int = 20, seed: int = 0,
                  batch_size: int = 32, step: Callable[[], object] | None = None) -> dict:
    """Mean LD of the clean model, with the circuit mean-ablated, and with ``draws`` random head sets
    of the same size mean-ablated (means over the task's clean prompts, every position).

    ``step``: called after each of the ``ablation_passes(draws)`` passes over the prompts (a progress bar).
    Every unit runs here, whatever the caller's ``Scale``."""
    work = AblationRuns(loaded, batch, circuit, draws, seed, batch_size, step)
    tally(work.as_pass())
    return work.result()


class CleanRuns(Mergeable):
    """Per prompt chunk (one entry each, in prompt order): LD of the clean and of the counterfactual run
    ``[chunk]``, and whether the answer is the clean model's argmax ``[chunk]`` bool."""

    merging = {"ld_clean": "rows", "ld_cf": "rows", "top1": "rows"}

    def __init__(self) -> None:
        self.ld_clean: list[torch.Tensor] = []
        self.ld_cf: list[torch.Tensor] = []
        self.top1: list[torch.Tensor] = []

    def add(self, runs: Runs) -> None:
        self.ld_clean.append(runs.ld_clean.cpu())
        self.ld_cf.append(runs.ld_cf.cpu())
        self.top1.append(runs.top1.cpu())


@dataclass
class _Segment:
    """Units ``[start, start + n_units)`` of a combined pass: one phase of one task, with its bar."""

    start: int
    n_units: int
    step: Callable[[int], None]  # of the segment's own unit index
    open_phase: Callable[[], _Phase]
    finish: Callable[[_Phase, int], None] | None = None  # after its last unit: (phase, units run here)
    tick: bool = True  # one bar step per unit (False: the work steps the bar itself, see ``AblationRuns``)
    phase: _Phase | None = None
    ran: int = 0

    def step_bar(self) -> None:
        if self.phase is not None:
            self.phase.step()


class _Units:
    """Several phases' units as one pass: unit ``u`` is unit ``u - start`` of the segment holding it. A phase's
    bar opens at its first unit run in this process and closes after its last (or when the pass ends: a shard
    may stop inside a phase)."""

    def __init__(self) -> None:
        self.segments: list[_Segment] = []
        self.n_units = 0

    def add(self, n_units: int, step: Callable[[int], None], open_phase: Callable[[], _Phase],
            finish: Callable[[_Phase, int], None] | None = None, tick: bool = True) -> _Segment:
        segment = _Segment(self.n_units, n_units, step, open_phase, finish, tick)
        if n_units:
            self.segments.append(segment)
        self.n_units += n_units
        return segment

    def step(self, unit: int) -> None:
        index = bisect.bisect_right([s.start for s in self.segments], unit) - 1
        segment = self.segments[index]
        if segment.phase is None:
            segment.phase = segment.open_phase()
        segment.step(unit - segment.start)
        segment.ran += 1
        if segment.tick:
            segment.step_bar()
        if unit + 1 == segment.start + segment.n_units:
            phase, segment.phase = segment.phase, None
            if segment.finish is not None:
                segment.finish(phase, segment.ran)
            else:
                phase.close()

    def close(self) -> None:
        """Close the bars a shard left open."""
        for segment in self.segments:
            if segment.phase is not None:
                segment.phase.close()
                segment.phase = None


# Rough cost of the scores in forward passes over a task's prompts, which turns the time of the clean runs into an
# estimate: attribution is 4.0 plain forwards (its own clean runs included), exact path patching 0.075 x (heads + 1)
# (one-token steps over the prefix cache); benchmarks/results/circuits_cpu.json, smollm2-135m, 17-token prompts.
ATTRIBUTION_PASSES = 4.0
PATH_PASSES_PER_HEAD = 0.075
ROLE_PROMPTS = 16  # tag_roles reads the answer attention on at most this many prompts


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


class _Phase:
    """One phase of a task, reported as position_bias reports its parts: a tqdm bar (shown with ``progress``)
    and, when ``log`` is given, one line after the first step with the phase's estimated time."""

    def __init__(self, desc: str, n_steps: int, progress: bool, log: Callable[[str], None] | None = None,
                 skip: str = ""):
        self.desc, self.n_steps, self.log, self.skip = desc, n_steps, log, skip
        self.bar = tqdm(total=n_steps, desc=desc, unit="pass", disable=not progress, leave=False)
        self.start = time.perf_counter()
        self.done = 0

    def step(self) -> None:
        self.bar.update(1)
        self.done += 1
        if self.done == 1 and self.log is not None and self.n_steps > 1:
            first = time.perf_counter() - self.start
            self.log(f"{self.desc}: {self.n_steps} passes, about {_duration(first * self.n_steps)} at {first:.2g} s "
                     "per pass" + (f"; {self.skip}" if self.skip else ""))

    def close(self) -> float:
        """Closes the bar; the seconds since the phase began."""
        self.bar.close()
        return time.perf_counter() - self.start


def task_estimate(batch: TaskBatch, per_pass: float, config: CircuitsConfig, n_heads: int) -> str:
    """What the rest of a task will cost, from the seconds of one forward pass over its prompts."""
    scores = ATTRIBUTION_PASSES + (PATH_PASSES_PER_HEAD * (n_heads + 1) if config.method == "path" else 0.0)
    roles = ROLE_PASSES * min(len(batch), ROLE_PROMPTS) / len(batch) if config.roles else 0.0
    ablation = ablation_passes(config.draws) if config.draws else 0
    total = per_pass * (scores + roles + ablation)
    parts = [f"{config.method} scores ~{scores:.0f} passes"]
    if ablation:
        parts.append(f"ablation test {ablation} (--draws sets it)")
    if roles:
        parts.append(f"role tags ~{roles:.1f}")
    each = f"{per_pass:.2g}" if per_pass < 10 else f"{per_pass:.0f}"
    return (f"{batch.name}: {len(batch)} prompts of up to {batch.clean_ids.shape[1]} tokens, {each} s per pass over "
            f"them; about {_duration(total)} more for this task ({', '.join(parts)})")


def heatmap(scores: torch.Tensor, title: str) -> go.Figure:
    """Layer on y, head on x, diverging scale centred at 0."""
    limit = float(scores.abs().max()) or 1.0
    fig = go.Figure(go.Heatmap(z=scores.numpy(), colorscale="RdBu", zmid=0, zmin=-limit, zmax=limit,
                               colorbar={"title": "score ×100"}))
    fig.update_layout(title=title, xaxis_title="head", yaxis_title="layer")
    return fig


def analyze_circuits(loaded, config: CircuitsConfig | None = None, progress: bool = False,
                     log: Callable[[str], None] | None = None) -> Result:
    """Scores, circuits, ablation checks and the pairwise overlap of ``config.tasks`` on ``loaded``.

    ``progress``: a bar per phase; ``log`` receives, per task, the estimated cost of the rest of the task once
    its clean runs are timed, and the ablation test's estimate after its first pass."""
    config = config or CircuitsConfig()
    config.check()
    tok = loaded.text_tokenizer
    batches = {}
    for spec in config.tasks:  # every task is built and tokenized before any compute
        task = make_task(spec, config.n, config.seed, tokenizer=tok)
        if task.name in batches:
            raise InputError(f"--tasks names the task {task.name!r} twice; give each task once")
        batches[task.name] = tokenize_task(loaded, task)
    clean_rows, score_rows, circuit_rows, ablation_rows, agreement_rows, role_tables = [], [], [], [], [], []
    tensors, figures, circuits = {}, {}, {}
    n_heads = loaded.arch.n_layers * loaded.arch.n_heads

    # Pass 1, "scores": per task its clean runs, attribution and (path) path patching units, in that order.
    units, accumulators, works = _Units(), {}, {}
    for name, batch in batches.items():
        chunks = batch.chunks(config.batch_size)
        clean = CleanRuns()
        attribution = AttributionPatching(loaded, batch, config.batch_size)
        path = SenderPatching(loaded, batch, all_heads(loaded.arch), path=True, batch_size=config.batch_size,
                              senders_per_pass=config.senders_per_pass) if config.method == "path" else None
        works[name] = (clean, attribution, path)
        accumulators[f"{name}.clean"] = clean
        accumulators.update({f"{name}.attribution.{k}": v for k, v in attribution.accumulators.items()})
        if path is not None:
            accumulators.update({f"{name}.path.{k}": v for k, v in path.accumulators.items()})

        def clean_step(c: int, chunks=chunks, clean=clean) -> None:
            clean.add(clean_and_cf(loaded, chunks[c]))

        def timed(phase: _Phase, ran: int, batch=batch, n_chunks=len(chunks)) -> None:
            seconds = phase.close()
            if log is not None and ran:  # two passes (clean and counterfactual) over the prompts: the estimate's
                # unit; a shard that ran part of the chunks scales its time to all of them
                log(task_estimate(batch, seconds / 2 * (n_chunks / ran), config, n_heads))

        units.add(len(chunks), clean_step, lambda name=name, n=len(chunks): _Phase(f"clean runs {name}", n, progress),
                  timed)
        units.add(attribution.n_units, attribution.step,
                  lambda name=name, n=attribution.n_units: _Phase(f"attribution patching {name}", n, progress))
        if path is not None:
            units.add(path.n_units, path.step,
                      lambda name=name, n=path.n_units: _Phase(f"path patching {name}", n, progress))
    try:
        run_pass(Pass("scores", units.n_units, units.step, accumulators))
    finally:
        units.close()
        for _, _, path in works.values():
            if path is not None:
                path.release()  # a shard's last chunk's prefix cache

    ablations = {}
    for name, batch in batches.items():
        clean, attribution_work, path = works[name]
        ld, ld_cf, top1 = torch.cat(clean.ld_clean), torch.cat(clean.ld_cf), torch.cat(clean.top1)
        clean_rows.append({"task": name, "n": len(batch), "accuracy": float((ld > 0).float().mean()),
                           "top1": float(top1.float().mean()), "ld_clean": float(ld.mean()),
                           "ld_cf": float(ld_cf.mean())})
        attribution = attribution_work.scores()
        if path is None:
            scores = attribution
        else:
            scores = path.scores().view(loaded.arch.n_layers, loaded.arch.n_heads)
            tensors[f"attribution.{name}"] = attribution
            agreement_rows.append({"task": name, "spearman_attribution_path": spearman(attribution, scores),
                                   "top_shared": len(set(top_heads(attribution, config.top))
                                                     & set(top_heads(scores, config.top)))})
        tensors[f"scores.{name}"] = scores
        figures[f"scores_{name}"] = heatmap(scores, f"{name}: {config.method} patching score ×100")
        for layer in range(scores.shape[0]):
            for h in range(scores.shape[1]):
                score_rows.append({"task": name, "layer": layer, "head": h, "score": float(scores[layer, h])})
        circuit = top_heads(scores, config.top)
        circuits[name] = circuit
        for rank, (layer, h) in enumerate(circuit, start=1):
            circuit_rows.append({"task": name, "rank": rank, "layer": layer, "head": h,
                                 "score": float(scores[layer, h])})
        if config.roles:  # the circuit and the 3 most negative heads (negative movers are found there)
            negative = [h for h in top_heads(-scores, k=3) if h not in circuit]
            phase = _Phase(f"role tags {name}", ROLE_PASSES, progress)
            role_tables.append(tag_roles(loaded, batch, circuit + negative, scores, step=phase.step))
            phase.close()

    # Pass 2, "ablation": every task's mean-ablation runs (they need the circuits, so they come after the scores).
    if config.draws:
        units = _Units()
        for name, batch in batches.items():
            holder: list[_Segment] = []  # this task's segment, made after its work: the work steps the bar itself
            work = AblationRuns(loaded, batch, circuits[name], config.draws, config.seed, config.batch_size,
                                lambda holder=holder: holder[0].step_bar())
            ablations[name] = work

            def open_phase(name=name) -> _Phase:
                return _Phase(f"ablation test {name}", ablation_passes(config.draws), progress, log,
                              "--draws sets the number of random head sets, --draws 0 skips the test")

            holder.append(units.add(work.n_units, work.step, open_phase, tick=False))
        try:
            run_pass(Pass("ablation", units.n_units, units.step,
                          {f"{name}.lds": work.lds for name, work in ablations.items()}))
        finally:
            units.close()
        ablation_rows = [{"task": name, **work.result()} for name, work in ablations.items()]
    overlap_rows = []
    names = list(circuits)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            o = overlap(circuits[a], circuits[b])
            overlap_rows.append({"task_a": a, "task_b": b, "n_a": len(circuits[a]), "n_b": len(circuits[b]),
                                 "shared": " ".join(f"{x}.{y}" for x, y in o["shared"]),
                                 "only_a": " ".join(f"{x}.{y}" for x, y in o["only_a"]),
                                 "only_b": " ".join(f"{x}.{y}" for x, y in o["only_b"]),
                                 "n_shared": len(o["shared"]), "iou": o["iou"], "share_a_in_b": o["share_a_in_b"],
                                 "share_b_in_a": o["share_b_in_a"]})
    tables = {"clean": pd.DataFrame(clean_rows), "scores": pd.DataFrame(score_rows),
              "circuits": pd.DataFrame(circuit_rows), "overlap": pd.DataFrame(overlap_rows)}
    if ablation_rows:
        tables["ablation"] = pd.DataFrame(ablation_rows)
    if agreement_rows:
        tables["agreement"] = pd.DataFrame(agreement_rows)
    if role_tables:
        tables["roles"] = pd.concat(role_tables, ignore_index=True)
    summary = {"tasks": names, "method": config.method, "circuit_size": len(next(iter(circuits.values()))),
               "accuracy": {r["task"]: r["accuracy"] for r in clean_rows},
               "ld_clean": {r["task"]: r["ld_clean"] for r in clean_rows}}
    if overlap_rows:
        summary["iou"] = overlap_rows[0]["iou"]
        summary["n_shared"] = overlap_rows[0]["n_shared"]
    return Result("circuits", loaded.name, asdict(config), tables=tables, tensors=tensors, figures=figures,
                  summary=summary, report=_report(tables, config), revision=getattr(loaded, "revision", None))


def _report(tables: dict[str, pd.DataFrame], config: CircuitsConfig) -> str:
    lines = [f"# Circuits ({config.method} patching, top {config.top:.1%} of heads)", "", "## Clean model", ""]
    for r in tables["clean"].itertuples():
        lines.append(f"- {r.task}: accuracy (LD > 0) {r.accuracy:.3f}, top-1 {r.top1:.3f}, mean LD {r.ld_clean:.2f} "
                     f"(counterfactual {r.ld_cf:.2f}), n = {r.n}")
    lines += ["", "## Circuits", ""]
    for task, group in tables["circuits"].groupby("task", sort=False):
        lines.append(f"- {task}: " + ", ".join(f"{r.layer}.{r.head} ({r.score:.1f})" for r in group.itertuples()))
    if "ablation" in tables:
        lines += ["", "## Mean-ablating the circuit vs as many random heads", ""]
        for r in tables["ablation"].itertuples():
            lines.append(f"- {r.task}: LD {r.ld_clean:.2f} -> {r.ld_circuit_ablated:.2f} (drop {r.drop_circuit:.2f}); "
                         f"random: drop {r.drop_random_mean:.2f} ± {r.drop_random_std:.2f} over {r.draws} draws, "
                         f"{r.random_at_least_circuit} of them at least the circuit's")
    if "roles" in tables:
        lines += ["", "## Role tags from attention (to answer at the final position; previous / duplicate / "
                  "induction on a repeated random sequence)", ""]
        for task, group in tables["roles"].groupby("task", sort=False):
            lines.append(f"- {task}: " + "; ".join(
                f"{r.layer}.{r.head} {r.tag or '-'} (score {r.score:.1f}, answer {r.to_answer:.2f}, wrong "
                f"{r.to_wrong:.2f}, prev "
                f"{r.previous:.2f}, dup {r.duplicate:.2f}, ind {r.induction:.2f})" for r in group.itertuples()))
    if "agreement" in tables:
        lines += ["", "## Attribution (linear) vs exact path patching", ""]
        for r in tables["agreement"].itertuples():
            lines.append(f"- {r.task}: Spearman {r.spearman_attribution_path:.3f} over all heads; "
                         f"{r.top_shared} heads shared between the two top-{config.top:.1%} sets")
    if len(tables["overlap"]):
        lines += ["", "## Overlap", ""]
        for r in tables["overlap"].itertuples():
            lines.append(f"- {r.task_a} / {r.task_b}: {r.n_shared} shared ({r.shared}); IoU {r.iou:.2f}; "
                         f"{r.share_a_in_b:.0%} of {r.task_a} in {r.task_b}, {r.share_b_in_a:.0%} the other way")
    return "\n".join(lines) + "\n"


def summary_lines(result: Result) -> list[str]:
    """The CLI's summary: clean model first, then circuits, ablation and overlap (the report's sections)."""
    return [line for line in result.report.splitlines() if line.strip()]


def export_graphs(result: Result, folder, d_model: int | None = None) -> list:
    """Each task's circuit as an EAP-IG / MIB graph JSON file ``{folder}/{task}.json``; returns the paths."""
    import json
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    circuits = result.tables["circuits"]
    for task in result.summary["tasks"]:
        rows = circuits[circuits.task == task]
        heads = [(int(a), int(b)) for a, b in zip(rows["layer"], rows["head"], strict=True)]
        graph = circuit_graph(result.tensors[f"scores.{task}"], heads, d_model)
        path = folder / f"{task}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(graph), encoding="utf-8")
        tmp.replace(path)  # never a half-written graph under the final name
        written.append(path)
    return written
