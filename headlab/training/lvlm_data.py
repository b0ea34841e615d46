"""Synthetic icon images of everyday objects, for training and testing ``llava-smol``.

Each 64×64 image is a 4×4 grid of 16×16 cells (one cell = one patch of the vision tower); 1–3 objects
are drawn in distinct random cells, chosen independently of each other, so the training captions hold
no co-occurrence. Objects come in partner pairs the language model's prior links ("a bat and a" →
" ball", measured P = 0.93 under SmolLM2-135M-Instruct); partners share neither shape nor colour, so a
partner named in a caption of an image without it comes from the prior, not from a visual confusion.

The same scenes are written as a COCO-style ``annotations.json`` (images, categories, one annotation
per object with its cell's bbox) + ``captions.json`` (COCO caption format) and POPE JSONL
(random / popular / adversarial) by :func:`write_dataset`, for CHAIR/POPE tests and the fixes issue.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

IMAGE_SIZE = 64
CELL = 16
GRID = IMAGE_SIZE // CELL  # 4 × 4 cells = 16 patches of 16 px

# (object, partner): the partner is the word SmolLM2 puts after "The image shows a {object} and a".
# P(partner | object) measured under SmolLM2-135M-Instruct's chat template (forward, reverse):
# bat→ball 0.93/0.19, cat→dog 0.11/0.33, pen→pencil 0.29/0.02, moon→star 0.15/0.01,
# lock→key 0.16/0.003, bottle→glass 0.29/0.05, house→tree 0.08/0.004, hat→coat 0.006/0.11.
PAIRS: tuple[tuple[str, str], ...] = (
    ("bat", "ball"), ("cat", "dog"), ("pen", "pencil"), ("moon", "star"),
    ("lock", "key"), ("bottle", "glass"), ("house", "tree"), ("hat", "coat"),
)
OBJECTS: tuple[str, ...] = tuple(word for pair in PAIRS for word in pair)
PARTNER: dict[str, str] = {a: b for a, b in PAIRS} | {b: a for a, b in PAIRS}

# One colour per object; partners never share one (checked in the tests).
COLOURS: dict[str, tuple[int, int, int]] = {
    "ball": (220, 30, 30), "bat": (139, 90, 43), "cat": (255, 140, 0), "dog": (30, 30, 30),
    "pen": (30, 60, 220), "pencil": (240, 220, 0), "moon": (200, 160, 30), "star": (0, 200, 220),
    "lock": (128, 128, 128), "key": (200, 0, 150), "bottle": (0, 160, 0), "glass": (120, 180, 255),
    "house": (120, 50, 170), "tree": (0, 90, 30), "hat": (255, 105, 180), "coat": (0, 128, 128),
}
# The outline each icon is drawn with (for the partner test: partners differ here too).
SHAPES: dict[str, str] = {
    "ball": "disc", "bat": "tapered bar", "cat": "head with pointed ears", "dog": "side-view body on legs",
    "pen": "thin vertical line", "pencil": "thick diagonal bar with tip", "moon": "crescent", "star": "five-point star",
    "lock": "box with shackle", "key": "ring with toothed shaft", "bottle": "body with neck", "glass": "cup on a stem",
    "house": "square with roof", "tree": "triangle on trunk", "hat": "brim with crown", "coat": "T with sleeves",
}

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # SmolLM2's default
CAPTION_PROMPT = "Describe the image."
QUESTION_PROMPT = "Is there a {obj} in the image? Answer yes or no."


def caption_text(objects: Sequence[str]) -> str:
    """``The image shows a bat, a cat and a moon.`` (objects in reading order)."""
    items = [f"a {o}" for o in objects]
    body = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return f"The image shows {body}."


@dataclass
class Scene:
    """One image's content: ``cells[i]`` is the cell (row·4 + col) of ``objects[i]``."""

    objects: list[str]
    cells: list[int]
    background: tuple[int, int, int] = (245, 245, 245)
    scale: float = 1.0  # icon size relative to its cell (weak images: small)
    contrast: float = 1.0  # 1 = the object's colour, 0 = the background colour (weak images: low)
    jitter: list[tuple[int, int]] = field(default_factory=list)

    def ordered(self) -> list[str]:
        """Objects in reading order (row-major by cell), as the captions list them."""
        return [o for _, o in sorted(zip(self.cells, self.objects, strict=True))]

    def cell_words(self) -> list[str | None]:
        """``[16]``: the object drawn in each patch, or None."""
        words: list[str | None] = [None] * (GRID * GRID)
        for o, c in zip(self.objects, self.cells, strict=True):
            words[c] = o
        return words


