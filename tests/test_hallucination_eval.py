"""The CHAIR / POPE evaluation library (analyses/hallucination_metrics.py, analyses/pope_build.py) against hand
counts: every CHAIR metric, the reference two-word rules, the singulariser, the POPE builder's sampling rules,
answer parsing and files, and the paired bootstrap."""

from __future__ import annotations

import hashlib
import json
import random
import sys
import types

import numpy as np
import pytest

from headlab.analyses import hallucination_metrics as H
from headlab.analyses import pope_build as P
from headlab.errors import InputError
from headlab.training import lvlm_data as D

COCO_80 = ["person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
           "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
           "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
           "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
           "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
           "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
           "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
           "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
           "teddy bear", "hair drier", "toothbrush"]


@pytest.fixture(scope="module")
def coco():
    return H.ChairMatcher(H.load_synonym_list(), "builtin")


def write_coco(folder, images, instances=None, captions=None, categories=COCO_80):
    """A COCO-style folder: ``images`` [(id, file)], ``instances`` [(image id, category)], ``captions``
    [(image id, text)]."""
    folder.mkdir(parents=True, exist_ok=True)
    ims = [{"id": i, "file_name": f} for i, f in images]
    cats = [{"id": k + 1, "name": c} for k, c in enumerate(categories)]
    cat_id = {c["name"]: c["id"] for c in cats}
    if instances is not None:
        anns = [{"id": k, "image_id": i, "category_id": cat_id[c]} for k, (i, c) in enumerate(instances)]
        (folder / "instances_val2014.json").write_text(json.dumps({"images": ims, "annotations": anns,
                                                                   "categories": cats}))
    if captions is not None:
        anns = [{"id": k, "image_id": i, "caption": t} for k, (i, t) in enumerate(captions)]
        (folder / "captions_val2014.json").write_text(json.dumps({"images": ims, "annotations": anns}))
    return folder


# ---------------------------------------------------------------------------------------------
# Synonym list and matching


def test_headlab_list_is_the_80_categories_in_reference_format():
    syn = H.load_synonym_list()
    assert syn.objects == COCO_80 and syn.format == "reference" and syn.headlab_default
    text = (H.resources.files("headlab") / "data" / H.HEADLAB_SYNONYMS).read_bytes()
    assert syn.sha256 == hashlib.sha256(text).hexdigest()
    header = [line for line in text.decode().splitlines() if line.startswith("#")]
    assert any("NOT" in line and "comparable" in line for line in header)
    assert syn.describe()["paper_comparable"] is False
    body = [line for line in text.decode().splitlines() if line and not line.startswith("#")]
    assert len(body) == 80
    words = [w.strip() for line in body for w in line.split(",")]
    assert len(words) == len(set(words)), "a word on two lines"
    matcher = H.ChairMatcher(syn, "builtin")
    assert all(matcher.lookup(c) == c for c in COCO_80)  # every category name maps to itself
    assert matcher.lookup("Dining Tables") == "dining table"


def test_user_list_sha_and_old_one_per_line_files(tmp_path):
    path = tmp_path / "synonyms.txt"
    path.write_bytes(b"person, girl, boy, baby, passenger\ndog, puppy\nbird\ntoilet\nchair, seat\n")
    syn = H.load_synonym_list(path)
    assert syn.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() and not syn.headlab_default
    assert syn.format == "reference" and syn.objects == ["person", "dog", "bird", "toilet", "chair"]
    m = H.ChairMatcher(syn, "builtin")
    assert m.objects("A baby bird and a girl with two puppies") == ["bird", "person", "dog"]
    assert m.objects("The passenger of a passenger jet") == ["person"]  # jet is not on this list: nothing
    old = tmp_path / "old.txt"
    old.write_text("# comment\ncat\ndog\n")
    assert H.load_synonym_list(old).format == "one-per-line"
    assert H.load_synonyms(old) == {"cat": "cat", "dog": "dog"}  # the old helper skips comments too
    with pytest.raises(InputError, match="does not exist"):
        H.load_synonym_list(tmp_path / "none.txt")
    (tmp_path / "empty.txt").write_text("# only a comment\n")
    with pytest.raises(InputError, match="empty"):
        H.load_synonym_list(tmp_path / "empty.txt")


