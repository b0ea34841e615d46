"""The LVLM testbed: does llava-real hallucinate by co-occurrence, and which fixes help? (docs/lvlm_testbed.md)

    python scripts/lvlm_testbed.py --data /tmp/testbed --runs /tmp/testbed-runs --n 120 \
        --out benchmarks/results/lvlm_testbed.json

1. ``sets``: held-out photo scenes (headlab/training/photo_scenes.py) written as COCO-style + POPE files under
   ``--data``: ``partner-missing`` (one object of a pair, its partner absent) and ``in-distribution``. Made from
   the installed tuxpaint stamps at run time; keep them out of version control (GPL-2).
2. ``baseline``: plain captions → CHAIR and the partner effect (analyses/cooccurrence.py) on both sets; ``pope``:
   POPE's three splits on the partner-missing set → false "yes" per split (the adversarial split asks about the
   absent partner first); questions end with " Answer yes or no.", as the recipe's do. ``margins``: POPE read by
   logit(Yes) - logit(No), per present object, absent partner and absent non-partner, with AUCs;
   ``text-margins``: the same questions to the same frozen LM with the scene's true caption instead of the image
   (can the language model answer from the objects written out?).
3. ``fixes``: ``analyze hallucination`` (the CLI, one run per call, saved under ``--runs``) with every fix and its
   random control on the partner-missing set, then the adaptive variants (against the plain ones of the run before,
   on the same images), then POPE adversarial on the same images (no controls for these two, for time); the
   partner effect of each method's captions is recomputed from the run.
4. ``origin``: visual sinks by origin (analyses/visual_sink_origin.py) on llava-real and llava-smol.

Everything lands in one JSON (``--out``) with the commands that made it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from headlab.training import photo_scenes as S

SETS = ("partner-missing", "in-distribution")
FIX_METHODS = "none,var,pai,paint,vaf,vhr,vcd"
ADAPTIVE_METHODS = "none,pai,vaf"
POPE_SUFFIX = " Answer yes or no."  # as the recipe's questions end (LLaVA-1.5 appends its own instruction too)
VAR_TAU = "var.tau=15"  # smollm2's φ is at most sqrt(576) = 24: τ = 20 (set for 4096-dim backbones) finds no sink


def analyze(args: list[str], log) -> Path:
    """Run ``analyze hallucination …`` (the installed CLI) and return the run folder it wrote."""
    command = [str(Path(sys.executable).with_name("analyze")), "hallucination", *args]
    log(" ".join(command[1:]).replace(str(Path(sys.executable).parent) + "/", ""))
    t0 = time.time()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if done.returncode != 0:
        raise SystemExit(f"analyze hallucination failed ({done.returncode}):\n{done.stderr[-3000:]}")
    log(f"  {time.time() - t0:.0f} s")
    runs, name = Path(args[args.index("--out") + 1]), args[args.index("--name") + 1]
    return runs / name


def scenes_of(folder: Path) -> dict[str, set[str]]:
    """image file name → the objects in it, from the set's COCO annotations."""
    from headlab.analyses.hallucination_metrics import load_coco_objects

    return {name: set(objects) for name, objects in load_coco_objects(folder / "annotations.json").items()}


def run_tables(run: Path) -> dict:
    """A run's summary and its metric table (value, CI, paired difference from none and from the control)."""
    from headlab.result import Result

    result = Result.load(run)
    return {"run": run.name, "summary": result.summary, "metrics": result.tables["metrics"].to_dict("records")}


