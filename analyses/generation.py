"""Greedy generation, one way for every caller: the CLI, the analyses, the fixes and the live page.

``greedy`` continues a batch (left-padded, with the model's KV cache through ``generate``) under headlab
edits, extra context managers (the fixes' no-image reference stream and hooks) and logits processors, and
stops a row at the end of its turn, which the tokenizer's chat template names (``end_of_turn``).
``greedy_samples`` does the same for LVLM samples (image + prompt).

The chat template and the model's own generations as inputs of ``analyze sinks``: Wong et al. study secondary
sinks in what reasoning models write (AIME-style prompts in the chat template); ``prompt_token_ids``
reproduces that setting: each prompt is wrapped in the tokenizer's chat template (optional) and continued
greedily for ``generate`` tokens, one prompt at a time (no padding), with a progress bar per generated token.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm
from transformers.generation.streamers import BaseStreamer

from headlab.batching import encode
from headlab.errors import InputError
from headlab.loading import LoadedModel

_TURN_PROBE = "headlab-end-of-turn-probe"


def end_of_turn(tokenizer) -> int | None:
    """The id that closes an assistant turn in the tokenizer's chat template (``<|im_end|>``,
    ``<end_of_turn>``, …), or None without a template (then the model's own EOS ends a generation)."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    if not getattr(tok, "chat_template", None):
        return None
    try:
        text = tok.apply_chat_template([{"role": "user", "content": "hi"},
                                        {"role": "assistant", "content": _TURN_PROBE}], tokenize=False)
    except Exception:  # a template that cannot render a plain two-turn chat names no end of turn
        return None
    after = text.split(_TURN_PROBE, 1)[1] if _TURN_PROBE in text else ""
    ids = tok(after, add_special_tokens=False).input_ids if after.strip() else []
    special = set(tok.all_special_ids) | set(getattr(tok, "added_tokens_decoder", {}) or {})
    return ids[0] if ids and ids[0] in special else None


def padding_id(loaded: LoadedModel) -> int:
    """The id that pads finished rows: the tokenizer's pad, else its EOS, else 0."""
    tok = loaded.text_tokenizer
    return next((t for t in (tok.pad_token_id, tok.eos_token_id) if t is not None), 0)


@torch.no_grad()
def greedy(loaded: LoadedModel, tensors: Mapping[str, torch.Tensor], max_new_tokens: int, *,
           edits: Sequence | None = None,
           contexts: Sequence = (), logits_processors: Sequence = (), backend: str | None = None,
           return_scores: bool = False, streamer=None):
    """New tokens ``[batch, n]`` of a greedy continuation of ``tensors`` (``input_ids``, ``attention_mask`` and
    whatever else the model takes; batches left-padded), padded with ``padding_id`` after a row ends.

    ``edits`` run through ``headlab.intervene`` (removed on exit, on error too; an empty list still runs the
    model on headlab's attention function, None on its own); ``contexts`` are entered
    around ``generate`` after them (the fixes' reference stream and hooks). ``return_scores``: also the scores
    each step chose from ``[batch, n, vocab]`` (after ``logits_processors``)."""
    import headlab

    pad = padding_id(loaded)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    stop = end_of_turn(loaded.tokenizer)
    if stop is not None:
        kwargs["eos_token_id"] = stop
    if logits_processors:
        from transformers import LogitsProcessorList

        kwargs["logits_processor"] = LogitsProcessorList(logits_processors)
    if return_scores:
        kwargs.update(output_scores=True, return_dict_in_generate=True)
    if streamer is not None:
        kwargs["streamer"] = streamer
    with contextlib.ExitStack() as stack:
        if edits is not None:
            stack.enter_context(headlab.intervene(loaded, *edits, backend=backend))
        for context in contexts:
            stack.enter_context(context)
        out = loaded.model.generate(**tensors, **kwargs)
    sequences = out.sequences if return_scores else out
    new = sequences[:, tensors["input_ids"].shape[1]:].cpu()
    new = new if new.numel() else torch.full((sequences.shape[0], 0), pad)
    return (new, torch.stack(out.scores, dim=1).float().cpu()) if return_scores else new


def greedy_samples(loaded: LoadedModel, samples: Sequence, max_new_tokens: int, **kwargs):
    """``greedy`` on LVLM samples (``headlab.lvlm.LvlmSample``: prompt + images), left-padded into one batch."""
    from headlab.lvlm import build_inputs

    inputs = build_inputs(loaded, samples, padding_side="left").to(loaded.device)
    return greedy(loaded, inputs.tensors, max_new_tokens, **kwargs)


class _TokenProgress(BaseStreamer):
    """Streams generation into a tqdm bar: the first ``put`` is the prompt, every later one a new token."""

    def __init__(self, bar: tqdm):
        self.bar = bar
        self.seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        self.bar.update(value.numel())

    def end(self) -> None:
        self.seen_prompt = False


def chat_ids(loaded: LoadedModel, prompt: str) -> list[int]:
    """Token ids of ``prompt`` as one user turn of the chat template, with the generation prompt appended."""
    tok = loaded.text_tokenizer
    if not getattr(tok, "chat_template", None):
        raise InputError(f"{loaded.name} has no chat template: drop --chat-template, or use an instruct model")
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return list(tok(text, add_special_tokens=False).input_ids)  # the template writes its own BOS


def prompt_token_ids(loaded: LoadedModel, prompts: list[str], config, progress: bool = True) -> list[list[int]]:
    """Per prompt: its ids (chat template or the BOS policy), plus ``config.generate`` greedy new tokens,
    truncated to ``config.max_tokens`` (which caps prompt and continuation together)."""
    inputs = [chat_ids(loaded, p) if config.chat_template else encode(loaded, p, config.max_tokens) for p in prompts]
    if not config.generate:
        return [ids[: config.max_tokens] for ids in inputs]
    bar = tqdm(total=config.generate * len(prompts), unit="tok", desc=f"generating {loaded.title}",
               disable=not progress)
    out = []
    for ids in inputs:
        tensor = torch.tensor([ids], device=loaded.device)
        new = greedy(loaded, {"input_ids": tensor, "attention_mask": torch.ones_like(tensor)}, config.generate,
                     streamer=_TokenProgress(bar))
        out.append((ids + new[0].tolist())[: config.max_tokens])
    bar.close()
    return out