@pytest.mark.parametrize("caption, objects", [
    ("A toilet seat is up.", ["toilet"]),  # the reference: "toilet seat" counts as toilet, never as a chair
    ("The seat of the toilet is up.", ["toilet"]),  # a seat beside a toilet is not a chair
    ("A chair and a seat.", ["chair", "chair"]),  # without a toilet a seat is a chair
    ("A man eats a hot dog.", ["person", "hot dog"]),  # not a dog
    ("Two hot dogs and a dog.", ["hot dog", "dog"]),
    ("A traffic light turns red.", ["traffic light"]),
    ("Motor bikes and a motor cycle.", ["motorcycle", "motorcycle"]),
    ("A baby bird and an adult dog.", ["bird", "dog"]),  # not a person
    ("Baby elephants follow a baby.", ["elephant", "person"]),
    ("A passenger jet and passenger trains.", ["airplane", "train"]),  # not a person
    ("A man in a bow tie.", ["person", "tie"]),
    ("Teddy bears and a bear.", ["teddy bear", "bear"]),
    ("A dining table.", ["dining table"]),  # multi-word entries before single words: one mention
    ("A stove top oven.", ["oven"]),  # three words
    ("A microwave oven beside an oven.", ["microwave", "oven"]),
    ("Wine glasses, a cup and glasses.", ["wine glass", "cup"]),  # bare "glass" names no category
    ("Home plate and train tracks.", []),  # kept whole by the rules, on no list: they name nothing
    ("People, children and mice.", ["person", "person", "mouse"]),
])
def test_double_word_rules(coco, caption, objects):
    assert coco.objects(caption) == objects


def test_rules_off_and_mention_text(coco):
    off = H.ChairMatcher(H.load_synonym_list(), "builtin", double_words=False)
    assert off.objects("A baby bird.") == ["person", "bird"]
    assert off.objects("A hot dog.") == ["hot dog"]  # still a multi-word entry of the list
    assert [(m.text, m.object, m.index) for m in coco.mentions("Two baby birds, one cat.")] == [
        ("baby birds", "bird", 1), ("cat", "cat", 4)]


def test_synthetic_objects_under_the_rules(tmp_path):
    files = D.write_dataset(tmp_path / "set", [D.Scene(["bat"], [0])])
    syn = H.load_synonym_list(files["synonyms"])
    assert syn.objects[:len(D.OBJECTS)] == list(D.OBJECTS)  # the icons first, then the other COCO categories
    assert {"person", "chair", "car"} <= set(syn.objects) and len(set(syn.objects)) == len(syn.objects)
    assert not {"baseball bat", "sports ball", "wine glass"} & set(syn.objects)  # they are the icons bat, ball, glass
    m = H.ChairMatcher(syn, "builtin")
    plural = "Bats, balls, cats, dogs, pens, pencils, moons, stars, locks, keys, bottles, glasses, houses, trees, " \
             "hats and coats."
    assert m.objects(plural) == list(D.OBJECTS)  # every plural found, glasses included
    assert m.objects("A baseball bat, a wine glass and a sports ball.") == ["bat", "glass", "ball"]
    assert m.objects("A hot dog and a teddy bear.") == ["hot dog", "teddy bear"]  # COCO objects, not dog or bear
    assert m.objects("A baby cat and an adult dog.") == ["cat", "dog"]
    assert m.objects("The image shows a chair and a person.") == ["chair", "person"]  # not icons: hallucinated


# ---------------------------------------------------------------------------------------------
# Lemmatisers


@pytest.mark.parametrize("plural, singular", [
    ("dogs", "dog"), ("puppies", "puppy"), ("ties", "tie"), ("cookies", "cookie"), ("knives", "knife"),
    ("leaves", "leaf"), ("shelves", "shelf"), ("gloves", "glove"), ("stoves", "stove"), ("glasses", "glass"),
    ("benches", "bench"), ("sandwiches", "sandwich"), ("beaches", "beach"), ("headaches", "headache"),
    ("boxes", "box"), ("dishes", "dish"), ("toothbrushes", "toothbrush"), ("horses", "horse"), ("vases", "vase"),
    ("buses", "bus"), ("bus", "bus"), ("glass", "glass"), ("tennis", "tennis"), ("men", "man"), ("women", "woman"),
    ("firemen", "fireman"), ("people", "person"), ("children", "child"), ("mice", "mouse"), ("teeth", "tooth"),
    ("feet", "foot"), ("geese", "goose"), ("sheep", "sheep"), ("potatoes", "potato"), ("shoes", "shoe"),
    ("skis", "ski"), ("taxis", "taxi"), ("pizzas", "pizza"), ("giraffes", "giraffe"), ("specimen", "specimen"),
    ("scissors", "scissors"), ("cat", "cat"), ("is", "is"), ("neckties", "necktie"), ("hoagies", "hoagie"),
    ("corgis", "corgi"), ("tvs", "tv"), ("cities", "city"),
])
def test_singularize(plural, singular):
    assert H.singularize(plural) == singular


