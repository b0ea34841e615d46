"""The nnsight backend: headlab's attention statistics and z-site edits as nnsight traces.

headlab's own path switches a model to its attention function. nnsight cannot ship that function to
a remote NDIF server, which runs the model as it is deployed (sdpa attention) and executes only the
trace body. So this backend reads what the model hands to its attention function instead:

- **q, k, v after RoPE**: the arguments of the ``attention_interface(...)`` call inside each attention
  module's ``forward``, reached through nnsight's ``.source`` (chosen over recomputing q and k from the
  module input with q_proj / k_proj and the rotary embedding, which would need per-architecture code
  (q/k norms, partial rotary, MLA) and run the projections twice). The mask the model built comes with
  them, so padding, sliding windows and the model's own mask rules hold as the model computed them.
- ``remote_probe.attention_statistics`` (plain torch, whitelisted imports only) reduces them to the
  O(H·T) statistics in chunks of query rows; only those leave the server.
- z-site edits are bound to the model (``edit.bind(arch)``) and applied to the input of o_proj by the
  bound edit's own ``edit_z``, the method ``headlab.intervene``'s z hook calls, when the trace runs here.
  A remote trace (NDIF, or ``"local"``'s dry run) cannot call headlab: there each bound edit gives its
  plain-tensor form (``z_affine``: rows × heads selection, scale, shift) and ``remote_probe.edit_z`` applies
  it. Either way this module names no edit class, so a new z edit needs no change here.

Attention-site edits (``ScoreBoost``, ``KeyKnockout``, ``Redistribute`` …) need headlab's attention
function and are refused here. Locally the backend wraps the loaded model (``NNsight``); with
``remote=True`` it runs on NDIF (``TransformersModel`` of the hub id, key from ``$NDIF_API_KEY``);
``remote="local"`` is nnsight's serverless dry run of the remote path (serialised, local modules hidden).

nnsight is imported on first use: importing it mounts ``.save`` on every Python object.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from headlab.checks import NDIF_KEY_ENV, ndif_key  # noqa: F401  (NDIF_KEY_ENV: re-exported)
from headlab.errors import InputError
from headlab.kernels import AttentionStats, StatsRequest
from headlab.kernels.attention_function import (
    ATTN_IMPLEMENTATION,
    active_editor,
    active_patterns,
    active_reader,
    other_attention,
)

from . import remote_probe

_OP = re.compile(r"^attention_interface_(\d+)$")
# One envoy tree per model and mode, kept on the model (an envoy holds its model, so a cache keyed by the
# model elsewhere would keep it alive): building one instruments modules (once) and is not free.
_ENVOYS = "_headlab_nnsight_envoys"


def check_remote(model_name: str, remote: bool | str) -> None:
    """Checks before anything loads: a key for NDIF, and a model NDIF can name (a hub id)."""
    if remote is True:
        ndif_key()
        from headlab.loading import ALIASES, HUB_ID

        if not HUB_ID.match(ALIASES.get(model_name, model_name)):
            raise InputError(f"--remote runs a model NDIF hosts, named by its hub id (org/name); {model_name!r} "
                             "is not one: pass e.g. --model meta-llama/Llama-3.1-8B, or drop --remote")


def _nnsight():
    import nnsight

    return nnsight


def envoy_of(loaded, remote: bool | str = False):
    """The nnsight wrapper of ``loaded``: ``NNsight`` of the model itself locally; ``TransformersModel``
    for the remote path (of the hub id with ``remote=True``; of the loaded model for ``"local"``)."""
    key = (bool(remote), remote == "local")
    cache = loaded.model.__dict__.setdefault(_ENVOYS, {})
    if key in cache:
        return cache[key]
    nnsight = _nnsight()
    with warnings.catch_warnings():
        # BERT's submodule "output" is renamed E_output on its envoy; envoy_at handles it, the user need not.
        warnings.filterwarnings("ignore", message=".*which nnsight already serves.*")
        envoy = _build_envoy(loaded, remote, nnsight)
    cache[key] = envoy
    return envoy


def _build_envoy(loaded, remote: bool | str, nnsight):
    if not remote:
        envoy = nnsight.NNsight(loaded.model)
    else:
        from nnsight import TransformersModel

        # TransformersModel sets padding side and pad token on its tokenizer: give it a copy.
        options = {"tokenizer": copy.deepcopy(loaded.text_tokenizer)}
        if remote is True and loaded.revision:
            options["revision"] = loaded.revision
        if remote == "local" and not loaded.model.can_generate() and not type(loaded.model).__name__.endswith(
                ("ForMaskedLM", "ForSequenceClassification", "ForTokenClassification", "ForImageClassification")):
            options["task"] = "feature-extraction"  # a bare encoder (minilm): nnsight cannot infer a task for it
        envoy = TransformersModel(loaded.model if remote == "local" else loaded.source, **options)
    return envoy


def envoy_at(envoy, path: str):
    """The envoy of the module at ``path``. A submodule named like a value nnsight serves on every module
    (BERT's ``attention.output``) is ``E_output`` on its envoy; ``Envoy.get`` would read the value instead."""
    node = envoy
    for part in path.split(".") if path else []:
        renamed = f"E_{part}"
        node = getattr(node, renamed) if hasattr(node, renamed) else getattr(node, part)
    return node


def attention_op(envoy, path: str) -> str:
    """The name of the ``attention_interface(...)`` call inside the attention module at ``path``."""
    names = [name for name in envoy_at(envoy, path).source.names if _OP.match(name)]
    if not names:
        raise InputError(f"the attention module {path} calls no attention_interface(...) in its forward, so the "
                         "nnsight backend cannot read its q, k, v; use the native backend (--backend torch)")
    return max(names, key=lambda name: int(_OP.match(name).group(1)))  # the binding is _0, the call the last


def bind_z_edits(loaded, edits: Sequence) -> list:
    """headlab's z-site edits bound to ``loaded``'s model (``BoundZEdit``), checked as ``headlab.intervene``
    checks them (model, conflicts); the edits themselves are left unchanged."""
    from headlab.interventions.base import Intervention
    from headlab.interventions.context import check_conflicts

    arch = loaded.arch
    bound = []
    for edit in edits:
        if not isinstance(edit, Intervention):
            raise InputError(f"the nnsight backend takes interventions (HeadScale, …), got {type(edit).__name__}")
        if edit.site != "z":
            raise InputError(f"{type(edit).__name__} edits the {edit.site} site; the nnsight backend runs z-site edits "
                             "only (HeadScale, HeadMeanAblate, HeadOffsets, HeadPatch): attention-site edits need "
                             "headlab's attention function, which NDIF does not run. Use headlab.intervene locally")
        bound.append(edit.bind(arch))
        if hasattr(edit, "check_model"):
            edit.check_model(loaded.name)
    check_conflicts(bound)
    return bound


@dataclass
class ZEdits:
    """The z edits of one traced forward (prefill only, no KV cache), by layer in the order ``headlab.intervene``
    applies them: ``bound`` ``{layer: [BoundZEdit, ...]}``; ``call`` ``{layer: ZCall}`` whose rows resolve from
    the 2-D padding mask as in ``headlab.intervene``; ``affine`` ``{layer: [ZAffine, ...]}`` (only for a remote
    trace: the same edits as plain tensors, ``z_affine``)."""

    bound: dict[int, list]
    call: dict[int, object]
    affine: dict[int, list] = field(default_factory=dict)


def compile_z_edits(loaded, edits: Sequence, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    remote: bool | str = False) -> ZEdits:
    """headlab's z-site edits bound and laid out per layer for one forward of ``input_ids`` ``[batch, position]``.

    ``remote``: also their plain-tensor forms, for a trace that runs without headlab."""
    from headlab.interventions.z_site import ZCall
    from headlab.kernels.positions import SequenceLayout

    arch = loaded.arch
    bound = bind_z_edits(loaded, edits)
    batch, n_q = input_ids.shape
    layout = SequenceLayout.from_mask(attention_mask, batch, n_q, torch.device("cpu"))
    shape = (batch, n_q, arch.n_heads, arch.v_head_dim)  # z [batch, query, head, d_head]
    out = ZEdits({}, {})
    for b in bound:
        b.check_call(batch, n_q, 0)  # HeadPatch: the cache must hold this input's [batch, position]
        for layer in b.layers():
            out.bound.setdefault(layer, []).append(b)
    for layer in out.bound:
        # seen 0: a trace is one prefill; rows on the CPU, moved to z's device by the edits themselves.
        out.call[layer] = ZCall(layer, 0, lambda positions: layout.choose(positions, n_q, 0))
        if remote:
            out.affine[layer] = [b.z_affine(out.call[layer], shape) for b in out.bound[layer]]
    return out


@dataclass
class NnsightRun:
    """What one traced forward returned: statistics by layer (on the CPU), the model output (None when not
    kept), and the ``(args, kwargs)`` inputs and outputs of the modules asked for by ``capture``."""

    stats: dict[int, AttentionStats]
    output: object
    inputs: dict[str, tuple] = field(default_factory=dict)
    outputs: dict[str, object] = field(default_factory=dict)
    captured: list[tuple[str, str]] = field(default_factory=list)  # ("input" | "output", path), in forward order

    @property
    def logits(self) -> torch.Tensor:
        return self.output.logits if hasattr(self.output, "logits") else self.output[0]


def _check_request(request: StatsRequest | None) -> bool:
    """The backend computes the always-on statistics and the distance profile; anything else is refused."""
    if request is None:
        return False
    if request.key_groups is not None or request.group_outputs or request.query_group is not None:
        raise InputError("the nnsight backend computes the per-row, per-key and distance statistics; key groups "
                         "and partial outputs need headlab's attention function: use the native backend")
    return bool(request.distance)


def trace_events(model: nn.Module, stats: dict[int, nn.Module], edits: dict[int, nn.Module],
                 capture_in: set[str], capture_out: set[str]) -> list[tuple[str, object]]:
    """What the trace body reads and writes, in the order the forward reaches it (nnsight serves values in
    execution order): a module's input on entry, its attention call and z edit (o_proj's input) inside, its
    output on exit; children in registration order, which is execution order for the modules headlab reads."""
    by_module = {id(m): layer for layer, m in stats.items()}
    z_by_module = {id(m): layer for layer, m in edits.items()}
    events: list[tuple[str, object]] = []

    def visit(name: str, module: nn.Module) -> None:
        if name in capture_in:
            events.append(("input", name))
        if id(module) in by_module:
            events.append(("stats", by_module[id(module)]))
        if id(module) in z_by_module:
            events.append(("z", z_by_module[id(module)]))
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)
        if name in capture_out:
            events.append(("output", name))

    visit("", model)
    return events


