"""Models that do not fit one device: device maps, memory budgets, disk offload, the CLI's options.

There is one CPU here, so the map splits a tiny model between the CPU and disk offload: accelerate's
hooks then load the offloaded layers' weights from the offload folder at each forward and move tensors
between placements, the path a GPU + CPU map takes too. The oracle is the same model on one device.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import headlab
from headlab.cli import analyze_app
from headlab.errors import InputError
from headlab.kernels import StatsRequest
from headlab.placement import check_placement, parse_device_map, parse_max_memory
from headlab.probes import AttentionProbe
from headlab.result import Result
from headlab.zoo.tiny import build_tiny

runner = CliRunner()
PROMPTS = ["The quick brown fox jumps over the lazy dog near the river bank.", "Attention sinks appear early.",
           "def f(x):\n    return x * 2"]
# Layers 1 and 3 on disk: two placements, and the hooks move every offloaded layer's weights in and out.
SPLIT = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
         "model.layers.2": "cpu", "model.layers.3": "disk", "model.norm": "cpu", "lm_head": "cpu"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """tiny-llama saved in Hugging Face format (safetensors), so from_pretrained takes the device map."""
    path = tmp_path_factory.mktemp("scale") / "tiny-llama"
    model, tokenizer = build_tiny("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _batch():
    ids = torch.tensor([[256, 72, 101, 108, 108, 111, 32, 119, 111, 114],
                        [256, 65, 32, 99, 97, 116, 257, 257, 257, 257]])
    return ids, torch.tensor([[1] * 10, [1] * 6 + [0] * 4])


def _stats(loaded):
    ids, mask = _batch()
    with torch.no_grad(), AttentionProbe(loaded, backend="torch", request=StatsRequest(distance=True)) as probe:
        logits = loaded.model(input_ids=ids.to(loaded.device), attention_mask=mask.to(loaded.device)).logits
    return probe.last, logits


def _assert_equal_stats(a, b):
    for layer in a:
        for name in ("lse", "entropy", "key_mass", "key_count", "first_mass", "row_counted", "first_key",
                     "distance_mass", "distance_count"):
            x, y = getattr(a[layer], name), getattr(b[layer], name)
            torch.testing.assert_close(y.cpu(), x.cpu(), rtol=0, atol=1e-6, equal_nan=True,
                                       msg=f"layer {layer} {name}")


# --- parsing, before anything loads ------------------------------------------------------------------------

def test_max_memory_parses_to_bytes():
    assert parse_max_memory("cpu=64GiB, disk=1.5GB") == {"cpu": 64 * 2**30, "disk": 1_500_000_000}
    assert parse_max_memory("cpu=512MiB") == {"cpu": 512 * 2**20}
    assert parse_max_memory({"cpu": "2048"}) == {"cpu": 2048}
    assert parse_max_memory(None) is None


@pytest.mark.parametrize("text, says", [
    ("0:20GiB", "DEVICE=SIZE"), ("cpu=lots", "size 'lots'"), ("gpu=1GiB", "device 'gpu'"), ("", "DEVICE=SIZE"),
    ("cpu=1GiB,cpu=2GiB", "twice"), ("cpu=0GiB", "positive"), ("cpu=1GiB=2", "DEVICE=SIZE"),
])
def test_bad_max_memory_is_one_input_error(text, says):
    with pytest.raises(InputError, match=says):
        parse_max_memory(text)


@pytest.mark.skipif(torch.cuda.device_count() > 0, reason="names a GPU this machine lacks")
def test_max_memory_for_a_missing_gpu():
    with pytest.raises(InputError, match="names GPU 0, but this machine has 0 CUDA"):
        parse_max_memory("0=20GiB,cpu=64GiB")


def test_device_map_forms_and_placement_rules(tmp_path):
    assert parse_device_map("auto") == "auto" and parse_device_map("cpu") == "cpu"
    assert parse_device_map(json.dumps(SPLIT)) == SPLIT
    (tmp_path / "map.json").write_text(json.dumps(SPLIT))
    assert parse_device_map(str(tmp_path / "map.json")) == SPLIT
    for bad, says in (("{not json", "not valid JSON"), ('["cpu"]', "must be an object"), ("{}", "empty"),
                      ('{"model.layers.0": "gpu"}', "not a device"), ("everywhere", "unknown --device-map"),
                      (str(tmp_path / "missing.json"), "cannot read")):
        with pytest.raises(InputError, match=says):
            parse_device_map(bad)
    with pytest.raises(InputError, match="add --device-map auto"):
        check_placement(None, "cpu=1GiB", None)
    with pytest.raises(InputError, match="strategy"):
        check_placement(SPLIT, "cpu=1GiB", None)
    with pytest.raises(InputError, match="--offload-folder"):
        check_placement(SPLIT, None, None)
    with pytest.raises(InputError, match="add --device-map"):
        check_placement(None, None, tmp_path)
    assert check_placement("auto", "cpu=1GiB", None) == ("auto", {"cpu": 2**30}, None)


# --- a model split over two placements computes what one device computes ---------------------------------

def test_disk_offload_statistics_equal_one_device(folder, tmp_path):
    single = headlab.load(str(folder), device="cpu")
    split = headlab.load(str(folder), device_map=SPLIT, offload_folder=tmp_path / "offload")
    assert split.placement == SPLIT and "over cpu, disk" in repr(split)
    q_proj = split.arch.layers[1].self_attn.q_proj
    assert q_proj._hf_hook.offload and q_proj.weight.device.type == "meta"  # its weights stay on disk between calls
    assert split.device == torch.device("cpu")  # inputs go where the embeddings execute
    a, logits_a = _stats(single)
    b, logits_b = _stats(split)
    _assert_equal_stats(a, b)
    torch.testing.assert_close(logits_b, logits_a, rtol=0, atol=1e-6)


def test_accumulated_analysis_equals_one_device(folder, tmp_path):
    """Sinks and position bias: per-layer statistics reduced into one set of accumulators (on the CPU)."""
    from headlab.analyses.position_bias import PositionBiasConfig, analyze_position_bias
    from headlab.analyses.sinks import SinksConfig, analyze_sinks

    single = headlab.load(str(folder), device="cpu")
    split = headlab.load(str(folder), device_map=SPLIT, offload_folder=tmp_path / "offload")
    config = SinksConfig(max_tokens=24, batch_size=2, pattern_prompts=1)
    a, b = (analyze_sinks(m, PROMPTS, config, progress=False) for m in (single, split))
    for name in ("alpha", "sink_rate", "entropy", "first_mass", "first_token_norm", "token_alpha", "head_patterns"):
        torch.testing.assert_close(b.tensors[name], a.tensors[name], rtol=0, atol=1e-6, equal_nan=True, msg=name)
    position = PositionBiasConfig(max_tokens=24, batch_size=2, rollout_tokens=0, retrieval_trials=0)
    a, b = (analyze_position_bias(m, PROMPTS, position, progress=False) for m in (single, split))
    for name in ("distance_mass", "position_mean", "segment_mean"):
        torch.testing.assert_close(b.tensors[name], a.tensors[name], rtol=0, atol=1e-6, equal_nan=True, msg=name)


def test_nnsight_backend_on_a_split_model(folder, tmp_path):
    """nnsight traces run through accelerate's hooks too: the statistics match the one-device run."""
    from headlab.probes.nnsight_backend import run_trace

    single = headlab.load(str(folder), device="cpu")
    split = headlab.load(str(folder), device_map=SPLIT, offload_folder=tmp_path / "offload")
    ids, mask = _batch()
    a, _ = _stats(single)
    run = run_trace(split, ids, mask, layers=range(4), request=StatsRequest(distance=True))
    for layer in range(4):
        counted = a[layer].row_counted[:, None, :].expand_as(a[layer].lse)
        torch.testing.assert_close(run.stats[layer].key_mass, a[layer].key_mass, rtol=0, atol=2e-6)
        torch.testing.assert_close(run.stats[layer].entropy[counted], a[layer].entropy[counted], rtol=0, atol=2e-6)


