"""headlab's attention function for transformers, and the one switch that puts it into a model.

The function is registered through ``AttentionInterface`` as ``"headlab"`` (with a matching mask
function that hands it a ``LazyMask`` instead of a 4-D mask). While a model runs on it, every attention
call asks the participants of the current context what they need for the call's layer:

- a statistics reader (``StatsReader``: ``AttentionProbe`` in ``headlab.probes``) receives the
  call's ``AttentionStats``;
- a pattern reader (``PatternReader``: ``headlab.trace``'s ``hook_pattern``) receives the full
  probabilities of short inputs;
- an editor (``AttentionEditor``: the attention-site edits of ``headlab.intervene``) plans and runs
  an edited call, and redoes the same edit on materialised probabilities for a pattern reader.

The participants are held in context variables that only ``headlab_attention`` sets, and it is also
the one place that switches a model's attention implementation (``other_attention`` runs a block on
another one: eager for a rollout, the model's own for nnsight). This module imports no probe and no
intervention: probes and interventions meet here, through the protocols, and not in each other.
``output_attentions`` is never used, and no T x T matrix is built on the default path.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (
    AttentionMaskInterface,
    bidirectional_mask_function,
    causal_mask_function,
    prepare_padding_mask,
    sdpa_mask,
)

from headlab.errors import InputError

from .dispatch import attention_with_stats
from .eager import attention_probs
from .edits import ScoreEdit
from .stats import AttentionStats, MaskSpec, StatsRequest

ATTN_IMPLEMENTATION = "headlab"


# --------------------------------------------------------------------------------------------------
# The participants: what the attention function asks of each, for one call.

@runtime_checkable
class StatsReader(Protocol):
    """Receives the ``AttentionStats`` of the layers it reads (``headlab.probes.AttentionProbe``)."""

    backend: str | None  # the kernel backend (None: the device's); wins over the editor's
    request: StatsRequest | None  # optional statistics to compute (distance profile, key groups, …)

    def layer_of(self, module: torch.nn.Module) -> int | None:
        """The layer of ``module`` if this reader reads it, else None."""

    def record(self, layer: int, stats: AttentionStats) -> None:
        """Take the statistics of one call of ``layer`` (of the edited call when an editor edits it)."""


@runtime_checkable
class AttentionEditor(Protocol):
    """Edits attention calls (``headlab.interventions``' ``ActiveEdits``).

    ``plan`` is whatever the editor needs to run one layer's edits; the attention function only hands it
    back. ``edited`` is whatever the editor needs to redo the call's edit on materialised probabilities.
    """

    backend: str | None  # the kernel backend when no statistics reader names one

    def plan_for(self, module: torch.nn.Module) -> tuple[int | None, object | None]:
        """(layer, plan) if ``module``'s calls are edited, else (None, None)."""

    def run(self, layer: int, plan: object, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            attention_mask: object, mask: MaskSpec, scale: float | None, sinks: torch.Tensor | None,
            backend: str | None, request: StatsRequest | None) -> tuple[torch.Tensor, AttentionStats, object]:
        """The edited call: output ``[batch, head, query, dim_v]``, its statistics (with ``request``'s), and
        ``edited`` for ``pattern``. ``attention_mask``: what the model passed (a ``LazyMask``, a tensor, None)."""

    def pattern(self, query: torch.Tensor, key: torch.Tensor, mask: MaskSpec, scale: float | None,
                sinks: torch.Tensor | None, edited: object) -> torch.Tensor:
        """Full probabilities ``[batch, head, query, key]`` (fp32) of a call that ``run`` edited."""


class PatternReader:
    """Receives full attention patterns of chosen layers (``headlab.trace``'s ``hook_pattern``).

    Patterns are computed by the eager backend inside the attention function, with the active edits,
    only for ``layers`` and only up to ``max_keys`` keys (the O(T²) path is for short inputs).
    ``on_pattern(layer, probs)`` gets ``[batch, head, query, key]`` fp32.
    """

    def __init__(self, arch, layers: set[int], max_keys: int, on_pattern: Callable[[int, torch.Tensor], None]):
        self.arch = arch
        self.layers = layers
        self.max_keys = max_keys
        self.on_pattern = on_pattern

    def layer_of(self, module: torch.nn.Module) -> int | None:
        layer = self.arch.layer_of(module)
        return layer if layer in self.layers else None


# Set and reset only by ``headlab_attention`` / ``other_attention`` (and ``without_editor``), so that the
# participants of a block go when the block ends, on error too.
_READER: contextvars.ContextVar[StatsReader | None] = contextvars.ContextVar("headlab_attention_probe",
                                                                             default=None)
_PATTERNS: contextvars.ContextVar[PatternReader | None] = contextvars.ContextVar("headlab_pattern_reader",
                                                                                 default=None)
_EDITOR: contextvars.ContextVar[AttentionEditor | None] = contextvars.ContextVar("headlab_attention_edits",
                                                                                 default=None)


def active_reader() -> StatsReader | None:
    """The statistics reader in force (the innermost ``headlab_attention(reader=...)``), or None."""
    return _READER.get()


def active_patterns() -> PatternReader | None:
    """The pattern reader in force, or None."""
    return _PATTERNS.get()


def active_editor() -> AttentionEditor | None:
    """The attention editor in force, or None (also inside ``without_editor``)."""
    return _EDITOR.get()


# --------------------------------------------------------------------------------------------------
# The mask.

@dataclass
class LazyMask:
    """What the ``"headlab"`` mask function hands to the attention function instead of a 4-D mask.

    It keeps transformers' mask arguments and builds rows of the mask on demand, so the model's own
    mask semantics (padding, packing, prefix-LM…) hold without a ``[batch, 1, query, key]`` tensor.
    Plain causal and bidirectional masks are recognised and passed to the kernels as structure.
    """

    batch_size: int
    q_length: int
    kv_length: int
    q_offset: int
    kv_offset: int
    mask_function: Callable
    attention_mask: torch.Tensor | None  # [batch, seen + query] 2-D padding mask, True = real
    use_vmap: bool
    device: torch.device

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch_size, 1, self.q_length, self.kv_length)

    @property
    def padding(self) -> torch.Tensor | None:
        """``[batch, key]`` True for real keys, or None without padding."""
        return prepare_padding_mask(self.attention_mask, self.kv_length, self.kv_offset)

    def rows(self, q_start: int, q_end: int) -> torch.Tensor:
        """``[batch, 1, q_end - q_start, key]`` bool, True = may attend."""
        return sdpa_mask(
            batch_size=self.batch_size, q_length=q_end - q_start, kv_length=self.kv_length,
            q_offset=self.q_offset + q_start, kv_offset=self.kv_offset, mask_function=self.mask_function,
            attention_mask=self.attention_mask, allow_is_causal_skip=False, use_vmap=self.use_vmap,
            device=self.device,
        )

    def dense(self) -> torch.Tensor:
        """``[batch, 1, query, key]`` bool, the whole mask (for calls that go to plain sdpa)."""
        return self.rows(0, self.q_length)

    def spec(self) -> MaskSpec:
        padding = self.padding
        query_valid = None
        if padding is not None:
            # Query row r sits at key column r + offset; a padding query adds nothing to the stats.
            start = self.q_offset - self.kv_offset
            query_valid = padding[:, start : start + self.q_length]
        offset = self.q_offset - self.kv_offset
        if self.mask_function is causal_mask_function:
            return MaskSpec(True, None, offset, padding, query_valid)
        if self.mask_function is bidirectional_mask_function:
            return MaskSpec(False, None, offset, padding, query_valid)
        # Padding is already inside the rows; passing it too keeps first_key right under left padding.
        return MaskSpec(False, None, offset, padding, query_valid, row_mask=self.rows)


