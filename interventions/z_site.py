"""Edits of z, the per-head output before o_proj (``[batch, query, head, d_head]``; TransformerLens hook_z).

Each edit changes z of chosen (layer, head) pairs on chosen rows and returns a new tensor (no in-place
writes, so gradients reach ``HeadOffsets``' parameters). They run in a forward pre-hook on
``arch.o_proj(layer)``, which reshapes its input ``[batch, query, head · d_head]``.

``edit.bind(arch)`` gives a ``BoundZEdit``; its ``edit_z(z, call)`` is what every runtime applies (the local
hook and the nnsight backend's local trace alike). ``z_affine`` gives the same edit as plain tensors for a
runtime without headlab (NDIF): edits that are z <- scale · z + shift per element implement it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from headlab.errors import InputError
from headlab.kernels.positions import Positions, PositionSpec

from .base import Bound, HeadSpec, Intervention, register_intervention, resolve_heads, spec_layers


@dataclass
class ZCall:
    """What a z edit knows about the call it edits: its layer, its rows and the columns already cached."""

    layer: int
    seen: int
    rows_of: object  # Callable[[Positions], Tensor [batch, query] bool]

    def rows(self, positions: Positions) -> torch.Tensor:
        return self.rows_of(positions)


@dataclass
class ZAffine:
    """A z edit of one layer as plain tensors: z <- scale · z + shift on ``selected``, z elsewhere.

    ``selected`` ``[batch, query, head]`` bool; ``scale`` and ``shift`` broadcast to ``[batch, query, head,
    d_head]`` (``[head, d_head]`` or ``[batch, query, head, d_head]``), fp32 on the CPU; ``scale_is_offset``: the
    factor is 1 + scale (LoFiT), added in z's dtype as ``edit_z`` does. ``remote_probe.edit_z`` applies it.
    """

    selected: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor
    scale_is_offset: bool = False

    def as_tuple(self) -> tuple:
        return self.selected, self.scale, self.shift, self.scale_is_offset


class BoundZEdit(Bound):
    """A z edit bound to one model; the sites call ``edit_z`` (and a runtime without headlab ``z_affine``)."""

    def edit_z(self, z: torch.Tensor, call: ZCall) -> torch.Tensor:
        """z ``[batch, query, head, d_head]`` -> edited z of the same shape, with this model's resolution."""
        return self.edit.edit_z(z, call, self)

    def z_affine(self, call: ZCall, shape: tuple[int, int, int, int]) -> ZAffine:
        """The edit of ``call.layer`` for z of ``shape`` [batch, query, head, d_head], as plain tensors."""
        return self.edit.z_affine(call, self, shape)

    def check_call(self, batch: int, n_query: int, seen: int) -> None:
        """Before the model computes: whatever the edit needs of the call's shape (HeadPatch: the cache's)."""
        check = getattr(self.edit, "check_call", None)
        if check is not None:
            check(batch, n_query, seen)


