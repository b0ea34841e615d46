"""``analyze hallucination`` and ``headlab fix`` on tiny-llava with a synthetic COCO/POPE set: the run's table
is the metrics of its own stored outputs, controls and deltas are where they belong, and bad inputs are one
``error:`` line, exit code 2, no run directory, before the model loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from headlab.analyses.hallucination_metrics import chair_from_coco, load_synonym_list, pope_eval
from headlab.cli import analyze_app, headlab_app
from headlab.result import Result
from headlab.training import lvlm_data as D

runner = CliRunner()


def into(out):
    """--out and --name for a run at ``out``: the runs folder and the run's name."""
    return ["--out", str(out.parent), "--name", out.name]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("fixes") / "set"
    D.write_dataset(root, D.eval_scenes("weak", 4))
    return root


def run(args):
    return runner.invoke(analyze_app, ["hallucination", "--model", "tiny-llava", "--threads", "1", "--resamples",
                                       "50", *args])


def test_chair_run_scores_its_own_captions(synth, tmp_path):
    out = tmp_path / "chair"
    result = run(["--bench", "chair", "--data", str(synth), "--methods", "none,pai,paint", "--controls", "--n", "3",
                  "--max-new-tokens", "4", "--set", "pai.alpha=0.5", *into(out), "--quiet"])
    assert result.exit_code == 0, result.output
    r = Result.load(out)
    metrics, captions = r.tables["metrics"], r.tables["captions"]
    assert list(dict.fromkeys(metrics["method"])) == ["none", "pai", "pai-control", "paint", "paint-control"]
    assert metrics[metrics["method"] == "none"]["delta"].isna().all()
    assert metrics[metrics["method"] != "none"]["delta"].notna().all()
    has_control = metrics["method"].isin(["pai", "paint"])
    assert metrics[has_control]["vs_control"].notna().all() and metrics[~has_control]["vs_control"].isna().all()
    value = metrics.set_index(["method", "metric"])["value"]
    versus = metrics.set_index(["method", "metric"])["vs_control"]
    for metric in ("chair_s", "recall", "mean_length_words"):
        assert versus["paint", metric] == pytest.approx(value["paint", metric] - value["paint-control", metric])
    images = list(r.tables["images"]["image"])
    assert len(images) == 3 and images == sorted(images)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["options"] == {"pai": {"alpha": 0.5}}
    assert manifest["config"]["methods_run"]["pai"]["alpha"] == 0.5
    assert manifest["config"]["methods_run"]["paint-control"]["control"] is True
    synonyms = load_synonym_list(synth / "synonyms.txt")
    for label in ("none", "paint-control"):
        mine = captions[captions["method"] == label]
        again = chair_from_coco(list(zip(mine["image"], mine["caption"], strict=True)), synth, synonyms=synonyms)
        table = metrics[metrics["method"] == label].set_index("metric")["value"]
        assert table["chair_i"] == pytest.approx(again.chair_i) and table["recall"] == pytest.approx(again.recall)
        assert table["mean_length_words"] == pytest.approx(again.mean_length_words)
    row = metrics[(metrics["method"] == "pai") & (metrics["metric"] == "chair_i")].iloc[0]
    assert row["ci_low"] <= row["value"] <= row["ci_high"]
    words = r.tables["synonyms"]
    assert dict(zip(words["word"], words["object"], strict=True)) == synonyms.entries
    assert "t_vhd" not in r.tables


def test_t_vhd_of_every_caption_token(synth, tmp_path):
    from headlab.analyses.vhd import t_vhd, vhd_of
    from headlab.lvlm import LvlmSample

    out = tmp_path / "tvhd"
    result = run(["--bench", "chair", "--data", str(synth), "--methods", "none", "--n", "2",
                  "--max-new-tokens", "3", "--t-vhd", *into(out), "--quiet"])
    assert result.exit_code == 0, result.output
    table = Result.load(out).tables["t_vhd"]
    assert set(table["method"]) == {"none"} and len(table) == 2 * 3
    import headlab
    from headlab.analyses.lvlm_fixes import generate_fixed

    lvlm = headlab.load("tiny-llava")
    first = table[table["image"] == table["image"].iloc[0]]
    sample = [LvlmSample("Describe the image.", [synth / "images" / first["image"].iloc[0]])]
    tokens = generate_fixed(lvlm, sample, max_new_tokens=3)
    trace = vhd_of(lvlm, sample, tokens)
    expected = t_vhd(trace.vhd, aggregation="layer_topk_sum", z_norm_without=trace.z_norm_without)[0]
    assert list(first["t_vhd"]) == pytest.approx(expected.tolist(), rel=1e-5)


