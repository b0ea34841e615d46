"""What a pre-softmax score edit adds to one attention call with statistics, on CPU.

One causal attention call at smollm2-135m's shape (9 query heads, 3 kv heads, head_dim 64, fp32, batch 1,
random q/k/v from a fixed seed), T = ``--lengths``:

- ``sdpa``: ``scaled_dot_product_attention(is_causal=True, enable_gqa=True)``, the baseline.
- ``stats``: ``torch_attention_with_stats``, all default statistics.
- ``stats+edit``: the same with a PAI-style ``ScoreEdit`` (``s' = s + 0.5·|s|``) on the keys of a 576-token
  image span starting at key 35 (LLaVA-1.5's 24 x 24 patches), every query row.

Process CPU time, one thread, cases interleaved round by round, minimum of ``--rounds`` after one warm-up call
each. Writes ``benchmarks/results/edit_cost_cpu.json``.

Usage (repository root)::

    python benchmarks/edit_cost.py
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch
from speedpath import interleaved, save  # benchmarks/ is on sys.path when this script runs

RESULTS = Path(__file__).resolve().parent / "results"
IMAGE_START, IMAGE_KEYS = 35, 576


def cases(n: int) -> dict:
    from headlab.kernels import MaskSpec, ScoreEdit, torch_attention_with_stats

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 9, n, 64, generator=gen)
    k, v = (torch.randn(1, 3, n, 64, generator=gen) for _ in range(2))
    keys = torch.arange(n)[None]
    labels = torch.where((keys >= IMAGE_START) & (keys < IMAGE_START + IMAGE_KEYS), 0, -1)
    edit = ScoreEdit(labels, torch.ones(9, 1), torch.full((9, 1), 0.5))
    mask = MaskSpec(causal=True)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    return {"sdpa": lambda: sdpa(q, k, v, is_causal=True, enable_gqa=True),
            "stats": lambda: torch_attention_with_stats(q, k, v, mask, 0.125),
            "stats+edit": lambda: torch_attention_with_stats(q, k, v, mask, 0.125, score_edit=edit)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "edit_cost_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for n in args.lengths:
        times = interleaved(cases(n), args.rounds)
        base = min(times["sdpa"])
        for name, values in times.items():
            rows.append({"T": n, "case": name, "cpu_ms": 1e3 * min(values), "ratio_to_sdpa": min(values) / base,
                         "rounds_s": values})
    lines = ["| T | case | ms | / sdpa |", "|---:|---|---:|---:|"]
    lines += [f"| {r['T']} | {r['case']} | {r['cpu_ms']:.1f} | {r['ratio_to_sdpa']:.2f} |" for r in rows]
    table = "\n".join(lines)
    result = {"shape": "9 heads / 3 kv heads / head_dim 64, fp32, batch 1, causal",
              "edit": f"s + 0.5|s| on keys {IMAGE_START}..{IMAGE_START + IMAGE_KEYS - 1}, every row",
              "measure": "process CPU time, one thread, minimum over interleaved rounds",
              "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              "rows": rows, "markdown": table}
    save(result, args.out)


if __name__ == "__main__":
    main()