def partner_effects(run: Path, folder: Path) -> dict:
    """The partner effect of every method's captions in a CHAIR run."""
    from headlab.analyses.cooccurrence import partner_effect
    from headlab.result import Result

    result = Result.load(run)
    captions = result.tables["captions"]
    truth = scenes_of(folder)
    synonyms = {w: w for w in S.WORDS} | {w + "s": w for w in S.WORDS}
    out = {}
    for method, rows in captions.groupby("method", sort=False):
        out[method] = partner_effect(list(rows["caption"]), [truth[i] for i in rows["image"]], S.PARTNER, S.WORDS,
                                     synonyms)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, default=120, help="images per CHAIR set")
    parser.add_argument("--n-pope", type=int, default=120, help="questions per POPE split")
    parser.add_argument("--model", default="llava-real")
    parser.add_argument("--parts", default="sets,baseline,pope,margins,fixes,adaptive,pope-fixes,origin")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results.setdefault("commands", [])

    def log(line: str) -> None:
        print(line, flush=True)
        if line.startswith("hallucination "):
            results["commands"].append("analyze " + line)

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1, default=float))
        os.replace(tmp, args.out)

    common = ["--model", args.model, "--threads", str(args.threads), "--out", str(args.runs), "--quiet"]
    if "sets" in parts:
        for kind in SETS:
            S.write_dataset(args.data / kind, S.eval_scenes(kind, args.n), seed=0)
        results["sets"] = {kind: {"images": args.n, "folder": str(args.data / kind)} for kind in SETS}
        save()
    if "baseline" in parts:
        for kind in SETS:
            run = analyze(["--bench", "chair", "--data", str(args.data / kind), "--methods", "none", "--n",
                           str(args.n), "--max-new-tokens", "40", "--name", f"baseline-{kind}", *common], log)
            results[f"baseline_{kind}"] = {**run_tables(run),
                                           "partner_effect": partner_effects(run, args.data / kind)["none"]}
            save()
    if "pope" in parts:
        run = analyze(["--bench", "pope", "--data", str(args.data / "partner-missing"), "--methods", "none",
                       "--pope-suffix", POPE_SUFFIX, "--n", str(args.n_pope), "--name",
                       "baseline-pope-partner-missing", *common], log)
        results["baseline_pope_partner-missing"] = pope_summary(run, args.data / "partner-missing")
        save()
    if "fixes" in parts:
        run = analyze(["--bench", "chair", "--data", str(args.data / "partner-missing"), "--methods", FIX_METHODS,
                       "--controls", "--set", VAR_TAU, "--n", str(args.n), "--max-new-tokens", "40",
                       "--name", "fixes-partner-missing", *common], log)
        results["fixes_partner_missing"] = {**run_tables(run),
                                            "partner_effect": partner_effects(run, args.data / "partner-missing")}
        save()
    if "adaptive" in parts:
        run = analyze(["--bench", "chair", "--data", str(args.data / "partner-missing"), "--methods",
                       ADAPTIVE_METHODS, "--set", "pai.adaptive=entropy", "--set", "vaf.adaptive=entropy",
                       "--n", str(args.n), "--max-new-tokens", "40", "--name", "adaptive-partner-missing", *common],
                      log)
        results["adaptive_partner_missing"] = {**run_tables(run),
                                               "partner_effect": partner_effects(run, args.data / "partner-missing")}
        save()
    if "pope-fixes" in parts:
        run = analyze(["--bench", "pope", "--data", str(args.data / "partner-missing"), "--methods", FIX_METHODS,
                       "--controls", "--splits", "adversarial", "--set", VAR_TAU, "--pope-suffix", POPE_SUFFIX,
                       "--max-new-tokens", "3",  # "Yes." / "No.": the parser reads the first word
                       "--n", str(args.n_pope), "--name", "fixes-pope-adversarial", *common], log)
        results["fixes_pope_adversarial"] = pope_summary(run, args.data / "partner-missing")
        save()
    if "margins" in parts:
        results["pope_margins"] = yes_margins(args.model, args.n, args.threads)
        save()
    if "text-margins" in parts:
        results["pope_margins_text_control"] = yes_margins(args.model, args.n, args.threads, as_text=True)
        save()
    if "origin" in parts:
        results["sinks_by_origin"] = sinks_by_origin(args.data / "in-distribution")
        save()
    print(f"written {args.out}")


