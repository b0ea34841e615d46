"""Which decoder architectures headlab runs: the works / refused / broken table over transformers' causal LMs.

Every model type of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` is built as a tiny random model offline and
checked against eager attention (the same check as ``tests/test_architectures.py``, which owns it).
Prints the table; over all types (no arguments) it also writes ``benchmarks/results/architectures.json``.

    python scripts/architectures.py [model_type ...]
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the check lives with the test, which reuses the eager helpers

import torch  # noqa: E402
import transformers  # noqa: E402
from test_architectures import MOST_ASKED, causal_lm_types, check  # noqa: E402

STATUSES = ("works", "refused", "broken", "not buildable")
OUT = ROOT / "benchmarks" / "results" / "architectures.json"


def main(types: list[str], write: bool) -> None:
    start = time.perf_counter()
    outcomes = []
    for model_type in types:
        outcome = check(model_type)
        outcomes.append(outcome)
        print(f"{outcome.status:14s} {model_type:28s} {outcome.detail[:150]}", flush=True)
    counts = Counter(o.status for o in outcomes)
    total = time.perf_counter() - start
    print("\n" + "  ".join(f"{s}: {counts.get(s, 0)}" for s in STATUSES) + f"  ({len(outcomes)} types, {total:.0f} s)")
    result = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "seconds": round(total, 1),
        "counts": {s: counts.get(s, 0) for s in STATUSES},
        "most_asked": {t: next((o.status for o in outcomes if o.model_type == t), None) for t in MOST_ASKED},
        "types": {o.model_type: {"status": o.status, "detail": o.detail, "seconds": round(o.seconds, 2)}
                  for o in outcomes},
    }
    if not write:  # a few chosen types are a look, not the record
        return
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main(sys.argv[1:] or causal_lm_types(), write=not sys.argv[1:])
