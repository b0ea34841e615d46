"""``analyze hallucination``'s sample: below ``MIN_CI_N`` images the report gives no verdict on a CI, missing
images are refused unless allowed (then counted and listed), and the scoring settings are words, not a dict.

No model: generation is replaced by fixed captions (``none`` names every object of the synthetic set, so every
image has a hallucination; ``pai`` names none), so the paired difference of CHAIR_s is -1 with the CI [-1, -1]
whatever the number of images: only the sample size decides whether the report may call it an effect.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from headlab.analyses import hallucination_eval as E
from headlab.analyses import hallucination_metrics as M
from headlab.errors import InputError
from headlab.training import lvlm_data as D

LOADED = SimpleNamespace(name="fake-lvlm", title="fake-lvlm")  # only the names are read once generation is replaced


def _data(tmp_path, n_images: int, missing: int = 0):
    root = tmp_path / "set"
    D.write_dataset(root, D.eval_scenes("in-distribution", n_images))
    gone = sorted((root / "images").iterdir())[:missing]
    for path in gone:
        path.unlink()
    return root, [p.name for p in gone]


@pytest.fixture
def fixed_captions(monkeypatch):
    everything = "I see " + ", ".join(f"a {o}" for o in D.OBJECTS) + "."

    def generate_all(loaded, jobs, method, **kwargs):
        return [everything if method.settings()["method"] == "none" else "Nothing." for _ in jobs]

    monkeypatch.setattr(E, "generate_all", generate_all)


def _run(data, n: int, **config):
    heard: list[str] = []
    config = E.HallucinationConfig(methods=["none", "pai"], n=n, resamples=200, **config)
    result = E.analyze_hallucination(LOADED, data, config, progress=False, warn=heard.append)
    return result, heard


def test_small_sample_gets_no_verdict_and_a_warning(tmp_path, fixed_captions):
    data, _ = _data(tmp_path, 4)
    result, heard = _run(data, 4)
    row = result.tables["metrics"].set_index(["method", "metric"]).loc[("pai", "chair_s")]
    assert (row["delta"], row["delta_ci_low"], row["delta_ci_high"], row["n"]) == (-1, -1, -1, 4)
    assert "excludes 0" not in result.report and "effect" not in result.report.replace("no evidence of an effect", "")
    assert "too few for a CI to mean anything" in result.report
    assert len(heard) == 1 and "4 images: too few for a bootstrap CI" in heard[0]
    assert result.summary["warnings"] == heard and result.summary["ci_meaningful"] is False
    assert result.summary["n_evaluated"] == 4 and f"- warning: {heard[0]}" in result.report


def test_enough_images_get_the_verdict(tmp_path, fixed_captions):
    data, _ = _data(tmp_path, E.MIN_CI_N)
    result, heard = _run(data, E.MIN_CI_N)
    assert heard == [] and result.summary["ci_meaningful"] is True
    line = next(line for line in result.report.splitlines() if line.startswith("- pai:"))
    assert "chair_s -1 [-1, -1] excludes 0" in line and "no verdict" not in line


def test_missing_images_are_refused_then_listed_when_allowed(tmp_path, fixed_captions):
    data, gone = _data(tmp_path, 20, missing=6)
    with pytest.raises(InputError) as refused:
        E.chair_images(data, 20, seed=0)
    message = str(refused.value)
    assert message.startswith("6 of 20 annotated images are not in") and "--allow-missing-images" in message
    assert ", ".join(gone[:5]) + " and 1 more" in message and "the 14 that are" in message
    with pytest.raises(InputError, match="6 of 20"):  # the analysis refuses too, before any generation
        _run(data, 20)

    assert len(E.chair_images(data, 20, seed=0, allow_missing=True)) == 14
    result, heard = _run(data, 20, allow_missing_images=True)
    assert result.summary["n_evaluated"] == 14 and result.summary["missing_images"] == 6
    assert list(result.tables["missing_images"]["image"]) == gone
    assert len(result.tables["images"]) == 14 and not set(gone) & set(result.tables["images"]["image"])
    assert "n = 14 images (--n 20 asked; 6 of the 20 annotated images missing on disk)" in result.report
    assert len(heard) == 2 and heard[0].startswith("6 of 20 annotated images are missing on disk (00000.png, ")
    assert "evaluating 14 of the 14 there" in heard[0] and heard[1].startswith("14 images: too few")


def test_scoring_settings_are_words(tmp_path, fixed_captions):
    data, _ = _data(tmp_path, 3)
    (data / "synonyms.txt").unlink()  # the data folder's own list is gone: headlab's COCO list scores
    result, _ = _run(data, 3)
    scoring = next(line for line in result.report.splitlines() if line.startswith("- scoring:"))
    assert scoring.startswith("- scoring: synonyms: headlab's COCO list (80 objects;")
    assert "plural matching: on" in scoring and "{" not in result.report
    (tmp_path / "syn.txt").write_text("cat, kitten\n")
    own = E.scoring_text({"lemmatizer": "builtin-singular", "count": "every",
                          "synonyms": M.load_synonym_list(tmp_path / "syn.txt").describe()})
    assert str(tmp_path / "syn.txt") in own and "1 objects" in own and "built-in singulariser" in own
    assert E.scoring_text({"parser": "official", "splits": ["random", "popular"]}) == (
        "answers read by the official parser; splits: random, popular")
