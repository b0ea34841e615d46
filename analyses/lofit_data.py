"""LoFiT training data: JSONL files read and checked, then tokenized into padded batches.

Two formats, one object per line:
- SFT: ``{"prompt": str, "target": str}``: the loss is on the target tokens only;
- DPO: ``{"prompt": str, "chosen": str, "rejected": str}``.
The prompt is encoded under the model's BOS policy and the completion is encoded on its own (no
special tokens) and appended, so the boundary between prompt and completion is exact whatever the
tokenizer merges. Padding is on the right with the tokenizer's pad token, or eos when it has none
(never a new token: the embedding matrix must not change).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from headlab.batching import encode
from headlab.errors import InputError

OBJECTIVES = ("sft", "dpo")
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


def check_objective(objective: str) -> str:
    if objective not in OBJECTIVES:
        raise InputError(f"--objective must be sft or dpo, got {objective!r}")
    return objective


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


@dataclass
class CompletionBatch:
    """Prompt + completion, right-padded. ``input_ids``, ``attention_mask``, ``target_mask``
    ``[batch, pos]``; ``target_mask`` is True on the completion's tokens (what the loss reads)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target_mask: torch.Tensor

    def to(self, device) -> CompletionBatch:
        return CompletionBatch(self.input_ids.to(device), self.attention_mask.to(device), self.target_mask.to(device))


def pad_id(loaded) -> int:
    """The pad token, or eos for a tokenizer without one (no token is ever added)."""
    tok = loaded.text_tokenizer
    for candidate in (tok.pad_token_id, tok.eos_token_id):
        if candidate is not None:
            return int(candidate)
    raise InputError(f"the tokenizer of {loaded.name} has neither a pad nor an eos token; LoFiT batches need one "
                     "of them for padding (headlab never adds tokens to a model)")


def encode_completion(loaded, prompt: str, completion: str, max_tokens: int) -> tuple[list[int], int]:
    """(ids of prompt + completion, number of completion tokens). Refuses a completion that encodes to
    nothing or a pair longer than ``max_tokens`` (cutting would drop the target)."""
    head = encode(loaded, prompt, max_tokens)
    tail = list(loaded.text_tokenizer(completion, add_special_tokens=False).input_ids)
    if not tail:
        raise InputError(f"the completion {completion!r} encodes to no tokens")
    if len(head) + len(tail) > max_tokens:
        raise InputError(f"a prompt + completion is {len(head) + len(tail)} tokens, above --max-tokens {max_tokens}: "
                         "raise --max-tokens or shorten the data")
    return head + tail, len(tail)


def completion_batch(loaded, pairs: list[tuple[str, str]], max_tokens: int) -> CompletionBatch:
    """Right-padded batch of (prompt, completion) pairs; see ``CompletionBatch``."""
    rows = [encode_completion(loaded, p, c, max_tokens) for p, c in pairs]
    width = max(len(ids) for ids, _ in rows)
    pad = pad_id(loaded)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    target = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (ids, n_target) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        target[i, len(ids) - n_target : len(ids)] = True
    return CompletionBatch(input_ids, attention, target)
