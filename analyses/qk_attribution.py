"""Exact QK attribution: why head (L, h) gives key j the score it gives it from query i.

The pre-softmax score the model computes is ``s = scale · q_i · k_j``, with
``q_i = RoPE_i(qnorm(W_q · norm_L(x_i) + b_q))`` and ``k_j`` alike (head ``h`` reads kv head
``h // (n_heads / n_kv_heads)``). The residual stream entering layer L is a sum of components,

    x_p = embed_p + Σ_{l<L} ( Σ_g head_{l,g,p} + attn_bias_l + mlp_{l,p} ),

where ``embed`` is the input of layer 0 (the token embedding after any scaling the model does, e.g. Gemma's
√d), ``head_{l,g,p} = W_O[:, g] · z_{l,g,p}`` is head g's z slice times its o_proj column block, ``attn_bias``
is o_proj's bias (only when it has one) and ``mlp`` is the MLP output. Once every normalisation scale is
frozen at its value in the actual forward, q_i and k_j are linear in these components, so

    s = Σ_{a, b} C[a, b],   C[a, b] = scale · q_i(component a) · k_j(component b)

exactly (up to float rounding), with one extra row for the q projection's bias and one extra column for the
k projection's bias (Qwen2's ``q_bias`` / ``k_bias``; after a q/k norm they carry the frozen scale too).

Frozen (linear only with the scale held fixed, as in the standard residual-stream decompositions):
- the input norm of layer L (RMSNorm ``g ⊙ x / rms(x)``): the per-position scale ``1/rms`` of the forward;
- the query/key norms (Qwen3 / Gemma-3 ``q_norm`` / ``k_norm``, an RMSNorm per head after the projection):
  their per-position, per-head scale;
- Gemma-3's sandwich norms (``post_attention_layernorm`` on the attention output, ``post_feedforward_layernorm``
  on the MLP output, before the residual add): the attention sandwich norm's per-position scale, so that each
  head's contribution stays linear (the MLP is one component: its normalised output is taken as is).
Each frozen map is read off the forward as ``y_p = α_p · (m ⊙ x_p)``: ``m`` is the norm applied to a vector
of ones (its gain up to a constant: ``weight``, or ``1 + weight`` for Gemma) and ``α_p`` the least-squares
ratio of the norm's own output to ``m ⊙ x_p``, so the frozen map reproduces what the model computed, eps
included. RoPE is linear and is applied as is, at position i on the query side and j on the key side, with
the cos/sin the attention module received and its own ``apply_rotary_pos_emb``. The scale is the one the
module hands its attention function (``head_dim^-0.5``; Gemma-3: ``query_pre_attn_scalar^-0.5``).

The score is read from the model itself: during the forward, layer L's attention function records the query
and key tensors it is given (after q/k norm and RoPE) and the scaling, and ``score = scaling · q_i · k_j``
from those. The decomposition is computed in float64 from the recorded activations, so ``residual`` (sum −
score) shows the model's own float rounding (about 1e-6 relative in float32).

Supported model types: ``SUPPORTED`` (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma-3 text). Others are refused
with ``InputError``: GPT-2 (LayerNorm, learned positions, fused Conv1D projections), Gemma-2 (tanh soft-capping
of the scores, not linear), OLMo-2 (q/k norm over all heads together, norm after the sublayer), multimodal
wrappers and the rest have layouts this module does not decompose.

One prompt per forward, batch 1, no padding; key positions after the query position (masked in a causal
model) are refused. Under a sliding-window layer a key outside the window still gets its q·k score
decomposed, though the model masks it. The forward runs on sdpa through a recording attention function, so
attention-site edits of an enclosing ``headlab.intervene`` do not apply there (its z and residual hooks do).
"""

from __future__ import annotations

import contextlib
import contextvars
import operator
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from headlab.batching import encode
from headlab.errors import InputError
from headlab.loading import LoadedModel

# --------------------------------------------------------------------------------------------------
# Families


