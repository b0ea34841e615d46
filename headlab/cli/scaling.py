"""How one command's run is split: ``--shard i/n`` (job arrays), torchrun ranks, ``--resume``, and merging parts.

``scale_parameters`` are the options a scalable command adds (``@takes_model(..., scalable=True)``);
``plan_scale`` checks them before any model loads and says what this process does; ``ScalePlan`` then gives the
``Scale`` the analysis runs under (``headlab.tally``), the checkpoint folder, and how the run is written:

- a plain run, or rank 0 of a torchrun launch: the whole run, as always;
- another rank: nothing written, nothing printed (rank 0 writes the one run);
- ``--shard i/n``: a partial run holding the first pass's accumulator states (``headlab runs merge`` joins them);
- ``headlab runs merge``: the same command again, its first pass merged from the parts instead of computed.

Checkpoints: every ``--checkpoint-every`` units a pass saves its states in a hidden folder of the runs folder
(``.<run>.tmp-<hex>``, so ``runs clean`` knows it); ``--resume`` finds the newest one whose writer is gone and
whose run matches this one (command, model, settings, inputs, shard) and continues from it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import inspect
import json
import os
import shutil
import socket
import uuid
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer

from headlab.errors import InputError

PANEL = "Scale-out"
CHECKPOINT_FILE = "checkpoint.json"


def scale_parameters() -> list[inspect.Parameter]:
    """The options of a scalable command (``@takes_model(..., scalable=True)``)."""
    spec = [
        ("shard", str, typer.Option(None, help="job arrays: run shard i of n (i/n, from 0) and write a partial run; "
                                               "`headlab runs merge` joins the n parts into the run",
                                    rich_help_panel=PANEL)),
        ("resume", bool, typer.Option(False, help="continue this run (same command) from its last checkpoint, if a "
                                                  "killed run left one in the runs folder", rich_help_panel=PANEL)),
        ("checkpoint_every", int, typer.Option(20, help="save the accumulators every N batches, for --resume "
                                                        "(0: never)", rich_help_panel=PANEL)),
        ("nproc", int, typer.Option(1, help="ranks on this machine: headlab starts N processes itself, as torchrun "
                                            "--nproc-per-node N would (a GPU each when there are GPUs, else CPU "
                                            "processes)", rich_help_panel=PANEL)),
    ]
    return [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
            for name, kind, option in spec]


@dataclass(frozen=True)
class ScaleArgs:
    shard: str | None = None
    resume: bool = False
    checkpoint_every: int = 20
    nproc: int = 1
    scalable: bool = False


# ``headlab runs merge`` re-runs the parts' command with this set: the first pass's states, shard order.
_MERGING: ContextVar[MergeParts | None] = ContextVar("headlab_merging", default=None)


@dataclass
class MergeParts:
    """What ``runs merge`` hands the command it re-runs: the parts' states, prompts and their record."""

    states: list[dict]
    prompts: list[str] | None
    fingerprint: dict
    paths: list[Path]


@contextmanager
def merging(parts: MergeParts):
    token = _MERGING.set(parts)
    try:
        yield parts
    finally:
        _MERGING.reset(token)


