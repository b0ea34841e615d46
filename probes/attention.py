"""headlab's attention function for transformers, and the probe that collects its statistics.

``AttentionProbe`` switches a model to the ``"headlab"`` attention implementation (registered
through ``AttentionInterface`` with a matching mask function), so every attention layer of the
language model returns its output from ``headlab.kernels`` and hands its ``AttentionStats`` to the
probe. The same function applies the attention-site edits of ``headlab.intervene`` (the probe then
sees the edited call) and hands full patterns to ``headlab.trace`` when asked. ``output_attentions``
is never used, and no T x T matrix is built on the default path.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from dataclasses import dataclass

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
from headlab.interventions.attention_call import ACTIVE_EDITS, AttentionCall, edited_pattern, run_edited
from headlab.kernels import AttentionStats, MaskSpec, StatsRequest, attention_with_stats

ATTN_IMPLEMENTATION = "headlab"

_ACTIVE_PROBE: contextvars.ContextVar[AttentionProbe | None] = contextvars.ContextVar(
    "headlab_attention_probe", default=None
)


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
    return LazyMask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function,
                    attention_mask, use_vmap, torch.device(device))


def mask_spec_from(attention_mask, *, causal: bool, window: int | None, n_q: int, n_k: int) -> MaskSpec:
    """Translate whatever mask a model passes (lazy, dense bool, dense additive, None) into a MaskSpec."""
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


class PatternReader:
    """Receives full attention patterns of chosen layers (``headlab.trace``'s ``hook_pattern``).

    Patterns are computed by the eager backend inside the attention function, with the active edits,
    only for ``layers`` and only up to ``max_keys`` keys (the O(T²) path is for short inputs).
    """

    def __init__(self, arch, layers: set[int], max_keys: int, on_pattern: Callable[[int, torch.Tensor], None]):
        self.arch = arch
        self.layers = layers
        self.max_keys = max_keys
        self.on_pattern = on_pattern

    def layer_of(self, module: torch.nn.Module) -> int | None:
        layer = self.arch.layer_of(module)
        return layer if layer in self.layers else None


_PATTERN_READER: contextvars.ContextVar[PatternReader | None] = contextvars.ContextVar(
    "headlab_pattern_reader", default=None
)


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

    Runs headlab's kernel for layers that are probed, edited (``headlab.intervene``) or whose pattern
    is read (``headlab.trace``); every other attention call (a vision tower, nothing active) is plain sdpa.
    """
    probe = _ACTIVE_PROBE.get()
    layer = probe.layer_of(module) if probe is not None else None
    edits = ACTIVE_EDITS.get()
    edited_layer, plan = edits.plan_for(module) if edits is not None else (None, None)
    reader = _PATTERN_READER.get()
    pattern_layer = reader.layer_of(module) if reader is not None else None
    if layer is None and plan is None and pattern_layer is None:
        dense = attention_mask.dense() if isinstance(attention_mask, LazyMask) else attention_mask
        return sdpa_attention_forward(module, query, key, value, dense, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    if dropout and module.training:
        raise RuntimeError("headlab attention reads statistics in eval mode only: call model.eval()")
    causal = bool(getattr(module, "is_causal", True))
    spec = mask_spec_from(attention_mask, causal=causal, window=sliding_window,
                          n_q=query.shape[2], n_k=key.shape[2])
    backend = probe.backend if probe is not None else (edits.backend if edits is not None else None)
    request = probe.request if layer is not None else None
    edited = None
    if plan is None:
        out, stats = attention_with_stats(query, key, value, scale=scaling, sinks=s_aux, backend=backend,
                                          mask=spec, request=request)
    else:
        call = AttentionCall.of(edited_layer, query, key, attention_mask, edits.tracker)
        out, stats, edited = run_edited(plan, call, query, key, value, spec, scaling, s_aux, backend, request)
    if pattern_layer is not None:
        if key.shape[2] > reader.max_keys:
            raise InputError(f"full attention patterns are kept only up to {reader.max_keys} keys, this call has "
                             f"{key.shape[2]}; read statistics instead, or raise max_pattern_tokens")
        reader.on_pattern(pattern_layer, edited_pattern(query, key, spec, scaling, s_aux, edited))
    if layer is not None:
        probe.record(layer, stats)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``attn_implementation="headlab"`` known to transformers (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, headlab_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, headlab_mask)


class AttentionProbe:
    """Context manager: while active, the model runs headlab attention and statistics flow to ``on_stats``.

    ``on_stats(layer, stats)`` is called once per probed layer per forward pass; by default the
    statistics of the last forward are kept in ``self.last`` (``{layer: AttentionStats}``).
    ``request`` asks the kernels for optional statistics (e.g. ``StatsRequest(distance=True)``).
    """

    def __init__(self, loaded, on_stats: Callable[[int, AttentionStats], None] | None = None,
                 backend: str | None = None, layers: list[int] | None = None,
                 request: StatsRequest | None = None):
        self.model = loaded.model
        self.arch = loaded.arch
        self.backend = backend
        self.request = request
        self.on_stats = on_stats
        self.layers = set(range(self.arch.n_layers) if layers is None else layers)
        self.last: dict[int, AttentionStats] = {}
        self._previous: str | None = None
        self._token: contextvars.Token | None = None

    def layer_of(self, module: torch.nn.Module) -> int | None:
        layer = self.arch.layer_of(module)
        return layer if layer in self.layers else None

    def record(self, layer: int, stats: AttentionStats) -> None:
        if self.on_stats is not None:
            self.on_stats(layer, stats)
        else:
            self.last[layer] = stats

    def __enter__(self) -> AttentionProbe:
        register()
        self._previous = self.model.config._attn_implementation
        self.model.set_attn_implementation(ATTN_IMPLEMENTATION)
        self._token = _ACTIVE_PROBE.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE_PROBE.reset(self._token)
        self.model.set_attn_implementation(self._previous)
