"""Prompts -> padded token batches, with the BOS policy and the context-length check applied."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from headlab.checks import check_positive_tokens
from headlab.errors import InputError
from headlab.loading import LoadedModel


@dataclass
class Batch:
    """``input_ids`` and ``attention_mask`` ``[batch, position]`` (right padding), the prompts' indices."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    indices: list[int]
    tokens: list[list[str]]


def check_max_tokens(loaded: LoadedModel, max_tokens: int) -> None:
    check_positive_tokens(max_tokens)
    limit = loaded.arch.max_positions
    if limit is not None and max_tokens > limit:
        raise InputError(
            f"--max-tokens {max_tokens} is beyond the context of {loaded.name} ({limit} positions); "
            f"use --max-tokens {limit} or less"
        )


def encode(loaded: LoadedModel, prompt: str, max_tokens: int) -> list[int]:
    """Token ids of one prompt under the BOS policy, truncated to ``max_tokens``."""
    arch = loaded.arch
    # verbose=False: transformers' "longer than the maximum sequence length" warning would describe the uncut
    # prompt; the command line says in one line how many prompts --max-tokens cuts (cli.skeleton).
    ids = list(loaded.text_tokenizer(prompt, verbose=False).input_ids)
    if arch.bos == "add" and not arch.adds_bos and arch.bos_token_id is not None:
        ids = [arch.bos_token_id] + ids
    elif arch.bos == "none" and arch.adds_bos:
        ids = ids[1:]
    return ids[:max_tokens]


def check_known_tokens(loaded: LoadedModel, encoded: list[list[int]]) -> None:
    """Refuse prompts the tokenizer mostly cannot read: their statistics would describe ``<unk>`` only."""
    tok = loaded.text_tokenizer
    unk = tok.unk_token_id
    if unk is None:
        return
    total = sum(len(ids) for ids in encoded)
    unknown = sum(ids.count(unk) for ids in encoded)
    if unknown > total / 2:
        raise InputError(f"{unknown} of {total} tokens are unknown ({tok.unk_token}) to the tokenizer of "
                         f"{loaded.name}: these prompts are not in its vocabulary; pass --prompts with text "
                         "the model was trained on")


def batches(loaded: LoadedModel, prompts: list[str], max_tokens: int, batch_size: int) -> Iterator[Batch]:
    """Right-padded ``Batch``es of the prompts, each encoded under the BOS policy and truncated."""
    return id_batches(loaded, [encode(loaded, p, max_tokens) for p in prompts], batch_size)


def id_batches(loaded: LoadedModel, token_ids: list[list[int]], batch_size: int) -> Iterator[Batch]:
    """Right-padded ``Batch``es from token id lists (prompts already encoded, or generated)."""
    if batch_size <= 0:
        raise InputError(f"--batch-size must be positive, got {batch_size}")
    tok = loaded.text_tokenizer
    pad = next((t for t in (tok.pad_token_id, tok.eos_token_id) if t is not None), 0)
    for start in range(0, len(token_ids), batch_size):
        chunk = token_ids[start : start + batch_size]
        if not all(chunk):
            raise InputError("a prompt encodes to no tokens; remove empty prompts")
        check_known_tokens(loaded, chunk)
        width = max(len(ids) for ids in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, ids in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        yield Batch(input_ids, attention_mask, list(range(start, start + len(chunk))),
                    [tok.convert_ids_to_tokens(ids) for ids in chunk])
