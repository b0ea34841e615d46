"""CHAIR and POPE, from local files in their public formats, with paired bootstrap confidence intervals.

CHAIR (Rohrbach et al., "Object Hallucination in Image Captioning", EMNLP 2018). An object is named in a
caption when a word (or a run of words) of the caption is on a synonym list whose lines read
``canonical, synonym, …`` (one line per COCO category). The caption is lower-cased, split into words and
each word lemmatised; then, before single words, two-word phrases are merged by the reference
implementation's rules: its COCO compounds are kept whole ("traffic light", "hot dog", "teddy bear",
"motor bike", …: a hot dog is not a dog), "baby"/"adult" + an animal is the animal (not a person),
"passenger jet"/"passenger train" is the vehicle (not a person), "bow tie" is a tie, "toilet seat" is a
toilet; and "seat" is not counted as a chair in a caption that names a toilet. A merged phrase that is not
on the list names nothing (it only stops its words from firing). headlab also matches the list's own
multi-word entries ("dining table", "stove top oven"), longest first. Ground truth of an image = its
segmentation categories (COCO ``instances_*.json``) ∪ the objects its human captions name (COCO
``captions_*.json``), either file optional.

- CHAIR_i = hallucinated mentions / all mentions; CHAIR_s = captions with a hallucinated mention / captions;
  every mention counts, repeats included, as in the reference code (``count="unique"``: once per caption);
- recall = ground-truth objects named / ground-truth objects (summed over images); precision = correct
  mentions / mentions (1 − CHAIR_i); F1 = 2PR / (P + R); mean caption length in whitespace words.

Lemmatiser: NLTK's WordNet lemmatiser (as a noun) when nltk and its WordNet data are installed (never
downloaded), else headlab's rule-based singulariser (:func:`singularize`); the result names which ran.
List entries are lemmatised the same way as captions, so both sides agree whatever the lemmatiser.
"glasses" is read as the plural of "glass" (as WordNet does); headlab's COCO list has no bare "glass",
so spectacles never fire a category there.

POPE (Li et al., "Evaluating Object Hallucination in Large Vision-Language Models", EMNLP 2023): yes/no
questions per split. Parsers: ``"official"`` is the POPE repository's rule (keep the text before the first
'.', drop commas, split on spaces; the words ``No``, ``no`` or ``not`` make it no, anything else yes; the
rule is case-sensitive, so "NO" and "Not" read as yes); ``"exact"`` reads an answer as yes/no only when it
starts with the word yes or no (any case) and anything else as ``other``: never a true positive or negative
(wrong for accuracy, a miss for recall, not a yes for precision), counted and reported. The yes-ratio is the
share of answers read as yes.

Confidence intervals: a paired percentile bootstrap: images (CHAIR) or questions (POPE) are resampled with
replacement, the same draw for the baseline and the edited run, and each metric recomputed from the
resampled sums.

The older helpers (``load_synonyms``, ``mentioned``, ``chair``, ``pope_metrics``,
``paired_bootstrap_chair_i``) keep their signatures: ``mentioned``/``chair`` are the simple exact-word
matcher (plurals with a trailing s, each object once per caption) used by the synthetic llava-smol
evaluation.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from headlab.bundled import COCO_SYNONYMS
from headlab.errors import InputError

WORD = re.compile(r"[a-z]+")
HEADLAB_SYNONYMS = COCO_SYNONYMS  # in headlab/data

# ---------------------------------------------------------------------------------------------
# Lemmatisers

# Plurals the suffix rules below would get wrong, and words that are their own plural.
_IRREGULAR = {"people": "person", "children": "child", "men": "man", "women": "woman", "mice": "mouse",
              "teeth": "tooth", "feet": "foot", "geese": "goose", "oxen": "ox", "lice": "louse", "cacti": "cactus",
              "fungi": "fungus", "octopi": "octopus", "dice": "die", "kine": "cow"}
_SAME = {"sheep", "deer", "fish", "moose", "bison", "aircraft", "spacecraft", "species", "series", "salmon", "trout",
         "swine", "cattle", "scissors", "pants", "trousers", "jeans", "shorts", "clothes", "news", "tongs", "pliers",
         "binoculars", "headquarters", "means"}
_F_PLURALS = {"knives": "knife", "wives": "wife", "lives": "life", "leaves": "leaf", "loaves": "loaf",
              "shelves": "shelf", "wolves": "wolf", "halves": "half", "calves": "calf", "scarves": "scarf",
              "elves": "elf", "thieves": "thief", "hooves": "hoof", "selves": "self", "sheaves": "sheaf",
              "wharves": "wharf", "dwarves": "dwarf"}
_OES = {"potatoes", "tomatoes", "heroes", "mangoes", "volcanoes", "echoes", "torpedoes", "mosquitoes", "dominoes",
        "buffaloes", "avocadoes", "tornadoes", "vetoes"}
_IE_SINGULAR = {"cookie", "movie", "goalie", "brownie", "selfie", "hoodie", "beanie", "veggie", "smoothie", "zombie",
                "collie", "rookie", "calorie", "prairie", "birdie", "pixie", "hippie", "genie", "auntie", "sweetie",
                "boogie", "lingerie", "newbie", "freebie", "bootie", "doggie", "budgie", "magpie", "yuppie", "necktie",
                "bowtie", "hoagie"}
_SES_ES = {"buses", "gases", "lenses", "atlases", "canvases", "irises", "bonuses", "viruses", "walruses",
           "octopuses", "circuses", "cactuses", "campuses", "geniuses", "choruses", "platypuses", "censuses",
           "hippopotamuses", "citruses", "asparaguses", "busses"}
_IS_PLURALS = {"taxis": "taxi", "skis": "ski", "kiwis": "kiwi", "bikinis": "bikini", "martinis": "martini",
               "safaris": "safari", "salamis": "salami", "zucchinis": "zucchini", "wiis": "wii", "corgis": "corgi",
               "paninis": "panini", "broccolis": "broccoli", "tvs": "tv"}
_US_PLURALS = {"menus": "menu", "emus": "emu", "gnus": "gnu", "tutus": "tutu", "gurus": "guru"}
_MEN_WORDS = {"omen", "amen", "specimen", "abdomen", "stamen", "semen", "regimen", "hymen", "yemen"}


def singularize(word: str) -> str:
    """headlab's built-in singulariser for lower-case English nouns (rules, then exceptions).

    -ies → -y (puppies → puppy; cookies → cookie and ties → tie kept), -ves → -f/-fe only for the listed
    f-plurals (knives, leaves, shelves…; gloves → glove, stoves → stove), -sses/-shes/-ches/-xes/-zzes drop
    "es" (glasses → glass, benches → bench, boxes → box), other -ses drop "s" (horses → horse, vases → vase;
    buses → bus listed), irregulars (men, women, people, children, mice, teeth, feet, geese, oxen), words that
    are their own plural (sheep, deer, fish, scissors…), -us/-ss/-is kept (bus, glass, tennis; skis → ski and
    taxis → taxi listed). Other words of three letters or fewer are kept."""
    w = word
    if w in _IRREGULAR:
        return _IRREGULAR[w]
    if w in _IS_PLURALS:
        return _IS_PLURALS[w]
    if len(w) <= 3 or w in _SAME:
        return w
    for plural, singular in (("women", "woman"), ("children", "child"), ("people", "person")):
        if w.endswith(plural):
            return w[: -len(plural)] + singular
    if w.endswith("men") and w not in _MEN_WORDS:
        return w[:-3] + "man"  # firemen, policemen, snowmen
    if w in _F_PLURALS:
        return _F_PLURALS[w]
    if w in _US_PLURALS:
        return _US_PLURALS[w]
    if w.endswith("ies"):
        return w[:-1] if len(w) <= 4 or w[:-1] in _IE_SINGULAR else w[:-3] + "y"
    if w.endswith("oes"):
        return w[:-2] if w in _OES else w[:-1]
    if w.endswith("ches"):
        # peaches, beaches, coaches drop "es"; headaches, moustaches, caches drop "s"
        if w.endswith("aches") and w[-6:-5] not in ("e", "o"):
            return w[:-1]
        return w[:-2]
    if w.endswith(("sses", "shes", "xes", "zzes")):
        return w[:-2]
    if w.endswith("ses"):
        return w[:-2] if w in _SES_ES or w.endswith("buses") else w[:-1]
    if w.endswith("s") and not w.endswith(("ss", "us", "is")):
        return w[:-1]
    return w


@dataclass(frozen=True)
class Lemmatizer:
    """A word → lemma function with its name (``"nltk-wordnet"`` or ``"builtin-singular"``), cached."""

    name: str
    fn: Callable[[str], str] = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_cached", functools.lru_cache(maxsize=65536)(self.fn))

    def __call__(self, word: str) -> str:
        return self._cached(word)


LEMMATIZERS = ("auto", "nltk", "builtin")


@functools.lru_cache(maxsize=1)
def _nltk_wordnet() -> Callable[[str], str] | None:
    """NLTK's WordNet lemmatiser (noun reading) if nltk and its WordNet data are installed; never downloads."""
    try:
        from nltk.stem import WordNetLemmatizer

        lemmatizer = WordNetLemmatizer()
        lemmatizer.lemmatize("dogs", pos="n")  # raises LookupError without the data
    except (ImportError, LookupError, OSError):
        return None
    return lambda word: lemmatizer.lemmatize(word, pos="n")


