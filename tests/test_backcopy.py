"""Bigram-Backcopy: the task, the deterministic trainer, and the bundled trained model's real sinks."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM
from typer.testing import CliRunner

import headlab
from headlab.analyses.sinks import SinksConfig, analyze_sinks
from headlab.arch import Arch
from headlab.cli import analyze_app
from headlab.loading import LoadedModel
from headlab.prompts import read_prompts
from headlab.result import Result
from headlab.training.backcopy import BackcopyTask, as_text, backcopy_config, backcopy_tokenizer
from headlab.training.backcopy_training import TrainConfig, train_backcopy
from headlab.zoo.catalog import BUNDLED_DIR, default_prompt_file

# Measured on the committed checkpoint with `analyze sinks` (64 bundled prompts, T = 64, eps = 0.3):
# Sink_1 = 75.0%, first-token alpha by layer 0.074 / 0.571 / 0.613 / 0.492; the same model at its
# random init (the trainer's step 0): Sink_1 = 0.0%, alpha 0.074 in every layer (1/64-ish causal average).
# Over the four 16-prompt slices of the bundled set: Sink_1 75.0% in each, alpha 0.564-0.577 /
# 0.605-0.621 / 0.491-0.494 in layers 1-3. The thresholds sit ~20% under the lowest slice (sampling
# slack) and far above random init, so they fail for a model without a first-token sink.
SINK_1_MIN = 60.0
FIRST_ALPHA_MIN = (None, 0.45, 0.48, 0.39)  # layers 1-3; layer 0 does not sink (0.074 trained and random)


def test_task_follows_its_rules():
    task = BackcopyTask()
    ids = task.sample(256, torch.Generator().manual_seed(0))
    again = task.sample(256, torch.Generator().manual_seed(0))
    assert torch.equal(ids, again), "the same seed gives the same data"
    assert ids.shape == (256, 64) and (ids[:, 0] == task.bos_id).all() and (ids[:, 1:] != task.bos_id).all()
    copy = task.copy_targets(ids)
    assert copy.any()
    assert torch.equal(ids[:, 2:][copy[:, 2:]], ids[:, :-2][copy[:, 2:]]), "after a trigger: the token before it"
    trig = task.is_trigger(ids)
    assert not (trig[:, 1:] & trig[:, :-1]).any(), "never two triggers in a row"
    assert 0.05 < trig[:, 1:].float().mean() < 0.2
    successors, probs = task.bigram()
    assert torch.allclose(probs.sum(-1), torch.ones(task.n_ordinary))
    ordinary = ~trig & (ids != task.bos_id)
    chain = ordinary[:, 1:] & ordinary[:, :-1] & ~copy[:, 1:]
    prev, nxt = ids[:, :-1][chain], ids[:, 1:][chain]
    assert (successors[prev] == nxt[:, None]).any(-1).all(), "ordinary tokens follow the sparse chain"


def test_tokenizer_round_trip_and_no_bos_variant():
    task = BackcopyTask()
    ids = task.sample(4, torch.Generator().manual_seed(1))
    tok = backcopy_tokenizer(task)
    assert tok(as_text(task, ids)).input_ids == ids.tolist()
    no_bos = BackcopyTask(use_bos=False)
    plain = no_bos.sample(2, torch.Generator().manual_seed(1))
    assert plain.shape == (2, 64) and (plain != no_bos.bos_id).all()
    assert backcopy_tokenizer(no_bos)(as_text(no_bos, plain)).input_ids == plain.tolist()


def _tiny_config(seed: int = 0) -> TrainConfig:
    return TrainConfig(steps=4, batch_size=4, eval_every=2, eval_size=4, seed=seed, n_layers=2, d_model=32,
                       d_mlp=64, n_heads=2)


def test_training_is_deterministic_and_writes_a_loadable_folder(tmp_path):
    first = train_backcopy(_tiny_config(), tmp_path / "a", log=lambda _: None)
    second = train_backcopy(_tiny_config(), tmp_path / "b", log=lambda _: None)
    train_backcopy(_tiny_config(seed=1), tmp_path / "c", log=lambda _: None)
    wa, wb, wc = (load_file(tmp_path / n / "model.safetensors") for n in "abc")
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "same seed, same weights"
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    def timeless(history):
        return [{k: v for k, v in h.items() if k != "seconds"} for h in history]

    assert timeless(first["history"]) == timeless(second["history"])
    assert [h["step"] for h in first["history"]] == [0, 2, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"], "no temporary folders left"
    loaded = headlab.load(str(tmp_path / "a"))
    assert loaded.arch.n_layers == 2 and loaded.arch.adds_bos
    assert loaded.arch.bos_token_id == BackcopyTask().bos_id
    log = json.loads((tmp_path / "a" / "training_log.json").read_text())
    assert log["config"]["weight_decay"] == 0.5 and log["n_params"] > 0


def test_bundled_checkpoints_are_small_safetensors_folders():
    for name in ("backcopy", "backcopy-nobos"):
        folder = BUNDLED_DIR / name
        files = {p.name for p in folder.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "backcopy_task.json"} <= files
        assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
        assert sum(p.stat().st_size for p in folder.iterdir()) < 10 * 2**20


@pytest.fixture(scope="module")
def trained_result():
    loaded = headlab.load("backcopy")
    prompts = read_prompts(default_prompt_file("backcopy"))[:16]
    return analyze_sinks(loaded, prompts, SinksConfig(max_tokens=64), progress=False)


def test_trained_model_has_a_first_token_sink(trained_result):
    summary = trained_result.summary
    assert summary["sink_1_pct"] >= SINK_1_MIN, summary["sink_1_pct"]
    for layer, minimum in enumerate(FIRST_ALPHA_MIN):
        if minimum is not None:
            assert summary["first_token_alpha_by_layer"][layer] >= minimum, summary["first_token_alpha_by_layer"]


def test_without_bos_the_first_token_does_not_sink():
    # Measured (64 prompts): Sink_1 = 0.0%, first-token alpha 0.075 / 0.080 / 0.077 / 0.076, no key
    # position above 0.1% (docs/models.md, "The trained model"); a BOS model trained the same way (constant lr,
    # one thread) had 29.9% at step 1,500.
    loaded = headlab.load("backcopy-nobos")
    assert not loaded.arch.adds_bos
    prompts = read_prompts(default_prompt_file("backcopy-nobos"))[:16]
    result = analyze_sinks(loaded, prompts, SinksConfig(max_tokens=64), progress=False)
    assert result.tables["tokens"]["token"].iloc[0].startswith("a")
    assert result.summary["sink_1_pct"] < 5
    assert float(result.tensors["sink_rate"].max()) < 5


def test_random_init_of_the_same_model_has_no_sink():
    task = BackcopyTask()
    torch.manual_seed(0)  # the trainer's seed: these are the trained model's step-0 weights
    model = LlamaForCausalLM(backcopy_config(task)).eval()
    tok = backcopy_tokenizer(task)
    loaded = LoadedModel("backcopy-random", model, tok, Arch.from_model(model, tok), "test")
    prompts = read_prompts(default_prompt_file("backcopy"))[:16]
    summary = analyze_sinks(loaded, prompts, SinksConfig(max_tokens=64), progress=False).summary
    assert summary["sink_1_pct"] < SINK_1_MIN / 4
    assert max(summary["first_token_alpha_by_layer"]) < 0.15


def test_cli_runs_on_the_trained_model(tmp_path):
    result = CliRunner().invoke(analyze_app, ["sinks", "--model", "backcopy", "--n-prompts", "4", "--quiet",
                                              "--out", str(tmp_path), "--name", "backcopy"])
    assert result.exit_code == 0, result.output
    run = Result.load(tmp_path / "backcopy")
    assert run.model == "backcopy"
    assert run.config["n_prompts"] == 4 and "secondary_sinks" in run.tables
    raw = run.tables["tokens"]["token_raw"]
    assert raw.iloc[0] == "<bos>" and raw.iloc[1].startswith("a")