def test_tiny_zoo_models_take_a_device_map(tmp_path):
    """Models built in memory are dispatched by accelerate as from_pretrained would."""
    reference = headlab.load("tiny-qwen3", device="cpu")
    split = headlab.load("tiny-qwen3", device_map=SPLIT, offload_folder=tmp_path / "offload")
    assert split.placement == SPLIT
    _assert_equal_stats(_stats(reference)[0], _stats(split)[0])
    budget = headlab.load("tiny-qwen3", device_map="auto", max_memory="cpu=1GiB")
    assert budget.device == torch.device("cpu")


def test_weights_false_builds_the_architecture_only(folder):
    """The local side of a remote run: names, shapes and tokenizer, no weights read."""
    loaded = headlab.load(str(folder), weights=False)
    assert all(p.device.type == "meta" for p in loaded.model.parameters())
    assert (loaded.arch.n_layers, loaded.arch.n_heads, loaded.arch.n_kv_heads) == (4, 4, 2)
    assert loaded.device == torch.device("cpu") and loaded.tokenizer("ab")["input_ids"]


# --- the CLI ----------------------------------------------------------------------------------------------

def _no_load(*args, **kwargs):
    raise AssertionError("the model must not load when an option is bad")


@pytest.mark.parametrize("extra, says", [
    (["--max-memory", "0:20GiB"], "bad --max-memory"),
    (["--max-memory", "cpu=1GiB"], "add --device-map auto"),
    (["--device-map", "{oops"], "not valid JSON"),
    (["--device-map", json.dumps(SPLIT)], "--offload-folder"),
    (["--remote"], "add --runtime nnsight"),
    (["--remote", "--runtime", "nnsight"], "NDIF_API_KEY"),
])
def test_bad_scale_options_fail_before_loading(tmp_path, monkeypatch, extra, says):
    monkeypatch.setattr("headlab.loading.load", _no_load)
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    for command in ("sinks", "position-bias"):
        result = runner.invoke(analyze_app, [command, "--model", "tiny-llama", "--out", str(tmp_path), *extra])
        assert result.exit_code == 2, result.output
        assert result.output.count("error:") == 1 and says in " ".join(result.output.split()), result.output
        assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_remote_refuses_what_runs_only_locally(tmp_path, monkeypatch):
    monkeypatch.setattr("headlab.loading.load", _no_load)
    monkeypatch.setenv("NDIF_API_KEY", "k-123")
    remote = ["--model", "org/some-model", "--runtime", "nnsight", "--remote", "--out", str(tmp_path)]
    for command, extra, says in (("sinks", ["--generate", "4"], "drop --generate"),
                                 ("position-bias", [], "--rollout-tokens 0 --retrieval-trials 0"),
                                 ("sinks", ["--device-map", "auto"], "drop --device-map")):
        result = runner.invoke(analyze_app, [command, *remote, *extra])
        assert result.exit_code == 2 and says in " ".join(result.output.split()), result.output


