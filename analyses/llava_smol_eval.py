"""Does llava-smol hallucinate from its language prior? CHAIR, POPE, the partner effect and VHR.

``python -m headlab.analyses.llava_smol_eval --n 600 --out eval.json`` writes the synthetic evaluation sets in
their public formats (COCO instances + captions, POPE JSONL) to a temporary folder, reads them back
through analyses/hallucination_metrics.py, and measures on llava-smol:

- the prior effect: in captions of images where an object is present and its partner absent, how often
  the partner is named vs any other absent object (2×2 table, Fisher's exact test, odds ratio);
- CHAIR_i / CHAIR_s on in-distribution, partner-missing and weak (small, low-contrast) images;
- POPE random / popular / adversarial;
- VHR's effect on CHAIR_i (paired bootstrap CI over images) and a random-heads control of the same size
  (in each VHR layer as many random heads as the median rule picks, scaled by the same α).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from headlab.analyses.hallucination_metrics import (
    ChairCounts,
    chair,
    load_coco_objects,
    load_pope,
    load_synonyms,
    paired_bootstrap_chair_i,
    pope_metrics,
)
from headlab.analyses.lvlm_fixes import generate_with_vhr
from headlab.analyses.vhd import vhr_layers
from headlab.lvlm import LvlmSample, load_image
from headlab.training import lvlm_data as D


def decode(loaded, tokens: torch.Tensor) -> list[str]:
    tok = loaded.text_tokenizer
    return [tok.decode(row, skip_special_tokens=True).strip() for row in tokens]


def caption(loaded, images: Sequence, *, batch: int = 16, max_new_tokens: int = 20, **kwargs) -> list[str]:
    """Greedy captions of ``images`` (PIL) with the training prompt; ``kwargs`` go to ``lvlm_fixes.generate_with_vhr``
    (``vhr=True``; ``heads=callable(batch index) -> [(layer, head)]`` for a fixed-heads control)."""
    out: list[str] = []
    for start in range(0, len(images), batch):
        chunk = [LvlmSample(D.CAPTION_PROMPT, [im]) for im in images[start:start + batch]]
        extra = dict(kwargs)
        if callable(extra.get("heads")):
            extra["heads"] = extra["heads"](start // batch)
        tokens, _ = generate_with_vhr(loaded, chunk, max_new_tokens=max_new_tokens, **extra)
        out += decode(loaded, tokens)
    return out


def prior_effect(captions: Sequence[str], scenes: Sequence[D.Scene]) -> dict:
    """Partner of a present object named though absent, vs any other absent object named (Fisher's exact test)."""
    from scipy.stats import fisher_exact

    synonyms = {o: o for o in D.OBJECTS}
    from headlab.analyses.hallucination_metrics import mentioned

    table = {"partner": [0, 0], "other": [0, 0]}  # [named, not named]
    for text, scene in zip(captions, scenes, strict=True):
        named = set(mentioned(text, synonyms))
        present = set(scene.objects)
        for obj in D.OBJECTS:
            if obj in present:
                continue
            kind = "partner" if D.PARTNER[obj] in present else "other"
            table[kind][0 if obj in named else 1] += 1
    odds, p = fisher_exact([table["partner"], table["other"]], alternative="greater")
    rate = {k: v[0] / max(1, sum(v)) for k, v in table.items()}
    return {"partner_named_rate": rate["partner"], "other_absent_named_rate": rate["other"], "odds_ratio": odds,
            "p_value_fisher_one_sided": p, "table_named_notnamed": table}


@torch.no_grad()
def forced_prior(loaded, n: int = 160, *, with_image: bool = True, seed: int = 0) -> dict:
    """The prior under a forced continuation: on one-object images, after "The image shows a {object} and a",
    which absent object does the model name next? P(partner) vs the mean P of the 14 other absent objects
    (restricted to object tokens); rank of the partner among them (chance 1/14) and a sign test."""
    from scipy.stats import binomtest

    from headlab.lvlm import build_inputs

    tok = loaded.text_tokenizer
    ids = {o: tok(" " + o, add_special_tokens=False).input_ids[0] for o in D.OBJECTS}
    rng = random.Random(f"forced-{seed}")
    scenes = [D.random_scene(rng, n_objects=(1,), include=[D.OBJECTS[i % len(D.OBJECTS)]]) for i in range(n)]
    wins, log_ratios, partner_p, other_p = 0, [], [], []
    for start in range(0, n, 16):
        chunk = scenes[start:start + 16]
        samples = [LvlmSample(D.CAPTION_PROMPT, [D.render(s)] if with_image else [],
                              answer=f"The image shows a {s.objects[0]} and a") for s in chunk]
        inputs = build_inputs(loaded, samples, padding_side="left")
        probs = loaded.model(**inputs.tensors).logits[:, -1].float().softmax(-1)
        for b, scene in enumerate(chunk):
            anchor = scene.objects[0]
            partner = D.PARTNER[anchor]
            others = [o for o in D.OBJECTS if o not in (anchor, partner)]
            p_partner = float(probs[b, ids[partner]])
            p_others = [float(probs[b, ids[o]]) for o in others]
            wins += p_partner > max(p_others)
            partner_p.append(p_partner)
            other_p.append(sum(p_others) / len(p_others))
            log_ratios.append(float(torch.tensor(p_partner / max(1e-12, other_p[-1])).log()))
    above = sum(r > 0 for r in log_ratios)
    return {"images": n, "with_image": with_image, "partner_top_among_absent_rate": wins / n,
            "chance": 1 / 14, "mean_p_partner": sum(partner_p) / n, "mean_p_other_absent": sum(other_p) / n,
            "median_log_ratio": float(torch.tensor(log_ratios).median()),
            "sign_test_p_partner_above_mean_other": binomtest(above, n, 0.5, alternative="greater").pvalue}


def pope(loaded, folder: Path, split: str, *, batch: int = 32) -> dict:
    items = load_pope(folder / f"pope_{split}.jsonl")
    answers: list[str] = []
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        samples = [LvlmSample(i["text"] + " Answer yes or no.", [load_image(folder / "images" / i["image"])])
                   for i in chunk]
        tokens, _ = generate_with_vhr(loaded, samples, max_new_tokens=3)
        answers += decode(loaded, tokens)
    return pope_metrics(answers, [i["label"] for i in items])


def chair_of(loaded, folder: Path, **kwargs) -> tuple[ChairCounts, list[str]]:
    truth = load_coco_objects(folder / "annotations.json")
    synonyms = load_synonyms(folder / "synonyms.txt")
    names = sorted(truth)
    captions = caption(loaded, [load_image(folder / "images" / n) for n in names], **kwargs)
    return chair(captions, [truth[n] for n in names], synonyms), captions


def random_heads(loaded, seed: int):
    """Per batch: in each VHR layer, as many random heads as the median rule picks (H // 2 heads lie strictly
    above torch's median, the lower middle value for an even count)."""
    arch = loaded.arch
    layers = vhr_layers(arch.n_layers)
    k = arch.n_heads // 2

    def pick(batch_index: int) -> list[tuple[int, int]]:
        rng = random.Random(f"{seed}-{batch_index}")
        return [(layer, h) for layer in layers for h in sorted(rng.sample(range(arch.n_heads), k))]

    return pick


def sinks_report(loaded, n: int = 8, tau: float = 20.0) -> dict:
    """Sink dims from the massive activations of text-only chat prompts, then φ on the image tokens."""
    from headlab.analyses.visual_sinks import find_sink_dims, visual_sinks
    from headlab.lvlm import build_inputs

    text = build_inputs(loaded, [LvlmSample(D.CAPTION_PROMPT)])
    dims, entries = find_sink_dims(loaded, text.tensors)
    images = [D.render(s) for s in D.eval_scenes("in-distribution", n, seed=77)]
    inputs = build_inputs(loaded, [LvlmSample(D.CAPTION_PROMPT, [im]) for im in images])
    sinks = visual_sinks(loaded, inputs, dims, tau=tau)
    image = inputs.image_mask
    phi_image = sinks.phi[:, image]  # [layer, image tokens]
    first = sinks.phi[:, torch.arange(len(images)), inputs.first_real]  # [layer, batch]
    return {"sink_dims": dims, "massive_entries": len(entries),
            "massive_positions": sorted({e["position"] for e in entries}),
            "max_massive_value": max((abs(e["value"]) for e in entries), default=0.0), "tau": tau,
            "phi_bound_sqrt_hidden": loaded.arch.hidden_size ** 0.5,
            "max_phi_image_tokens": float(phi_image.max()), "median_phi_image_tokens": float(phi_image.median()),
            "max_phi_first_token": float(first.max()), "visual_sinks": int(sinks.visual.sum()),
            "image_tokens": int(image.sum())}


PARTS = ("sinks", "chair", "vhr", "vhd", "pope", "forced")


KINDS = ("in-distribution", "partner-missing", "weak")


def evaluate(loaded, n: int = 600, *, n_pope: int = 100, n_vhd: int = 60, parts: Sequence[str] = PARTS,
             kinds: Sequence[str] = KINDS, seed: int = 0, log=print) -> dict:
    """The measurements of ``parts`` (sinks, chair, vhr, vhd, pope) on ``n`` images per CHAIR set of ``kinds``
    (VHR runs on partner-missing images, with their CHAIR baseline, whatever ``kinds`` says)."""
    results: dict = {"model": loaded.name, "n_images": n}
    if "sinks" in parts:
        results["visual_sinks"] = sinks_report(loaded)
        log(json.dumps({"visual_sinks": results["visual_sinks"]}))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for kind in KINDS:
            wanted = "chair" in parts and kind in kinds
            if not wanted and not ("vhr" in parts and kind == "partner-missing"):
                continue
            t0 = time.time()
            folder = root / kind
            scenes = D.eval_scenes(kind, n, seed=1234 + seed)
            D.write_dataset(folder, scenes, seed=seed)
            counts, captions = chair_of(loaded, folder)
            entry = {**counts.summary(), "examples": captions[:5]}
            if kind == "partner-missing":
                entry["prior_effect"] = prior_effect(captions, scenes)
            if kind == "in-distribution":
                exact = [c == D.caption_text(s.ordered()) for c, s in zip(captions, scenes, strict=True)]
                entry["exact_caption_rate"] = sum(exact) / len(exact)
            if "vhr" in parts and kind == "partner-missing":
                vhr_counts, vhr_caps = chair_of(loaded, folder, vhr=True)
                ctrl_counts, _ = chair_of(loaded, folder, heads=random_heads(loaded, seed))
                entry["vhr"] = {**vhr_counts.summary(), "examples": vhr_caps[:5],
                                "paired_bootstrap": paired_bootstrap_chair_i(counts, vhr_counts),
                                "prior_effect": prior_effect(vhr_caps, scenes)}
                entry["random_heads_control"] = {**ctrl_counts.summary(),
                                                 "paired_bootstrap": paired_bootstrap_chair_i(counts, ctrl_counts)}
            entry["minutes"] = round((time.time() - t0) / 60, 2)
            results[kind] = entry
            log(json.dumps({kind: {k: v for k, v in entry.items() if k != "examples"}}, default=float))
        if "forced" in parts:
            results["forced_prior"] = {"image": forced_prior(loaded, seed=seed),
                                       "text_only": forced_prior(loaded, with_image=False, seed=seed)}
            log(json.dumps({"forced_prior": results["forced_prior"]}))
        if "vhd" in parts:
            results["vhd"] = vhd_report(loaded, n_vhd, seed)
            log(json.dumps({"vhd": results["vhd"]}, default=float))
        if "pope" in parts:
            folder = root / "pope"
            D.write_dataset(folder, D.eval_scenes("in-distribution", n_pope, seed=4321 + seed), seed=seed)
            results["pope"] = {split: pope(loaded, folder, split) for split in ("random", "popular", "adversarial")}
            log(json.dumps({"pope": results["pope"]}))
    return results


def vhd_report(loaded, n: int, seed: int = 0) -> dict:
    """T-VHD of hallucinated vs correct object tokens in captions of partner-missing images (Mann-Whitney U)."""
    from scipy.stats import mannwhitneyu

    from headlab.analyses.vhd import VhdConfig, analyze_vhd

    scenes = D.eval_scenes("partner-missing", n, seed=999 + seed)
    samples = [LvlmSample(D.CAPTION_PROMPT, [D.render(s)]) for s in scenes]
    result = analyze_vhd(loaded, samples, VhdConfig(max_new_tokens=20, batch_size=16),
                         truth=[set(s.objects) for s in scenes], synonyms={o: o for o in D.OBJECTS})
    tokens = result.tables["tokens"]
    out = {"summary": result.summary["object_tokens"], "top_heads": result.summary["top_heads"]}
    for agg in ("topk_mean", "layer_topk_sum"):
        h = tokens[tokens["status"] == "hallucinated"][f"t_vhd_{agg}"]
        c = tokens[tokens["status"] == "correct"][f"t_vhd_{agg}"]
        if len(h) and len(c):
            out[f"mann_whitney_p_{agg}_hallucinated_lower"] = float(mannwhitneyu(h, c, alternative="less").pvalue)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    import headlab

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=600, help="images per CHAIR set")
    parser.add_argument("--n-pope", type=int, default=100, help="images of the POPE set (6 questions each)")
    parser.add_argument("--n-vhd", type=int, default=60, help="images of the VHD analysis")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument("--kinds", default=",".join(KINDS), help="CHAIR sets (comma-separated)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}: choose from {', '.join(PARTS)}")
    torch.set_num_threads(args.threads)
    loaded = headlab.load("llava-smol", dtype="float32", device="cpu")
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if set(kinds) - set(KINDS):
        parser.error(f"unknown kinds {sorted(set(kinds) - set(KINDS))}: choose from {', '.join(KINDS)}")
    results = evaluate(loaded, args.n, n_pope=args.n_pope, n_vhd=args.n_vhd, parts=parts, kinds=kinds)
    text = json.dumps(results, indent=1, default=float)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
