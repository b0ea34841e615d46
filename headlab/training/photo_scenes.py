"""Photo scenes for ``llava-real``: real cut-out photographs pasted onto real backgrounds, with exact object lists.

Objects are the stamps of Debian's ``tuxpaint-stamps-default`` (GPL-2; read from the installed package at run
time, never copied into this repository): photographs and drawings cut out on a transparent background, each
with a one-line English caption. Backgrounds are scikit-image's sample photographs (public domain / CC0) and the
photographs in Debian's ``opencv-doc``, cropped at random. 2–4 cut-outs pasted at random places and sizes give
a 224×224 scene whose objects, boxes and per-patch masks are known exactly.

**Co-occurrence on purpose.** The 22 objects include 6 partner pairs that SmolLM2 already links (after "The image
shows a dog and a", P(" cat") = 0.33; bee→butterfly 0.10, strawberry→lemon 0.12, saw→hammer 0.05,
chicken→pig 0.06, drum→guitar 0.07, measured under its chat template); partners differ in shape and colour.
Training scenes add an object's partner with probability ``pair_rate`` (0.8), as COCO's co-occurrences do
("fork" beside "knife"), so a model can learn to say the partner from the anchor's presence.
"""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from headlab.errors import ModelFilesError

IMAGE_SIZE = 224
PATCH = 14
GRID = IMAGE_SIZE // PATCH  # 16 × 16 = 256 patches
STAMPS_DIR = Path("/usr/share/tuxpaint/stamps")
STAMPS_INSTALL = "apt-get install tuxpaint-stamps-default"
OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")

# word -> stamp files (relative to STAMPS_DIR). Every word is one SmolLM2 token after a space.
OBJECTS: dict[str, tuple[str, ...]] = {
    "dog": ("animals/mammals/dogs/dog.png",),
    "cat": ("seasonal/halloween/blackcat.png",),
    "bee": ("animals/insects/bee.png",),
    "butterfly": ("animals/insects/cartoon/butterfly.png", "seasonal/easter/butterfly.png"),
    "strawberry": ("food/fruit/strawberry.png", "food/fruit/Strawberry2.png", "food/fruit/cartoon/strawberry.png"),
    "lemon": ("food/fruit/lemon.png", "food/fruit/cartoon/lemon.png"),
    "saw": ("household/tools/saw.png",),
    "hammer": ("household/tools/hammer.png", "household/tools/mallet_metal.png"),
    "chicken": ("animals/birds/chicken_profile.png", "animals/birds/hen.png", "animals/birds/rooster.png"),
    "pig": ("animals/mammals/pig.png", "animals/mammals/pig_golden.png", "animals/mammals/pig_golden2.png"),
    "drum": ("hobbies/music/percussion/drum_tomtom_floor.png", "hobbies/music/percussion/drumkit.png"),
    "guitar": ("hobbies/music/string/guitar_classical.png", "hobbies/music/string/guitar_electric.png",
               "hobbies/music/string/guitar2.png"),
    "elephant": ("animals/mammals/elephant.png",),
    "giraffe": ("animals/mammals/giraffe.png",),
    "apple": ("food/fruit/apple_red.png", "food/fruit/apple_green.png", "food/fruit/apple_fuji.png"),
    "banana": ("food/fruit/banana.png", "food/fruit/cartoon/banana.png"),
    "carrot": ("food/vegetables/carrot.png",),
    "key": ("household/key.png",),
    "camera": ("hobbies/camera_35mm.png",),
    "owl": ("animals/birds/owl.png",),
    "frog": ("animals/amphibians/frog.png", "animals/amphibians/frog-1.png"),
    "truck": ("vehicles/auto/truck.png",),
}
WORDS: tuple[str, ...] = tuple(OBJECTS)
PAIRS: tuple[tuple[str, str], ...] = (
    ("dog", "cat"), ("bee", "butterfly"), ("strawberry", "lemon"), ("saw", "hammer"), ("chicken", "pig"),
    ("drum", "guitar"),
)
PARTNER: dict[str, str] = {a: b for a, b in PAIRS} | {b: a for a, b in PAIRS}

CAPTION_PROMPT = "Describe the image."
QUESTION_PROMPT = "Is there {article} {obj} in the image? Answer yes or no."

# Background photographs: scikit-image's samples (by function name) and opencv-doc's (by file name). None shows
# any of the objects above.
SKIMAGE_BACKGROUNDS = ("brick", "grass", "gravel", "moon", "hubble_deep_field", "rocket", "immunohistochemistry",
                       "text", "page", "coins")
