"""Architecture adapters: where the layers, attention, o_proj and MLP of a model live.

An ``Arch`` is the only place that knows module paths; probes and interventions ask it.

Most decoders are found structurally: the decoder layers are the longest ``nn.ModuleList`` of the
language model whose items hold an attention module; inside a layer, the attention module is the one
whose class calls transformers' ``AttentionInterface`` (that is the module headlab's attention
function receives), its output projection and the MLP are found by their usual names, and the head
counts come from the text config and the attention module. ``FAMILIES`` overrides the few layouts
that the search would get wrong (BERT's o_proj and MLP sit outside ``attention.self``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace
from functools import cache

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from headlab.errors import UnsupportedArchitectureError


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

# The override table: model types whose paths are fixed here rather than searched for.
FAMILIES: dict[str, Family] = {
    **{t: LLAMA_STYLE for t in (
        "llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "gemma", "gemma2", "phi3",
        "olmo", "olmo2", "granite", "qwen2_vl_text", "qwen2_5_vl_text", "llava", "qwen2_vl", "qwen2_5_vl",
    )},
    "gpt2": GPT2_STYLE,
    "bert": BERT_STYLE,
}
MULTIMODAL = {"llava", "qwen2_vl", "qwen2_5_vl"}
# Model types the structural search would accept but whose attention headlab's function cannot reproduce.
REFUSED: dict[str, str] = {
    "doge": "Doge builds a learned dynamic attention mask out of the model's mask inside each attention "
            "module, which needs the dense mask headlab never builds",
}

# Model types with no attention heads to read (state-space, recurrent, hybrid): transformers loads them as causal
# LMs, so only the structural check after loading would refuse them; before that, a folder's missing tokenizer or a
# GGUF conversion fails with a message about the wrong thing. This table refuses them from the config (or the GGUF
# header) alone; docs/architectures.md lists them among the refused architectures.
_SSM = "a state-space (Mamba) model: its layers have no attention heads"
_RECURRENT = "a recurrent model: its layers have no attention heads"
_HYBRID = ("a hybrid model: only some of its layers have attention (the others are state-space or recurrent), "
           "and headlab needs attention in every decoder layer")

NO_ATTENTION: dict[str, str] = {
    **dict.fromkeys(("mamba", "mamba2", "falcon_mamba"), _SSM),
    **dict.fromkeys(("rwkv", "xlstm"), _RECURRENT),
    **dict.fromkeys(("recurrent_gemma", "jamba", "bamba", "zamba", "zamba2", "granitemoehybrid", "nemotron_h",
                     "qwen3_next"), _HYBRID),
}


def check_has_attention(model_type: str, source: str) -> None:
    """Raise ``UnsupportedArchitectureError`` when ``model_type`` has no attention heads to analyse."""
    reason = NO_ATTENTION.get(model_type)
    if reason is not None:
        raise UnsupportedArchitectureError(
            f"{source}: architecture {model_type!r} is not supported for attention analysis: it is {reason}. "
            "headlab reads the attention heads of transformer decoders (llama, qwen3, gpt2, …): use one of those")


# Names of the output projection inside an attention module, most specific first.
O_PROJ_NAMES = ("o_proj", "out_proj", "c_proj", "dense", "wo", "Wo", "o", "out", "proj", "output_proj",
                "attn_out", "output.dense")
# Names of the MLP (or MoE block) inside a decoder layer.
MLP_NAMES = ("mlp", "feed_forward", "block_sparse_moe", "ffn", "moe", "mlp_block", "ff", "feedforward",
             "ffn_layer", "ffw", "mixer_mlp", "output.dense", "fc2")
MLP_CLASS_HINTS = ("mlp", "moe", "feedforward", "ffn", "experts")
# Parts of a module path that mark a tower other than the language model.
NON_LANGUAGE = ("vision", "visual", "image", "audio", "speech", "vqmodel", "vq_model", "perceiver",
                "projector", "mtp")
# Attribute spellings of head counts across configs.
HEAD_KEYS = ("num_attention_heads", "n_head", "num_heads", "n_heads", "attention_heads", "n_heads_q")
KV_HEAD_KEYS = ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "n_head_kv", "kv_n_heads",
                "num_kv_heads_per_layer")


def text_config(config: PretrainedConfig) -> PretrainedConfig:
    """The language model's config (LVLMs nest it as ``text_config``)."""
    return getattr(config, "text_config", None) or config


