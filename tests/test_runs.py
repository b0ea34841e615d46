"""The run store: atomic writes, safe names, incomplete and corrupt runs refused."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from headlab.errors import RunStoreError
from headlab.result import Result
from headlab.runs import run_path, write_run


def small_result() -> Result:
    return Result("sinks", "tiny", {"eps": 0.3}, tables={"t": pd.DataFrame({"a": [1, 2]})},
                  tensors={"x": torch.arange(3.0)}, summary={"k": 1}, report="# r\n", input_hash="abc")


def test_round_trip(tmp_path):
    path = small_result().save(tmp_path, "run-1")
    back = Result.load(path)
    assert back.tables["t"]["a"].tolist() == [1, 2]
    assert torch.equal(back.tensors["x"], torch.arange(3.0))
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["headlab_version"]
    assert manifest["input_hash"] == "abc" and manifest["config"] == {"eps": 0.3}


def test_failure_while_writing_leaves_nothing(tmp_path):
    def explode(tmp):
        (tmp / "half.txt").write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_run(tmp_path, "r", explode)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["../x", "/etc", "a/b", "..", ".hidden", ""])
def test_unsafe_names_are_refused(tmp_path, name):
    with pytest.raises(RunStoreError):
        run_path(tmp_path, name)


def test_incomplete_and_corrupt_runs_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunStoreError, match="no manifest.json"):
        Result.load(tmp_path / "empty")
    path = small_result().save(tmp_path, "ok")
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(RunStoreError, match="corrupt"):
        Result.load(path)
    (path / "manifest.json").write_text(json.dumps({"status": "running"}))
    with pytest.raises(RunStoreError, match="not complete"):
        Result.load(path)


def test_existing_run_is_not_overwritten(tmp_path):
    small_result().save(tmp_path, "same")
    with pytest.raises(RunStoreError, match="already exists"):
        small_result().save(tmp_path, "same")


# ------------------------------------------------------------------ issue 12: provenance, permissions, names


def test_manifest_records_prompts_settings_and_software(tmp_path):
    import importlib.metadata

    import headlab
    from headlab.provenance import git_state

    run = small_result()
    run.prompts = ["first prompt", "second\nprompt"]
    run.provenance = {"prompt_source": {"kind": "stdin"}, "settings": {"dtype": "float32", "device": "cpu"}}
    path = run.save(tmp_path, "prov")
    provenance = json.loads((path / "manifest.json").read_text())["provenance"]
    assert provenance["prompts"]["texts"] == ["first prompt", "second\nprompt"]
    assert provenance["prompts"]["source"] == {"kind": "stdin"} and provenance["prompts"]["n"] == 2
    assert provenance["settings"] == {"dtype": "float32", "device": "cpu"}
    versions = provenance["versions"]
    assert versions["headlab"] == headlab.__version__
    assert versions["torch"] == importlib.metadata.version("torch")
    assert versions["transformers"]
    assert provenance["git"] == git_state()  # the checkout's commit when run from one, else None
    assert Result.load(path).prompts == run.prompts


def test_long_prompts_go_to_a_file_in_the_run(tmp_path):
    from headlab.provenance import INLINE_LIMIT, PROMPTS_FILE

    run = small_result()
    run.prompts = ["x" * 1000] * (INLINE_LIMIT // 1000 + 1)
    path = run.save(tmp_path, "long")
    record = json.loads((path / "manifest.json").read_text())["provenance"]["prompts"]
    assert "texts" not in record and record["file"] == PROMPTS_FILE
    assert json.loads((path / PROMPTS_FILE).read_text()) == run.prompts
    assert Result.load(path).prompts == run.prompts


def test_tensors_file_has_the_permissions_of_the_other_files(tmp_path):
    import stat

    path = small_result().save(tmp_path, "perm")
    mode = stat.S_IMODE((path / "report.md").stat().st_mode)
    assert stat.S_IMODE((path / "tensors.safetensors").stat().st_mode) == mode
    assert stat.S_IMODE((path / "manifest.json").stat().st_mode) == mode


@pytest.mark.parametrize("model,expected", [
    ("smollm2-135m", "sinks-smollm2-135m-"),
    ("/models/my model [v2]/", "sinks-my-model-v2-"),
    ("/data/Modèle ünï", "sinks-Modele-uni-"),
    ("/x/...", "sinks-model-"),
    ("org/" + "a" * 300, "sinks-" + "a" * 48 + "-"),
])
def test_default_run_names_are_always_valid(tmp_path, model, expected):
    import datetime as dt

    from headlab.runs import default_run_name

    name = default_run_name("sinks", model, dt.datetime(2026, 1, 2, 3, 4, 5))
    assert name == expected + "20260102-030405"
    run_path(tmp_path, name)  # accepted by the run store


def test_names_longer_than_the_limit_are_refused(tmp_path):
    from headlab.runs import MAX_NAME

    run_path(tmp_path, "a" * MAX_NAME)
    with pytest.raises(RunStoreError, match=f"at most {MAX_NAME}"):
        run_path(tmp_path, "a" * (MAX_NAME + 1))


def test_check_writable_creates_nothing(tmp_path):
    from headlab.runs import check_writable

    assert check_writable(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists() and list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunStoreError, match="is an existing file|is a file"):
        check_writable(tmp_path / "file" / "runs")


def test_load_refuses_manifest_names_with_path_parts(tmp_path):
    path = small_result().save(tmp_path, "evil")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["tables"] = ["../../outside"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RunStoreError, match="not a plain file name"):
        Result.load(path)
