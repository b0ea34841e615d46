"""Visual sinks by origin: does a sink on an image token come from the vision encoder or from the language model?

Two kinds of outlier tokens meet in an LVLM's image span. **Encoder-side**: ViTs grow a few high-norm patch
tokens that hold global information and soak up attention (Darcet et al., "Vision Transformers Need Registers",
ICLR 2024), some of them close to the CLS token. **LM-side**: the language model's own sinks, tokens whose input
carries the backbone's massive activations in its sink dimensions (Kang et al., ICLR 2025; methods.md §2:
φ > τ). An LVLM can inherit the first kind through its projector, or make the second kind out of ordinary patches.

Per image token (the patch the projector read, in order: LLaVA's "default" strategy drops CLS only):

- ``vit_norm`` / ``vit_norm_ratio``: ‖feature‖ at the projector's input layer, and its ratio to the image's
  median patch norm; ``vit_high_norm``: ratio ≥ ``high_norm_ratio`` (2: Darcet et al.'s outliers sit at 5–10×
  the median in large ViTs; 2 keeps the milder outliers of small ones, reported as such);
- ``cls_cosine``: cosine with the CLS token at the same layer; ``cls_like``: ≥ ``cls_cosine_min`` (0.8);
- ``lm_phi_max``: max over LM layers of φ; ``lm_sink``: ``lm_phi_max`` > τ.

The summary counts each kind and their overlap: P(LM sink | encoder high-norm) against P(LM sink | not), with
Fisher's exact test. Analyses do not care which model produced the numbers: any LLaVA-layout model works.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from headlab.errors import InputError

HIGH_NORM_RATIO = 2.0
CLS_COSINE_MIN = 0.8


@dataclass
class SinkOrigin:
    table: pd.DataFrame  # one row per (sample, image token)
    summary: dict


def _vision_parts(loaded):
    model = loaded.model
    inner = getattr(model, "model", model)
    tower = getattr(inner, "vision_tower", None)
    layer = getattr(model.config, "vision_feature_layer", None)
    strategy = getattr(model.config, "vision_feature_select_strategy", None)
    if tower is None or layer is None or strategy != "default" or not isinstance(layer, int):
        raise InputError(f"visual sinks by origin read a LLaVA-layout vision tower (one feature layer, CLS dropped); "
                         f"{loaded.name} has none: use llava-real, llava-smol, tiny-llava or a LLaVA-1.5 checkpoint")
    return tower, layer


@torch.no_grad()
def encoder_outliers(loaded, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norms, cls_cosine)``, each ``[batch, patches]``: the projector's input tokens (CLS dropped)."""
    tower, layer = _vision_parts(loaded)
    dtype = next(tower.parameters()).dtype
    hidden = tower(pixel_values.to(loaded.device, dtype), output_hidden_states=True).hidden_states[layer].float()
    cls, patches = hidden[:, :1], hidden[:, 1:]  # [b, 1, d], [b, n, d]
    return patches.norm(dim=-1).cpu(), torch.nn.functional.cosine_similarity(patches, cls, dim=-1).cpu()


def sinks_by_origin(loaded, inputs, dims: Sequence[int] | None = None, *, tau: float = 20.0,
                    high_norm_ratio: float = HIGH_NORM_RATIO, cls_cosine_min: float = CLS_COSINE_MIN,
                    text_inputs: dict[str, torch.Tensor] | None = None) -> SinkOrigin:
    """Encoder-side and LM-side sinks of ``inputs`` (an ``LvlmInputs`` with one image per sample)."""
    from scipy.stats import fisher_exact

    from headlab.analyses.visual_sinks import visual_sinks

    lm = visual_sinks(loaded, inputs, dims, tau=tau, text_inputs=text_inputs)
    norms, cosine = encoder_outliers(loaded, inputs.tensors["pixel_values"])
    phi_max = lm.phi.max(dim=0).values  # [batch, pos]
    rows = []
    for b in range(norms.shape[0]):
        positions = [p for start, end in inputs.image_spans[b] for p in range(start, end)]
        if len(positions) != norms.shape[1]:
            raise InputError(f"sample {b} has {len(positions)} image tokens but the tower gave {norms.shape[1]} "
                             "patches: one image per sample, LLaVA's default feature selection")
        first = int(inputs.first_real[b])
        median = norms[b].median().clamp(min=1e-12)
        for i, pos in enumerate(positions):
            absolute = pos + first
            rows.append({"sample": b, "patch": i, "position": pos, "vit_norm": float(norms[b, i]),
                         "vit_norm_ratio": float(norms[b, i] / median), "cls_cosine": float(cosine[b, i]),
                         "lm_phi_max": float(phi_max[b, absolute])})
    table = pd.DataFrame(rows)
    table["vit_high_norm"] = table["vit_norm_ratio"] >= high_norm_ratio
    table["cls_like"] = table["cls_cosine"] >= cls_cosine_min
    table["lm_sink"] = table["lm_phi_max"] > tau
    both = int((table.vit_high_norm & table.lm_sink).sum())
    high, sink, n = int(table.vit_high_norm.sum()), int(table.lm_sink.sum()), len(table)
    contingency = [[both, high - both], [sink - both, n - high - (sink - both)]]
    odds, p = fisher_exact(contingency, alternative="greater") if n else (float("nan"), float("nan"))
    summary = {
        "model": loaded.name, "images": int(norms.shape[0]), "image_tokens": n, "tau": tau,
        "sink_dims": list(lm.dims), "high_norm_ratio": high_norm_ratio, "cls_cosine_min": cls_cosine_min,
        "encoder_high_norm_tokens": high, "encoder_cls_like_tokens": int(table.cls_like.sum()),
        "lm_sink_tokens": sink, "both": both,
        "p_lm_sink_given_high_norm": both / high if high else None,
        "p_lm_sink_given_not_high_norm": (sink - both) / (n - high) if n - high else None,
        "fisher_odds_ratio": float(odds), "fisher_p_one_sided": float(p),
        "max_vit_norm_ratio": float(table.vit_norm_ratio.max()) if n else None,
        "max_lm_phi_on_image_tokens": float(table.lm_phi_max.max()) if n else None,
    }
    return SinkOrigin(table, summary)
