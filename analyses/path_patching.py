"""Head scores of a task: the metric, activation patching, attribution patching and exact path patching.

Everything acts on z (``blocks.{l}.attn.hook_z``, ``[batch, pos, head, d_head]``) at the final
position, the position where the answer is read. Prompts are left-padded (``TaskBatch``), so the
final position is column -1 of every row.

Metric (Merullo et al. 2024, after Wang et al. 2023): LD = logit(answer) - logit(cf_answer) at the
final position; a head's score = 100 · (LD_patched - LD_clean) / (LD_cf - LD_clean), with LDs averaged
over the prompts, so that 100 means "patching this head alone turns the clean model into the
counterfactual one" and an important head scores positive.

- activation patching: z of one head at the final position <- its value in the counterfactual run;
- attribution patching: the first-order estimate of the same, (dLD/dz) · (z_cf - z_clean), all heads
  from one forward and one backward pass per batch;
- path patching (exact, not linear): the sender's z at the final position <- counterfactual, every
  other head's z there frozen to its clean value (MLPs recomputed unless ``freeze_mlps``); the
  receivers' inputs are recorded and a fresh clean run patches only them. Receivers: the logits
  (default: the first run's final logits are the receivers' input then), or the q / k / v projections
  of chosen heads at the final position. On a GQA model a k or v receiver is a kv head (its
  projection is shared by the query heads of its group, so patching it changes all of them).
Senders are batched: the prompt batch is tiled once per sender of a chunk, each tile with its own
head patched, so one forward pass scores ``senders_per_pass`` heads.

Each method is a set of units of work (``SenderPatching``, ``AttributionPatching``) whose accumulators merge
(``headlab.tally``): the public functions run every unit here; ``analyze_circuits`` hands them to ``run_pass``, so
a data-parallel, sharded or resumed run gives the scores of one run. Per-chunk sums are kept per chunk and added in
chunk order at the end, so the scores do not depend, to the bit, on how the units were split.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from headlab.errors import InputError, RunStoreError
from headlab.interventions import intervene
from headlab.interventions.z_site import BoundZEdit, ZCall, ZEdit
from headlab.probes.activations import _qkv_readers
from headlab.tally import Mergeable, Pass, tally

from .circuit_tasks import TaskBatch

Head = tuple[int, int]


def all_heads(arch) -> list[Head]:
    return [(layer, h) for layer in range(arch.n_layers) for h in range(arch.n_heads)]


def z_names(arch) -> list[str]:
    return [f"blocks.{layer}.attn.hook_z" for layer in range(arch.n_layers)]


def logit_diff(logits: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
    """``[batch, vocab]`` final-position logits -> ``[batch]`` logit(answer) - logit(cf_answer)."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    answer, cf = batch.answer_ids.to(logits.device), batch.cf_answer_ids.to(logits.device)
    return (logits[rows, answer] - logits[rows, cf]).float()


@dataclass
class Runs:
    """The clean and counterfactual runs of a batch: final-position z ``[batch, layer, head, d_head]``,
    LD ``[batch]`` of each, and whether the clean model ranks the answer above the cf answer."""

    clean_z: torch.Tensor
    cf_z: torch.Tensor
    ld_clean: torch.Tensor
    ld_cf: torch.Tensor
    top1: torch.Tensor  # [batch] bool: the answer is the clean model's argmax token


def final_logits(loaded, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    device = loaded.device
    return loaded.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, -1].float()


@torch.no_grad()
def clean_and_cf(loaded, batch: TaskBatch) -> Runs:
    """One clean and one counterfactual forward pass, keeping z at the final position."""
    from headlab.probes import trace

    arch, out = loaded.arch, {}
    for which, ids in (("clean", batch.clean_ids), ("cf", batch.cf_ids)):
        with trace(loaded, names=z_names(arch), stats=False) as t:
            logits = final_logits(loaded, ids, batch.attention_mask)
        z = torch.stack([t[name][:, -1] for name in z_names(arch)], dim=1)  # [batch, layer, head, d_head]
        out[which] = (z.float(), logits)
    ld_clean = logit_diff(out["clean"][1], batch)
    top1 = out["clean"][1].argmax(-1).cpu() == batch.answer_ids
    return Runs(out["clean"][0], out["cf"][0], ld_clean, logit_diff(out["cf"][1], batch), top1)


