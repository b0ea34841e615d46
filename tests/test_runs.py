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
