"""What the command line prints: results on stdout, one ``warning:`` or ``error:`` line on stderr.

Bad input and out of memory become one ``error:`` line and exit code 2, never a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console

from headlab.errors import HeadlabError

console = Console()
err_console = Console(stderr=True)


def say(text: str) -> None:
    """One line of output, as written (no markup guessing, no wrapping)."""
    console.print(text, highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    err_console.print(f"[bold yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


def note(message: str) -> None:
    """Something the user should know that is not a problem (a prompt cut to --max-tokens), on stderr."""
    err_console.print(f"note: {message}", highlight=False, soft_wrap=True)


def fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


@contextmanager
def reported_errors(model: str, out_of_memory_advice: str) -> Iterator[None]:
    """``HeadlabError`` and out of memory inside become one ``error:`` line and exit code 2.

    torch is not imported here: the checks that come first must answer before it loads (an out-of-memory
    error can only come from torch, so it is looked up among the modules already imported)."""
    try:
        yield
    except HeadlabError as err:
        fail(str(err))
    except Exception as err:
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(err, torch.OutOfMemoryError):
            fail(f"out of memory running {model}: {out_of_memory_advice}")
        raise


def print_written(path: Path, threads: int, seconds: float) -> None:
    say(f"run written to {path} ({threads} CPU thread{'s' if threads != 1 else ''}, --threads sets it; "
        f"{seconds:.0f} s)")
