"""The model zoo: aliases for real checkpoints and tiny random-init models built offline.

Tiny models are for tests and quick looks. Their weights are random (seeded), so they have no
real attention sinks; never read a tiny model's numbers as science.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .tokenizer import SPECIAL_TOKENS, VOCAB_SIZE, byte_tokenizer

ALIASES: dict[str, str] = {
    "qwen3-0.6b": "Qwen/Qwen3-0.6B",
    "qwen3-1.7b": "Qwen/Qwen3-1.7B",
    "qwen3-4b": "Qwen/Qwen3-4B",
    "qwen3-8b": "Qwen/Qwen3-8B",
    "qwen3-14b": "Qwen/Qwen3-14B",
    "qwen3-32b": "Qwen/Qwen3-32B",
    "qwq-32b": "Qwen/QwQ-32B",
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "llava-1.5-7b": "llava-hf/llava-1.5-7b-hf",
    "llava-1.5-13b": "llava-hf/llava-1.5-13b-hf",
    "qwen2-vl-7b": "Qwen/Qwen2-VL-7B-Instruct",
    "qwen2.5-vl-7b": "Qwen/Qwen2.5-VL-7B-Instruct",
}

# Trained checkpoints shipped inside the package (HF format, safetensors): small causal LMs with real
# attention sinks, trained by `headlab zoo train` on the Bigram-Backcopy task (headlab/backcopy.py).
BUNDLED_DIR = Path(__file__).parent / "data" / "models"
BUNDLED_MODELS: dict[str, str] = {
    "backcopy": "Llama-style, 4 layers x 4 heads, d=128, trained on Bigram-Backcopy with BOS (real first-token sink)",
    "backcopy-nobos": "the same model and recipe trained without BOS (where the sink goes without one)",
}
ALIASES.update({name: str(BUNDLED_DIR / name) for name in BUNDLED_MODELS})
# Prompts used when a bundled model is analysed without --prompts: sequences from its own task, as text.
DEFAULT_PROMPTS: dict[str, str] = {"backcopy": "backcopy_prompts.txt", "backcopy-nobos": "backcopy_prompts.txt"}


def default_prompt_file(model: str) -> Path | None:
    """The bundled prompt file that goes with ``model``, or None (then the general bundled set is used)."""
    name = DEFAULT_PROMPTS.get(model)
    return Path(__file__).parent / "data" / name if name else None


BOS_ID, EOS_ID, PAD_ID, IMAGE_ID = (256 + i for i in range(len(SPECIAL_TOKENS)))
TINY_SEED = 0

# One shape for all tiny decoders: 4 layers, 4 query heads sharing 2 kv heads (GQA), head_dim 16.
_TINY_DECODER = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=2048,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=PAD_ID,
    tie_word_embeddings=True,
)


@dataclass(frozen=True)
class TinySpec:
    config: Callable[[], PretrainedConfig]
    model_class: type
    adds_bos: bool
    description: str


def _tiny_llava_config() -> PretrainedConfig:
    text = dict(_TINY_DECODER, model_type="llama")
    vision = dict(
        model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32,
    )
    return AutoConfig.for_model(
        "llava", text_config=text, vision_config=vision, image_token_index=IMAGE_ID,
        vision_feature_layer=-2, vision_feature_select_strategy="default",  # as LLaVA-1.5
    )


def _tiny_qwen2_vl_config() -> PretrainedConfig:
    text = {k: v for k, v in _TINY_DECODER.items() if k != "head_dim"}
    text.update(model_type="qwen2_vl_text", rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 4]})
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=8,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    return AutoConfig.for_model(
        "qwen2_vl", text_config=text, vision_config=vision, image_token_id=IMAGE_ID,
        video_token_id=IMAGE_ID, vision_start_token_id=BOS_ID, vision_end_token_id=EOS_ID,
    )


TINY_MODELS: dict[str, TinySpec] = {
    "tiny-qwen3": TinySpec(lambda: AutoConfig.for_model("qwen3", **_TINY_DECODER), AutoModelForCausalLM,
                           False, "Qwen3 architecture, 4 layers x 4 heads (2 kv heads), random init"),
    "tiny-llama": TinySpec(lambda: AutoConfig.for_model("llama", **_TINY_DECODER), AutoModelForCausalLM,
                           True, "Llama architecture, 4 layers x 4 heads (2 kv heads), random init"),
    "tiny-gpt2": TinySpec(
        lambda: AutoConfig.for_model("gpt2", vocab_size=VOCAB_SIZE, n_embd=64, n_layer=4, n_head=4,
                                     n_positions=1024, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                                     pad_token_id=PAD_ID),
        AutoModelForCausalLM, False, "GPT-2 architecture, 4 layers x 4 heads, random init"),
    "tiny-llava": TinySpec(_tiny_llava_config, AutoModelForImageTextToText, True,
                           "LLaVA: CLIP vision tower + Llama language model, random init"),
    "tiny-qwen2-vl": TinySpec(_tiny_qwen2_vl_config, AutoModelForImageTextToText, False,
                              "Qwen2-VL: vision transformer + Qwen2 language model, random init"),
}


def build_tiny(name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Random-init model with a fixed seed (same weights every call) and the offline byte tokenizer."""
    spec = TINY_MODELS[name]
    config = spec.config()
    # fork_rng: building a tiny model must not disturb the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = spec.model_class.from_config(config, attn_implementation="sdpa")
    model.name_or_path = name
    return model.eval(), byte_tokenizer(add_bos=spec.adds_bos)
