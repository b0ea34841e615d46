"""Prompt files: one prompt per line, blank lines and '#' comments skipped, a literal \\n is a newline."""

from __future__ import annotations

import hashlib
import sys
from importlib import resources
from pathlib import Path

from .errors import PromptError

BUNDLED = "bundled"


def bundled_prompts() -> list[str]:
    text = resources.files("headlab").joinpath("data/prompts.txt").read_text(encoding="utf-8")
    return parse_prompts(text)


def parse_prompts(text: str) -> list[str]:
    lines = (line.strip() for line in text.splitlines())
    return [line.replace("\\n", "\n") for line in lines if line and not line.startswith("#")]


def read_prompts(source: str | Path | None) -> list[str]:
    """Prompts from a file, from stdin (``-``), or the bundled set (``None``)."""
    if source is None or str(source) == BUNDLED:
        return bundled_prompts()
    if str(source) == "-":
        text = sys.stdin.read()
        where = "standard input"
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            what = "a folder" if path.is_dir() else "missing"
            raise PromptError(f"prompt file {path} is {what}: pass a text file with one prompt per line")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise PromptError(
                f"prompt file {path} is not UTF-8 text (byte {err.start}): save it as UTF-8 and try again"
            ) from err
        where = str(path)
    prompts = parse_prompts(text)
    if not prompts:
        raise PromptError(f"no prompts in {where}: it is empty or only comments; put one prompt per line")
    return prompts


def hash_inputs(prompts: list[str]) -> str:
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(prompt.encode("utf-8") + b"\0")
    return digest.hexdigest()[:16]