def run_trace(loaded, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
              layers: Sequence[int] = (), request: StatsRequest | None = None, edits: Sequence = (),
              remote: bool | str = False, chunk_rows: int = remote_probe.DEFAULT_CHUNK_ROWS,
              capture_inputs: Sequence[str] = (), capture_outputs: Sequence[str] = (), keep_output: bool = True,
              **forward_kwargs) -> NnsightRun:
    """One forward of ``input_ids`` ``[batch, position]`` (``attention_mask`` 1 = real) as an nnsight trace.

    ``layers``: the layers whose attention statistics are computed (``remote_probe``); ``edits``: z-site
    interventions applied during the forward. ``remote``: False (here), True (NDIF; needs
    ``$NDIF_API_KEY``) or ``"local"`` (nnsight's serialised dry run). ``capture_inputs`` / ``capture_outputs``:
    module paths whose inputs / outputs come back too (what a remote run costs: their full tensors);
    ``keep_output``: bring back the model's output (the logits). Statistics come back on the CPU.
    """
    nnsight = _nnsight()
    if remote is True:
        nnsight.CONFIG.API.APIKEY = ndif_key()
    if remote:
        nnsight.register(remote_probe)  # its source travels with the request: the server has no headlab
    distance = _check_request(request)
    arch = loaded.arch
    stat_layers = sorted(set(layers))
    for layer in stat_layers:
        if not 0 <= layer < arch.n_layers:
            raise InputError(f"layer {layer} does not exist; this model has layers 0..{arch.n_layers - 1}")
    z_edits = compile_z_edits(loaded, edits, input_ids, attention_mask, remote) if edits else ZEdits({}, {})
    plans = z_edits.bound
    envoy = envoy_of(loaded, remote)
    names = {id(module): name for name, module in loaded.model.named_modules()}
    attn = {layer: envoy_at(envoy, names[id(arch.attention(layer))]) for layer in stat_layers}
    ops = {layer: attention_op(envoy, names[id(arch.attention(layer))]) for layer in stat_layers}
    o_proj = {layer: envoy_at(envoy, names[id(arch.o_proj(layer))]) for layer in plans}
    z_plans = {layer: [plan.as_tuple() for plan in group] for layer, group in z_edits.affine.items()}
    # What the body reads of headlab objects stays empty remotely: a remote body travels without headlab.
    z_bound = {} if remote else plans
    z_calls = {} if remote else z_edits.call
    events = trace_events(loaded.model, {layer: arch.attention(layer) for layer in stat_layers},
                          {layer: arch.o_proj(layer) for layer in plans}, set(capture_inputs), set(capture_outputs))
    captured = [(kind, path) for kind, path in events if kind in ("input", "output")]
    nodes = {path: envoy_at(envoy, path) for _, path in captured}
    padding = attention_mask.bool().cpu() if attention_mask is not None else None
    n_heads = arch.n_heads

    inputs = {"input_ids": input_ids, **({"attention_mask": attention_mask} if attention_mask is not None else {})}
    if remote:
        # TransformersModel adds mask-derived position_ids to padded batches; headlab's own forward does not.
        inputs["position_ids"] = torch.arange(input_ids.shape[1])[None].expand(input_ids.shape[0], -1)
        trace = envoy.trace({**inputs, **forward_kwargs}, remote=remote)
    else:
        trace = envoy.trace(**inputs, **forward_kwargs)
    # The block below is what nnsight ships to a remote server: plain torch, remote_probe and envoys only.
    with torch.no_grad(), trace:
        saved = nnsight.save({"stats": {}, "inputs": {}, "outputs": {}, "output": None})
        for kind, key in events:
            if kind == "stats":
                call_args, call_kwargs = getattr(attn[key].source, ops[key]).inputs
                call_mask = call_args[4] if len(call_args) > 4 else call_kwargs.get("attention_mask")
                saved["stats"][key] = remote_probe.attention_statistics(
                    call_args[1], call_args[2], call_mask, call_kwargs.get("scaling"), padding,
                    call_kwargs.get("s_aux"), bool(getattr(call_args[0], "is_causal", True)), distance, chunk_rows)
            elif kind == "z":
                z = o_proj[key].input  # [batch, query, head · d_head]
                if remote:  # no headlab on the server: the edits' plain-tensor forms
                    for selected, scale, shift, scale_is_offset in z_plans[key]:
                        z = remote_probe.edit_z(z, n_heads, selected, scale, shift, scale_is_offset)
                else:  # the bound edits' own edit_z, as headlab.intervene's z hook applies them
                    z4 = z.view(*z.shape[:-1], n_heads, z.shape[-1] // n_heads)  # [batch, query, head, d_head]
                    for bound in z_bound[key]:
                        z4 = bound.edit_z(z4, z_calls[key])
                    z = z4.reshape(z.shape)
                o_proj[key].input = z
            elif kind == "input":
                saved["inputs"][key] = nodes[key].inputs
            else:
                saved["outputs"][key] = nodes[key].output
        if keep_output:
            saved["output"] = envoy.output
    stats = {layer: AttentionStats(**{name: value.cpu() for name, value in saved["stats"][layer].items()})
             for layer in stat_layers}
    return NnsightRun(stats, saved["output"], saved["inputs"], saved["outputs"], captured)


def z_edited_logits(loaded, *edits, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    remote: bool | str = False) -> torch.Tensor:
    """Logits ``[batch, position, vocab]`` of one forward with z-site ``edits`` applied through nnsight."""
    return run_trace(loaded, input_ids, attention_mask, edits=edits, remote=remote).logits


class NnsightProbe:
    """``AttentionProbe``'s protocol on the nnsight backend: ``on_stats(layer, stats)`` per layer per forward.

    Use ``probe.forward(input_ids, attention_mask)`` for each batch (also remotely); without ``on_stats``
    the last forward's statistics are kept in ``probe.last``."""

    def __init__(self, loaded, on_stats: Callable[[int, AttentionStats], None] | None = None,
                 layers: list[int] | None = None, request: StatsRequest | None = None,
                 remote: bool | str = False, chunk_rows: int = remote_probe.DEFAULT_CHUNK_ROWS):
        self.loaded = loaded
        self.on_stats = on_stats
        self.layers = sorted(set(range(loaded.arch.n_layers) if layers is None else layers))
        self.request = request
        self.remote = remote
        self.chunk_rows = chunk_rows
        self.last: dict[int, AttentionStats] = {}
        _check_request(request)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                edits: Sequence = (), **forward_kwargs) -> NnsightRun:
        run = run_trace(self.loaded, input_ids, attention_mask, layers=self.layers, request=self.request,
                        edits=edits, remote=self.remote, chunk_rows=self.chunk_rows, **forward_kwargs)
        for layer, stats in run.stats.items():
            if self.on_stats is not None:
                self.on_stats(layer, stats)
            else:
                self.last[layer] = stats
        return run

    def __enter__(self) -> NnsightProbe:
        return self

    def __exit__(self, *exc) -> None:
        return None


