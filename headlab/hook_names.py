"""The names of the points a model is read and edited at, TransformerLens-style (``blocks.{l}.attn.hook_z``).

Reading (``headlab.trace``) takes every name below; editing (``headlab.interventions.Hook``) takes the ones
where a value can be replaced: the residual stream before and after a layer, the MLP's output and z.
"""

from __future__ import annotations

import re

from headlab.errors import InputError

BLOCK_HOOKS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out")
ATTN_HOOKS = ("hook_z", "hook_q", "hook_k", "hook_v", "hook_pattern")
VALID_PATTERNS = [f"blocks.{{l}}.{h}" for h in BLOCK_HOOKS] + [f"blocks.{{l}}.attn.{h}" for h in ATTN_HOOKS]
_NAME = re.compile(r"^blocks\.(\d+)\.(?:(attn)\.)?(hook_\w+)$")


def all_names(n_layers: int) -> list[str]:
    return [pattern.replace("{l}", str(layer)) for layer in range(n_layers) for pattern in VALID_PATTERNS]


def match_name(name: object) -> tuple[int, str] | None:
    """``"blocks.3.attn.hook_z"`` -> (3, "hook_z"), or None when ``name`` follows none of the patterns."""
    match = _NAME.match(name) if isinstance(name, str) else None
    hook = match.group(3) if match else None
    if match is None or hook not in (ATTN_HOOKS if match.group(2) else BLOCK_HOOKS):
        return None
    return int(match.group(1)), hook


def parse_name(name: str, n_layers: int) -> tuple[int, str]:
    """``match_name`` checked against a model of ``n_layers``; ``InputError`` listing the valid patterns."""
    matched = match_name(name)
    if matched is None:
        raise InputError(f"unknown hook name {name!r}; valid names: {', '.join(VALID_PATTERNS)} "
                         f"(l = 0..{n_layers - 1})")
    layer, hook = matched
    if layer >= n_layers:
        raise InputError(f"hook name {name!r}: layer {layer} does not exist; this model has layers 0..{n_layers - 1}")
    return layer, hook
