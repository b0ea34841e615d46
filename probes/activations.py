"""Reading activations by name, TransformerLens-style: ``with headlab.trace(loaded, names=[...]) as t``.

Names (``l`` a layer):
- ``blocks.{l}.hook_resid_pre`` / ``hook_resid_mid`` / ``hook_resid_post``: ``[batch, pos, d_model]``
  (resid_mid = resid_pre + attn_out: the residual between attention and MLP of a pre-norm decoder;
  a post-norm encoder such as BERT has no such point);
- ``blocks.{l}.hook_attn_out`` (the output of o_proj) / ``hook_mlp_out``: ``[batch, pos, d_model]``;
- ``blocks.{l}.attn.hook_z``: ``[batch, pos, head, d_head]``, the input of o_proj;
- ``blocks.{l}.attn.hook_q`` ``[batch, pos, head, d_head]``, ``hook_k`` / ``hook_v``
  ``[batch, pos, kv_head, d_head]``: the projections, before any q/k norm or rotary embedding;
- ``blocks.{l}.attn.hook_pattern``: ``[batch, head, query, key]`` full probabilities, only when asked and
  only up to ``max_pattern_tokens`` keys (eager path, with active edits applied).

Only what is asked is kept, detached, from the last forward pass in the block. ``t.stats`` holds the
attention statistics of that pass (``{layer: AttentionStats}``, through ``AttentionProbe``). Reads run
after any edit of ``headlab.intervene`` on the same module, so a trace shows the edited model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch

from headlab.errors import InputError
from headlab.hook_names import ATTN_HOOKS, BLOCK_HOOKS, VALID_PATTERNS, all_names, parse_name  # noqa: F401 (names of trace)
from headlab.kernels.attention_function import PatternReader, headlab_attention
from headlab.kernels.layout import LayoutTracker

from .attention import AttentionProbe

DEFAULT_MAX_PATTERN_TOKENS = 1024


class Trace:
    """The activations kept by ``headlab.trace``: ``t[name]``, ``t.stats``, the pass's padding mask."""

    def __init__(self, names: list[str], model_shape: tuple[int, int, int], model_name: str | None = None):
        self.names = names
        self.model_name = model_name  # a patch source recorded on another model is refused by name
        self.model_shape = model_shape  # (layers, heads, d_head): a patch source from another model is refused
        self.cache: dict[str, torch.Tensor] = {}
        self.stats: dict = {}
        self.attention_mask: torch.Tensor | None = None  # [batch, pos] real tokens of the last pass

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.cache:
            asked = "was asked for but not recorded (no forward pass yet?)" if name in self.names else \
                "was not asked for; pass it in names=[...]"
            raise KeyError(f"{name} {asked}")
        return self.cache[name]

    def __contains__(self, name: str) -> bool:
        return name in self.cache

    def keys(self) -> list[str]:
        return list(self.cache)

    def items(self):
        return self.cache.items()


def _qkv_readers(attn: torch.nn.Module, arch) -> dict[str, tuple[torch.nn.Module, Callable]]:
    """Per projection name, the module whose output holds it and how to cut it into heads."""
    d, n_heads, n_kv = arch.head_dim, arch.n_heads, arch.n_kv_heads

    def heads(n):
        return lambda out: out.view(*out.shape[:-1], n, d)

    for names in (("q_proj", "k_proj", "v_proj"), ("query", "key", "value")):
        if all(hasattr(attn, n) for n in names):
            modules = [getattr(attn, n) for n in names]
            return {"hook_q": (modules[0], heads(n_heads)), "hook_k": (modules[1], heads(n_kv)),
                    "hook_v": (modules[2], heads(n_kv))}
    if hasattr(attn, "c_attn"):  # GPT-2: one fused projection [q | k | v]
        width = n_heads * d

        def part(i):
            return lambda out: out[..., i * width:(i + 1) * width].reshape(*out.shape[:-1], n_heads, d)

        return {f"hook_{x}": (attn.c_attn, part(i)) for i, x in enumerate("qkv")}
    raise InputError(f"hook_q/k/v: no q/k/v projections found on {type(attn).__name__}")