def headlab_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable = causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    use_vmap: bool = False,
    device: torch.device | str = "cpu",
    **_: object,
) -> LazyMask:
    """transformers' mask-function signature; ``attention_mask`` ``[batch, seen + query]``, True = real."""
    return LazyMask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function,
                    attention_mask, use_vmap, torch.device(device))


def mask_spec_from(attention_mask, *, causal: bool, window: int | None, n_q: int, n_k: int) -> MaskSpec:
    """Translate whatever mask a model passes (lazy, dense bool, dense additive, None) into a MaskSpec.

    A dense mask is ``[batch, 1, query, key]`` (bool True = may attend, or additive with min = masked).
    """
    if isinstance(attention_mask, LazyMask):
        spec = attention_mask.spec()
        if window is not None and spec.row_mask is None:
            spec.window = window
        return spec
    if attention_mask is None:
        return MaskSpec(causal=causal and n_q > 1, window=window, q_offset=n_k - n_q)
    dense = attention_mask if attention_mask.dtype == torch.bool else attention_mask > torch.finfo(
        attention_mask.dtype).min / 2
    return MaskSpec(causal=False, q_offset=n_k - n_q, row_mask=lambda a, b: dense[:, :1, a:b, :n_k])


# --------------------------------------------------------------------------------------------------
# The attention function.

