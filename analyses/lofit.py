"""LoFiT (Yin et al., NeurIPS 2024; methods.md §4): select heads by training per-head scalings, then train
per-head offsets on the top K, on any decoder headlab loads.

Both steps train the parameters of one ``HeadOffsets`` intervention (z' = (1 + A) ⊙ z + v before o_proj,
``[n_pairs, d_head]`` each) through ``headlab.intervene``: the same object applies the offsets later, so
training and applying cannot drift apart. The model is frozen (``requires_grad`` off, eval mode) and
bit-exact afterwards.

- ``select_heads``: A on every head (init N(0, ``init_std``)), v = 0 and not trained; loss = task loss +
  λ Σ|A|; heads ranked by ‖A[l, h]‖₂ (fp32). Returns a ``lofit-select`` Result (ranking table, curve).
- ``train_offsets``: A = 0 (not trained), v on the chosen heads (init N(0, ``init_std``)). Returns a
  ``lofit-train`` Result whose ``tensors`` are exactly what ``HeadOffsets.load(run_dir)`` reads.
- Objectives: SFT (mean negative log-likelihood of the target tokens) or DPO
  (−log σ(β[(log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))]), the frozen model as reference).
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator
from dataclasses import asdict

import pandas as pd
import plotly.graph_objects as go
import torch
import torch.nn.functional as F

from headlab.analyses.configs import LofitConfig
from headlab.errors import InputError
from headlab.interventions import HeadOffsets, intervene
from headlab.result import Result

from .lofit_batches import completion_batch
from .lofit_data import DPOItem, Item, SFTItem, data_hash

Head = tuple[int, int]


def check_items(items: list[Item], objective: str) -> None:
    kind = SFTItem if objective == "sft" else DPOItem
    if not items:
        raise InputError("no training items")
    if not all(isinstance(i, kind) for i in items):
        raise InputError(f"--objective {objective} needs {kind.__name__}s; the data holds other items")


@contextlib.contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """Model parameters without gradients and the model in eval mode (dropout off), restored on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    for p, _ in flags:
        p.requires_grad_(False)
    model.eval()
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def completion_logprobs(loaded, pairs: list[tuple[str, str]], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ log p(completion token) ``[batch]``, number of completion tokens ``[batch]``) under whatever
    interventions are in force; teacher-forced, the token at t scored by the logits at t − 1."""
    batch = completion_batch(loaded, pairs, max_tokens).to(loaded.device)
    logits = loaded.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # [batch, pos - 1, vocab]
    token_logp = logp.gather(-1, batch.input_ids[:, 1:, None])[..., 0]  # [batch, pos - 1]
    mask = batch.target_mask[:, 1:]
    return (token_logp * mask).sum(-1), mask.sum(-1)


def sft_loss(loaded, items: list[SFTItem], max_tokens: int) -> torch.Tensor:
    """Mean negative log-likelihood per target token over the batch (prompt tokens carry no loss)."""
    total, count = completion_logprobs(loaded, [(i.prompt, i.target) for i in items], max_tokens)
    return -total.sum() / count.sum()


def dpo_loss(loaded, items: list[DPOItem], reference: torch.Tensor, beta: float, max_tokens: int) -> torch.Tensor:
    """DPO loss, mean over the batch; ``reference`` ``[batch, 2]``: the frozen model's Σ log p of
    (chosen, rejected)."""
    pairs = [(i.prompt, i.chosen) for i in items] + [(i.prompt, i.rejected) for i in items]
    total, _ = completion_logprobs(loaded, pairs, max_tokens)
    chosen, rejected = total[: len(items)], total[len(items):]
    margin = (chosen - reference[:, 0].to(chosen)) - (rejected - reference[:, 1].to(chosen))
    return -F.logsigmoid(beta * margin).mean()


@torch.no_grad()
def reference_logprobs(loaded, items: list[DPOItem], batch_size: int, max_tokens: int) -> torch.Tensor:
    """``[n, 2]`` Σ log p of (chosen, rejected) under the unedited model (DPO's reference)."""
    rows = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        pairs = [(i.prompt, i.chosen) for i in chunk] + [(i.prompt, i.rejected) for i in chunk]
        total, _ = completion_logprobs(loaded, pairs, max_tokens)
        rows.append(torch.stack([total[: len(chunk)], total[len(chunk):]], dim=1).cpu())
    return torch.cat(rows)


def train_parameters(loaded, offsets: HeadOffsets, trained: list[torch.nn.Parameter], items: list[Item],
                     config: LofitConfig, l1: bool, progress: bool = False) -> pd.DataFrame:
    """Train ``trained`` (parameters of ``offsets``) on ``items``; the other parameters of ``offsets`` stay
    as they are. Returns the curve: one row per optimiser step (step, epoch, loss, task_loss, l1)."""
    config.check()
    check_items(items, config.objective)
    for p in offsets.parameters():
        p.requires_grad_(any(p is t for t in trained))
    optimizer = torch.optim.AdamW(trained, lr=config.lr, weight_decay=config.weight_decay)
    rng = random.Random(config.seed)
    rows = []
    with frozen(loaded.model):
        reference = (reference_logprobs(loaded, items, config.batch_size, config.max_tokens)
                     if config.objective == "dpo" else None)
        step = 0
        for epoch in range(config.epochs):
            order = list(range(len(items)))
            rng.shuffle(order)
            for start in range(0, len(order), config.batch_size):
                index = order[start : start + config.batch_size]
                chunk = [items[i] for i in index]
                with intervene(loaded, offsets):
                    if config.objective == "sft":
                        task = sft_loss(loaded, chunk, config.max_tokens)
                    else:
                        task = dpo_loss(loaded, chunk, reference[index], config.beta, config.max_tokens)
                penalty = offsets.A.abs().sum() if l1 else torch.zeros(())
                loss = task + config.lambda_l1 * penalty.to(task)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_value, task_value = float(loss.detach()), float(task.detach())
                rows.append({"step": step, "epoch": epoch, "loss": loss_value, "task_loss": task_value,
                             "l1": float(penalty.detach())})
                if progress:
                    print(f"epoch {epoch} step {step}: loss {loss_value:.4f} (task {task_value:.4f})", flush=True)
                step += 1
    for p in offsets.parameters():
        p.requires_grad_(False)
    return pd.DataFrame(rows)


def every_pair(arch) -> list[Head]:
    return [(layer, h) for layer in range(arch.n_layers) for h in range(arch.n_heads)]


def head_norms(offsets: HeadOffsets, arch, which: str = "A") -> torch.Tensor:
    """``[layer, head]`` ‖A‖₂ (or ‖v‖₂) in fp32; NaN where a head has no row."""
    grid = torch.full((arch.n_layers, arch.n_heads), float("nan"))
    norms = getattr(offsets, which).detach().float().norm(dim=-1).cpu()
    for (layer, h), value in zip(offsets.pairs, norms, strict=True):
        grid[layer, h] = value
    return grid


def ranking_table(norms: torch.Tensor) -> pd.DataFrame:
    """Every head by decreasing ‖A‖₂ (ties by layer, head): columns rank, layer, head, a_norm."""
    layer, head = torch.meshgrid(torch.arange(norms.shape[0]), torch.arange(norms.shape[1]), indexing="ij")
    table = pd.DataFrame({"layer": layer.flatten().numpy(), "head": head.flatten().numpy(),
                          "a_norm": norms.flatten().double().numpy()})
    table = table.sort_values("a_norm", ascending=False, kind="stable").reset_index(drop=True)
    table.insert(0, "rank", range(len(table)))
    return table


def heatmap(grid: torch.Tensor, title: str, colorbar: str) -> go.Figure:
    """Layer on y, head on x (an unsigned score: a sequential scale from 0)."""
    fig = go.Figure(go.Heatmap(z=grid.numpy(), colorscale="Viridis", zmin=0, colorbar={"title": colorbar}))
    fig.update_layout(title=title, xaxis_title="head", yaxis_title="layer")
    return fig


def curve_figure(curves: dict[str, pd.DataFrame], title: str) -> go.Figure:
    fig = go.Figure()
    for name, curve in curves.items():
        fig.add_trace(go.Scatter(x=curve["step"], y=curve["task_loss"], mode="lines", name=name))
    fig.update_layout(title=title, xaxis_title="optimiser step", yaxis_title="task loss")
    return fig


def select_heads(loaded, items: list[Item], config: LofitConfig | None = None, progress: bool = False) -> Result:
    """LoFiT step 1: ``lofit-select`` Result with ``tables['ranking']`` (every head by ‖A‖₂),
    ``tables['curve']``, ``tensors['a_norm']`` ``[layer, head]`` and ``tensors['A']`` ``[n_heads_total, d_head]``."""
    config = config or LofitConfig()
    config.check()
    check_items(items, config.objective)
    arch = loaded.arch
    generator = torch.Generator().manual_seed(config.seed)
    offsets = HeadOffsets.create(arch, every_pair(arch), init="normal", std=config.init_std, generator=generator)
    with torch.no_grad():
        offsets.v.zero_()  # step 1 trains scalings only: v = 0 and never trained
    curve = train_parameters(loaded, offsets, [offsets.A], items, config, l1=True, progress=progress)
    norms = head_norms(offsets, arch, "A")
    ranking = ranking_table(norms)
    top = [[int(r.layer), int(r.head), float(r.a_norm)] for r in ranking.head(10).itertuples()]
    summary = {"n_layers": arch.n_layers, "n_heads": arch.n_heads, "d_head": arch.head_dim,
               "objective": config.objective, "n_items": len(items), "steps": len(curve),
               "final_task_loss": float(curve["task_loss"].iloc[-1]),
               "first_task_loss": float(curve["task_loss"].iloc[0]),
               "top_heads": top, "top_head": f"{top[0][0]}.{top[0][1]}",
               # the whole ranking and curve also in manifest.json, for readers without parquet
               "ranking": [[int(r.layer), int(r.head), float(r.a_norm)] for r in ranking.itertuples()],
               "curve_task_loss": [float(x) for x in curve["task_loss"]]}
    figures = {"ranking": heatmap(norms, f"LoFiT head selection: ‖A‖₂ per head ({loaded.title})", "‖A‖₂"),
               "curve": curve_figure({"select (A on every head)": curve}, "LoFiT step 1: training curve")}
    report = (f"# LoFiT head selection on {loaded.title}\n\n{len(items)} {config.objective} items, {len(curve)} steps; "
              f"task loss {summary['first_task_loss']:.4f} -> {summary['final_task_loss']:.4f}.\n\nTop heads by "
              f"‖A‖₂: " + ", ".join(f"{layer}.{h} ({n:.4f})" for layer, h, n in top) + "\n")
    return Result("lofit-select", loaded.name, asdict(config), tables={"ranking": ranking, "curve": curve},
                  tensors={"a_norm": norms, "A": offsets.A.detach().clone()}, figures=figures, summary=summary,
                  report=report, revision=loaded.revision, input_hash=data_hash(items))


def top_pairs(ranking: pd.DataFrame, k: int) -> list[Head]:
    """The first ``k`` heads of a ranking table (best first); K larger than the ranking is refused."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"--k must be a positive number of heads, got {k!r}")
    if k > len(ranking):
        raise InputError(f"--k {k} is larger than the ranking ({len(ranking)} heads); use --k {len(ranking)} or less")
    return [(int(r.layer), int(r.head)) for r in ranking.head(k).itertuples()]


def load_ranking(path, loaded=None) -> pd.DataFrame:
    """The ranking table of a ``lofit-select`` run (checked against ``loaded``'s heads when given)."""
    run = Result.load(path)
    if run.analysis != "lofit-select" or "ranking" not in run.tables:
        raise InputError(f"{path} is a {run.analysis} run, not a `headlab lofit select` run (no ranking table)")
    if loaded is not None:
        shape = (run.summary.get("n_layers"), run.summary.get("n_heads"), run.summary.get("d_head"))
        mine = (loaded.arch.n_layers, loaded.arch.n_heads, loaded.arch.head_dim)
        if shape != mine:
            raise InputError(f"the ranking in {path} is of {run.model} with (layers, heads, d_head) = {shape}; "
                             f"{loaded.name} has {mine}: select heads on this model first")
    return run.tables["ranking"]


def train_offsets(loaded, items: list[Item], pairs: list[Head], config: LofitConfig | None = None,
                  ranking: pd.DataFrame | None = None, progress: bool = False, label: str = "top") -> Result:
    """LoFiT step 2: A = 0, v trained on ``pairs`` only. A ``lofit-train`` Result whose tensors are the
    offsets (``A``, ``v`` ``[K, d_head]``, ``pairs`` ``[K, 2]``, ``model_shape``) and ``tables['curve']``."""
    config = config or LofitConfig(lr=1e-2, lambda_l1=0.0)
    config.check()
    check_items(items, config.objective)
    arch = loaded.arch
    generator = torch.Generator().manual_seed(config.seed)
    offsets = HeadOffsets.create(arch, pairs, init="normal", std=config.init_std, generator=generator)
    with torch.no_grad():
        offsets.A.zero_()  # a fresh model: scalings off, only v is trained and kept
    curve = train_parameters(loaded, offsets, [offsets.v], items, config, l1=False, progress=progress)
    v_norm = head_norms(offsets, arch, "v")
    summary = {"n_layers": arch.n_layers, "n_heads": arch.n_heads, "d_head": arch.head_dim,
               "objective": config.objective, "k": len(pairs), "heads": [list(p) for p in offsets.pairs],
               "head_set": label, "trained_parameters": len(pairs) * arch.head_dim, "n_items": len(items),
               "steps": len(curve), "first_task_loss": float(curve["task_loss"].iloc[0]),
               "final_task_loss": float(curve["task_loss"].iloc[-1])}
    run_config = {**asdict(config), "k": len(pairs), "data_hash": data_hash(items), "model": loaded.name,
                  "revision": loaded.revision, "d_head": arch.head_dim,
                  "ranking": None if ranking is None else
                  [[int(r.layer), int(r.head), float(r.a_norm)] for r in ranking.itertuples()]}
    heads = pd.DataFrame({"layer": [p[0] for p in offsets.pairs], "head": [p[1] for p in offsets.pairs],
                          "v_norm": offsets.v.detach().float().norm(dim=-1).numpy()})
    figures = {"offsets": heatmap(v_norm, f"LoFiT offsets: ‖v‖₂ on {len(pairs)} heads ({loaded.title})", "‖v‖₂"),
               "curve": curve_figure({f"train (v on {len(pairs)} {label} heads)": curve},
                                     "LoFiT step 2: training curve")}
    report = (f"# LoFiT offsets on {loaded.title}\n\nv trained on {len(pairs)} heads ({label}): "
              + ", ".join(f"{layer}.{h}" for layer, h in offsets.pairs)
              + f"\n\n{len(pairs) * arch.head_dim} trained parameters; task loss {summary['first_task_loss']:.4f} -> "
              f"{summary['final_task_loss']:.4f}.\n\n"
              "Apply: `with headlab.intervene(loaded, HeadOffsets.load(run_dir))`.\n")
    return Result("lofit-train", loaded.name, run_config, tables={"curve": curve, "heads": heads},
                  tensors=offsets.tensors(), figures=figures, summary=summary, report=report,
                  revision=loaded.revision, input_hash=data_hash(items))


def offsets_of(result: Result) -> HeadOffsets:
    """The ``HeadOffsets`` a ``lofit-train`` Result holds (what ``HeadOffsets.load(run_dir)`` gives)."""
    t = result.tensors
    shape = tuple(int(x) for x in t["model_shape"].tolist()) if "model_shape" in t else None
    return HeadOffsets([tuple(int(x) for x in p) for p in t["pairs"].tolist()], torch.nn.Parameter(t["A"].clone()),
                       torch.nn.Parameter(t["v"].clone()), "all", shape)


def random_pairs(arch, k: int, seed: int, exclude: list[Head] = ()) -> list[Head]:
    """``k`` heads drawn uniformly (seeded), none of ``exclude``."""
    pool = [p for p in every_pair(arch) if p not in set(exclude)]
    if k > len(pool):
        raise InputError(f"cannot draw {k} random heads from {len(pool)}")
    return random.Random(seed).sample(pool, k)


def binomial_summary(correct: list[bool]) -> dict:
    """Accuracy, its standard error sqrt(p(1-p)/n) and the Wilson 95% interval."""
    n = len(correct)
    p = sum(correct) / n
    z = 1.959964
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {"accuracy": p, "se": math.sqrt(p * (1 - p) / n), "ci95": [centre - half, centre + half], "n": n}
