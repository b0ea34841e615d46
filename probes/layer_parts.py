"""The layer-parts probe: MLP input, attention output, MLP output and residual of every decoder layer.

For the secondary-sink analysis (Wong et al.) each part is compared with the residual stream at a
few reference positions (the BOS candidates) of the same layer. The probe reduces on the fly: it
keeps cosines and norms, ``O(part · layer · batch · reference · position)`` numbers per forward pass,
never the hidden states themselves.

Parts, for a pre-norm decoder layer ``h_mid = h_in + attn(norm1(h_in)); h_out = h_mid + mlp(norm2(h_mid))``:
- ``mlp_in``: the MLP's input ``norm2(h_mid)`` (forward pre-hook on the MLP module)
- ``attn_out``: the attention block's output after ``o_proj`` (forward hook on ``o_proj``)
- ``mlp_out``: the MLP's output (down projection)
- ``resid``: the layer output ``h_out`` (``hook_resid_post``)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PARTS = ("mlp_in", "attn_out", "mlp_out", "resid")


@dataclass
class LayerPartsSummary:
    """``cos [part, layer, batch, reference, position]``: cosine of each part at each position with the
    residual ``h_l`` at reference position r of the same layer (NaN where a part's width differs from the
    residual's, as in BERT's intermediate MLP input). ``norm [part, layer, batch, position]``: L2 norms."""

    cos: torch.Tensor
    norm: torch.Tensor

    def part(self, name: str) -> int:
        return PARTS.index(name)


def _cosine_to(x: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    """x ``[batch, position, d]``, refs ``[batch, reference, d]`` -> ``[batch, reference, position]``;
    0 where either vector is zero (a zero attention output aligns with nothing)."""
    x, refs = x.float(), refs.float()
    dots = torch.einsum("brd,bpd->brp", refs, x)
    norms = refs.norm(dim=-1)[:, :, None] * x.norm(dim=-1)[:, None, :]
    return torch.where(norms > 0, dots / norms.clamp(min=1e-30), torch.zeros_like(dots))


class LayerPartsProbe:
    """Context manager with hooks on every decoder layer; ``summary()`` after each forward pass.

    ``n_reference``: how many leading positions serve as references (3 covers the chat-template BOS
    choice of Wong et al.). Positions count from the start of the row: use right padding.
    """

    def __init__(self, loaded, n_reference: int = 3):
        self.arch = loaded.arch
        self.n_reference = n_reference
        self._parts: dict[int, dict[str, torch.Tensor]] = {}
        self._rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles: list = []

    def _keep(self, layer: int, part: str):
        def hook(_module, args, output=None):
            value = args[0] if output is None else output
            value = value[0] if isinstance(value, tuple) else value
            self._parts.setdefault(layer, {})[part] = value.detach()

        return hook

    def _finish(self, layer: int):
        def hook(_module, _inputs, output):
            resid = (output[0] if isinstance(output, tuple) else output).detach()
            parts = self._parts.pop(layer, {})
            parts["resid"] = resid
            n_ref = min(self.n_reference, resid.shape[1])
            refs = resid[:, :n_ref]
            batch, n_pos, width = resid.shape
            cos = torch.full((len(PARTS), batch, self.n_reference, n_pos), float("nan"))
            norm = torch.full((len(PARTS), batch, n_pos), float("nan"))
            for i, name in enumerate(PARTS):
                value = parts.get(name)
                if value is None or value.shape[-1] != width or value.shape[1] != n_pos:
                    continue
                cos[i, :, :n_ref] = _cosine_to(value, refs).cpu()
                norm[i] = value.float().norm(dim=-1).cpu()
            self._rows[layer] = (cos, norm)

        return hook

    def summary(self) -> LayerPartsSummary:
        """The last forward pass, stacked over layers; clears the buffer."""
        rows = [self._rows[i] for i in range(self.arch.n_layers)]
        self._rows = {}
        return LayerPartsSummary(torch.stack([r[0] for r in rows], dim=1), torch.stack([r[1] for r in rows], dim=1))

    def __enter__(self) -> LayerPartsProbe:
        arch = self.arch
        for i, layer in enumerate(arch.layers):
            self._handles += [
                arch.mlp(i).register_forward_pre_hook(self._keep(i, "mlp_in")),
                arch.mlp(i).register_forward_hook(self._keep(i, "mlp_out")),
                arch.o_proj(i).register_forward_hook(self._keep(i, "attn_out")),
                layer.register_forward_hook(self._finish(i)),
            ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._parts = {}
