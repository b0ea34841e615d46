"""The no-image reference stream: the same greedy generation without the image, one step ahead of the image
stream, unedited, with its own KV cache.

Two methods need it at every generation step: VHR reads each layer's z without the image (VHD = the
distance to it), PAI's guidance reads the next-token distribution without the image. The stream is a
forward pre-hook on the model: before each image-stream call it feeds the no-image prompt (at prefill) or
the token the image stream chose last (while decoding) through the model with every intervention paused,
so the reference never sees an edit, and keeps what the methods read:

- ``logits`` ``[batch, vocab]`` (fp32): the no-image next-token logits of the step;
- ``z[layer]`` ``[batch, head, d_head]`` (fp32): each captured layer's z at the predicting row.

Install it inside the ``intervene`` block (``running()`` prepends its hook, so it runs before the block's
layout tracker reads the image-stream call).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch

from headlab.interventions import paused
from headlab.lvlm import LvlmSample, build_inputs

from .no_image import capture_z, without_image


class NoImageStream:
    """See the module docstring. ``remove``: ``"drop"`` the image tokens or feed a ``"blank"`` grey image."""

    def __init__(self, loaded, samples: Sequence[LvlmSample], *, remove: str = "drop",
                 z_layers: Sequence[int] = (), on_step: Callable[[NoImageStream], None] | None = None):
        self.loaded = loaded
        self.inputs = build_inputs(loaded, without_image(samples, remove), padding_side="left").to(loaded.device)
        self.z_layers = list(z_layers)
        self.on_step = on_step
        self.logits: torch.Tensor | None = None
        self.z: dict[int, torch.Tensor] = {}
        self._cache = None
        self._mask = self.inputs.tensors["attention_mask"]
        self._rope_deltas = None
        self._busy = False

    @property
    def busy(self) -> bool:
        """True while the stream's own forward runs (hooks on the model see it too)."""
        return self._busy

    @contextlib.contextmanager
    def running(self) -> Iterator[NoImageStream]:
        handle = self.loaded.model.register_forward_pre_hook(self._step, with_kwargs=True, prepend=True)
        try:
            yield self
        finally:
            handle.remove()

    def _step(self, module, args, kwargs):
        if self._busy:  # the stream's own forward passes through this hook too
            return None
        self._busy = True
        try:
            if self._cache is None:
                feed = dict(self.inputs.tensors)
            else:
                new = kwargs["input_ids"][:, -1:]
                self._mask = torch.cat([self._mask, torch.ones_like(new)], dim=1)
                feed = {"input_ids": new, "attention_mask": self._mask}
            model = self.loaded.model
            # Qwen2-VL keeps the image stream's M-RoPE offsets on the model: the text-only stream uses its own.
            inner = getattr(model, "model", None)
            keeps_rope = hasattr(inner, "rope_deltas")
            saved = inner.rope_deltas if keeps_rope else None
            if keeps_rope:
                inner.rope_deltas = self._rope_deltas
            try:
                with paused(), capture_z(self.loaded, self.z_layers) as store:
                    out = model(**feed, cache=self._cache, use_cache=True, logits_to_keep=1)
            finally:
                if keeps_rope:
                    self._rope_deltas = inner.rope_deltas
                    inner.rope_deltas = saved
            cache = getattr(out, "cache", None)
            self._cache = cache if cache is not None else out.past_key_values
            self.logits = out.logits[:, -1].float()
            self.z = {layer: calls[0][:, -1] for layer, calls in store.items()}  # left padding: the predicting row
            if self.on_step is not None:
                self.on_step(self)
        finally:
            self._busy = False
        return None