def get_lemmatizer(kind: str | Lemmatizer = "auto") -> Lemmatizer:
    """``"auto"``: NLTK WordNet when available, else the built-in singulariser; ``"nltk"`` requires NLTK;
    ``"builtin"`` always the singulariser. The reference CHAIR code POS-tags before lemmatising; headlab
    lemmatises every word as a noun (no tagger data needed): object words are nouns."""
    if isinstance(kind, Lemmatizer):
        return kind
    if kind not in LEMMATIZERS:
        raise InputError(f"lemmatizer {kind!r}: use one of {', '.join(LEMMATIZERS)}")
    if kind != "builtin":
        fn = _nltk_wordnet()
        if fn is not None:
            return Lemmatizer("nltk-wordnet", fn)
        if kind == "nltk":
            raise InputError("lemmatizer 'nltk' needs the nltk package and its WordNet data (install them, e.g. "
                             "`python -m nltk.downloader wordnet`), or use 'auto'/'builtin'")
    return Lemmatizer("builtin-singular", singularize)


# ---------------------------------------------------------------------------------------------
# Synonym lists


@dataclass
class SynonymList:
    """A CHAIR synonym list: ``entries`` maps each listed word or phrase (lower case, single spaces) to its
    category's canonical name (the first entry of its line); ``objects`` are the canonical names in file order.
    ``format``: ``"reference"`` (lines ``canonical, synonym, …``) or ``"one-per-line"`` (headlab's synthetic
    set: one object a line, no synonyms)."""

    objects: list[str]
    entries: dict[str, str]
    path: str
    sha256: str
    format: str
    headlab_default: bool = False

    def describe(self) -> dict:
        """What a run manifest stores about the list."""
        return {"path": self.path, "sha256": self.sha256, "format": self.format, "objects": len(self.objects),
                "headlab_default": self.headlab_default,
                "paper_comparable": False if self.headlab_default else "only if this is the reference list"}