class _Recorder:
    """Installs the read hooks of one trace and removes them."""

    def __init__(self, loaded, trace: Trace, wanted: dict[int, set[str]]):
        self.loaded = loaded
        self.trace = trace
        self.wanted = wanted
        self.handles = []
        self.pending: dict[int, dict[str, torch.Tensor]] = {}

    def keep(self, layer: int, hook: str, value: torch.Tensor) -> None:
        name = f"blocks.{layer}.attn.{hook}" if hook in ATTN_HOOKS else f"blocks.{layer}.{hook}"
        self.trace.cache[name] = value.detach().clone()

    def install(self) -> None:
        arch = self.loaded.arch
        for layer, hooks in self.wanted.items():
            block = arch.layers[layer]
            needs_pre = hooks & {"hook_resid_pre", "hook_resid_mid"}
            needs_attn = hooks & {"hook_attn_out", "hook_resid_mid"}
            if needs_pre:
                self.handles.append(block.register_forward_pre_hook(self._resid_pre(layer), with_kwargs=True))
            if needs_attn:  # o_proj's output: the attention output also where o_proj sits outside it (BERT)
                self.handles.append(arch.o_proj(layer).register_forward_hook(self._attn_out(layer)))
            if "hook_resid_post" in hooks:
                self.handles.append(block.register_forward_hook(self._output(layer, "hook_resid_post")))
            if "hook_mlp_out" in hooks:
                self.handles.append(arch.mlp(layer).register_forward_hook(self._output(layer, "hook_mlp_out")))
            if "hook_z" in hooks:
                self.handles.append(arch.o_proj(layer).register_forward_pre_hook(self._z(layer)))
            wanted_qkv = hooks & {"hook_q", "hook_k", "hook_v"}
            if wanted_qkv:
                readers = _qkv_readers(arch.attention(layer), arch)
                for hook in sorted(wanted_qkv):
                    module, cut = readers[hook]
                    self.handles.append(module.register_forward_hook(self._projection(layer, hook, cut)))

    def remove(self) -> None:
        for handle in reversed(self.handles):
            handle.remove()
        self.handles = []

    def _resid_pre(self, layer):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self.pending.setdefault(layer, {})["resid_pre"] = hidden
            if "hook_resid_pre" in self.wanted[layer]:
                self.keep(layer, "hook_resid_pre", hidden)

        return hook

    def _attn_out(self, layer):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            if "hook_attn_out" in self.wanted[layer]:
                self.keep(layer, "hook_attn_out", out)
            if "hook_resid_mid" in self.wanted[layer]:
                self.keep(layer, "hook_resid_mid", self.pending.get(layer, {}).pop("resid_pre") + out)

        return hook

    def _output(self, layer, name):
        def hook(module, args, output):
            self.keep(layer, name, output[0] if isinstance(output, tuple) else output)

        return hook

    def _z(self, layer):
        arch = self.loaded.arch

        def hook(module, args):
            x = args[0]
            self.keep(layer, "hook_z", x.view(*x.shape[:-1], arch.n_heads, arch.head_dim))

        return hook

    def _projection(self, layer, name, cut):
        def hook(module, args, output):
            self.keep(layer, name, cut(output))

        return hook


def resolve_names(names: Sequence[str] | Callable[[str], bool] | None, n_layers: int) -> list[str]:
    """A list of names (checked) or a filter over every valid name; ``hook_pattern`` only when named."""
    if names is None:
        raise InputError("trace needs names=[...] or a filter function over hook names")
    if callable(names):
        chosen = [name for name in all_names(n_layers) if names(name)]
        if not chosen:
            raise InputError(f"the name filter matched no hook; valid names: {', '.join(VALID_PATTERNS)}")
        return chosen
    if isinstance(names, str):
        names = [names]
    for name in names:
        parse_name(name, n_layers)
    return list(dict.fromkeys(names))


@contextlib.contextmanager
def trace(loaded, names: Sequence[str] | Callable[[str], bool] | None = None, *, stats: bool = True,
          backend: str | None = None, max_pattern_tokens: int = DEFAULT_MAX_PATTERN_TOKENS) -> Iterator[Trace]:
    """Record the named activations (and attention statistics) of the forward passes in the block.

    ``names``: TransformerLens hook names or a filter ``name -> bool``; ``stats``: also keep
    ``AttentionStats`` per layer (``t.stats``); ``max_pattern_tokens``: longest input whose full
    patterns may be kept (above it an ``InputError`` is raised before the model computes).
    """
    arch = loaded.arch
    chosen = resolve_names(names, arch.n_layers)
    wanted: dict[int, set[str]] = {}
    for name in chosen:
        layer, hook = parse_name(name, arch.n_layers)
        wanted.setdefault(layer, set()).add(hook)
    pattern_layers = {layer for layer, hooks in wanted.items() if "hook_pattern" in hooks}
    result = Trace(chosen, (arch.n_layers, arch.n_heads, arch.head_dim), getattr(loaded, "name", None))
    recorder = _Recorder(loaded, result, wanted)
    tracker = LayoutTracker(loaded.model)

    def before_call(call) -> None:
        if call is None:
            return
        result.attention_mask = call.layout.real if call.layout.real is not None else \
            torch.ones(call.batch, call.seen + call.n_query, dtype=torch.bool)
        if pattern_layers and call.seen + call.n_query > max_pattern_tokens:
            raise InputError(f"full attention patterns are kept only up to {max_pattern_tokens} tokens, this input "
                             f"has {call.seen + call.n_query}; ask for statistics instead, or raise max_pattern_tokens")

    def on_pattern(layer: int, probs: torch.Tensor) -> None:
        result.cache[f"blocks.{layer}.attn.hook_pattern"] = probs.detach()

    probe = AttentionProbe(loaded, backend=backend) if stats else None
    with contextlib.ExitStack() as stack:
        tracker.install(before_call)
        stack.callback(tracker.remove)
        recorder.install()
        stack.callback(recorder.remove)
        if probe is not None:
            stack.enter_context(probe)
        if pattern_layers:
            # Patterns need headlab's attention function too; inside the probe's switch this one switches nothing.
            reader = PatternReader(arch, pattern_layers, max_pattern_tokens, on_pattern)
            stack.enter_context(headlab_attention(loaded.model, patterns=reader))
        result.stats = probe.last if probe is not None else {}
        yield result
