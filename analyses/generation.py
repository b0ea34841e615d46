"""Token inputs for ``analyze sinks`` beyond plain prompts: the chat template, and the model's own generations.

Wong et al. study secondary sinks in what reasoning models write (AIME-style prompts in the chat
template); ``prompt_token_ids`` reproduces that setting: each prompt is wrapped in the tokenizer's
chat template (optional) and continued greedily for ``generate`` tokens, one prompt at a time (no
padding inside ``generate``), with a progress bar that advances per generated token.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers.generation.streamers import BaseStreamer

from headlab.batching import encode
from headlab.errors import InputError
from headlab.loading import LoadedModel


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
    tok = loaded.text_tokenizer
    pad = next((t for t in (tok.pad_token_id, tok.eos_token_id) if t is not None), 0)
    bar = tqdm(total=config.generate * len(prompts), unit="tok", desc=f"generating {loaded.name}",
               disable=not progress)
    out = []
    with torch.no_grad():
        for ids in inputs:
            tensor = torch.tensor([ids], device=loaded.device)
            full = loaded.model.generate(tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=config.generate,
                                         do_sample=False, pad_token_id=pad, streamer=_TokenProgress(bar))
            out.append(full[0, : config.max_tokens].tolist())
    bar.close()
    return out
