"""Hallucination by co-occurrence: is an absent object named more often when its usual partner is in the image?

COCO-trained LVLMs name a "fork" beside a "knife" that has none (Li et al., "Evaluating Object Hallucination in
Large Vision-Language Models", EMNLP 2023, built POPE's adversarial split on exactly this). Given captions, the
objects present in each image and a partner map, every (image, absent object) pair is one opportunity, of one of
two kinds: **partner** (a partner of the object is present) or **other** (none is). The effect is the rate at
which partner opportunities are named against other ones:

- each rate with its Wilson 95% interval;
- their ratio and difference with a percentile bootstrap interval over images (opportunities in one image are
  not independent: images are resampled, not opportunities);
- Fisher's exact one-sided test on the 2×2 table (named / not named × partner / other).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def wilson(named: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of ``named / total`` (``(nan, nan)`` when ``total`` is 0)."""
    if total == 0:
        return (float("nan"), float("nan"))
    p = named / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return (centre - half, centre + half)


def opportunities(captions: Sequence[str], present: Sequence[set[str]], partner: Mapping[str, str],
                  vocabulary: Sequence[str], synonyms: Mapping[str, str]) -> np.ndarray:
    """``[images, 4]`` counts per image: partner named, partner not named, other named, other not named."""
    from .hallucination_metrics import mentioned

    counts = np.zeros((len(captions), 4), dtype=np.int64)
    for i, (text, there) in enumerate(zip(captions, present, strict=True)):
        named = set(mentioned(text, dict(synonyms)))
        for obj in vocabulary:
            if obj in there:
                continue
            kind = 0 if partner.get(obj) in there else 2
            counts[i, kind + (0 if obj in named else 1)] += 1
    return counts


def partner_effect(captions: Sequence[str], present: Sequence[set[str]], partner: Mapping[str, str],
                   vocabulary: Sequence[str], synonyms: Mapping[str, str] | None = None, *,
                   resamples: int = 2000, seed: int = 0) -> dict:
    """The partner effect of ``captions`` (see the module docstring); ``synonyms``: word → object (default: each
    object's own word)."""
    from scipy.stats import fisher_exact

    synonyms = synonyms or {o: o for o in vocabulary}
    counts = opportunities(captions, present, partner, vocabulary, synonyms)
    pn, pm, on, om = (int(v) for v in counts.sum(0))
    partner_rate = pn / (pn + pm) if pn + pm else float("nan")
    other_rate = on / (on + om) if on + om else float("nan")
    rng = np.random.default_rng(seed)
    draws = counts[rng.integers(0, len(counts), size=(resamples, len(counts)))].sum(1)  # [resamples, 4]
    with np.errstate(divide="ignore", invalid="ignore"):
        p_rate = draws[:, 0] / (draws[:, 0] + draws[:, 1])
        o_rate = draws[:, 2] / (draws[:, 2] + draws[:, 3])
        ratio = p_rate / o_rate
    diff = p_rate - o_rate
    odds, p_value = fisher_exact([[pn, pm], [on, om]], alternative="greater")

    def interval(values: np.ndarray) -> list[float]:
        values = values[np.isfinite(values)]
        return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if len(values) else [
            float("nan"), float("nan")]

    return {"images": len(captions), "partner_opportunities": pn + pm, "other_opportunities": on + om,
            "partner_named": pn, "other_named": on,
            "partner_named_rate": partner_rate, "partner_named_rate_ci": list(wilson(pn, pn + pm)),
            "other_named_rate": other_rate, "other_named_rate_ci": list(wilson(on, on + om)),
            "rate_ratio": partner_rate / other_rate if other_rate else float("inf"),
            "rate_ratio_ci": interval(ratio), "rate_difference": partner_rate - other_rate,
            "rate_difference_ci": interval(diff), "fisher_odds_ratio": float(odds),
            "fisher_p_one_sided": float(p_value), "resamples": resamples}


