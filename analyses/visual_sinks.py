"""Visual attention sinks (Kang et al., ICLR 2025; methods.md §2).

Sink dimensions D_sink are found from the backbone's massive activations (the corrected criterion of
analyses/sinks.py, Sun et al.: |x| > 100 and ≥ 1000× the median |x| of the layer's whole hidden state),
with the papers' lists kept as a check (``KNOWN_SINK_DIMS``). On the INPUT x of layer l,
φ(x) = max_{d∈D_sink} |x_d / RMS(x)|, RMS(x) = sqrt(mean(x²) + 1e-6) (no norm weight); tokens with
φ > τ (20) are sinks, and visual sinks are sinks at image positions. Per visual sink the analysis reports
the mean attention it receives per head (``key_mass / key_count``) and its value contribution
‖α · W_O,h v_h‖ (mean attention received × the norm of the head's value vector through o_proj).

Note φ ≤ sqrt(hidden size) (all of x's energy in one sink dim): τ = 20 was set for 3584–5120-dim
backbones; for smollm2-135m (576 dims) φ cannot exceed 24, for the tiny twins (64) 8. Pass a smaller τ
there (``tau``), and say so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from headlab.errors import InputError

# [code]/[paper] lists of methods.md §2 (hidden sizes 4096 / 5120 / 3584).
KNOWN_SINK_DIMS: dict[str, list[int]] = {
    "llava-1.5-7b": [1415, 2533],
    "llava-1.5-13b": [2100, 4743],
    "qwen2-vl-7b": [458, 2570],
    "internvl2-8b": [3584],
}
MASSIVE_ABS = 100.0
MASSIVE_RATIO = 1000.0
TAU = 20.0


def massive_entries(hidden: torch.Tensor, real: torch.Tensor, *, massive_abs: float = MASSIVE_ABS,
                    massive_ratio: float = MASSIVE_RATIO) -> list[dict]:
    """Massive activations in ``hidden`` ``[layer, batch, pos, dim]`` (layer inputs) on ``real`` ``[batch, pos]``
    tokens: the top |x| of each (layer, token) against the median |x| of the layer's hidden state (per input)."""
    out = []
    for layer in range(hidden.shape[0]):
        for b in range(hidden.shape[1]):
            x = hidden[layer, b][real[b]].float()  # [n, dim]
            if not len(x):
                continue
            median = x.abs().median().clamp(min=1e-12)
            top, dim = x.abs().max(dim=-1)
            hits = (top > massive_abs) & (top / median >= massive_ratio)
            positions = real[b].nonzero().flatten()
            for i in hits.nonzero().flatten().tolist():
                out.append({"layer": layer, "batch": b, "position": int(positions[i]), "dim": int(dim[i]),
                            "value": float(x[i, dim[i]]), "ratio_to_layer_median": float(top[i] / median)})
    return out


def sink_dims(entries: Sequence[dict], min_count: int = 1) -> list[int]:
    """Dimensions that carry massive activations at least ``min_count`` times, most frequent first."""
    if not entries:
        return []
    counts = pd.DataFrame(entries).groupby("dim").size().sort_values(ascending=False)
    return [int(d) for d, n in counts.items() if n >= min_count]


