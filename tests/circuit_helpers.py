"""Shared by the circuits tests: a small task tiny-llama's byte-level tokenizer reads, as a JSONL file."""

from __future__ import annotations

from pathlib import Path

from headlab.analyses.circuit_tasks import CircuitExample, CircuitTask, write_jsonl


def byte_task(folder: Path, name: str, where: int) -> Path:
    """Six prompts "xyzw" with the letter at ``where`` replaced (clean) or replaced by another (counterfactual);
    the answer is the replacing letter."""
    letters = "abcdefgh"
    examples = []
    for i in range(6):
        a, b = letters[i], letters[(i + 3) % 8]
        clean, cf = list("xyzw"), list("xyzw")
        clean[where], cf[where] = a, b
        examples.append(CircuitExample("".join(clean), a, "".join(cf), b))
    path = Path(folder) / f"{name}.jsonl"
    write_jsonl(CircuitTask(name, examples), path)
    return path
