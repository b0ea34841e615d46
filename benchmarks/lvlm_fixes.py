"""What each LVLM fix costs in generation: tokens per second against plain generation with sdpa.

Cases (greedy, KV cache, a batch of ``--batch`` images, ``--new-tokens`` forced: no early stop):
``none`` (the model as loaded: transformers' sdpa, the baseline of every ratio), ``pai``, ``pai-cfg``
(guidance: the no-image pass by definition), ``pai-adaptive`` / ``vaf-adaptive`` (strength from the previous
step's entropy: one extra prompt forward per batch), ``paint``, ``vaf``, ``var``, ``vhr`` (the no-image pass
by definition), ``vcd`` (the distorted-image pass by definition), each with its defaults. Models: ``llava-real``
(DINOv2-S → smollm2-135m, 256 image tokens), ``llava-smol`` (smollm2-135m behind a 16-token image) and
``tiny-llava`` rebuilt with a 336-pixel, patch-14 vision tower, so an image is LLaVA-1.5's 576 tokens.
VAR on the smollm2 models runs at τ = 15 (at the default 20 smollm2 has no visual sink and VAR edits nothing);
on the random tiny-llava with sink dims [0, 1, 2], τ = 2.6.

Time = process CPU time (this process only), minimum over ``--repeats`` rounds with the cases interleaved
within each round, one thread by default. Usage (repository root)::

    python benchmarks/lvlm_fixes.py                 # both models, 3 repeats
    python benchmarks/lvlm_fixes.py --models tiny-llava-576 --repeats 5
    python benchmarks/lvlm_fixes.py --models llava-real --out benchmarks/results/lvlm_fixes_llava_real.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

import headlab
from headlab.analyses.lvlm_fixes import Pai, Paint, Vaf, Var, Vcd, Vhr, generate_fixed
from headlab.lvlm import LvlmSample

RESULTS = Path(__file__).resolve().parent / "results"
SECOND_PASS = {"pai-cfg", "vhr", "vcd"}  # a no-image (VCD: distorted-image) pass at every step, by definition
SMOLLM2 = ("llava-smol", "llava-real")


def load_model(name: str):
    if name in SMOLLM2:
        return headlab.load(name)
    from transformers import CLIPVisionConfig, CLIPVisionModel

    loaded = headlab.load("tiny-llava")
    old = loaded.model.config.vision_config.to_dict()
    config = CLIPVisionConfig(**{**old, "image_size": 336, "patch_size": 14})
    torch.manual_seed(0)
    loaded.model.model.vision_tower = CLIPVisionModel(config).eval()
    loaded.model.config.vision_config = config
    return loaded


def cases(name: str, dims: list[int]) -> dict[str, list]:
    # VAR finds the sink dimensions once per instance (one extra forward); a run keeps its instance, so the
    # timing gives it the dimensions found beforehand.
    var = Var(tau=15.0, dims=dims) if name in SMOLLM2 else Var(tau=2.6, dims=[0, 1, 2])
    return {"none": [], "pai": [Pai()], "pai-cfg": [Pai(cfg=True)], "pai-adaptive": [Pai(adaptive="entropy")],
            "paint": [Paint()], "vaf": [Vaf()], "vaf-adaptive": [Vaf(adaptive="entropy")], "var": [var],
            "vhr": [Vhr()], "vcd": [Vcd()]}


def images(n: int, name: str):
    if name == "llava-real":
        from headlab.training import photo_scenes as S

        return [S.render(scene)[0] for scene in S.eval_scenes("in-distribution", n)]
    from headlab.training import lvlm_data as D

    scenes = D.eval_scenes("weak", n)
    return [D.render(scene) for scene in scenes]


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    out: dict = {"machine": {"platform": platform.platform(), "threads": args.threads, "torch": torch.__version__,
                             "load_avg_start": os.getloadavg()},
                 "new_tokens": args.new_tokens, "batch": args.batch, "repeats": args.repeats, "models": {}}
    for name in args.models:
        loaded = load_model(name if name in SMOLLM2 else "tiny-llava")
        pictures = images(args.batch, name)
        samples = [LvlmSample("Describe the image.", [im]) for im in pictures]
        from headlab.analyses.visual_sinks import find_sink_dims
        from headlab.lvlm import build_inputs

        dims = find_sink_dims(loaded, build_inputs(loaded, samples).tensors)[0] if name in SMOLLM2 else []
        runs = cases(name, dims)
        generation = loaded.model.generation_config
        generation.min_new_tokens = args.new_tokens  # every case generates the same number of tokens
        n_image = None
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.repeats):
            for case, methods in runs.items():  # a method sets its per-batch state up anew in every call
                start = time.process_time()
                tokens = generate_fixed(loaded, samples, methods, max_new_tokens=args.new_tokens)
                times[case].append(time.process_time() - start)
                assert tokens.shape[1] == args.new_tokens, (case, tokens.shape)
        n_image = build_inputs(loaded, samples[:1]).image_spans[0][0]
        base = min(times["none"])
        rows = {}
        for case, values in times.items():
            best = min(values)
            rows[case] = {"cpu_s": best, "tokens_per_s": args.batch * args.new_tokens / best,
                          "slowdown_vs_sdpa": best / base, "second_pass": case in SECOND_PASS, "all_s": values}
        out["models"][name] = {"image_tokens": n_image[1] - n_image[0], "cases": rows}
    out["machine"]["load_avg_end"] = os.getloadavg()
    return out


def markdown(result: dict) -> str:
    lines = ["| model | image tokens | case | tokens/s | × sdpa time | second pass by definition |",
             "|---|---|---|---|---|---|"]
    for name, entry in result["models"].items():
        for case, row in entry["cases"].items():
            lines.append(f"| {name} | {entry['image_tokens']} | {case} | {row['tokens_per_s']:.1f} | "
                         f"{row['slowdown_vs_sdpa']:.2f} | {'yes' if row['second_pass'] else ''} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["llava-smol", "tiny-llava-576"],
                        choices=["llava-real", "llava-smol", "tiny-llava-576"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "lvlm_fixes.json")
    args = parser.parse_args()
    result = run(args)
    table = markdown(result)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**result, "table": table}, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
