"""Build POPE question files from COCO-style annotations (Li et al., EMNLP 2023), seeded.

As the POPE repository builds them: the images with at least ``per_image`` (3) distinct segmentation
categories are eligible (optionally a seeded sample of ``n_images`` of them; the paper uses 500); for each
image, in turn, the i-th of its first ``per_image`` categories (annotation order) is asked about with label
yes, followed by one absent category with label no, so an image gets 3 yes + 3 no questions. Absent
categories, never one the image has nor one already asked about that image:

- ``random``: uniform over the categories that occur in the chosen images;
- ``popular``: the categories in most chosen images first (ties: first seen first);
- ``adversarial``: the categories that co-occur most often (in the chosen images) with the positive just
  asked (``adversarial="per-object"``, the repository's rule), or, ``"image-total"``, with all the image's
  categories together (summed counts); when none is left, a random one, as the repository does.

Question: ``Is there a {} in the image?`` with "an" before a vowel sound. Each split is written as JSONL
``{"question_id", "image", "image_id", "text", "label", "object"}`` (question ids from 1 per file).
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from headlab.analyses.hallucination_metrics import find_coco_files, read_coco_json
from headlab.errors import InputError

TEMPLATE = "Is there a {} in the image?"
SPLITS = ("random", "popular", "adversarial")
ADVERSARIAL = ("per-object", "image-total")

# Words whose first letter misleads about the sound: "a unicorn", "an hour".
_YOU_SOUND = ("uni", "use", "usu", "uten", "eu", "ewe", "one", "once", "ubiq", "ukulele", "urin")
_SILENT_H = ("hour", "honest", "honor", "honour", "heir")


def article(noun: str) -> str:
    """"a" or "an" for ``noun`` by its first sound (vowel letter, except "you"/"one" sounds; silent h)."""
    w = noun.strip().lower()
    if w.startswith(_SILENT_H):
        return "an"
    if w.startswith(_YOU_SOUND):
        return "a"
    return "an" if w[:1] in ("a", "e", "i", "o", "u") else "a"


def question_text(obj: str, template: str = TEMPLATE) -> str:
    """``template`` filled with ``obj``; its " a {}" becomes " an {}" before a vowel sound."""
    if "{}" not in template:
        raise InputError(f"POPE template {template!r} needs a '{{}}' where the object goes")
    return re.sub(r"\ba \{\}", f"{article(obj)} {{}}", template).format(obj)


@dataclass
class PopeImage:
    """An image and its distinct segmentation categories, in annotation order."""

    image: str
    image_id: int | str
    objects: list[str]


def coco_images(folder: str | Path) -> list[PopeImage]:
    """Images of a COCO-style folder's instances file(s) (``instances_*.json`` or headlab's
    ``annotations.json``), in the files' image order, with their categories in annotation order."""
    files = find_coco_files(folder)["instances"]
    if not files:
        raise InputError(f"{folder} has no instances_*.json or annotations.json: POPE needs segmentation "
                         "categories (captions are not used)")
    images: dict[str, PopeImage] = {}
    for path in files:
        data = read_coco_json(path, "instances")
        try:
            names = {c["id"]: c["name"] for c in data["categories"]}
            by_id: dict[str, PopeImage] = {}
            for im in data["images"]:
                entry = images.setdefault(im["file_name"], PopeImage(im["file_name"], im["id"], []))
                by_id[str(im["id"])] = entry
            for ann in data["annotations"]:
                entry = by_id[str(ann["image_id"])]
                name = names[ann["category_id"]]
                if name not in entry.objects:
                    entry.objects.append(name)
        except (KeyError, TypeError) as err:
            raise InputError(f"{path} is not a COCO instances file (images, categories, annotations): "
                             f"missing {err}") from err
    return list(images.values())