def test_pope_run_scores_its_own_answers(synth, tmp_path):
    out = tmp_path / "pope"
    result = run(["--bench", "pope", "--data", str(synth), "--methods", "none,vaf", "--n", "4",
                  "--max-new-tokens", "3", "--parser", "exact", *into(out), "--quiet"])
    assert result.exit_code == 0, result.output
    r = Result.load(out)
    answers, metrics = r.tables["answers"], r.tables["metrics"]
    assert len(answers) == 2 * 3 * 4
    for (label, split), part in answers.groupby(["method", "split"]):
        items = [{"label": lab, "question_id": q} for lab, q in zip(part["label"], part["question_id"], strict=True)]
        again = pope_eval(list(part["answer"]), items, parser="exact").summary()
        row = metrics[(metrics["method"] == label) & (metrics["split"] == split)].set_index("metric")["value"]
        assert row["accuracy"] == pytest.approx(again["accuracy"])
        assert row["yes_ratio"] == pytest.approx(again["yes_ratio"])
    mean = metrics[(metrics["split"] == "all") & (metrics["method"] == "vaf")]["value"].iloc[0]
    per_split = metrics[(metrics["metric"] == "f1") & (metrics["method"] == "vaf") & (metrics["split"] != "all")]
    assert mean == pytest.approx(np.mean(per_split["value"]))
    assert r.summary["parser"] == "exact"


@pytest.mark.parametrize("case", ["method", "setting", "setting_field", "setting_type", "setting_range",
                                  "setting_remove", "folder", "split", "synonyms", "bench", "n"])
def test_bad_inputs_are_one_line(synth, tmp_path, case):
    args = {"method": ["--methods", "none,nope"],
            "setting": ["--methods", "none,pai", "--set", "alpha=1"],
            "setting_field": ["--methods", "none,pai", "--set", "pai.strength=1"],
            "setting_type": ["--methods", "none,pai", "--set", "pai.alpha=strong"],
            "setting_range": ["--methods", "none,var", "--set", "var.p=1.5"],
            "setting_remove": ["--methods", "none,vhr", "--set", "vhr.remove=cut"],
            "folder": ["--data", str(tmp_path / "nowhere")],
            "split": ["--bench", "pope", "--splits", "random,weird"],
            "synonyms": ["--synonyms", str(tmp_path / "none.txt")],
            "bench": ["--bench", "vqa"],
            "n": ["--n", "0"]}[case]
    if "--data" not in args:
        args = ["--data", str(synth), *args]
    out = tmp_path / "run"
    result = run([*args, *into(out)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[0].startswith("error:") and "Traceback" not in result.output
    assert not out.exists()


def test_fix_prints_each_method_and_writes_a_run(synth, tmp_path):
    image = sorted((synth / "images").iterdir())[0]
    result = runner.invoke(headlab_app, ["fix", "--model", "tiny-llava", "--method", "none", "--method", "vaf",
                                         "--image", str(image), "--max-new-tokens", "3", "--threads", "1",
                                         "--out", str(tmp_path), "--name", "f", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "none" in result.output and "vaf" in result.output
    table = Result.load(tmp_path / "f").tables["generations"]
    assert list(table["method"]) == ["none", "vaf"]
    assert table["generation"].tolist()[0] in result.output.replace("\n", "")  # the printed answer is the saved one
    for args, message in ((["--method", "nope"], "--method: unknown nope"),
                          (["--set", "pai.nosuchfield=1"], "its settings are adaptive, alpha"),
                          (["--image", str(tmp_path / "missing.png")], "does not exist")):
        bad = runner.invoke(headlab_app, ["fix", "--model", "tiny-llava", "--image", str(image), *args, "--out",
                                          str(tmp_path), "--name", "bad"])
        assert bad.exit_code == 2 and bad.output.startswith("error:") and message in bad.output, bad.output
        assert "--images" not in bad.output and "--methods" not in bad.output
    assert not (tmp_path / "bad").exists()
