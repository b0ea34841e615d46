"""Role tags of heads from their attention, with the evidence numbers.

Two readings, both from full patterns of short inputs (``hook_pattern``, eager path):
- on a random token sequence repeated twice (``[r_1..r_L, r_1..r_L]``), in the second copy: mean
  attention to the previous token (previous-token heads), to the same token in the first copy
  (duplicate-token heads) and to the token after it (induction heads);
- on the task's clean prompts, at the final position: attention to the positions holding the answer
  token (movers copy it: a mover scores positive, a negative mover negative; Merullo et al. / Wang et al.).

Tags (thresholds are the defaults of ``tag_roles``): the reading above ``threshold``, the largest one
wins; a head at the final position with mass on the answer ``>= threshold`` is a "mover" when its score
is at least ``min_score`` (×100 units), a "negative mover" when at most ``-min_score``, else
"answer-attending"; a head with mass ``>= threshold`` on the counterfactual answer's positions (IOI:
the subject) and a positive score is a "wrong-answer suppressor". "inhibition" is not read from
attention here: in Wang et al. it is a head whose output changes the movers' queries (path patching
through q receivers).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pandas as pd
import torch

from headlab.probes import trace

from .circuit_tasks import TaskBatch


@torch.no_grad()
def repeated_token_scores(loaded, layers: Sequence[int], length: int = 20, batch: int = 4, seed: int = 0
                          ) -> dict[str, torch.Tensor]:
    """``{"previous", "duplicate", "induction"}`` -> ``[layer, head]`` mean attention (layers outside
    ``layers`` are NaN) on ``batch`` random sequences of ``length`` tokens repeated twice."""
    arch = loaded.arch
    gen = torch.Generator().manual_seed(seed)
    vocab = loaded.model.get_input_embeddings().weight.shape[0]
    low = min(1000, vocab // 4)  # away from special tokens, which sit at the start of most vocabularies
    tokens = torch.randint(low, vocab, (batch, length), generator=gen)
    ids = torch.cat([tokens, tokens], dim=1)
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in layers]
    with trace(loaded, names=names, stats=False) as t:
        loaded.model(input_ids=ids.to(loaded.device))
    out = {k: torch.full((arch.n_layers, arch.n_heads), float("nan")) for k in ("previous", "duplicate", "induction")}
    rows = torch.arange(length + 1, 2 * length)  # second copy, from its second token (all three are defined)
    for layer, name in zip(layers, names, strict=True):
        p = t[name].float().cpu()  # [batch, head, query, key]
        out["previous"][layer] = p[:, :, rows, rows - 1].mean(dim=(0, 2))
        out["duplicate"][layer] = p[:, :, rows, rows - length].mean(dim=(0, 2))
        out["induction"][layer] = p[:, :, rows, rows - length + 1].mean(dim=(0, 2))
    return out


@torch.no_grad()
def answer_attention(loaded, batch: TaskBatch, layers: Sequence[int], which: str = "answer") -> torch.Tensor:
    """``[layer, head]`` mean attention at the final position to the prompt positions holding the answer
    token (``which="cf"``: the counterfactual answer's, e.g. IOI's subject) (NaN outside ``layers``, or
    when no prompt contains that token)."""
    arch = loaded.arch
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in layers]
    target = batch.answer_ids if which == "answer" else batch.cf_answer_ids
    holds = (batch.clean_ids == target[:, None]) & batch.attention_mask.bool()  # [batch, key]
    holds[:, -1] = False
    out = torch.full((arch.n_layers, arch.n_heads), float("nan"))
    used = holds.any(dim=1)
    if not used.any():
        return out
    with trace(loaded, names=names, stats=False) as t:
        loaded.model(input_ids=batch.clean_ids.to(loaded.device), attention_mask=batch.attention_mask.to(loaded.device))
    for layer, name in zip(layers, names, strict=True):
        last = t[name][:, :, -1].float().cpu()  # [batch, head, key]
        mass = (last * holds[:, None, :]).sum(dim=2)  # [batch, head]
        out[layer] = mass[used].mean(dim=0)
    return out


ROLE_PASSES = 3  # forward passes of ``tag_roles``: the repeated sequence, then answer and cf-answer attention


def tag_roles(loaded, batch: TaskBatch, heads: Sequence[tuple[int, int]], scores: torch.Tensor,
              threshold: float = 0.3, min_score: float = 1.0, step: Callable[[], object] | None = None) -> pd.DataFrame:
    """One row per head: its score, the four attention readings and its tag ("" when none applies).

    ``step``: called after each of the ``ROLE_PASSES`` forward passes (a progress bar's update)."""
    layers = sorted({layer for layer, _ in heads})
    if not layers:
        return pd.DataFrame()
    step = step or (lambda: None)
    repeated = repeated_token_scores(loaded, layers)
    step()
    part = batch.slice(0, min(len(batch), 16))
    answer = answer_attention(loaded, part, layers)
    step()
    wrong = answer_attention(loaded, part, layers, "cf")
    step()
    rows = []
    for layer, h in heads:
        reading = {k: float(v[layer, h]) for k, v in repeated.items()}
        to_answer, to_wrong = float(answer[layer, h]), float(wrong[layer, h])
        score = float(scores[layer, h])
        tag = ""
        if to_answer >= threshold:  # |score| < min_score: it attends to the answer without moving it
            tag = "mover" if score >= min_score else "negative mover" if score <= -min_score else "answer-attending"
        elif to_wrong >= threshold and score >= min_score:
            tag = "wrong-answer suppressor"
        else:
            best = max(reading, key=reading.get)
            if reading[best] >= threshold:
                tag = {"previous": "previous-token", "duplicate": "duplicate-token", "induction": "induction"}[best]
        rows.append({"task": batch.name, "layer": layer, "head": h, "score": score, "to_answer": to_answer,
                     "to_wrong": to_wrong,
                     **reading, "tag": tag})
    return pd.DataFrame(rows)