OPENCV_BACKGROUNDS = ("building.jpg", "starry_night.jpg", "leuvenA.jpg", "home.jpg", "aero1.jpg", "aero3.jpg",
                      "graf1.png", "board.jpg", "box_in_scene.png", "blox.jpg")


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_text(objects: Sequence[str]) -> str:
    """``The image shows a dog, an apple and a key.`` (objects left to right)."""
    items = [f"{article(o)} {o}" for o in objects]
    body = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return f"The image shows {body}."


def question_text(obj: str) -> str:
    return QUESTION_PROMPT.format(article=article(obj), obj=obj)


def stamps_dir() -> Path:
    missing = [w for w, files in OBJECTS.items() if not (STAMPS_DIR / files[0]).is_file()]
    if missing:
        raise ModelFilesError(f"llava-real's photos come from Debian's tuxpaint-stamps-default, which is not installed "
                              f"here ({STAMPS_DIR / OBJECTS[missing[0]][0]} is missing): run `{STAMPS_INSTALL}`")
    return STAMPS_DIR


@functools.lru_cache(maxsize=64)
def _stamp(path: str) -> Image.Image:
    """The stamp as RGBA, trimmed to its opaque pixels."""
    image = Image.open(stamps_dir() / path).convert("RGBA")
    box = image.getchannel("A").point(lambda a: 255 if a > 16 else 0).getbbox()
    return image.crop(box) if box else image


@functools.lru_cache(maxsize=1)
def backgrounds() -> tuple[tuple[str, np.ndarray], ...]:
    """``(name, [h, w, 3] uint8)`` background photographs (at least 256 px on the short side)."""
    import skimage.data

    found = []
    for name in SKIMAGE_BACKGROUNDS:
        try:
            array = np.asarray(getattr(skimage.data, name)())
        except Exception:  # noqa: BLE001 - a sample this scikit-image cannot provide is left out
            continue
        found.append((f"skimage:{name}", array))
    for name in OPENCV_BACKGROUNDS:
        if (OPENCV_DATA / name).is_file():
            found.append((f"opencv:{name}", np.asarray(Image.open(OPENCV_DATA / name).convert("RGB"))))
    out = []
    for name, array in found:
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=2)
        image = Image.fromarray(array[..., :3].astype(np.uint8))
        short = min(image.size)
        if short < 256:
            image = image.resize((round(image.width * 256 / short), round(image.height * 256 / short)))
        out.append((name, np.asarray(image)))
    if not out:
        raise ModelFilesError("no background photographs found: install scikit-image (`pip install scikit-image`)")
    return tuple(out)


@dataclass
class Placement:
    """One pasted object: its word, which stamp, its box ``(x0, y0, x1, y1)`` in pixels, mirrored or not."""

    word: str
    stamp: str
    box: tuple[int, int, int, int]
    flip: bool = False


@dataclass
class PhotoScene:
    background: int  # index into :func:`backgrounds`
    crop: tuple[int, int, int]  # x, y, side of the square cut from the background
    placements: list[Placement] = field(default_factory=list)

    @property
    def objects(self) -> list[str]:
        """Objects left to right (by box centre), as captions list them."""
        return [p.word for p in sorted(self.placements, key=lambda p: (p.box[0] + p.box[2], p.box[1]))]

    def to_json(self) -> dict:
        return {"background": backgrounds()[self.background][0], "crop": list(self.crop),
                "objects": [{"word": p.word, "stamp": p.stamp, "box": list(p.box), "flip": p.flip}
                            for p in self.placements]}


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over the smaller box's area."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    small = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return w * h / small


def choose_objects(rng: random.Random, *, pair_rate: float = 0.8, n_seeds: Sequence[int] = (1, 2, 3),
                   include: Sequence[str] = (), exclude: Sequence[str] = (), max_objects: int = 4) -> list[str]:
    """Seed objects drawn uniformly, each followed by its partner with probability ``pair_rate``."""
    words = list(include)
    pool = [w for w in WORDS if w not in exclude and w not in words]
    for seed in rng.sample(pool, min(len(pool), max(0, rng.choice(list(n_seeds)) - len(words)))):
        if len(words) >= max_objects:
            break
        if seed not in words:
            words.append(seed)
    for w in list(words):
        partner = PARTNER.get(w)
        if partner and partner not in words and partner not in exclude and len(words) < max_objects \
                and rng.random() < pair_rate:
            words.append(partner)
    return words


