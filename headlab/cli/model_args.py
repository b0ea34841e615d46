"""One way to open a model from the command line: the same flags on every command that loads one.

``@takes_model(...)`` adds the model options (``--model``, placement, dtype, device, threads, offline,
revision, trust-remote-code, BOS, ``--kernel``, ``--runtime``, ``--remote``) to a command, shown in one help
panel, and hands the command a ``ModelArgs``. ``ModelArgs.check`` runs every cheap check before anything
loads; ``open_model`` loads the model the way every command does.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import typer

from headlab.checks import at_least
from headlab.cli.output import warn
from headlab.cli.scaling import ScaleArgs, scale_parameters
from headlab.errors import InputError

PANEL = "Model and placement"


class Bos(str, Enum):
    auto = "auto"
    add = "add"
    none = "none"


class Kernel(str, Enum):
    auto = "auto"
    torch = "torch"
    eager = "eager"
    triton = "triton"


class Runtime(str, Enum):
    local = "local"
    nnsight = "nnsight"


class Backend(str, Enum):
    """The old two-meaning ``--backend``: a kernel, or ``nnsight`` for the runtime."""

    auto = "auto"
    torch = "torch"
    eager = "eager"
    triton = "triton"
    nnsight = "nnsight"


@dataclass(frozen=True)
class ModelArgs:
    """The model options of one command, as typed; ``check`` returns a copy with the placement parsed."""

    model: str
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | dict | None = None
    max_memory: str | dict | None = None
    offload_folder: Path | str | None = None
    threads: int | None = None
    offline: bool = False
    revision: str | None = None
    trust_remote_code: bool = False
    bos: Bos = Bos.auto
    kernel: Kernel = Kernel.auto
    runtime: Runtime = Runtime.local
    remote: bool = False
    scale: ScaleArgs = ScaleArgs()  # --shard, --resume, --checkpoint-every (commands made with scalable=True)

    @property
    def kernel_name(self) -> str | None:
        """The kernel asked for, or None for the automatic choice."""
        return None if self.kernel == Kernel.auto else self.kernel.value

    @property
    def placement(self) -> dict | None:
        """What a run's manifest records of a device map (None without one)."""
        if self.device_map is None:
            return None
        return {"device_map": self.device_map, "max_memory": self.max_memory}

    def check_plain(self, *, command: str = "this command",
                    runtimes: Sequence[Runtime] = (Runtime.local, Runtime.nnsight)) -> None:
        """The model options' checks that need no torch (they run first, with the command's own plain checks)."""
        from headlab.checks import ndif_key

        if self.threads is not None:
            at_least(self.threads, 1, "--threads")
        if self.runtime not in runtimes:
            raise InputError(f"--runtime {self.runtime.value}: `{command}` runs with "
                             f"{' or '.join(r.value for r in runtimes)} only")
        if self.remote:
            if self.runtime != Runtime.nnsight:
                raise InputError("--remote runs through nnsight: add --runtime nnsight")
            if self.device_map is not None:
                raise InputError("--remote runs the model on NDIF's machines, which place it themselves: drop "
                                 "--device-map")
            ndif_key()

    def check(self, *, command: str = "this command",
              runtimes: Sequence[Runtime] = (Runtime.local, Runtime.nnsight)) -> ModelArgs:
        """Every check that needs no model, before one loads; raises ``InputError``."""
        self.check_plain(command=command, runtimes=runtimes)
        return self.resolved()

    def resolved(self) -> ModelArgs:
        """The checks that need torch (device, dtype, kernel, placement, NDIF's model name), after
        ``check_plain``; a copy with the placement parsed."""
        from headlab.kernels import check_environment
        from headlab.placement import check_placement, resolve_device, resolve_dtype

        check_environment()
        device = resolve_device(self.device)
        resolve_dtype(self.dtype, device)
        if self.kernel_name is not None:
            import torch

            from headlab.kernels.dispatch import resolve_backend

            resolve_backend(torch.device(device), self.kernel_name)
        device_map, max_memory, folder = check_placement(self.device_map, self.max_memory, self.offload_folder)
        if self.remote:
            from headlab.probes.nnsight_backend import check_remote

            check_remote(self.model, True)
        return dataclasses.replace(self, device_map=device_map, max_memory=max_memory, offload_folder=folder)

    @contextmanager
    def kernel_in_use(self) -> Iterator[None]:
        """Attention calls inside run on ``--kernel`` (unless an analysis names its own)."""
        from headlab.kernels.dispatch import using_kernel

        with using_kernel(self.kernel_name):
            yield

    def threads_used(self) -> int:
        import torch

        return torch.get_num_threads()


