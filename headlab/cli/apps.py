"""The command groups: ``analyze`` (analyses that write runs) and ``headlab`` (everything else), with their
sub-groups. Commands are attached in ``headlab.cli`` (one table), not here."""

from __future__ import annotations

import signal

import typer


def _terminate(signum: int, frame) -> None:
    # SIGTERM (kill, a job scheduler, a closing terminal) unwinds like Ctrl+C: a run being written is removed
    # (runs.write_run cleans up on any exception) and a child process is stopped.
    raise SystemExit(128 + signum)


def _on_sigterm() -> None:
    signal.signal(signal.SIGTERM, _terminate)


def _group(help: str) -> typer.Typer:
    return typer.Typer(help=help, no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


analyze_app = _group("Run a headlab analysis and save it as a run directory.")
headlab_app = _group("headlab: a workbench for attention heads.")
runs_app = _group("Manage the runs folder.")
zoo_app = _group("headlab's own models: train the bundled checkpoints.")
lofit_app = _group("LoFiT: select heads, train head offsets, apply, export and evaluate them.")
headlab_app.add_typer(runs_app, name="runs")
headlab_app.add_typer(zoo_app, name="zoo")
headlab_app.add_typer(lofit_app, name="lofit")


@analyze_app.callback()
def _analyze_group(ctx: typer.Context) -> None:
    """Run a headlab analysis and save it as a run directory."""
    _on_sigterm()
    # Which program a command ran under, for a merge that runs it again (cli.scaling.command_argv).
    ctx.ensure_object(dict)["program"] = "analyze"


@headlab_app.callback()
def _headlab_group() -> None:
    """headlab: a workbench for attention heads."""
    _on_sigterm()