@dataclass(frozen=True)
class NormLayout:
    """Where one family's norms sit, by attribute name (None: the family has none there).

    ``input_norm``: on the decoder layer, before attention; ``attn_out_norm`` / ``mlp_out_norm``: sandwich norms
    on the sublayer outputs (applied before the residual add); ``qk_norm``: ``q_norm`` / ``k_norm`` on the
    attention module, per head after the projection.
    """

    input_norm: str = "input_layernorm"
    attn_out_norm: str | None = None
    mlp_out_norm: str | None = None
    qk_norm: bool = False


_PRE_NORM = NormLayout()
SUPPORTED: dict[str, NormLayout] = {
    "llama": _PRE_NORM,
    "mistral": _PRE_NORM,
    "qwen2": _PRE_NORM,
    "gemma": _PRE_NORM,
    "qwen3": NormLayout(qk_norm=True),
    "gemma3_text": NormLayout(attn_out_norm="post_attention_layernorm", mlp_out_norm="post_feedforward_layernorm",
                              qk_norm=True),
}
# Why some model types people will ask for are refused (the message says it).
_REFUSED_BECAUSE = {
    "gpt2": "LayerNorm with learned absolute positions and a fused Conv1D q/k/v projection",
    "gemma2": "tanh soft-capping of the attention scores, which is not linear",
    "olmo2": "a q/k norm over all heads at once and norms after each sublayer instead of before",
    "llava": "a multimodal wrapper", "qwen2_vl": "a multimodal wrapper (multimodal RoPE)",
    "qwen2_5_vl": "a multimodal wrapper (multimodal RoPE)",
}


# --------------------------------------------------------------------------------------------------
# Results


class Contribution(NamedTuple):
    """One cell of an attribution matrix: ``value`` = what (query component, key component) adds to the score."""

    query: str
    key: str
    value: float


@dataclass
class QKAttribution:
    """The score of head (``layer``, ``head``) for (``query_pos``, ``key_pos``), split by upstream component.

    ``contributions``: ``[n_query_components, n_key_components]`` float64, rows labelled by ``query_labels``,
    columns by ``key_labels`` (``"embed"``, ``"L3.H5"``, ``"L3.attn_bias"``, ``"L3.mlp"``, ``"q_bias"`` /
    ``"k_bias"``). ``score``: the pre-softmax score the model computed (scaling · q·k). ``reconstruction_error``:
    the largest relative gap between the sum of the components and the residual stream entering the layer, at
    the query and key positions (a check that no part of the stream is missing).
    A mean over several (prompt, query, key) items (``mean_qk_attribution``) has ``n`` items, the mean of
    their matrices and scores, and no positions.
    """

    layer: int
    head: int
    kv_head: int
    query_pos: int | None
    key_pos: int | None
    contributions: torch.Tensor
    query_labels: list[str]
    key_labels: list[str]
    score: float
    reconstruction_error: float
    n: int = 1
    tokens: list[int] = field(default_factory=list, repr=False)  # the prompt's ids (empty for a mean)

    @property
    def total(self) -> float:
        """Σ C[a, b]: the score as the decomposition gives it."""
        return float(self.contributions.sum())

    @property
    def residual(self) -> float:
        """``total - score``: float rounding only, when the decomposition is exact."""
        return self.total - self.score

    def query_totals(self) -> dict[str, float]:
        """Per query component, its row sum (its share of the score through every key component)."""
        return dict(zip(self.query_labels, self.contributions.sum(1).tolist(), strict=True))

    def key_totals(self) -> dict[str, float]:
        """Per key component, its column sum."""
        return dict(zip(self.key_labels, self.contributions.sum(0).tolist(), strict=True))

    def top(self, k: int = 10) -> list[Contribution]:
        return top_contributors(self, k)


