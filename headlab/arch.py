"""Architecture adapters: where the layers, attention, o_proj and MLP of a model live.

An ``Arch`` is the only place that knows module paths; probes and interventions ask it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from .errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class Family:
    """Module paths of one family, relative to the language model's layer list and each layer."""

    layer_lists: tuple[str, ...]
    attention: str
    o_proj: str
    mlp: str
    causal: bool = True


LLAMA_STYLE = Family(
    layer_lists=("model.layers", "model.language_model.layers", "language_model.model.layers", "layers"),
    attention="self_attn",
    o_proj="self_attn.o_proj",
    mlp="mlp",
)
GPT2_STYLE = Family(layer_lists=("transformer.h", "h"), attention="attn", o_proj="attn.c_proj", mlp="mlp")
# BERT has no single MLP module: the down projection is output.dense (before dropout + LayerNorm).
BERT_STYLE = Family(
    layer_lists=("bert.encoder.layer", "encoder.layer"),
    attention="attention.self",
    o_proj="attention.output.dense",
    mlp="output.dense",
    causal=False,
)

FAMILIES: dict[str, Family] = {
    **{t: LLAMA_STYLE for t in (
        "llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "gemma", "gemma2", "phi3",
        "olmo", "olmo2", "granite", "qwen2_vl_text", "qwen2_5_vl_text", "llava", "qwen2_vl", "qwen2_5_vl",
    )},
    "gpt2": GPT2_STYLE,
    "bert": BERT_STYLE,
}
MULTIMODAL = {"llava", "qwen2_vl", "qwen2_5_vl"}


def text_config(config: PretrainedConfig) -> PretrainedConfig:
    """The language model's config (LVLMs nest it as ``text_config``)."""
    return getattr(config, "text_config", None) or config


def check_supported(config: PretrainedConfig) -> None:
    if config.model_type not in FAMILIES:
        raise UnsupportedArchitectureError(
            f"architecture {config.model_type!r} is not supported yet; supported model types: "
            f"{', '.join(sorted(FAMILIES))}. Open an issue with the model id to ask for it."
        )


@dataclass
class Arch:
    """What headlab needs to know about one loaded model.

    ``adds_bos``: whether the tokenizer itself puts BOS first (Llama yes, Qwen/GPT-2 no).
    ``bos``: the policy in force for this run: ``"auto"`` keeps the tokenizer's behaviour,
    ``"add"`` prepends BOS when the tokenizer does not, ``"none"`` strips it.
    """

    model_type: str
    family: Family
    layers: nn.ModuleList = field(repr=False)
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    max_positions: int | None
    adds_bos: bool
    bos_token_id: int | None
    image_token_id: int | None = None
    bos: str = "auto"
    _by_module: dict[int, int] = field(default_factory=dict, repr=False)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def causal(self) -> bool:
        return self.family.causal

    @property
    def is_multimodal(self) -> bool:
        return self.model_type in MULTIMODAL

    def attention(self, layer: int) -> nn.Module:
        return self.layers[layer].get_submodule(self.family.attention)

    def o_proj(self, layer: int) -> nn.Module:
        return self.layers[layer].get_submodule(self.family.o_proj)

    def mlp(self, layer: int) -> nn.Module:
        return self.layers[layer].get_submodule(self.family.mlp)

    def layer_of(self, attention_module: nn.Module) -> int | None:
        """Layer index of an attention module of the language model, None for others (vision tower)."""
        if not self._by_module:
            self._by_module = {id(self.attention(i)): i for i in range(self.n_layers)}
        return self._by_module.get(id(attention_module))

    def image_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[batch, pos]`` True at image-token positions (all False for text-only models)."""
        if self.image_token_id is None:
            return torch.zeros_like(input_ids, dtype=torch.bool)
        return input_ids == self.image_token_id

    @classmethod
    def from_model(
        cls, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, bos: str = "auto"
    ) -> Arch:
        config = model.config
        check_supported(config)
        family = FAMILIES[config.model_type]
        layers = _find_layers(model, family)
        tc = text_config(config)
        n_heads = tc.num_attention_heads
        hidden = tc.hidden_size
        head_dim = getattr(tc, "head_dim", None) or hidden // n_heads
        bos_id = bos_token_of(tokenizer)
        if bos_id is None:
            bos_id = getattr(tc, "bos_token_id", None)
        image_id = getattr(config, "image_token_id", None) or getattr(config, "image_token_index", None)
        return cls(
            model_type=config.model_type,
            family=family,
            layers=layers,
            n_heads=n_heads,
            n_kv_heads=getattr(tc, "num_key_value_heads", None) or n_heads,
            head_dim=head_dim,
            hidden_size=hidden,
            max_positions=getattr(tc, "max_position_embeddings", None) or getattr(tc, "n_positions", None),
            adds_bos=tokenizer_adds_bos(tokenizer),
            bos_token_id=bos_id,
            image_token_id=image_id,
            bos=bos,
        )


def bos_token_of(tokenizer: PreTrainedTokenizerBase | None) -> int | None:
    """The first-position special token: BOS, or [CLS] for BERT-style encoders."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)  # processors wrap a tokenizer
    if tok is None:
        return None
    return tok.bos_token_id if tok.bos_token_id is not None else getattr(tok, "cls_token_id", None)


def tokenizer_adds_bos(tokenizer: PreTrainedTokenizerBase | None) -> bool:
    bos = bos_token_of(tokenizer)
    if bos is None:
        return False
    ids = getattr(tokenizer, "tokenizer", tokenizer)("a").input_ids
    return len(ids) > 0 and ids[0] == bos


def _find_layers(model: nn.Module, family: Family) -> nn.ModuleList:
    for path in family.layer_lists:
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList):
            return layers
    raise UnsupportedArchitectureError(
        f"could not find the decoder layers of {type(model).__name__} (looked for "
        f"{', '.join(family.layer_lists)}); this model variant is not supported yet"
    )