class ZEdit(Intervention):
    """A z-site edit: ``heads`` [(layer, head or None)], query ``rows`` (see ``Positions``).

    Subclasses add to ``bind`` what they resolve per model (``bound.with_state(...)``) and read it back in
    ``edit_z(z, call, bound)``; nothing is stored on the edit."""

    site = "z"
    heads: HeadSpec
    rows: PositionSpec

    def bind(self, arch) -> BoundZEdit:
        by_layer = resolve_heads(self.heads, arch, type(self).__name__)
        Positions.of(self.rows)
        return BoundZEdit(self, by_layer)

    def layers(self) -> list[int]:
        return spec_layers(self.heads)

    def edit_z(self, z: torch.Tensor, call: ZCall, bound: BoundZEdit) -> torch.Tensor:
        """z ``[batch, query, head, d_head]`` -> edited z of the same shape; ``bound``: this edit on this model."""
        raise NotImplementedError

    def z_affine(self, call: ZCall, bound: BoundZEdit, shape: tuple[int, int, int, int]) -> ZAffine:
        """This edit as z <- scale · z + shift on the chosen rows and heads (prefill, ``call.seen`` 0); edits
        that are not of that form cannot run where headlab does not (a remote nnsight trace)."""
        raise InputError(f"{type(self).__name__} is not a per-element scale and shift of z, so it cannot run where "
                         "headlab does not (a remote nnsight trace); use headlab.intervene or a local trace")

    def _selected(self, call: ZCall, heads: list[int], shape: tuple[int, int, int, int]) -> torch.Tensor:
        """``[batch, query, head]`` bool: the chosen rows of ``heads`` (on the CPU)."""
        rows = call.rows(Positions.of(self.rows)).cpu()  # [batch, query]
        chosen = torch.zeros(shape[2], dtype=torch.bool)
        chosen[heads] = True
        return rows[:, :, None] & chosen[None, None, :]

    def _where(self, z: torch.Tensor, new: torch.Tensor, call: ZCall, heads: list[int]) -> torch.Tensor:
        """z with ``new`` ``[batch, query, len(heads), d_head]`` on the chosen rows of ``heads``."""
        rows = call.rows(Positions.of(self.rows)).to(z.device)  # [batch, query]
        index = torch.tensor(heads, device=z.device)
        chosen = torch.zeros(z.shape[2], dtype=torch.bool, device=z.device)
        chosen[index] = True
        full = z.clone()
        full[:, :, index] = new.to(z.dtype)
        return torch.where(rows[:, :, None, None] & chosen[None, None, :, None], full, z)


@register_intervention("head_scale")
@dataclass
class HeadScale(ZEdit):
    """z <- alpha · z for chosen heads (VHR: alpha = 2; alpha = 0 ablates a head).

    ``alpha``: one float, or one per (layer, head) pair in the order of ``head_list``.
    """

    heads: HeadSpec
    alpha: float | Sequence[float] = 0.0
    rows: PositionSpec = "all"

    def bind(self, arch) -> BoundZEdit:
        bound = super().bind(arch)
        pairs = [(layer, h) for layer, hs in bound.by_layer.items() for h in hs]
        alphas = [float(self.alpha)] * len(pairs) if isinstance(self.alpha, int | float) else list(self.alpha)
        if len(alphas) != len(pairs):
            raise InputError(f"HeadScale: {len(alphas)} alphas for {len(pairs)} heads; give one float or one per head")
        # One alpha per (layer, head) of this model: a None head expands to a different count on another model.
        return bound.with_state(alpha=dict(zip(pairs, alphas, strict=True)))

    def edit_z(self, z: torch.Tensor, call: ZCall, bound: BoundZEdit) -> torch.Tensor:
        heads = bound.heads_of(call.layer)
        alpha = bound.state["alpha"]
        scale = torch.ones(z.shape[2], dtype=z.dtype, device=z.device)
        scale[heads] = torch.tensor([alpha[(call.layer, h)] for h in heads], dtype=z.dtype, device=z.device)
        rows = call.rows(Positions.of(self.rows)).to(z.device)
        return torch.where(rows[:, :, None, None], z * scale[None, None, :, None], z)

    def z_affine(self, call: ZCall, bound: BoundZEdit, shape: tuple[int, int, int, int]) -> ZAffine:
        heads = bound.heads_of(call.layer)
        scale = torch.ones(shape[2], shape[3])
        for h in heads:
            scale[h] = bound.state["alpha"][(call.layer, h)]
        return ZAffine(self._selected(call, heads, shape), scale, torch.zeros(shape[2], shape[3]))


def _hook_z(source, layer: int) -> torch.Tensor:
    """``[batch, pos, head, d_head]`` z of ``layer`` from a ``Trace`` or a ``{name: tensor}`` cache."""
    name = f"blocks.{layer}.attn.hook_z"
    try:
        return source[name]
    except KeyError:
        raise InputError(f"the cache has no {name}; record it with headlab.trace(loaded, names=[{name!r}])") from None


