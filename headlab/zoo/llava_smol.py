"""``llava-smol``: a LLaVA whose language model is the real, frozen SmolLM2-135M-Instruct.

A small CLIP vision tower (hidden 192, 4 layers, 4 heads, MLP 768; 64×64 images, patch 16 → 16 image
tokens; feature layer −2, CLS dropped) and LLaVA's 2-layer GELU projector 192→576→576 are trained on
headlab's synthetic icons (headlab/training/lvlm_data.py) while every language-model weight stays frozen, so the
LVLM keeps SmolLM2's co-occurrence prior and names absent partners ("a bat and a ball") from it.

The bundled checkpoint holds only the vision tower, the projector and the config; :func:`assemble`
puts them together with smollm2-135m's weights from headlab's cache.

The image placeholder is SmolLM2's unused special token ``<jupyter_script>`` (id 15): an existing id
keeps the embedding matrix (and the tied output head) untouched, so the language model is exactly
smollm2-135m; LLaVA replaces the token's embedding by the image features before the first layer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from headlab.errors import ModelFilesError
from headlab.lvlm import clip_image_processor
from headlab.zoo.catalog import BUNDLED_DIR

NAME = "llava-smol"
FOLDER = BUNDLED_DIR / NAME
WEIGHTS = "vision_projector.safetensors"
IMAGE_TOKEN = "<jupyter_script>"
IMAGE_SIZE = 64
PATCH = 16
N_IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # 16

VISION = dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=192)

# SmolLM2's own template, plus image items: one placeholder per image, expanded by the processor to 16.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '" + IMAGE_TOKEN + "\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def llava_config(text_config) -> LlavaConfig:
    """The LLaVA config around SmolLM2's text config."""
    tokenizer_free = dict(text_config.to_dict())
    tokenizer_free.pop("_name_or_path", None)
    return LlavaConfig(
        text_config=tokenizer_free, vision_config=CLIPVisionConfig(**VISION).to_dict(),
        image_token_index=15, vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", image_seq_length=N_IMAGE_TOKENS, tie_word_embeddings=True,
    )


def processor(tokenizer) -> LlavaProcessor:
    """CLIP preprocessing at 64×64 + SmolLM2's tokenizer; the placeholder expands to 16 image tokens."""
    images = clip_image_processor(IMAGE_SIZE)
    proc = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=PATCH,
                          vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                          image_token=IMAGE_TOKEN, num_additional_image_tokens=1)
    assert proc.image_token_id == 15, proc.image_token_id
    return proc


def assemble(language_model, vision_state: dict[str, torch.Tensor] | None = None,
             seed: int = 0) -> LlavaForConditionalGeneration:
    """A ``LlavaForConditionalGeneration`` sharing ``language_model``'s modules (SmolLM2, a causal LM).

    ``vision_state``: ``vision_tower.*`` and ``multi_modal_projector.*`` tensors (None: a seeded random init)."""
    config = llava_config(language_model.config)
    dtype = next(language_model.parameters()).dtype
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    # The language model is the caller's (already loaded) SmolLM2: no copy, no re-init.
    model.model.language_model = language_model.model
    model.lm_head = language_model.lm_head
    # One config object for the language model: switching the attention implementation (headlab's probes)
    # through the LLaVA config must reach the layers, which read their own module's config.
    model.config.text_config = language_model.config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.model.vision_tower = AutoModel.from_config(config.vision_config)
        model.model.multi_modal_projector = LlavaMultiModalProjector(config)
    if vision_state is not None:
        trained = ("model.vision_tower.", "model.multi_modal_projector.")
        own = {k: v for k, v in model.state_dict().items() if k.startswith(trained)}
        state = {("model." + k if not k.startswith("model.") else k): v for k, v in vision_state.items()}
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ModelFilesError(f"the llava-smol vision checkpoint does not match the model: missing "
                                  f"{missing[:3]}, unexpected {unexpected[:3]}; retrain it with "
                                  "`headlab zoo train llava-smol`")
        model.load_state_dict(state, strict=False)
    model.model.vision_tower.to(dtype)
    model.model.multi_modal_projector.to(dtype)
    model.model.vision_tower.config._attn_implementation = "sdpa"
    model.config._attn_implementation = language_model.config._attn_implementation
    return model.eval()


def vision_state(model: LlavaForConditionalGeneration) -> dict[str, torch.Tensor]:
    """The trained part: vision tower + projector (float16: half the file, well within the bf16 training noise)."""
    return {k: v.detach().to(torch.float16).contiguous().clone() for k, v in model.state_dict().items()
            if k.startswith(("model.vision_tower.", "model.multi_modal_projector."))}


def load_vision_state(folder: Path = FOLDER) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(folder) / WEIGHTS
    if not path.is_file():
        raise ModelFilesError(f"{path} is missing: the llava-smol checkpoint has not been trained here; run "
                              "`headlab zoo train llava-smol` (about an hour on one CPU thread)")
    return load_file(str(path))


def load_llava_smol(dtype: torch.dtype, device: str, folder: Path = FOLDER):
    """``(model, processor)``: the bundled vision tower + projector on smollm2-135m from the zoo."""
    from headlab.zoo.gguf import converted_folder, smollm2_gguf

    # The frozen language model: smollm2-135m's converted GGUF, read as headlab.load reads it.
    smol_folder = converted_folder(smollm2_gguf())
    language_model = AutoModelForCausalLM.from_pretrained(smol_folder, dtype=dtype, use_safetensors=True,
                                                          attn_implementation="sdpa", local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(smol_folder, local_files_only=True)
    model = assemble(language_model.eval(), load_vision_state(folder))
    model.name_or_path = NAME
    meta = Path(folder) / "config.json"
    if meta.is_file():
        saved = json.loads(meta.read_text())
        if saved.get("vision_config", {}).get("hidden_size") != VISION["hidden_size"]:
            raise ModelFilesError(f"{meta} describes another vision tower than this headlab's llava-smol: retrain it")
    return model.to(device).eval(), processor(tokenizer)
