"""``headlab fix``: one image and one prompt, generated with each hallucination fix, side by side in one run."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from headlab.lvlm import LvlmSample
from headlab.prompts import hash_inputs
from headlab.result import Result

from .lvlm_fixes import FixMethod, decode, generate_fixed


def compare_fixes(loaded, picture, image: Path, prompt: str, methods: dict[str, FixMethod], max_new_tokens: int,
                  options: dict[str, dict]) -> Result:
    """The greedy answer under each of ``methods`` (name -> fix, ``none`` for the plain model), with its time."""
    rows = []
    for name, method in methods.items():
        started = time.perf_counter()
        tokens = generate_fixed(loaded, [LvlmSample(prompt, [picture])], [method], max_new_tokens=max_new_tokens)
        rows.append({"method": name, "generation": decode(loaded, tokens)[0],
                     "seconds": round(time.perf_counter() - started, 2)})
    table = pd.DataFrame(rows, columns=["method", "generation", "seconds"])
    report = [f"# Fixes on {loaded.title}", "", f"- image: {image.name}; prompt: {prompt!r}; {max_new_tokens} greedy "
              "tokens", ""] + [f"- {row['method']}: {row['generation']!r}" for row in rows]
    return Result("fix", loaded.name, {"image": str(image), "prompt": prompt, "methods": list(methods),
                                       "options": options, "max_new_tokens": max_new_tokens},
                  tables={"generations": table}, summary={"methods": len(rows)}, report="\n".join(report),
                  revision=loaded.revision, input_hash=hash_inputs([prompt, image.name]))
