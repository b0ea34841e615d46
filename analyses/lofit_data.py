"""LoFiT training data: JSONL files read and checked (torch-free: the command line reads them before the model
loads); ``lofit_batches`` tokenizes them into padded batches.

Two formats, one object per line:
- SFT: ``{"prompt": str, "target": str}``: the loss is on the target tokens only;
- DPO: ``{"prompt": str, "chosen": str, "rejected": str}``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from headlab.analyses.configs import check_objective
from headlab.errors import InputError

_KEYS = {"sft": ("prompt", "target"), "dpo": ("prompt", "chosen", "rejected")}


@dataclass(frozen=True)
class SFTItem:
    prompt: str
    target: str


@dataclass(frozen=True)
class DPOItem:
    prompt: str
    chosen: str
    rejected: str


Item = SFTItem | DPOItem


def read_items(path: str | Path, objective: str) -> list[Item]:
    """Every line of a JSONL file as an ``SFTItem`` or ``DPOItem``; any bad line raises ``InputError``
    naming its line number (blank lines are skipped)."""
    check_objective(objective)
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file {path} does not exist")
    items: list[Item] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                items.append(parse_line(line, number, path, objective))
    if not items:
        raise InputError(f"data file {path} holds no items: one JSON object per line, "
                         f"{_example(objective)}")
    return items


def _example(objective: str) -> str:
    return ('{"prompt": "...", "target": "..."}' if objective == "sft"
            else '{"prompt": "...", "chosen": "...", "rejected": "..."}')


def parse_line(line: str, number: int, path: Path, objective: str) -> Item:
    where = f"{path} line {number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise InputError(f"{where} is not valid JSON ({err.msg} at column {err.colno}); each line is one "
                         f"object like {_example(objective)}") from None
    if not isinstance(record, dict):
        raise InputError(f"{where} is a JSON {type(record).__name__}, not an object like {_example(objective)}")
    if objective == "sft" and {"chosen", "rejected"} & set(record):
        raise InputError(f"{where} has chosen/rejected: this is a DPO file; use --objective dpo, or give "
                         "SFT lines {\"prompt\", \"target\"}")
    if objective == "dpo" and "target" in record and not {"chosen", "rejected"} & set(record):
        raise InputError(f"{where} has a target: this is an SFT file; use --objective sft, or give "
                         "DPO lines {\"prompt\", \"chosen\", \"rejected\"}")
    keys = _KEYS[objective]
    missing = [k for k in keys if k not in record]
    if missing:
        raise InputError(f"{where} lacks {', '.join(missing)}; {objective} lines are {_example(objective)}")
    for key in keys:
        if not isinstance(record[key], str):
            raise InputError(f"{where}: {key} must be a string, got {type(record[key]).__name__}")
    for key in keys[1:]:
        if not record[key]:
            raise InputError(f"{where}: {key} is empty; a completion needs at least one token")
    values = [record[k] for k in keys]
    return SFTItem(*values) if objective == "sft" else DPOItem(*values)


def data_hash(items: list[Item]) -> str:
    """sha256 of the items (order included), for the run's manifest."""
    text = json.dumps([vars(item) for item in items], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_items(items: list[Item], path: str | Path) -> None:
    Path(path).write_text("".join(json.dumps(vars(i), ensure_ascii=False) + "\n" for i in items), encoding="utf-8")
