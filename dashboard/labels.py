"""How the pages name things for a person: summary keys as tile labels, flags as yes/no, models by their name.

Runs store machine keys (``n_prompts``, ``sink_1_pct``) and models as whatever was loaded (a catalog name, or
an absolute path for a local folder or ``.gguf`` file); the pages show neither as they are."""

from __future__ import annotations

import math
import re

from headlab.figures import model_title

MISSING = "—"  # a value the run does not record (not zero, not "None")

# Summary keys of the analyses -> what a tile says. Keys not listed are read by ``metric_label``'s rules.
METRIC_LABELS = {
    "n_prompts": "prompts", "n_tokens": "tokens", "n_layers": "layers", "n_heads": "heads", "d_head": "head size",
    "eps": "eps (sink threshold)", "sink_1_pct": "Sink₁ (%)", "n_sink_heads": "sink heads",
    "first_massive_layer": "first massive layer", "n_sink_tokens": "sink tokens",
    "n_scanned_tokens": "scanned tokens", "n_secondary": "secondary sinks", "n_primary_like": "primary-like sinks",
    "n_sink_levels": "sink levels", "n_items": "items", "steps": "training steps", "k": "K (heads)",
    "final_task_loss": "final task loss", "first_task_loss": "first task loss",
    "trained_parameters": "trained parameters", "circuit_size": "circuit size", "iou": "IoU",
    "n_shared": "shared heads", "max_tokens": "max tokens", "trend_k_mean": "trend k (mean)",
    "first_vs_middle": "first third / middle", "last_vs_middle": "last third / middle",
    "n_official_secondary": "secondary (cos test only)", "n_both_secondary": "secondary (cos + attention)",
    "official_flag_share": "share flagged by the cos test", "official_saturated": "cos test saturated",
    "dominant_sink_category": "dominant sink",
}


def metric_label(key: str) -> str:
    """``"sink_1_pct"`` -> ``"Sink₁ (%)"``; an unlisted key loses its ``n_`` prefix and underscores
    (``"n_images"`` -> ``"images"``) and ``_pct`` becomes ``(%)``."""
    if key in METRIC_LABELS:
        return METRIC_LABELS[key]
    text, percent = (key[: -len("_pct")], True) if key.endswith("_pct") else (key, False)
    text = re.sub(r"^n_", "", text).replace("_", " ").strip() or key
    return f"{text} (%)" if percent else text


def metric_value(value: object) -> str:
    """A tile's value: yes/no for a bool, 4 significant digits for a float, "—" for nothing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def model_name(model: str) -> str:
    """The model as a person names it: a catalog or hub name as it is, a local folder by its last part, a
    ``.gguf`` file by its stem (``/data/exports/my-lofit/`` -> ``my-lofit``, ``~/q/qwen3-0.6b.Q8_0.gguf`` ->
    ``qwen3-0.6b.Q8_0``)."""
    name = model_title(str(model))
    return name[: -len(".gguf")] if name.lower().endswith(".gguf") and len(name) > len(".gguf") else name
