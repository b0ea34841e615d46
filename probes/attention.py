"""headlab's attention function for transformers, and the probe that collects its statistics.

``AttentionProbe`` switches a model to the ``"headlab"`` attention implementation (registered
through ``AttentionInterface`` with a matching mask function), so every attention layer of the
language model returns its output from ``headlab.kernels`` and hands its ``AttentionStats`` to the
probe. ``output_attentions`` is never used, and no T x T matrix is built on the default path.
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
    """transformers' attention signature: q ``[batch, head, query, dim]`` -> ``[batch, query, head, dim]``."""
    probe = _ACTIVE_PROBE.get()
    layer = probe.layer_of(module) if probe is not None else None
    if layer is None:
        # Not a probed layer (a vision tower, or no probe active): plain sdpa.
        dense = attention_mask.dense() if isinstance(attention_mask, LazyMask) else attention_mask
        return sdpa_attention_forward(module, query, key, value, dense, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    if dropout and module.training:
        raise RuntimeError("headlab attention reads statistics in eval mode only: call model.eval()")
    causal = bool(getattr(module, "is_causal", True))
    spec = mask_spec_from(attention_mask, causal=causal, window=sliding_window,
                          n_q=query.shape[2], n_k=key.shape[2])
    out, stats = attention_with_stats(query, key, value, scale=scaling, sinks=s_aux, backend=probe.backend,
                                      mask=spec, request=probe.request)
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
