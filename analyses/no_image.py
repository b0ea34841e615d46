"""The no-image side of an LVLM, shared by VHD, VHR and the fixes' reference stream: the same samples with the
image removed, z recorded per call, generated tokens appended to left-padded prompts, and the new tokens of a
``generate`` call."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from headlab.analyses.configs import REMOVE_MODES
from headlab.errors import InputError
from headlab.lvlm import LvlmInputs, LvlmSample


@contextlib.contextmanager
def capture_z(loaded, layers: Sequence[int]) -> Iterator[dict[int, list[torch.Tensor]]]:
    """Record z ``[batch, query, head, d_head]`` of ``layers`` on every call (a forward pre-hook on o_proj)."""
    arch = loaded.arch
    store: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    handles = []
    for layer in layers:
        def hook(module, args, layer=layer):
            x = args[0]
            store[layer].append(x.detach().reshape(*x.shape[:-1], arch.n_heads, -1).float())
        handles.append(arch.o_proj(layer).register_forward_pre_hook(hook))
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def without_image(samples: Sequence[LvlmSample], remove: str = "drop") -> list[LvlmSample]:
    """The same samples with the image removed (``drop``) or replaced by a uniform grey image (``blank``)."""
    from PIL import Image

    from headlab.lvlm import load_image

    if remove not in REMOVE_MODES:
        raise InputError(f"unknown image removal {remove!r}: use one of {', '.join(REMOVE_MODES)}")
    out = []
    for s in samples:
        if remove == "drop":
            images = ()
        else:
            images = []
            for im in s.images:
                im = im if hasattr(im, "size") else load_image(im)
                images.append(Image.new("RGB", im.size, (128, 128, 128)))
        out.append(LvlmSample(s.prompt, images, s.system, s.answer))
    return out


def append_continuation(inputs: LvlmInputs, continuation: torch.Tensor, pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompt tensors followed by ``continuation`` ``[batch, n]`` (pad_id = padding)."""
    if inputs.padding_side != "left":
        raise InputError("VHD needs left-padded prompts (the generated tokens are appended on the right)")
    t = dict(inputs.tensors)
    cont_mask = (continuation != pad_id).long()
    t["input_ids"] = torch.cat([t["input_ids"], continuation], dim=1)
    t["attention_mask"] = torch.cat([t["attention_mask"], cont_mask], dim=1)
    if "mm_token_type_ids" in t:
        t["mm_token_type_ids"] = torch.cat([t["mm_token_type_ids"], torch.zeros_like(continuation)], dim=1)
    return t