def random_scene(rng: random.Random, *, n_objects: Sequence[int] = (1, 2, 3), weak: bool = False,
                 exclude: Sequence[str] = (), include: Sequence[str] = ()) -> Scene:
    """Objects drawn independently (uniformly without replacement), in distinct random cells."""
    n = rng.choice(list(n_objects))
    pool = [o for o in OBJECTS if o not in exclude and o not in include]
    objects = list(include) + rng.sample(pool, max(0, n - len(include)))
    cells = rng.sample(range(GRID * GRID), len(objects))
    shade = rng.randint(225, 255)
    background = (shade + rng.randint(-10, 0), shade + rng.randint(-10, 0), shade)
    scale = rng.uniform(0.45, 0.6) if weak else rng.uniform(0.8, 1.0)
    contrast = rng.uniform(0.25, 0.45) if weak else 1.0
    jitter = [(rng.randint(-1, 1), rng.randint(-1, 1)) for _ in objects]
    return Scene(objects, cells, background, scale, contrast, jitter)


def _mix(colour: tuple[int, int, int], background: tuple[int, int, int], contrast: float) -> tuple[int, int, int]:
    return tuple(round(b + contrast * (c - b)) for c, b in zip(colour, background, strict=True))


def _draw_icon(draw: ImageDraw.ImageDraw, name: str, x0: float, y0: float, s: float,
               colour: tuple[int, int, int], background: tuple[int, int, int], contrast: float) -> None:
    """Draw ``name`` in the box (x0, y0, x0 + s, y0 + s). Coordinates below are fractions of s."""
    c = colour

    def P(*pts: float) -> list[tuple[float, float]]:
        return [(x0 + pts[i] * s, y0 + pts[i + 1] * s) for i in range(0, len(pts), 2)]

    def box(a: float, b: float, cc: float, d: float) -> list[float]:
        return [x0 + a * s, y0 + b * s, x0 + cc * s, y0 + d * s]

    w = max(1, round(s / 8))
    second = _mix((250, 250, 250), background, contrast)
    if name == "ball":
        draw.ellipse(box(0.1, 0.1, 0.9, 0.9), fill=c)
    elif name == "bat":
        draw.polygon(P(0.1, 0.8, 0.2, 0.9, 0.92, 0.25, 0.75, 0.08), fill=c)
    elif name == "cat":
        draw.ellipse(box(0.15, 0.3, 0.85, 0.95), fill=c)
        draw.polygon(P(0.15, 0.45, 0.2, 0.05, 0.45, 0.35), fill=c)
        draw.polygon(P(0.85, 0.45, 0.8, 0.05, 0.55, 0.35), fill=c)
    elif name == "dog":
        draw.rectangle(box(0.2, 0.4, 0.75, 0.65), fill=c)
        draw.rectangle(box(0.65, 0.15, 0.95, 0.45), fill=c)
        for lx in (0.22, 0.62):
            draw.rectangle(box(lx, 0.6, lx + 0.1, 0.95), fill=c)
        draw.line(P(0.2, 0.45, 0.05, 0.25), fill=c, width=w)
    elif name == "pen":
        draw.rectangle(box(0.45, 0.05, 0.55, 0.95), fill=c)
        draw.rectangle(box(0.4, 0.05, 0.6, 0.3), fill=c)
    elif name == "pencil":
        draw.polygon(P(0.05, 0.75, 0.25, 0.95, 0.9, 0.3, 0.7, 0.1), fill=c)
        draw.polygon(P(0.05, 0.75, 0.25, 0.95, 0.0, 1.0), fill=_mix((60, 40, 20), background, contrast))
    elif name == "moon":
        draw.ellipse(box(0.1, 0.1, 0.9, 0.9), fill=c)
        draw.ellipse(box(0.35, 0.0, 1.05, 0.75), fill=background)
    elif name == "star":
        import math

        pts = []
        for k in range(10):
            r = 0.48 if k % 2 == 0 else 0.2
            a = -math.pi / 2 + k * math.pi / 5
            pts += [0.5 + r * math.cos(a), 0.52 + r * math.sin(a)]
        draw.polygon(P(*pts), fill=c)
    elif name == "lock":
        draw.rectangle(box(0.15, 0.45, 0.85, 0.95), fill=c)
        draw.arc(box(0.27, 0.08, 0.73, 0.7), 180, 360, fill=c, width=w + 1)
        draw.line(P(0.3, 0.39, 0.3, 0.5), fill=c, width=w + 1)
        draw.line(P(0.7, 0.39, 0.7, 0.5), fill=c, width=w + 1)
    elif name == "key":
        draw.ellipse(box(0.05, 0.3, 0.45, 0.7), outline=c, width=w + 1)
        draw.rectangle(box(0.42, 0.44, 0.95, 0.56), fill=c)
        draw.rectangle(box(0.7, 0.56, 0.78, 0.75), fill=c)
        draw.rectangle(box(0.85, 0.56, 0.93, 0.8), fill=c)
    elif name == "bottle":
        draw.rectangle(box(0.28, 0.4, 0.72, 0.97), fill=c)
        draw.rectangle(box(0.42, 0.05, 0.58, 0.42), fill=c)
    elif name == "glass":
        draw.polygon(P(0.15, 0.05, 0.85, 0.05, 0.6, 0.5, 0.4, 0.5), fill=c)
        draw.rectangle(box(0.46, 0.5, 0.54, 0.85), fill=c)
        draw.rectangle(box(0.25, 0.85, 0.75, 0.95), fill=c)
    elif name == "house":
        draw.rectangle(box(0.15, 0.45, 0.85, 0.95), fill=c)
        draw.polygon(P(0.05, 0.5, 0.5, 0.05, 0.95, 0.5), fill=c)
        draw.rectangle(box(0.42, 0.65, 0.58, 0.95), fill=second)
    elif name == "tree":
        draw.polygon(P(0.5, 0.02, 0.1, 0.7, 0.9, 0.7), fill=c)
        draw.rectangle(box(0.42, 0.7, 0.58, 0.98), fill=_mix((110, 70, 30), background, contrast))
    elif name == "hat":
        draw.rectangle(box(0.05, 0.72, 0.95, 0.85), fill=c)
        draw.rectangle(box(0.25, 0.15, 0.75, 0.75), fill=c)
    elif name == "coat":
        draw.polygon(P(0.3, 0.1, 0.7, 0.1, 0.95, 0.3, 0.85, 0.45, 0.72, 0.35, 0.72, 0.95, 0.28, 0.95,
                       0.28, 0.35, 0.15, 0.45, 0.05, 0.3), fill=c)
    else:  # pragma: no cover - OBJECTS is closed
        raise ValueError(name)


