"""The hallucination page renders real ``analyze hallucination`` runs (tiny-llava on a synthetic icon set, CHAIR and
POPE, with random controls): the metric tables and chart hold the run's numbers (checked against a hand count of the
planted caption), hallucinated objects are marked in escaped HTML, wrong POPE answers are highlighted, T-VHD is shown
only when the run has it, and nothing outside the runs folder is read."""

from __future__ import annotations

import base64
import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from headlab.analyses import hallucination_eval as E
from headlab.analyses import hallucination_metrics as M
from headlab.dashboard import launch
from headlab.dashboard.views import hallucination as V
from headlab.training import lvlm_data

CONFIG = {"methods": ["none", "pai"], "controls": True, "n": 3, "max_new_tokens": 4, "resamples": 50}


def _plant(data):
    """(image, present object, absent object) for the first CHAIR image: the caption planted for ``none`` names one
    object the image holds, one it does not (plural and singular), "baseball bat" (= bat, absent, by the set's
    synonym list) and a script tag."""
    images = E.chair_images(data, CONFIG["n"], seed=0)
    matcher = M.ChairMatcher(M.load_synonym_list(data / "synonyms.txt"), "builtin")
    truth = M.load_coco_truth(data, matcher)
    for image in images:
        held = truth.objects[image.name]
        absent = [o for o in ("house", "tree", "star", "coat", "key") if o not in held]
        if "bat" not in held and absent:
            return image.name, sorted(held)[0], absent[0]
    raise AssertionError("no image of the synthetic set lacks a bat")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, load_model):
    root = tmp_path_factory.mktemp("hall")
    data, runs_dir, outside = root / "data", root / "runs", root / "outside"
    lvlm_data.write_dataset(data, lvlm_data.eval_scenes("weak", 4))
    image, present, absent = _plant(data)
    caption = f"A {present} and two {absent}s <script>alert('x')</script> by a {absent} and a baseball bat."
    real = E.generate_all

    def generate_all(loaded, jobs, method, **kwargs):  # the real generations, one caption replaced by the plant
        texts = real(loaded, jobs, method, **kwargs)
        if method.settings()["method"] == "none" and jobs[0][1] == E.CAPTION_PROMPT:
            texts = [caption if path.name == image else text for (path, _), text in zip(jobs, texts, strict=True)]
        return texts

    loaded = load_model("tiny-llava")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(E, "generate_all", generate_all)
        chair = E.analyze_hallucination(loaded, data, E.HallucinationConfig(bench="chair", **CONFIG), progress=False)
    chair.save(runs_dir, "chair")
    pope = E.analyze_hallucination(loaded, data, E.HallucinationConfig(bench="pope", **CONFIG), progress=False)
    pope.save(runs_dir, "pope")
    # A t_vhd table (columns method, image, step, token, t_vhd) as a run that computed it would hold.
    t_vhd = pd.DataFrame({"method": ["none"] * 3 + ["pai"] * 2, "image": [image] * 5, "step": [2, 0, 1, 0, 1],
                          "token": ["c", "a", "b", "x", "y"], "t_vhd": [3.0, 1.0, 2.0, 5.0, 4.0]})
    chair.tables["t_vhd"] = t_vhd
    chair.save(runs_dir, "chair-tvhd")
    # The image lives outside the runs folder; the page must not read it (the data folder is gone, too).
    outside.mkdir()
    shutil.copy(data / "images" / image, outside / image)
    shutil.rmtree(data)
    return {"dir": runs_dir, "outside": outside, "image": image, "present": present, "absent": absent,
            "chair": chair, "pope": pope, "t_vhd": t_vhd}


def _open(runs, name: str, monkeypatch) -> AppTest:
    monkeypatch.setenv("HEADLAB_RUNS", str(runs["dir"]))
    at = AppTest.from_file(str(launch.APP_FILE), default_timeout=120)
    at.query_params["page"] = "run"
    at.query_params["run"] = name
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def _trace(at: AppTest, index: int = 0) -> dict:
    """The first trace of the page's ``index``-th chart, with x and y as plain lists (plotly packs arrays)."""
    trace = json.loads(at.get("plotly_chart")[index].proto.spec)["data"][0]
    for name in ("x", "y"):
        value = trace[name]
        if isinstance(value, dict):
            value = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
        trace[name] = list(value)
    return trace


