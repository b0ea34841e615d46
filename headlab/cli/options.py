"""Options that many commands share besides the model's (those are in ``model_args``): one definition each,
so that their flags and help read the same everywhere."""

from __future__ import annotations

import typer

PROMPTS = typer.Option(None, help="prompt file (one per line) or - for stdin; default: the model's bundled set")
N_PROMPTS = typer.Option(None, help="use only the first N prompts")
BATCH_SIZE = typer.Option(8, help="prompts per forward pass")
RUNS_FOLDER = typer.Option(None, help="runs folder (default: $HEADLAB_RUNS or ./runs)")
QUIET = typer.Option(False, help="no progress bar")


def run_name(analysis: str) -> typer.models.OptionInfo:
    return typer.Option(None, help=f"run name (default: {analysis}-<model>-<time>)")
