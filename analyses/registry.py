"""The analysis registry: every analysis headlab runs, by the name its runs carry, in one table.

The CLI and the dashboard read this table and nothing else to find an analysis. An entry names where things
live as ``"module:attribute"`` strings, imported on use, so that ``analyze --help`` and the dashboard's run
list do not import torch:

- ``run``: ``run(loaded, inputs, config, progress=…) -> Result``; ``inputs`` are what ``takes`` says: prompts
  (a list of strings, the model's bundled set by default), or ``None``;
- ``config``: the configuration dataclass; its fields with simple types (int, float, str, bool) are the
  options of the generic command ``analyze <command>`` for an analysis without a hand-written one;
- ``view``: the dashboard module whose ``@register_view`` draws the runs (runs without one get the generic view).

A new analysis is one module with a config dataclass and a run function, registered here with
``register_analysis`` (+ a view module, optionally): ``analyze <name>`` and the dashboard pick it up.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from headlab.errors import HeadlabError


@dataclass(frozen=True)
class Analysis:
    """One analysis: ``name`` as in run manifests, ``command`` under ``analyze`` (None: no command of its own)."""

    name: str
    title: str
    run: str
    config: str | None = None
    view: str | None = None
    command: str | None = None
    takes: str = "prompts"  # "prompts" or "none"

    def load(self, attribute: str) -> Any:
        """Import and return ``run``, ``config`` or ``view`` (a module for the view)."""
        target = getattr(self, attribute)
        if target is None:
            raise HeadlabError(f"analysis {self.name!r} has no {attribute}")
        module, _, name = target.partition(":")
        imported = importlib.import_module(module)
        return getattr(imported, name) if name else imported


ANALYSES: dict[str, Analysis] = {}


def register_analysis(analysis: Analysis) -> Analysis:
    """Add ``analysis`` to the table (a second entry with the same name or command is refused)."""
    clash = ANALYSES.get(analysis.name)
    if clash is not None and clash != analysis:
        raise HeadlabError(f"analysis {analysis.name!r} is registered already ({clash.run})")
    if analysis.command is not None:
        taken = [a.name for a in ANALYSES.values() if a.command == analysis.command and a.name != analysis.name]
        if taken:
            raise HeadlabError(f"command {analysis.command!r} belongs to analysis {taken[0]!r} already")
    ANALYSES[analysis.name] = analysis
    return analysis


_A = "headlab.analyses."
_V = "headlab.dashboard.views."
for _entry in (
    Analysis("sinks", "Attention sinks", _A + "sinks:analyze_sinks", _A + "sinks:SinksConfig", _V + "sinks",
             command="sinks"),
    Analysis("position_bias", "Position bias", _A + "position_bias:analyze_position_bias",
             _A + "position_bias:PositionBiasConfig", _V + "position_bias", command="position-bias"),
    Analysis("circuits", "Circuits", _A + "circuits:analyze_circuits", _A + "circuits:CircuitsConfig",
             _V + "circuits", command="circuits", takes="none"),
    Analysis("vhd", "Vision-aware head divergence", _A + "vhd:analyze_vhd", _A + "vhd:VhdConfig", command="vhd",
             takes="images"),
    Analysis("hallucination", "Hallucination fixes", _A + "hallucination_eval:analyze_hallucination",
             _A + "hallucination_eval:HallucinationConfig", _V + "hallucination", command="hallucination",
             takes="images"),
    Analysis("lofit-select", "LoFiT head selection", _A + "lofit:select_heads", _A + "lofit:LofitConfig",
             _V + "lofit", takes="items"),
    Analysis("lofit-train", "LoFiT head offsets", _A + "lofit:train_offsets", _A + "lofit:LofitConfig",
             _V + "lofit", takes="items"),
    Analysis("lofit-eval", "LoFiT evaluation", _A + "lofit_eval:accuracy_result", view=_V + "lofit", takes="items"),
    Analysis("lofit-apply", "LoFiT completions", _A + "lofit_runs:apply_result", takes="prompts"),
    Analysis("lofit-export", "LoFiT export", _A + "lofit_runs:export_result", takes="none"),
    Analysis("fix", "Fixes side by side", _A + "fix_compare:compare_fixes", takes="images"),
):
    register_analysis(_entry)
