"""``analyze position-bias`` through ``headlab.tally``: a run split into job-array shards and merged (in memory, and
through the states on disk) gives the tables, tensors and summary of one run; so do the rollout and retrieval
passes split on their own, and a run resumed from its checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from headlab.analyses.position_bias import PositionBiasConfig, analyze_position_bias, empirical_rollout
from headlab.analyses.retrieval_task import RetrievalConfig, run_retrieval
from headlab.errors import RunStoreError
from headlab.probes.position import PositionProfile
from headlab.prompts import read_prompts
from headlab.result import Result
from headlab.tally import Checkpoint, Scale, Shard, ShardDone, State, load_states, save_states, scaled
from headlab.zoo.catalog import default_prompt_file

N_SHARDS = 3
# 10 prompts in batches of 2: 5 units, shards of 1, 2 and 2 batches; every part of the analysis on, small.
CONFIG = PositionBiasConfig(max_tokens=24, batch_size=2, rollout_tokens=12, rollout_prompts=3, retrieval_trials=2,
                            retrieval_pairs=3)


@pytest.fixture(scope="module")
def loaded(load_model):
    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return read_prompts(default_prompt_file("tiny-llama"))[:10]


@pytest.fixture(scope="module")
def whole(loaded, prompts) -> Result:
    return analyze_position_bias(loaded, prompts, CONFIG, progress=False)


@pytest.fixture(scope="module")
def parts(loaded, prompts) -> list[dict[str, State]]:
    """The states of each job-array shard of the first pass ("profile"), in shard order."""
    return [_shard_states(lambda: analyze_position_bias(loaded, prompts, CONFIG, progress=False), i, "profile")
            for i in range(N_SHARDS)]


def _shard_states(run, index: int, name: str) -> dict[str, State]:
    """Run ``run`` as shard ``index`` of ``N_SHARDS``: its first pass must end it with ``ShardDone``."""
    with pytest.raises(ShardDone) as done, scaled(Scale(mode="shard", shard=Shard(index, N_SHARDS))):
        run()
    assert done.value.name == name
    return done.value.states


def assert_same_result(got: Result, want: Result) -> None:
    """Every table to rtol 1e-6, every tensor to atol 1e-6 (NaN where the other has NaN), the summary to 1e-6."""
    assert set(got.tables) == set(want.tables)
    for name, table in want.tables.items():
        pd.testing.assert_frame_equal(got.tables[name], table, check_exact=False, rtol=1e-6, atol=1e-7, obj=name)
    assert set(got.tensors) == set(want.tensors)
    for name, tensor in want.tensors.items():
        assert got.tensors[name].shape == tensor.shape, name
        assert torch.allclose(got.tensors[name], tensor, atol=1e-6, equal_nan=True), name
    assert_close_tree(got.summary, want.summary)


def assert_close_tree(got, want, where: str = "summary") -> None:
    """Nested dicts and lists equal, floats to rel 1e-6 (pytest.approx takes no nested dicts)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), where
        for key, value in want.items():
            assert_close_tree(got[key], value, f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            assert_close_tree(a, b, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(got, bool):
        assert isinstance(got, float) and (got == pytest.approx(want, rel=1e-6, abs=1e-12)
                                           or (math.isnan(got) and math.isnan(want))), f"{where}: {got} != {want}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def test_shards_merged_equal_one_run(loaded, prompts, whole, parts):
    assert len(parts) == N_SHARDS and set(parts[0]) == {"profile", "tokens"}
    with scaled(Scale(mode="merge", states=parts)) as scale:
        merged = analyze_position_bias(loaded, prompts, CONFIG, progress=False)
    # The statistics were merged, not computed; the rollout and the retrieval task then ran whole.
    assert scale.passes == ["profile", "rollout", "retrieval"]
    assert_same_result(merged, whole)
    assert merged.summary["n_tokens"] == whole.summary["n_tokens"]  # an exact count, not a float sum
    # Each shard alone saw fewer prompts: the merge is what restores the totals.
    assert all(part["tokens"]["n_tokens"] < whole.summary["n_tokens"] for part in parts)


def test_shard_states_survive_the_disk(loaded, prompts, whole, parts, tmp_path: Path):
    """Each part's states written as ``headlab.tally.save_states`` writes them (safetensors + JSON) and read back
    before the merge: the windows list, the settings and the counts keep their types."""
    back = []
    for index, states in enumerate(parts):
        folder = tmp_path / f"part-{index}"
        save_states(folder, states, {"shard": index})
        loaded_states, meta = load_states(folder)
        assert meta == {"shard": index}
        back.append(loaded_states)
    profile = back[0]["profile"]
    assert profile["windows"] == parts[0]["profile"]["windows"] and profile["causal"] is loaded.arch.causal
    assert isinstance(back[0]["tokens"]["n_tokens"], int)
    with scaled(Scale(mode="merge", states=back)):
        merged = analyze_position_bias(loaded, prompts, CONFIG, progress=False)
    assert_same_result(merged, whole)


def test_rollout_pass_split_equals_one_run(loaded, prompts):
    """The rollout on its own (then its first pass): 2 prompts in 3 shards, so shard 0 is empty and the example
    prompt's unit runs in shard 1; the merged rows are those of one run."""
    config = PositionBiasConfig(max_tokens=24, rollout_tokens=12, rollout_prompts=2)
    first_mass, example, used = empirical_rollout(loaded, prompts, config)
    parts = [_shard_states(lambda: empirical_rollout(loaded, prompts, config), i, "rollout") for i in range(N_SHARDS)]
    assert [len(p["rollout"]["first_mass"]) for p in parts] == [0, 1, 1]
    assert [len(p["rollout"]["example"]) for p in parts] == [0, 1, 0]
    with scaled(Scale(mode="merge", states=parts)):
        merged_mass, merged_example, merged_used = empirical_rollout(loaded, prompts, config)
    assert merged_used == used == 2
    assert torch.allclose(merged_mass, first_mass, atol=1e-6) and torch.equal(merged_example, example)


def test_retrieval_pass_split_equals_one_run(loaded):
    """The items are drawn from the seed before the pass, so a shard scores the same items as one run does."""
    config = RetrievalConfig(n_trials=2, n_pairs=3, seed=5, batch_size=2)
    want = run_retrieval(loaded, config)
    parts = [_shard_states(lambda: run_retrieval(loaded, config), i, "retrieval") for i in range(N_SHARDS)]
    assert sum(len(p["rows"]["rows"]) for p in parts) == 2 * 4  # three placements and one absent key per trial
    with scaled(Scale(mode="merge", states=parts)):
        got = run_retrieval(loaded, config)
    for a, b in zip(got, want, strict=True):
        pd.testing.assert_frame_equal(a, b)


def test_resumed_run_equals_one_run(loaded, prompts, whole, tmp_path: Path):
    """A run that finds every pass done in its checkpoints computes nothing and loads all three from disk."""
    checkpoint = Checkpoint(tmp_path / "checkpoint", every=2)
    with scaled(Scale(checkpoint=checkpoint)):
        first = analyze_position_bias(loaded, prompts, CONFIG, progress=False)
    assert sorted(p.name for p in checkpoint.folder.iterdir()) == ["profile", "retrieval", "rollout"]
    with scaled(Scale(checkpoint=checkpoint)):
        resumed = analyze_position_bias(loaded, prompts, CONFIG, progress=False)
    assert_same_result(first, whole)
    assert_same_result(resumed, whole)


def test_profiles_of_different_masks_do_not_merge():
    """Sums of two masks' uniform baselines would mean nothing: the settings must agree."""
    a = PositionProfile(2, 2, 16, windows=[None, 4])
    b = PositionProfile(2, 2, 16, windows=[None, 8])
    with pytest.raises(RunStoreError, match="windows"):
        a.merge(b.state_dict())
    with pytest.raises(RunStoreError, match="causal"):
        a.merge(PositionProfile(2, 2, 16, causal=False, windows=[None, 4]).state_dict())
