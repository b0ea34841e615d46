"""``analyze vhd`` on tiny-llava: a run is written with its heatmap, tables and tensors; bad inputs are one
``error:`` line, exit code 2, and no run directory."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from headlab.cli import analyze_app
from headlab.result import Result
from headlab.training import lvlm_data as D

runner = CliRunner()


def into(out):
    """--out and --name for a run at ``out``: the runs folder and the run's name."""
    return ["--out", str(out.parent), "--name", out.name]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("vhd")
    files = D.write_dataset(root / "set", D.eval_scenes("partner-missing", 3))
    prompts = root / "prompts.txt"
    prompts.write_text("Describe the image.\nWhat is in the image?\n")
    return files, prompts


def test_vhd_run(synth, tmp_path):
    files, prompts = synth
    out = tmp_path / "run"
    result = runner.invoke(analyze_app, ["vhd", "--model", "tiny-llava", "--images", str(files["images"]),
                                         "--prompts", str(prompts), "--annotations", str(files["annotations"]),
                                         "--max-new-tokens", "3", *into(out), "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "VHD on tiny-llava: 6 samples, 18 tokens" in result.output
    run = Result.load(out)
    assert run.tensors["mean_vhd"].shape == (4, 4)
    assert len(run.tables["heads"]) == 16 and len(run.tables["tokens"]) == 18
    assert (out / "figures" / "vhd_heatmap.html").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["analysis"] == "vhd"


@pytest.mark.parametrize("case", ["no_folder", "corrupt", "empty_prompts", "bad_remove", "no_annotation"])
def test_vhd_bad_inputs(synth, tmp_path, case):
    files, prompts = synth
    images = files["images"]
    args = {"--images": str(images), "--prompts": str(prompts)}
    extra: list[str] = []
    if case == "no_folder":
        args["--images"] = str(tmp_path / "nowhere")
        expected = "not a folder"
    elif case == "corrupt":
        folder = tmp_path / "imgs"
        folder.mkdir()
        (folder / "a.png").write_bytes(b"\x89PNG not really")
        args["--images"] = str(folder)
        expected = "not an image|corrupt"
    elif case == "empty_prompts":
        empty = tmp_path / "p.txt"
        empty.write_text("\n")
        args["--prompts"] = str(empty)
        expected = "is empty"
    elif case == "bad_remove":
        extra = ["--remove", "erase"]
        expected = "--remove"
    else:
        other = tmp_path / "ann.json"
        other.write_text(json.dumps({"images": [], "categories": [], "annotations": []}))
        extra = ["--annotations", str(other)]
        expected = "has no entry for 00000.png"
    out = tmp_path / "run"
    flat = [x for kv in args.items() for x in kv]
    result = runner.invoke(analyze_app, ["vhd", "--model", "tiny-llava", *flat, *extra, *into(out)])
    assert result.exit_code == 2, result.output
    import re

    assert result.output.startswith("error:") and re.search(expected, result.output), result.output
    assert "Traceback" not in result.output
    assert not out.exists()