class FinalZMix(ZEdit):
    """z at the final position, per batch row and head: the counterfactual value where ``patch``, the
    clean value where ``freeze``, the computed value elsewhere. Not a registered intervention: the
    patching loops build it.

    ``clean_z`` / ``cf_z``: ``[batch, layer, head, d_head]``; ``patch`` / ``freeze``: ``[batch, layer, head]`` bool.
    """

    site = "z"

    def __init__(self, clean_z: torch.Tensor, cf_z: torch.Tensor, patch: torch.Tensor, freeze: torch.Tensor,
                 final_column: int):
        self.clean_z, self.cf_z, self.patch, self.freeze = clean_z, cf_z, patch, freeze
        self.final_column = final_column  # the prompt's last column: a full prefill or a one-token step

    def layers(self) -> list[int]:
        """The layers where some row patches or freezes a head."""
        touched = (self.patch | self.freeze).any(dim=(0, 2))  # [layer]
        return [int(layer) for layer in touched.nonzero().flatten()]

    def bind(self, arch) -> BoundZEdit:
        if self.clean_z.shape[1:3] != (arch.n_layers, arch.n_heads):
            raise InputError(f"FinalZMix: z of shape {list(self.clean_z.shape)} does not fit a model with "
                             f"{arch.n_layers} layers and {arch.n_heads} heads")
        # Every head of a touched layer: the masks pick heads per row, which one head list cannot say.
        return BoundZEdit(self, {layer: list(range(arch.n_heads)) for layer in self.layers()})

    def edit_z(self, z: torch.Tensor, call: ZCall, bound: BoundZEdit) -> torch.Tensor:
        if call.seen + z.shape[1] - 1 != self.final_column:  # this call does not hold the final position
            return z
        layer = call.layer
        last = z[:, -1]
        patch, freeze = self.patch[:, layer, :, None].to(z.device), self.freeze[:, layer, :, None].to(z.device)
        new = torch.where(freeze, self.clean_z[:, layer].to(z.device, z.dtype), last)
        new = torch.where(patch, self.cf_z[:, layer].to(z.device, z.dtype), new)
        return torch.cat([z[:, :-1], new[:, None]], dim=1)


def _tile(x: torch.Tensor, k: int) -> torch.Tensor:
    """Each row ``k`` times in a row (prompt-major: row ``b · k + s`` is prompt b for sender s), the order
    of ``Cache.batch_repeat_interleave``."""
    return x.repeat_interleave(k, dim=0)


