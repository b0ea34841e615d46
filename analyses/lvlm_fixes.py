"""Training-free hallucination fixes for vision-language models, each a small dataclass over headlab's
interventions, composable, generated batched with the KV cache through headlab's attention function.

- ``Var`` (Kang et al., ICLR 2025): visual attention redistribution. At prefill each layer's sinks are
  found on that layer's input, φ(x) = max_{d∈D_sink} |x_d / RMS(x)| > τ (D_sink from the backbone's massive
  activations unless given); text sinks are the sinks outside the image, visual sinks those inside. In each
  head and query row (the text after the image, then each new token) whose image mass is ≥ ``summ`` and whose
  visual non-sink share Σ_non-sink A / (Σ_image A + 1e-6 · n_image) is ≥ ``rho``, sinks keep ``p`` of their
  attention and the freed mass goes to the image's non-sink tokens in proportion to their attention
  (``paper_semantics``: sinks keep 1 − p). Layers 2 … L−1, the last included. A recombination of group
  partial outputs, no second attention pass.
- ``Pai`` (Liu et al., ECCV 2024, "Paying more attention to image"): s += α|s| on the image keys of the last
  query row, layers [2, L), α = 0.2. Optional guidance (``cfg``): log p = γ log p(y | image) − (γ − 1) log p(y |
  no image) over the tokens whose image-conditioned probability is ≥ β · max (the plausibility cutoff); the
  boost is not applied in the no-image branch. A second pass by definition.
- ``Paint`` (Arif et al., 2025): local tokens = the top 25% of patches by CLS→patch attention in the vision
  tower's first layer (summed over heads); summary tokens = the IQR outliers (> Q3 + 1.5 IQR) of CLS→patch
  attention in its second-to-last layer, taken out of the local set. s += α|s| (0.7) on local and β|s| (0.3)
  on summary keys, last query row, layers [2, L), every step; per image of a batch.
- ``Vaf`` (ClearSight, Yin et al., CVPR 2025): in the middle layers (9–14 of LLaVA's 32, scaled with depth)
  scores of image keys × 1.15 and of the keys before the image × 0.95, before the softmax, for the text after
  the image; spans from the processor. ``span="before-image"`` (default, the official code: every key before
  the first image token, LLaVA-1.5's first 35 = BOS, system prompt and "USER: ") or ``"system"`` (the system
  turn only, headlab's earlier reading of the paper's "system prompt").
- ``Vhr`` (He et al., ACL 2025; analyses/vhd.py): z of the heads above their layer's median VHD × α.
- ``Vcd`` (Leng et al., CVPR 2024, "Visual Contrastive Decoding"): every step's next-token logits are computed
  twice, with the image and with the image's preprocessed pixels under forward-diffusion noise (step 500 of
  1000), and decoding is greedy on (1 + α)·logits − α·logits_distorted (α = 1) over the tokens whose
  probability with the image is ≥ β · max (β = 0.1), −inf elsewhere. The distorted branch has its own KV cache
  and sees no edit. A second pass by definition.

``adaptive="entropy"`` (PAI, VAF; default ``"off"``), after AdaVBoost (Zhang et al., 2026, "Token-Level Adaptive
Visual Attention Boosting"): the edit's strength at each decoding step is its base strength × g(s), s the
normalised entropy H / log V of the model's own next-token distribution at the previous step (at the first step,
the unedited prompt's last position), g(s) = s. A confident step (s = 0) gets no boost, a uniform one (s = 1) the
full boost; per sample of the batch. AdaVBoost's own signal also weighs visual grounding; headlab uses the
entropy part alone.

``control=True`` swaps each method's choice for a random one of the same size (the baseline a real effect
must beat): random non-image keys (PAI, VAF), random patches (PAINT), random image tokens as visual sinks
(VAR), random heads (VHR). VCD chooses no tokens or heads and has no control.

``generate_fixed(loaded, samples, [Pai(), …])`` runs greedy generation with the methods together.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch

from headlab.errors import InputError
from headlab.interventions import INTERVENTIONS, Intervention, Positions, ScoreBoost, ScoreScale, register_intervention
from headlab.interventions.context import is_paused, paused
from headlab.interventions.visual_redistribute import VisualRedistribute
from headlab.lvlm import LvlmInputs, LvlmSample, build_inputs


class _Fixes(Mapping):
    """The fixes among ``INTERVENTIONS``, by name: one registry for every edit, read here as the fixes' table."""

    def __getitem__(self, name: str) -> type[FixMethod]:
        cls = INTERVENTIONS.get(name)
        if not (isinstance(cls, type) and issubclass(cls, FixMethod)):
            raise KeyError(name)
        return cls

    def __iter__(self) -> Iterator[str]:
        return (n for n, c in list(INTERVENTIONS.items()) if isinstance(c, type) and issubclass(c, FixMethod))

    def __len__(self) -> int:
        return sum(1 for _ in self)


FIXES: Mapping[str, type[FixMethod]] = _Fixes()
register_fix = register_intervention  # a fix is an intervention of the "composed" site


@dataclass
class FixContext:
    """One batch: the model, its samples and their inputs (left-padded, spans counted from the first real token)."""

    loaded: object
    samples: Sequence[LvlmSample]
    inputs: LvlmInputs
    # Per-batch state of each method, keyed by id(method): what a method sets up in ``edits`` and uses in
    # ``active`` lives here, not on the method, so one method object may serve two models (or runs) at once.
    runs: dict = field(default_factory=dict, repr=False)

    @property
    def n_layers(self) -> int:
        return self.loaded.arch.n_layers

    def rng(self, seed: int, salt: str) -> random.Random:
        return random.Random(f"{seed}:{salt}")

    def image_keys(self) -> Positions:
        return Positions.per_sample([self.inputs.image_positions(b) for b in range(len(self.samples))])

    def text_after_rows(self) -> Positions:
        return Positions.per_sample([f"from:{self.inputs.text_after[b]}" for b in range(len(self.samples))])

    def random_text_keys(self, seed: int, salt: str) -> Positions:
        """Per sample, as many random non-image prompt keys as it has image keys (or all of them, if fewer)."""
        rng = self.rng(seed, salt)
        specs = []
        for b in range(len(self.samples)):
            n = int(self.inputs.real_mask[b].sum())
            image = {p for s, e in self.inputs.image_spans[b] for p in range(s, e)}
            others = [p for p in range(n) if p not in image]
            specs.append(_spans(sorted(rng.sample(others, min(len(image), len(others))))))
        return Positions.per_sample(specs)


