"""``analyze hallucination`` split over job-array shards gives the run of one process: captions, answers, T-VHD
rows, the CHAIR / POPE tables with their bootstrap CIs, the methods' settings and the report.

tiny-llava on a synthetic set of 5 images, batches of 2 (3 batches, the last short), ``none``, PAI and VAR with
their random controls: 15 units of (run, batch), so shard boundaries fall inside a run. tiny-llava has no massive
activation, so VAR's sink-dimension finder is replaced by one that answers from the batch's token ids: a process
that starts inside VAR's run must be shown VAR's first batch, or its dims (in the settings) differ.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from headlab.analyses import hallucination_eval as E
from headlab.errors import RunStoreError
from headlab.result import Result
from headlab.tally import Scale, Shard, ShardDone, load_states, save_states, scaled
from headlab.training import lvlm_data as D

CONFIG = {"methods": ["none", "pai", "var"], "controls": True, "n": 5, "batch_size": 2, "max_new_tokens": 3,
          "resamples": 50}


def _dims_of_batch(loaded, tensors, **kwargs):
    """A sink dimension that depends on the batch (tiny-llava shows none of its own)."""
    return [int(tensors["input_ids"].sum()) % 7], []


@pytest.fixture(scope="module")
def lvlm(load_model):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("headlab.analyses.visual_sinks.find_sink_dims", _dims_of_batch)
        yield load_model("tiny-llava")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hall-scale") / "set"
    D.write_dataset(root, D.eval_scenes("weak", 5))
    return root


def _config(bench: str) -> E.HallucinationConfig:
    return E.HallucinationConfig(bench=bench, t_vhd=bench == "chair", **CONFIG)


def _shards(lvlm, data, bench: str, n: int) -> list[dict]:
    parts = []
    for i in range(n):
        with pytest.raises(ShardDone) as done, scaled(Scale(mode="shard", shard=Shard(i, n))):
            E.analyze_hallucination(lvlm, data, _config(bench), progress=False)
        assert done.value.name == "generate"
        parts.append(done.value.states)
    return parts


def _merged(lvlm, data, bench: str, parts: list[dict]) -> Result:
    with scaled(Scale(mode="merge", states=parts)):
        return E.analyze_hallucination(lvlm, data, _config(bench), progress=False)


def _assert_same(whole: Result, other: Result) -> None:
    assert set(whole.tables) == set(other.tables)
    for name, table in whole.tables.items():
        pd.testing.assert_frame_equal(table, other.tables[name], check_exact=False, rtol=1e-6, obj=name)
    assert whole.summary == other.summary
    assert whole.config == other.config  # the settings each method ran with, VAR's dims among them
    assert whole.report == other.report


@pytest.fixture(scope="module")
def chair(lvlm, data) -> Result:
    result = E.analyze_hallucination(lvlm, data, _config("chair"), progress=False)
    assert len(result.tables["captions"]) == 5 * 5 and len(result.tables["t_vhd"]) > 0
    assert result.tables["metrics"]["vs_control"].notna().any()
    return result


@pytest.mark.parametrize("n", [2, 3])
def test_chair_shards_merge_to_one_run(lvlm, data, chair, n):
    _assert_same(chair, _merged(lvlm, data, "chair", _shards(lvlm, data, "chair", n)))


def test_pope_states_read_back_from_disk_merge_to_one_run(lvlm, data, tmp_path):
    """POPE (3 splits x 5 questions: 8 batches a run, 40 units), states through safetensors + JSON."""
    whole = E.analyze_hallucination(lvlm, data, _config("pope"), progress=False)
    assert len(whole.tables["answers"]) == 5 * 3 * 5
    for i, states in enumerate(_shards(lvlm, data, "pope", 3)):
        save_states(tmp_path / f"shard-{i}", states, {"shard": i})
    parts = [load_states(tmp_path / f"shard-{i}")[0] for i in range(3)]
    _assert_same(whole, _merged(lvlm, data, "pope", parts))


def test_var_learns_its_first_batch_in_every_shard(lvlm, data, chair, monkeypatch):
    """VAR's dims are those of its first batch in one run; without showing it that batch, a shard that starts
    inside VAR's run finds other dims, and the merge refuses the mixed settings."""
    settings = chair.config["methods_run"]
    assert settings["var"]["dims"] == settings["var-control"]["dims"]
    parts = _shards(lvlm, data, "chair", 4)  # shard 3 (units 11..14) starts at var's last batch (9..11)
    _assert_same(chair, _merged(lvlm, data, "chair", parts))
    monkeypatch.setattr(E, "_first_batch", lambda *args: None)
    with pytest.raises(RunStoreError, match="different settings"):
        _merged(lvlm, data, "chair", _shards(lvlm, data, "chair", 4))


def test_a_merge_without_every_shard_is_refused(lvlm, data):
    parts = _shards(lvlm, data, "chair", 3)
    with pytest.raises(RunStoreError, match="merge the states of every shard"):
        _merged(lvlm, data, "chair", [parts[0], parts[2]])
