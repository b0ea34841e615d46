"""VHD (Vision-aware Head Divergence) and VHR (Vision-aware Head Reinforcement), He et al., ACL 2025.

VHD[l, h] at a generation step = ‖z_{l,h}(y_t | y_<t, image, text) − z_{l,h}(y_t | y_<t, text)‖₂: the
distance between a head's output (z, the input of o_proj, TransformerLens hook_z) with and without the
image, on the same prefix, at the row that predicts y_t. Without the image means (``remove``):
``"drop"`` (default) the image tokens are removed from the prompt and positions recomputed (the prompt
is re-rendered with no image); ``"blank"`` they stay, fed a uniform grey image of the same size.

T-VHD of a token aggregates its head VHDs: ``"topk_mean"`` the mean of the k largest over all heads,
``"layer_topk_sum"`` the sum over layers of each layer's k largest (k = 8; both are in the literature).
Outlier filtering drops heads whose VHD comes from a surge of ‖z(no image)‖ (VHD > mean + std and
‖z(no image)‖ > mean + std within the layer; a reimplementation, no official code was readable).

VHR scales z of the heads above their layer's median VHD by α = 2 (``HeadScale``), in layers [1] + the
last 14 of a 32-layer LLaVA (scaled with depth: ``vhr_layers``). Selection runs layer by layer within
one forward, so reinforcing earlier layers changes the VHDs later layers see; the no-image reference
stream runs unreinforced beside the image stream with its own KV cache. ``per_step=True`` (default)
selects at every generation step; ``False`` selects once at the first step and reuses the heads.
Only the row that predicts the next token is edited (the last prompt row at prefill, then each new
token), so the edit holds with a KV cache, and the model is bit-exact after the ``with`` block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from headlab.analyses.configs import VhdConfig
from headlab.errors import InputError
from headlab.interventions.z_site import BoundZEdit, HeadScale, ZCall
from headlab.kernels.positions import Positions
from headlab.lvlm import LvlmSample, build_inputs

from .generation import greedy_samples, padding_id
from .no_image import append_continuation, capture_z, without_image

AGGREGATIONS = ("topk_mean", "layer_topk_sum")


def vhr_layers(n_layers: int, n_last: int | None = None) -> list[int]:
    """[1] + the last ``n_last`` layers; default 14 of 32 (the official LLaVA harness), scaled with depth."""
    if n_last is None:
        n_last = max(1, round(14 * n_layers / 32))
    if not 0 < n_last <= n_layers:
        raise InputError(f"--vhr-last {n_last}: choose 1 … {n_layers} layers for a {n_layers}-layer model")
    return sorted({1, *range(n_layers - n_last, n_layers)} & set(range(n_layers)))


@dataclass
class VhdTrace:
    """Per generated token: ``vhd`` ``[batch, step, layer, head]``, ``z_norm_without`` (same shape) and
    ``valid`` ``[batch, step]`` (False after the end of a sample's answer)."""

    vhd: torch.Tensor
    z_norm_without: torch.Tensor
    valid: torch.Tensor
    tokens: torch.Tensor
    layers: list[int] = field(default_factory=list)


@torch.no_grad()
def vhd_of(loaded, samples: Sequence[LvlmSample], continuation: torch.Tensor, *, remove: str = "drop",
           layers: Sequence[int] | None = None, pad_id: int | None = None) -> VhdTrace:
    """VHD at every step of ``continuation`` ``[batch, n]`` (the answer tokens, e.g. generated greedily).

    Two teacher-forced forwards (with and without the image) give the same z as stepping the generation:
    attention is causal, so the row predicting y_t sees exactly y_<t."""
    arch = loaded.arch
    layers = list(range(arch.n_layers)) if layers is None else list(layers)
    pad_id = pad_id if pad_id is not None else padding_id(loaded)
    with_img = build_inputs(loaded, samples, padding_side="left")
    without = build_inputs(loaded, without_image(samples, remove), padding_side="left")
    n = continuation.shape[1]
    zs = []
    for inputs in (with_img, without):
        tensors = {k: v.to(loaded.device) for k, v in append_continuation(inputs, continuation, pad_id).items()}
        with capture_z(loaded, layers) as store:
            loaded.model(**tensors, use_cache=False)
        p = inputs.input_ids.shape[1]
        # rows p-1 … p+n-2 predict y_1 … y_n
        zs.append(torch.stack([store[layer][0][:, p - 1: p - 1 + n] for layer in layers], dim=2))  # [b, n, L, H, d]
    vhd = (zs[0] - zs[1]).norm(dim=-1)
    valid = torch.ones_like(continuation, dtype=torch.bool)
    valid[:, 1:] = continuation[:, :-1] != pad_id  # the row predicting y_t exists when y_{t-1} was real
    valid &= torch.cat([torch.ones_like(valid[:, :1]), (continuation != pad_id)[:, :-1].cumprod(1).bool()], dim=1)
    return VhdTrace(vhd.cpu(), zs[1].norm(dim=-1).cpu(), valid.cpu(), continuation.cpu(), layers)


def outlier_mask(vhd: torch.Tensor, z_norm_without: torch.Tensor) -> torch.Tensor:
    """``[..., layer, head]`` True for heads whose VHD is an activation surge of the no-image run:
    VHD > mean + std and ‖z(no image)‖ > mean + std, both within the layer (over heads)."""
    def above(x: torch.Tensor) -> torch.Tensor:
        return x > x.mean(-1, keepdim=True) + x.std(-1, keepdim=True)

    return above(vhd) & above(z_norm_without)


def t_vhd(vhd: torch.Tensor, *, k: int = 8, aggregation: str = "layer_topk_sum",
          z_norm_without: torch.Tensor | None = None) -> torch.Tensor:
    """Token-level VHD from ``vhd`` ``[..., layer, head]`` -> ``[...]``; outliers (given ``z_norm_without``)
    count as 0. ``topk_mean``: mean of the k largest heads overall; ``layer_topk_sum``: Σ_layers Σ top-k."""
    if aggregation not in AGGREGATIONS:
        raise InputError(f"unknown T-VHD aggregation {aggregation!r}: use one of {', '.join(AGGREGATIONS)}")
    if k < 1:
        raise InputError(f"k must be at least 1, got {k}")
    if z_norm_without is not None:
        vhd = vhd.masked_fill(outlier_mask(vhd, z_norm_without), 0.0)
    if aggregation == "topk_mean":
        flat = vhd.flatten(-2)
        return flat.topk(min(k, flat.shape[-1]), dim=-1).values.mean(-1)
    return vhd.topk(min(k, vhd.shape[-1]), dim=-1).values.sum(-1).sum(-1)


def above_median(vhd: torch.Tensor) -> torch.Tensor:
    """``[..., head]`` True where a head's VHD is above its layer's median (the VHR selection)."""
    return vhd > vhd.median(dim=-1, keepdim=True).values


# ---------------------------------------------------------------------------------------------
# VHR


@dataclass(eq=False)
class VhrScale(HeadScale):
    """HeadScale whose heads are chosen per layer while the layer runs: those above the layer's median VHD,
    VHD computed on the predicting row from this call's z and ``reference[layer]`` ``[batch, head, d_head]``
    (z of the no-image stream at the same step). ``frozen``: selections kept from the first step (``once``).
    ``chosen[layer]``: the last selection ``[batch, head]`` (for reports and tests)."""

    reference: dict = field(default_factory=dict)
    per_step: bool = True
    chosen: dict = field(default_factory=dict)

    def edit_z(self, z: torch.Tensor, call: ZCall, bound: BoundZEdit) -> torch.Tensor:
        if call.layer not in bound.by_layer:
            return z
        rows = call.rows(Positions.of("last")).to(z.device)  # [batch, query]: the predicting row of each sample
        if bool((rows.sum(1) != 1).any()):
            return z  # a padding-only call (never in left-padded generation): nothing to predict
        row_index = rows.int().argmax(1)
        current = z[torch.arange(z.shape[0]), row_index].float()  # [batch, head, d_head]
        if self.per_step or call.layer not in self.chosen:
            ref = self.reference.get(call.layer)
            if ref is None:
                raise InputError(f"VHR: no no-image reference for layer {call.layer} at this step")
            self.chosen[call.layer] = above_median((current - ref.to(current.device)).norm(dim=-1))
        chosen = self.chosen[call.layer] & torch.isin(torch.arange(z.shape[2], device=z.device),
                                                      torch.tensor(bound.heads_of(call.layer), device=z.device))
        scale = torch.where(chosen, torch.tensor(float(self.alpha)), torch.tensor(1.0)).to(z.dtype)  # [batch, head]
        return torch.where(rows[:, :, None, None], z * scale[:, None, :, None], z)


# ---------------------------------------------------------------------------------------------
# The analysis: VHD heatmaps and T-VHD of hallucinated vs correct object tokens


def analyze_vhd(loaded, samples: Sequence[LvlmSample], config: VhdConfig | None = None, *,
                truth: Sequence[set[str]] | None = None, synonyms: dict[str, str] | None = None):
    """Greedy answers, VHD per (layer, head) at every step, T-VHD per token (both aggregations); with ``truth``
    (objects per sample) and ``synonyms``, object tokens are labelled hallucinated or correct."""
    import pandas as pd
    import plotly.graph_objects as go

    from headlab.result import Result

    config = config or VhdConfig()
    config.check()
    arch = loaded.arch
    tok = loaded.text_tokenizer
    rows, sums, counts = [], torch.zeros(arch.n_layers, arch.n_heads), 0
    answers = []
    for start in range(0, len(samples), config.batch_size):
        chunk = list(samples[start:start + config.batch_size])
        tokens = greedy_samples(loaded, chunk, config.max_new_tokens)
        trace = vhd_of(loaded, chunk, tokens, remove=config.remove)
        z_norm = trace.z_norm_without if config.filter_outliers else None
        agg = {a: t_vhd(trace.vhd, k=config.k, aggregation=a, z_norm_without=z_norm) for a in AGGREGATIONS}
        sums += (trace.vhd * trace.valid[..., None, None]).sum((0, 1))
        counts += int(trace.valid.sum())
        for b in range(tokens.shape[0]):
            index = start + b
            answers.append(tok.decode(tokens[b][trace.valid[b]], skip_special_tokens=True).strip())
            for t in range(tokens.shape[1]):
                if not trace.valid[b, t]:
                    continue
                piece = tok.decode(tokens[b, t:t + 1]).strip().lower()
                word = piece.rstrip(".,!?;:")
                obj = None
                if synonyms is not None:
                    obj = synonyms.get(word) or (synonyms.get(word[:-1]) if word.endswith("s") else None)
                status = None
                if obj is not None and truth is not None:
                    status = "correct" if obj in truth[index] else "hallucinated"
                rows.append({"sample": index, "step": t, "token": piece, "object": obj, "status": status,
                             **{f"t_vhd_{a}": float(agg[a][b, t]) for a in AGGREGATIONS}})
    mean_vhd = sums / max(1, counts)
    table = pd.DataFrame(rows)
    by_status = {}
    if len(table) and table["status"].notna().any():
        for status, part in table.dropna(subset=["status"]).groupby("status"):
            by_status[status] = {"tokens": len(part), **{f"mean_t_vhd_{a}": float(part[f"t_vhd_{a}"].mean())
                                                         for a in AGGREGATIONS}}
    heatmap = go.Figure(go.Heatmap(z=mean_vhd.numpy(), colorscale="Viridis", colorbar=dict(title="VHD")))
    heatmap.update_layout(title=f"{loaded.title}: mean VHD per head (image {config.remove})",
                          xaxis_title="head", yaxis_title="layer")
    figures = {"vhd_heatmap": heatmap}
    if by_status:
        box = go.Figure()
        for status in ("correct", "hallucinated"):
            part = table[table["status"] == status]
            box.add_trace(go.Box(y=part["t_vhd_layer_topk_sum"], name=f"{status} ({len(part)})"))
        box.update_layout(title=f"{loaded.title}: T-VHD (layer top-{config.k} sum) of object tokens",
                          yaxis_title="T-VHD")
        figures["t_vhd_objects"] = box
    heads = pd.DataFrame([{"layer": layer, "head": h, "vhd": float(mean_vhd[layer, h])}
                          for layer in range(arch.n_layers) for h in range(arch.n_heads)])
    summary = {"samples": len(samples), "tokens": counts, "remove": config.remove, "k": config.k,
               "top_heads": heads.nlargest(5, "vhd")[["layer", "head", "vhd"]].to_dict("records"),
               "object_tokens": by_status, "answers": answers[:5]}
    report = [f"# VHD on {loaded.title}", "", f"- {len(samples)} samples, {counts} generated tokens, image "
              f"removed by {config.remove}", f"- top heads by mean VHD: {summary['top_heads']}"]
    for status, entry in by_status.items():
        report.append(f"- {status} object tokens: {entry}")
    return Result("vhd", loaded.name, {**config.__dict__}, tables={"heads": heads, "tokens": table},
                  tensors={"mean_vhd": mean_vhd}, figures=figures, summary=summary, report="\n".join(report))