@dataclass
class ScalePlan:
    """What this process does with the run (see the module docstring)."""

    mode: str = "whole"  # whole, ranks, shard, merge, launch (start --nproc ranks and wait)
    shard: Any = None  # headlab.tally.Shard
    ranks: Any = None  # headlab.distributed.Ranks
    resume: bool = False
    checkpoint_every: int = 20
    merge: MergeParts | None = None
    checkpoint_folder: Path | None = None
    resumed_from: Path | None = None
    backend: str | None = None  # torch.distributed's, once the ranks have joined
    nproc: int = 1
    notes: list[str] = field(default_factory=list)

    @property
    def writes(self) -> bool:
        """Whether this process writes a run (all but the ranks after 0)."""
        return self.ranks is None or self.ranks.main

    def fingerprint(self, command: str, model: str, config: Any, texts: list[str] | None,
                    inputs: Any = None) -> dict:
        """What a checkpoint must match to be resumed (and a partial run to be merged): the command, the model,
        the settings, the prompts' hash and a hash of anything else the run reads (``inputs``)."""
        from headlab.prompts import hash_inputs

        # str for what JSON cannot hold (an image, a path): the fingerprint only has to tell settings apart
        config_json = json.loads(json.dumps(dataclass_dict(config), default=str))
        return {"command": command, "model": model, "config": config_json,
                "input_hash": hash_inputs(texts) if texts is not None else None,
                "other_inputs": _digest(json.loads(json.dumps(inputs, default=str))) if inputs is not None else None,
                "shard": str(self.shard) if self.shard is not None else None}

    def open_checkpoint(self, runs_dir: Path, run_name: str, fingerprint: dict) -> Any:
        """The ``Checkpoint`` this run saves to (None in a merge or with ``--checkpoint-every 0``). With
        ``--resume``, the newest checkpoint a killed run of the same fingerprint left (the run keeps the name this
        command gives it); else a new folder."""
        from headlab.runs import TMP_MARKER, leftovers
        from headlab.tally import Checkpoint

        if self.mode in ("merge", "launch") or self.checkpoint_every <= 0:
            return None
        key = _digest(fingerprint)
        if self.resume:
            found = []
            for item in leftovers(runs_dir):
                record = item.path / CHECKPOINT_FILE
                if item.writer_alive or not record.is_file():
                    continue
                try:
                    saved = json.loads(record.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    continue
                if saved.get("key") == key:
                    found.append((record.stat().st_mtime, item.path))
            if found:
                _, folder = max(found)
                _claim(folder)
                self.checkpoint_folder = folder
                self.resumed_from = folder
                self.notes.append(f"resuming from the checkpoint in {folder}")
                return Checkpoint(folder / "passes", self.checkpoint_every)
            self.notes.append("--resume: no checkpoint of this run in the runs folder: starting from the beginning")
        folder = runs_dir.resolve() / f".{run_name}{TMP_MARKER}{uuid.uuid4().hex[:8]}"

        def create() -> None:  # at the first save: a run that fails before it leaves nothing behind
            folder.mkdir(parents=True)
            _claim(folder)
            (folder / CHECKPOINT_FILE).write_text(json.dumps({"key": key, "run": run_name, **fingerprint}),
                                                   encoding="utf-8")
            self.checkpoint_folder = folder

        return Checkpoint(folder / "passes", self.checkpoint_every, create)

    def drop_checkpoint(self) -> None:
        if self.checkpoint_folder is not None:
            shutil.rmtree(self.checkpoint_folder, ignore_errors=True)
            self.checkpoint_folder = None

    def describe(self) -> dict:
        """What the run's manifest records of how it was split."""
        if self.mode == "ranks":
            return {"mode": "ranks", "world_size": self.ranks.world, "backend": self.backend}
        if self.mode == "merge":
            return {"mode": "merged", "parts": len(self.merge.states),
                    "from": [str(p) for p in self.merge.paths]}
        return {"mode": "whole", **({"resumed_from": self.resumed_from.name} if self.resumed_from else {})}

    def scale(self, checkpoint) -> Any:
        from headlab.tally import Scale

        if self.mode == "ranks":
            from headlab.distributed import ranks_scale

            return ranks_scale(self.ranks, checkpoint)
        if self.mode == "merge":
            return Scale(mode="merge", states=self.merge.states)
        if self.mode == "shard":
            return Scale(mode="shard", shard=self.shard, checkpoint=checkpoint)
        return Scale(checkpoint=checkpoint)


def _claim(folder: Path) -> None:
    """Mark ``folder`` as written by this process (``runs clean`` spares it while this process lives)."""
    from headlab.runs import WRITER

    (folder / WRITER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                             "started": dt.datetime.now(dt.timezone.utc).isoformat()}),
                                 encoding="utf-8")


def _digest(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]


def dataclass_dict(config: Any) -> Any:
    import dataclasses

    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config


def _check_ranks(how: str, args: ScaleArgs, device_map: Any, remote: bool, runtime: str) -> None:
    """What cannot run on ranks, however they start (``how``: ``--nproc`` or ``torchrun``)."""
    if args.shard is not None:
        raise InputError(f"--shard and {how} split the inputs twice: use {how} on one machine (or one job), "
                         "--shard i/n across the jobs of an array")
    if device_map is not None:
        raise InputError(f"--device-map spreads one model over the GPUs, and {how} gives each rank its own replica: "
                         "use one of them (docs/scale.md)")
    if remote or runtime == "nnsight":
        raise InputError(f"NDIF and nnsight runs are not split over ranks: run them in one process, without {how}")


