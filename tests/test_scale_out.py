"""Beyond one process: accumulators that merge, job-array shards + ``runs merge``, torchrun ranks (gloo), resume.

Oracle everywhere: the same analysis run whole in one process. Tables agree within 1e-6 (float sums merged in
another order), counts and token-level rows exactly.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from circuit_helpers import byte_task
from typer.testing import CliRunner

from headlab.cli import analyze_app, headlab_app
from headlab.errors import InputError, RunStoreError
from headlab.result import Result
from headlab.tally import (
    Checkpoint,
    Mergeable,
    Pass,
    Scale,
    Shard,
    ShardDone,
    load_states,
    merge_all,
    run_pass,
    save_states,
    scaled,
    tally,
)

runner = CliRunner()
SINKS = ["sinks", "--model", "tiny-llama", "--n-prompts", "9", "--batch-size", "2", "--max-tokens", "24", "--quiet"]
# Each scalable analysis, small: the run of one process is the oracle of its shards, ranks and merges.
COMMANDS = {
    "sinks": SINKS,
    "position-bias": ["position-bias", "--model", "tiny-llama", "--n-prompts", "7", "--batch-size", "2",
                      "--max-tokens", "32", "--rollout-tokens", "16", "--rollout-prompts", "3", "--retrieval-trials",
                      "2", "--retrieval-pairs", "3", "--quiet"],
}


class Everything(Mergeable):
    merging = {"total": "sum", "count": "sum", "array": "sum", "rows": "rows", "words": "counter", "seen": "set",
               "first": "fill", "parts": "children", "eps": "equal"}

    def __init__(self, eps: float = 0.5):
        self.total = torch.zeros(3, dtype=torch.float64)
        self.count = 0
        self.array = np.zeros(2, dtype=np.int64)
        self.rows: list[dict] = []
        self.words: dict[str, int] = {}
        self.seen: set[int] = set()
        self.first = torch.full((4,), float("nan"))
        self.parts: dict[int, Everything] = {}
        self.eps = eps

    def child(self, name: str) -> Everything:
        return Everything(self.eps)

    def add(self, i: int) -> None:
        self.total += torch.tensor([i, i * i, 1.0 / (i + 1)], dtype=torch.float64)
        self.count += 1
        self.array += np.array([i, 1])
        self.rows.append({"i": i, "x": float("nan") if i == 3 else i / 7})
        word = "even" if i % 2 == 0 else "odd"
        self.words[word] = self.words.get(word, 0) + 1
        self.seen.add(i % 3)
        if i < 4:
            self.first[i] = i * 10.0
        if i % 4 == 0:
            self.parts.setdefault(i % 8, Everything(self.eps)).add(i + 1)


def _assert_same(a: Everything, b: Everything) -> None:
    assert torch.allclose(a.total, b.total, rtol=1e-12)
    assert a.count == b.count and np.array_equal(a.array, b.array)
    assert json.dumps(a.rows) == json.dumps(b.rows)  # order and NaN included
    assert list(a.words.items()) == list(b.words.items())  # counts, and keys in order of first sight
    assert a.seen == b.seen
    assert torch.equal(torch.nan_to_num(a.first, nan=-1), torch.nan_to_num(b.first, nan=-1))
    assert sorted(a.parts) == sorted(b.parts)
    for key in a.parts:
        _assert_same(a.parts[key], b.parts[key])


def test_every_kind_of_field_merges_like_one_run_and_survives_the_disk(tmp_path):
    whole = Everything()
    for i in range(11):
        whole.add(i)
    for n in (2, 3, 5):
        states = []
        for k in range(n):
            part = Everything()
            for i in Shard(k, n).units(11):
                part.add(i)
            save_states(tmp_path / f"{n}-{k}", {"acc": part.state_dict()}, {"done": 0})
            states.append(load_states(tmp_path / f"{n}-{k}")[0]["acc"])
        merged = Everything()
        merged.load_state_dict(states[0])
        for state in states[1:]:
            merged.merge(state)
        _assert_same(whole, merged)


def test_a_merge_of_different_settings_or_shapes_is_refused():
    a, b = Everything(0.5), Everything(0.3)
    with pytest.raises(RunStoreError, match="setting eps differs"):
        a.merge(b.state_dict())
    c = Everything()
    c.total = torch.zeros(4, dtype=torch.float64)
    with pytest.raises(RunStoreError, match="shapes"):
        a.merge(c.state_dict())


@pytest.mark.parametrize("n_units,count", [(0, 3), (1, 3), (7, 3), (10, 4), (9, 9), (5, 8)])
def test_shards_cover_every_unit_once_in_order(n_units, count):
    covered = [u for k in range(count) for u in Shard(k, count).units(n_units)]
    assert covered == list(range(n_units))
    sizes = [len(Shard(k, count).units(n_units)) for k in range(count)]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("text", ["3/3", "1/0", "-1/2", "a/b", "2", "1/2/3", ""])
def test_a_bad_shard_is_one_clear_error(text):
    with pytest.raises(InputError, match="--shard"):
        Shard.parse(text)


def _counting_pass(log: list[int], fail_at: int | None = None) -> Pass:
    acc = Everything()

    def step(unit: int) -> None:
        if unit == fail_at:
            raise KeyboardInterrupt  # a kill, as far as the pass can tell
        log.append(unit)
        acc.add(unit)

    return Pass("count", 13, step, {"acc": acc})


def test_a_killed_pass_resumes_from_its_checkpoint_and_equals_one_run(tmp_path):
    whole = tally(_counting_pass([]))
    checkpoint = Checkpoint(tmp_path, every=4)
    with pytest.raises(KeyboardInterrupt):
        tally(_counting_pass([], fail_at=10), checkpoint=checkpoint)
    log: list[int] = []
    resumed = tally(_counting_pass(log), checkpoint=checkpoint)
    assert log == [8, 9, 10, 11, 12]  # the units after the last checkpoint (8 done), not one more or less
    _assert_same(whole.accumulators["acc"], resumed.accumulators["acc"])


def test_run_pass_shards_the_first_pass_and_merges_it():
    def analysis() -> list[Everything]:
        return [run_pass(_counting_pass([])).accumulators["acc"], run_pass(Pass("second", 3, lambda u: None, {}))]

    whole = analysis()[0]
    parts = []
    for k in range(3):
        with pytest.raises(ShardDone) as done, scaled(Scale(mode="shard", shard=Shard(k, 3))):
            analysis()
        assert done.value.name == "count"
        parts.append(done.value.states)
    with scaled(Scale(mode="merge", states=parts)):
        merged = analysis()[0]
    _assert_same(whole, merged)
    with pytest.raises(ValueError, match="runs twice"), scaled(Scale()):
        run_pass(_counting_pass([]))
        run_pass(_counting_pass([]))
    assert merge_all([], _counting_pass([])).accumulators["acc"].count == 0


# ---------------------------------------------------------------------------------------------
# The command line


def _same_run(a: Path, b: Path) -> None:
    x, y = Result.load(a), Result.load(b)
    assert sorted(x.tables) == sorted(y.tables) and sorted(x.tensors) == sorted(y.tensors)
    for key in x.tables:
        pd.testing.assert_frame_equal(x.tables[key], y.tables[key], check_exact=False, rtol=1e-6, atol=1e-7)
    for key in x.tensors:
        assert torch.allclose(x.tensors[key].double(), y.tensors[key].double(), atol=1e-6, equal_nan=True), key
    assert x.summary == y.summary
    assert x.prompts == y.prompts and x.input_hash == y.input_hash




@pytest.fixture(scope="module", autouse=True)
def lvlm_and_circuit_commands(tmp_path_factory):
    """circuits (path patching, two tasks, the ablation test) and hallucination (CHAIR with controls) need files."""
    from headlab.training import lvlm_data as D

    folder = tmp_path_factory.mktemp("inputs")
    tasks = f"{byte_task(folder, 'first', 0)},{byte_task(folder, 'second', 1)}"
    D.write_dataset(folder / "set", D.eval_scenes("weak", 5))
    COMMANDS["circuits"] = ["circuits", "--model", "tiny-llama", "--tasks", tasks, "--n", "6", "--top", "0.25",
                            "--method", "path", "--draws", "3", "--batch-size", "4", "--senders-per-pass", "5",
                            "--quiet"]
    COMMANDS["hallucination"] = ["hallucination", "--model", "tiny-llava", "--bench", "chair", "--data",
                                 str(folder / "set"), "--methods", "none,pai", "--controls", "--n", "5",
                                 "--batch-size", "2", "--resamples", "50", "--max-new-tokens", "6", "--quiet"]
    yield
    del COMMANDS["circuits"], COMMANDS["hallucination"]


@pytest.fixture(scope="module")
def whole_runs(tmp_path_factory, lvlm_and_circuit_commands):
    """The run of one process of each command, made once."""
    runs = tmp_path_factory.mktemp("whole")
    made: dict[str, Path] = {}

    def whole(command: str) -> Path:
        if command not in made:
            result = runner.invoke(analyze_app, COMMANDS[command] + ["--out", str(runs), "--name", command])
            assert result.exit_code == 0, result.output
            made[command] = runs / command
        return made[command]

    return whole


@pytest.fixture
def whole_sinks(whole_runs):
    return whole_runs("sinks")


def _shards(tmp_path: Path, n: int, extra: list[str] | None = None, command: str = "sinks") -> list[Path]:
    parts = []
    for k in range(n):
        result = runner.invoke(analyze_app, COMMANDS[command] + (extra or []) + [
            "--shard", f"{k}/{n}", "--out", str(tmp_path / "parts"), "--name", f"p{k}"])
        assert result.exit_code == 0, result.output
        parts.append(tmp_path / "parts" / f"p{k}")
    return parts


SCALABLE = ["sinks", "position-bias", "circuits", "hallucination"]


@pytest.mark.parametrize("command", SCALABLE)
def test_job_array_shards_merge_into_the_run_of_one_process(tmp_path, whole_runs, command):
    parts = _shards(tmp_path, 3, command=command)
    manifest = json.loads((parts[0] / "manifest.json").read_text())
    assert manifest["partial"] and manifest["shard"] == "0/3" and manifest["argv"][:2] == ["analyze", command]
    assert "--shard" not in manifest["argv"] and "--out" not in manifest["argv"]
    result = runner.invoke(headlab_app, ["runs", "merge", *map(str, parts[::-1]), "--out", str(tmp_path / "runs"),
                                         "--name", "merged"])
    assert result.exit_code == 0, result.output
    _same_run(whole_runs(command), tmp_path / "runs" / "merged")
    scale = json.loads((tmp_path / "runs" / "merged" / "manifest.json").read_text())["provenance"]["scale"]
    assert scale["mode"] == "merged" and scale["parts"] == 3


def test_the_dashboard_lists_a_part_as_a_part_not_as_a_run(tmp_path):
    from headlab.dashboard.discovery import discover_runs

    parts = _shards(tmp_path, 2)
    listing = discover_runs(parts[0].parent)
    assert listing.runs == []
    reasons = {b.name: b.reason for b in listing.broken}
    assert sorted(reasons) == ["p0", "p1"]
    assert "shard 0/2" in reasons["p0"] and "shard 1/2" in reasons["p1"] and "runs merge" in reasons["p1"]


def test_merge_refuses_parts_that_do_not_make_one_run(tmp_path, whole_sinks):
    parts = _shards(tmp_path, 3)
    other = _shards(tmp_path / "other", 3, ["--eps", "0.2"])
    two = _shards(tmp_path / "two", 2)
    cases = [
        (parts[:2], "shard\\(s\\) 2/3 missing"),
        ([parts[0], parts[0], parts[1], parts[2]], "given twice"),
        ([parts[0], parts[1], other[2]], "differ in their settings"),
        ([parts[0], parts[1], two[1]], "different numbers of shards"),
        ([parts[0], parts[1], whole_sinks], "complete run, not a part"),
        ([parts[0], tmp_path / "nothing"], "not a headlab run"),
    ]
    for given, message in cases:
        result = runner.invoke(headlab_app, ["runs", "merge", *map(str, given), "--out", str(tmp_path / "runs")])
        assert result.exit_code == 2, (given, result.output)
        assert re.search(message, " ".join(result.output.split())), result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


BAD_SCALE = [  # (inside torchrun?, options, what the error says)
    (False, ["--shard", "4/4"], "--shard 4/4"),
    (False, ["--checkpoint-every", "-1"], "--checkpoint-every"),
    (False, ["--nproc", "0"], "--nproc must be at least 1"),
    (False, ["--nproc", "2", "--shard", "0/2"], "split the inputs twice"),
    (False, ["--nproc", "2", "--device-map", "auto"], "own replica"),
    (True, ["--shard", "0/2"], "split the inputs twice"),
    (True, ["--device-map", "auto"], "own replica"),
    (True, ["--runtime", "nnsight"], "not split over ranks"),
    (True, ["--nproc", "2"], "ranks of ranks"),
]


@pytest.mark.parametrize("in_torchrun,options,message", BAD_SCALE)
def test_bad_scale_options_are_refused_before_the_model_loads(tmp_path, monkeypatch, in_torchrun, options,
                                                              message):
    if in_torchrun:
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", "2")
    result = runner.invoke(analyze_app, SINKS + ["--out", str(tmp_path / "runs"), *options])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "runs").exists()


def test_a_killed_run_resumes_with_resume_and_equals_one_run(tmp_path, whole_sinks, monkeypatch):
    import headlab.tally as T

    real_run = T.Scale.run
    done: list[int] = []

    def run_until_killed(self, work, on_unit=None):
        step = work.step

        def killed_after_three(unit):
            if len(done) == 3:
                raise SystemExit(143)  # what SIGTERM does in headlab (cli.apps)
            done.append(unit)
            step(unit)

        work.step = killed_after_three
        return real_run(self, work, on_unit)

    runs = tmp_path / "runs"
    args = SINKS + ["--out", str(runs), "--name", "resumed", "--checkpoint-every", "2"]
    monkeypatch.setattr(T.Scale, "run", run_until_killed)
    result = runner.invoke(analyze_app, args)
    assert result.exit_code == 143
    monkeypatch.setattr(T.Scale, "run", real_run)
    leftovers = [p for p in runs.iterdir() if ".tmp-" in p.name]
    assert len(leftovers) == 1 and not (runs / "resumed").exists()
    saved = json.loads((leftovers[0] / "passes" / "sinks" / "states.json").read_text())
    assert saved["meta"]["done"] == 2
    # The writer is gone, as after a real kill (this test's own process wrote it).
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    writer = leftovers[0] / ".writer.json"
    writer.write_text(json.dumps({**json.loads(writer.read_text()), "pid": int(gone.stdout)}))

    result = runner.invoke(analyze_app, args + ["--resume"])
    assert result.exit_code == 0, result.output
    assert "resuming from the checkpoint" in result.output
    _same_run(whole_sinks, runs / "resumed")
    assert not any(".tmp-" in p.name for p in runs.iterdir())  # the checkpoint goes with the finished run
    scale = json.loads((runs / "resumed" / "manifest.json").read_text())["provenance"]["scale"]
    assert scale["resumed_from"] == leftovers[0].name


def test_resume_without_a_checkpoint_starts_from_the_beginning(tmp_path, whole_sinks):
    runs = tmp_path / "runs"
    result = runner.invoke(analyze_app, SINKS + ["--out", str(runs), "--name", "fresh", "--resume"])
    assert result.exit_code == 0, result.output
    assert "no checkpoint of this run" in result.output
    _same_run(whole_sinks, runs / "fresh")


def test_a_checkpoint_of_other_settings_is_not_resumed(tmp_path, whole_sinks):
    from headlab.cli.scaling import ScaleArgs, plan_scale

    runs = tmp_path / "runs"
    plan = plan_scale(ScaleArgs(scalable=True), command="analyze sinks", device_map=None, remote=False,
                      runtime="local")
    checkpoint = plan.open_checkpoint(runs, "old", plan.fingerprint("analyze sinks", "tiny-llama", {"eps": 0.2},
                                                                     ["a"]))
    assert not runs.exists()  # nothing on disk before the first save
    checkpoint.save("sinks", 1, {})
    (next(runs.iterdir()) / ".writer.json").unlink()  # writer gone
    other = plan_scale(ScaleArgs(scalable=True, resume=True), command="analyze sinks", device_map=None,
                       remote=False, runtime="local")
    other.open_checkpoint(runs, "new", other.fingerprint("analyze sinks", "tiny-llama", {"eps": 0.3}, ["a"]))
    assert other.resumed_from is None and "no checkpoint" in other.notes[0]
    same = plan_scale(ScaleArgs(scalable=True, resume=True), command="analyze sinks", device_map=None,
                      remote=False, runtime="local")
    same.open_checkpoint(runs, "new", same.fingerprint("analyze sinks", "tiny-llama", {"eps": 0.2}, ["a"]))
    assert same.resumed_from is not None and same.resumed_from.name.startswith(".old.tmp-")


# torchrun reads every option that abbreviates one of its own, also after the script: `--n` (circuits,
# hallucination) is ambiguous to it, so those two go through --nproc, which starts the ranks itself.
LAUNCHERS = [("sinks", "torchrun"), ("position-bias", "torchrun"), ("circuits", "nproc"), ("hallucination", "nproc"),
             ("sinks", "nproc")]


@pytest.mark.slow
@pytest.mark.parametrize("command,launcher", LAUNCHERS)
def test_two_gloo_ranks_equal_one_process(tmp_path, whole_runs, command, launcher):
    runs = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    analyze = str(Path(sys.executable).parent / "analyze")
    args = [*COMMANDS[command], "--out", str(runs), "--name", "ranks"]
    if launcher == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(29400 + os.getpid() % 500), analyze, *args]
    else:
        argv = [analyze, *args, "--nproc", "2"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run written to") == 1  # rank 0 writes and prints; rank 1 is silent
    _same_run(whole_runs(command), runs / "ranks")
    scale = json.loads((runs / "ranks" / "manifest.json").read_text())["provenance"]["scale"]
    assert scale == {"mode": "ranks", "world_size": 2, "backend": "gloo"}
    assert sorted(p.name for p in runs.iterdir()) == ["ranks"]  # no checkpoint folder of either rank is left


# ---------------------------------------------------------------------------------------------
# LoFiT evaluation: (condition, batch) units, the clean model and the offsets in one pass

MC_CSV = """Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source
Adversarial,Misc,What is red?,a cat,a cat; the cat,a dog; the sun,src
Adversarial,Misc,"Where, then?",the map,the map,a pen; a cup; a box,src
Adversarial,Misc,Which one?,the hat,the hat; a hat,the box,src
"""


@pytest.fixture(scope="module")
def lofit_eval_args(tmp_path_factory):
    """``headlab lofit eval`` on 10 completion items (batches of 4) and 3 MC questions, with trained offsets."""
    from headlab.analyses.lofit_data import SFTItem, write_items

    folder = tmp_path_factory.mktemp("lofit")
    words = ["cat", "dog", "sun", "map", "pen", "cup", "box", "hat"]
    items = [SFTItem(f"{words[i % 8]} {words[(3 * i) % 8]} {words[(5 * i + 1) % 8]}", " " + words[i % 8])
             for i in range(10)]
    write_items(items, folder / "items.jsonl")
    (folder / "tqa.csv").write_text(MC_CSV, encoding="utf-8")
    runs = folder / "runs"
    common = ["--model", "tiny-llama", "--data", str(folder / "items.jsonl"), "--epochs", "1", "--batch-size", "4",
              "--quiet", "--out", str(runs)]
    for args in (["select", *common, "--name", "sel"], ["train", *common, "--heads", str(runs / "sel"), "--k", "3",
                                                        "--name", "off"]):
        result = runner.invoke(headlab_app, ["lofit", *args])
        assert result.exit_code == 0, result.output
    return {kind: ["lofit", "eval", "--data", str(folder / data), "--offsets", str(runs / "off"), "--batch-size",
                   "4", "--quiet"] for kind, data in (("exact", "items.jsonl"), ("mc", "tqa.csv"))}


@pytest.mark.parametrize("kind", ["exact", "mc"])
def test_lofit_eval_shards_merge_into_the_run_of_one_process(tmp_path, lofit_eval_args, kind):
    args = lofit_eval_args[kind]
    result = runner.invoke(headlab_app, [*args, "--out", str(tmp_path / "runs"), "--name", "whole"])
    assert result.exit_code == 0, result.output
    for k in range(3):
        result = runner.invoke(headlab_app, [*args, "--shard", f"{k}/3", "--out", str(tmp_path / "parts"),
                                             "--name", f"p{k}"])
        assert result.exit_code == 0, result.output
    result = runner.invoke(headlab_app, ["runs", "merge", *(str(tmp_path / "parts" / f"p{k}") for k in range(3)),
                                         "--out", str(tmp_path / "runs"), "--name", "merged"])
    assert result.exit_code == 0, result.output
    _same_run(tmp_path / "runs" / "whole", tmp_path / "runs" / "merged")
    tables = Result.load(tmp_path / "runs" / "merged").tables
    assert {"mc_clean", "mc_offsets"} <= set(tables) if kind == "mc" else "accuracy" in tables


@pytest.mark.slow
def test_lofit_eval_on_two_gloo_ranks_equals_one_process(tmp_path, lofit_eval_args):
    args = [*lofit_eval_args["exact"], "--threads", "1"]
    result = runner.invoke(headlab_app, [*args, "--out", str(tmp_path / "runs"), "--name", "whole"])
    assert result.exit_code == 0, result.output
    done = subprocess.run([str(Path(sys.executable).parent / "headlab"), *args, "--nproc", "2", "--out",
                           str(tmp_path / "runs"), "--name", "ranks"], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    _same_run(tmp_path / "runs" / "whole", tmp_path / "runs" / "ranks")
