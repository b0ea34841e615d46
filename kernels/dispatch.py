"""One entry point, several backends: ``attention_with_stats`` picks one per call.

Choice order: the ``backend`` argument, then the kernel chosen for a block of code (``using_kernel``: the
CLI's ``--kernel``), then ``HEADLAB_ATTN_BACKEND``, then the device (CUDA -> triton when triton is installed,
anything else -> torch).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Callable, Iterator
from contextvars import ContextVar

import torch

from headlab.errors import InputError

from . import fused_rows, threads
from .eager import eager_attention_with_stats
from .edits import ScoreEdit
from .stats import AttentionStats, MaskSpec, StatsRequest
from .torch_backend import pick_chunk_size, torch_attention_with_stats

BackendFn = Callable[..., tuple[torch.Tensor, AttentionStats]]


class BackendError(InputError, ValueError):
    """An attention backend that does not exist or cannot run here."""


def triton_attention_with_stats(*args, **kwargs) -> tuple[torch.Tensor, AttentionStats]:
    """The Triton backend, imported on first use: importing it compiles nothing, but ``triton.jit`` reads
    ``TRITON_INTERPRET`` when the kernels are decorated, so a late import lets tests choose the interpreter."""
    from .triton_backend import triton_attention_with_stats as run

    return run(*args, **kwargs)


# The seam for faster kernels: a backend registers a function with the eager signature
# (q, k, v, mask, scale, sinks, request=None, score_edit=None); score_edit is passed only when given,
# so a backend without edits still serves every other call.
BACKENDS: dict[str, BackendFn] = {
    "eager": eager_attention_with_stats,
    "torch": torch_attention_with_stats,
}
if importlib.util.find_spec("triton") is not None:
    BACKENDS["triton"] = triton_attention_with_stats
BACKEND_ENV = "HEADLAB_ATTN_BACKEND"
# The kernel of a block of code (``using_kernel``); None: the environment decides.
_CHOSEN: ContextVar[str | None] = ContextVar("headlab_kernel", default=None)


@contextlib.contextmanager
def using_kernel(name: str | None) -> Iterator[None]:
    """Every attention call inside runs on kernel ``name`` unless it names its own (None or "auto": no choice)."""
    if name not in (None, "auto"):
        resolve_backend(torch.device("cpu"), name)  # an unknown kernel fails here, before any compute
    token = _CHOSEN.set(None if name == "auto" else name)
    try:
        yield
    finally:
        _CHOSEN.reset(token)


def register_backend(name: str, fn: BackendFn) -> None:
    BACKENDS[name] = fn


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """``backend`` (or ``$HEADLAB_ATTN_BACKEND``): auto, eager, torch or triton -> the backend to run."""
    name = backend or _CHOSEN.get() or os.environ.get(BACKEND_ENV) or "auto"
    if name == "auto":
        return "triton" if device.type == "cuda" and "triton" in BACKENDS else "torch"
    if name == "triton" and name not in BACKENDS:
        raise BackendError("attention backend 'triton' needs the triton package: pip install triton "
                           "(Linux with a CUDA GPU), or use backend 'torch'")
    if name not in BACKENDS:
        known = ", ".join(sorted(BACKENDS))
        raise BackendError(f"unknown attention backend {name!r}; choose one of: auto, {known} "
                           f"(argument backend= or ${BACKEND_ENV})")
    return name


def backend_in_use(device: torch.device, backend: str | None = None) -> str | None:
    """What ``resolve_backend`` picks, for a run's manifest; ``backend`` itself where it names no kernel (nnsight)."""
    try:
        return resolve_backend(device, backend)
    except BackendError:  # an unknown kernel has failed the run long before a manifest is written
        return backend


def check_environment() -> None:
    """The kernels' environment variables, checked before a model loads (each raises ``InputError``):
    ``$HEADLAB_ATTN_BACKEND``, ``$HEADLAB_CHUNK_ROWS``, ``$HEADLAB_KERNEL_THREADS``, ``$HEADLAB_FUSED_ROWS``."""
    if os.environ.get(BACKEND_ENV, "auto") != "auto":
        resolve_backend(torch.device("cpu"))
    pick_chunk_size(1, 1, 1)
    threads.fixed_threads()
    fused_rows.mode()


def attention_with_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    window: int | None = None,
    key_padding: torch.Tensor | None = None,
    query_valid: torch.Tensor | None = None,
    q_offset: int = 0,
    row_mask=None,
    sinks: torch.Tensor | None = None,
    backend: str | None = None,
    mask: MaskSpec | None = None,
    request: StatsRequest | None = None,
    score_edit: ScoreEdit | None = None,
    **backend_kwargs,
) -> tuple[torch.Tensor, AttentionStats]:
    """Attention output and its statistics without materialising the probabilities (except ``eager``).

    q ``[batch, head, query, dim]``; k, v ``[batch, kv_head, key, dim]`` (GQA: head divisible by
    kv_head); ``key_padding`` ``[batch, key]`` True for real tokens; ``sinks`` ``[head]`` learned
    sink logits added to each row's denominator; a ready ``mask`` replaces the mask arguments;
    ``request`` asks for optional statistics (distance profiles, key groups, partial outputs);
    ``score_edit`` edits the scaled pre-softmax scores per (head, key group) on chosen query rows
    (see ``ScoreEdit``), and every statistic then describes the edited attention.
    Returns output ``[batch, head, query, dim_v]`` in q's dtype and ``AttentionStats`` in fp32.
    """
    if q.shape[1] % k.shape[1]:
        raise InputError(f"{q.shape[1]} query heads cannot share {k.shape[1]} kv heads evenly")
    mask = mask or MaskSpec(causal, window, q_offset, key_padding, query_valid, row_mask)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if score_edit is not None:
        score_edit.check(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        backend_kwargs["score_edit"] = score_edit
    fn = BACKENDS[resolve_backend(q.device, backend)]
    return fn(q, k, v, mask, scale, sinks, request=request, **backend_kwargs)