def test_lemmatizer_choice(monkeypatch):
    assert H.get_lemmatizer("builtin").name == "builtin-singular"
    with pytest.raises(InputError, match="lemmatizer 'spacy'"):
        H.get_lemmatizer("spacy")
    calls = []

    class FakeWordNet:
        def lemmatize(self, word, pos="n"):
            calls.append(pos)
            return "LEMMA-" + word

    def install(cls):
        nltk, stem = types.ModuleType("nltk"), types.ModuleType("nltk.stem")
        stem.WordNetLemmatizer = cls
        nltk.stem = stem
        monkeypatch.setitem(sys.modules, "nltk", nltk)
        monkeypatch.setitem(sys.modules, "nltk.stem", stem)
        H._nltk_wordnet.cache_clear()

    try:
        install(FakeWordNet)
        lem = H.get_lemmatizer("auto")
        assert lem.name == "nltk-wordnet" and lem("dogs") == "LEMMA-dogs" and set(calls) == {"n"}

        class NoData:
            def lemmatize(self, word, pos="n"):
                raise LookupError("Resource wordnet not found")

        install(NoData)
        assert H.get_lemmatizer("auto").name == "builtin-singular"  # data missing: never downloads, falls back
        with pytest.raises(InputError, match="nltk"):
            H.get_lemmatizer("nltk")
    finally:
        H._nltk_wordnet.cache_clear()


# ---------------------------------------------------------------------------------------------
# CHAIR by hand


def chair_folder(tmp_path):
    return write_coco(tmp_path / "coco", [(1, "a.jpg"), (2, "b.jpg"), (3, "c.jpg")],
                      instances=[(1, "dog"), (1, "person"), (1, "dog"), (2, "toilet"), (2, "sink")],
                      captions=[(1, "A man walks his dog past a car."), (2, "A bathroom with a toilet."),
                                (3, "A bird on a traffic light.")])


CAPTIONS = {"a.jpg": "A dog and a dog chase a cat near a man.",  # dog dog cat person: cat hallucinated
            2: "A toilet seat next to a sink and a hot dog.",  # toilet sink hot-dog: hot dog hallucinated
            "c.jpg": "A baby bird sits on a traffic light."}  # bird, traffic light: none


def test_coco_truth_sources(tmp_path, coco):
    folder = chair_folder(tmp_path)
    truth = H.load_coco_truth(folder, coco)
    assert truth.from_instances == {"a.jpg": {"dog", "person"}, "b.jpg": {"toilet", "sink"}, "c.jpg": set()}
    assert truth.from_captions == {"a.jpg": {"person", "dog", "car"}, "b.jpg": {"toilet"},
                                   "c.jpg": {"bird", "traffic light"}}
    assert truth.objects["a.jpg"] == {"dog", "person", "car"}
    assert truth.key(2) == truth.key("2") == truth.key("/some/where/b.jpg") == "b.jpg"
    only = H.load_coco_truth(folder, coco, images=["c.jpg"], captions=False)
    assert only.objects == {"c.jpg": set()}
    with pytest.raises(InputError, match="not in the annotations"):
        H.load_coco_truth(folder, coco, images=["zzz.jpg"])
    with pytest.raises(InputError, match="no instances"):
        H.load_coco_truth(tmp_path, coco)