def test_cli_split_run_equals_one_device_run(folder, tmp_path):
    args = ["sinks", "--model", str(folder), "--n-prompts", "3", "--max-tokens", "24", "--quiet", "--out",
            str(tmp_path / "runs")]
    one = runner.invoke(analyze_app, [*args, "--name", "one"])
    split = runner.invoke(analyze_app, [*args, "--name", "split", "--device-map", json.dumps(SPLIT),
                                        "--offload-folder", str(tmp_path / "offload")])
    assert one.exit_code == 0 and split.exit_code == 0, one.output + split.output
    a, b = Result.load(tmp_path / "runs" / "one"), Result.load(tmp_path / "runs" / "split")
    torch.testing.assert_close(b.tensors["alpha"], a.tensors["alpha"], rtol=0, atol=1e-6, equal_nan=True)
    settings = json.loads((tmp_path / "runs" / "split" / "manifest.json").read_text())["provenance"]["settings"]
    assert settings["device_map"] == SPLIT and settings["placement"] == SPLIT


def test_cli_nnsight_backend_run_equals_native(tmp_path):
    args = ["sinks", "--model", "tiny-llama", "--n-prompts", "3", "--max-tokens", "24", "--quiet", "--out",
            str(tmp_path)]
    native = runner.invoke(analyze_app, [*args, "--name", "native"])
    through = runner.invoke(analyze_app, [*args, "--name", "nnsight", "--runtime", "nnsight"])
    assert native.exit_code == 0 and through.exit_code == 0, native.output + through.output
    a, b = Result.load(tmp_path / "native"), Result.load(tmp_path / "nnsight")
    torch.testing.assert_close(b.tensors["alpha"], a.tensors["alpha"], rtol=0, atol=1e-6, equal_nan=True)
    settings = json.loads((tmp_path / "nnsight" / "manifest.json").read_text())["provenance"]["settings"]
    assert settings["backend"] == "nnsight"


def test_circuits_takes_the_placement_options(tmp_path, monkeypatch):
    monkeypatch.setattr("headlab.loading.load", _no_load)
    result = runner.invoke(analyze_app, ["circuits", "--model", "tiny-llama", "--out", str(tmp_path),
                                         "--max-memory", "cpu=lots", "--device-map", "auto"])
    assert result.exit_code == 2 and result.output.count("error:") == 1, result.output
    assert "bad --max-memory size 'lots'" in " ".join(result.output.split())