def _check_source(source, arch, what: str, layers: list[int], model_name: str | None = None) -> None:
    """A cache recorded on another model fails here, naming the model or the shape that differs.

    ``model_name``: the name of the model being edited; a ``Trace`` knows its own (a plain dict does not).
    """
    recorded_on = getattr(source, "model_name", None)
    if model_name is not None and recorded_on is not None and recorded_on != model_name:
        raise InputError(f"{what}: the cache was recorded on {recorded_on!r}, this model is {model_name!r}; pass "
                         "other_model=True to patch across models of the same shape on purpose")
    if arch is None:
        return
    model_of = getattr(source, "model_shape", None)
    mine = (arch.n_layers, arch.n_heads, arch.head_dim)
    if model_of is not None and tuple(model_of) != mine:
        raise InputError(f"{what}: the cache was recorded on a model with (layers, heads, d_head) = {tuple(model_of)}, "
                         f"this model has {mine}")
    for layer in layers:
        z = _hook_z(source, layer)
        if z.dim() != 4 or tuple(z.shape[2:]) != (arch.n_heads, arch.head_dim):
            raise InputError(f"{what}: cached z of layer {layer} has shape {list(z.shape)}, expected "
                             f"[batch, pos, {arch.n_heads}, {arch.head_dim}] (a cache from another model?)")


@register_intervention("head_mean_ablate")
@dataclass(eq=False)  # holds tensors: identity, not elementwise comparison
class HeadMeanAblate(ZEdit):
    """z <- mean z of a reference set, for chosen heads (mean ablation).

    Either ``mean`` ``{(layer, head): [d_head]}`` is given, or ``source`` (a ``Trace`` or
    ``{"blocks.{l}.attn.hook_z": [batch, pos, head, d_head]}``) and the mean runs over its real tokens.
    """

    heads: HeadSpec
    source: object = None
    mean: dict | None = None
    rows: PositionSpec = "all"
    other_model: bool = False  # True: means from a trace of another model of the same shape, on purpose

    def check_model(self, model_name: str) -> None:
        if self.source is not None and not self.other_model:
            _check_source(self.source, None, "HeadMeanAblate", [], model_name)

    def bind(self, arch) -> BoundZEdit:
        bound = super().bind(arch)
        if (self.mean is None) == (self.source is None):
            raise InputError("HeadMeanAblate: give either mean={(layer, head): tensor} or source=<trace or cache>")
        means: dict[tuple[int, int], torch.Tensor] = {}  # (layer, head) -> [d_head] fp32
        if self.mean is None:
            _check_source(self.source, arch, "HeadMeanAblate", bound.layers())
            real = getattr(self.source, "attention_mask", None)
            for layer, hs in bound.by_layer.items():
                z = _hook_z(self.source, layer).float()
                weight = torch.ones(z.shape[:2]) if real is None else real.float()
                weight = weight.to(z.device)[:, :, None, None]
                mean = (z * weight).sum(dim=(0, 1)) / weight.sum()  # [head, d_head]
                for h in hs:
                    means[(layer, h)] = mean[h]
        else:
            for layer, hs in bound.by_layer.items():
                for h in hs:
                    if (layer, h) not in self.mean:
                        raise InputError(f"HeadMeanAblate: mean has no entry for head ({layer}, {h})")
                    value = torch.as_tensor(self.mean[(layer, h)]).float()
                    if value.shape != (arch.head_dim,):
                        raise InputError(f"HeadMeanAblate: mean of ({layer}, {h}) has shape {list(value.shape)}, "
                                         f"expected [{arch.head_dim}]")
                    means[(layer, h)] = value
        return bound.with_state(means=means)

    def edit_z(self, z: torch.Tensor, call: ZCall, bound: BoundZEdit) -> torch.Tensor:
        heads = bound.heads_of(call.layer)
        means = torch.stack([bound.state["means"][(call.layer, h)] for h in heads]).to(z.device)  # [n, d_head]
        return self._where(z, means.expand(z.shape[0], z.shape[1], -1, -1), call, heads)

    def z_affine(self, call: ZCall, bound: BoundZEdit, shape: tuple[int, int, int, int]) -> ZAffine:
        heads = bound.heads_of(call.layer)
        shift = torch.zeros(shape[2], shape[3])
        for h in heads:
            shift[h] = bound.state["means"][(call.layer, h)].float().cpu()
        return ZAffine(self._selected(call, heads, shape), torch.zeros(shape[2], shape[3]), shift)


