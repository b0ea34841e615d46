"""Data parallelism over torch.distributed ranks (``torchrun``): NCCL between GPUs, gloo on CPUs.

torchrun starts one process per rank and tells each its ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in the
environment. Each rank loads its own replica of the model (on ``cuda:LOCAL_RANK`` when GPUs are there), runs its
shard of every pass (``headlab.tally.Scale`` in ``ranks`` mode) and exchanges accumulator states with the others
(``all_gather_object``: every rank then holds the whole pass, so a later pass that depends on an earlier one's
result agrees everywhere); rank 0 alone writes the run and prints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from headlab.shards import Shard

if TYPE_CHECKING:
    from headlab.tally import Scale, State


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks of a torchrun launch."""

    rank: int
    world: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> Shard:
        return Shard(self.rank, self.world)


def from_environment(env: dict[str, str] | None = None) -> Ranks | None:
    """The ranks torchrun describes in the environment, or None when this is a plain process (or one rank)."""
    env = os.environ if env is None else env
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    ranks = Ranks(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", env["RANK"])))
    return ranks if ranks.world > 1 else None


def rank_device(ranks: Ranks, requested: str) -> str:
    """The device of this rank's replica: ``cuda:LOCAL_RANK`` for ``auto``/``cuda`` when GPUs are there, else CPU."""
    import torch

    if requested in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{ranks.local_rank % torch.cuda.device_count()}"
    return "cpu" if requested == "auto" else requested


def start(ranks: Ranks, device: str) -> str:
    """Join the process group (NCCL when this rank runs on a GPU, gloo otherwise); returns the backend."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_backend()
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend=backend, rank=ranks.rank, world_size=ranks.world)
    return backend


def stop() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def exchange(state: dict[str, State]) -> list[dict[str, State]]:
    """Every rank's ``state``, in rank order, on every rank (tensors travel on the CPU)."""
    import torch.distributed as dist

    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, _to_cpu(state))
    return gathered


def ranks_scale(ranks: Ranks, checkpoint=None) -> Scale:
    from headlab.tally import Scale

    return Scale(mode="ranks", shard=ranks.shard, checkpoint=checkpoint, exchange=exchange)


def _to_cpu(value):
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value
