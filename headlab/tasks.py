"""Small bundled task sets with a right and a wrong next token: prompts a real LM can be scored on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from headlab.bundled import DATA_DIR


@dataclass(frozen=True)
class TaskExample:
    """A prompt and two single-token continuations: the right one and the one a wrong mechanism picks."""

    prompt: str
    correct: str
    wrong: str


def read_task(path: Path) -> list[TaskExample]:
    """Tab-separated ``prompt<TAB>correct<TAB>wrong`` lines; blank lines and ``#`` comments skipped."""
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise ValueError(f"{path.name} line {number}: expected prompt, correct and wrong separated by tabs")
        examples.append(TaskExample(*parts))
    return examples


def ioi_prompts() -> list[TaskExample]:
    """24 indirect-object prompts (12 name pairs, both orders): correct = the indirect object."""
    return read_task(DATA_DIR / "ioi.tsv")