def test_chair_metrics_by_hand(tmp_path):
    folder = chair_folder(tmp_path)
    r = H.chair_from_coco(CAPTIONS, folder, lemmatizer="builtin")
    assert r.image_ids == ["a.jpg", "b.jpg", "c.jpg"]
    assert r.objects == [["dog", "dog", "cat", "person"], ["toilet", "sink", "hot dog"], ["bird", "traffic light"]]
    assert r.mentions.tolist() == [4, 3, 2] and r.hallucinated.tolist() == [1, 1, 0]
    assert r.gt.tolist() == [3, 2, 2] and r.recalled.tolist() == [2, 2, 2] and r.length.tolist() == [11, 11, 8]
    s = r.summary()
    p, rec = 7 / 9, 6 / 7
    assert s["chair_i"] == pytest.approx(2 / 9) and s["chair_s"] == pytest.approx(2 / 3)
    assert s["precision"] == pytest.approx(p) and s["recall"] == pytest.approx(rec)
    assert s["f1"] == pytest.approx(2 * p * rec / (p + rec)) and s["mean_length_words"] == pytest.approx(10)
    assert s["lemmatizer"] == "builtin-singular" and s["synonyms"]["headlab_default"] and s["images"] == 3
    unique = H.chair_from_coco(CAPTIONS, folder, lemmatizer="builtin", count="unique")
    assert unique.mentions.tolist() == [3, 3, 2] and unique.chair_i == pytest.approx(2 / 8)
    assert unique.recall == pytest.approx(rec)  # recall does not depend on repeats
    seg_only = H.chair_from_coco(CAPTIONS, folder, lemmatizer="builtin", use_captions=False)
    assert seg_only.hallucinated.tolist() == [1, 1, 2]  # bird and traffic light are only in c.jpg's captions
    with pytest.raises(InputError, match="not in the annotations"):
        H.chair_from_coco({"nope.jpg": "a dog"}, folder)
    with pytest.raises(InputError, match="2 captions for 1"):
        H.chair_eval(["a", "b"], [set()])


def test_chair_on_headlab_generator_names(tmp_path):
    scenes = [D.Scene(["bat", "cat"], [0, 5]), D.Scene(["moon"], [3])]
    files = D.write_dataset(tmp_path / "set", scenes)
    r = H.chair_from_coco([("00000.png", "Two bats and a ball."), ("00001.png", "The moon and stars.")],
                          tmp_path / "set", synonyms=files["synonyms"], lemmatizer="builtin")
    assert r.objects == [["bat", "ball"], ["moon", "star"]] and r.hallucinated.tolist() == [1, 1]
    assert r.recall == pytest.approx(2 / 3) and r.synonyms["sha256"] == H.load_synonym_list(files["synonyms"]).sha256


# ---------------------------------------------------------------------------------------------
# POPE builder


def pope_images():
    return [P.PopeImage("A.jpg", 1, ["person", "dog", "car", "bench"]),
            P.PopeImage("B.jpg", 2, ["person", "dog", "frisbee"]),
            P.PopeImage("C.jpg", 3, ["cat", "couch", "remote", "person"]),
            P.PopeImage("D.jpg", 4, ["car", "truck"])]  # two categories: not eligible


def test_pope_builder_properties():
    built = P.build_pope(pope_images(), seed=3)
    assert built.images == ["A.jpg", "B.jpg", "C.jpg"] and built.image_ids == [1, 2, 3]
    pool = {"person", "dog", "car", "bench", "frisbee", "cat", "couch", "remote"}  # truck: only in D
    for split, items in built.questions.items():
        assert [q["question_id"] for q in items] == list(range(1, 19))
        for k, im in enumerate(pope_images()[:3]):
            mine = items[6 * k:6 * k + 6]
            assert {q["image"] for q in mine} == {im.image}
            assert [q["label"] for q in mine] == ["yes", "no"] * 3
            assert [q["object"] for q in mine[::2]] == im.objects[:3]
            negatives = [q["object"] for q in mine[1::2]]
            assert len(set(negatives)) == 3 and not set(negatives) & set(im.objects) and set(negatives) <= pool, split
    pop = built.questions["popular"]  # frequency: person 3, dog 2, the rest 1 in first-seen order
    assert [q["object"] for q in pop[1:6:2]] == ["frisbee", "cat", "couch"]
    assert [q["object"] for q in pop[7:12:2]] == ["car", "bench", "cat"]
    assert [q["object"] for q in pop[13:18:2]] == ["dog", "car", "bench"]
    again = P.build_pope(pope_images(), seed=3)
    assert again.questions == built.questions  # seeded
    others = [P.build_pope(pope_images(), seed=s).questions["random"] for s in range(4, 9)]
    assert any(q != built.questions["random"] for q in others)


