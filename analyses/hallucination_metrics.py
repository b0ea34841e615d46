"""CHAIR and POPE, from local files in their public formats, and a paired bootstrap for CHAIR_i.

CHAIR (Rohrbach et al., 2018): objects are found in a caption by word match against a synonym list
(each line ``canonical, synonym, …``; plurals with a trailing s count), then compared with the image's
ground-truth objects (COCO instances: ``annotations.json``). CHAIR_i = hallucinated mentions / all
mentions; CHAIR_s = captions with a hallucinated object / all captions. Each object counts once per
caption, as in the reference implementation.

POPE (Li et al., 2023): yes/no answers scored with the official rule (an answer containing the word
"no" or "not" is no, anything else yes); accuracy, precision, recall, F1 and yes-ratio.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headlab.errors import InputError

WORD = re.compile(r"[a-z]+")


def load_synonyms(path: str | Path) -> dict[str, str]:
    """``{word: canonical}`` from lines ``canonical[, synonym …]`` (headlab's synthetic set: one object a line)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"synonym file {path} does not exist: pass a file with one 'object, synonym, …' line each")
    table: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        words = [w.strip().lower() for w in line.split(",") if w.strip()]
        for w in words:
            table[w] = words[0]
    if not table:
        raise InputError(f"synonym file {path} is empty")
    return table


def load_coco_objects(path: str | Path) -> dict[str, set[str]]:
    """``{file_name: {object names}}`` from a COCO instances file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        names = {c["id"]: c["name"] for c in data["categories"]}
        files = {im["id"]: im["file_name"] for im in data["images"]}
        out: dict[str, set[str]] = {f: set() for f in files.values()}
        for ann in data["annotations"]:
            out[files[ann["image_id"]]].add(names[ann["category_id"]])
    except FileNotFoundError as err:
        raise InputError(f"annotation file {path} does not exist") from err
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise InputError(f"{path} is not a COCO instances file (images, categories, annotations): {err}") from err
    return out


def load_pope(path: str | Path) -> list[dict]:
    """POPE items (``image``, ``text``, ``label`` yes/no) from a JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"POPE file {path} does not exist")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            assert item["label"] in ("yes", "no") and "image" in item and "text" in item
        except (json.JSONDecodeError, KeyError, AssertionError, TypeError) as err:
            raise InputError(f"{path}:{n} is not a POPE item (image, text, label yes/no)") from err
        items.append(item)
    return items


def mentioned(caption: str, synonyms: dict[str, str]) -> list[str]:
    """Canonical objects named in ``caption``, in order of first mention, each once."""
    found: list[str] = []
    for word in WORD.findall(caption.lower()):
        name = synonyms.get(word) or (synonyms.get(word[:-1]) if word.endswith("s") else None)
        if name is not None and name not in found:
            found.append(name)
    return found


@dataclass
class ChairCounts:
    """Per caption: ``mentions`` and ``hallucinated`` object counts, ``length`` in words."""

    mentions: np.ndarray
    hallucinated: np.ndarray
    length: np.ndarray

    @property
    def chair_i(self) -> float:
        return float(self.hallucinated.sum() / max(1, self.mentions.sum()))

    @property
    def chair_s(self) -> float:
        return float((self.hallucinated > 0).mean()) if len(self.hallucinated) else 0.0

    def summary(self) -> dict:
        return {"chair_i": self.chair_i, "chair_s": self.chair_s, "captions": len(self.mentions),
                "mentions": int(self.mentions.sum()), "mean_length_words": float(self.length.mean())}


def chair(captions: Sequence[str], truth: Sequence[set[str]], synonyms: dict[str, str]) -> ChairCounts:
    if len(captions) != len(truth):
        raise InputError(f"{len(captions)} captions for {len(truth)} ground-truth object sets")
    mentions, halluc, length = [], [], []
    for caption, objects in zip(captions, truth, strict=True):
        names = mentioned(caption, synonyms)
        mentions.append(len(names))
        halluc.append(sum(n not in objects for n in names))
        length.append(len(caption.split()))
    return ChairCounts(np.array(mentions), np.array(halluc), np.array(length))


def pope_answer(text: str) -> str:
    """The official POPE rule: 'no' if the answer has the word no or not, else 'yes'."""
    words = set(WORD.findall(text.lower()))
    return "no" if words & {"no", "not"} else "yes"


def pope_metrics(answers: Sequence[str], labels: Sequence[str]) -> dict:
    pred = np.array([pope_answer(a) == "yes" for a in answers])
    gold = np.array([label == "yes" for label in labels])
    tp, fp = int((pred & gold).sum()), int((pred & ~gold).sum())
    fn, tn = int((~pred & gold).sum()), int((~pred & ~gold).sum())
    precision = tp / max(1, tp + fp)
    recall = tp / max(1, tp + fn)
    f1 = 2 * precision * recall / max(1e-12, precision + recall)
    return {"accuracy": (tp + tn) / max(1, len(pred)), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": float(pred.mean()) if len(pred) else 0.0, "n": len(pred)}


def paired_bootstrap_chair_i(base: ChairCounts, edited: ChairCounts, *, n: int = 2000, seed: int = 0,
                             level: float = 0.95) -> dict:
    """CHAIR_i(edited) − CHAIR_i(base) on the same images, with a percentile CI from resampling images."""
    if len(base.mentions) != len(edited.mentions):
        raise InputError("paired bootstrap: both runs must caption the same images")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(base.mentions), size=(n, len(base.mentions)))

    def ratio(c: ChairCounts) -> np.ndarray:
        return c.hallucinated[idx].sum(1) / np.maximum(1, c.mentions[idx].sum(1))

    diffs = ratio(edited) - ratio(base)
    lo, hi = np.quantile(diffs, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"delta": edited.chair_i - base.chair_i, "ci_low": float(lo), "ci_high": float(hi), "level": level,
            "n_images": len(base.mentions)}