class FixMethod(Intervention):
    """A fix: a composed intervention. Per batch of images it names the edits it installs (``edits``), and what
    else it needs while generating (hooks, a no-image reference stream, a logits processor); ``generate_fixed``
    runs it. ``headlab.intervene`` takes its edits, not the fix itself, which needs the batch's images."""

    site: ClassVar[str] = "composed"
    needs_reference: ClassVar[bool] = False
    has_control: ClassVar[bool] = True  # False: the method chooses nothing a random control could swap (VCD)

    def edits(self, ctx: FixContext) -> list[Intervention]:
        return []

    @contextlib.contextmanager
    def active(self, ctx: FixContext, stream) -> Iterator[None]:
        """Hooks that run while the batch generates (inside the ``intervene`` block)."""
        yield

    def logits_processor(self, ctx: FixContext, stream):
        return None

    def reference_layers(self, ctx: FixContext) -> list[int]:
        return []

    def default_layers(self, n_layers: int) -> Sequence[int]:
        """The layers the method edits when ``layers`` is not given (PAI, PAINT, VAR: 2 … L−1)."""
        return range(2, n_layers)

    def layers_for(self, n_layers: int) -> list[int]:
        """``layers`` if given, else the default for this depth; a layer the model lacks is an ``InputError``."""
        given = getattr(self, "layers", None)
        layers = list(self.default_layers(n_layers) if given is None else given)
        bad = [layer for layer in layers if not 0 <= layer < n_layers]
        if bad:
            raise InputError(f"{self.name.upper()}: layers {bad} do not exist in a {n_layers}-layer model")
        return layers

    def settings(self) -> dict:
        """The settings (the dataclass fields shown in its repr; per-batch state is hidden from it)."""
        return {"method": self.name, **{f.name: getattr(self, f.name) for f in fields(self) if f.repr}}


# ---------------------------------------------------------------------------------------------------
# Adaptive strength (PAI, VAF)

ADAPTIVE = ("off", "entropy")


