"""What headlab's two LVLM recipes (llava-smol, llava-real) share: the chat prompt, answer-only labels, the
cached text prefix, the cosine schedule and the atomic checkpoint folder."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch


def chat_prompt(proc, prompt: str) -> str:
    """One user turn with one image and ``prompt``, ready for the assistant's answer."""
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return proc.apply_chat_template(msgs, add_generation_prompt=True)


def answer_batch(texts: list[str], tokenizer, header: list[int]) -> dict[str, torch.Tensor]:
    """``texts`` tokenised with right padding; labels on what follows the last ``header`` (the assistant's turn:
    the answer and its closing marker), −100 elsewhere."""
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
    ids = enc.input_ids
    labels = torch.full_like(ids, -100)
    h = torch.tensor(header)
    for b in range(ids.shape[0]):
        row = ids[b]
        starts = [i for i in range(len(row) - len(h) + 1) if torch.equal(row[i:i + len(h)], h)]
        start = starts[-1] + len(h)
        end = int(enc.attention_mask[b].sum())
        labels[b, start:end] = row[start:end]
    return {"input_ids": ids, "attention_mask": enc.attention_mask, "labels": labels}


@torch.no_grad()
def prefix_cache(language_model, proc, image_token: str, bf16: bool = True) -> tuple[torch.Tensor, object]:
    """The KV cache of the text before the image (system turn + user header): the same in every sample and
    upstream of everything trained, so computed once (it saves about a third of a step's LM work)."""
    text = chat_prompt(proc, "x")
    ids = proc.tokenizer(text[:text.index(image_token)], return_tensors="pt", add_special_tokens=False).input_ids
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        cache = language_model(input_ids=ids, use_cache=True).past_key_values
    return ids[0], cache


def cosine_lr(step: int, lr: float, warmup: int, steps: int, final_lr_ratio: float) -> float:
    """Linear warmup to ``lr``, then a cosine to ``final_lr_ratio`` · ``lr`` at ``steps``."""
    if step <= warmup:
        return lr * step / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return lr * (final_lr_ratio + (1 - final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def publish_checkpoint(folder: Path, weights: str, state: dict[str, torch.Tensor], config: dict,
                       training: dict) -> None:
    """``weights`` (safetensors), ``config.json`` and ``training.json`` written to a temporary folder that then
    replaces ``folder``: a run cut short leaves the last complete checkpoint, never a half-written one."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(state, str(tmp / weights))
    (tmp / "config.json").write_text(json.dumps(config, indent=1, default=str))
    (tmp / "training.json").write_text(json.dumps(training, indent=1))
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old.exists():
        shutil.rmtree(old)
