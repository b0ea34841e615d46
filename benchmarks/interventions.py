"""Intervention benchmark: what an edit costs against the plain model, on smollm2-135m.

Cases, each timed as a forward over one prompt (batch 1, T tokens) and as a greedy generation of
``--new-tokens`` tokens with the KV cache, in one process, alternating cases within each repeat so that
drifts in machine load hit every case alike:

- ``sdpa``: the model as loaded (transformers' sdpa attention), no edit. The baseline of every ratio.
- ``stats``: headlab's statistics path alone (``AttentionProbe`` on every layer, no edit): the reference
  for attention-site edits, which run in the same attention function.
- ``head-scale``: ``HeadScale`` (z site, a pre-hook on o_proj) on every head of the last 14 layers
  (VHR's setting), alpha 2.
- ``override-4``: ``AttentionOverride`` (attention site, post-softmax: group partial outputs and masses)
  on every head of 4 middle layers, the last row put onto positions 1..4.
- ``override-all``: the same on every layer (the worst case). The kernel computes the partial output of the
  overridden keys' group only, from those 4 key columns (``StatsRequest.output_groups``): the rest group has
  weight 0 in every edited row.
- ``knockout-all``: ``KeyKnockout`` of positions 1..4 for the last row, every head of every layer: only the
  rest group's partial output is computed.

Time = **process CPU time** (``time.process_time``: this process only, far less sensitive to other work on a
shared machine than wall time), minimum over ``--repeats``, one torch thread by default; the JSON keeps
every repeat and the load average. Usage (repository root)::

    python benchmarks/interventions.py                       # T = 256, 64 new tokens, 5 repeats
    python benchmarks/interventions.py --tokens 512 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from pathlib import Path

import torch

import headlab
from headlab.interventions import AttentionOverride, HeadScale, KeyKnockout
from headlab.probes import AttentionProbe
from headlab.prompts import bundled_prompts

RESULTS = Path(__file__).resolve().parent / "results"


def cases(loaded) -> dict[str, Callable[[], object]]:
    """Each case: a function returning the context manager to run under (a fresh one per call)."""
    n_layers = loaded.arch.n_layers
    last14 = [(layer, None) for layer in range(n_layers - 14, n_layers)]
    middle4 = [(layer, None) for layer in range(n_layers // 2 - 2, n_layers // 2 + 2)]
    every = [(layer, None) for layer in range(n_layers)]
    return {
        "sdpa": nullcontext,
        "stats": lambda: AttentionProbe(loaded, on_stats=lambda layer, stats: None),
        "head-scale": lambda: headlab.intervene(loaded, HeadScale(heads=last14, alpha=2.0)),
        "override-4": lambda: headlab.intervene(loaded, AttentionOverride(heads=middle4, keys=(1, 5), rows="last")),
        "override-all": lambda: headlab.intervene(loaded, AttentionOverride(heads=every, keys=(1, 5), rows="last")),
        "knockout-all": lambda: headlab.intervene(loaded, KeyKnockout(heads=every, keys=(1, 5), rows="last")),
    }


def prompt_ids(loaded, n_tokens: int) -> torch.Tensor:
    text = " ".join(bundled_prompts()) * 8
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids[:, :n_tokens]
    if ids.shape[1] < n_tokens:
        raise SystemExit(f"the bundled prompts give only {ids.shape[1]} tokens; ask for fewer")
    return ids


def timed(fn: Callable[[], object]) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def run(args) -> dict:
    torch.manual_seed(0)
    loaded = headlab.load("smollm2-135m", dtype="float32", device="cpu")
    ids = prompt_ids(loaded, args.tokens)
    model = loaded.model
    table = cases(loaded)

    def forward(make):
        with torch.no_grad(), ExitStack() as stack:
            stack.enter_context(make())
            model(input_ids=ids)

    def generate(make):
        with torch.no_grad(), ExitStack() as stack:
            stack.enter_context(make())
            model.generate(ids[:, : args.gen_prompt], max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                           do_sample=False, pad_token_id=loaded.tokenizer.eos_token_id)

    for make in table.values():  # warm-up: allocator, registration of headlab's attention function
        forward(make)
    times: dict[str, dict[str, list[float]]] = {name: {"forward": [], "generate": []} for name in table}
    for repeat in range(args.repeats):
        for name, make in table.items():
            times[name]["forward"].append(timed(lambda make=make: forward(make)))
            times[name]["generate"].append(timed(lambda make=make: generate(make)))
        print(f"repeat {repeat + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    rows = []
    for name in table:
        for kind in ("forward", "generate"):
            best = min(times[name][kind])
            base = min(times["sdpa"][kind])
            rows.append({"case": name, "kind": kind, "time_s": best, "ratio_to_sdpa": best / base,
                         "all_times_s": times[name][kind]})
    return {"model": "smollm2-135m", "device": f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
            "dtype": "float32", "tokens": args.tokens, "gen_prompt_tokens": args.gen_prompt,
            "new_tokens": args.new_tokens, "repeats": args.repeats, "torch": torch.__version__,
            "time": "process CPU time, minimum over the repeats", "loadavg_end": os.getloadavg(),
            "command": " ".join(sys.argv), "rows": rows}


def markdown(result: dict) -> str:
    lines = [f"{result['model']}, {result['device']}, {result['dtype']}; forward: batch 1, T = {result['tokens']}; "
             f"generate: {result['gen_prompt_tokens']}-token prompt + {result['new_tokens']} new tokens; "
             f"process CPU time, minimum of {result['repeats']}", "",
             "| case | forward s | forward / sdpa | generate s | generate / sdpa |", "|---|---:|---:|---:|---:|"]
    by = {(r["case"], r["kind"]): r for r in result["rows"]}
    for name in dict.fromkeys(r["case"] for r in result["rows"]):
        f, g = by[(name, "forward")], by[(name, "generate")]
        lines.append(f"| {name} | {f['time_s']:.3f} | {f['ratio_to_sdpa']:.2f} | {g['time_s']:.3f} | "
                     f"{g['ratio_to_sdpa']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--gen-prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "interventions_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = run(args)
    print(markdown(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
