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
  scores of image keys × 1.15 and of system-prompt keys × 0.95, before the softmax, for the text after the
  image; spans from the processor.
- ``Vhr`` (He et al., ACL 2025; analyses/vhd.py): z of the heads above their layer's median VHD × α.

``control=True`` swaps each method's choice for a random one of the same size (the baseline a real effect
must beat): random non-image keys (PAI, VAF), random patches (PAINT), random image tokens as visual sinks
(VAR), random heads (VHR).

``generate_fixed(loaded, samples, [Pai(), …])`` runs greedy generation with the methods together.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch

from headlab.errors import InputError
from headlab.interventions import INTERVENTIONS, Intervention, Positions, ScoreBoost, ScoreScale, register_intervention
from headlab.interventions.context import is_paused
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
# PAI


@register_fix("pai")
@dataclass
class Pai(FixMethod):
    """s += alpha · |s| on image keys, last query row, ``layers`` (default [2, L)); ``cfg``: image guidance."""

    alpha: float = 0.2
    layers: list[int] | None = None
    cfg: bool = False
    gamma: float = 1.1
    plausibility: float = 0.1
    control: bool = False
    seed: int = 0

    @property
    def needs_reference(self) -> bool:  # type: ignore[override]
        return self.cfg

    def edits(self, ctx: FixContext) -> list[Intervention]:
        layers = self.layers_for(ctx.n_layers)
        keys = ctx.random_text_keys(self.seed, "pai") if self.control else ctx.image_keys()
        return [ScoreBoost([(layer, None) for layer in layers], keys=keys, alpha=self.alpha, rows="last")]

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
    tower = _vision_encoder(ctx.loaded)
    pixel_values = ctx.inputs.tensors.get("pixel_values")
    if pixel_values is None:
        return [[] for _ in ctx.samples], [[] for _ in ctx.samples]
    layers = tower.encoder.layers
    picks = {0: None, len(layers) - 2: None}
    handles = []
    for index in picks:
        attn = layers[index].self_attn

        def grab(module, args, kwargs, index=index):
            hidden = args[0] if args else kwargs["hidden_states"]  # [image, token, dim], after layer_norm1
            heads, dim = module.num_heads, module.head_dim
            q = module.q_proj(hidden[:, :1]).view(hidden.shape[0], 1, heads, dim)
            k = module.k_proj(hidden).view(hidden.shape[0], -1, heads, dim)
            scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * module.scale
            picks[index] = scores.softmax(-1)[:, :, 0, 1:].sum(1).cpu()  # [image, patch]: CLS dropped
        handles.append(attn.register_forward_pre_hook(grab, with_kwargs=True))
    try:
        tower(pixel_values=pixel_values.to(next(tower.parameters()).dtype))
    finally:
        for h in handles:
            h.remove()
    first, second_last = picks[0], picks[len(layers) - 2]
    out0, out2, image = [], [], 0
    for b in range(len(ctx.samples)):
        n = len(ctx.inputs.image_spans[b])
        out0.append([first[image + i] for i in range(n)])
        out2.append([second_last[image + i] for i in range(n)])
        image += n
    return out0, out2


def _vision_encoder(loaded):
    """The CLIP-style vision transformer (``embeddings``, ``encoder.layers``) with a CLS token, or an error."""
    model = loaded.model
    tower = getattr(getattr(model, "model", model), "vision_tower", None) or getattr(model, "vision_tower", None)
    inner = getattr(tower, "vision_model", tower)
    layers = getattr(getattr(inner, "encoder", None), "layers", None)
    embeddings = getattr(inner, "embeddings", None)
    if layers is None or not hasattr(embeddings, "class_embedding") or len(layers) < 2:
        raise InputError(f"PAINT reads CLS→patch attention in a CLIP-style vision tower with a CLS token; "
                         f"{loaded.name} has none (use it on LLaVA-style models: llava-smol, tiny-llava, llava-1.5)")
    return inner


# ---------------------------------------------------------------------------------------------------
# VAF


def vaf_layers(n_layers: int) -> list[int]:
    """Layers 9–14 of a 32-layer LLaVA, scaled with depth."""
    lo, hi = round(9 * n_layers / 32), round(14 * n_layers / 32)
    return list(range(lo, max(lo, hi) + 1))


@register_fix("vaf")
@dataclass
class Vaf(FixMethod):
    """Scores × ``image_scale`` on image keys and × ``system_scale`` on system keys, for the text after the image,
    in ``layers`` (default ``vaf_layers``)."""

    image_scale: float = 1.15
    system_scale: float = 0.95
    layers: list[int] | None = None
    control: bool = False
    seed: int = 0

    def default_layers(self, n_layers: int) -> Sequence[int]:
        return vaf_layers(n_layers)

    def edits(self, ctx: FixContext) -> list[Intervention]:
        layers = self.layers_for(ctx.n_layers)
        heads = [(layer, None) for layer in layers]
        rows = ctx.text_after_rows()
        keys = ctx.random_text_keys(self.seed, "vaf") if self.control else ctx.image_keys()
        system = Positions.per_sample([[span] if span is not None else [] for span in ctx.inputs.system_span])
        return [ScoreScale(heads, gamma=self.image_scale, keys=keys, rows=rows),
                ScoreScale(heads, gamma=self.system_scale, keys=system, rows=rows)]


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


@register_fix("none")
@dataclass
class NoFix(FixMethod):
    """Plain generation (the baseline)."""

    def describe(self) -> dict:
        return {"method": "none"}


def make_fix(name: str, **options) -> FixMethod:
    """A fix by its registered name with ``options`` (its dataclass fields), checked before any compute."""
    if name not in FIXES:
        raise InputError(f"unknown fix {name!r}: use one of {', '.join(sorted(FIXES))}")
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
           "local_fraction": (1e-9, 1.0)}


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
        if f.name == "layers" and value is not None and not (
                isinstance(value, list | tuple) and all(isinstance(x, int) and not isinstance(x, bool) for x in value)):
            raise InputError(f"{name}.layers must be a list of layer numbers, e.g. [20, 21], got {value!r}")
        low, high = _RANGES.get(f.name, (None, None))
        if low is not None and not low <= value <= high:
            raise InputError(f"{name}.{f.name} must lie in [{low:g}, {high:g}], got {value!r}")
    if getattr(method, "remove", "drop") not in ("drop", "blank"):
        raise InputError(f"{name}.remove must be drop or blank, got {method.remove!r}")


# ---------------------------------------------------------------------------------------------------
# Generation


def generate_fixed(loaded, samples: Sequence[LvlmSample], methods: Sequence[FixMethod] = (), *,
                   max_new_tokens: int = 32, backend: str | None = None, return_scores: bool = False,
                   found: dict | None = None):
    """Greedy generation ``[batch, n]`` (new tokens, padded with the pad id) with ``methods`` together.

    Without methods (or only ``NoFix``) this is plain ``model.generate`` on the model's own attention (sdpa).
    ``return_scores``: also the scores each step chose from ``[batch, n, vocab]`` (after guidance).
    ``found``: a dict that receives, per method name, what the method found on this batch (PAINT: the tokens
    it boosts per sample; VAR: the sinks per layer; VHR: the heads per step); the methods keep nothing."""
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
