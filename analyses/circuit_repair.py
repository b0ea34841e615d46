"""Repair by attention override (Merullo et al. 2024): chosen heads, at the final position, attend only to
chosen keys; accuracy and LD before and after.

The paper makes GPT-2 medium's inhibition heads and a negative mover attend to the wrong colours at the
final position of Colored Objects prompts (accuracy 49.6% -> 93.7%). ``colored_wrong_keys`` finds those
keys (the token positions of the two colours not asked about, in the final question); ``override_effect``
runs the prompts one at a time (each has its own key positions) with and without ``AttentionOverride``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch

from headlab.batching import encode
from headlab.errors import InputError
from headlab.interventions import AttentionOverride, intervene

from .circuit_tasks import CircuitExample

_ITEM = re.compile(r"\b(?:a|an) (\w+) (\w+)")
_ASKED = re.compile(r"What color is the (\w+)\?")


def colored_scene(example: CircuitExample) -> tuple[list[tuple[str, str]], str, int]:
    """(colour, object) pairs of the final question, the asked object, and where the question starts."""
    start = example.prompt.rfind("Q: ")
    if start < 0:
        raise InputError(f"not a Colored Objects prompt (no 'Q: '): {example.prompt[-80:]!r}")
    question = example.prompt[start:]
    items = _ITEM.findall(question.split("What color")[0])
    asked = _ASKED.search(question)
    if len(items) < 2 or asked is None:
        raise InputError(f"not a Colored Objects prompt (no listed objects or no question): {example.prompt[-80:]!r}")
    return items, asked.group(1), start


def colored_wrong_keys(loaded, example: CircuitExample) -> list[int]:
    """Token positions (from the first token of the encoded prompt) of the colours not asked about."""
    items, asked, start = colored_scene(example)
    question = example.prompt[start:]
    tok = loaded.text_tokenizer
    enc = tok(example.prompt, return_offsets_mapping=True, add_special_tokens=False)
    shift = len(encode(loaded, example.prompt, 10**9)) - len(enc.input_ids)  # a BOS the policy adds
    positions = []
    for match in _ITEM.finditer(question.split("What color")[0]):
        if match.group(2) == asked:
            continue
        char = start + match.start(1)
        hits = [i for i, (a, b) in enumerate(enc.offset_mapping) if a <= char < b]
        if not hits:
            raise InputError(f"colour {match.group(1)!r} at character {char} falls in no token")
        positions.append(hits[0] + shift)
    return positions


def colored_right_keys(loaded, example: CircuitExample) -> list[int]:
    """Token position of the asked object's colour in the final question (the answer, in lower case)."""
    items, asked, start = colored_scene(example)
    wrong = set(colored_wrong_keys(loaded, example))
    question = example.prompt[start:]
    tok = loaded.text_tokenizer
    enc = tok(example.prompt, return_offsets_mapping=True, add_special_tokens=False)
    shift = len(encode(loaded, example.prompt, 10**9)) - len(enc.input_ids)
    for match in _ITEM.finditer(question.split("What color")[0]):
        if match.group(2) == asked:
            char = start + match.start(1)
            hits = [i + shift for i, (a, b) in enumerate(enc.offset_mapping) if a <= char < b]
            return [h for h in hits[:1] if h not in wrong]
    return []


@torch.no_grad()
def final_attention(loaded, examples: Sequence[CircuitExample], heads: Sequence[tuple[int, int]],
                    keys_of: Callable[[object, CircuitExample], list[int]], edits: Sequence = ()) -> dict:
    """``{(layer, head): mean attention of the final row on keys_of(example)}``, under ``edits`` (e.g. an
    override of other heads: how the downstream heads' attention changes)."""
    from headlab.probes import trace

    names = sorted({f"blocks.{layer}.attn.hook_pattern" for layer, _ in heads})
    totals = dict.fromkeys(heads, 0.0)
    for example in examples:
        ids = torch.tensor([encode(loaded, example.prompt, 10**9)], device=loaded.device)
        keys = keys_of(loaded, example)
        with intervene(loaded, *edits) if edits else _nothing(), trace(loaded, names=names, stats=False) as t:
            loaded.model(input_ids=ids)
        for layer, h in heads:
            totals[(layer, h)] += float(t[f"blocks.{layer}.attn.hook_pattern"][0, h, -1, keys].sum())
    return {head: total / len(examples) for head, total in totals.items()}


def _nothing():
    import contextlib

    return contextlib.nullcontext()


def _colour_ids(loaded, example: CircuitExample) -> list[int]:
    items, _, _ = colored_scene(example)
    ids = []
    for colour, _obj in items:
        got = loaded.text_tokenizer(" " + colour.capitalize(), add_special_tokens=False).input_ids
        ids.append(got[0])
    return ids


@torch.no_grad()
def override_effect(loaded, examples: Sequence[CircuitExample], heads: Sequence[tuple[int, int]],
                    keys_of: Callable[[object, CircuitExample], list[int]] = colored_wrong_keys) -> dict:
    """Accuracy (answer above the cf answer; and argmax over the listed colours when the prompts are
    Colored Objects) and mean LD, without and with ``AttentionOverride(heads, keys_of(example), rows="last")``."""
    if not heads:
        raise InputError("override_effect needs at least one head")
    device = loaded.device
    out = {"before": [], "after": [], "before3": [], "after3": []}
    for example in examples:
        ids = torch.tensor([encode(loaded, example.prompt, 10**9)], device=device)
        answer = loaded.text_tokenizer(example.answer, add_special_tokens=False).input_ids[0]
        wrong = loaded.text_tokenizer(example.cf_answer, add_special_tokens=False).input_ids[0]
        try:
            listed = _colour_ids(loaded, example)
        except InputError:
            listed = None
        for when, edit in (("before", None), ("after", AttentionOverride(list(heads), keys_of(loaded, example),
                                                                           rows="last"))):
            if edit is None:
                logits = loaded.model(input_ids=ids).logits[0, -1].float()
            else:
                with intervene(loaded, edit):
                    logits = loaded.model(input_ids=ids).logits[0, -1].float()
            out[when].append(float(logits[answer] - logits[wrong]))
            if listed is not None:
                out[when + "3"].append(float(listed[int(logits[listed].argmax())] == answer))
    result = {}
    for when in ("before", "after"):
        lds = torch.tensor(out[when])
        result[f"ld_{when}"] = float(lds.mean())
        result[f"accuracy_{when}"] = float((lds > 0).float().mean())
        if out[when + "3"]:
            result[f"accuracy3_{when}"] = float(torch.tensor(out[when + "3"]).mean())
    result["n"] = len(examples)
    return result