class NnsightModel(nn.Module):
    """A stand-in for ``loaded.model`` whose forwards run as nnsight traces: the analyses run unchanged on
    ``with_nnsight(loaded)``.

    While an ``AttentionProbe`` on this model is active, a forward runs the wrapped model (on its own
    attention implementation) inside an nnsight trace and the probe receives statistics from
    ``remote_probe`` instead of headlab's attention function.

    - Locally (``remote=False``) every other forward is the wrapped model's own, and forward hooks on its
      modules (residual probes, z-site edits) fire as usual.
    - Remotely (``remote=True``, or ``"local"`` for nnsight's dry run) every forward is a trace on the
      server. Forward hooks that local probes registered on the wrapped model's modules are replayed here
      on the inputs and outputs the trace brought back (each costs that module's full tensor, e.g.
      ``[batch, position, d_model]`` per decoder layer for the residual probe); a hook that returns an edit
      is refused, since the server never sees it. The model's output comes back only with ``keep_output``.
    """

    def __init__(self, loaded, remote: bool | str = False, chunk_rows: int = remote_probe.DEFAULT_CHUNK_ROWS,
                 keep_output: bool | None = None):
        super().__init__()
        self.inner = loaded.model
        self._loaded = loaded
        self._remote = remote
        self._chunk_rows = chunk_rows
        self._keep_output = not remote if keep_output is None else keep_output
        self._native = loaded.model.config._attn_implementation

        # Callers inspect the forward's signature (logits_to_keep, the cache argument's name): show the model's.
        def forward(*args, **kwargs):
            return self._forward(*args, **kwargs)

        self.forward = functools.wraps(loaded.model.forward)(forward)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("inner")
            if inner is None:  # half-built (copy, unpickling): nothing to delegate to
                raise
            return getattr(inner, name)

    def set_attn_implementation(self, implementation) -> None:
        self.inner.set_attn_implementation(implementation)

    def _forward(self, *args, **kwargs):
        probe = active_reader()
        probing = probe is not None and getattr(probe, "model", None) is self
        if not probing and not self._remote:
            return self.inner(*args, **kwargs)
        if active_editor() is not None or active_patterns() is not None:
            raise InputError("the nnsight backend reads statistics from the model's own attention call, so "
                             "attention-site edits and full patterns (hook_pattern) cannot run through it; use "
                             "the native backend for them")
        input_ids = kwargs.pop("input_ids", args[0] if args else None)
        attention_mask = kwargs.pop("attention_mask", args[1] if len(args) > 1 else None)
        if input_ids is None:
            raise InputError("the nnsight backend runs forwards on input_ids; inputs_embeds are not supported")
        layers = sorted(probe.layers) if probing else []
        request = probe.request if probing else None
        if not self._remote:
            with self._native_attention():
                run = run_trace(self._loaded, input_ids, attention_mask, layers=layers, request=request,
                                chunk_rows=self._chunk_rows, **kwargs)
        else:
            pre, post = self._hooked()
            with self._native_attention(), _hooks_off(self.inner):
                run = run_trace(self._loaded, input_ids, attention_mask, layers=layers, request=request,
                                remote=self._remote, chunk_rows=self._chunk_rows, capture_inputs=pre,
                                capture_outputs=post, keep_output=self._keep_output, **kwargs)
            self._replay(run)
        for layer in sorted(run.stats):
            probe.record(layer, run.stats[layer])
        return run.output

    def _hooked(self) -> tuple[list[str], list[str]]:
        """Paths of the wrapped model's modules with forward pre-hooks, and with forward hooks."""
        pre, post = [], []
        for name, module in self.inner.named_modules():
            if module._forward_pre_hooks:
                pre.append(name)
            if module._forward_hooks:
                post.append(name)
                if module._forward_hooks_with_kwargs:
                    pre.append(name)  # such a hook reads the call's kwargs too
        return pre, post

    def _replay(self, run: NnsightRun) -> None:
        """Run the local hooks on what the remote forward brought back, in forward order."""
        modules = dict(self.inner.named_modules())
        for kind, path in run.captured:
            module = modules[path]
            args, kwargs = run.inputs.get(path, ((), {}))
            if kind == "input":
                for key, hook in list(module._forward_pre_hooks.items()):
                    kw = key in module._forward_pre_hooks_with_kwargs
                    _refuse_edit(hook(module, args, kwargs) if kw else hook(module, args), path)
            else:
                output = run.outputs[path]
                for key, hook in list(module._forward_hooks.items()):
                    kw = key in module._forward_hooks_with_kwargs
                    _refuse_edit(hook(module, args, kwargs, output) if kw else hook(module, args, output), path)

    def _native_attention(self) -> contextlib.AbstractContextManager:
        """The wrapped model on its own attention implementation, with no headlab participant in force: the
        probe switched the model to headlab's attention function, and nnsight reads the model's own call (the
        statistics then go to the probe from ``_forward``)."""
        return other_attention(self.inner, self._native, detached=True)