def render(scene: Scene) -> Image.Image:
    """The scene as a 64×64 RGB image."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), scene.background)
    draw = ImageDraw.Draw(image)
    jitter = scene.jitter or [(0, 0)] * len(scene.objects)
    for name, cell, (dx, dy) in zip(scene.objects, scene.cells, jitter, strict=True):
        size = (CELL - 2) * scene.scale
        x0 = (cell % GRID) * CELL + (CELL - size) / 2 + dx
        y0 = (cell // GRID) * CELL + (CELL - size) / 2 + dy
        colour = _mix(COLOURS[name], scene.background, scene.contrast)
        _draw_icon(draw, name, x0, y0, size, colour, scene.background, scene.contrast)
    return image


@dataclass
class Sample:
    """One training/eval example: the image, the user prompt and the assistant's answer."""

    scene: Scene
    prompt: str
    answer: str
    kind: str  # "caption" or "question"
    asked: str | None = None  # the object a question asks about


def make_sample(rng: random.Random, *, question_rate: float = 0.4, weak: bool = False) -> Sample:
    """A caption (60%) or a yes/no question (40%, half about a present object, half about an absent one)."""
    scene = random_scene(rng, weak=weak)
    if rng.random() >= question_rate:
        return Sample(scene, CAPTION_PROMPT, caption_text(scene.ordered()), "caption")
    if rng.random() < 0.5:
        obj, answer = rng.choice(scene.objects), "Yes."
    else:
        obj, answer = rng.choice([o for o in OBJECTS if o not in scene.objects]), "No."
    return Sample(scene, QUESTION_PROMPT.format(obj=obj), answer, "question", obj)