@dataclass
class PopeSet:
    """The questions of each split, the images used (in order) and how they were built."""

    questions: dict[str, list[dict]]
    images: list[str]
    image_ids: list
    config: dict = field(default_factory=dict)

    def write(self, folder: str | Path) -> dict[str, Path]:
        """``pope_{split}.jsonl`` per split and ``pope_build.json`` (config + images) into ``folder``; each
        file is written to a temporary name and renamed when complete."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        out: dict[str, Path] = {}
        texts = {f"pope_{s}.jsonl": "".join(json.dumps(q) + "\n" for q in qs) for s, qs in self.questions.items()}
        texts["pope_build.json"] = json.dumps({"config": self.config, "images": self.images,
                                               "image_ids": self.image_ids}, indent=1)
        for name, text in texts.items():
            tmp = folder / (name + ".tmp")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, folder / name)
            out[name.split(".")[0]] = folder / name
        return out


def _negative(candidates: Sequence[str], taken: set[str], rng: random.Random, pool: Sequence[str]) -> str:
    """The first of ``candidates`` not taken, else a uniform draw from ``pool`` minus taken."""
    for c in candidates:
        if c not in taken:
            return c
    free = [c for c in pool if c not in taken]
    if not free:
        raise InputError("POPE: an image has no absent category left to ask about: use images with fewer "
                         "categories or a set with more categories")
    return rng.choice(free)


def build_pope(images: Sequence[PopeImage], *, n_images: int | None = None, per_image: int = 3, seed: int = 0,
               template: str = TEMPLATE, splits: Sequence[str] = SPLITS,
               adversarial: str = "per-object") -> PopeSet:
    """POPE questions for ``splits`` from ``images`` (see the module docstring). ``n_images``: a seeded sample
    of the eligible images (None: all, in order)."""
    if per_image < 1:
        raise InputError(f"POPE: per_image must be at least 1, got {per_image}")
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        raise InputError(f"POPE split {bad[0] if bad else None!r}: use {', '.join(SPLITS)}")
    if adversarial not in ADVERSARIAL:
        raise InputError(f"adversarial sampling {adversarial!r}: use {', '.join(ADVERSARIAL)}")
    question_text("x", template)
    eligible = [im for im in images if len(im.objects) >= per_image]
    if not eligible:
        raise InputError(f"POPE: no image has {per_image} or more object categories")
    if n_images is not None:
        if n_images > len(eligible) or n_images < 1:
            raise InputError(f"POPE: {n_images} images asked for, {len(eligible)} have {per_image} or more "
                             "object categories")
        eligible = random.Random(f"{seed}:images").sample(eligible, n_images)
    # Frequencies and co-occurrences over the chosen images (dicts keep first-seen order for ties).
    frequency: dict[str, int] = {}
    cooccur: dict[str, dict[str, int]] = {}
    for im in eligible:
        for o in im.objects:
            frequency[o] = frequency.get(o, 0) + 1
            row = cooccur.setdefault(o, {})
            for other in im.objects:
                if other != o:
                    row[other] = row.get(other, 0) + 1
    pool = list(frequency)
    popular = sorted(pool, key=lambda o: -frequency[o])
    ranked = {o: sorted(row, key=lambda x: -row[x]) for o, row in cooccur.items()}
    questions: dict[str, list[dict]] = {}
    for split in splits:
        rng = random.Random(f"{seed}:{split}")
        items: list[dict] = []
        for im in eligible:
            taken = set(im.objects)
            image_total: list[str] = []
            if split == "adversarial" and adversarial == "image-total":
                scores: dict[str, int] = {}
                for o in im.objects:
                    for other, count in cooccur[o].items():
                        scores[other] = scores.get(other, 0) + count
                image_total = sorted(scores, key=lambda x: -scores[x])
            for positive in im.objects[:per_image]:
                if split == "random":
                    negative = _negative((), taken, rng, pool)
                elif split == "popular":
                    negative = _negative(popular, taken, rng, pool)
                elif adversarial == "per-object":
                    negative = _negative(ranked[positive], taken, rng, pool)
                else:
                    negative = _negative(image_total, taken, rng, pool)
                taken.add(negative)
                for obj, label in ((positive, "yes"), (negative, "no")):
                    items.append({"question_id": len(items) + 1, "image": im.image, "image_id": im.image_id,
                                  "text": question_text(obj, template), "label": label, "object": obj})
        questions[split] = items
    config = {"seed": seed, "n_images": len(eligible), "per_image": per_image, "template": template,
              "adversarial": adversarial, "splits": list(splits), "eligible_images": len(
                  [im for im in images if len(im.objects) >= per_image]), "categories": len(pool)}
    return PopeSet(questions, [im.image for im in eligible], [im.image_id for im in eligible], config)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m headlab.analyses.pope_build COCO_FOLDER OUT [--n-images 500] [--seed 0]``."""
    import argparse

    parser = argparse.ArgumentParser(description="Build POPE question files (random/popular/adversarial).")
    parser.add_argument("folder", type=Path, help="COCO-style folder with instances_*.json or annotations.json")
    parser.add_argument("out", type=Path)
    parser.add_argument("--n-images", type=int, default=None, help="seeded sample of eligible images (paper: 500)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--adversarial", default="per-object", choices=ADVERSARIAL)
    args = parser.parse_args(argv)
    built = build_pope(coco_images(args.folder), n_images=args.n_images, seed=args.seed, adversarial=args.adversarial)
    print("\n".join(f"{k}: {v}" for k, v in built.write(args.out).items()))


if __name__ == "__main__":
    main()
