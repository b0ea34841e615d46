"""``analyze circuits`` split over job-array shards (and ranks) gives the run of one process.

tiny-llama on two byte-level JSONL tasks (6 prompts, chunks of 4: two prompt chunks, a short last one), path
patching with 5 senders per pass (4 layers x 4 heads: 4 sender groups, the last short), so the shard boundaries of
the ``scores`` pass fall inside a task, a phase and a prompt chunk. Each shard raises ``ShardDone`` with its states;
the merge runs the role tags and the ablation test whole. The oracle is the same analysis in one process.
"""

from __future__ import annotations

import copy
import threading
from pathlib import Path

import pandas as pd
import pytest
import torch
from circuit_helpers import byte_task

import headlab
from headlab.analyses import circuits as C
from headlab.analyses.circuit_tasks import read_jsonl, tokenize_task
from headlab.analyses.path_patching import AttributionPatching, SenderPatching, all_heads, path_patching
from headlab.errors import RunStoreError
from headlab.result import Result
from headlab.tally import Scale, Shard, ShardDone, load_states, merge_all, save_states, scaled, tally


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("tasks")
    return str(byte_task(folder, "first", 0)), str(byte_task(folder, "second", 1))


@pytest.fixture(scope="module")
def llama(load_model):
    return load_model("tiny-llama")


def _config(tasks, **changes) -> C.CircuitsConfig:
    settings = {"tasks": tasks, "n": 6, "top": 0.25, "method": "path", "draws": 3, "batch_size": 4,
                "senders_per_pass": 5} | changes
    return C.CircuitsConfig(**settings)


def _shards(loaded, config: C.CircuitsConfig, n: int) -> list[dict]:
    """Each job-array shard's states of the first pass, in shard order."""
    parts = []
    for i in range(n):
        with pytest.raises(ShardDone) as done, scaled(Scale(mode="shard", shard=Shard(i, n))):
            C.analyze_circuits(loaded, config)
        assert done.value.name == "scores"
        parts.append(done.value.states)
    return parts


def _merged(loaded, config: C.CircuitsConfig, parts: list[dict]) -> Result:
    with scaled(Scale(mode="merge", states=parts)) as scale:
        result = C.analyze_circuits(loaded, config)
    assert scale.passes == ["scores", "ablation"]  # the ablation test ran, whole, in the merge
    return result


def _assert_same(whole: Result, other: Result) -> None:
    assert set(whole.tables) == set(other.tables)
    for name, table in whole.tables.items():
        pd.testing.assert_frame_equal(table, other.tables[name], check_exact=False, rtol=1e-6, obj=name)
    assert set(whole.tensors) == set(other.tensors)
    for name, tensor in whole.tensors.items():
        assert torch.allclose(tensor, other.tensors[name], atol=1e-6, equal_nan=True), name
    assert whole.summary == other.summary
    assert whole.report == other.report


@pytest.fixture(scope="module")
def whole(llama, tasks) -> Result:
    result = C.analyze_circuits(llama, _config(tasks))
    assert {"clean", "scores", "circuits", "overlap", "ablation", "agreement", "roles"} <= set(result.tables)
    return result


@pytest.mark.parametrize("n", [2, 3])
def test_path_patching_shards_merge_to_one_run(llama, tasks, whole, n):
    _assert_same(whole, _merged(llama, _config(tasks), _shards(llama, _config(tasks), n)))


def test_states_read_back_from_disk_merge_to_one_run(llama, tasks, whole, tmp_path):
    """The states as a partial run stores them (safetensors + JSON), read back, then merged."""
    for i, states in enumerate(_shards(llama, _config(tasks), 3)):
        save_states(tmp_path / f"shard-{i}", states, {"shard": i})
    parts = [load_states(tmp_path / f"shard-{i}")[0] for i in range(3)]
    _assert_same(whole, _merged(llama, _config(tasks), parts))


def test_attribution_method_in_more_shards_than_scores_per_phase(llama, tasks):
    """Attribution only: 2 tasks x (2 clean + 2 attribution units); 5 shards, one of them a single unit."""
    config = _config(tasks, method="attribution", draws=2, roles=False)
    expected = C.analyze_circuits(llama, config)
    _assert_same(expected, _merged(llama, config, _shards(llama, config, 5)))


