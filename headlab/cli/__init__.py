"""The command line, the roof of the house: ``analyze <analysis> …`` runs analyses, ``headlab …`` manages
everything else. Every command is attached here, in one table.

torch and transformers are imported inside the commands that need them, so ``--help`` and ``headlab models``
answer at once. Every bad input is checked before the model loads where it can be and reported as one
``error:`` line with exit code 2.
"""

from __future__ import annotations

from headlab.cli import analyze, lofit_commands, lvlm, manage
from headlab.cli.apps import analyze_app, headlab_app, lofit_app, runs_app, zoo_app
from headlab.cli.generic import generic_command

# (group, command name, function): the commands of ``analyze`` that have hand-written options, by the
# analysis registry's command names; a registered analysis without one gets ``generic_command``.
HAND_WRITTEN = {
    "sinks": analyze.sinks,
    "position-bias": analyze.position_bias,
    "circuits": analyze.circuits,
    "vhd": lvlm.vhd,
    "hallucination": lvlm.hallucination,
}
COMMANDS = [
    (headlab_app, "fix", lvlm.fix),
    (headlab_app, "models", manage.models),
    (headlab_app, "dashboard", manage.dashboard),
    (runs_app, "clean", manage.runs_clean),
    (runs_app, "merge", manage.runs_merge),
    (zoo_app, "train", manage.zoo_train),
    (lofit_app, "select", lofit_commands.select),
    (lofit_app, "train", lofit_commands.train),
    (lofit_app, "apply", lofit_commands.apply),
    (lofit_app, "export", lofit_commands.export),
    (lofit_app, "eval", lofit_commands.evaluate),
]


def _attach() -> None:
    from headlab.analyses.registry import ANALYSES

    for analysis in ANALYSES.values():
        if analysis.command is not None:
            command = HAND_WRITTEN.get(analysis.command) or generic_command(analysis)
            analyze_app.command(analysis.command)(command)
    for group, name, function in COMMANDS:
        group.command(name)(function)


_attach()

__all__ = ["analyze_app", "headlab_app"]