def _masks(arch, senders: Sequence[Head], n: int, freeze_others: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiled masks ``[n · len(senders), layer, head]``: row b · k + s patches sender s (and freezes the rest)."""
    patch = torch.zeros(len(senders), arch.n_layers, arch.n_heads, dtype=torch.bool)
    for s, (layer, h) in enumerate(senders):
        patch[s, layer, h] = True
    freeze = ~patch if freeze_others else torch.zeros_like(patch)
    return patch.repeat(n, 1, 1), freeze.repeat(n, 1, 1)


@contextlib.contextmanager
def _frozen_mlps(loaded, runs_mlp: dict[int, torch.Tensor] | None) -> Iterator[None]:
    """MLP outputs at the final position <- their clean values ``{layer: [batch, d_model]}`` (None: no-op)."""
    handles = []
    if runs_mlp is not None:
        for layer, clean in runs_mlp.items():
            def hook(module, args, output, clean=clean):
                return torch.cat([output[:, :-1], clean.to(output.device, output.dtype)[:, None]], dim=1)

            handles.append(loaded.arch.mlp(layer).register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def clean_mlp_out(loaded, batch: TaskBatch) -> dict[int, torch.Tensor]:
    from headlab.probes import trace

    names = [f"blocks.{layer}.hook_mlp_out" for layer in range(loaded.arch.n_layers)]
    with trace(loaded, names=names, stats=False) as t:
        final_logits(loaded, batch.clean_ids, batch.attention_mask)
    return {layer: t[name][:, -1] for layer, name in enumerate(names)}


Receiver = tuple[int, int, str]  # (layer, head, "q" | "k" | "v"); k / v name a kv head


def _check_receivers(arch, receivers: Sequence[Receiver]) -> None:
    for item in receivers:
        if not (isinstance(item, tuple | list) and len(item) == 3 and item[2] in ("q", "k", "v")):
            raise InputError(f"a receiver is (layer, head, 'q' | 'k' | 'v'), got {item!r}")
        layer, head, part = item
        n = arch.n_heads if part == "q" else arch.n_kv_heads
        if not 0 <= layer < arch.n_layers or not 0 <= head < n:
            raise InputError(f"receiver {item!r} does not exist: layers 0..{arch.n_layers - 1}, "
                             f"{'heads' if part == 'q' else 'kv heads'} 0..{n - 1}")


def _projection_sites(loaded, receivers: Sequence[Receiver]) -> dict[tuple[int, str], tuple[torch.nn.Module, int]]:
    """(layer, part) -> (module whose output holds the projection, column offset of the part in it)."""
    arch, sites = loaded.arch, {}
    for layer, _, part in receivers:
        readers = _qkv_readers(arch.attention(layer), arch)
        module = readers[f"hook_{part}"][0]
        fused = sum(readers[f"hook_{p}"][0] is module for p in "qkv") > 1
        offset = {"q": 0, "k": 1, "v": 2}[part] * arch.n_heads * arch.head_dim if fused else 0
        sites[(layer, part)] = (module, offset)
    return sites


@contextlib.contextmanager
def _projection_hooks(loaded, receivers: Sequence[Receiver],
                      values: dict[Receiver, torch.Tensor] | None) -> Iterator[dict[Receiver, torch.Tensor]]:
    """Record (``values`` None) or patch the receivers' projections at the final position.

    Yields ``{receiver: [batch, d_head]}`` filled by a recording pass."""
    d = loaded.arch.head_dim
    sites = _projection_sites(loaded, receivers)
    by_module: dict[torch.nn.Module, list[tuple[Receiver, int]]] = {}
    for receiver in receivers:
        module, offset = sites[(receiver[0], receiver[2])]
        by_module.setdefault(module, []).append((receiver, offset + receiver[1] * d))
    recorded: dict[Receiver, torch.Tensor] = {}

    def make(items):
        def hook(module, args, output):
            if values is None:
                for receiver, start in items:
                    recorded[receiver] = output[:, -1, start:start + d].detach().clone()
                return None
            last = output[:, -1].clone()
            for receiver, start in items:
                last[:, start:start + d] = values[receiver].to(last.device, last.dtype)
            return torch.cat([output[:, :-1], last[:, None]], dim=1)

        return hook

    handles = [module.register_forward_hook(make(items)) for module, items in by_module.items()]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


def _score(ld_patched: torch.Tensor, runs: Runs) -> float:
    """100 · (mean LD_patched - mean LD_clean) / (mean LD_cf - mean LD_clean)."""
    denominator = float(runs.ld_cf.mean() - runs.ld_clean.mean())
    if abs(denominator) < 1e-6:
        raise InputError("the clean and counterfactual runs have the same mean logit difference; the patching "
                         "score is undefined (is the counterfactual answer the clean answer?)")
    return 100.0 * float(ld_patched.mean() - runs.ld_clean.mean()) / denominator


@dataclass
class Accumulator(Mergeable):
    """Sums of per-prompt LDs over batches, so a score over all prompts is one ratio of means. Mergeable: the
    sums of other prompts (another shard's) add."""

    merging = {"ld_clean": "sum", "ld_cf": "sum", "n": "sum"}

    ld_clean: float = 0.0
    ld_cf: float = 0.0
    n: int = 0

    def add(self, runs: Runs) -> None:
        self.ld_clean += float(runs.ld_clean.sum())
        self.ld_cf += float(runs.ld_cf.sum())
        self.n += len(runs.ld_clean)

    def scores(self, patched_sums: torch.Tensor) -> torch.Tensor:
        """``[...]`` sums of patched LDs -> scores ×100 (see ``_score``)."""
        clean, cf = self.ld_clean / self.n, self.ld_cf / self.n
        if abs(cf - clean) < 1e-6:
            raise InputError("the clean and counterfactual runs have the same mean logit difference; the patching "
                             "score is undefined (is the counterfactual answer the clean answer?)")
        return 100.0 * (patched_sums / self.n - clean) / (cf - clean)


class Filled(Mergeable):
    """``values [n_rows, *shape]``, each row (or part of one) written by a unit of a pass, NaN until then, and
    ``done``, the units that ran. Merging takes what another shard wrote (``fill``; rows are never written twice),
    so ``total`` adds the rows in row order whatever the split: bit for bit the sum of one loop over the rows
    (a ``sum`` accumulator would add per-shard partial sums, in another order). A merge that lacks a shard's
    units is refused instead of read as NaN."""

    merging = {"values": "fill", "done": "set"}

    def __init__(self, n_rows: int, shape: Sequence[int], n_units: int, dtype: torch.dtype = torch.float32):
        self.values = torch.full((n_rows, *shape), float("nan"), dtype=dtype)
        self.done: set[int] = set()
        self.n_units = n_units  # how many units write here: the check of ``complete``

    def put(self, unit: int, row: int, values: torch.Tensor | float, where: slice | None = None) -> None:
        """Unit ``unit`` writes ``values`` into ``values[row]`` (``values[row, where]`` with ``where``)."""
        if where is None:
            self.values[row] = values
        else:
            self.values[row, where] = values
        self.done.add(unit)

    def complete(self) -> torch.Tensor:
        """``values``, once every unit has written its part (``RunStoreError`` if a shard is missing)."""
        if len(self.done) != self.n_units:
            raise RunStoreError(f"{self.n_units - len(self.done)} of {self.n_units} units of a pass are missing "
                                "from the merged states: merge the states of every shard")
        return self.values

    def total(self) -> torch.Tensor:
        """``[*shape]`` the sum over rows, added in row order from zero (as ``sums += row`` in a loop)."""
        total = torch.zeros(self.values.shape[1:], dtype=self.values.dtype)
        for row in self.complete():
            total += row
        return total


class Stepper:
    """Final-position logits ``[k · batch, vocab]`` of a batch tiled ``k`` times.

    Every edit of these loops acts at the final position only, so every earlier position is the clean
    run's in every tile: with ``use_cache`` the clean prefix runs once per batch into a KV cache, and each
    patched pass is one step of one token over a copy of it (exact; ~T times fewer token-forwards).
    Without it (or when a prompt is one token long) each pass is a full forward."""

    def __init__(self, loaded, batch: TaskBatch, use_cache: bool = True):
        self.loaded, self.batch, self.cache = loaded, batch, None
        mask = batch.attention_mask
        if use_cache and mask.shape[1] > 1 and bool((mask[:, :-1].sum(dim=1) > 0).all()):
            device = loaded.device
            with torch.no_grad():
                out = loaded.model(input_ids=batch.clean_ids[:, :-1].to(device), attention_mask=mask[:, :-1].to(device),
                                   use_cache=True)
            self.cache = out.cache  # transformers 5 names it cache (past_key_values before)

    def logits(self, k: int) -> torch.Tensor:
        ids, mask = _tile(self.batch.clean_ids, k), _tile(self.batch.attention_mask, k)
        if self.cache is None:
            return final_logits(self.loaded, ids, mask)
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(k)
        device = self.loaded.device
        out = self.loaded.model(input_ids=ids[:, -1:].to(device), attention_mask=mask.to(device),
                                cache=cache, use_cache=True)
        return out.logits[:, -1].float()


def _sender_group(loaded, batch: TaskBatch, runs: Runs, senders: Sequence[Head], freeze_others: bool,
                  run_pass: Callable) -> torch.Tensor:
    """``[len(senders)]`` sums over the batch of the LD of each sender's patched pass: one forward pass of the
    batch tiled once per sender.

    ``run_pass(tiled_batch, mix, k)`` runs the model with ``mix`` (a ``FinalZMix``) installed where it
    needs it and returns ``[k · batch]`` LDs."""
    n, k = len(batch), len(senders)
    final_column = batch.clean_ids.shape[1] - 1
    patch, freeze = _masks(loaded.arch, senders, n, freeze_others)
    mix = FinalZMix(_tile(runs.clean_z, k), _tile(runs.cf_z, k), patch, freeze, final_column)
    ids, mask = _tile(batch.clean_ids, k), _tile(batch.attention_mask, k)
    tiled = TaskBatch(batch.name, ids, ids, mask, _tile(batch.answer_ids, k), _tile(batch.cf_answer_ids, k))
    with torch.no_grad():
        ld = run_pass(tiled, mix, k)
    return ld.view(n, k).sum(dim=0).cpu()


def _pass_bar(enabled: bool, desc: str, total: int):
    """A bar over every unit (for the sender methods every patched pass, prompt chunks x sender groups: with a
    few prompts there is one prompt chunk, and a bar over chunks would sit at 0 for the whole run)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="pass", leave=False, disable=not enabled)


def _run_here(name: str, work: SenderPatching | AttributionPatching, progress: bool, desc: str) -> torch.Tensor:
    """Every unit of ``work`` in this process (never under the caller's ``Scale``: these functions are parts of
    other analyses' passes, or called directly), with a bar; the scores."""
    bar = _pass_bar(progress, desc, work.n_units)
    try:
        tally(work.as_pass(name), on_unit=lambda _unit: bar.update(1))
    finally:
        bar.close()
    return work.scores()


class SenderPatching:
    """Activation or exact path patching of ``senders`` on ``batch`` as units of work: unit ``u`` patches
    sender group ``u % n_groups`` (``senders_per_pass`` heads, one forward pass of the chunk tiled once per
    sender) on prompt chunk ``u // n_groups``. A chunk's clean and counterfactual runs (and prefix cache) are
    computed by the first of its units that runs in this process and kept for the chunk's next units, so a
    whole run costs what one loop over the chunks did, and a shard that starts inside a chunk recomputes them
    (the same numbers: the chunk is the same batch).

    ``path``: exact path patching (every other head's final z frozen to clean; ``receivers``, ``freeze_mlps``:
    see ``path_patching``); else activation patching. Accumulators: ``ld`` (clean / cf LD sums, added by each
    chunk's first group) and ``sums`` (``[chunk, sender]`` patched LD sums)."""

    def __init__(self, loaded, batch: TaskBatch, senders: Sequence[Head], *, path: bool,
                 receivers: Sequence[Receiver] | None = None, freeze_mlps: bool = False, batch_size: int = 32,
                 senders_per_pass: int = 9, use_cache: bool = True):
        self.loaded, self.senders, self.path = loaded, list(senders), path
        self.receivers, self.freeze_mlps, self.use_cache = receivers, freeze_mlps, use_cache
        self.senders_per_pass = senders_per_pass
        self.chunks = batch.chunks(batch_size)
        # at least one group per chunk: with no sender the chunk's clean runs still count (scores of no head)
        self.n_groups = max(1, -(-len(self.senders) // senders_per_pass))
        self.n_units = len(self.chunks) * self.n_groups
        self.ld = Accumulator()
        self.sums = Filled(len(self.chunks), (len(self.senders),), self.n_units)
        self._prepared: tuple[int, Runs, dict[int, torch.Tensor] | None, Stepper] | None = None

    @property
    def accumulators(self) -> dict[str, Mergeable]:
        return {"ld": self.ld, "sums": self.sums}

    def as_pass(self, name: str) -> Pass:
        return Pass(name, self.n_units, self.step, self.accumulators)

    def _prepare(self, c: int) -> tuple[Runs, dict[int, torch.Tensor] | None, Stepper]:
        """Chunk ``c``'s clean / cf runs, clean MLP outputs (``freeze_mlps``) and prefix cache, kept for its next
        units (one chunk at a time: units run chunk by chunk)."""
        if self._prepared is None or self._prepared[0] != c:
            self._prepared = None  # free the previous chunk's cache before building this one's
            part = self.chunks[c]
            runs = clean_and_cf(self.loaded, part)
            mlps = clean_mlp_out(self.loaded, part) if self.path and self.freeze_mlps else None
            self._prepared = (c, runs, mlps, Stepper(self.loaded, part, self.use_cache))
        return self._prepared[1:]

    def step(self, unit: int) -> None:
        c, g = divmod(unit, self.n_groups)
        part = self.chunks[c]
        runs, mlps, stepper = self._prepare(c)
        if g == 0:
            self.ld.add(runs)
        start = g * self.senders_per_pass
        group = self.senders[start:start + self.senders_per_pass]
        if group:
            run = self._path_pass if self.path else self._activation_pass
            sums = _sender_group(self.loaded, part, runs, group, self.path,
                                 lambda tiled, mix, k: run(tiled, mix, k, mlps, stepper))
            self.sums.put(unit, c, sums, slice(start, start + len(group)))
        else:
            self.sums.done.add(unit)
        if unit + 1 == self.n_units:
            self.release()  # the last unit: nothing more reads the cache

    def release(self) -> None:
        """Drop the kept chunk's runs and prefix cache (a shard's last unit is not the pass's)."""
        self._prepared = None

    def _activation_pass(self, tiled: TaskBatch, mix: FinalZMix, k: int, mlps, stepper: Stepper) -> torch.Tensor:
        with intervene(self.loaded, mix):
            return logit_diff(stepper.logits(k), tiled)

    def _path_pass(self, tiled: TaskBatch, mix: FinalZMix, k: int, mlps: dict[int, torch.Tensor] | None,
                   stepper: Stepper) -> torch.Tensor:
        loaded, receivers = self.loaded, self.receivers
        with intervene(loaded, mix), _frozen_mlps(loaded, {i: _tile(v, k) for i, v in mlps.items()}
                                                  if mlps else None):
            if receivers is None:  # the logits are the receivers: their input is this run's final residual
                return logit_diff(stepper.logits(k), tiled)
            with _projection_hooks(loaded, receivers, None) as recorded:
                stepper.logits(k)
        # a fresh clean run (no z edit, no frozen MLP) that patches only the receivers' inputs
        with _projection_hooks(loaded, receivers, dict(recorded)):
            return logit_diff(stepper.logits(k), tiled)

    def scores(self) -> torch.Tensor:
        """``[len(senders)]`` scores ×100, once every unit ran (or was merged in)."""
        return self.ld.scores(self.sums.total())


class AttributionPatching:
    """Attribution patching of every head on ``batch`` as units of work, one per prompt chunk (one forward and one
    backward pass). Accumulators: ``ld`` and ``sums`` (``[chunk, layer, head]`` linear estimates of the patched
    LD sums), as ``SenderPatching``."""

    def __init__(self, loaded, batch: TaskBatch, batch_size: int = 32):
        arch = loaded.arch
        self.loaded = loaded
        self.chunks = batch.chunks(batch_size)
        self.n_units = len(self.chunks)
        self.ld = Accumulator()
        self.sums = Filled(self.n_units, (arch.n_layers, arch.n_heads), self.n_units)

    @property
    def accumulators(self) -> dict[str, Mergeable]:
        return {"ld": self.ld, "sums": self.sums}

    def as_pass(self, name: str) -> Pass:
        return Pass(name, self.n_units, self.step, self.accumulators)

    def step(self, unit: int) -> None:
        loaded, arch, part = self.loaded, self.loaded.arch, self.chunks[unit]
        runs = clean_and_cf(loaded, part)
        self.ld.add(runs)
        width = arch.n_heads * arch.head_dim
        deltas = [torch.zeros(len(part), width, device=loaded.device, dtype=loaded.model.dtype, requires_grad=True)
                  for _ in range(arch.n_layers)]

        def add_delta(layer):
            def hook(module, args):
                x = args[0]
                return (torch.cat([x[:, :-1], (x[:, -1] + deltas[layer])[:, None]], dim=1), *args[1:])

            return hook

        handles = [arch.o_proj(layer).register_forward_pre_hook(add_delta(layer)) for layer in range(arch.n_layers)]
        try:
            with torch.enable_grad():
                ld = logit_diff(final_logits(loaded, part.clean_ids, part.attention_mask), part)
                grads = torch.autograd.grad(ld.sum(), deltas)
        finally:
            for handle in handles:
                handle.remove()
        grad = torch.stack(grads, dim=1).float().cpu().view(len(part), arch.n_layers, arch.n_heads, arch.head_dim)
        diff = (runs.cf_z - runs.clean_z).cpu()
        # LD_patched ≈ LD_clean + grad · diff, summed over the batch
        self.sums.put(unit, unit, (grad * diff).sum(dim=(0, 3)) + float(runs.ld_clean.sum()))

    def scores(self) -> torch.Tensor:
        """``[layer, head]`` scores ×100, once every unit ran (or was merged in)."""
        return self.ld.scores(self.sums.total())


def activation_patching(loaded, batch: TaskBatch, heads: Sequence[Head] | None = None, batch_size: int = 32,
                        senders_per_pass: int = 9, progress: bool = False, use_cache: bool = True) -> torch.Tensor:
    """``[len(heads)]`` scores ×100: z of each head at the final position <- its counterfactual value.
    ``use_cache``: see ``Stepper``."""
    heads = list(heads) if heads is not None else all_heads(loaded.arch)
    work = SenderPatching(loaded, batch, heads, path=False, batch_size=batch_size, senders_per_pass=senders_per_pass,
                          use_cache=use_cache)
    return _run_here("activation", work, progress, f"activation patching {batch.name}")


def attribution_patching(loaded, batch: TaskBatch, batch_size: int = 32, progress: bool = False) -> torch.Tensor:
    """``[layer, head]`` scores ×100, the linear estimate of activation patching at the final position:
    Σ_d dLD/dz · (z_cf - z_clean), from one forward and one backward pass per batch (no parameter grads)."""
    return _run_here("attribution", AttributionPatching(loaded, batch, batch_size), progress,
                     f"attribution patching {batch.name}")


def path_senders(arch, senders: Sequence[Head] | None, receivers: str | Sequence[Receiver]
                 ) -> tuple[list[Head], list[Receiver] | None]:
    """The senders (default every head; only those before the first receiver layer) and the receivers (None:
    the logits) of ``path_patching``, checked."""
    senders = list(senders) if senders is not None else all_heads(arch)
    if isinstance(receivers, str):
        if receivers != "logits":
            raise InputError(f"receivers must be 'logits' or [(layer, head, 'q'|'k'|'v'), ...], got {receivers!r}")
        return senders, None
    chosen = [tuple(r) for r in receivers]
    _check_receivers(arch, chosen)
    first = min(r[0] for r in chosen)
    senders = [s for s in senders if s[0] < first] if senders else senders
    if not senders:
        raise InputError(f"no sender sits before the first receiver layer {first}; senders must come earlier")
    return senders, chosen


def path_patching(loaded, batch: TaskBatch, senders: Sequence[Head] | None = None,
                  receivers: str | Sequence[Receiver] = "logits", freeze_mlps: bool = False,
                  batch_size: int = 32, senders_per_pass: int = 9, progress: bool = False,
                  use_cache: bool = True) -> torch.Tensor:
    """``[len(senders)]`` scores ×100 of each sender's effect through ``receivers`` only (exact, see the
    module docstring). ``senders``: default every head; ``receivers``: ``"logits"`` or
    ``[(layer, head, "q" | "k" | "v")]``, patched together; ``freeze_mlps``: MLP outputs at the final
    position frozen to clean too (the sender's direct path only); ``use_cache``: see ``Stepper``."""
    senders, chosen = path_senders(loaded.arch, senders, receivers)
    work = SenderPatching(loaded, batch, senders, path=True, receivers=chosen, freeze_mlps=freeze_mlps,
                          batch_size=batch_size, senders_per_pass=senders_per_pass, use_cache=use_cache)
    return _run_here("path", work, progress, f"path patching {batch.name}")