def open_model(args: ModelArgs, *, weights: bool | None = None):
    """The one way a command loads ``args.model``: placed, cast, its threads set, wrapped for nnsight when
    ``--runtime nnsight`` (only the architecture is built here with ``--remote``: every forward runs on NDIF)."""
    import torch

    from headlab.loading import load

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    loaded = load(args.model, dtype=args.dtype, device=args.device, device_map=args.device_map,
                  max_memory=args.max_memory, offload_folder=args.offload_folder, revision=args.revision,
                  local_files_only=args.offline, trust_remote_code=args.trust_remote_code, bos=args.bos.value,
                  weights=(not args.remote) if weights is None else weights)
    if args.runtime == Runtime.nnsight:
        from headlab.probes.nnsight_backend import with_nnsight

        loaded = with_nnsight(loaded, remote=args.remote)
    return loaded


def _option(default, help: str, *names: str, hidden: bool = False):
    return typer.Option(default, *names, help=help, rich_help_panel=PANEL, hidden=hidden)


def model_parameters(model_default: str | None, model_help: str, dtype_default: str = "auto",
                     device_default: str = "auto") -> list[inspect.Parameter]:
    """The parameters ``@takes_model`` adds to a command, with their typer options (one definition)."""
    spec = [
        ("model", str, _option(model_default, model_help)),
        ("dtype", str, _option(dtype_default, "auto, float32, bfloat16 or float16")),
        ("device", str, _option(device_default, "auto, cpu, cuda, cuda:1 …")),
        ("device_map", str, _option(None, "shard a model that does not fit one device (accelerate): auto, "
                                          "balanced, sequential, or a JSON {module: device} map (inline or a "
                                          ".json file)")),
        ("max_memory", str, _option(None, "with --device-map auto: the most each device may hold, e.g. "
                                          "0=20GiB,cpu=64GiB")),
        ("offload_folder", Path, _option(None, "folder for the weights a device map puts on disk")),
        ("threads", int, _option(None, "CPU threads for torch (default: torch's own choice; the count used is "
                                       "printed). On a busy machine 1 can be many times faster")),
        ("offline", bool, _option(False, "never contact the hub: local folders and the HF cache only")),
        ("revision", str, _option(None, "model revision (branch, tag or commit)")),
        ("trust_remote_code", bool, _option(False, "run the model repository's own code (off by default)")),
        ("bos", Bos, _option(Bos.auto, "auto: as the tokenizer does; add: prepend BOS; none: strip it")),
        ("kernel", Kernel, _option(Kernel.auto, "attention kernel of the statistics path: auto (triton on CUDA, "
                                                "else torch), torch, eager or triton")),
        ("runtime", Runtime, _option(Runtime.local, "how the model runs: local, or nnsight (the model's own "
                                                    "attention read through nnsight traces; with --remote on "
                                                    "NDIF)")),
        ("remote", bool, _option(False, "with --runtime nnsight: run on NDIF (a hub id it hosts; key from "
                                        "$NDIF_API_KEY)")),
        ("backend", Backend, _option(None, "deprecated: --kernel or --runtime nnsight", hidden=True)),
    ]
    return [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
            for name, kind, option in spec]


def _from_backend(values: dict) -> None:
    """``--backend X`` (deprecated) becomes ``--kernel X`` or ``--runtime nnsight``, with one warning line."""
    backend = values.pop("backend")
    if backend is None:
        return
    if backend == Backend.nnsight:
        warn("--backend nnsight is deprecated: use --runtime nnsight")
        values["runtime"] = Runtime.nnsight
    elif backend != Backend.auto:
        warn(f"--backend {backend.value} is deprecated: use --kernel {backend.value}")
        values["kernel"] = Kernel(backend.value)


def takes_model(model_default: str | None, model_help: str = "alias, tiny-* zoo model, minilm, local folder or hub "
                                                                "id", *, dtype: str = "auto",
                device: str = "auto", scalable: bool = False) -> Callable:
    """Decorator: the command gets the model options and is called with ``model_args=ModelArgs(...)``.
    ``scalable``: its analysis runs its passes through ``headlab.tally.run_pass``, so it also gets ``--shard``,
    ``--resume`` and ``--checkpoint-every`` and runs under torchrun."""
    names = [f.name for f in dataclasses.fields(ModelArgs) if f.name != "scale"]
    scale_names = [f.name for f in dataclasses.fields(ScaleArgs) if f.name != "scalable"]

    def decorate(func: Callable) -> Callable:
        own = [p for name, p in inspect.signature(func, eval_str=True).parameters.items() if name != "model_args"]
        added = model_parameters(model_default, model_help, dtype, device) + (scale_parameters() if scalable else [])

        @functools.wraps(func)
        def command(**values):
            _from_backend(values)
            scale = ScaleArgs(scalable=scalable, **{n: values.pop(n) for n in scale_names if n in values})
            args = ModelArgs(**{name: values.pop(name) for name in names}, scale=scale)
            return func(**values, model_args=args)

        command.__signature__ = inspect.Signature(own + added)
        command.__annotations__ = {p.name: p.annotation for p in own + added}
        command.takes_model = True
        return command

    return decorate