def sample_stream(seed: int, **kwargs) -> Iterator[Sample]:
    rng = random.Random(seed)
    while True:
        yield make_sample(rng, **kwargs)


def eval_scenes(kind: str, n: int, seed: int = 1234) -> list[Scene]:
    """Held-out scenes: ``in-distribution``; ``partner-missing`` (one object of a pair is present, its
    partner is absent: where the prior can speak); ``weak`` (small, low-contrast icons)."""
    rng = random.Random(f"{kind}-{seed}")
    if kind == "in-distribution":
        return [random_scene(rng) for _ in range(n)]
    if kind == "weak":
        return [random_scene(rng, weak=True) for _ in range(n)]
    if kind == "partner-missing":
        scenes = []
        for i in range(n):
            anchor = OBJECTS[i % len(OBJECTS)]
            scenes.append(random_scene(rng, n_objects=(1, 2), include=[anchor], exclude=[PARTNER[anchor]]))
        return scenes
    raise ValueError(f"unknown eval set {kind!r}: in-distribution, partner-missing or weak")


# ---------------------------------------------------------------------------------------------
# COCO-style and POPE files


def pope_questions(scenes: Sequence[Scene], split: str, rng: random.Random, per_image: int = 3) -> list[dict]:
    """POPE-style items per image: ``per_image`` present objects (as many as there are) answered yes and as many
    absent ones answered no, the absent ones chosen at random, by frequency (popular) or by co-occurrence
    (adversarial: the partner first, as POPE uses co-occurring objects)."""
    counts = {o: 0 for o in OBJECTS}
    for s in scenes:
        for o in s.objects:
            counts[o] += 1
    popular = sorted(OBJECTS, key=lambda o: (-counts[o], o))
    items = []
    for index, scene in enumerate(scenes):
        present = scene.objects[:per_image]
        absent_pool = [o for o in OBJECTS if o not in scene.objects]
        if split == "random":
            absent = rng.sample(absent_pool, len(present))
        elif split == "popular":
            absent = [o for o in popular if o in absent_pool][:len(present)]
        elif split == "adversarial":
            partners = [PARTNER[o] for o in scene.objects if PARTNER[o] in absent_pool]
            rest = [o for o in popular if o in absent_pool and o not in partners]
            absent = (partners + rest)[:len(present)]
        else:
            raise ValueError(f"unknown POPE split {split!r}: random, popular or adversarial")
        for obj, label in [(o, "yes") for o in present] + [(o, "no") for o in absent]:
            items.append({"question_id": len(items) + 1, "image": f"{index:05d}.png",
                          "text": f"Is there a {obj} in the image?", "label": label, "object": obj})
    return items


# The icons whose real name is a COCO compound that CHAIR's two-word rules keep whole ("baseball bat" is not
# read as "bat" unless the list says so).
COCO_NAMES = {"bat": "baseball bat", "ball": "sports ball", "glass": "wine glass"}


