"""Loading: local folders in Hugging Face format, the tiny zoo, MiniLM, and the Arch adapter."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

import headlab
from headlab.batching import batches
from headlab.errors import UnsupportedArchitectureError
from headlab.zoo.tiny import TINY_MODELS, build_tiny


def test_local_folder_round_trip(tmp_path):
    model, tok = build_tiny("tiny-llama")
    model.save_pretrained(tmp_path / "m")  # safetensors by default
    tok.save_pretrained(tmp_path / "m")
    loaded = headlab.load(str(tmp_path / "m"), dtype="float32", device="cpu", local_files_only=True)
    ids = tok("local folder", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, model(ids).logits)
    assert loaded.arch.model_type == "llama" and loaded.arch.n_layers == 4
    assert loaded.source == str((tmp_path / "m").resolve())


def test_tiny_models_are_deterministic_and_fully_described():
    for name in TINY_MODELS:
        a, _ = build_tiny(name)
        b, _ = build_tiny(name)
        for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert torch.equal(va, vb), (name, ka)
        arch = headlab.load(name, device="cpu").arch
        assert arch.n_layers == 4 and arch.n_heads == 4 and arch.head_dim == 16
        assert arch.o_proj(0) is not None and arch.mlp(3) is not None


@pytest.mark.parametrize("name,kv_heads,adds_bos,multimodal", [
    ("tiny-qwen3", 2, False, False), ("tiny-llama", 2, True, False), ("tiny-gpt2", 4, False, False),
    ("tiny-llava", 2, True, True), ("tiny-qwen2-vl", 2, False, True), ("minilm", 12, True, False),
])
def test_arch_adapter(load_model, name, kv_heads, adds_bos, multimodal):
    arch = load_model(name).arch
    assert arch.n_kv_heads == kv_heads
    assert arch.adds_bos is adds_bos
    assert arch.is_multimodal is multimodal
    assert arch.causal is (name != "minilm")
    assert arch.layer_of(arch.attention(2)) == 2


def test_bos_policy(load_model):
    qwen = headlab.load("tiny-qwen3", device="cpu", bos="add")
    (batch,) = batches(qwen, ["hi"], 8, 1)
    assert batch.input_ids[0].tolist() == [qwen.arch.bos_token_id, ord("h"), ord("i")]
    llama = headlab.load("tiny-llama", device="cpu", bos="none")
    (batch,) = batches(llama, ["hi"], 8, 1)
    assert batch.input_ids[0].tolist() == [ord("h"), ord("i")]
    (batch,) = batches(load_model("tiny-llama"), ["hi"], 8, 1)
    assert batch.input_ids[0, 0] == llama.arch.bos_token_id


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    AutoConfig.for_model("t5").save_pretrained(tmp_path / "t5")
    (tmp_path / "t5" / "model.safetensors").write_bytes(b"")
    with pytest.raises(UnsupportedArchitectureError, match="'t5' is not supported.*qwen3"):
        headlab.load(str(tmp_path / "t5"), local_files_only=True)