def _read_synonym_lines(text: str, origin: str) -> tuple[list[str], dict[str, str], str]:
    objects: list[str] = []
    entries: dict[str, str] = {}
    multi = False
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        words = [" ".join(w.lower().split()) for w in line.split(",")]
        words = [w for w in words if w]
        if not words:
            continue
        multi |= len(words) > 1
        objects.append(words[0])
        for w in words:
            entries[w] = words[0]  # a word on two lines belongs to the later one, as in the reference code
    if not entries:
        raise InputError(f"synonym file {origin} is empty: pass a file with one 'object, synonym, …' line each")
    return objects, entries, "reference" if multi else "one-per-line"


def load_synonym_list(path: str | Path | None = None) -> SynonymList:
    """A synonym list from ``path`` (the reference CHAIR list, a user's list, or a one-object-a-line file);
    ``None``: headlab's own COCO list (``headlab/data/coco_synonyms.txt``, not paper-comparable). Lines
    starting with ``#`` are comments. The sha256 of the file's bytes goes into the run manifest."""
    if path is None:
        data = resources.files("headlab").joinpath("data", HEADLAB_SYNONYMS).read_bytes()
        origin = f"headlab:data/{HEADLAB_SYNONYMS}"
    else:
        p = Path(path)
        if not p.is_file():
            raise InputError(f"synonym file {p} does not exist: pass a file with one 'object, synonym, …' line each")
        data, origin = p.read_bytes(), str(p)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"synonym file {origin} is not UTF-8 text") from err
    objects, entries, fmt = _read_synonym_lines(text, origin)
    return SynonymList(objects, entries, origin, hashlib.sha256(data).hexdigest(), fmt, headlab_default=path is None)


def load_synonyms(path: str | Path) -> dict[str, str]:
    """``{word: canonical}`` from lines ``canonical[, synonym …]`` (headlab's synthetic set: one object a line)."""
    return load_synonym_list(path).entries


# ---------------------------------------------------------------------------------------------
# The reference implementation's two-word rules

# COCO compounds kept whole (then looked up on the list as one entry).
COCO_DOUBLE_WORDS = ("motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal",
                     "stop light", "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball",
                     "baseball bat", "baseball glove", "tennis racket", "wine glass", "hot dog", "cell phone",
                     "mobile phone", "teddy bear", "hair drier", "potted plant", "bow tie", "laptop computer",
                     "stove top oven", "home plate", "train track")
# "baby"/"adult" before these name the animal, not a person.
ANIMAL_WORDS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub")
# "passenger" before these names the vehicle, not a person.
VEHICLE_WORDS = ("jet", "train")


def double_word_rules() -> dict[str, str]:
    """``{"first second": what it counts as}``, the reference CHAIR code's table (the three-word "stove top
    oven" never fires there, which only reads word pairs; headlab's phrase matcher reads it)."""
    rules = {w: w for w in COCO_DOUBLE_WORDS}
    for animal in ANIMAL_WORDS:
        rules[f"baby {animal}"] = animal
        rules[f"adult {animal}"] = animal
    for vehicle in VEHICLE_WORDS:
        rules[f"passenger {vehicle}"] = vehicle
    rules["bow tie"] = "tie"
    rules["toilet seat"] = "toilet"
    rules["wine glas"] = "wine glass"  # the reference's singulariser turned "glass" into "glas"
    return rules


@dataclass(frozen=True)
class Mention:
    """One object mention: the caption's words (``text``), the category (``object``), the first word's index."""

    text: str
    object: str
    index: int


class ChairMatcher:
    """Finds the objects a caption names, by a synonym list, the two-word rules and a lemmatiser.

    ``double_words=False`` turns the reference rules off (the list's own multi-word entries still match)."""

    def __init__(self, synonyms: SynonymList | Mapping[str, str] | None = None,
                 lemmatizer: str | Lemmatizer = "auto", *, double_words: bool = True) -> None:
        if synonyms is None:
            synonyms = load_synonym_list()
        if not isinstance(synonyms, SynonymList):
            entries = {" ".join(k.lower().split()): v for k, v in synonyms.items()}
            raw = json.dumps(sorted(entries.items())).encode()
            synonyms = SynonymList(sorted(set(entries.values())), entries, "<mapping>", hashlib.sha256(raw).hexdigest(),
                                   "mapping")
        self.synonyms = synonyms
        self.lemmatizer = get_lemmatizer(lemmatizer)
        self.double_words = double_words
        lem = self.lemmatizer
        # phrase (tuple of lemmas) → canonical object, for single words and list phrases; the raw spelling
        # is a key too (a word the lemmatiser changes still matches as written)
        self.table: dict[tuple[str, ...], str] = {}
        for entry, canonical in synonyms.entries.items():
            words = tuple(entry.split())
            self.table.setdefault(words, canonical)
            self.table[tuple(lem(w) for w in words)] = canonical
        for entry, canonical in synonyms.entries.items():  # an entry as written wins over another's lemma
            self.table[tuple(entry.split())] = canonical
        self.rules: dict[tuple[str, ...], tuple[str, ...]] = {}
        if double_words:
            for pair, target in double_word_rules().items():
                self.rules[tuple(lem(w) for w in pair.split())] = tuple(target.split())
        self.longest = max([len(k) for k in self.table] + [2])
        self.toilet = self.table.get(("toilet",))
        self.seat = self.table.get(("seat",))

    def lookup(self, name: str) -> str | None:
        """The canonical object of a word or phrase (e.g. a COCO category name), or None."""
        words = tuple(name.lower().split())
        return self.table.get(tuple(self.lemmatizer(w) for w in words)) or self.table.get(words)

    def mentions(self, caption: str) -> list[Mention]:
        """Every object mention of ``caption`` in order, repeats included."""
        tokens = WORD.findall(caption.lower())
        lemmas = [self.lemmatizer(t) for t in tokens]
        found: list[tuple[str, str | None, int, int]] = []  # (merged word, object, first index, words)
        i = 0
        while i < len(tokens):
            step, obj, word = 1, None, lemmas[i]
            for n in range(min(self.longest, len(tokens) - i), 1, -1):
                key = tuple(lemmas[i:i + n])
                if n == 2 and key in self.rules:  # the reference rules win over list phrases of their length
                    target = self.rules[key]
                    step, word = 2, " ".join(target)
                    obj = self.table.get(target) or self.table.get(tuple(self.lemmatizer(w) for w in target))
                    break
                hit = self.table.get(key) or self.table.get(tuple(tokens[i:i + n]))
                if hit is not None:
                    step, obj, word = n, hit, " ".join(key)
                    break
            else:
                obj = self.table.get((lemmas[i],)) or self.table.get((tokens[i],))
            found.append((word, obj, i, step))
            i += step
        # "the seat of the toilet": a seat in a caption that names a toilet is the toilet's, not a chair
        if self.toilet is not None and any(f[1] == self.toilet for f in found):
            found = [f for f in found if f[0] != "seat"]
        return [Mention(" ".join(tokens[i:i + step]), obj, i) for _, obj, i, step in found if obj is not None]

    def objects(self, caption: str) -> list[str]:
        """The categories ``caption`` names, one per mention (repeats included)."""
        return [m.object for m in self.mentions(caption)]