def _refuse_edit(result, path: str) -> None:
    if result is not None:
        raise InputError(f"a hook on {path} edits the forward, which a remote run cannot apply (the server never "
                         "sees local hooks): pass z-site edits to the nnsight backend (run_trace(edits=...)) instead")


@contextlib.contextmanager
def _hooks_off(model: nn.Module) -> Iterator[None]:
    """Local forward hooks set aside while a remote forward runs ("local" dry runs execute this very model)."""
    stash = []
    for module in model.modules():
        stash.append((module, module._forward_pre_hooks, module._forward_hooks))
        module._forward_pre_hooks, module._forward_hooks = type(module._forward_pre_hooks)(), \
            type(module._forward_hooks)()
    try:
        yield
    finally:
        for module, pre, post in stash:
            module._forward_pre_hooks, module._forward_hooks = pre, post


def with_nnsight(loaded, remote: bool | str = False, chunk_rows: int = remote_probe.DEFAULT_CHUNK_ROWS,
                 keep_output: bool | None = None):
    """``loaded`` with its model wrapped in ``NnsightModel``: analyses then read statistics through nnsight
    (``remote``: on NDIF, or ``"local"`` for nnsight's dry run of the remote path)."""
    if isinstance(loaded.model, NnsightModel):
        return loaded
    if loaded.model.config._attn_implementation in (ATTN_IMPLEMENTATION, None):
        raise InputError("the nnsight backend needs the model on its own attention implementation (sdpa or eager)")
    return replace(loaded, model=NnsightModel(loaded, remote, chunk_rows, keep_output))
