"""Any decoder architecture: headlab's attention statistics equal eager attention on tiny random models.

For each model type of transformers' causal-LM mapping, a tiny random model is built offline from its
config (2 layers, hidden 64, 4 heads, 2 kv heads) and run twice: with ``AttentionProbe`` (headlab's
attention function, torch backend) and with eager attention and ``output_attentions``. It "works" when
the logits agree and each layer's ``key_mass`` equals the reduction of eager's probabilities; it is
"refused" when ``Arch.from_model`` raises ``UnsupportedArchitectureError`` (the message says what is
missing); anything else is "broken". Types whose config cannot be built from generic small sizes are
"not buildable" offline and left out of the counts.

``MOST_ASKED`` must all work; the full walk over every type takes about 30 s on 2 CPU cores, so it
runs in the default suite too. ``scripts/architectures.py`` prints the same classification as a table.
"""

from __future__ import annotations

import contextlib
import io
import re
import time
import warnings
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from test_probe_vs_eager import output_of, run_eager

from headlab.arch import Arch, check_supported
from headlab.errors import UnsupportedArchitectureError
from headlab.kernels import MaskSpec, stats_from_probs
from headlab.probes import AttentionProbe

MOST_ASKED = [
    "gpt_neox", "gemma3_text", "phi", "phi3", "mixtral", "olmo", "olmo2", "gpt_oss", "deepseek_v2",
    "deepseek_v3", "llama", "qwen2", "qwen3", "gpt2",
]
VOCAB = 512
# Generic small sizes under every spelling configs use; a config ignores the keys it does not know.
SMALL = dict(
    vocab_size=VOCAB, hidden_size=64, n_embd=64, d_model=64, num_hidden_layers=2, n_layer=2, num_layers=2,
    n_layers=2, num_attention_heads=4, n_head=4, num_heads=4, n_heads=4, num_key_value_heads=2, head_dim=16,
    intermediate_size=128, n_inner=128, ffn_dim=128, max_position_embeddings=128, n_positions=128,
    rotary_dim=16, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=128, encoder_layers=2,
    encoder_attention_heads=4, encoder_ffn_dim=128, vocab_size_per_layer_input=VOCAB,
    moe_intermediate_size=32, num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2,
    n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32,
    qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    tie_word_embeddings=False,
)
SMALL_VISION = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                    image_size=28, patch_size=14, depth=1, embed_dim=32, num_heads=2, out_hidden_size=64)
# Keys a few configs need beyond the generic ones.
TYPE_KWARGS: dict[str, dict] = {
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]], window_size=8),
    "dbrx": dict(attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                 ffn_config=dict(ffn_hidden_size=128, moe_num_experts=4, moe_top_k=2)),
}
BATCH, LENGTH, PAD = 2, 12, 3
ATOL = 1e-4
MAX_PARAMS = 5_000_000


class NotBuildable(Exception):
    """The type's config or model cannot be built offline from generic small sizes."""


@dataclass
class Outcome:
    model_type: str
    status: str  # works | refused | broken | not buildable
    detail: str = ""
    seconds: float = 0.0


def tiny_config(model_type: str):
    """A tiny config of ``model_type``; composite (multimodal) configs get small text and vision parts."""
    from transformers import AutoConfig

    base = AutoConfig.for_model(model_type)
    kwargs = {**SMALL, **TYPE_KWARGS.get(model_type, {})}
    if hasattr(base, "qk_rope_head_dim"):
        # Multi-head latent attention derives head_dim from its rope part and has one key per query head.
        del kwargs["head_dim"]
        kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
    sub = getattr(type(base), "sub_configs", None) or {}
    if "text_config" in sub:
        kwargs["text_config"] = {k: v for k, v in kwargs.items() if k != "text_config"}
    if "vision_config" in sub:
        kwargs["vision_config"] = dict(SMALL_VISION)
    for _ in range(len(kwargs)):
        try:
            return AutoConfig.for_model(model_type, **kwargs)
        except AttributeError as err:  # a derived size (falcon's head_dim) is a read-only property
            key = re.search(r"property '(\w+)'", str(err))
            if key is None or kwargs.pop(key.group(1), None) is None:
                raise
    raise ValueError(f"no generic small config for {model_type}")


def tiny_model(model_type: str):
    """``(model, ids, attention_mask)``: a tiny random fp32 causal LM in eval mode and a right-padded batch."""
    from transformers import AutoModelForCausalLM

    try:
        config = tiny_config(model_type)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            # Sized on the meta device first: a config that ignores the small sizes could take gigabytes.
            with torch.device("meta"):
                n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
            if n_params > MAX_PARAMS:
                raise ValueError(f"{n_params / 1e6:.0f}M parameters with the generic small sizes")
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
            if hasattr(model, "set_default_language"):  # X-MOD routes through per-language adapters
                model.set_default_language(config.languages[0])
    except Exception as err:  # any failure to construct means "not buildable offline", not "broken"
        raise NotBuildable(f"{type(err).__name__}: {_first_line(err)}") from err
    vocab = getattr(model.get_output_embeddings(), "out_features", None) or VOCAB
    ids = torch.randint(3, min(vocab, VOCAB), (BATCH, LENGTH))
    mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    mask[1, LENGTH - PAD:] = 0
    return model, ids, mask


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else ""


def eager_outputs(loaded, enc: dict):
    """Eager output with ``output_attentions``; eager-only models (gpt-oss) cannot go back to sdpa
    as ``run_eager`` does at the end, and they already run eager."""
    if loaded.model.config._attn_implementation == "sdpa":
        return run_eager(loaded, enc)
    with torch.no_grad():
        return loaded.model(**enc, output_attentions=True)