def test_chair_page_metrics_marks_and_escaping(runs, monkeypatch):
    at = _open(runs, "chair", monkeypatch)
    assert at.header[0].value == "Hallucination fixes: chair"
    metrics = runs["chair"].tables["metrics"].set_index(["method", "metric"])
    # Hand count: three captions for none, only the planted one names an absent object -> CHAIR_s = 1/3; its
    # mentions are present (correct) + absent x2 + bat (hallucinated) -> CHAIR_i = 3/4. The others say "::::".
    assert metrics.loc[("none", "chair_s"), "value"] == pytest.approx(1 / 3)
    assert metrics.loc[("none", "chair_i"), "value"] == pytest.approx(3 / 4)
    table, deltas = at.dataframe[0].value, at.dataframe[1].value
    assert table["method"].tolist() == ["none", "pai", "pai-control"]  # the control next to its method
    assert table.set_index("method").loc["none", "chair_s"].startswith("0.333 [")
    row = metrics.loc[("none", "chair_s")]
    assert table.set_index("method").loc["none", "chair_s"] == (
        f"{row['value']:.3g} [{row['ci_low']:.3g}, {row['ci_high']:.3g}]")
    assert deltas["method"].tolist() == ["pai", "pai-control"]
    for label in ("pai", "pai-control"):
        generated = runs["chair"].tables["captions"].query("method == @label")
        if (generated["hallucinated"] == 0).all():  # the tiny model names no object: Δ CHAIR_s = -1/3 exactly
            assert deltas.set_index("method").loc[label, "chair_s"].startswith("-0.333 [")
    bars = _trace(at)  # the first metric, chair_s, as values with 95% CIs
    assert list(bars["x"]) == ["none", "pai", "pai-control"]
    assert bars["y"][0] == pytest.approx(1 / 3)
    lines = [m.value for m in at.markdown if m.value.startswith("- **pai")]
    # Three images: too few for a bootstrap CI to carry a verdict, whatever the interval (issue 25).
    assert len(lines) == 2 and all("no verdict: n = 3 is too few" in line for line in lines), lines
    assert not any("excludes 0" in line or "overlap" in line for line in lines)

    body = "".join(h.proto.body for h in at.get("html"))
    absent, present = runs["absent"], runs["present"]
    marked = re.findall(r"<mark [^>]*>([^<]*)</mark>", body)
    # plural and singular, and "baseball bat" (a bat by the run's own list, stored in the run); the held object
    # is not marked
    assert marked == [f"{absent}s", absent, "baseball bat"]
    assert present not in marked
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in body and "<script" not in body
    assert "not located in the text" not in body
    captions = [c.value for c in at.caption]
    assert any("is not in the runs folder" in c for c in captions)
    assert not at.get("image")
    assert not any(s.value.startswith("T-VHD") for s in at.subheader)
    manifest = json.loads((runs["dir"] / "chair" / "manifest.json").read_text())
    figures = V.HallucinationView().key_figures(manifest)  # the Runs table's line
    assert figures["bench"] == "chair" and figures["methods"] == "none, pai, pai-control"
    assert figures["chair_i (none)"] == pytest.approx(3 / 4) and figures["best Δ chair_i"].startswith("pai ")


def test_image_shown_only_from_inside_the_runs_folder(runs, monkeypatch):
    images = runs["dir"] / ".images"
    images.mkdir()
    try:
        (images / runs["image"]).symlink_to(runs["outside"] / runs["image"])  # a link leading outside: refused
        at = _open(runs, "chair", monkeypatch)
        assert not at.get("image")
        (images / runs["image"]).unlink()
        shutil.copy(runs["outside"] / runs["image"], images / runs["image"])
        at = _open(runs, "chair", monkeypatch)
        assert len(at.get("image")) == 1
    finally:
        shutil.rmtree(images)
    run = runs["chair"]
    assert V.find_image(run, "../outside/" + runs["image"]) is None and V.find_image(run, "..png") is None