def cooccurrence_oracle(images):
    counts = {}
    for im in images:
        for a in im.objects:
            for b in im.objects:
                if a != b:
                    counts[a, b] = counts.get((a, b), 0) + 1
    return counts


def test_pope_adversarial_is_top_cooccurring_absent():
    images = pope_images()[:3]
    co = cooccurrence_oracle(images)
    built = P.build_pope(pope_images(), seed=0)
    adv = built.questions["adversarial"]
    for k, im in enumerate(images):
        taken = set(im.objects)
        for pos, neg in zip(adv[6 * k:6 * k + 6:2], adv[6 * k + 1:6 * k + 6:2], strict=True):
            options = {b: c for (a, b), c in co.items() if a == pos["object"] and b not in taken}
            if options:  # the repository's rule: the top co-occurring absent category of this positive
                assert co[pos["object"], neg["object"]] == max(options.values())
            taken.add(neg["object"])
    # by hand: B.jpg asks person → car (dog is present), dog → bench (person present, car taken)
    assert [q["object"] for q in adv[6:12]] == ["person", "car", "dog", "bench", "frisbee", adv[11]["object"]]
    total = P.build_pope(pope_images(), seed=0, adversarial="image-total").questions["adversarial"]
    assert [q["object"] for q in total[1::2]] == ["frisbee", "cat", "couch",  # A: frisbee co-occurs twice
                                                  "car", "bench", "cat",  # B: car and bench twice
                                                  "dog", "car", "bench"]  # C: dog twice (with person)


def test_pope_article_and_jsonl_round_trip(tmp_path):
    assert [P.article(w) for w in ("apple", "umbrella", "elephant", "dog", "unicorn", "hour", "one-way sign")] == [
        "an", "an", "an", "a", "a", "an", "a"]
    assert P.question_text("orange") == "Is there an orange in the image?"
    assert P.question_text("hair drier") == "Is there a hair drier in the image?"
    images = [P.PopeImage("E.jpg", 5, ["apple", "umbrella", "oven"]), P.PopeImage("F.jpg", 6, ["dog", "cat", "cup"])]
    built = P.build_pope(images)
    assert built.questions["random"][0]["text"] == "Is there an apple in the image?"
    files = built.write(tmp_path / "pope")
    for split in P.SPLITS:
        assert H.load_pope(files[f"pope_{split}"]) == built.questions[split]
    meta = json.loads(files["pope_build"].read_text())
    assert meta["images"] == ["E.jpg", "F.jpg"] and meta["config"]["per_image"] == 3
    with pytest.raises(InputError, match="3 images asked for, 2"):
        P.build_pope(images, n_images=3)
    many = [P.PopeImage(f"{k}.jpg", k, COCO_80[3 * k:3 * k + 3]) for k in range(10)]
    sample = P.build_pope(many, n_images=4, seed=1)
    assert len(sample.images) == 4 and sample.images == P.build_pope(many, n_images=4, seed=1).images
    assert sample.config["eligible_images"] == 10 and sample.config["categories"] == 12
    with pytest.raises(InputError, match="no absent category left"):  # A.jpg has 4 of the 5 categories of A, B
        P.build_pope(pope_images()[:2])


def test_pope_images_from_coco_folder(tmp_path):
    folder = write_coco(tmp_path / "c", [(7, "x.jpg"), (8, "y.jpg")],
                        instances=[(7, "dog"), (7, "cat"), (7, "dog"), (7, "apple"), (8, "cup")])
    images = P.coco_images(folder)
    assert [(im.image, im.image_id, im.objects) for im in images] == [("x.jpg", 7, ["dog", "cat", "apple"]),
                                                                      ("y.jpg", 8, ["cup"])]
    with pytest.raises(InputError, match="no image has 3"):
        P.build_pope(images[1:])


# ---------------------------------------------------------------------------------------------
# POPE answers and metrics


@pytest.mark.parametrize("answer, official, exact", [
    ("No, there is not.", "no", "no"),
    ("Yes.", "yes", "yes"),
    ("There is a dog.", "yes", "other"),
    ("Yes. There is no cat.", "yes", "yes"),  # official: the first sentence only
    ("NO", "yes", "no"),  # official is case-sensitive
    ("I am not sure", "no", "other"),
    ("  yes, a dog", "yes", "yes"),
    ("Nope", "yes", "other"),
])
def test_parsers(answer, official, exact):
    assert H.pope_answer(answer) == official and H.pope_answer(answer, "exact") == exact