def headlab_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: q ``[batch, head, query, dim]`` -> ``[batch, query, head, dim]``.

    Runs headlab's kernel for layers that are read (a ``StatsReader``), edited (an ``AttentionEditor``) or
    whose pattern is read (a ``PatternReader``); every other attention call (a vision tower, nothing
    active) is plain sdpa.
    """
    reader = _READER.get()
    layer = reader.layer_of(module) if reader is not None else None
    editor = _EDITOR.get()
    edited_layer, plan = editor.plan_for(module) if editor is not None else (None, None)
    patterns = _PATTERNS.get()
    pattern_layer = patterns.layer_of(module) if patterns is not None else None
    if layer is None and plan is None and pattern_layer is None:
        dense = attention_mask.dense() if isinstance(attention_mask, LazyMask) else attention_mask
        return sdpa_attention_forward(module, query, key, value, dense, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    if dropout and module.training:
        raise RuntimeError("headlab attention reads statistics in eval mode only: call model.eval()")
    causal = bool(getattr(module, "is_causal", True))
    spec = mask_spec_from(attention_mask, causal=causal, window=sliding_window,
                          n_q=query.shape[2], n_k=key.shape[2])
    backend = reader.backend if reader is not None else (editor.backend if editor is not None else None)
    request = reader.request if layer is not None else None
    edited = None
    if plan is None:
        out, stats = attention_with_stats(query, key, value, scale=scaling, sinks=s_aux, backend=backend,
                                          mask=spec, request=request)
    else:
        out, stats, edited = editor.run(edited_layer, plan, query, key, value, attention_mask, spec, scaling, s_aux,
                                        backend, request)
    if pattern_layer is not None:
        if key.shape[2] > patterns.max_keys:
            raise InputError(f"full attention patterns are kept only up to {patterns.max_keys} keys, this call has "
                             f"{key.shape[2]}; read statistics instead, or raise max_pattern_tokens")
        if edited is not None:
            probs = editor.pattern(query, key, spec, scaling, s_aux, edited)
        else:
            probs = eager_pattern(query, key, spec, scaling, s_aux)
        patterns.on_pattern(pattern_layer, probs)
    if layer is not None:
        reader.record(layer, stats)
    return out.transpose(1, 2).contiguous(), None


def eager_pattern(query: torch.Tensor, key: torch.Tensor, mask: MaskSpec, scale: float | None,
                  sinks: torch.Tensor | None, score_edit: ScoreEdit | None = None) -> torch.Tensor:
    """Full probabilities ``[batch, head, query, key]`` (fp32) of a call, its score edit applied, via eager."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    probs, _, _ = attention_probs(query, key, mask, scale, sinks, *((score_edit,) if score_edit is not None else ()))
    return probs


def register() -> None:
    """Make ``attn_implementation="headlab"`` known to transformers (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, headlab_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, headlab_mask)


# --------------------------------------------------------------------------------------------------
# The switch.

@contextlib.contextmanager
def _implementation(model, implementation: str) -> Iterator[None]:
    """``model`` on ``implementation`` inside the block; the implementation found on entry comes back on exit.

    When the model already runs on it (a probe inside ``intervene``), nothing is switched, so the outer
    block's state is left exactly as it was and the inner exit cannot undo the outer switch.
    """
    previous = model.config._attn_implementation
    if previous == implementation:
        yield
        return
    model.set_attn_implementation(implementation)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@contextlib.contextmanager
def _participants(reader: StatsReader | None, patterns: PatternReader | None, editor: AttentionEditor | None,
                  *, clear: bool = False) -> Iterator[None]:
    """Set the given participants for the block (``clear``: set every one, None included), reset on exit."""
    tokens = []
    try:
        for var, value in ((_READER, reader), (_PATTERNS, patterns), (_EDITOR, editor)):
            if value is not None or clear:
                tokens.append((var, var.set(value)))
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


@contextlib.contextmanager
def headlab_attention(model, *, reader: StatsReader | None = None, patterns: PatternReader | None = None,
                      editor: AttentionEditor | None = None) -> Iterator[None]:
    """Run ``model`` on headlab's attention function inside the block, with these participants added.

    A participant given here replaces the one of an enclosing block for the block's duration (an editor
    that should keep the outer edits carries them itself); one left None keeps the enclosing one. On exit,
    on error too, the participants and the implementation in force before come back, so blocks nest in any
    order (a probe inside ``intervene`` inside ``trace`` …).
    """
    register()
    with _implementation(model, ATTN_IMPLEMENTATION), _participants(reader, patterns, editor):
        yield


@contextlib.contextmanager
def other_attention(model, implementation: str, *, detached: bool = False) -> Iterator[None]:
    """Run ``model`` on another attention implementation (``"eager"``, the model's own …) inside the block.

    ``detached``: no participant is in force inside the block (nnsight reads the model's own call and
    hands the statistics to the reader itself). The implementation and participants come back on exit.
    """
    with _implementation(model, implementation), _participants(None, None, None, clear=detached):
        yield


@contextlib.contextmanager
def without_editor() -> Iterator[None]:
    """No attention edit in force inside the block (``headlab.interventions.paused``): the implementation and
    the readers stay, so a reference forward inside an ``intervene`` block is read but not edited."""
    token = _EDITOR.set(None)
    try:
        yield
    finally:
        _EDITOR.reset(token)