def synonym_lines() -> list[str]:
    """The synthetic set's CHAIR list: one line per icon (with its COCO category's words where there is one),
    then headlab's COCO list for every other category. The icons are the whole truth of an image, so any other
    object a caption names is a hallucination: a caption saying "a chair" or "a person" for a faint image counts
    as one, which a list of the 16 icons alone would miss."""
    from importlib import resources

    from headlab.bundled import COCO_SYNONYMS

    coco: dict[str, list[str]] = {}
    text = resources.files("headlab").joinpath("data", COCO_SYNONYMS).read_text(encoding="utf-8")
    for line in text.splitlines():
        words = [w.strip() for w in line.split(",") if w.strip()]
        if words and not line.lstrip().startswith("#"):
            coco[words[0]] = words
    own: list[list[str]] = []
    for obj in OBJECTS:
        category = COCO_NAMES.get(obj, obj)
        own.append(list(dict.fromkeys([obj, *coco.pop(category, [])])))
    taken = {w for words in own for w in words}
    rest = [[w for w in words if w not in taken] for words in coco.values()]
    return ["# headlab's synthetic icons (their own lines first), then headlab's COCO list for everything else"] + \
        [", ".join(words) for words in own + rest if words]


def write_dataset(folder: Path, scenes: Sequence[Scene], *, seed: int = 0) -> dict[str, Path]:
    """Write ``images/*.png``, ``annotations.json`` (COCO instances), ``captions.json`` (COCO captions),
    ``pope_{random,popular,adversarial}.jsonl`` and ``synonyms.txt`` (:func:`synonym_lines`) into ``folder``,
    atomically (a temporary folder renamed when complete)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "images").mkdir(parents=True)
    categories = [{"id": i + 1, "name": o, "supercategory": "icon"} for i, o in enumerate(OBJECTS)]
    cat_id = {o: i + 1 for i, o in enumerate(OBJECTS)}
    images, annotations, captions = [], [], []
    for index, scene in enumerate(scenes):
        name = f"{index:05d}.png"
        render(scene).save(tmp / "images" / name)
        images.append({"id": index, "file_name": name, "width": IMAGE_SIZE, "height": IMAGE_SIZE})
        for obj, cell in zip(scene.objects, scene.cells, strict=True):
            x, y = (cell % GRID) * CELL, (cell // GRID) * CELL
            annotations.append({"id": len(annotations) + 1, "image_id": index, "category_id": cat_id[obj],
                                "bbox": [x, y, CELL, CELL], "area": CELL * CELL, "iscrowd": 0})
        captions.append({"id": index + 1, "image_id": index, "caption": caption_text(scene.ordered())})
    info = {"description": "headlab synthetic icons (llava-smol)", "version": "1"}
    (tmp / "annotations.json").write_text(json.dumps({"info": info, "images": images, "annotations": annotations,
                                                      "categories": categories}))
    (tmp / "captions.json").write_text(json.dumps({"info": info, "images": images, "annotations": captions}))
    rng = random.Random(seed)
    for split in ("random", "popular", "adversarial"):
        lines = [json.dumps(item) for item in pope_questions(scenes, split, rng)]
        (tmp / f"pope_{split}.jsonl").write_text("\n".join(lines) + "\n")
    (tmp / "synonyms.txt").write_text("".join(line + "\n" for line in synonym_lines()))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return {"images": folder / "images", "annotations": folder / "annotations.json",
            "captions": folder / "captions.json", "synonyms": folder / "synonyms.txt",
            **{f"pope_{s}": folder / f"pope_{s}.jsonl" for s in ("random", "popular", "adversarial")}}


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m headlab.training.lvlm_data OUT [--kind partner-missing] [--n 500]``: write a synthetic set."""
    import argparse

    parser = argparse.ArgumentParser(description="Write headlab's synthetic icon set (COCO-style + POPE JSONL).")
    parser.add_argument("out", type=Path)
    parser.add_argument("--kind", default="in-distribution", choices=["in-distribution", "partner-missing", "weak"])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    files = write_dataset(args.out, eval_scenes(args.kind, args.n, args.seed))
    print("\n".join(f"{k}: {v}" for k, v in files.items()))


if __name__ == "__main__":
    main()