def _decoder_model_types() -> set[str]:
    """Model types transformers loads as causal or image-text-to-text LMs (the candidates for discovery)."""
    from transformers.models.auto import modeling_auto as auto

    names = set(auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    names |= set(getattr(auto, "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", {}))
    return names


def check_supported(config: PretrainedConfig) -> None:
    """Cheap config-level check before any weight is read: is this a decoder transformers can load?

    The real check is structural and happens in ``Arch.from_model``; this one refuses what cannot be a
    decoder language model at all (encoder-decoders, audio models…) before a download starts.
    """
    model_type = config.model_type
    _check_not_refused(model_type)
    if model_type in FAMILIES:
        return
    remote = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if model_type in _decoder_model_types() and not getattr(config, "is_encoder_decoder", False) or remote:
        return
    raise UnsupportedArchitectureError(
        f"architecture {model_type!r} is not supported: headlab reads decoder language models that "
        f"transformers loads with AutoModelForCausalLM or AutoModelForImageTextToText (and BERT encoders); "
        f"tested model types include {', '.join(sorted(FAMILIES))} (docs/architectures.md lists all). "
        "Open an issue with the model id to ask for it."
    )


def _check_not_refused(model_type: str) -> None:
    if model_type in REFUSED:
        raise UnsupportedArchitectureError(f"architecture {model_type!r} is not supported: {REFUSED[model_type]}")


@dataclass
class Arch:
    """What headlab needs to know about one loaded model.

    ``adds_bos``: whether the tokenizer itself puts BOS first (Llama yes, Qwen/GPT-2 no).
    ``bos``: the policy in force for this run: ``"auto"`` keeps the tokenizer's behaviour,
    ``"add"`` prepends BOS when the tokenizer does not, ``"none"`` strips it.
    ``head_dim`` is the query/key width per head; ``v_head_dim`` the value (and z) width per head,
    which differs in multi-head latent attention (DeepSeek-V2/V3).
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
    v_head_dim: int | None = None
    multimodal: bool = False
    _by_module: dict[int, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.v_head_dim is None:
            self.v_head_dim = self.head_dim

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def causal(self) -> bool:
        return self.family.causal

    @property
    def is_multimodal(self) -> bool:
        return self.multimodal or self.model_type in MULTIMODAL

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
        # No config-level check here: a composite model's own config can be its nested text config
        # (Emu3ForCausalLM has model_type "emu3_text_model"); the structure decides.
        _check_not_refused(config.model_type)
        family = FAMILIES.get(config.model_type)
        if family is not None:
            layers = _find_layers(model, family)
        else:
            layers, family = discover(model)
        tc = text_config(config)
        if not family.causal and getattr(tc, "is_decoder", False):
            family = replace(family, causal=True)  # a BERT-style encoder loaded as a decoder (…ForCausalLM)
        heads = head_shape(tc, layers[0].get_submodule(family.attention), layers[0].get_submodule(family.o_proj))
        bos_id = bos_token_of(tokenizer)
        if bos_id is None:
            bos_id = getattr(tc, "bos_token_id", None)
        image_id = getattr(config, "image_token_id", None) or getattr(config, "image_token_index", None)
        return cls(
            model_type=config.model_type,
            family=family,
            layers=layers,
            n_heads=heads.n_heads,
            n_kv_heads=heads.n_kv_heads,
            head_dim=heads.head_dim,
            v_head_dim=heads.v_head_dim,
            hidden_size=_first_attr(tc, ("hidden_size", "n_embd", "d_model", "dim")),
            max_positions=_first_attr(tc, ("max_position_embeddings", "n_positions", "max_seq_len",
                                           "seq_length")),
            adds_bos=tokenizer_adds_bos(tokenizer),
            bos_token_id=bos_id,
            image_token_id=image_id,
            bos=bos,
            multimodal=hasattr(config, "vision_config"),
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


# ---------------------------------------------------------------------------------------------------
# Structural discovery


@dataclass(frozen=True)
class HeadShape:
    """Head counts and widths of one attention module."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    v_head_dim: int


@cache
def calls_attention_interface(cls: type) -> bool:
    """Whether a module class computes attention through transformers' ``AttentionInterface``.

    Only such modules reach headlab's attention function (they pass ``self`` to it), so this is what
    makes an attention module probeable. Read from the source of the class and its bases.
    """
    for klass in cls.__mro__:
        if klass in (nn.Module, object) or not klass.__module__.startswith("transformers"):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        if "ALL_ATTENTION_FUNCTIONS" in source or "attention_interface(" in source:
            return True
    return False


def _is_attention_like(module: nn.Module) -> bool:
    return type(module).__name__.lower().endswith("attention") or calls_attention_interface(type(module))


def discover(model: nn.Module) -> tuple[nn.ModuleList, Family]:
    """Find the language model's decoder layers and the paths of attention, o_proj and MLP in them.

    Raises ``UnsupportedArchitectureError`` naming the first thing that could not be found.
    """
    name = type(model).__name__
    path, layers = find_layer_list(model)
    # Hybrids may open with a non-attention layer: read the paths off the first layer with attention.
    first = next((i for i, layer in enumerate(layers) if _interface_modules(layer)), 0)
    where = f"layer {first} of {name}"
    attention = find_attention(layers[first], where)
    o_proj = find_o_proj(layers[first], attention, where)
    mlp = find_mlp(layers[first], where)
    _check_dense_keys(layers[first].get_submodule(attention), name)
    _check_score_arguments(layers[first].get_submodule(attention), name)
    for index, layer in enumerate(layers):
        _check_layer(layer, (attention, o_proj, mlp), f"layer {index} of {name}", first)
    return layers, Family(layer_lists=(path,), attention=attention, o_proj=o_proj, mlp=mlp)


def _interface_modules(layer: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of the modules inside a layer that call ``AttentionInterface``."""
    return [(p, m) for p, m in layer.named_modules() if p and calls_attention_interface(type(m))]


def find_layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(path, layers)``: the longest ModuleList whose items hold attention-like modules.

    Lists inside a vision/audio tower lose to the language model's (ties go to the shorter path),
    and lists of attention modules themselves (no layer around them) are not layer lists.
    """
    candidates = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0 or _is_attention_like(module[0]):
            continue
        if not any(_is_attention_like(m) for item in module for m in item.modules()):
            continue
        non_language = any(part in path.lower() for part in NON_LANGUAGE)
        candidates.append((non_language, -len(module), path.count("."), path, module))
    if not candidates:
        raise UnsupportedArchitectureError(
            f"found no list of decoder layers with attention in {type(model).__name__}: headlab reads "
            "transformer decoders (state-space and recurrent models, and hybrids with no attention layer in "
            "this configuration, have no attention to read)"
        )
    best = min(candidates, key=lambda c: c[:4])
    *_, path, layers = best
    # Two language stacks of the same depth (HRM's H and L modules) mean layer l is not one layer.
    rivals = [c[3] for c in candidates if c[:2] == best[:2] and c[3] != path and not c[3].startswith(path + ".")]
    if rivals:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has several stacks of decoder layers ({path}, {', '.join(rivals)}); "
            "headlab numbers the layers of one stack"
        )
    return path, layers


def find_attention(layer: nn.Module, where: str) -> str:
    """Path (inside a layer) of the module that calls ``AttentionInterface``: self-attention, not cross."""
    found = _interface_modules(layer)
    if not found:
        named = [path for path, m in layer.named_modules() if path and _is_attention_like(m)]
        what = f"its attention ({named[0]}: {type(layer.get_submodule(named[0])).__name__})" if named else (
            "no attention module")
        raise UnsupportedArchitectureError(
            f"{where} has {what} that does not go through transformers' AttentionInterface, "
            "so headlab's attention function cannot run in it"
        )
    # Cross-attention (encoder_attn, crossattention) is idle in a causal LM: prefer self-attention.
    self_attn = [p for p, _ in found if not any(w in p.lower() for w in ("cross", "encoder_attn"))]
    paths = self_attn or [p for p, _ in found]
    return min(paths, key=lambda p: p.count("."))


# Keyword arguments some attention modules hand the attention function to change the scores: headlab's
# function does not take them, so it would compute a different attention.
SCORE_ARGUMENTS = ("position_bias", "attn_bias", "alibi", "score_mod")


def _check_score_arguments(attention: nn.Module, model_name: str) -> None:
    try:
        source = inspect.getsource(type(attention).forward)
    except (OSError, TypeError):
        return
    call = source[source.find("attention_interface("):]
    extra = [name for name in SCORE_ARGUMENTS if f"{name}=" in call]
    if extra:
        raise UnsupportedArchitectureError(
            f"{model_name} adds {', '.join(extra)} to the attention scores inside the attention function; "
            "headlab's attention function does not take it"
        )


def _check_dense_keys(attention: nn.Module, model_name: str) -> None:
    """Refuse sparse attention that picks keys per query (DeepSeek Sparse Attention's indexer).

    Such models fold the selection into the mask they build themselves, or hand it to the attention
    function as indices; headlab's attention attends to every key the mask allows and would differ.
    """
    if any("indexer" in n.lower() or "indexer" in type(m).__name__.lower() for n, m in attention.named_children()):
        raise UnsupportedArchitectureError(
            f"{model_name} uses sparse attention (an indexer picks the keys of each query, as in DeepSeek "
            "Sparse Attention); headlab's attention function attends to all keys and does not apply that selection"
        )


def find_o_proj(layer: nn.Module, attention: str, where: str) -> str:
    """Path of the attention output projection: inside the attention module, else beside it (BERT-style)."""
    scopes = [attention]
    if "." in attention:
        scopes.append(attention.rsplit(".", 1)[0])
    for scope in scopes:
        for name in O_PROJ_NAMES:
            path = f"{scope}.{name}"
            if _has_weight(layer, path):
                return path
    raise UnsupportedArchitectureError(
        f"found no attention module with an output projection in {where} "
        f"(attention module {attention}, looked for {', '.join(O_PROJ_NAMES)})"
    )


def find_mlp(layer: nn.Module, where: str) -> str:
    """Path of the MLP (or MoE block) of a layer: a usual name, else a child whose class says MLP/MoE."""
    for name in MLP_NAMES:
        if _has_submodule(layer, name):
            return name
    for name, child in layer.named_children():
        if any(hint in type(child).__name__.lower() for hint in MLP_CLASS_HINTS):
            return name
    raise UnsupportedArchitectureError(
        f"found no MLP in {where} (looked for {', '.join(MLP_NAMES)} and MLP/MoE classes)"
    )


def _check_layer(layer: nn.Module, paths: tuple[str, ...], where: str, first: int) -> None:
    """Every layer must have the parts the first attention layer has (hybrids with SSM or linear-attention
    layers do not), and its attention must go through ``AttentionInterface``."""
    for path in paths:
        if not _has_submodule(layer, path):
            raise UnsupportedArchitectureError(
                f"{where} has no {path} (layer {first} has): a hybrid of attention and other token mixers "
                "(state-space or linear attention); headlab needs attention in every decoder layer"
            )
    attention = layer.get_submodule(paths[0])
    if not calls_attention_interface(type(attention)):
        raise UnsupportedArchitectureError(
            f"{where}: {paths[0]} ({type(attention).__name__}) does not go through transformers' "
            "AttentionInterface (a hybrid of attention and other token mixers)"
        )


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def _has_weight(module: nn.Module, path: str) -> bool:
    """A projection: a submodule with parameters (a Linear, or a wrapper around one as in Moshi)."""
    return _has_submodule(module, path) and next(module.get_submodule(path).parameters(), None) is not None


def _first_attr(config: PretrainedConfig, keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _in_features(module: nn.Module) -> int | None:
    """Input width of a linear layer (``nn.Linear``, or GPT-2's transposed ``Conv1D``)."""
    if isinstance(module, nn.Linear):
        return module.in_features
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim == 2 and hasattr(module, "nf"):
        return weight.shape[0]  # Conv1D keeps its weight as [in, out]
    return None


def head_shape(tc: PretrainedConfig, attention: nn.Module, o_proj: nn.Module) -> HeadShape:
    """Head counts and widths from the text config, corrected by what the attention module says.

    The module's own attributes win where present: they are what the forward uses (e.g. DeepSeek's
    config ``head_dim`` is the rope part only; its q/k width is ``qk_head_dim``). The value width is
    o_proj's input per head, so multi-head latent attention gets its own ``v_head_dim``.
    """
    n_heads = _first_attr(attention, ("num_heads", "num_attention_heads", "n_head", "n_heads"))
    n_heads = n_heads or _first_attr(tc, HEAD_KEYS)
    if n_heads is None:
        raise UnsupportedArchitectureError(
            f"found no head count in the {tc.model_type!r} config (looked for {', '.join(HEAD_KEYS)})")
    groups = _first_attr(attention, ("num_key_value_groups",))
    n_kv = _first_attr(attention, ("num_key_value_heads", "num_kv_heads", "n_kv_heads"))
    if n_kv is None and groups:
        n_kv = n_heads // groups
    hidden = _first_attr(tc, ("hidden_size", "n_embd", "d_model", "dim"))
    head_dim = _first_attr(attention, ("qk_head_dim", "head_dim", "head_size", "attention_head_size"))
    head_dim = head_dim or _first_attr(tc, ("head_dim",)) or (hidden // n_heads if hidden else None)
    if head_dim is None:
        raise UnsupportedArchitectureError(f"found no head_dim for {tc.model_type!r}")
    k_proj = next((getattr(attention, n) for n in ("k_proj", "key", "k") if isinstance(getattr(attention, n, None),
                                                                                     nn.Linear)), None)
    if n_kv is None and k_proj is not None and k_proj.out_features % head_dim == 0:
        n_kv = k_proj.out_features // head_dim  # the key projection's width is what the forward uses
    if n_kv is None:
        n_kv = 1 if getattr(tc, "multi_query", False) else _first_attr(tc, KV_HEAD_KEYS) or n_heads
    width = _in_features(o_proj)
    v_head_dim = _first_attr(attention, ("v_head_dim",)) or (width // n_heads if width else head_dim)
    return HeadShape(n_heads, n_kv, head_dim, v_head_dim)