def test_pope_metrics_by_hand():
    answers = ["Yes.", "There is a dog.", "No.", "Maybe"]
    labels = ["yes", "yes", "no", "no"]
    exact = H.pope_metrics(answers, labels, parser="exact")
    assert (exact["tp"], exact["fp"], exact["tn"], exact["fn"], exact["other"]) == (1, 0, 1, 1, 2)
    assert exact["accuracy"] == 0.5 and exact["precision"] == 1 and exact["recall"] == 0.5
    assert exact["f1"] == pytest.approx(2 / 3) and exact["yes_ratio"] == 0.25 and exact["parser"] == "exact"
    official = H.pope_metrics(answers, labels)
    assert (official["accuracy"], official["recall"], official["yes_ratio"]) == (0.75, 1.0, 0.75)
    assert official["precision"] == pytest.approx(2 / 3) and official["f1"] == pytest.approx(0.8)
    assert official["other"] == 0 and official["parser"] == "official"
    splits = H.pope_eval_splits({"random": answers, "popular": ["Yes."] * 4},
                                {"random": [{"label": x, "image": "i.jpg"} for x in labels],
                                 "popular": [{"label": x, "image": "j.jpg"} for x in labels]})
    assert splits["splits"]["popular"]["f1"] == pytest.approx(2 / 3)
    assert splits["mean_f1"] == pytest.approx((0.8 + 2 / 3) / 2) and splits["images"] == ["i.jpg", "j.jpg"]
    with pytest.raises(InputError, match="3 answers for 4"):
        H.pope_eval(answers[:3], labels)
    with pytest.raises(InputError, match="parser"):
        H.pope_answer("yes", "loose")


def test_answer_files(tmp_path):
    questions = [{"question_id": i, "image": "a.jpg", "text": "Is there a dog?", "label": "yes"} for i in (10, 11, 12)]
    qfile = tmp_path / "pope_random.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in questions))
    by_id = tmp_path / "answers.jsonl"
    by_id.write_text("".join(json.dumps({"question_id": i, "text": t}) + "\n"
                             for i, t in ((12, "No"), (10, "Yes"), (11, "yes"))))
    assert H.load_pope_answers(by_id, qfile) == ["Yes", "yes", "No"]  # matched by question id
    official_style = tmp_path / "official.json"  # the POPE repository's answer format, matched by order
    official_style.write_text("".join(json.dumps({"question": "is there a dog?", "answer": a}) + "\n"
                                      for a in ("yes", "no", "yes")))
    assert H.load_pope_answers(official_style, questions) == ["yes", "no", "yes"]
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"question_id": 10, "text": "Yes"}) + "\n")
    with pytest.raises(InputError, match=r"has 1 answers but .*pope_random.jsonl has 3 questions"):
        H.load_pope_answers(short, qfile)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text("".join(json.dumps({"question_id": i, "text": "Yes"}) + "\n" for i in (10, 11, 99)))
    with pytest.raises(InputError, match="no answer to question_id 12"):
        H.load_pope_answers(wrong, qfile)


# ---------------------------------------------------------------------------------------------
# Bootstrap


def chair_runs(copies: int, seed: int = 0):
    rng = random.Random(seed)
    base_caps, edit_caps, truth = [], [], []
    for _ in range(20 * copies):
        present = set(rng.sample(["dog", "cat", "car", "bus", "cup"], 2))
        absent = rng.choice([o for o in ["dog", "cat", "car", "bus", "cup"] if o not in present])
        named = sorted(present)
        base_caps.append("A " + " and a ".join(named[:1] if rng.random() < 0.3 else named)
                         + (f" and a {absent}." if rng.random() < 0.6 else "."))
        edit_caps.append("A " + " and a ".join(named[:1] if rng.random() < 0.3 else named)
                         + (f" and a {absent}." if rng.random() < 0.2 else "."))
        truth.append(present)
    m = H.ChairMatcher(H.load_synonym_list(), "builtin")
    ids = list(range(len(truth)))
    return H.chair_eval(base_caps, truth, m, image_ids=ids), H.chair_eval(edit_caps, truth, m, image_ids=ids)


