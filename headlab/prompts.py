"""Prompt files: one prompt per line, blank lines and '#' comments skipped, a literal \\n is a newline.

``--prompts`` takes a file (a pipe, ``/dev/fd/N`` or ``<(…)`` too), ``-`` for stdin or ``bundled``;
a real file of that name always wins over the keyword. NUL bytes are removed (they are never text);
a line that holds nothing else is an error, not a silent empty prompt.
"""

from __future__ import annotations

import hashlib
import sys
from importlib import resources
from pathlib import Path

from headlab.errors import PromptError

BUNDLED = "bundled"
STDIN = "-"
FILE = "file"


def bundled_prompts() -> list[str]:
    text = resources.files("headlab").joinpath("data/prompts.txt").read_text(encoding="utf-8")
    return parse_prompts(text)


def parse_prompts(text: str, where: str = "the prompts") -> list[str]:
    prompts = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        cleaned = line.replace("\0", "").strip()
        if not cleaned:
            raise PromptError(f"line {number} of {where} holds only NUL bytes, so it is an empty prompt: "
                              "remove the line (or save the file as UTF-8 text)")
        prompts.append(cleaned.replace("\\n", "\n"))
    return prompts


def resolve_source(source: str | Path) -> tuple[str, str]:
    """(kind, value): ``(FILE, path)``, ``(STDIN, "-")`` or ``(BUNDLED, "bundled")``. A file wins over a keyword."""
    text = str(source)
    path = Path(text).expanduser()
    if text in (BUNDLED, STDIN) and not path.exists():
        return text, text
    return FILE, text


def read_prompts(source: str | Path | None) -> list[str]:
    """Prompts from a file (or pipe), from stdin (``-``), or the bundled set (``None`` / ``bundled``)."""
    if source is None:
        return bundled_prompts()
    kind, value = resolve_source(source)
    if kind == BUNDLED:
        return bundled_prompts()
    if kind == STDIN:
        text = sys.stdin.read()
        where = "standard input"
    else:
        path = Path(value).expanduser()
        if path.is_dir():
            raise PromptError(f"prompt file {path} is a folder: pass a text file with one prompt per line")
        if not path.exists():
            raise PromptError(f"prompt file {path} is missing: pass a text file with one prompt per line")
        try:
            # Not path.is_file(): a pipe, /dev/fd/N or a process substitution is read like a file.
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except UnicodeDecodeError as err:
            raise PromptError(
                f"prompt file {path} is not UTF-8 text (byte {err.start}): save it as UTF-8 and try again"
            ) from err
        except OSError as err:
            raise PromptError(f"cannot read prompt file {path} ({err.strerror or err}): check its permissions") \
                from err
        where = str(path)
    prompts = parse_prompts(text, where)
    if not prompts:
        raise PromptError(f"no prompts in {where}: it is empty or only comments; put one prompt per line")
    return prompts


def as_prompt_list(prompts: object) -> list[str]:
    """``prompts`` as a list of strings; a bare ``str`` (which would be read as one prompt per character),
    an empty list or a non-string item is refused with what to pass instead."""
    if isinstance(prompts, (str, bytes)):
        raise PromptError("prompts must be a list of strings, got a single string (it would be read one character "
                          "per prompt): pass [text]")
    try:
        items = list(prompts)  # type: ignore[call-overload]
    except TypeError:
        raise PromptError(f"prompts must be a list of strings, got {type(prompts).__name__}") from None
    if not items:
        raise PromptError("no prompts to analyse: pass a non-empty list of strings")
    bad = next((i for i, p in enumerate(items) if not isinstance(p, str)), None)
    if bad is not None:
        raise PromptError(f"prompt {bad} is a {type(items[bad]).__name__}, not a string: pass a list of strings")
    empty = next((i for i, p in enumerate(items) if not p.replace("\0", "").strip()), None)
    if empty is not None:
        raise PromptError(f"prompt {empty} is empty (or only whitespace/NUL bytes): remove it")
    return items


def hash_inputs(prompts: list[str]) -> str:
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(prompt.encode("utf-8") + b"\0")
    return digest.hexdigest()[:16]