def place(rng: random.Random, words: Sequence[str], *, size: tuple[int, int] = (56, 112)) -> PhotoScene:
    """Objects at random places (boxes overlapping by at most 20% of the smaller) on a random background crop."""
    bgs = backgrounds()
    index = rng.randrange(len(bgs))
    height, width = bgs[index][1].shape[:2]
    side = rng.randint(min(256, min(height, width)), min(height, width))
    crop = (rng.randint(0, width - side), rng.randint(0, height - side), side)
    placements: list[Placement] = []
    for word in words:
        stamp = rng.choice(OBJECTS[word])
        image = _stamp(stamp)
        for _ in range(50):
            long_side = rng.randint(*size)
            scale = long_side / max(image.size)
            w, h = max(8, round(image.width * scale)), max(8, round(image.height * scale))
            x0, y0 = rng.randint(0, IMAGE_SIZE - w), rng.randint(0, IMAGE_SIZE - h)
            box = (x0, y0, x0 + w, y0 + h)
            if all(_overlap(box, p.box) <= 0.2 for p in placements):
                placements.append(Placement(word, stamp, box, rng.random() < 0.5))
                break
    return PhotoScene(index, crop, placements)


def random_scene(rng: random.Random, **kwargs) -> PhotoScene:
    return place(rng, choose_objects(rng, **kwargs))