@register_intervention("head_patch")
@dataclass(eq=False)  # holds tensors: identity, not elementwise comparison
class HeadPatch(ZEdit):
    """Activation patching: z of chosen heads and rows <- z of the same heads in another run.

    ``source``: a ``Trace`` (or ``{"blocks.{l}.attn.hook_z": [batch, pos, head, d_head]}``) of a run with
    the same batch size and input length. Columns index the cached run directly (same padding
    layout); while decoding past the cached length nothing is patched.
    """

    heads: HeadSpec
    source: object = None
    rows: PositionSpec = "all"
    other_model: bool = False  # True: patch from a trace of another model of the same shape, on purpose

    def bind(self, arch) -> BoundZEdit:
        bound = super().bind(arch)
        if self.source is None:
            raise InputError("HeadPatch needs source=<trace or cache of hook_z> from another run")
        _check_source(self.source, arch, "HeadPatch", bound.layers())
        return bound

    def check_model(self, model_name: str) -> None:
        if not self.other_model:
            _check_source(self.source, None, "HeadPatch", [], model_name)

    def check_call(self, batch: int, n_query: int, seen: int) -> None:
        """Before the model computes: a prefill must match the cached batch and input length."""
        if seen:
            return
        for layer in self.layers():
            z = _hook_z(self.source, layer)
            if tuple(z.shape[:2]) != (batch, n_query):
                raise InputError(f"HeadPatch: the cache of layer {layer} holds [batch, pos] = {list(z.shape[:2])}, "
                                 f"this input is [{batch}, {n_query}]; patch between runs of the same shape")

    def edit_z(self, z: torch.Tensor, call: ZCall, bound: BoundZEdit) -> torch.Tensor:
        heads = bound.heads_of(call.layer)
        cached = _hook_z(self.source, call.layer)
        batch, n_q = z.shape[:2]
        new = z[:, :, heads].clone()
        stop = min(n_q, cached.shape[1] - call.seen)
        if stop <= 0:
            return z
        new[:, :stop] = cached[:batch, call.seen : call.seen + stop][:, :, heads].to(device=z.device, dtype=z.dtype)
        rows = call.rows(Positions.of(self.rows)).clone()
        rows[:, stop:] = False
        return self._where(z, new, ZCall(call.layer, call.seen, lambda _p: rows), heads)

    def z_affine(self, call: ZCall, bound: BoundZEdit, shape: tuple[int, int, int, int]) -> ZAffine:
        batch, n_q, n_heads, d_head = shape
        cached = _hook_z(self.source, call.layer)[:batch, :n_q].detach().float().cpu()
        shift = torch.zeros(batch, n_q, n_heads, d_head)
        shift[:, : cached.shape[1]] = cached
        selected = self._selected(call, bound.heads_of(call.layer), shape)
        selected[:, cached.shape[1]:] = False  # nothing cached past the recorded length
        return ZAffine(selected, torch.zeros(n_heads, d_head), shift)