def plan_scale(args: ScaleArgs, *, command: str, device_map: Any, remote: bool, runtime: str) -> ScalePlan:
    """The plan for this process; refuses combinations that cannot work, before any model loads."""
    from headlab.distributed import from_environment
    from headlab.shards import Shard

    parts = _MERGING.get()
    ranks = from_environment()
    asked = args.shard is not None or args.resume or ranks is not None or args.nproc != 1
    if not args.scalable:
        if asked:
            what = "--shard" if args.shard is not None else "--resume" if args.resume else \
                "--nproc" if args.nproc != 1 else "torchrun (several ranks)"
            raise InputError(f"`{command}` does not run in parts: drop {what} (docs/scale.md lists the analyses "
                             "that do)")
        return ScalePlan(checkpoint_every=0)
    if args.checkpoint_every < 0:
        raise InputError(f"--checkpoint-every must be 0 (never) or a number of batches, got {args.checkpoint_every}")
    plan = ScalePlan(resume=args.resume, checkpoint_every=args.checkpoint_every)
    if parts is not None:
        plan.mode, plan.merge, plan.checkpoint_every = "merge", parts, 0
        return plan
    if args.nproc < 1:
        raise InputError(f"--nproc must be at least 1, got {args.nproc}")
    if args.nproc > 1:
        if ranks is not None:
            raise InputError("--nproc inside torchrun would start ranks of ranks: use one of them")
        _check_ranks("--nproc", args, device_map, remote, runtime)
        plan.mode, plan.nproc = "launch", args.nproc
        return plan
    if ranks is not None:
        _check_ranks("torchrun", args, device_map, remote, runtime)
        plan.mode, plan.ranks, plan.shard = "ranks", ranks, ranks.shard
        return plan
    if args.shard is not None:
        plan.shard = Shard.parse(args.shard)
        if remote:
            raise InputError("--remote runs on NDIF's machines: --shard does not apply; run it in one process")
        plan.mode = "shard"
    return plan


def adopt_parts(parts: MergeParts, prepared) -> None:
    """A merge takes the prompts the parts recorded (the command may have read them from stdin)."""
    if parts.prompts is not None:
        prepared.texts = parts.prompts


def fingerprint_of_parts(parts: MergeParts) -> dict:
    return {**parts.fingerprint, "shard": None}


# Options that say where and how this process runs, not what is computed: a merge re-runs the command without them.
_NOT_RECORDED = {"shard", "resume", "checkpoint_every", "nproc", "out", "name", "quiet"}


def command_argv(drop: set[str] = _NOT_RECORDED) -> list[str]:
    """The current command as arguments its program parses again: the program (``analyze`` or ``headlab``), the
    command's path, then every option whose value is not the default, without the options in ``_NOT_RECORDED``."""
    ctx = _current_context()
    program = (ctx.find_object(dict) or {}).get("program", "headlab")
    argv = [program, *ctx.command_path.split()[1:]]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name in drop or value is None or value == param.default or not param.opts or \
                (isinstance(value, (list, tuple)) and not value):
            continue
        if getattr(param, "is_flag", False):
            if value:
                argv.append(param.opts[0])
            elif param.secondary_opts:
                argv.append(param.secondary_opts[0])
            continue
        for item in value if isinstance(value, (list, tuple)) else [value]:  # a repeatable option: once per value
            argv += [param.opts[0], _argument(item)]
    return argv


def _argument(value: Any) -> str:
    if hasattr(value, "value"):  # an Enum
        return str(value.value)
    if isinstance(value, Path):  # absolute: the merge may run in another folder
        return str(value.resolve())
    return str(value)


def _current_context():
    """The running command's click context (typer >= 0.29 carries its own copy of click)."""
    try:
        from typer._click.globals import get_current_context
    except ImportError:  # older typer: click itself
        from click import get_current_context
    return get_current_context()


def argv_with_prompts(argv: list[str], prompts_file: Path) -> list[str]:
    """``argv`` reading its prompts from ``prompts_file``, the prompts the parts recorded (the shards may have read
    them from stdin, or from a file that is elsewhere now)."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == "--prompts" and i + 1 < len(argv):
            skip = True
            continue
        out.append(arg)
    return [*out, "--prompts", str(prompts_file)]


def launch_ranks(nproc: int, prompts: list[str] | None) -> int:
    """Start ``nproc`` ranks of this very command (torchrun's launcher, on this machine) and wait for them; rank 0
    writes the run. Returns the exit code (a rank's own, when one fails: it has said why)."""
    import sys
    import tempfile
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    with tempfile.TemporaryDirectory(prefix="headlab-ranks-") as tmp:
        argv = command_argv(drop={"nproc"})
        if prompts is not None:  # the ranks cannot share this process's stdin
            argv = argv_with_prompts(argv, write_prompts_file(Path(tmp), prompts))
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex,
                              rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)
        try:
            elastic_launch(config, sys.executable)("-m", "headlab", *argv)
        except ChildFailedError as err:
            return max((f.exitcode for f in err.failures.values() if f.exitcode and f.exitcode > 0), default=1)
    return 0


def write_prompts_file(folder: Path, prompts: list[str]) -> Path:
    """The prompts as a prompt file: one per line (a newline inside a prompt is written as \\n, as files are read)."""
    path = folder / "prompts.txt"
    path.write_text("".join(p.replace("\n", "\\n") + "\n" for p in prompts), encoding="utf-8")
    return path