# ---------------------------------------------------------------------------------------------
# COCO-style ground truth


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


def find_coco_files(folder: str | Path) -> dict[str, list[Path]]:
    """``{"instances": [...], "captions": [...]}`` in ``folder`` or its ``annotations/``: COCO's
    ``instances_*.json`` / ``captions_*.json`` (all of them: train2014 + val2014 are merged, as the reference
    does), else headlab's generator names ``annotations.json`` / ``captions.json``. At least one is needed."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"COCO folder {folder} does not exist: pass the folder holding instances_*.json and/or "
                         "captions_*.json")
    found: dict[str, list[Path]] = {"instances": [], "captions": []}
    for where in (folder, folder / "annotations"):
        if not where.is_dir():
            continue
        found["instances"] += sorted(where.glob("instances_*.json"))
        found["captions"] += sorted(where.glob("captions_*.json"))
        for kind, name in (("instances", "annotations.json"), ("captions", "captions.json")):
            if not found[kind] and (where / name).is_file():
                found[kind].append(where / name)
    if not found["instances"] and not found["captions"]:
        raise InputError(f"{folder} has no instances_*.json, captions_*.json, annotations.json or captions.json: "
                         "pass a COCO annotation folder")
    return found


def read_coco_json(path: Path, what: str) -> dict:
    """A COCO ``instances``/``captions`` JSON file (a dict with an ``annotations`` list), or InputError."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InputError(f"{path} is not valid JSON ({err}): pass a COCO {what} file") from err
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise InputError(f"{path} is not a COCO {what} file (it needs 'images' and 'annotations')")
    return data


@dataclass
class CocoTruth:
    """Ground-truth objects per image, keyed by file name; ``image_ids`` maps file name → COCO id.
    ``from_instances`` / ``from_captions`` keep the two sources apart; ``unmapped_categories`` are
    segmentation categories the synonym list does not know (kept under their own name)."""

    objects: dict[str, set[str]]
    image_ids: dict[str, int | str]
    from_instances: dict[str, set[str]]
    from_captions: dict[str, set[str]]
    sources: dict[str, list[str]]
    unmapped_categories: list[str]

    @functools.cached_property
    def _by_id(self) -> dict[str, str]:
        return {str(v): k for k, v in self.image_ids.items()}

    def key(self, image: str | int | Path) -> str:
        """The file name of ``image``: a file name, a path, or a COCO image id (int or digits)."""
        text = str(image)
        for name in (text, Path(text).name):
            if name in self.objects:
                return name
        if text in self._by_id:
            return self._by_id[text]
        files = ", ".join(self.sources["instances"] + self.sources["captions"])
        raise InputError(f"image {image!r} is not in the annotations ({files}): pass captions of annotated "
                         "images, by file name or COCO image id")

    def objects_for(self, images: Sequence[str | int]) -> list[set[str]]:
        return [self.objects[self.key(i)] for i in images]