@register_intervention("head_offsets")
@dataclass(eq=False)  # holds tensors: identity, not elementwise comparison
class HeadOffsets(ZEdit):
    """LoFiT: z' = (1 + A) ⊙ z + v for chosen heads, at every chosen row.

    ``A`` and ``v`` are ``nn.Parameter`` ``[n_selected_heads, d_head]``, one row per pair of
    ``pairs`` (explicit (layer, head) pairs, in that order), so an optimiser can train them while the
    model stays frozen. Build with ``HeadOffsets.create(arch, pairs, init="zeros" | "normal")``.
    ``model_shape`` (layers, heads, d_head) of the model they were made for: offsets made for another
    model are refused by ``bind`` (set by ``create``, kept by ``save``/``load``; None: not checked).
    """

    pairs: list[tuple[int, int]]
    A: nn.Parameter
    v: nn.Parameter
    rows: PositionSpec = "all"
    model_shape: tuple[int, int, int] | None = None
    heads: HeadSpec = field(init=False)

    def __post_init__(self) -> None:
        self.pairs = [tuple(p) for p in self.pairs]
        self.heads = list(self.pairs)

    @classmethod
    def create(cls, arch, pairs: HeadSpec, init: str = "zeros", std: float = 1e-3,
               generator: torch.Generator | None = None, rows: PositionSpec = "all") -> HeadOffsets:
        """Zeros (identity) or N(0, std) (LoFiT's init) parameters for ``pairs``, in their order
        (a None head expands to every head of its layer)."""
        resolve_heads(pairs, arch, "HeadOffsets")  # names the valid range of a bad pair
        explicit = [(layer, h) for layer, head in pairs
                    for h in (range(arch.n_heads) if head is None else [head])]
        shape = (len(explicit), arch.head_dim)
        if init == "zeros":
            a, v = torch.zeros(shape), torch.zeros(shape)
        elif init == "normal":
            a, v = (torch.randn(shape, generator=generator) * std for _ in range(2))
        else:
            raise InputError(f"HeadOffsets init must be 'zeros' or 'normal', got {init!r}")
        return cls(explicit, nn.Parameter(a), nn.Parameter(v), rows,
                   (arch.n_layers, arch.n_heads, arch.head_dim))

    def parameters(self) -> list[nn.Parameter]:
        return [self.A, self.v]

    def bind(self, arch) -> BoundZEdit:
        mine = (arch.n_layers, arch.n_heads, arch.head_dim)
        if self.model_shape is not None and tuple(self.model_shape) != mine:
            raise InputError(f"HeadOffsets were made for a model with (layers, heads, d_head) = "
                             f"{tuple(self.model_shape)}, this model has {mine}: load the offsets trained on it")
        bound = super().bind(arch)
        if len(set(self.pairs)) != len(self.pairs):
            raise InputError("HeadOffsets: a (layer, head) pair appears twice")
        for name in ("A", "v"):
            value = getattr(self, name)
            if tuple(value.shape) != (len(self.pairs), arch.head_dim):
                raise InputError(f"HeadOffsets.{name} has shape {list(value.shape)}, expected "
                                 f"[{len(self.pairs)}, {arch.head_dim}] (one row per (layer, head) pair)")
        return bound.with_state(row={pair: i for i, pair in enumerate(self.pairs)})  # (layer, head) -> row of A, v

    def edit_z(self, z: torch.Tensor, call: ZCall, bound: BoundZEdit) -> torch.Tensor:
        heads = bound.heads_of(call.layer)
        index = torch.tensor([bound.state["row"][(call.layer, h)] for h in heads], device=self.A.device)
        a, v = self.A[index].to(z.device, z.dtype), self.v[index].to(z.device, z.dtype)  # [n, d_head]
        new = (1 + a) * z[:, :, heads] + v
        return self._where(z, new, call, heads)

    def z_affine(self, call: ZCall, bound: BoundZEdit, shape: tuple[int, int, int, int]) -> ZAffine:
        heads = bound.heads_of(call.layer)
        scale, shift = torch.zeros(shape[2], shape[3]), torch.zeros(shape[2], shape[3])
        for h in heads:
            row = bound.state["row"][(call.layer, h)]
            scale[h] = self.A.detach()[row].float().cpu()
            shift[h] = self.v.detach()[row].float().cpu()
        return ZAffine(self._selected(call, heads, shape), scale, shift, scale_is_offset=True)

    def save(self, path: str | Path) -> Path:
        """Write A, v, the head pairs (and the model shape when known) to a safetensors file; returns it.

        ``path``: a file (an existing one, or a new path ending in ``.safetensors``), or else a folder (created
        if missing) that gets ``tensors.safetensors``, the file ``load`` reads from a folder: ``load(path)``
        reads back whatever ``save(path)`` wrote."""
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        path = _offsets_file(Path(path))
        if path.name == OFFSETS_FILE and (path.parent / "manifest.json").is_file():
            # A run directory's tensors file holds the whole run's tensors: replacing it would lose them.
            raise InputError(f"{path.parent} is a headlab run directory: save the offsets to a new folder or a "
                             ".safetensors file (the run's own tensors already load with HeadOffsets.load)")
        try:
            path.parent.mkdir(exist_ok=True)  # a run-style folder; its own parent must exist
            save_file(self.tensors(), str(path))
        except (OSError, SafetensorError) as err:  # safetensors reports its I/O errors as SafetensorError
            reason = err.strerror if isinstance(err, OSError) and err.strerror else err
            raise InputError(f"cannot write HeadOffsets to {path} ({reason}): pass a .safetensors file or a folder "
                             "in a directory you can write") from err
        return path

    def tensors(self) -> dict[str, torch.Tensor]:
        """``A``, ``v`` ``[n, d_head]``, ``pairs`` ``[n, 2]`` (and ``model_shape`` ``[3]``): what ``load`` reads."""
        out = {"A": self.A.detach().cpu().contiguous(), "v": self.v.detach().cpu().contiguous(),
               "pairs": torch.tensor(self.pairs, dtype=torch.long).reshape(-1, 2)}
        if self.model_shape is not None:
            out["model_shape"] = torch.tensor(self.model_shape, dtype=torch.long)
        return out

    @classmethod
    def load(cls, path: str | Path, rows: PositionSpec = "all") -> HeadOffsets:
        """From a file written by ``save``, or a folder holding them (``tensors.safetensors``: a
        ``headlab lofit train`` run directory, or a folder ``save`` wrote)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        if path.is_dir():
            path = path / OFFSETS_FILE
        if not path.is_file():
            raise InputError(f"no HeadOffsets at {path}: give the safetensors file written by save, or a "
                             "`headlab lofit train` run directory")
        try:
            data = load_file(str(path))
        except (SafetensorError, OSError) as err:  # a truncated or foreign file: safetensors' own errors
            raise InputError(f"{path} is not a readable safetensors file ({err}): it is damaged or not HeadOffsets; "
                             "re-run `headlab lofit train` (or save the offsets again)") from err
        if not {"A", "v", "pairs"} <= set(data):
            raise InputError(f"{path} holds no HeadOffsets (it needs tensors A, v and pairs)")
        pairs = [tuple(int(x) for x in p) for p in data["pairs"].tolist()]
        shape = tuple(int(x) for x in data["model_shape"].tolist()) if "model_shape" in data else None
        return cls(pairs, nn.Parameter(data["A"]), nn.Parameter(data["v"]), rows, shape)


# The file a run directory keeps its tensors in (headlab.result writes it); save and load use it for folders.
OFFSETS_FILE = "tensors.safetensors"


def _offsets_file(path: Path) -> Path:
    """Where ``HeadOffsets.save(path)`` writes: an existing file or a new ``.safetensors`` path itself,
    else ``tensors.safetensors`` inside the folder ``path`` (what ``load(path)`` reads from a folder)."""
    if path.is_file() or not path.exists() and path.suffix == ".safetensors":
        return path
    return path / OFFSETS_FILE