def phi(x: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """φ(x) = max_{d ∈ dims} |x_d / RMS(x)| over the last axis: ``[..., dim]`` -> ``[...]``."""
    if not dims:
        raise InputError("no sink dimensions: find them first (find_sink_dims) or pass known ones")
    x = x.float()
    rms = (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
    return (x[..., list(dims)] / rms).abs().amax(-1)


@torch.no_grad()
def layer_inputs(loaded, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[layer, batch, pos, dim]``: the input of every decoder layer of the language model."""
    out = loaded.model(**tensors, output_hidden_states=True)
    hidden = out.hidden_states
    return torch.stack(list(hidden[: loaded.arch.n_layers])).float().cpu()


def find_sink_dims(loaded, tensors: dict[str, torch.Tensor], *, min_count: int = 1) -> tuple[list[int], list[dict]]:
    """Sink dimensions of ``loaded``'s language model from the massive activations of these inputs."""
    hidden = layer_inputs(loaded, tensors)
    real = tensors["attention_mask"].bool().cpu()
    entries = massive_entries(hidden, real)
    return sink_dims(entries, min_count), entries


@dataclass
class VisualSinks:
    """``phi`` ``[layer, batch, pos]``; ``visual`` ``[layer, batch, pos]`` bool (sink ∩ image); ``table``: one row
    per (layer, sample, visual-sink position) with its attention received and value contribution per head."""

    dims: list[int]
    phi: torch.Tensor
    visual: torch.Tensor
    table: pd.DataFrame


@torch.no_grad()
def visual_sinks(loaded, inputs, dims: Sequence[int] | None = None, *, tau: float = TAU,
                 text_inputs: dict[str, torch.Tensor] | None = None) -> VisualSinks:
    """Visual sinks of ``inputs`` (an ``LvlmInputs``). ``dims``: the sink dims (None: found from the massive
    activations of ``text_inputs`` if given, else of these inputs)."""
    from headlab.probes.attention import AttentionProbe

    arch = loaded.arch
    tensors = {k: v.to(loaded.device) for k, v in inputs.tensors.items()}
    if dims is None:
        dims, _ = find_sink_dims(loaded, text_inputs if text_inputs is not None else tensors)
    dims = list(dims)
    handles = []
    v_out: dict[int, torch.Tensor] = {}
    for layer in range(arch.n_layers):
        v_proj = getattr(arch.attention(layer), "v_proj", None)
        if v_proj is None:
            raise InputError(f"{loaded.name}: visual sinks need a v_proj in each attention layer")
        def grab(module, args, output, layer=layer):
            v_out[layer] = output.detach().float()  # [batch, pos, kv_head · d_head]
        handles.append(v_proj.register_forward_hook(grab))
    try:
        with AttentionProbe(loaded) as probe:
            out = loaded.model(**tensors, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    hidden = torch.stack(list(out.hidden_states[: arch.n_layers])).float().cpu()  # [layer, batch, pos, dim]
    phis = phi(hidden, dims) if dims else torch.zeros(hidden.shape[:3])
    image = inputs.image_mask.cpu()
    visual = (phis > tau) & image[None]
    rows = []
    group = arch.n_heads // arch.n_kv_heads
    for layer, b, pos in visual.nonzero().tolist():
        stats = probe.last[layer]
        received = (stats.key_mass[b, :, pos] / stats.key_count[b, pos].clamp(min=1)).float().cpu()  # [head]
        v = v_out[layer][b, pos].reshape(arch.n_kv_heads, -1)  # [kv head, d_head]
        w_o = arch.o_proj(layer).weight.float()  # [hidden, head · d_head]
        ov = torch.stack([(w_o[:, h * v.shape[1]:(h + 1) * v.shape[1]] @ v[h // group].to(w_o.device)).norm()
                          for h in range(arch.n_heads)]).cpu()
        first = int(inputs.first_real[b])
        rows.append({"layer": layer, "sample": b, "position": pos - first, "phi": float(phis[layer, b, pos]),
                     "mean_attention_received": float(received.mean()),
                     "max_head_attention_received": float(received.max()),
                     "value_contribution_mean": float((received * ov).mean()),
                     "value_contribution_max": float((received * ov).max())})
    return VisualSinks(dims, phis, visual, pd.DataFrame(rows))


def sink_patch_figure(image, sinks: VisualSinks, inputs, sample: int = 0, layer: int | None = None):
    """The image with its visual-sink patches outlined (square grids: LLaVA-style image tokens)."""
    import math

    import numpy as np
    import plotly.graph_objects as go

    spans = inputs.image_spans[sample]
    if not spans:
        raise InputError(f"sample {sample} has no image")
    start, stop = spans[0]
    n = stop - start
    side = int(math.isqrt(n))
    if side * side != n:
        raise InputError(f"{n} image tokens are not a square grid; the patch overlay needs one (LLaVA-style)")
    first = int(inputs.first_real[sample])
    visual = sinks.visual[:, sample] if layer is None else sinks.visual[layer: layer + 1, sample]
    hit = visual.any(0)[first + start: first + stop].reshape(side, side)
    arr = np.asarray(image.convert("RGB"))
    fig = go.Figure(go.Image(z=arr))
    h, w = arr.shape[:2]
    for r, c in hit.nonzero().tolist():
        fig.add_shape(type="rect", x0=c * w / side - 0.5, x1=(c + 1) * w / side - 0.5,
                      y0=r * h / side - 0.5, y1=(r + 1) * h / side - 0.5, line=dict(color="red", width=3))
    where = "any layer" if layer is None else f"layer {layer}"
    fig.update_layout(title=f"visual sinks ({where}; φ > τ in dims {sinks.dims})")
    return fig
