"""Circuit benchmark: attribution patching and exact path patching over every head of smollm2-135m.

On ``--n`` IOI prompts (batch ``--batch-size``), timed once each (these are minutes-long loops, not
micro-benchmarks):

- ``forward``: one plain forward pass over the N prompts (median of 3): the unit of the ratios;
- ``attribution``: attribution patching of every head (clean + cf runs, one forward + backward);
- ``path``: exact path patching of every head to the logits, one-token steps over the clean prefix's
  KV cache (the default), ``--senders-per-pass`` senders per pass;
- ``path-full`` (unless ``--skip-full``): the same with full forwards, timed on the first
  ``--full-heads`` heads (9) and scaled to every head.

Each path time is also given as a ratio to N·(heads + 1) plain forwards (``forward`` × (heads + 1)),
the cost of the naive loop of one patched forward per sender plus the clean run. Every case is timed as
wall time (``*_s``) and as this process's CPU time (``*_cpu_s``, ``time.process_time``): on a shared
machine the CPU time is the number to compare.

Usage (repository root)::

    python benchmarks/circuits.py                  # N = 64, 1 thread
    python benchmarks/circuits.py --n 32 --threads 2 --skip-full
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import headlab
from headlab.analyses.circuit_tasks import make_task, tokenize_task
from headlab.analyses.path_patching import all_heads, attribution_patching, final_logits, path_patching


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--senders-per-pass", type=int, default=27)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--full-heads", type=int, default=9)
    parser.add_argument("--skip-full", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "circuits_cpu.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = headlab.load(args.model)
    batch = tokenize_task(loaded, make_task("ioi", args.n, tokenizer=loaded.text_tokenizer))
    heads = all_heads(loaded.arch)

    def forward_all() -> None:
        with torch.no_grad():
            for part in batch.chunks(args.batch_size):
                final_logits(loaded, part.clean_ids, part.attention_mask)

    forward_all()  # warm-up
    forwards = [_timed(forward_all) for _ in range(3)]
    forward = tuple(statistics.median(t[i] for t in forwards) for i in range(2))
    attribution = _timed(lambda: attribution_patching(loaded, batch, args.batch_size))
    path = _timed(lambda: path_patching(loaded, batch, heads, batch_size=args.batch_size,
                                        senders_per_pass=args.senders_per_pass))
    result = {"model": args.model, "n": args.n, "heads": len(heads), "tokens": int(batch.clean_ids.shape[1]),
              "threads": args.threads, "batch_size": args.batch_size, "senders_per_pass": args.senders_per_pass}
    for i, unit in enumerate(("s", "cpu_s")):
        naive = forward[i] * (len(heads) + 1)
        result |= {f"forward_{unit}": forward[i], f"attribution_{unit}": attribution[i], f"path_{unit}": path[i],
                   f"path_over_naive_forwards_{unit}": path[i] / naive,
                   f"attribution_over_forward_{unit}": attribution[i] / forward[i]}
    if not args.skip_full:
        subset = heads[:args.full_heads]
        full = _timed(lambda: path_patching(loaded, batch, subset, batch_size=args.batch_size,
                                            senders_per_pass=args.senders_per_pass, use_cache=False))
        for i, unit in enumerate(("s", "cpu_s")):
            scaled = full[i] * len(heads) / len(subset)
            result[f"path_full_{unit}_scaled"] = scaled
            result[f"path_full_over_naive_forwards_{unit}"] = scaled / (forward[i] * (len(heads) + 1))
    result["machine"] = {"python": sys.version.split()[0], "torch": torch.__version__, "cpu": platform.processor()
                         or platform.machine()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    return result


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of ``fn()``."""
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start, time.process_time() - cpu


if __name__ == "__main__":
    main()