def yes_margins(model: str, n: int, threads: int, as_text: bool = False) -> dict:
    """POPE by margin on ``n`` partner-missing scenes: for each, one present object, the absent partner and one
    absent non-partner (seeded), asked as the POPE files ask (+ ``POPE_SUFFIX``); logit(Yes) - logit(No) at the
    first answer token (analyses/cooccurrence.py ``yes_margin_table``). ``as_text``: the control without the
    image: the scene's true caption written before the question, to the same frozen language model."""
    import random

    import torch

    import headlab
    from headlab.analyses.cooccurrence import yes_margin_table
    from headlab.analyses.lvlm_fixes import generate_fixed
    from headlab.lvlm import LvlmSample

    torch.set_num_threads(threads)
    loaded = headlab.load(model)
    tok = loaded.text_tokenizer
    yes_id, no_id = tok.encode("Yes")[0], tok.encode("No")[0]
    scenes = S.eval_scenes("partner-missing", n)
    rng = random.Random(0)
    items = []  # (scene index, object asked about, kind)
    for index, scene in enumerate(scenes):
        present = [p.word for p in scene.placements]
        anchor = next(w for w in present if w in S.PARTNER)
        others = [w for w in S.WORDS if w not in present and w != S.PARTNER[anchor]]
        items += [(index, rng.choice(present), "present"), (index, S.PARTNER[anchor], "partner"),
                  (index, rng.choice(others), "other")]
    images = [S.render(scene)[0] for scene in scenes]
    margins: list[float] = []
    for start in range(0, len(items), 12):
        chunk = items[start:start + 12]
        question = "Is there {} {} in the image?" + POPE_SUFFIX
        samples = [LvlmSample(f"{S.caption_text(scenes[index].objects)} {question.format(S.article(obj), obj)}")
                   if as_text else LvlmSample(question.format(S.article(obj), obj), [images[index]])
                   for index, obj, _ in chunk]
        _, scores = generate_fixed(loaded, samples, max_new_tokens=1, return_scores=True)
        margins += (scores[:, 0, yes_id] - scores[:, 0, no_id]).float().tolist()
    return {"scenes": n, "suffix": POPE_SUFFIX, "as_text": as_text,
            **yes_margin_table(margins, [k for _, _, k in items])}


def pope_summary(run: Path, folder: Path) -> dict:
    """Metrics per method and split, the false-yes rate per split, and per split the false-yes rate on absent
    partners against other absent objects (analyses/cooccurrence.py)."""
    import re

    from headlab.analyses.cooccurrence import false_yes_by_partner, false_yes_by_split
    from headlab.result import Result

    result = Result.load(run)
    answers = result.tables["answers"]
    truth = scenes_of(folder)
    out = {**run_tables(run), "false_yes": {}, "false_yes_by_partner": {}}
    for method, rows in answers.groupby("method", sort=False):
        by_split = {s: list(r["answer"]) for s, r in rows.groupby("split", sort=False)}
        questions = {s: [{"label": label} for label in r["label"]] for s, r in rows.groupby("split", sort=False)}
        out["false_yes"][method] = false_yes_by_split(by_split, questions)
        out["false_yes_by_partner"][method] = {
            split: false_yes_by_partner(list(r["read_as"]),
                                        [re.match(r"Is there an? (\w+) in", q)[1] for q in r["question"]],
                                        [truth[i] for i in r["image"]], S.PARTNER)
            for split, r in rows.groupby("split", sort=False)}
    return out


def sinks_by_origin(folder: Path, n: int = 16) -> dict:
    import headlab
    from headlab.analyses.visual_sink_origin import sinks_by_origin as origin
    from headlab.lvlm import LvlmSample, build_inputs, load_image
    from headlab.training import lvlm_data as D

    out = {}
    real_images = [load_image(p) for p in sorted((folder / "images").iterdir())[:n]]
    icon_images = [D.render(s) for s in D.eval_scenes("in-distribution", n, seed=77)]
    for name, images in (("llava-real", real_images), ("llava-smol", icon_images)):
        loaded = headlab.load(name, dtype="float32", device="cpu")
        text = build_inputs(loaded, [LvlmSample("Describe the image.")])
        inputs = build_inputs(loaded, [LvlmSample("Describe the image.", [im]) for im in images])
        found = origin(loaded, inputs, tau=15.0, text_inputs=text.tensors)
        top = found.table.sort_values("vit_norm_ratio", ascending=False).head(5)
        out[name] = {**found.summary, "top_norm_tokens": top.to_dict("records")}
    return out


if __name__ == "__main__":
    main()
