"""The torch backend's row pass alone: compiled (``kernels/fused_rows.c``) against the torch ops, on one CPU
thread, process CPU time.

One chunk of smollm2-135m's shape (9 heads, 32 query rows) against W keys: base-2 scores already shifted by
a reference (first key far above the rest, as in a causal LM with a sink), all rows counted. Each timed
call first copies the scores into the chunk's buffer (the torch ops centre them in place), so both cases
include that copy; ``copy`` is the copy alone. Minimum over rounds (interleaved, as in speedpath.py) of the
mean of ``--calls`` calls.

Usage (repository root)::

    python benchmarks/row_pass.py            # W = 1024, 4096, 8192
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from speedpath import interleaved, save  # benchmarks/ is on sys.path when this script runs

RESULTS = Path(__file__).resolve().parent / "results"


def chunk_body(width: int):
    """A ``_ChunkBody`` of one call (9 heads, 3 kv heads, 32 + width rows) and a reference-shifted score tile."""
    from headlab.kernels import MaskSpec, fused_rows
    from headlab.kernels.torch_backend import _ChunkBody

    gen = torch.Generator().manual_seed(0)
    n = width
    q = torch.randn(1, 9, n, 64, generator=gen)
    k, v = (torch.randn(1, 3, n, 64, generator=gen) for _ in range(2))
    fused, why = fused_rows.build()
    if fused is None:
        raise SystemExit(f"error: {why}")
    body = _ChunkBody(q, k, v, MaskSpec(causal=False), 0.125, None, None, None, 32, fused, 1)
    scores = torch.randn(1, 9, 32, width, generator=gen) * 2 - 3
    scores[..., 0] = 0.0  # the reference key
    return body, scores


def repeated(fn, calls: int):
    """One timed unit: ``calls`` calls of ``fn`` (a single call is too short for process CPU time)."""
    def run():
        for _ in range(calls):
            fn()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "row_pass_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for width in args.widths:
        body, scores = chunk_body(width)
        buffer = body.work[0][: scores.numel()].view_as(scores)
        e = body.work[1][: scores.numel()].view_as(scores)

        def copy(buffer=buffer, scores=scores):
            buffer.copy_(scores)

        def compiled(body=body, buffer=buffer, scores=scores, e=e):
            buffer.copy_(scores)
            body.fused.run(buffer, e, body.row_max, body.row_sum, body.row_dot, body.dot_center, 0,
                           body.column_weight, None, body.key_mass, 0, True, 1)

        def torch_ops(body=body, buffer=buffer, scores=scores, width=width):
            buffer.copy_(scores)
            body.row_pass(buffer, 0, 32, 0, width)

        cases = {"copy": copy, "compiled": compiled, "torch-ops": torch_ops}
        times = interleaved({name: repeated(fn, args.calls) for name, fn in cases.items()}, args.rounds)
        best = {name: min(values) / args.calls for name, values in times.items()}
        row = {"width": width, **{f"{name}_ms": 1e3 * t for name, t in best.items()},
               "torch_ops_over_compiled": (best["torch-ops"] - best["copy"]) / (best["compiled"] - best["copy"])}
        rows.append(row)
        print(json.dumps(row), flush=True)
    lines = ["| keys | copy ms | compiled ms | torch ops ms | torch ops / compiled (copy taken out) |",
             "|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['width']} | {r['copy_ms']:.3f} | {r['compiled_ms']:.3f} | {r['torch-ops_ms']:.3f} | "
                     f"{r['torch_ops_over_compiled']:.2f} |")
    result = {"shape": "9 heads x 32 rows x keys, fp32, one thread", "command": " ".join(sys.argv),
              "measure": "process CPU time, min over rounds of the mean of calls", "torch": torch.__version__,
              "rows": rows, "markdown": "\n".join(lines)}
    save(result, args.out)


if __name__ == "__main__":
    main()