def load_coco_truth(folder: str | Path, matcher: ChairMatcher | None = None, *,
                    images: Sequence[str | int] | None = None, instances: bool = True,
                    captions: bool = True) -> CocoTruth:
    """Ground truth from a COCO-style folder (see :func:`find_coco_files`): segmentation categories mapped to
    the list's canonical names ∪ the objects ``matcher`` finds in the human captions. ``images`` (file names
    or ids) restricts the work to those images; ``instances``/``captions`` switch a source off."""
    matcher = matcher or ChairMatcher()
    files = find_coco_files(folder)
    if not instances:
        files["instances"] = []
    if not captions:
        files["captions"] = []
    if not files["instances"] and not files["captions"]:
        raise InputError("ground truth needs segmentation categories or human captions: keep one source on")
    image_ids: dict[str, int | str] = {}
    name_of: dict[str, str] = {}  # str(id) → file name
    loaded: dict[str, list[dict]] = {"instances": [], "captions": []}
    for kind in ("instances", "captions"):
        for path in files[kind]:
            data = read_coco_json(path, kind)
            loaded[kind].append(data)
            for im in data.get("images", []):
                try:
                    image_ids.setdefault(im["file_name"], im["id"])
                    name_of[str(im["id"])] = im["file_name"]
                except (KeyError, TypeError) as err:
                    raise InputError(f"{path}: an image entry lacks 'id' or 'file_name'") from err
    wanted: set[str] | None = None
    if images is not None:
        wanted = set()
        for image in images:
            name = Path(str(image)).name
            if name in image_ids:
                wanted.add(name)
            elif str(image) in name_of:
                wanted.add(name_of[str(image)])
            else:
                raise InputError(f"image {image!r} is not in the annotations of {folder}: pass annotated images")
    keep = (lambda name: name in wanted) if wanted is not None else (lambda name: True)
    seg: dict[str, set[str]] = {n: set() for n in image_ids if keep(n)}
    cap: dict[str, set[str]] = {n: set() for n in image_ids if keep(n)}
    unmapped: set[str] = set()
    for path, data in zip(files["instances"], loaded["instances"], strict=True):
        try:
            names = {c["id"]: c["name"] for c in data["categories"]}
            for ann in data["annotations"]:
                name = name_of.get(str(ann["image_id"]))
                if name is None or not keep(name):
                    continue
                category = names[ann["category_id"]]
                canonical = matcher.lookup(category)
                if canonical is None:
                    unmapped.add(category)
                    canonical = category.lower()
                seg[name].add(canonical)
        except (KeyError, TypeError) as err:
            raise InputError(f"{path} is not a COCO instances file (categories, annotations with image_id and "
                             f"category_id): missing {err}") from err
    for path, data in zip(files["captions"], loaded["captions"], strict=True):
        try:
            for ann in data["annotations"]:
                name = name_of.get(str(ann["image_id"]))
                if name is None or not keep(name):
                    continue
                cap[name].update(matcher.objects(ann["caption"]))
        except (KeyError, TypeError) as err:
            raise InputError(f"{path} is not a COCO captions file (annotations with image_id and caption): "
                             f"missing {err}") from err
    objects = {n: seg[n] | cap[n] for n in seg}
    return CocoTruth(objects, {n: image_ids[n] for n in objects}, seg, cap,
                     {k: [str(p) for p in v] for k, v in files.items()}, sorted(unmapped))


# ---------------------------------------------------------------------------------------------
# CHAIR


def mentioned(caption: str, synonyms: dict[str, str]) -> list[str]:
    """Canonical objects named in ``caption``, in order of first mention, each once (exact words, plural s)."""
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
    """CHAIR with the simple matcher (:func:`mentioned`: each object once per caption)."""
    if len(captions) != len(truth):
        raise InputError(f"{len(captions)} captions for {len(truth)} ground-truth object sets")
    mentions, halluc, length = [], [], []
    for caption, objects in zip(captions, truth, strict=True):
        names = mentioned(caption, synonyms)
        mentions.append(len(names))
        halluc.append(sum(n not in objects for n in names))
        length.append(len(caption.split()))
    return ChairCounts(np.array(mentions), np.array(halluc), np.array(length))


CHAIR_METRICS = ("chair_i", "chair_s", "recall", "precision", "f1", "mean_length_words")


@dataclass
class ChairResult(ChairCounts):
    """CHAIR of a set of captions. Arrays are per caption ``[captions]``: ``mentions`` (object mentions),
    ``hallucinated`` (mentions not in the ground truth), ``length`` (words), ``gt`` (ground-truth objects of
    the image), ``recalled`` (ground-truth objects the caption names). ``objects``/``hallucinated_objects``
    list the mentions; ``image_ids`` the image of each caption (the list a run stores)."""

    gt: np.ndarray
    recalled: np.ndarray
    objects: list[list[str]]
    hallucinated_objects: list[list[str]]
    image_ids: list
    lemmatizer: str
    synonyms: dict
    count: str = "every"

    @property
    def recall(self) -> float:
        return float(self.recalled.sum() / max(1, self.gt.sum()))

    @property
    def precision(self) -> float:
        return float((self.mentions.sum() - self.hallucinated.sum()) / max(1, self.mentions.sum()))

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r > 0 else 0.0

    @property
    def mean_length_words(self) -> float:
        return float(self.length.mean()) if len(self.length) else 0.0

    def summary(self) -> dict:
        return {"chair_i": self.chair_i, "chair_s": self.chair_s, "recall": self.recall,
                "precision": self.precision, "f1": self.f1, "mean_length_words": self.mean_length_words,
                "captions": len(self.mentions), "images": len(dict.fromkeys(self.image_ids)),
                "mentions": int(self.mentions.sum()), "hallucinated_mentions": int(self.hallucinated.sum()),
                "gt_objects": int(self.gt.sum()), "recalled_objects": int(self.recalled.sum()),
                "count": self.count, "lemmatizer": self.lemmatizer, "synonyms": self.synonyms}

    def rows(self) -> list[dict]:
        """One row per caption (for a table)."""
        return [{"image_id": self.image_ids[i], "mentions": int(self.mentions[i]),
                 "hallucinated": int(self.hallucinated[i]), "gt_objects": int(self.gt[i]),
                 "recalled": int(self.recalled[i]), "length_words": int(self.length[i]),
                 "objects": ", ".join(self.objects[i]), "hallucinated_objects": ", ".join(self.hallucinated_objects[i])}
                for i in range(len(self.mentions))]


