"""The model zoo: aliases for real checkpoints and tiny random-init models built offline.

Tiny models are for tests and quick looks. Their weights are random (seeded), so they have no
real attention sinks; never read a tiny model's numbers as science.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

# Names and descriptions are plain data in headlab.zoo.catalog (the CLI lists them without torch).
from headlab.zoo.catalog import TINY_DESCRIPTIONS
from headlab.zoo.tokenizer import SPECIAL_TOKENS, VOCAB_SIZE, byte_tokenizer

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
                           False, TINY_DESCRIPTIONS["tiny-qwen3"]),
    "tiny-llama": TinySpec(lambda: AutoConfig.for_model("llama", **_TINY_DECODER), AutoModelForCausalLM,
                           True, TINY_DESCRIPTIONS["tiny-llama"]),
    "tiny-gpt2": TinySpec(
        lambda: AutoConfig.for_model("gpt2", vocab_size=VOCAB_SIZE, n_embd=64, n_layer=4, n_head=4,
                                     n_positions=1024, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                                     pad_token_id=PAD_ID),
        AutoModelForCausalLM, False, TINY_DESCRIPTIONS["tiny-gpt2"]),
    "tiny-llava": TinySpec(_tiny_llava_config, AutoModelForImageTextToText, True,
                           TINY_DESCRIPTIONS["tiny-llava"]),
    "tiny-qwen2-vl": TinySpec(_tiny_qwen2_vl_config, AutoModelForImageTextToText, False,
                              TINY_DESCRIPTIONS["tiny-qwen2-vl"]),
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
