"""Where a model runs: the device, the dtype, and a device map that spreads a model over several devices
(accelerate), with the memory budget and the offload folder; every value checked before a model loads."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from transformers import PreTrainedModel

from headlab.errors import InputError


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


# Device-map strategies accelerate knows; anything else is a device ("cpu", "cuda:1") or a {module: device} map.
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(GiB|MiB|KiB|GB|MB|KB|B)?\s*$", re.IGNORECASE)
_UNITS = {"gib": 2**30, "mib": 2**20, "kib": 2**10, "gb": 10**9, "mb": 10**6, "kb": 10**3, "b": 1}


def parse_max_memory(text: str | dict | None) -> dict[int | str, int] | None:
    """``"0=20GiB,cpu=64GiB"`` -> ``{0: 21474836480, "cpu": 68719476736}`` (bytes), checked before anything loads.

    Keys: a GPU index (``0``, ``cuda:1``), ``cpu``, ``mps`` or ``disk``; sizes: a number with GiB, MiB, KiB,
    GB, MB, KB or B (bytes when no unit). A dict is checked the same way."""
    if text is None:
        return None
    usage = ("--max-memory takes DEVICE=SIZE pairs separated by commas, e.g. 0=20GiB,cpu=64GiB (devices: a GPU "
             "index, cpu, mps or disk; sizes in GiB, MiB, GB, MB or bytes)")
    if isinstance(text, dict):
        pairs = [(str(k), str(v)) for k, v in text.items()]
    else:
        items = [item.strip() for item in str(text).split(",") if item.strip()]
        if not items or any(item.count("=") != 1 for item in items):
            raise InputError(f"bad --max-memory {text!r}: {usage}")
        pairs = [tuple(part.strip() for part in item.split("=")) for item in items]
    budget: dict[int | str, int] = {}
    for key, size in pairs:
        key = key.lower()
        index = key.removeprefix("cuda:")
        if index.isdigit():
            device: int | str = int(index)
            if device >= torch.cuda.device_count():
                raise InputError(f"--max-memory names GPU {device}, but this machine has "
                                 f"{torch.cuda.device_count()} CUDA device(s); drop it or use cpu=SIZE")
        elif key in ("cpu", "mps", "disk"):
            device = key
        else:
            raise InputError(f"bad --max-memory device {key!r}: {usage}")
        match = _SIZE.match(size)
        if match is None:
            raise InputError(f"bad --max-memory size {size!r} for {key}: {usage}")
        if device in budget:
            raise InputError(f"--max-memory names {key} twice: give each device once")
        number, unit = match.groups()
        budget[device] = int(float(number) * _UNITS[(unit or "b").lower()])
        if budget[device] <= 0:
            raise InputError(f"--max-memory for {key} must be positive, got {size!r}")
    return budget


def parse_device_map(value: str | dict | None) -> str | dict | None:
    """``--device-map``: a strategy (auto, balanced, balanced_low_0, sequential), one device (cpu, cuda:1), or
    a ``{module: device}`` map given as JSON or a ``.json`` file; checked before anything loads."""
    if value is None or isinstance(value, dict):
        return _check_map(value) if isinstance(value, dict) else None
    text = str(value).strip()
    if text in DEVICE_MAP_STRATEGIES:
        return text
    if text.startswith(("{", "[")) or text.endswith(".json"):
        if text.startswith(("{", "[")):
            raw = text
        else:
            try:
                raw = Path(text).expanduser().read_text(encoding="utf-8")
            except OSError as err:
                raise InputError(f"--device-map {text}: cannot read the file ({err.strerror})") from err
        try:
            mapping = json.loads(raw)
        except json.JSONDecodeError as err:
            raise InputError(f"--device-map is not valid JSON ({err.msg}): give a strategy (auto) or an object "
                             'like {"model.embed_tokens": 0, "model.layers.0": "cpu"}') from err
        if not isinstance(mapping, dict):
            raise InputError("--device-map JSON must be an object {module: device}")
        return _check_map(mapping)
    try:
        torch.device(text)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown --device-map {text!r}: use {', '.join(DEVICE_MAP_STRATEGIES)}, a device (cpu, "
                         "cuda:1) or a JSON object {module: device}") from None
    return resolve_device(text)


def _check_map(mapping: dict) -> dict:
    checked = {}
    for module, where in mapping.items():
        if isinstance(where, bool) or not isinstance(where, int | str):
            raise InputError(f"--device-map: {module!r} -> {where!r} is not a device (a GPU index, cpu, disk …)")
        if isinstance(where, int) or where in ("disk", "meta"):
            checked[str(module)] = where
        else:
            try:
                torch.device(where)
            except (RuntimeError, TypeError):
                raise InputError(f"--device-map: {module!r} -> {where!r} is not a device (a GPU index, cpu, disk "
                                 "…)") from None
            checked[str(module)] = where
    if not checked:
        raise InputError("--device-map JSON object is empty: name the modules and their devices")
    return checked


def check_placement(device_map: str | dict | None, max_memory: str | dict | None,
                    offload_folder: str | Path | None) -> tuple[str | dict | None, dict | None, str | None]:
    """Device map, memory budget and offload folder checked together, before anything loads."""
    device_map = parse_device_map(device_map)
    budget = parse_max_memory(max_memory)
    if budget is not None and device_map is None:
        raise InputError("--max-memory caps what a device map puts on each device: add --device-map auto")
    if budget is not None and device_map not in DEVICE_MAP_STRATEGIES:
        raise InputError("--max-memory applies to a device-map strategy (auto, balanced, sequential), not to an "
                         "explicit map or a single device")
    folder = None if offload_folder is None else str(Path(offload_folder).expanduser())
    if folder is not None and Path(folder).exists() and not Path(folder).is_dir():
        raise InputError(f"--offload-folder {folder} is an existing file; give a folder for the offloaded weights "
                         "(it is created if missing)")
    wants_disk = isinstance(device_map, dict) and "disk" in device_map.values() or \
        budget is not None and "disk" in budget
    if wants_disk and folder is None:
        raise InputError("the device map offloads to disk: give --offload-folder DIR for the offloaded weights")
    if folder is not None and device_map is None:
        raise InputError("--offload-folder holds weights a device map offloads: add --device-map")
    return device_map, budget, folder


def dispatch(model: PreTrainedModel, device_map: str | dict, max_memory: dict | None, offload_folder: str | None,
             dtype: torch.dtype) -> PreTrainedModel:
    """Spread a model built in memory (the tiny zoo models) over devices as from_pretrained would, with
    accelerate: a strategy is resolved by ``infer_auto_device_map`` within ``max_memory``."""
    from accelerate import dispatch_model, infer_auto_device_map

    model = model.to(dtype)
    if isinstance(device_map, str) and device_map not in DEVICE_MAP_STRATEGIES:
        return model.to(device_map)  # one device
    if isinstance(device_map, str):
        device_map = infer_auto_device_map(model, max_memory=max_memory,
                                           no_split_module_classes=model._no_split_modules or [])
    if set(device_map.values()) <= {"cpu", "disk"} and "disk" not in device_map.values():
        return model.to("cpu")
    return dispatch_model(model, device_map=device_map, offload_dir=offload_folder, main_device=None)