def render(scene: PhotoScene) -> tuple[Image.Image, np.ndarray]:
    """``(image, labels)``: the 224×224 RGB scene and ``[256]`` per-patch labels (index into :data:`WORDS` of the
    object covering most of the 14×14 patch, if it covers at least 30% of it; else −1)."""
    _, array = backgrounds()[scene.background]
    x, y, side = scene.crop
    canvas = Image.fromarray(array[y:y + side, x:x + side]).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    coverage = np.zeros((len(scene.placements), IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for k, p in enumerate(scene.placements):
        stamp = _stamp(p.stamp)
        if p.flip:
            stamp = stamp.transpose(Image.FLIP_LEFT_RIGHT)
        stamp = stamp.resize((p.box[2] - p.box[0], p.box[3] - p.box[1]), Image.LANCZOS)
        canvas.paste(stamp, p.box[:2], stamp)
        alpha = np.asarray(stamp.getchannel("A"), dtype=np.float32) / 255.0
        coverage[:, p.box[1]:p.box[3], p.box[0]:p.box[2]] *= 1.0 - alpha  # later pastes hide earlier ones
        coverage[k, p.box[1]:p.box[3], p.box[0]:p.box[2]] = alpha
    per_patch = coverage.reshape(len(scene.placements), GRID, PATCH, GRID, PATCH).mean(axis=(2, 4)).reshape(
        len(scene.placements), -1)  # [objects, 256]
    labels = np.full(GRID * GRID, -1, dtype=np.int64)
    if len(scene.placements):
        best = per_patch.argmax(0)
        covered = per_patch.max(0) >= 0.3
        ids = np.array([WORDS.index(p.word) for p in scene.placements])
        labels[covered] = ids[best[covered]]
    return canvas.convert("RGB"), labels


@dataclass
class PhotoSample:
    scene: PhotoScene
    prompt: str
    answer: str
    kind: str  # "caption" or "question"


def make_sample(rng: random.Random, scene: PhotoScene, question_rate: float = 0.35) -> PhotoSample:
    """A caption, or a yes/no question (half about a present object, half about an absent one drawn uniformly)."""
    present = [p.word for p in scene.placements]
    if rng.random() >= question_rate or not present:
        return PhotoSample(scene, CAPTION_PROMPT, caption_text(scene.objects), "caption")
    if rng.random() < 0.5:
        return PhotoSample(scene, question_text(rng.choice(present)), "Yes.", "question")
    return PhotoSample(scene, question_text(rng.choice([w for w in WORDS if w not in present])), "No.", "question")


def eval_scenes(kind: str, n: int, seed: int = 4321) -> list[PhotoScene]:
    """Held-out scenes. ``in-distribution``: drawn as training draws them. ``partner-missing``: one object of each
    pair in turn with its partner absent, plus 1–2 other objects (never a pair): where only the prior can name
    the partner."""
    rng = random.Random(f"{kind}-{seed}")
    if kind == "in-distribution":
        return [random_scene(rng) for _ in range(n)]
    if kind == "partner-missing":
        anchors = [w for pair in PAIRS for w in pair]
        scenes = []
        for i in range(n):
            anchor = anchors[i % len(anchors)]
            others = [w for w in WORDS if w not in PARTNER]
            words = [anchor] + rng.sample(others, rng.choice([1, 2]))
            scenes.append(place(rng, words))
        return scenes
    raise ValueError(f"unknown eval set {kind!r}: in-distribution or partner-missing")


# ---------------------------------------------------------------------------------------------
# COCO-style and POPE files


def pope_questions(scenes: Sequence[PhotoScene], split: str, rng: random.Random, per_image: int = 3) -> list[dict]:
    """POPE items: up to ``per_image`` present objects (yes) and as many absent ones (no), the absent ones drawn at
    random, by training frequency (popular), or co-occurring first (adversarial: partners of present objects)."""
    counts = {w: 0 for w in WORDS}
    for s in scenes:
        for p in s.placements:
            counts[p.word] += 1
    popular = sorted(WORDS, key=lambda w: (-counts[w], w))
    items = []
    for index, scene in enumerate(scenes):
        words = [p.word for p in scene.placements]
        present = list(dict.fromkeys(words))[:per_image]
        absent_pool = [w for w in WORDS if w not in words]
        if split == "random":
            absent = rng.sample(absent_pool, len(present))
        elif split == "popular":
            absent = [w for w in popular if w in absent_pool][:len(present)]
        elif split == "adversarial":
            partners = [PARTNER[w] for w in words if w in PARTNER and PARTNER[w] in absent_pool]
            rest = [w for w in popular if w in absent_pool and w not in partners]
            absent = (list(dict.fromkeys(partners)) + rest)[:len(present)]
        else:
            raise ValueError(f"unknown POPE split {split!r}: random, popular or adversarial")
        for obj, label in [(o, "yes") for o in present] + [(o, "no") for o in absent]:
            items.append({"question_id": len(items) + 1, "image": f"{index:05d}.png",
                          "text": f"Is there {article(obj)} {obj} in the image?", "label": label, "object": obj})
    return items


def synonym_lines() -> list[str]:
    """CHAIR's word list for these scenes: one line per object (its word and plural), then headlab's COCO list for
    everything else (any other object a caption names is a hallucination too)."""
    from importlib import resources

    from headlab.bundled import COCO_SYNONYMS

    plural = {"butterfly": "butterflies", "strawberry": "strawberries", "chicken": "chickens, hen, rooster",
              "hammer": "hammers, mallet", "truck": "trucks, pickup truck"}
    own = [[w] + [s.strip() for s in plural.get(w, w + "s").split(",")] for w in WORDS]
    taken = {w for words in own for w in words}
    lines = []
    text = resources.files("headlab").joinpath("data", COCO_SYNONYMS).read_text(encoding="utf-8")
    for line in text.splitlines():
        words = [w.strip() for w in line.split(",") if w.strip() and w.strip() not in taken]
        if words and not line.lstrip().startswith("#"):
            lines.append(", ".join(words))
    return ["# llava-real's photo objects (their own lines first), then headlab's COCO list for everything else"] + \
        [", ".join(words) for words in own] + lines


def write_dataset(folder: Path, scenes: Sequence[PhotoScene], *, seed: int = 0) -> dict[str, Path]:
    """``images/*.png``, ``annotations.json`` (COCO instances, boxes as pasted), ``captions.json``,
    ``pope_{random,popular,adversarial}.jsonl`` and ``synonyms.txt``, written to a temporary folder and renamed.
    The images are made from the installed stamps at run time: keep them out of version control (GPL-2)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "images").mkdir(parents=True)
    cat_id = {w: i + 1 for i, w in enumerate(WORDS)}
    images, annotations, captions = [], [], []
    for index, scene in enumerate(scenes):
        name = f"{index:05d}.png"
        render(scene)[0].save(tmp / "images" / name)
        images.append({"id": index, "file_name": name, "width": IMAGE_SIZE, "height": IMAGE_SIZE})
        for p in scene.placements:
            x0, y0, x1, y1 = p.box
            annotations.append({"id": len(annotations) + 1, "image_id": index, "category_id": cat_id[p.word],
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
        captions.append({"id": index + 1, "image_id": index, "caption": caption_text(scene.objects)})
    info = {"description": "headlab photo scenes (llava-real): tuxpaint-stamps cut-outs on sample photographs",
            "version": "1", "scenes": [s.to_json() for s in scenes]}
    categories = [{"id": cat_id[w], "name": w, "supercategory": "object"} for w in WORDS]
    (tmp / "annotations.json").write_text(json.dumps({"info": info, "images": images, "annotations": annotations,
                                                      "categories": categories}))
    (tmp / "captions.json").write_text(json.dumps({"info": {"version": "1"}, "images": images,
                                                   "annotations": captions}))
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