def test_chair_bootstrap():
    base, edited = chair_runs(1)
    out = H.paired_bootstrap_chair(base, edited, n=1000)
    widths = {}
    for k in H.CHAIR_METRICS:
        e = out["metrics"][k]
        assert e["base"] == pytest.approx(getattr(base, k)) and e["edited"] == pytest.approx(getattr(edited, k))
        assert e["ci_low"] <= e["delta"] <= e["ci_high"]
        assert e["base_ci"][0] <= e["base"] <= e["base_ci"][1] and e["edited_ci"][0] <= e["edited"] <= e["edited_ci"][1]
        widths[k] = e["ci_high"] - e["ci_low"]
    assert out["metrics"]["chair_i"]["ci_high"] < 0  # fewer hallucinations, and the CI says so
    big = H.paired_bootstrap_chair(*chair_runs(16), n=1000)["metrics"]
    for k in ("chair_i", "chair_s", "f1"):
        assert big[k]["ci_high"] - big[k]["ci_low"] < 0.5 * widths[k]  # ~1/sqrt(16) narrower
    same = H.paired_bootstrap_chair(base, base, n=200)["metrics"]["chair_s"]
    assert same["delta"] == same["ci_low"] == same["ci_high"] == 0
    single = H.bootstrap_chair(base, n=500)["metrics"]["recall"]
    assert single["value"] == pytest.approx(base.recall) and single["ci"][0] <= single["value"] <= single["ci"][1]
    assert single["ci"][1] - single["ci"][0] > 0
    # old helper on the new result
    assert H.paired_bootstrap_chair_i(base, edited)["delta"] == pytest.approx(edited.chair_i - base.chair_i)
    with pytest.raises(InputError, match="same images"):
        H.paired_bootstrap_chair(base, H.chair_eval(["a dog"], [{"dog"}]))


def test_chair_bootstrap_resamples_images_not_captions():
    m = H.ChairMatcher(H.load_synonym_list(), "builtin")
    caps = ["A dog.", "A cat.", "A dog.", "A dog."]
    r = H.chair_eval(caps, [{"dog"}] * 4, m, image_ids=["x", "x", "y", "y"])  # two captions per image
    out = H.bootstrap_chair(r, n=400)
    assert out["n_images"] == 2
    # an image's two captions move together: CHAIR_s of a resample is 1/2 (x) or 0 (y) or 1/4 (both)
    sums = H._chair_sums(r, r.image_ids)
    idx = np.random.default_rng(0).integers(0, 2, size=(400, 2))
    assert set(np.round(H._chair_from_sums(sums[:, idx].sum(-1))["chair_s"], 3)) <= {0.0, 0.25, 0.5}


def test_pope_bootstrap():
    def run(n, p_yes_absent, seed):
        r = np.random.default_rng(seed)
        labels = ["yes", "no"] * n
        answers = [("Yes." if (lab == "yes" and r.random() < 0.9) or (lab == "no" and r.random() < p_yes_absent)
                    else "No.") for lab in labels]
        items = [{"question_id": i, "label": lab, "image": f"{i // 6}.jpg"} for i, lab in enumerate(labels)]
        return H.pope_eval(answers, items)

    base = {"random": run(150, 0.3, 1), "adversarial": run(150, 0.5, 2)}
    edited = {"random": run(150, 0.1, 3), "adversarial": run(150, 0.2, 4)}
    out = H.paired_bootstrap_pope(base, edited, n=1000)
    for split in base:
        for k in H.POPE_METRICS:
            e = out["splits"][split][k]
            assert e["ci_low"] <= e["delta"] <= e["ci_high"]
            assert e["base"] == pytest.approx(base[split].summary()[k])
    mf = out["mean_f1"]
    assert mf["base"] == pytest.approx((base["random"].summary()["f1"] + base["adversarial"].summary()["f1"]) / 2)
    assert mf["ci_low"] <= mf["delta"] <= mf["ci_high"] and mf["ci_low"] > 0
    small = H.paired_bootstrap_pope(run(20, 0.3, 1), run(20, 0.1, 3), n=1000)["splits"]["pope"]["accuracy"]
    large = H.paired_bootstrap_pope(run(320, 0.3, 1), run(320, 0.1, 3), n=1000)["splits"]["pope"]["accuracy"]
    assert large["ci_high"] - large["ci_low"] < 0.5 * (small["ci_high"] - small["ci_low"])
    with pytest.raises(InputError, match="same questions"):
        H.paired_bootstrap_pope(run(20, 0.3, 1), run(21, 0.3, 1))
