"""Accumulators that merge, shards of a pass, and the one driver that runs units of work into accumulators.

Every per-run reduction speaks one protocol (baukit's ``runningstats`` style): ``add(...)`` a batch,
``state_dict()``, ``load_state_dict(state)`` and ``merge(state)``, which folds in the state of the same
accumulator run over other inputs. Merging is exact for counts and rows and to float tolerance for sums, so a
pass split over ranks, job-array shards or a killed-and-resumed run gives the tables of one uninterrupted run.

``Mergeable`` gives the last three to a class whose ``merging`` names its fields by how they combine:

- ``sum``: tensors, numpy arrays or numbers that add;
- ``rows``: lists that concatenate (per-prompt records: the shards are merged in input order);
- ``counter``: ``dict`` of key -> number that add key by key (keys keep their order of first sight);
- ``set``: sets that unite;
- ``fill``: tensors where NaN means "not seen here": merging takes the values another shard saw;
- ``children``: ``dict`` of key -> ``Mergeable`` that merge key by key (created on first sight by ``child``);
- ``equal``: settings that must be equal on both sides (a merge of different settings is refused).

A ``Pass`` is what an analysis hands the driver: how many units (batches) there are, a function that runs one
unit into the accumulators, and the accumulators by name. ``tally`` runs the units of one ``Shard`` (optionally
from a checkpoint, saving one every few units) and returns the accumulators; merging the shards' states and
building tables from them is the analysis' ``finish``, which never knows how the units were split.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from headlab.errors import RunStoreError
from headlab.shards import Shard

State = dict[str, Any]


KINDS = ("sum", "rows", "counter", "set", "fill", "children", "equal")


class Mergeable:
    """Mixin: ``state_dict``, ``load_state_dict`` and ``merge`` from ``merging``, a dict of field name -> how it
    combines (``sum``, ``rows``, ``counter``, ``set``, ``fill``, ``children``, ``equal``: the module docstring)."""

    merging: dict[str, str] = {}

    def child(self, name: str) -> Mergeable:
        """A new, empty member of the ``children`` field ``name`` (override when a class has such fields)."""
        raise NotImplementedError(f"{type(self).__name__} has no children field {name!r}")

    def state_dict(self) -> State:
        state: State = {}
        for name, kind in self.merging.items():
            value = getattr(self, name)
            state[name] = {k: v.state_dict() for k, v in value.items()} if kind == "children" else value
        return state

    def load_state_dict(self, state: State) -> None:
        for name, kind in self.merging.items():
            value = state[name]
            if kind == "children":
                members = {}
                for key, sub in value.items():
                    members[key] = self.child(name)
                    members[key].load_state_dict(sub)
                value = members
            elif kind == "rows":
                value = list(value)
            elif kind == "counter":
                value = dict(value)
            elif kind == "set":
                value = set(value)
            else:
                value = _copy(value)
            setattr(self, name, value)

    def merge(self, state: State) -> None:
        """Fold in the state of the same accumulator over other inputs (that come after this one's)."""
        for name, kind in self.merging.items():
            ours, theirs = getattr(self, name), state[name]
            if kind == "equal":
                if not _equal(ours, theirs):
                    raise RunStoreError(f"cannot merge {type(self).__name__}: its setting {name} differs "
                                        f"({ours!r} here, {theirs!r} there)")
            elif kind == "sum":
                if hasattr(ours, "shape") and tuple(ours.shape) != tuple(theirs.shape):
                    raise RunStoreError(f"cannot merge {type(self).__name__}.{name}: shapes {tuple(ours.shape)} "
                                        f"and {tuple(theirs.shape)} differ")
                setattr(self, name, ours + theirs)
            elif kind == "rows":
                ours.extend(theirs)
            elif kind == "counter":
                for key, value in theirs.items():
                    ours[key] = ours.get(key, 0) + value
            elif kind == "set":
                ours.update(theirs)
            elif kind == "fill":
                setattr(self, name, torch.where(torch.isnan(ours), theirs, ours))
            elif kind == "children":
                for key, sub in theirs.items():
                    if key not in ours:
                        ours[key] = self.child(name)
                    ours[key].merge(sub)
            else:
                raise ValueError(f"{type(self).__name__}.{name}: unknown kind {kind!r}, one of {KINDS}")


def _copy(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, np.ndarray):
        return value.copy()
    return value


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


# ---------------------------------------------------------------------------------------------
# The driver


@dataclass
class Pass:
    """One sharded pass of an analysis: ``n_units`` units (batches), ``step(i)`` runs unit ``i`` into
    ``accumulators``. ``name`` tells an analysis' passes apart in checkpoints and partial runs."""

    name: str
    n_units: int
    step: Callable[[int], None]
    accumulators: dict[str, Any]

    def state_dict(self) -> dict[str, State]:
        return {name: acc.state_dict() for name, acc in self.accumulators.items()}

    def load_state_dict(self, states: dict[str, State]) -> None:
        for name, acc in self.accumulators.items():
            acc.load_state_dict(states[name])

    def merge(self, states: dict[str, State]) -> None:
        for name, acc in self.accumulators.items():
            acc.merge(states[name])


@dataclass
class Checkpoint:
    """Where passes save their states every ``every`` units (one sub-folder per pass), to resume from."""

    folder: Path
    every: int = 20
    create: Callable[[], None] | None = None  # called once, before the first save (makes and claims the folder)

    def load(self, name: str) -> tuple[int, dict[str, State]] | None:
        folder = self.folder / name
        if not (folder / STATES_JSON).is_file():
            return None
        states, meta = load_states(folder)
        return int(meta["done"]), states

    def save(self, name: str, done: int, states: dict[str, State]) -> None:
        if self.create is not None:
            self.create()
            self.create = None
        save_states(self.folder / name, states, {"done": done})


def tally(work: Pass, shard: Shard = Shard(), checkpoint: Checkpoint | None = None,
          on_unit: Callable[[int], None] | None = None) -> Pass:
    """Run the units of ``shard`` into ``work``'s accumulators, from ``checkpoint`` if it holds a state of this pass,
    saving one every ``checkpoint.every`` units and at the end. ``on_unit(i)`` after each unit. Returns ``work``."""
    units = shard.units(work.n_units)
    start = units.start
    if checkpoint is not None:
        saved = checkpoint.load(work.name)
        if saved is not None:
            done, states = saved
            if not units.start <= done <= units.stop:
                raise RunStoreError(f"the checkpoint in {checkpoint.folder} has {done} units of pass {work.name!r} "
                                    f"done, outside this shard's {units.start}…{units.stop}: it belongs to another "
                                    "run")
            work.load_state_dict(states)
            start = done
            for unit in range(units.start, done):
                if on_unit:
                    on_unit(unit)
    for unit in range(start, units.stop):
        work.step(unit)
        if on_unit:
            on_unit(unit)
        if checkpoint is not None and ((unit + 1 - units.start) % checkpoint.every == 0 or unit + 1 == units.stop):
            checkpoint.save(work.name, unit + 1, work.state_dict())
    return work


def merge_all(states: Iterable[dict[str, State]], into: Pass) -> Pass:
    """``into`` (empty accumulators) with every shard's states folded in, in shard order."""
    for i, state in enumerate(states):
        if i == 0:
            into.load_state_dict(state)
        else:
            into.merge(state)
    return into


# ---------------------------------------------------------------------------------------------
# How this process takes part: the analysis calls ``run_pass`` and never knows


class ShardDone(Exception):  # noqa: N818 - a hand-off, not a failure
    """Raised by ``run_pass`` in a job-array shard: this process's part is done; ``states`` go to a partial run."""

    def __init__(self, name: str, states: dict[str, State]):
        super().__init__(f"shard of pass {name!r} done")
        self.name, self.states = name, states


@dataclass
class Scale:
    """How the passes of one run are split. Modes:

    - ``whole``: every unit here (the default);
    - ``ranks``: torch.distributed ranks; each runs its shard, ``exchange`` gives every rank every rank's states
      (``all_gather``), and each merges them in rank order and goes on with the whole pass's accumulators (so a
      later pass that depends on an earlier one's result sees the same thing everywhere; rank 0 saves the run);
    - ``shard``: a job-array task; runs its shard of the analysis' first pass, then ``run_pass`` raises
      ``ShardDone`` with the states (later passes run when the parts are merged);
    - ``merge``: ``states`` holds the parts' states of the first pass, in shard order: merged, not computed; later
      passes run whole.

    ``checkpoint`` (any mode but merge) saves and resumes each pass's states."""

    mode: str = "whole"
    shard: Shard = Shard()
    checkpoint: Checkpoint | None = None
    exchange: Callable[[dict[str, State]], list[dict[str, State]]] | None = None
    states: list[dict[str, State]] | None = None
    passes: list[str] = field(default_factory=list)

    def run(self, work: Pass, on_unit: Callable[[int], None] | None = None) -> Pass:
        first = not self.passes
        if work.name in self.passes:
            raise ValueError(f"pass {work.name!r} runs twice in one analysis: name each pass once")
        self.passes.append(work.name)
        if self.mode == "whole" or (self.mode in ("shard", "merge") and not first):
            return tally(work, Shard(), self.checkpoint, on_unit)
        if self.mode == "merge":
            return merge_all(self.states or [], work)
        tally(work, self.shard, self.checkpoint, on_unit)
        if self.mode == "shard":
            raise ShardDone(work.name, work.state_dict())
        if self.mode != "ranks" or self.exchange is None:
            raise ValueError(f"unknown scale mode {self.mode!r}")
        # Every rank merges every rank's states in rank order (rank 0's first: input order) and goes on.
        return merge_all(self.exchange(work.state_dict()), work)


_SCALE: ContextVar[Scale | None] = ContextVar("headlab_scale", default=None)


@contextmanager
def scaled(scale: Scale) -> Iterator[Scale]:
    """Run the analyses inside under ``scale`` (the CLI sets it from ``--shard``, ``--resume`` and torchrun)."""
    token = _SCALE.set(scale)
    try:
        yield scale
    finally:
        _SCALE.reset(token)


def run_pass(work: Pass, on_unit: Callable[[int], None] | None = None) -> Pass:
    """Run ``work`` as this process's scale says (every unit, by default) and return it with the accumulators of
    the whole pass; in a job-array shard this raises ``ShardDone`` instead."""
    scale = _SCALE.get()
    return tally(work, on_unit=on_unit) if scale is None else scale.run(work, on_unit)


# ---------------------------------------------------------------------------------------------
# States on disk: tensors in safetensors, everything else in JSON (no pickle: safe to read from anyone)


STATES_TENSORS = "states.safetensors"
STATES_JSON = "states.json"


def save_states(folder: Path, states: dict[str, State], meta: dict) -> None:
    """Write ``states`` (and ``meta``) to ``folder``, atomically per file (the JSON, written last, names the
    tensors, so a reader never pairs a new JSON with old tensors)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(states, tensors, "s")
    generation = int(meta.get("done", 0))
    tensor_file = f"{generation}.{STATES_TENSORS}"
    tmp = folder / f".{tensor_file}.tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, folder / tensor_file)
    doc = {"meta": meta, "tensors": tensor_file, "states": tree}
    tmp_json = folder / f".{STATES_JSON}.tmp"
    tmp_json.write_text(json.dumps(doc), encoding="utf-8")
    os.replace(tmp_json, folder / STATES_JSON)
    for old in folder.glob(f"*.{STATES_TENSORS}"):
        if old.name != tensor_file:
            old.unlink(missing_ok=True)


def load_states(folder: Path) -> tuple[dict[str, State], dict]:
    """``(states, meta)`` as ``save_states`` wrote them."""
    from safetensors.torch import load_file

    try:
        doc = json.loads((folder / STATES_JSON).read_text(encoding="utf-8"))
        name = doc["tensors"]
        if "/" in name or name.startswith("."):
            raise ValueError(f"bad tensor file name {name!r}")
        tensors = load_file(str(folder / name))
        return _decode(doc["states"], tensors), doc["meta"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise RunStoreError(f"the accumulator states in {folder} cannot be read ({err}): the run is damaged; run "
                            "it again") from err


def _encode(value, tensors: dict[str, torch.Tensor], path: str):
    """A JSON tree: tensors and arrays become references into ``tensors``; dicts keep their key types."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu()
        return {"$tensor": path}
    if isinstance(value, np.ndarray):
        tensors[path] = torch.from_numpy(np.ascontiguousarray(value))
        return {"$array": path}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):  # records: plain JSON objects
            return {k: _encode(v, tensors, f"{path}.{i}") for i, (k, v) in enumerate(value.items())}
        return {"$dict": [[_key(k), _encode(v, tensors, f"{path}.{i}")] for i, (k, v) in enumerate(value.items())]}
    if isinstance(value, (set, frozenset)):
        return {"$set": sorted(value, key=repr)}
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in an accumulator state")


def _key(key):
    if isinstance(key, (bool, int, float, str)) or key is None:
        return key
    if isinstance(key, tuple):
        return {"$tuple": list(key)}
    raise TypeError(f"cannot store a dict key of type {type(key).__name__}")


def _decode(value, tensors: dict[str, torch.Tensor]):
    if isinstance(value, dict):
        if "$tensor" in value:
            return tensors[value["$tensor"]]
        if "$array" in value:
            return tensors[value["$array"]].numpy()
        if "$dict" in value:
            return {_unkey(k): _decode(v, tensors) for k, v in value["$dict"]}
        if "$set" in value:
            return set(_unkey(v) for v in value["$set"])
        if "$tuple" in value:
            return tuple(_decode(v, tensors) for v in value["$tuple"])
        return {k: _decode(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    return value


def _unkey(key):
    return tuple(key["$tuple"]) if isinstance(key, dict) else key