def test_pope_page_answers_and_splits(runs, monkeypatch):
    at = _open(runs, "pope", monkeypatch)
    assert [s.value for s in at.subheader][:2] == ["Metrics per method", "Answers per question"]
    split = at.radio(key="run-pope-split")
    assert split.options == ["random", "popular", "adversarial", "all"]
    split.set_value("all").run()
    assert at.dataframe[0].value.columns.tolist() == ["method", "mean_f1"]
    mean = runs["pope"].tables["metrics"].query("split == 'all' and method == 'none'")["value"].item()
    assert _trace(at)["y"][0] == pytest.approx(mean)
    answers = next(d for d in at.dataframe if "read_as" in d.value.columns)
    shown = answers.value
    assert len(shown) == len(runs["pope"].tables["answers"])
    wrong_rows = sorted({int(r) for r in re.findall(r"row(\d+)_col0", answers.proto.arrow_data.styler.styles)})
    assert wrong_rows == [i for i in range(len(shown)) if shown["label"][i] != shown["read_as"][i]]
    at.multiselect(key="run-pope-ans-split").set_value(["popular"])
    at.toggle(key="run-pope-ans-wrong").set_value(True).run()
    assert not at.exception
    shown = next(d for d in at.dataframe if "read_as" in d.value.columns).value
    assert set(shown["split"]) <= {"popular"} and (shown["label"] != shown["read_as"]).all()
    expected = runs["pope"].tables["answers"].query("split == 'popular' and label != read_as")
    assert len(shown) == len(expected)


def test_t_vhd_shown_when_the_run_has_it(runs, monkeypatch):
    at = _open(runs, "chair-tvhd", monkeypatch)
    assert "T-VHD per generated token" in [s.value for s in at.subheader]
    figure = _trace(at, -1)
    assert list(figure["x"]) == ["0: a", "1: b", "2: c"] and list(figure["y"]) == [1.0, 2.0, 3.0]  # by step
    at.selectbox(key="run-chair-tvhd-tvhd-method").set_value("pai").run()
    figure = _trace(at, -1)
    assert list(figure["y"]) == [5.0, 4.0]


def test_highlight_by_hand():
    html, unplaced = V.highlight_caption("Two Houses & a house; a hot dog, not a dog.", ["house", "house", "dog"])
    assert re.findall(r"<mark [^>]*>([^<]*)</mark>", html) == ["Houses", "house", "dog"]  # "hot dog" is not a dog
    assert "&amp;" in html and unplaced == []
    coco = M.load_synonym_list().entries  # headlab's own list: synonyms are marked too
    html, unplaced = V.highlight_caption("A man at the dining tables.", ["person", "dining table"], coco)
    assert re.findall(r"<mark [^>]*>([^<]*)</mark>", html) == ["man", "dining tables"] and unplaced == []
    html, unplaced = V.highlight_caption("İİ a house", ["house", "cat"])  # İ lower-cases to two characters
    assert html.endswith('title="house">house</mark>') and unplaced == ["cat"]


def test_order_and_verdicts_by_hand():
    # none first, then run order, each control right after its method (a control without its method stays)
    assert V.method_order(["pai-control", "vhr", "none", "pai", "var-control"]) == [
        "none", "vhr", "pai", "pai-control", "var-control"]
    rows = [("none", 0.5, 0.4, 0.6, None, None, None), ("pai", 0.3, 0.2, 0.35, -0.2, -0.3, -0.1),
            ("pai-control", 0.45, 0.36, 0.55, -0.05, -0.1, 0.02), ("vhr", 0.5, 0.4, 0.6, 0.0, 0.0, 0.0)]
    metrics = pd.DataFrame([{"method": m, "metric": "chair_s", "value": v, "ci_low": lo, "ci_high": hi,
                             "delta": d, "delta_ci_low": dlo, "delta_ci_high": dhi}
                            for m, v, lo, hi, d, dlo, dhi in rows])
    pai, control, vhr = V.verdicts(metrics, "chair_s", None)
    assert "lowers chair_s (lower is better) by 0.2" in pai and "**excludes 0**" in pai and "**do not overlap**" in pai
    assert "includes 0" in control and "random control" in control
    assert "unchanged" in vhr and "no control in this run" in vhr


def test_no_verdict_below_the_minimum_sample():
    """The same numbers on 4 images: no "excludes 0", no "differs from its control" (issue 25)."""
    rows = [("none", 0.5, 0.4, 0.6, None, None, None), ("pai", 0.3, 0.2, 0.35, -1.0, -1.0, -1.0),
            ("pai-control", 0.45, 0.36, 0.55, -0.05, -0.1, 0.02)]
    metrics = pd.DataFrame([{"method": m, "metric": "chair_s", "value": v, "ci_low": lo, "ci_high": hi, "delta": d,
                             "delta_ci_low": dlo, "delta_ci_high": dhi, "n": 4}
                            for m, v, lo, hi, d, dlo, dhi in rows])
    for line in V.verdicts(metrics, "chair_s", None):
        assert "no verdict: n = 4 is too few" in line and "excludes" not in line and "overlap" not in line
    at_twenty = metrics.assign(n=20)
    assert "**excludes 0**" in V.verdicts(at_twenty, "chair_s", None)[0]
