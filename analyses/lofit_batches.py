"""LoFiT's batches: prompt + completion tokenized and right-padded, with the mask of the tokens the loss reads.

The prompt is encoded under the model's BOS policy and the completion is encoded on its own (no
special tokens) and appended, so the boundary between prompt and completion is exact whatever the
tokenizer merges. Padding is on the right with the tokenizer's pad token, or eos when it has none
(never a new token: the embedding matrix must not change).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from headlab.batching import encode
from headlab.errors import InputError


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