def test_a_merge_without_every_shard_is_refused(llama, tasks):
    parts = _shards(llama, _config(tasks), 3)
    with pytest.raises(RunStoreError, match="missing from the merged states"), \
            scaled(Scale(mode="merge", states=[parts[0], parts[2]])):
        C.analyze_circuits(llama, _config(tasks))


def test_units_split_anywhere_give_the_scores_of_one_loop(llama, tasks):
    """The patching and ablation units alone, cut at every unit: each shard in a fresh work object (its own
    chunk cache, its own mean z), merged in shard order."""
    batch = tokenize_task(llama, read_jsonl(Path(tasks[0])))
    heads = all_heads(llama.arch)
    makers = {"path": lambda: SenderPatching(llama, batch, heads, path=True, batch_size=4, senders_per_pass=5),
              "activation": lambda: SenderPatching(llama, batch, heads, path=False, batch_size=4, senders_per_pass=3),
              "attribution": lambda: AttributionPatching(llama, batch, batch_size=4)}
    for name, make in makers.items():
        one = make()
        tally(one.as_pass(name))
        n = one.n_units
        parts = []
        for i in range(n):
            work = make()
            tally(work.as_pass(name), Shard(i, n))
            parts.append(work.as_pass(name).state_dict())
        merged = make()
        merge_all(parts, merged.as_pass(name))
        assert torch.allclose(one.scores(), merged.scores(), atol=1e-6), name
    circuit = [(3, 1), (2, 0)]
    expected = C.ablation_test(llama, batch, circuit, draws=4, seed=1, batch_size=4)
    parts = []
    for i in range(3):
        work = C.AblationRuns(llama, batch, circuit, draws=4, seed=1, batch_size=4)
        tally(work.as_pass(), Shard(i, 3))
        parts.append(work.as_pass().state_dict())
    merged = C.AblationRuns(llama, batch, circuit, draws=4, seed=1, batch_size=4)
    merge_all(parts, merged.as_pass())
    assert merged.result() == pytest.approx(expected, rel=1e-9)


def test_public_functions_ignore_the_callers_scale(llama, tasks):
    """``path_patching`` is a part of other analyses' passes: under a shard it still runs every unit."""
    batch = tokenize_task(llama, read_jsonl(Path(tasks[1])))
    plain = path_patching(llama, batch, batch_size=4, senders_per_pass=5)
    with scaled(Scale(mode="shard", shard=Shard(0, 2))) as scale:
        assert torch.equal(path_patching(llama, batch, batch_size=4, senders_per_pass=5), plain)
    assert scale.passes == []  # the scale saw no pass: the function ran its units itself


def test_ranks_shard_both_passes_and_agree(tasks, whole):
    """Two ranks (threads, each with its own replica; the exchange an in-memory all-gather): both passes are
    sharded, every rank holds the whole run."""
    world = 2
    barrier = threading.Barrier(world, timeout=120)
    posted: list = [None] * world
    results: list = [None] * world
    passes: list = [None] * world
    errors: list[BaseException] = []
    # loaded here, one after the other: a tiny zoo model is initialised from the global RNG, which threads share
    replicas = [headlab.load("tiny-llama", dtype="float32", device="cpu") for _ in range(world)]

    def rank(index: int) -> None:
        def exchange(state):
            posted[index] = copy.deepcopy(state)  # as it travels: no rank reads another's live accumulators
            barrier.wait()
            gathered = list(posted)
            barrier.wait()  # every rank has read before the next pass posts
            return gathered

        try:
            loaded = replicas[index]
            with scaled(Scale(mode="ranks", shard=Shard(index, world), exchange=exchange)) as scale:
                results[index] = C.analyze_circuits(loaded, _config(tasks))
            passes[index] = list(scale.passes)
        except BaseException as err:  # noqa: BLE001 - reported below, after the other rank is released
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(i,)) for i in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    assert passes == [["scores", "ablation"]] * world
    for result in results:
        _assert_same(whole, result)