def chair_eval(captions: Sequence[str], truth: Sequence[set[str]], matcher: ChairMatcher | None = None, *,
               image_ids: Sequence | None = None, count: str = "every") -> ChairResult:
    """CHAIR_i, CHAIR_s, recall, precision, F1 and length of ``captions`` against ``truth`` (canonical objects
    per caption, e.g. ``CocoTruth.objects_for(image_ids)``). ``count="every"`` counts every mention (the
    reference); ``"unique"`` each object once per caption. ``image_ids`` default to 0 … n−1."""
    if count not in ("every", "unique"):
        raise InputError(f"count {count!r}: use 'every' (the reference) or 'unique'")
    if len(captions) != len(truth):
        raise InputError(f"{len(captions)} captions for {len(truth)} ground-truth object sets")
    ids = list(range(len(captions))) if image_ids is None else list(image_ids)
    if len(ids) != len(captions):
        raise InputError(f"{len(captions)} captions for {len(ids)} image ids")
    matcher = matcher or ChairMatcher()
    mentions, halluc, length, gt, recalled, objs, hobjs = [], [], [], [], [], [], []
    for caption, objects in zip(captions, truth, strict=True):
        names = matcher.objects(caption)
        if count == "unique":
            names = list(dict.fromkeys(names))
        wrong = [n for n in names if n not in objects]
        mentions.append(len(names))
        halluc.append(len(wrong))
        length.append(len(caption.split()))
        gt.append(len(objects))
        recalled.append(len(set(names) & set(objects)))
        objs.append(names)
        hobjs.append(wrong)
    return ChairResult(np.array(mentions, dtype=np.int64), np.array(halluc, dtype=np.int64),
                       np.array(length, dtype=np.int64), np.array(gt, dtype=np.int64),
                       np.array(recalled, dtype=np.int64), objs, hobjs, ids, matcher.lemmatizer.name,
                       matcher.synonyms.describe(), count)


def chair_from_coco(captions: Mapping[str | int, str] | Sequence[tuple[str | int, str]], folder: str | Path, *,
                    synonyms: str | Path | SynonymList | None = None, lemmatizer: str | Lemmatizer = "auto",
                    count: str = "every", instances: bool = True, use_captions: bool = True) -> ChairResult:
    """CHAIR of generated ``captions`` (``{image: caption}`` or ``[(image, caption)]``, image = file name or
    COCO id) against the COCO-style annotations in ``folder``; ``synonyms`` a path (``--synonyms``), a loaded
    list, or None for headlab's list. The result's ``image_ids`` are the file names, in caption order."""
    pairs = list(captions.items()) if isinstance(captions, Mapping) else list(captions)
    if not pairs:
        raise InputError("no captions to score")
    syn = synonyms if isinstance(synonyms, SynonymList) else load_synonym_list(synonyms)
    matcher = ChairMatcher(syn, lemmatizer)
    truth = load_coco_truth(folder, matcher, images=[p[0] for p in pairs], instances=instances,
                            captions=use_captions)
    names = [truth.key(image) for image, _ in pairs]
    return chair_eval([c for _, c in pairs], truth.objects_for(names), matcher, image_ids=names, count=count)


# ---------------------------------------------------------------------------------------------
# POPE

POPE_PARSERS = ("official", "exact")
_EXACT = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)


def pope_answer(text: str, parser: str = "official") -> str:
    """``"yes"``, ``"no"`` (or ``"other"`` under ``parser="exact"``) for a model's answer.

    official: the POPE repository's rule (first sentence, commas dropped, space-split words; ``No``/``no``/
    ``not`` → no, else yes). exact: the answer must start with the word yes or no."""
    if parser == "official":
        if "." in text:
            text = text.split(".")[0]
        words = text.replace(",", "").split(" ")
        return "no" if ("No" in words or "not" in words or "no" in words) else "yes"
    if parser == "exact":
        m = _EXACT.match(text)
        return m.group(1).lower() if m else "other"
    raise InputError(f"POPE parser {parser!r}: use one of {', '.join(POPE_PARSERS)}")


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