def compare(loaded, enc: dict, eager) -> str:
    """Empty when headlab's logits and key_mass equal eager's (``eager``: output with attentions); else what differs."""
    model, arch, mask = loaded.model, loaded.arch, enc["attention_mask"]
    with torch.no_grad(), AttentionProbe(loaded, backend="torch") as probe:
        got = output_of(model(**enc))
    valid = mask.bool()
    if sorted(probe.last) != list(range(arch.n_layers)):
        return f"probed layers {sorted(probe.last)} of {arch.n_layers}"
    err = (got[valid] - eager.logits[valid]).abs().max().item()
    if not err <= ATOL * max(1.0, eager.logits[valid].abs().max().item()):
        return f"logits differ from eager by {err:.2e}"
    if not eager.attentions:  # some composite models (got_ocr2) do not collect them: logits are the check
        return ""
    if len(eager.attentions) != arch.n_layers:
        return f"eager returned {len(eager.attentions)} attention maps for {arch.n_layers} layers"
    spec = MaskSpec(causal=arch.causal, key_padding=valid, query_valid=valid)
    for layer, probs in enumerate(eager.attentions):
        want = stats_from_probs(probs.float(), spec).key_mass
        have = probe.last[layer].key_mass
        if have.shape != want.shape or not torch.allclose(have, want, atol=ATOL, rtol=ATOL):
            diff = (have - want).abs().max().item() if have.shape == want.shape else f"shape {tuple(have.shape)}"
            return f"key_mass of layer {layer} differs from eager ({diff})"
    return ""


def _sink_params(model) -> list[torch.nn.Parameter]:
    return [p for name, p in model.named_parameters() if name.endswith(".sinks")]


@contextlib.contextmanager
def _sinks_off(model):
    """Learned sink logits at -1e4 (no mass) for the duration, restored after."""
    params = _sink_params(model)
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.fill_(-1e4)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, value in zip(params, saved, strict=True):
                p.copy_(value)


def check(model_type: str) -> Outcome:
    """Build, adapt and compare one model type."""
    start = time.perf_counter()
    try:
        model, ids, mask = tiny_model(model_type)
    except NotBuildable as err:
        return Outcome(model_type, "not buildable", str(err), time.perf_counter() - start)
    try:
        arch = Arch.from_model(model, None)
    except UnsupportedArchitectureError as err:
        return Outcome(model_type, "refused", str(err), time.perf_counter() - start)
    loaded = SimpleNamespace(model=model, arch=arch)
    enc = {"input_ids": ids, "attention_mask": mask}
    try:
        eager = eager_outputs(loaded, enc)
    except Exception as err:  # the oracle itself cannot run this tiny model alone: nothing to compare
        return Outcome(model_type, "not buildable", f"eager: {type(err).__name__}: {_first_line(err)}",
                       time.perf_counter() - start)
    try:
        problem = compare(loaded, enc, eager)
        if problem.startswith("key_mass") and _sink_params(model):
            # Some eager functions (granite_swa) scale the output by the sink after the softmax and return
            # probabilities without it; the logits above already checked the sink, so compare without it.
            with _sinks_off(model):
                problem = compare(loaded, enc, eager_outputs(loaded, enc))
    except Exception as err:
        problem = f"{type(err).__name__}: {_first_line(err)}"
    return Outcome(model_type, "broken" if problem else "works", problem, time.perf_counter() - start)


def causal_lm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


@pytest.mark.parametrize("model_type", MOST_ASKED)
def test_most_asked_architectures_work(model_type):
    outcome = check(model_type)
    assert outcome.status == "works", outcome.detail


@pytest.mark.parametrize("model_type", [t for t in causal_lm_types() if t not in MOST_ASKED])
def test_every_causal_lm_works_or_is_refused(model_type):
    outcome = check(model_type)
    if outcome.status == "not buildable":
        pytest.skip(outcome.detail)
    assert outcome.status in ("works", "refused"), outcome.detail


@pytest.mark.parametrize(("model_type", "message"), [
    ("jetmoe", "found no attention module with an output projection in layer 0 of JetMoeForCausalLM"),
    ("mamba", "found no list of decoder layers with attention in MambaForCausalLM"),
    ("bloom", "layer 0 of BloomForCausalLM has its attention .* does not go through transformers' AttentionInterface"),
    ("deepseek_v32", "uses sparse attention"),
    ("hrm_text", "several stacks of decoder layers"),
])
def test_refusals_name_what_is_missing(model_type, message):
    model, _, _ = tiny_model(model_type)
    with pytest.raises(UnsupportedArchitectureError, match=message):
        Arch.from_model(model, None)


def test_latent_attention_has_its_own_value_width():
    # DeepSeek's MLA: q/k heads are nope + rope wide (16 + 8), v heads v_head_dim (16) wide.
    arch = Arch.from_model(tiny_model("deepseek_v3")[0], None)
    assert (arch.n_heads, arch.n_kv_heads, arch.head_dim, arch.v_head_dim) == (4, 4, 24, 16)
    llama = Arch.from_model(tiny_model("llama")[0], None)
    assert (llama.n_heads, llama.n_kv_heads, llama.head_dim, llama.v_head_dim) == (4, 2, 16, 16)


def test_config_check_refuses_what_cannot_be_a_decoder():
    from transformers import AutoConfig

    check_supported(AutoConfig.for_model("gemma3_text"))  # discovered, not in FAMILIES
    with pytest.raises(UnsupportedArchitectureError, match="'t5' is not supported"):
        check_supported(AutoConfig.for_model("t5"))
    with pytest.raises(UnsupportedArchitectureError, match="dynamic attention mask"):
        check_supported(AutoConfig.for_model("doge"))