def normalised_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H(softmax(logits)) / log V of each row: ``[..., vocab]`` -> ``[...]`` fp32 in [0, 1] (0 one-hot, 1 uniform).

    V is the width of the logits (the model's vocabulary, padding ids included); ``entr`` takes 0 · log 0 = 0,
    so a one-hot row (the other logits −inf or far below) is exactly 0."""
    p = torch.softmax(logits.float(), dim=-1)
    return (torch.special.entr(p).sum(dim=-1) / math.log(logits.shape[-1])).clamp(0.0, 1.0)


def adaptive_gain(signal: torch.Tensor) -> torch.Tensor:
    """g(s) = s: the fraction of the base strength a step gets from its signal ``[batch]`` in [0, 1].

    Linear, the simplest map with g(0) = 0 (a confident step is left alone) and g(1) = 1 (a uniform step gets
    the method as published); AdaVBoost calibrates its own map on its risk score, which headlab does not copy."""
    return signal


@torch.no_grad()
def prompt_entropy(ctx: FixContext) -> torch.Tensor:
    """``[batch]`` normalised entropy of the unedited model's next-token distribution at each prompt's last
    position: the signal of the first step, which has no previous step. One plain forward per batch, shared by
    every adaptive method of the batch (``ctx.runs``); it runs before any edit or hook is installed."""
    if "prompt_entropy" not in ctx.runs:
        out = ctx.loaded.model(**ctx.inputs.tensors, logits_to_keep=1)
        ctx.runs["prompt_entropy"] = normalised_entropy(out.logits[:, -1]).cpu()  # left padding: the last column
    return ctx.runs["prompt_entropy"]


class AdaptiveBoost:
    """``adaptive="entropy"`` for a fix whose edits are ``ScoreBoost`` / ``ScoreScale`` (PAI, VAF): each edit's
    per-sample ``strength`` is g(normalised entropy of the previous step's next-token distribution).

    The signal is read by a forward hook on the model (the model's own logits, before any logits processor such
    as PAI's guidance); forwards of the reference streams (paused) are not steps and are skipped. Per batch:
    ``ctx.runs[id(method)]`` holds the edits and, in ``found``, the strength each step used, ``[batch]`` each."""

    adaptive: str

    def initial_strength(self, ctx: FixContext) -> torch.Tensor | None:
        """The first step's strength ``[batch]`` (None when not adaptive: the edits keep their full strength)."""
        return adaptive_gain(prompt_entropy(ctx)) if self.adaptive == "entropy" else None

    def track(self, ctx: FixContext, edits: list[Intervention]) -> list[Intervention]:
        """Keep ``edits`` for ``adapting`` (when adaptive); returns them."""
        if self.adaptive == "entropy":
            ctx.runs[id(self)] = {"edits": edits, "found": []}
        return edits

    @contextlib.contextmanager
    def adapting(self, ctx: FixContext) -> Iterator[None]:
        if self.adaptive != "entropy":
            yield
            return
        run = ctx.runs[id(self)]

        def step(module, args, output):
            logits = getattr(output, "logits", None)
            if is_paused() or logits is None:  # a reference stream's forward, not a step of this generation
                return None
            run["found"].append(run["edits"][0].strength.clone())
            strength = adaptive_gain(normalised_entropy(logits[:, -1].detach())).cpu()  # [batch], for the next step
            for edit in run["edits"]:
                edit.strength = strength
            return None

        handle = ctx.loaded.model.register_forward_hook(step)
        try:
            yield
        finally:
            handle.remove()


# ---------------------------------------------------------------------------------------------------
# PAI


@register_fix("pai")
@dataclass
class Pai(AdaptiveBoost, FixMethod):
    """s += alpha · |s| on image keys, last query row, ``layers`` (default [2, L)); ``cfg``: image guidance;
    ``adaptive="entropy"``: alpha × the previous step's normalised entropy (``AdaptiveBoost``)."""

    alpha: float = 0.2
    layers: list[int] | None = None
    cfg: bool = False
    gamma: float = 1.1
    plausibility: float = 0.1
    control: bool = False
    seed: int = 0
    adaptive: str = "off"

    @property
    def needs_reference(self) -> bool:  # type: ignore[override]
        return self.cfg

    def edits(self, ctx: FixContext) -> list[Intervention]:
        layers = self.layers_for(ctx.n_layers)
        keys = ctx.random_text_keys(self.seed, "pai") if self.control else ctx.image_keys()
        return self.track(ctx, [ScoreBoost([(layer, None) for layer in layers], keys=keys, alpha=self.alpha,
                                           rows="last", strength=self.initial_strength(ctx))])

    def active(self, ctx: FixContext, stream):
        return self.adapting(ctx)

    def logits_processor(self, ctx: FixContext, stream):
        return GuidanceProcessor(stream, self.gamma, self.plausibility) if self.cfg else None


class GuidanceProcessor:
    """PAI's guidance: γ · log p(y | image) − (γ − 1) · log p(y | no image) where p(y | image) ≥ β · max, else −inf."""

    def __init__(self, stream, gamma: float, plausibility: float):
        self.stream, self.gamma, self.plausibility = stream, gamma, plausibility

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        with_image = torch.log_softmax(scores.float(), dim=-1)
        without = torch.log_softmax(self.stream.logits.to(scores.device), dim=-1)
        guided = self.gamma * with_image - (self.gamma - 1.0) * without
        cutoff = with_image.max(dim=-1, keepdim=True).values + torch.log(torch.tensor(self.plausibility))
        return torch.where(with_image >= cutoff, guided, torch.finfo(guided.dtype).min).to(scores.dtype)


# ---------------------------------------------------------------------------------------------------
# PAINT


@register_fix("paint")
@dataclass
class Paint(FixMethod):
    """Local (top ``local_fraction`` by CLS attention, vision layer 0) += alpha|s|, summary (IQR outliers at
    vision layer −2) += beta|s|, on the last query row of ``layers`` (default [2, L))."""

    alpha: float = 0.7
    beta: float = 0.3
    local_fraction: float = 0.25
    layers: list[int] | None = None
    control: bool = False
    seed: int = 0

    def edits(self, ctx: FixContext) -> list[Intervention]:
        layers = self.layers_for(ctx.n_layers)
        first, second_last = cls_attention(ctx)
        local_specs, summary_specs = [], []
        rng = ctx.rng(self.seed, "paint")
        chosen = ctx.runs.setdefault(id(self), {}).setdefault("found", [])  # per sample: the tokens it boosts
        for b in range(len(ctx.samples)):
            spans = ctx.inputs.image_spans[b]
            local_pos, summary_pos = [], []
            for i, (start, stop) in enumerate(spans):
                a0, a2 = first[b][i], second_last[b][i]
                if len(a0) != stop - start:
                    raise InputError(f"PAINT maps vision patches one to one onto image tokens: image {i} of sample "
                                     f"{b} has {stop - start} tokens for {len(a0)} patches ({ctx.loaded.name})")
                local, summary = paint_tokens(a0, a2, self.local_fraction)
                if self.control:
                    shuffled = rng.sample(range(len(a0)), len(a0))
                    n_local = len(local)
                    local, summary = sorted(shuffled[:n_local]), sorted(shuffled[n_local:n_local + len(summary)])
                local_pos += [start + p for p in local]
                summary_pos += [start + p for p in summary]
            chosen.append({"local": local_pos, "summary": summary_pos})
            local_specs.append(_spans(sorted(local_pos)))
            summary_specs.append(_spans(sorted(summary_pos)))
        heads = [(layer, None) for layer in layers]
        return [ScoreBoost(heads, keys=Positions.per_sample(local_specs), alpha=self.alpha, rows="last"),
                ScoreBoost(heads, keys=Positions.per_sample(summary_specs), alpha=self.beta, rows="last")]


def paint_tokens(first_layer: torch.Tensor, second_last: torch.Tensor, local_fraction: float = 0.25
                 ) -> tuple[list[int], list[int]]:
    """PAINT's token sets of one image from CLS→patch attention ``[patch]`` at vision layer 0 and −2.

    Local: the top ``ceil(fraction · P)`` patches of the first layer; summary: patches above Q3 + 1.5 IQR of the
    second-to-last layer (linear-interpolated quartiles), removed from the local set."""
    n = len(first_layer)
    k = max(1, int(-(-local_fraction * n // 1)))
    local = set(torch.topk(first_layer.float(), k).indices.tolist())
    q1, q3 = torch.quantile(second_last.float(), torch.tensor([0.25, 0.75])).tolist()
    summary = sorted((second_last.float() > q3 + 1.5 * (q3 - q1)).nonzero().flatten().tolist())
    return sorted(local - set(summary)), summary


@torch.no_grad()
def cls_attention(ctx: FixContext) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """CLS→patch attention (summed over heads) at the vision tower's first and second-to-last layers, per
    sample and image: two lists ``[sample][image] -> [patch]``. Computed from the layers' own q/k projections,
    so it does not depend on the tower's attention implementation."""
    tower, attentions = _vision_encoder(ctx.loaded)
    pixel_values = ctx.inputs.tensors.get("pixel_values")
    if pixel_values is None:
        return [[] for _ in ctx.samples], [[] for _ in ctx.samples]
    picks = {0: None, len(attentions) - 2: None}
    handles = []
    for index in picks:
        attn = attentions[index]

        def grab(module, args, kwargs, index=index):
            hidden = args[0] if args else kwargs["hidden_states"]  # [image, token, dim], after the pre-norm
            # CLIP names these num_heads / scale, DINOv2 num_attention_heads / scaling.
            heads = getattr(module, "num_heads", None) or module.num_attention_heads
            dim = module.head_dim
            scale = getattr(module, "scale", None) or module.scaling
            q = module.q_proj(hidden[:, :1]).view(hidden.shape[0], 1, heads, dim)
            k = module.k_proj(hidden).view(hidden.shape[0], -1, heads, dim)
            scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
            picks[index] = scores.softmax(-1)[:, :, 0, 1:].sum(1).cpu()  # [image, patch]: CLS dropped
        handles.append(attn.register_forward_pre_hook(grab, with_kwargs=True))
    try:
        tower(pixel_values=pixel_values.to(next(tower.parameters()).dtype))
    finally:
        for h in handles:
            h.remove()
    first, second_last = picks[0], picks[len(attentions) - 2]
    out0, out2, image = [], [], 0
    for b in range(len(ctx.samples)):
        n = len(ctx.inputs.image_spans[b])
        out0.append([first[image + i] for i in range(n)])
        out2.append([second_last[image + i] for i in range(n)])
        image += n
    return out0, out2


def _vision_encoder(loaded):
    """``(tower, attention modules)`` of a ViT with a CLS token: CLIP's (``encoder.layers[i].self_attn``,
    ``embeddings.class_embedding``) or DINOv2's (``encoder.layer[i].attention``, ``embeddings.cls_token``);
    anything else is an error."""
    model = loaded.model
    tower = getattr(getattr(model, "model", model), "vision_tower", None) or getattr(model, "vision_tower", None)
    inner = getattr(tower, "vision_model", tower)
    encoder = getattr(inner, "encoder", None)
    embeddings = getattr(inner, "embeddings", None)
    attentions = []
    if hasattr(embeddings, "class_embedding") and hasattr(encoder, "layers"):
        attentions = [layer.self_attn for layer in encoder.layers]
    elif hasattr(embeddings, "cls_token") and hasattr(encoder, "layer"):
        attentions = [layer.attention for layer in encoder.layer]
    if len(attentions) < 2 or not all(hasattr(a, "q_proj") and hasattr(a, "k_proj") for a in attentions):
        raise InputError(f"PAINT reads CLS→patch attention in a CLIP- or DINOv2-style vision tower with a CLS token; "
                         f"{loaded.name} has none (use it on LLaVA-style models: llava-real, llava-smol, tiny-llava, "
                         "llava-1.5)")
    return inner, attentions


# ---------------------------------------------------------------------------------------------------
# VAF


def vaf_layers(n_layers: int) -> list[int]:
    """Layers 9–14 of a 32-layer LLaVA, scaled with depth."""
    lo, hi = round(9 * n_layers / 32), round(14 * n_layers / 32)
    return list(range(lo, max(lo, hi) + 1))


VAF_SPANS = ("before-image", "system")


def vaf_span_keys(inputs: LvlmInputs, span: str = "before-image") -> list[list[tuple[int, int]]]:
    """Per sample, the keys VAF scales by ``system_scale``, as (start, stop) spans from the first real token.

    ``"before-image"``: every key before the first image token, as the official code does (its ``:SYS_LEN`` on
    LLaVA-1.5 holds BOS, the system prompt and ``"USER: "``; on llava-smol: the system turn and the user turn's
    header ``<|im_start|>user\\n``); none for a sample without an image. ``"system"``: the system turn only
    (role header, text, end marker, ``LvlmInputs.system_span``); none when the template has no system turn."""
    if span not in VAF_SPANS:
        raise InputError(f"vaf.span must be one of {', '.join(VAF_SPANS)}, got {span!r}")
    out = []
    for b, images in enumerate(inputs.image_spans):
        if span == "system":
            system = inputs.system_span[b]
            out.append([system] if system is not None else [])
        else:
            first = min((start for start, _ in images), default=0)
            out.append([(0, first)] if first > 0 else [])
    return out


@register_fix("vaf")
@dataclass
class Vaf(AdaptiveBoost, FixMethod):
    """Scores × ``image_scale`` on image keys and × ``system_scale`` on the keys ``span`` names (default
    ``"before-image"``: every key before the first image token, as the official code; ``"system"``: the system
    turn only), for the text after the image, in ``layers`` (default ``vaf_layers``). ``adaptive="entropy"``:
    both factors move towards 1 with the previous step's normalised entropy s, γ·s + 1 − s (``AdaptiveBoost``)."""

    image_scale: float = 1.15
    system_scale: float = 0.95
    layers: list[int] | None = None
    control: bool = False
    seed: int = 0
    span: str = "before-image"
    adaptive: str = "off"

    def default_layers(self, n_layers: int) -> Sequence[int]:
        return vaf_layers(n_layers)

    def edits(self, ctx: FixContext) -> list[Intervention]:
        layers = self.layers_for(ctx.n_layers)
        heads = [(layer, None) for layer in layers]
        rows = ctx.text_after_rows()
        keys = ctx.random_text_keys(self.seed, "vaf") if self.control else ctx.image_keys()
        before = Positions.per_sample(vaf_span_keys(ctx.inputs, self.span))
        strength = self.initial_strength(ctx)
        return self.track(ctx, [ScoreScale(heads, gamma=self.image_scale, keys=keys, rows=rows, strength=strength),
                                ScoreScale(heads, gamma=self.system_scale, keys=before, rows=rows,
                                           strength=strength)])

    def active(self, ctx: FixContext, stream):
        return self.adapting(ctx)


# ---------------------------------------------------------------------------------------------------
# VAR


@register_fix("var")
@dataclass
class Var(FixMethod):
    """Visual attention redistribution (module docstring). ``dims``: sink dimensions (None: found from the
    model's massive activations on the first batch). ``layers`` default 2 … L−1."""

    tau: float = 20.0
    summ: float = 0.2
    rho: float = 0.5
    p: float = 0.6
    paper_semantics: bool = False
    dims: list[int] | None = None
    layers: list[int] | None = None
    control: bool = False
    seed: int = 0
    # Sink dimensions found (``dims`` None) per model: found on a model's first batch and kept for its later
    # batches, never written into ``dims``, so another model finds its own.
    found_dims: dict = field(default_factory=dict, repr=False, compare=False)

    def sink_dims(self, ctx: FixContext) -> list[int]:
        """``dims`` if given, else this model's sink dimensions (found on its first batch, then reused)."""
        from .visual_sinks import find_sink_dims

        if self.dims is not None:
            return list(self.dims)
        key = (ctx.loaded.name, ctx.loaded.arch.n_layers, ctx.loaded.arch.hidden_size)
        if key not in self.found_dims:
            tensors = {k: v.to(ctx.loaded.device) for k, v in ctx.inputs.tensors.items()}
            dims = find_sink_dims(ctx.loaded, tensors)[0]
            if not dims:
                raise InputError(f"VAR: {ctx.loaded.name} shows no massive activation on these inputs, so no sink "
                                 "dimension was found; pass dims=[…] (the backbone's sink dimensions)")
            self.found_dims[key] = dims
        return list(self.found_dims[key])

    def settings(self) -> dict:
        out = super().settings()
        if self.dims is None and len(self.found_dims) == 1:
            out["dims"] = next(iter(self.found_dims.values()))  # the dims in force, as a report shows them
        return out

    def edits(self, ctx: FixContext) -> list[Intervention]:
        layers = self.layers_for(ctx.n_layers)
        dims = self.sink_dims(ctx)
        rows = ctx.text_after_rows()
        n_image = torch.tensor([sum(e - s for s, e in ctx.inputs.image_spans[b]) for b in range(len(ctx.samples))])
        edits = {layer: VisualRedistribute(layer, rows, self.p, self.summ, self.rho, self.paper_semantics,
                                           n_image=n_image, has_visual_sink=torch.zeros(len(n_image), dtype=bool))
                 for layer in layers}
        # "found": per layer, per sample, the (text, visual) sink positions found at prefill
        ctx.runs[id(self)] = {"dims": dims, "edits": edits, "found": {}}
        return list(edits.values())

    @contextlib.contextmanager
    def active(self, ctx: FixContext, stream) -> Iterator[None]:
        arch = ctx.loaded.arch
        handles = [arch.layers[layer].register_forward_pre_hook(self._finder(ctx, layer), with_kwargs=True)
                   for layer in ctx.runs[id(self)]["edits"]]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _finder(self, ctx: FixContext, layer: int):
        from .visual_sinks import phi

        run = ctx.runs[id(self)]
        edit, dims, found_sinks = run["edits"][layer], run["dims"], run["found"]
        real = ctx.inputs.real_mask.to(ctx.loaded.device)
        first = ctx.inputs.first_real.tolist()
        rng = ctx.rng(self.seed, f"var:{layer}")
        images = [{p for s, e in ctx.inputs.image_spans[b] for p in range(s, e)} for b in range(len(ctx.samples))]

        def find(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]  # [batch, pos, dim]
            if is_paused() or layer in found_sinks or hidden.shape[1] != real.shape[1]:
                return None  # decoding steps reuse the prefill's sinks; the reference stream is not VAR's
            sink = (phi(hidden, dims) > self.tau) & real  # [batch, column]
            text, visual, rest, found = [], [], [], []
            for b in range(hidden.shape[0]):
                image = images[b]
                columns = (sink[b].nonzero().flatten() - first[b]).tolist()
                vis = [p for p in columns if p in image]
                if self.control:
                    vis = sorted(rng.sample(sorted(image), len(vis)))
                chosen = set(vis)
                text.append([p for p in columns if p not in image])
                visual.append(_spans(vis))
                rest.append(_spans([p for p in sorted(image) if p not in chosen]))
                found.append(bool(vis))
            edit.text_sinks, edit.visual_sinks = Positions.per_sample(text), Positions.per_sample(visual)
            edit.image_rest = Positions.per_sample(rest)
            edit.has_visual_sink = torch.tensor(found)
            found_sinks[layer] = list(zip(text, visual, strict=True))
            return None

        return find


def _spans(positions: list[int]) -> list[tuple[int, int]]:
    """Sorted positions as (start, stop) runs: 576 image tokens become a few spans to test, not 576."""
    out: list[tuple[int, int]] = []
    for p in positions:
        if out and out[-1][1] == p:
            out[-1] = (out[-1][0], p + 1)
        else:
            out.append((p, p + 1))
    return out


# ---------------------------------------------------------------------------------------------------
# VHR


@register_fix("vhr")
@dataclass
class Vhr(FixMethod):
    """z of the heads above their layer's median VHD × ``alpha`` in ``layers`` (default ``vhr_layers``), chosen
    at every step (``per_step``) against the no-image stream (image removed by ``remove``: drop or blank).

    ``heads``: a fixed head list instead (a plain ``HeadScale`` on the predicting row); ``control``: half the heads
    of each layer, at random. ``history``: the heads chosen at each step, ``[{layer: [batch, head] bool}]``."""

    alpha: float = 2.0
    layers: list[int] | None = None
    per_step: bool = True
    remove: str = "drop"
    heads: list[tuple[int, int]] | None = None
    control: bool = False
    seed: int = 0

    @property
    def needs_reference(self) -> bool:  # type: ignore[override]
        return self.heads is None and not self.control

    def default_layers(self, n_layers: int) -> Sequence[int]:
        from .vhd import vhr_layers

        return vhr_layers(n_layers)

    def reference_layers(self, ctx: FixContext) -> list[int]:
        return self.layers_for(ctx.n_layers) if self.needs_reference else []

    def edits(self, ctx: FixContext) -> list[Intervention]:
        from headlab.interventions import HeadScale

        from .vhd import VhrScale

        arch = ctx.loaded.arch
        layers = self.layers_for(ctx.n_layers)
        if not self.needs_reference:
            heads = self.heads
            if heads is None:
                rng = ctx.rng(self.seed, "vhr")
                heads = [(layer, h) for layer in layers for h in sorted(rng.sample(range(arch.n_heads),
                                                                                   arch.n_heads // 2))]
            return [HeadScale(heads, alpha=self.alpha, rows="last")]
        edit = VhrScale([(layer, h) for layer in layers for h in range(arch.n_heads)], alpha=self.alpha,
                        per_step=self.per_step)
        # "found": per generation step, {layer: [batch, head] bool} of the heads reinforced
        ctx.runs[id(self)] = {"edit": edit, "found": []}
        return [edit]

    def on_reference(self, ctx: FixContext, stream) -> None:
        if self.needs_reference:
            ctx.runs[id(self)]["edit"].reference = {layer: stream.z[layer] for layer in stream.z_layers}

    @contextlib.contextmanager
    def active(self, ctx: FixContext, stream) -> Iterator[None]:
        if not self.needs_reference:
            yield
            return
        run = ctx.runs[id(self)]

        def record(module, args, kwargs, output):
            if not stream.busy:  # an image-stream step, not the reference's own forward
                run["found"].append({k: v.cpu().clone() for k, v in run["edit"].chosen.items()})

        handle = ctx.loaded.model.register_forward_hook(record, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()


# ---------------------------------------------------------------------------------------------------
# VCD

NOISE_SCHEDULES = ("sigmoid", "linear")
DIFFUSION_STEPS = 1000


def diffusion_alpha_bar(schedule: str = "sigmoid", steps: int = DIFFUSION_STEPS) -> torch.Tensor:
    """ᾱ_t = Π_{s ≤ t} (1 − β_s) for t = 0 … steps − 1, ``[steps]`` float64.

    ``"sigmoid"`` (the VCD code's ``add_diffusion_noise``): β = sigmoid(linspace(−6, 6)) · (5e-3 − 1e-5) + 1e-5,
    ᾱ_500 ≈ 0.75; ``"linear"`` (DDPM, Ho et al. 2020): β from 1e-4 to 0.02, ᾱ_500 ≈ 0.08, a far stronger distortion."""
    if schedule == "sigmoid":
        betas = torch.sigmoid(torch.linspace(-6.0, 6.0, steps, dtype=torch.float64)) * (0.5e-2 - 1e-5) + 1e-5
    elif schedule == "linear":
        betas = torch.linspace(1e-4, 0.02, steps, dtype=torch.float64)
    else:
        raise InputError(f"vcd.schedule must be one of {', '.join(NOISE_SCHEDULES)}, got {schedule!r}")
    return torch.cumprod(1.0 - betas, dim=0)


def _noise_like(x: torch.Tensor, seed: int) -> torch.Tensor:
    """ε ~ N(0, I) of ``x``'s shape from a generator seeded by ``seed`` and ``x``'s own values: the same image
    gets the same noise in any batch, at any position, and two different images get different noise."""
    digest = hashlib.sha256(str(seed).encode() + x.contiguous().numpy().tobytes()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    return torch.randn(x.shape, generator=generator, dtype=torch.float32)


def diffusion_noise(pixels: torch.Tensor, noise_step: int = 500, *, seed: int = 0,
                    schedule: str = "sigmoid") -> torch.Tensor:
    """VCD's distorted image: x_t = sqrt(ᾱ_t) · x + sqrt(1 − ᾱ_t) · ε on the preprocessed pixels (after the
    processor's normalisation, as the official code), t = ``noise_step`` (0 … 999, indexing ᾱ as the code does).

    ``pixels``: ``[image, ...]`` (LLaVA ``[image, channel, height, width]``: ε drawn per image, ``_noise_like``)
    or a flat patch tensor (Qwen2-VL ``[patch, dim]``: one draw for the batch); returns the same shape, dtype and
    device. The noise is computed in fp32 on the CPU, so it does not depend on the device."""
    if not 0 <= noise_step < DIFFUSION_STEPS:
        raise InputError(f"vcd.noise_step must lie in [0, {DIFFUSION_STEPS - 1}], got {noise_step}")
    alpha_bar = float(diffusion_alpha_bar(schedule)[noise_step])
    x = pixels.detach().float().cpu()
    eps = torch.stack([_noise_like(image, seed) for image in x]) if x.dim() >= 4 else _noise_like(x, seed)
    noised = math.sqrt(alpha_bar) * x + math.sqrt(1.0 - alpha_bar) * eps
    return noised.to(device=pixels.device, dtype=pixels.dtype)


def contrastive_logits(real: torch.Tensor, distorted: torch.Tensor, alpha: float = 1.0,
                       beta: float = 0.1) -> torch.Tensor:
    """VCD's scores ``[batch, vocab]`` fp32: (1 + α) · real − α · distorted where p(y | image) ≥ β · max p, else −inf.

    The cutoff is taken on the logits (log β + max logit, the official code's "version 2"): the same test as on
    the probabilities, without a softmax. β = 0 keeps every token. Greedy decoding takes the argmax."""
    real, distorted = real.float(), distorted.float()
    scores = (1.0 + alpha) * real - alpha * distorted
    if beta <= 0:
        return scores
    cutoff = real.max(dim=-1, keepdim=True).values + math.log(beta)
    return scores.masked_fill(real < cutoff, float("-inf"))


class ContrastiveProcessor:
    """VCD as a logits processor of ``generate``: at each step it runs the distorted branch on the same call as
    the image stream's (``follow``: its arguments, read by a forward pre-hook) with the distorted pixels and its
    own KV cache, and returns ``contrastive_logits`` of the two.

    Repeating the image stream's own call keeps everything ``generate`` prepares per model (position ids, M-RoPE
    token types, which multimodal inputs go in only at prefill) identical in both branches: the two differ in
    the pixels and the cache, nothing else. The branch runs with every edit paused (it is the contrast, not the
    fixed model) and calls ``model.forward`` rather than ``model(...)``: the model's own forward hooks follow the
    generation's steps (the layout tracker, the no-image stream, the adaptive fixes' entropy hook, VHR's record)
    and must not take this extra forward for one. Layer hooks still run; the edits among them check ``paused``."""

    def __init__(self, loaded, images: dict[str, torch.Tensor], alpha: float, beta: float):
        """``images``: the prompt's image inputs with the distorted ``pixel_values`` (and what goes with them:
        ``image_grid_thw``, ``image_sizes``, …), given to the branch's prefill."""
        self.loaded, self.images, self.alpha, self.beta = loaded, images, alpha, beta
        self._cache = None
        self._call: tuple[tuple, dict] | None = None

    @contextlib.contextmanager
    def follow(self) -> Iterator[None]:
        """Record the arguments of each forward of the image stream (reference streams run paused: skipped)."""

        def record(module, args, kwargs):
            if not is_paused():
                self._call = (args, kwargs)
            return None

        handle = self.loaded.model.register_forward_pre_hook(record, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    @torch.no_grad()
    def distorted_logits(self) -> torch.Tensor:
        """``[batch, vocab]`` fp32 next-token logits of the distorted branch at this step."""
        if self._call is None:
            raise RuntimeError("VCD's processor ran outside its follow() block: no image-stream call to repeat")
        args, kwargs = self._call
        feed = {**kwargs, "cache": self._cache, "use_cache": True}
        feed.pop("past_key_values", None)  # one cache argument: this branch's own
        if self._cache is None:  # the prefill: the distorted pixels, encoded here (later steps take no pixels)
            feed.pop("mm_encoder_outputs", None)  # generate encodes the image stream's pixels once and passes these
            feed.update(self.images)
        model = self.loaded.model
        # Qwen2-VL keeps the M-RoPE offsets of its last prefill on the model: the image stream's stay its own.
        inner = getattr(model, "model", None)
        keeps_rope = hasattr(inner, "rope_deltas")
        saved = inner.rope_deltas if keeps_rope else None
        try:
            with paused():
                out = model.forward(*args, **feed)
        finally:
            if keeps_rope:
                inner.rope_deltas = saved
        cache = getattr(out, "cache", None)
        self._cache = cache if cache is not None else out.past_key_values
        return out.logits[:, -1].float()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        distorted = self.distorted_logits().to(scores.device)
        return contrastive_logits(scores, distorted, self.alpha, self.beta).to(scores.dtype)


@register_fix("vcd")
@dataclass
class Vcd(FixMethod):
    """Visual contrastive decoding (module docstring): greedy on (1 + ``cd_alpha``) · logits − ``cd_alpha`` ·
    logits with the image under diffusion noise (``noise_step`` of 1000, ``schedule``, ``seed``), over the tokens
    with p ≥ ``cd_beta`` · max p. Defaults are the official code's (``cd_alpha`` 1, ``cd_beta`` 0.1, step 500, its
    sigmoid β schedule). No edits: a logits processor with its own distorted branch."""

    cd_alpha: float = 1.0
    cd_beta: float = 0.1
    noise_step: int = 500
    schedule: str = "sigmoid"
    seed: int = 0
    has_control: ClassVar[bool] = False

    def logits_processor(self, ctx: FixContext, stream):
        tensors = ctx.inputs.tensors
        images = {k: v for k, v in tensors.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
        if "pixel_values" in images:  # a batch without images decodes as plain greedy (both branches agree)
            images["pixel_values"] = diffusion_noise(images["pixel_values"], self.noise_step, seed=self.seed,
                                                     schedule=self.schedule)
        processor = ContrastiveProcessor(ctx.loaded, images, self.cd_alpha, self.cd_beta)
        ctx.runs[id(self)] = {"processor": processor}
        return processor

    def active(self, ctx: FixContext, stream):
        return ctx.runs[id(self)]["processor"].follow()


@register_fix("none")
@dataclass
class NoFix(FixMethod):
    """Plain generation (the baseline)."""

    has_control: ClassVar[bool] = False

    def describe(self) -> dict:
        return {"method": "none"}


def make_fix(name: str, **options) -> FixMethod:
    """A fix by its registered name with ``options`` (its dataclass fields), checked before any compute."""
    if name not in FIXES:
        raise InputError(f"unknown fix {name!r}: use one of {', '.join(sorted(FIXES))}")
    if options.get("control") and not FIXES[name].has_control:
        raise InputError(f"fix {name} has no random control (it chooses no keys, patches or heads to randomise)")
    settings = sorted(f.name for f in fields(FIXES[name]) if f.init and f.name != "control")
    unknown = sorted(set(options) - {*settings, "control"})
    if unknown:
        raise InputError(f"fix {name} has no setting {', '.join(unknown)}; its settings are {', '.join(settings)} "
                         f"(--set {name}.FIELD=VALUE)")
    try:
        method = FIXES[name](**options)
    except TypeError as err:
        raise InputError(f"fix {name}: {err}") from err
    check_fix(method)
    return method


# Settings that must lie in a range (inclusive): the rest only need their type.
_RANGES = {"p": (0.0, 1.0), "summ": (0.0, 1.0), "rho": (0.0, 1.0), "plausibility": (0.0, 1.0),
           "local_fraction": (1e-9, 1.0), "cd_alpha": (0.0, math.inf), "cd_beta": (0.0, 1.0),
           "noise_step": (0, DIFFUSION_STEPS - 1)}
# Settings that name one of a few choices.
_CHOICES = {"remove": ("drop", "blank"), "adaptive": ADAPTIVE, "span": VAF_SPANS, "schedule": NOISE_SCHEDULES}


def check_fix(method: FixMethod) -> None:
    """Each setting of the right type (numbers for floats, true/false for switches, whole numbers for layers and
    seeds) and in its range; one ``InputError`` naming the setting otherwise."""
    name = method.name
    for f in fields(method):
        if not f.repr:
            continue
        value = getattr(method, f.name)
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if kind == "float" and not (isinstance(value, int | float) and not isinstance(value, bool)):
            raise InputError(f"{name}.{f.name} must be a number, got {value!r}")
        if kind == "bool" and not isinstance(value, bool):
            raise InputError(f"{name}.{f.name} must be true or false, got {value!r}")
        if kind == "int" and not (isinstance(value, int) and not isinstance(value, bool)):
            raise InputError(f"{name}.{f.name} must be a whole number, got {value!r}")
        choices = _CHOICES.get(f.name)
        if choices is not None and value not in choices:
            raise InputError(f"{name}.{f.name} must be one of {', '.join(choices)}, got {value!r}")
        if f.name == "layers" and value is not None and not (
                isinstance(value, list | tuple) and all(isinstance(x, int) and not isinstance(x, bool) for x in value)):
            raise InputError(f"{name}.layers must be a list of layer numbers, e.g. [20, 21], got {value!r}")
        low, high = _RANGES.get(f.name, (None, None))
        if low is not None and not low <= value <= high:
            raise InputError(f"{name}.{f.name} must lie in [{low:g}, {high:g}], got {value!r}")


# ---------------------------------------------------------------------------------------------------
# Generation


def generate_fixed(loaded, samples: Sequence[LvlmSample], methods: Sequence[FixMethod] = (), *,
                   max_new_tokens: int = 32, backend: str | None = None, return_scores: bool = False,
                   found: dict | None = None):
    """Greedy generation ``[batch, n]`` (new tokens, padded with the pad id) with ``methods`` together.

    Without methods (or only ``NoFix``) this is plain ``model.generate`` on the model's own attention (sdpa).
    ``return_scores``: also the scores each step chose from ``[batch, n, vocab]`` (after guidance).
    ``found``: a dict that receives, per method name, what the method found on this batch (PAINT: the tokens
    it boosts per sample; VAR: the sinks per layer; VHR: the heads per step; adaptive PAI / VAF: the strength
    ``[batch]`` each step used); the methods keep nothing."""
    from .generation import greedy
    from .reference_stream import NoImageStream

    methods = [m for m in methods if not isinstance(m, NoFix)]
    inputs = build_inputs(loaded, samples, padding_side="left").to(loaded.device)
    if not methods:
        return greedy(loaded, inputs.tensors, max_new_tokens, return_scores=return_scores)
    ctx = FixContext(loaded, samples, inputs)
    edits = [e for m in methods for e in m.edits(ctx)]
    stream = None
    if any(m.needs_reference for m in methods):
        layers = sorted({layer for m in methods for layer in m.reference_layers(ctx)})
        removes = {getattr(m, "remove", "drop") for m in methods if m.needs_reference}
        if len(removes) > 1:
            raise InputError(f"the methods remove the image in different ways ({', '.join(sorted(removes))}); "
                             "they share one no-image stream: use one")

        def on_step(s):
            for m in methods:
                if hasattr(m, "on_reference"):
                    m.on_reference(ctx, s)
        stream = NoImageStream(loaded, samples, remove=removes.pop(), z_layers=layers, on_step=on_step)
    processors = [p for m in methods if (p := m.logits_processor(ctx, stream)) is not None]
    contexts = ([stream.running()] if stream is not None else []) + [m.active(ctx, stream) for m in methods]
    out = greedy(loaded, inputs.tensors, max_new_tokens, edits=edits, contexts=contexts,
                 logits_processors=processors, backend=backend, return_scores=return_scores)
    if found is not None:
        found.update({m.name: ctx.runs[id(m)]["found"] for m in methods if "found" in ctx.runs.get(id(m), {})})
    return out


def generate_with_vhr(loaded, samples: Sequence[LvlmSample], *, max_new_tokens: int = 32, vhr: bool = False,
             alpha: float = 2.0, layers: Sequence[int] | None = None, per_step: bool = True,
             remove: str = "drop", heads: list[tuple[int, int]] | None = None) -> tuple[torch.Tensor, dict]:
    """Greedy generation ``[batch, n]`` (padded with pad id), optionally under VHR (``lvlm_fixes.Vhr``).

    ``heads``: a fixed head list instead of the VHD selection (the random-heads control: plain HeadScale).
    Returns the new tokens and ``{"chosen": [{layer: [batch, head] bool}] per step}`` under VHR."""
    from .no_image import REMOVE_MODES

    if remove not in REMOVE_MODES:
        raise InputError(f"unknown image removal {remove!r}: use one of {', '.join(REMOVE_MODES)}")
    method = Vhr(alpha=alpha, layers=None if layers is None else list(layers), per_step=per_step, remove=remove,
                 heads=heads) if vhr or heads is not None else None
    found: dict = {}
    tokens = generate_fixed(loaded, samples, [method] if method is not None else [], max_new_tokens=max_new_tokens,
                            found=found)
    return tokens, {"chosen": found.get("vhr", [])}


def decode(loaded, tokens: torch.Tensor) -> list[str]:
    tok = loaded.text_tokenizer
    return [tok.decode(row, skip_special_tokens=True).strip() for row in tokens]