def load_pope_answers(path: str | Path, questions: str | Path | Sequence[dict]) -> list[str]:
    """The answers of ``path`` (JSONL, one ``{"question_id", "text"}`` or ``{"answer"}`` a line, or a JSON
    list of them), in the order of ``questions`` (a POPE file or its loaded items). Matched by
    ``question_id`` when both sides carry ids, else by line order (as the official evaluation script)."""
    qpath = None
    if isinstance(questions, str | Path):
        qpath, questions = str(questions), load_pope(questions)
    path = Path(path)
    if not path.is_file():
        raise InputError(f"answer file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        records = json.loads(text) if text.lstrip().startswith("[") else [
            json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise InputError(f"answer file {path} is not JSONL (one JSON object a line): {err}") from err
    answers = []
    for n, r in enumerate(records, 1):
        value = r.get("text", r.get("answer")) if isinstance(r, dict) else None
        if not isinstance(value, str):
            raise InputError(f"answer file {path}, answer {n}: needs a 'text' or 'answer' string")
        answers.append(value)
    where = qpath or "the question file"
    if len(answers) != len(questions):
        raise InputError(f"answer file {path} has {len(answers)} answers but {where} has {len(questions)} "
                         "questions: answer every question once")
    if all("question_id" in r for r in records) and all("question_id" in q for q in questions):
        by_id: dict[str, str] = {}
        for r, a in zip(records, answers, strict=True):
            if str(r["question_id"]) in by_id:
                raise InputError(f"answer file {path} answers question {r['question_id']} twice")
            by_id[str(r["question_id"])] = a
        missing = [q["question_id"] for q in questions if str(q["question_id"]) not in by_id]
        if missing:
            raise InputError(f"answer file {path} has no answer to question_id {missing[0]} of {where} "
                             f"({len(missing)} unanswered): answer the same question file")
        return [by_id[str(q["question_id"])] for q in questions]
    return answers


POPE_METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def _pope_arrays(yes: np.ndarray, no: np.ndarray, gold: np.ndarray) -> dict[str, np.ndarray]:
    """Metrics over the last axis of boolean ``[..., n]`` arrays (answer read as yes / as no; label yes)."""
    tp = (yes & gold).sum(-1)
    fp = (yes & ~gold).sum(-1)
    tn = (no & ~gold).sum(-1)
    n = gold.shape[-1]
    positives = gold.sum(-1)
    precision = tp / np.maximum(1, tp + fp)
    recall = tp / np.maximum(1, positives)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(1e-12, precision + recall), 0.0)
    return {"accuracy": (tp + tn) / max(1, n), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": yes.sum(-1) / max(1, n)}


@dataclass
class PopeScores:
    """One POPE split scored: ``answers`` read as ``yes``/``no``/``other`` ``[questions]``, ``gold`` label yes."""

    answers: list[str]
    gold: np.ndarray
    parser: str
    question_ids: list
    images: list[str]

    @property
    def yes(self) -> np.ndarray:
        return np.array([a == "yes" for a in self.answers], dtype=bool)

    @property
    def no(self) -> np.ndarray:
        return np.array([a == "no" for a in self.answers], dtype=bool)

    def summary(self) -> dict:
        yes, no, gold = self.yes, self.no, self.gold
        metrics = {k: float(v) for k, v in _pope_arrays(yes, no, gold).items()}
        other = int(len(self.answers) - yes.sum() - no.sum())
        return {**metrics, "n": len(self.answers), "tp": int((yes & gold).sum()), "fp": int((yes & ~gold).sum()),
                "tn": int((no & ~gold).sum()), "fn": int((~yes & gold).sum()), "other": other,
                "other_ratio": other / max(1, len(self.answers)), "parser": self.parser,
                "images": len({i for i in self.images if i})}


def pope_eval(answers: Sequence[str], questions: Sequence[dict] | Sequence[str], *,
              parser: str = "official") -> PopeScores:
    """Score answers against POPE items (dicts with ``label``, ideally ``question_id`` and ``image``) or a
    list of labels; lengths must match."""
    if parser not in POPE_PARSERS:
        raise InputError(f"POPE parser {parser!r}: use one of {', '.join(POPE_PARSERS)}")
    if len(answers) != len(questions):
        raise InputError(f"{len(answers)} answers for {len(questions)} POPE questions: answer every question once")
    labels = [q["label"] if isinstance(q, Mapping) else q for q in questions]
    bad = [x for x in labels if x not in ("yes", "no")]
    if bad:
        raise InputError(f"POPE label {bad[0]!r}: labels are 'yes' or 'no'")
    ids = [q.get("question_id", i) if isinstance(q, Mapping) else i for i, q in enumerate(questions)]
    images = [str(q.get("image", "")) if isinstance(q, Mapping) else "" for q in questions]
    return PopeScores([pope_answer(a, parser) for a in answers], np.array([x == "yes" for x in labels], dtype=bool),
                      parser, ids, images)


def pope_metrics(answers: Sequence[str], labels: Sequence[str], *, parser: str = "official") -> dict:
    """Accuracy, precision, recall, F1, yes-ratio (of the answers) and counts; see :func:`pope_eval`."""
    return pope_eval(answers, list(labels), parser=parser).summary()


def pope_eval_splits(answers: Mapping[str, Sequence[str]], questions: Mapping[str, Sequence[dict]], *,
                     parser: str = "official") -> dict:
    """Per split (random / popular / adversarial …) :meth:`PopeScores.summary`, and the mean F1 across splits.
    Returns ``{"splits": {split: summary}, "mean_f1", "parser", "images"}`` (``images``: every image asked
    about, sorted)."""
    if set(answers) != set(questions):
        raise InputError(f"answers for splits {sorted(answers)} but questions for {sorted(questions)}")
    if not answers:
        raise InputError("no POPE split to score")
    scores = {s: pope_eval(answers[s], questions[s], parser=parser) for s in questions}
    splits = {s: sc.summary() for s, sc in scores.items()}
    images = sorted({i for sc in scores.values() for i in sc.images if i})
    return {"splits": splits, "mean_f1": float(np.mean([v["f1"] for v in splits.values()])), "parser": parser,
            "images": images}


# ---------------------------------------------------------------------------------------------
# Bootstrap


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(values, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def _check_level(n: int, level: float) -> None:
    if n < 1 or not 0 < level < 1:
        raise InputError(f"bootstrap: resamples must be ≥ 1 and level in (0, 1), got {n} and {level}")


def _chair_sums(c: ChairResult, groups: list) -> np.ndarray:
    """``[7, images]``: per image sums of mentions, hallucinated, gt, recalled, length, captions, captions
    with a hallucination."""
    index = {g: k for k, g in enumerate(dict.fromkeys(groups))}
    g = np.array([index[x] for x in groups])
    cols = [c.mentions, c.hallucinated, c.gt, c.recalled, c.length, np.ones_like(c.mentions), c.hallucinated > 0]
    out = np.zeros((len(cols), len(index)))
    for row, col in enumerate(cols):
        np.add.at(out[row], g, col.astype(float))
    return out


def _chair_from_sums(s: np.ndarray) -> dict[str, np.ndarray]:
    """Metrics from ``[7, ...]`` sums (see :func:`_chair_sums`), broadcast over the trailing axes."""
    mentions, halluc, gt, recalled, length, captions, hcaps = s
    chair_i = halluc / np.maximum(1, mentions)
    precision = (mentions - halluc) / np.maximum(1, mentions)
    recall = recalled / np.maximum(1, gt)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(1e-12, precision + recall), 0.0)
    return {"chair_i": chair_i, "chair_s": hcaps / np.maximum(1, captions), "recall": recall,
            "precision": precision, "f1": f1, "mean_length_words": length / np.maximum(1, captions)}


def bootstrap_chair(result: ChairResult, *, n: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile CI of each CHAIR metric of one run, resampling images (captions of one image stay together)."""
    _check_level(n, level)
    sums = _chair_sums(result, result.image_ids)
    idx = np.random.default_rng(seed).integers(0, sums.shape[1], size=(n, sums.shape[1]))
    boot = _chair_from_sums(sums[:, idx].sum(-1))
    point = {k: float(v) for k, v in _chair_from_sums(sums.sum(-1)).items()}
    return {"metrics": {k: {"value": point[k], "ci": list(_interval(boot[k], level))} for k in CHAIR_METRICS},
            "level": level, "resamples": n, "seed": seed, "unit": "image", "n_images": sums.shape[1]}


def paired_bootstrap_chair(base: ChairResult, edited: ChairResult, *, n: int = 2000, seed: int = 0,
                           level: float = 0.95) -> dict:
    """edited − base for every CHAIR metric on the same images, with percentile CIs from resampling images
    (one draw for both runs; captions of one image move together). Returns ``{"metrics": {name: {"base",
    "edited", "delta", "ci_low", "ci_high", "base_ci", "edited_ci"}}, "level", "resamples", "seed", "unit",
    "n_images"}``."""
    _check_level(n, level)
    if list(base.image_ids) != list(edited.image_ids):
        raise InputError("paired bootstrap: both runs must caption the same images in the same order")
    sb, se = _chair_sums(base, base.image_ids), _chair_sums(edited, edited.image_ids)
    idx = np.random.default_rng(seed).integers(0, sb.shape[1], size=(n, sb.shape[1]))
    bb, be = _chair_from_sums(sb[:, idx].sum(-1)), _chair_from_sums(se[:, idx].sum(-1))
    pb, pe = _chair_from_sums(sb.sum(-1)), _chair_from_sums(se.sum(-1))
    metrics = {}
    for k in CHAIR_METRICS:
        lo, hi = _interval(be[k] - bb[k], level)
        metrics[k] = {"base": float(pb[k]), "edited": float(pe[k]), "delta": float(pe[k] - pb[k]), "ci_low": lo,
                      "ci_high": hi, "base_ci": list(_interval(bb[k], level)),
                      "edited_ci": list(_interval(be[k], level))}
    return {"metrics": metrics, "level": level, "resamples": n, "seed": seed, "unit": "image",
            "n_images": sb.shape[1]}


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


def paired_bootstrap_pope(base: PopeScores | Mapping[str, PopeScores], edited: PopeScores | Mapping[str, PopeScores],
                          *, n: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """edited − base for every POPE metric, per split, with percentile CIs from resampling questions (one draw
    for both runs, each split resampled on its own); with several splits also ``mean_f1`` across splits.
    Returns ``{"splits": {split: {metric: {"base", "edited", "delta", "ci_low", "ci_high", "base_ci",
    "edited_ci"}}}, "mean_f1": {…} (several splits), "level", "resamples", "seed", "unit": "question"}``."""
    _check_level(n, level)
    single = isinstance(base, PopeScores)
    bsplits = {"pope": base} if single else dict(base)
    esplits = {"pope": edited} if isinstance(edited, PopeScores) else dict(edited)
    if set(bsplits) != set(esplits):
        raise InputError(f"paired bootstrap: splits differ ({sorted(bsplits)} vs {sorted(esplits)})")
    rng = np.random.default_rng(seed)
    out: dict[str, dict] = {}
    f1s_b, f1s_e, points_b, points_e = [], [], [], []
    for split in bsplits:
        b, e = bsplits[split], esplits[split]
        if list(b.question_ids) != list(e.question_ids) or not np.array_equal(b.gold, e.gold):
            raise InputError(f"paired bootstrap: split {split!r} must hold the same questions in both runs")
        idx = rng.integers(0, len(b.gold), size=(n, len(b.gold)))
        gold = b.gold[idx]
        bb = _pope_arrays(b.yes[idx], b.no[idx], gold)
        be = _pope_arrays(e.yes[idx], e.no[idx], gold)
        pb, pe = _pope_arrays(b.yes, b.no, b.gold), _pope_arrays(e.yes, e.no, e.gold)
        out[split] = {}
        for k in POPE_METRICS:
            lo, hi = _interval(be[k] - bb[k], level)
            out[split][k] = {"base": float(pb[k]), "edited": float(pe[k]), "delta": float(pe[k] - pb[k]),
                             "ci_low": lo, "ci_high": hi, "base_ci": list(_interval(bb[k], level)),
                             "edited_ci": list(_interval(be[k], level))}
        f1s_b.append(bb["f1"])
        f1s_e.append(be["f1"])
        points_b.append(float(pb["f1"]))
        points_e.append(float(pe["f1"]))
    result: dict = {"splits": out, "level": level, "resamples": n, "seed": seed, "unit": "question"}
    if len(bsplits) > 1:
        mb, me = np.mean(f1s_b, axis=0), np.mean(f1s_e, axis=0)
        lo, hi = _interval(me - mb, level)
        result["mean_f1"] = {"base": float(np.mean(points_b)), "edited": float(np.mean(points_e)),
                             "delta": float(np.mean(points_e) - np.mean(points_b)), "ci_low": lo, "ci_high": hi,
                             "base_ci": list(_interval(mb, level)), "edited_ci": list(_interval(me, level))}
    return result
