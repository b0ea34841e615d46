"""Bake LoFiT offsets into a plain Hugging Face checkpoint: o_proj's bias += W_O · v.

With A = 0 the edit z' = z + v before o_proj is o_proj(z + v) = W_O z + b + W_O v, so adding W_O v (a
``[d_model]`` vector per layer, computed by running o_proj itself on v laid out in head space, so Linear
and GPT-2's Conv1D alike) to the bias reproduces it at every position. v itself (``[d_head]``, head space)
never goes into the bias: that is a known mistake in public LoFiT code. A model whose o_proj has no bias
gets one through its config's bias flag (Llama/Qwen3/Mistral: ``attention_bias``, which gives q/k/v zero
biases too); an architecture whose transformers class cannot carry an o_proj bias is refused, and so are
offsets restricted to some rows (``rows`` other than ``"all"``): a bias acts at every position.
The loaded model is not touched: a copy is edited and written, atomically.
"""

from __future__ import annotations

import copy
import os
import shutil
import uuid
from pathlib import Path

import torch
from torch import nn

from headlab.errors import InputError
from headlab.interventions import HeadOffsets
from headlab.kernels.positions import Positions

BIAS_FLAGS = ("attention_bias", "bias", "use_bias", "add_bias_linear")


def o_proj_deltas(loaded, offsets: HeadOffsets) -> dict[int, torch.Tensor]:
    """``{layer: [d_model]}`` W_O · v per edited layer (v of each head in its z slot, zeros elsewhere)."""
    arch = loaded.arch
    offsets.validate(arch)
    if Positions.of(offsets.rows).kind != "all":
        # A bias acts at every position; offsets on some rows only would change every other row too.
        raise InputError(f"these HeadOffsets act on rows={offsets.rows!r} only, but o_proj's bias acts at every "
                         "position, so the exported model would differ from the hooked one; export offsets with "
                         "rows='all', or apply these with `headlab lofit apply` / headlab.intervene (hooks)")
    if offsets.A.detach().abs().max() > 0:
        raise InputError("these HeadOffsets have non-zero scalings A: z' = (1 + A) ⊙ z is not a bias, so they "
                         "cannot be exported; export the offsets of `headlab lofit train` (A = 0)")
    deltas = {}
    with torch.no_grad():
        for layer in sorted({p[0] for p in offsets.pairs}):
            # A float64 copy of o_proj (one layer's, small): the bias is rounded once, to the model's dtype.
            proj = copy.deepcopy(arch.o_proj(layer)).double()
            device = next(proj.parameters()).device
            z = torch.zeros(arch.n_heads, arch.head_dim, dtype=torch.float64, device=device)
            for row, (lay, h) in enumerate(offsets.pairs):
                if lay == layer:
                    z[h] = offsets.v.detach()[row].to(device=device, dtype=torch.float64)
            flat = z.reshape(1, -1)
            deltas[layer] = (proj(flat) - proj(torch.zeros_like(flat)))[0]  # W_O v, the bias cancels
    return deltas


def _with_bias_config(model: nn.Module, arch) -> object:
    """The config under which the model's class builds o_proj with a bias (the same config when it has one)."""
    config = copy.deepcopy(model.config)
    if getattr(arch.o_proj(0), "bias", None) is not None:
        return config
    for flag in BIAS_FLAGS:
        if getattr(config, flag, None) is False:
            setattr(config, flag, True)
            with torch.device("meta"):
                probe = type(model)(config)
            layers = _layers_of(probe, model, arch)
            if getattr(layers[0].get_submodule(arch.family.o_proj), "bias", None) is not None:
                return config
            setattr(config, flag, False)
    raise InputError(f"{type(model).__name__} has no bias on o_proj and its transformers class offers no config flag "
                     "for one, so the offsets cannot be baked into a plain checkpoint; apply them with "
                     "`headlab lofit apply` / headlab.intervene instead")


def _layers_of(probe: nn.Module, model: nn.Module, arch) -> nn.ModuleList:
    """The layer list of ``probe`` at the path the real model's layers live at."""
    path = next(name for name, module in model.named_modules() if module is arch.layers)
    return probe.get_submodule(path)


def export_offsets(loaded, offsets: HeadOffsets, out: str | Path) -> Path:
    """Write ``loaded`` with ``offsets`` baked into o_proj's bias to folder ``out`` (config, safetensors,
    tokenizer), loadable by ``AutoModelForCausalLM.from_pretrained``. Refuses an existing ``out``."""
    out = Path(out)
    if out.exists():
        raise InputError(f"{out} already exists; choose a new folder for the exported model")
    if not out.parent.exists():
        raise InputError(f"the folder {out.parent} does not exist; create it first")
    deltas = o_proj_deltas(loaded, offsets)
    model, arch = loaded.model, loaded.arch
    config = _with_bias_config(model, arch)
    clone = copy.deepcopy(model)
    clone.config = config
    with torch.device("meta"):
        probe = type(model)(config)
    # Every Linear the new config gives a bias (o_proj, and q/k/v under Llama's attention_bias) gets one.
    for name, module in probe.named_modules():
        if isinstance(module, nn.Linear) and module.bias is not None:
            target = clone.get_submodule(name)
            if getattr(target, "bias", None) is None:
                weight = target.weight
                target.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device),
                                           requires_grad=False)
    clone_layers = _layers_of(clone, model, arch)
    with torch.no_grad():
        for layer, delta in deltas.items():
            proj = clone_layers[layer].get_submodule(arch.family.o_proj)
            proj.bias += delta.to(proj.bias.dtype)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        clone.save_pretrained(tmp)
        if loaded.tokenizer is not None and hasattr(loaded.tokenizer, "save_pretrained"):
            loaded.tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