def top_contributors(attribution: QKAttribution, k: int = 10, *, signed: bool = False) -> list[Contribution]:
    """The ``k`` (query component, key component) cells with the largest |contribution| (``signed``: the largest
    contribution, most positive first), largest first."""
    if k <= 0:
        raise InputError(f"top_contributors: k must be positive, got {k}")
    flat = attribution.contributions.flatten()
    order = torch.argsort(flat if signed else flat.abs(), descending=True)[:k]
    n_keys = len(attribution.key_labels)
    return [Contribution(attribution.query_labels[int(i) // n_keys], attribution.key_labels[int(i) % n_keys],
                         float(flat[i])) for i in order]


# --------------------------------------------------------------------------------------------------
# Reading the score from the model: an attention function that records q and k of one layer


CAPTURE_IMPLEMENTATION = "headlab_qk_capture"
_CAPTURE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("headlab_qk_capture", default=None)


def _capture_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' attention signature; sdpa's output. Records ``query`` ``[batch, head, query, dim]``,
    ``key`` ``[batch, kv_head, key, dim]`` and the scaling of the one module being attributed."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    box = _CAPTURE.get()
    if box is not None and module is box["module"]:
        box["query"], box["key"] = query.detach().clone(), key.detach().clone()
        box["scaling"] = kwargs.get("scaling")
        box["softcap"] = kwargs.get("softcap")
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register_capture() -> None:
    """Make ``attn_implementation="headlab_qk_capture"`` known to transformers (sdpa's mask; idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CAPTURE_IMPLEMENTATION, _capture_attention)
    AttentionMaskInterface.register(CAPTURE_IMPLEMENTATION, sdpa_mask)


# --------------------------------------------------------------------------------------------------
# Checks


def check_supported(loaded: LoadedModel) -> NormLayout:
    """The norm layout of ``loaded``'s family, or ``InputError`` saying which families are supported."""
    model_type = loaded.arch.model_type
    layout = SUPPORTED.get(model_type)
    if layout is None:
        why = f" ({_REFUSED_BECAUSE[model_type]})" if model_type in _REFUSED_BECAUSE else ""
        raise InputError(
            f"QK attribution does not support model type {model_type!r} ({loaded.name}){why}: it decomposes RMSNorm "
            f"decoders with rotary positions, model types {', '.join(sorted(SUPPORTED))} (tiny-llama, tiny-qwen3, "
            "smollm2-135m, gemma3-270m, …)")
    return layout


def _check_head(loaded: LoadedModel, layer: int, head: int) -> None:
    arch = loaded.arch
    if not isinstance(layer, int) or not 0 <= layer < arch.n_layers:
        raise InputError(f"layer {layer!r} does not exist: {loaded.name} has layers 0..{arch.n_layers - 1}")
    if not isinstance(head, int) or not 0 <= head < arch.n_heads:
        raise InputError(f"head {head!r} does not exist: {loaded.name} has heads 0..{arch.n_heads - 1} per layer")


def _position(pos: int, n_tokens: int, what: str) -> int:
    """``pos`` as an index into the prompt (negative counts from the end, as in Python)."""
    try:
        index = operator.index(pos)  # ints, numpy and 0-d torch integers; not floats
    except TypeError:
        index = None
    if index is None or not -n_tokens <= index < n_tokens:
        raise InputError(f"{what} position {pos!r} is outside the prompt: it has {n_tokens} tokens, positions "
                         f"0..{n_tokens - 1} (or -{n_tokens}..-1 from the end)")
    return index % n_tokens


def _token_ids(loaded: LoadedModel, prompt: str | Sequence[int] | torch.Tensor, max_tokens: int) -> list[int]:
    if isinstance(prompt, str):
        ids = encode(loaded, prompt, max_tokens)
    elif isinstance(prompt, torch.Tensor):
        if prompt.dim() == 2 and prompt.shape[0] == 1:
            prompt = prompt[0]
        if prompt.dim() != 1:
            raise InputError(f"a prompt given as a tensor is one row of token ids, got shape {list(prompt.shape)}")
        ids = [int(t) for t in prompt]
    else:
        ids = [int(t) for t in prompt]
    if not ids:
        raise InputError("the prompt encodes to no tokens: give a non-empty prompt")
    return ids


# --------------------------------------------------------------------------------------------------
# One forward, recorded


@dataclass
class _Record:
    """What one forward leaves for layer L (float tensors of the model, batch row 0)."""

    resid: dict[str, torch.Tensor] = field(default_factory=dict)  # "embed", "target": [pos, d_model]
    z: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [pos, head, d_head]
    mlp: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [pos, d_model] (after a sandwich norm)
    attn_norm: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # layer -> (in, out)
    norms: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # "input", "q", "k"
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin [batch, pos, d]
    capture: dict = field(default_factory=dict)


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@contextlib.contextmanager
def _hooks(loaded: LoadedModel, layer: int, layout: NormLayout, record: _Record) -> Iterator[None]:
    """Forward hooks that fill ``record`` (the parts ``headlab.trace`` has no name for: norms, RoPE)."""
    arch = loaded.arch
    handles = []

    def keep_io(store: dict, key):
        def hook(module, args, output):
            store[key] = (args[0].detach().clone(), _first(output).detach().clone())
        return hook

    def keep_out(store: dict, key):
        def hook(module, args, output):
            store[key] = _first(output).detach().clone()
        return hook

    def keep_rope(module, args, kwargs):
        cos_sin = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
        if cos_sin is None:
            raise InputError(f"layer {layer}'s attention received no position embeddings (cos, sin): QK "
                             "attribution needs a rotary model")
        record.rope = (cos_sin[0].detach().clone(), cos_sin[1].detach().clone())

    try:
        block, attn = arch.layers[layer], arch.attention(layer)
        handles.append(block.get_submodule(layout.input_norm).register_forward_hook(keep_io(record.norms, "input")))
        if layout.qk_norm:
            handles.append(attn.q_norm.register_forward_hook(keep_io(record.norms, "q")))
            handles.append(attn.k_norm.register_forward_hook(keep_io(record.norms, "k")))
        handles.append(attn.register_forward_pre_hook(keep_rope, with_kwargs=True))
        for earlier in range(layer):
            if layout.attn_out_norm is not None:
                norm = arch.layers[earlier].get_submodule(layout.attn_out_norm)
                handles.append(norm.register_forward_hook(keep_io(record.attn_norm, earlier)))
            if layout.mlp_out_norm is not None:
                norm = arch.layers[earlier].get_submodule(layout.mlp_out_norm)
                handles.append(norm.register_forward_hook(keep_out(record.mlp, earlier)))
        yield
    finally:
        for handle in reversed(handles):
            handle.remove()


@torch.no_grad()
def _run(loaded: LoadedModel, ids: list[int], layer: int, layout: NormLayout) -> _Record:
    """One forward of ``ids`` recording what the decomposition of layer ``layer`` needs."""
    from headlab.kernels.attention_function import other_attention
    from headlab.probes import trace

    record = _Record()
    names = ["blocks.0.hook_resid_pre", f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.attn.hook_q",
             f"blocks.{layer}.attn.hook_k"]
    names += [f"blocks.{earlier}.attn.hook_z" for earlier in range(layer)]
    if layout.mlp_out_norm is None:
        names += [f"blocks.{earlier}.hook_mlp_out" for earlier in range(layer)]
    _register_capture()
    record.capture["module"] = loaded.arch.attention(layer)
    token = _CAPTURE.set(record.capture)
    try:
        with other_attention(loaded.model, CAPTURE_IMPLEMENTATION), _hooks(loaded, layer, layout, record), \
                trace(loaded, names=names, stats=False) as t:
            loaded.model(input_ids=torch.tensor([ids], device=loaded.device))
    finally:
        _CAPTURE.reset(token)
    if "query" not in record.capture:
        raise InputError(f"layer {layer}'s attention function was not called: {type(loaded.model).__name__} does "
                         "not go through transformers' AttentionInterface there")
    record.resid = {"embed": t["blocks.0.hook_resid_pre"][0], "target": t[f"blocks.{layer}.hook_resid_pre"][0]}
    record.z = {earlier: t[f"blocks.{earlier}.attn.hook_z"][0] for earlier in range(layer)}
    if layout.mlp_out_norm is None:
        record.mlp = {earlier: t[f"blocks.{earlier}.hook_mlp_out"][0] for earlier in range(layer)}
    else:
        record.mlp = {earlier: out[0] for earlier, out in record.mlp.items()}
    # The projections before any q/k norm, [pos, head, d]: the reference layout of the q/k norms' inputs.
    record.capture["proj_q"], record.capture["proj_k"] = (t[f"blocks.{layer}.attn.hook_q"][0],
                                                         t[f"blocks.{layer}.attn.hook_k"][0])
    return record


# --------------------------------------------------------------------------------------------------
# Frozen norms


def _gain(norm: torch.nn.Module, width: int) -> torch.Tensor:
    """``[width]`` the norm of a vector of ones: its elementwise gain up to one constant factor (which the fitted
    scale absorbs), ``weight`` or ``1 + weight`` whichever the family uses."""
    weight = next(norm.parameters(), None)
    ones = torch.ones(width, dtype=weight.dtype if weight is not None else torch.float32,
                      device=weight.device if weight is not None else "cpu")
    with torch.no_grad():
        return norm(ones).double().cpu()


def _frozen_scale(x: torch.Tensor, y: torch.Tensor, gain: torch.Tensor, what: str) -> torch.Tensor:
    """``[...]`` the scale α with ``y ≈ α · (gain ⊙ x)`` along the last axis, fitted (least squares) from a norm's
    input ``x`` and output ``y`` ``[..., d]`` in the forward: the norm as the linear map it was at each row."""
    base = x.double().cpu() * gain
    y = y.double().cpu()
    alpha = (y * base).sum(-1) / (base * base).sum(-1).clamp_min(1e-300)
    gap = (y - alpha[..., None] * base).norm(dim=-1) / y.norm(dim=-1).clamp_min(1e-30)
    if float(gap.max()) > 1e-2:  # not a scale times a fixed gain: a norm this module does not know
        raise InputError(f"{what} is not an RMSNorm (output = scale · gain ⊙ input; relative gap "
                         f"{float(gap.max()):.2g}): QK attribution cannot freeze it")
    return alpha


def _as_pos_head(x: torch.Tensor, y: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A q/k norm's input ``x`` and output ``y``, ``[1, pos, head, d]`` or ``[1, head, pos, d]`` (Gemma-3 transposes
    before the norm) -> ``[pos, head, d]``, the layout of ``reference`` (the projection ``[pos, head, d]``), which
    the input equals in one of the two layouts."""
    x, y = x[0], y[0]
    if x.shape == reference.shape and (x.shape[0] != x.shape[1] or torch.equal(x, reference)):
        return x, y
    return x.transpose(0, 1), y.transpose(0, 1)


# --------------------------------------------------------------------------------------------------
# The decomposition


def component_labels(loaded: LoadedModel, layer: int, side: str = "query") -> list[str]:
    """Labels of the components on one side (``"query"`` or ``"key"``) of layer ``layer``'s attribution."""
    arch = loaded.arch
    labels = ["embed"]
    for earlier in range(layer):
        labels += [f"L{earlier}.H{g}" for g in range(arch.n_heads)]
        if arch.o_proj(earlier).bias is not None:
            labels.append(f"L{earlier}.attn_bias")
        labels.append(f"L{earlier}.mlp")
    proj = getattr(arch.attention(layer), "q_proj" if side == "query" else "k_proj")
    if proj.bias is not None:
        labels.append("q_bias" if side == "query" else "k_bias")
    return labels


def _stream_components(loaded: LoadedModel, record: _Record, layout: NormLayout, layer: int,
                       pos: int) -> tuple[torch.Tensor, float]:
    """``[component, d_model]`` float64: the residual stream entering ``layer`` at ``pos``, split (labels as
    ``component_labels`` without the projection bias), and the relative gap of their sum to the stream."""
    arch = loaded.arch
    parts = [record.resid["embed"][pos].double().cpu()[None]]
    for earlier in range(layer):
        o_proj = arch.o_proj(earlier)
        # W_O [d_model, head · d_head] -> [d_model, head, d_head]: head g's block of columns reads its z slice.
        w = o_proj.weight.detach().double().cpu().view(o_proj.weight.shape[0], arch.n_heads, -1)
        z = record.z[earlier][pos].double().cpu()  # [head, d_head]
        heads = torch.einsum("dgv,gv->gd", w, z)  # [head, d_model]
        if o_proj.bias is not None:
            heads = torch.cat([heads, o_proj.bias.detach().double().cpu()[None]])
        if layout.attn_out_norm is not None:
            # Sandwich norm on the attention output: freeze its scale so that each head stays a linear term.
            norm = arch.layers[earlier].get_submodule(layout.attn_out_norm)
            x, y = record.attn_norm[earlier]
            gain = _gain(norm, x.shape[-1])
            alpha = _frozen_scale(x[0, pos], y[0, pos], gain, f"layer {earlier}'s {layout.attn_out_norm}")
            heads = alpha * gain * heads
        parts += [heads, record.mlp[earlier][pos].double().cpu()[None]]
    components = torch.cat(parts)
    stream = record.resid["target"][pos].double().cpu()
    gap = float((components.sum(0) - stream).norm() / stream.norm().clamp_min(1e-30))
    return components, gap


def _side(loaded: LoadedModel, record: _Record, layout: NormLayout, layer: int, pos: int, side: str,
          head: int) -> tuple[torch.Tensor, float]:
    """``[component, d_head]`` float64: each component's part of q (``side="query"``, query head ``head``) or k
    (``"key"``, kv head ``head``) at ``pos``, after the frozen norms and RoPE; and the stream's reconstruction gap."""
    arch = loaded.arch
    attn = arch.attention(layer)
    components, gap = _stream_components(loaded, record, layout, layer, pos)
    # Input norm of the layer, frozen at pos.
    norm = arch.layers[layer].get_submodule(layout.input_norm)
    x, y = record.norms["input"]
    gain = _gain(norm, x.shape[-1])
    u = _frozen_scale(x[0, pos], y[0, pos], gain, f"layer {layer}'s {layout.input_norm}") * gain * components
    # Projection rows of this head: [d_head, d_model]; the bias is its own component, after the stream's.
    proj = attn.q_proj if side == "query" else attn.k_proj
    d = arch.head_dim
    rows = slice(head * d, (head + 1) * d)
    part = u @ proj.weight.detach().double().cpu()[rows].T  # [component, d_head]
    if proj.bias is not None:
        part = torch.cat([part, proj.bias.detach().double().cpu()[rows][None]])
    if layout.qk_norm:
        which = "q" if side == "query" else "k"
        qk_norm = attn.q_norm if side == "query" else attn.k_norm
        nx, ny = record.norms[which]
        reference = record.capture[f"proj_{which}"]
        nx, ny = _as_pos_head(nx, ny, reference)
        gain = _gain(qk_norm, d)
        part = _frozen_scale(nx[pos, head], ny[pos, head], gain, f"layer {layer}'s {which}_norm") * gain * part
    # RoPE at pos, with the module's own function: [1, component, 1, d_head] against cos/sin [1, 1, d_head].
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    cos, sin = (t[:, pos:pos + 1].double().cpu() for t in record.rope)
    rotated, _ = rope(part[None, :, None], part[None, :, None], cos, sin)
    return rotated[0, :, 0], gap


def _attribution(loaded: LoadedModel, record: _Record, layout: NormLayout, layer: int, head: int, i: int, j: int,
                 ids: list[int]) -> QKAttribution:
    arch = loaded.arch
    kv_head = head // (arch.n_heads // arch.n_kv_heads)  # GQA: a group of query heads shares one kv head
    q, gap_q = _side(loaded, record, layout, layer, i, "query", head)  # [query component, d_head]
    k, gap_k = _side(loaded, record, layout, layer, j, "key", kv_head)  # [key component, d_head]
    cap = record.capture
    scaling = cap["scaling"] if cap["scaling"] is not None else arch.head_dim ** -0.5
    contributions = scaling * (q @ k.T)  # [query component, key component]
    score = scaling * float(cap["query"][0, head, i].double() @ cap["key"][0, kv_head, j].double())
    return QKAttribution(layer, head, kv_head, i, j, contributions, component_labels(loaded, layer, "query"),
                         component_labels(loaded, layer, "key"), score, max(gap_q, gap_k), 1, list(ids))


# --------------------------------------------------------------------------------------------------
# Public functions


def qk_attributions(loaded: LoadedModel, prompt: str | Sequence[int] | torch.Tensor, layer: int, head: int,
                    pairs: Sequence[tuple[int, int]], *, max_tokens: int = 2048) -> list[QKAttribution]:
    """``qk_attribution`` for several (query position, key position) pairs of one prompt, from one forward."""
    layout = check_supported(loaded)
    _check_head(loaded, layer, head)
    attn = loaded.arch.attention(layer)
    if getattr(attn, "attn_logit_softcapping", None) is not None:
        raise InputError(f"layer {layer} soft-caps its scores (tanh), which no linear decomposition is exact for")
    ids = _token_ids(loaded, prompt, max_tokens)
    causal = bool(getattr(attn, "is_causal", True))
    checked = []
    for pair in pairs:
        if not (isinstance(pair, tuple | list) and len(pair) == 2):
            raise InputError(f"a position pair is (query position, key position), got {pair!r}")
        i, j = _position(pair[0], len(ids), "query"), _position(pair[1], len(ids), "key")
        if causal and j > i:
            raise InputError(f"key position {j} comes after query position {i}: a causal model masks it, so "
                             "the head gives it no score; choose a key at or before the query")
        checked.append((i, j))
    if not checked:
        raise InputError("no (query position, key position) pair given")
    record = _run(loaded, ids, layer, layout)
    return [_attribution(loaded, record, layout, layer, head, i, j, ids) for i, j in checked]


def qk_attribution(loaded: LoadedModel, prompt: str | Sequence[int] | torch.Tensor, layer: int, head: int,
                   query_pos: int, key_pos: int, *, max_tokens: int = 2048) -> QKAttribution:
    """The pre-softmax score of head (``layer``, ``head``) for query ``query_pos`` and key ``key_pos`` of
    ``prompt``, split exactly into ``contributions[query component, key component]``.

    ``prompt``: text (tokenized under the model's BOS policy, cut at ``max_tokens``) or token ids. Positions are
    token indices (negative ones count from the end). Raises ``InputError`` for an unsupported family, a layer,
    head or position out of range, or a key after the query.
    """
    return qk_attributions(loaded, prompt, layer, head, [(query_pos, key_pos)], max_tokens=max_tokens)[0]


def mean_qk_attribution(loaded: LoadedModel, items: Sequence[tuple[str | Sequence[int], int, int]], layer: int,
                        head: int, *, max_tokens: int = 2048) -> QKAttribution:
    """The mean attribution over ``items`` = (prompt, query position, key position): mean contributions per
    (query component, key component) and mean score (one forward per distinct prompt).

    ``reconstruction_error`` is the largest over the items; ``n`` their number.
    """
    if not items:
        raise InputError("mean_qk_attribution needs at least one (prompt, query position, key position) item")
    by_prompt: dict[object, list[tuple[int, int]]] = {}
    prompts: dict[object, str | Sequence[int]] = {}
    for item in items:
        if not (isinstance(item, tuple | list) and len(item) == 3):
            raise InputError(f"an item is (prompt, query position, key position), got {item!r}")
        prompt, i, j = item
        key = prompt if isinstance(prompt, str) else tuple(int(t) for t in prompt)
        prompts[key] = prompt
        by_prompt.setdefault(key, []).append((i, j))
    found = [a for key, pairs in by_prompt.items()
             for a in qk_attributions(loaded, prompts[key], layer, head, pairs, max_tokens=max_tokens)]
    first = found[0]
    return QKAttribution(
        layer, head, first.kv_head, None, None, torch.stack([a.contributions for a in found]).mean(0),
        first.query_labels, first.key_labels, sum(a.score for a in found) / len(found),
        max(a.reconstruction_error for a in found), len(found))