def false_yes_by_split(answers: Mapping[str, Sequence[str]], questions: Mapping[str, Sequence[dict]],
                       parser: str = "official") -> dict:
    """POPE per split: the rate of "yes" on questions whose answer is no (the hallucination POPE's splits differ
    in), with Wilson intervals, and each split against ``random`` (Fisher's exact one-sided test: more false
    yeses than random)."""
    from scipy.stats import fisher_exact

    from .hallucination_metrics import pope_answer

    out: dict[str, dict] = {}
    for split, items in questions.items():
        said = [pope_answer(a, parser) for a in answers[split]]
        negatives = [s for s, q in zip(said, items, strict=True) if q["label"] == "no"]
        yes = sum(s == "yes" for s in negatives)
        out[split] = {"no_questions": len(negatives), "false_yes": yes,
                      "false_yes_rate": yes / len(negatives) if negatives else float("nan"),
                      "false_yes_rate_ci": list(wilson(yes, len(negatives)))}
    if "random" in out:
        base = out["random"]
        for split, entry in out.items():
            if split != "random":
                table = [[entry["false_yes"], entry["no_questions"] - entry["false_yes"]],
                         [base["false_yes"], base["no_questions"] - base["false_yes"]]]
                entry["fisher_p_more_than_random"] = float(fisher_exact(table, alternative="greater")[1])
    return out


def auc(higher: Sequence[float], lower: Sequence[float]) -> float:
    """P(a value of ``higher`` > a value of ``lower``), ties counted half: the area under the ROC curve of a
    threshold on the value (Mann-Whitney U / (n_a · n_b))."""
    a, b = np.asarray(higher, dtype=float)[:, None], np.asarray(lower, dtype=float)[None, :]
    return float((a > b).mean() + 0.5 * (a == b).mean())


def auc_interval(higher: Sequence[float], lower: Sequence[float], resamples: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """``(auc, low, high)``: the AUC and its percentile bootstrap interval, each group resampled on its own."""
    rng = np.random.default_rng(seed)
    a, b = np.asarray(higher, dtype=float), np.asarray(lower, dtype=float)
    draws = [auc(a[rng.integers(0, len(a), len(a))], b[rng.integers(0, len(b), len(b))]) for _ in range(resamples)]
    tail = (1 - level) / 2
    return auc(a, b), float(np.quantile(draws, tail)), float(np.quantile(draws, 1 - tail))


def yes_margin_table(margins: Sequence[float], kinds: Sequence[str], resamples: int = 2000, seed: int = 0) -> dict:
    """POPE read by margin, without the threshold a yes/no answer puts at 0: ``margins`` are logit(Yes) - logit(No)
    at the answer's first token, ``kinds`` say what was asked about (``present``, ``partner``: the absent
    co-occurring object POPE's adversarial split asks first, ``other``: an absent object that is no partner).
    Returns the mean margin and the share answered yes (margin > 0) per kind, and AUCs with bootstrap intervals:
    present above absent (grounding), partner above other (co-occurrence: the adversarial split is harder)."""
    m, k = np.asarray(margins, dtype=float), np.asarray(kinds)
    by = {kind: m[k == kind] for kind in ("present", "partner", "other")}
    absent = np.concatenate([by["partner"], by["other"]])
    out: dict = {kind: {"n": int(len(v)), "mean_margin": float(v.mean()), "yes_rate": float((v > 0).mean()),
                        "yes_rate_ci": wilson(int((v > 0).sum()), len(v))} for kind, v in by.items()}
    for name, (hi, lo) in {"present_vs_absent": (by["present"], absent),
                           "partner_vs_other": (by["partner"], by["other"])}.items():
        value, low, high = auc_interval(hi, lo, resamples, seed)
        out[f"auc_{name}"] = {"auc": value, "ci": [low, high]}
    return out


def false_yes_by_partner(said: Sequence[str], objects: Sequence[str], present: Sequence[set[str]],
                         partner: Mapping[str, str]) -> dict:
    """POPE's "no" questions split by what they ask about: an absent *partner* of an object in the image (what the
    adversarial split asks first) or an absent *other* object. ``said``: the parsed answers ("yes"/"no"/…),
    ``objects``: the object each asks about, ``present``: the image's objects; questions about a present object
    are skipped. Rates with Wilson intervals, and Fisher's exact one-sided test (partner more often "yes")."""
    from scipy.stats import fisher_exact

    counts = {"partner": [0, 0], "other": [0, 0]}  # [yes, questions]
    for answer, obj, here in zip(said, objects, present, strict=True):
        if obj in here:
            continue
        kind = "partner" if any(partner.get(o) == obj for o in here) else "other"
        counts[kind][0] += answer == "yes"
        counts[kind][1] += 1
    out: dict = {kind: {"false_yes": yes, "no_questions": n, "false_yes_rate": yes / n if n else float("nan"),
                        "false_yes_rate_ci": list(wilson(yes, n))} for kind, (yes, n) in counts.items()}
    (py, pn), (oy, on) = counts["partner"], counts["other"]
    out["fisher_p_partner_more"] = float(fisher_exact([[py, pn - py], [oy, on - oy]], alternative="greater")[1])
    return out
