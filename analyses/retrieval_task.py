"""A built-in position-bias probe task: key-value retrieval with the queried pair first, middle or last.

Each trial draws ``n_pairs`` distinct keys (five random letters) and values (four digits) from a
seeded generator and asks for the value of one key. The same pairs appear three times, with the
queried pair moved to the first, middle or last slot and the others in their original order, so the
placements differ in position only (lost in the middle, Liu et al. 2023, with headlab's own format).
The model is scored by teacher forcing: the log-probability of each candidate value's tokens after
the prompt, summed over the answer tokens. The prediction is the candidate (the right value or one of
the other values in the context) with the highest log-probability. On random-init models the numbers
are chance; the task is for trained causal language models.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from headlab.batching import encode
from headlab.errors import InputError
from headlab.loading import LoadedModel

PLACEMENTS = ("first", "middle", "last")
INSTRUCTION = "Below is a list of keys and their values. Remember them."


@dataclass
class RetrievalConfig:
    n_trials: int = 12
    n_pairs: int = 8
    seed: int = 0
    batch_size: int = 8

    def check(self) -> None:
        if self.n_trials < 1:
            raise InputError(f"--retrieval-trials must be positive (0 turns the task off), got {self.n_trials}")
        if not 2 <= self.n_pairs <= 200:
            raise InputError(f"--retrieval-pairs must lie between 2 and 200, got {self.n_pairs}")
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be positive, got {self.batch_size}")


@dataclass
class RetrievalItem:
    """One prompt: ``pairs`` in context order, the queried pair at ``target``."""

    trial: int
    placement: str
    pairs: list[tuple[str, str]]
    target: int

    @property
    def key(self) -> str:
        return self.pairs[self.target][0]

    @property
    def prompt(self) -> str:
        lines = [INSTRUCTION, *(f"key {k}: value {v}" for k, v in self.pairs),
                 f"What is the value of key {self.key}?", "Answer:"]
        return "\n".join(lines)

    @property
    def candidates(self) -> list[str]:
        """Every value in the context as a continuation (leading space), in context order."""
        return [f" {v}" for _, v in self.pairs]


def is_language_model(loaded: LoadedModel) -> bool:
    """A causal model with an output head: one that gives next-token log-probabilities."""
    return loaded.arch.causal and loaded.model.get_output_embeddings() is not None


def slot(placement: str, n_pairs: int) -> int:
    """Index of the queried pair for a placement: 0, n // 2 or n - 1."""
    return {"first": 0, "middle": n_pairs // 2, "last": n_pairs - 1}[placement]


def place(pairs: list[tuple[str, str]], target: int, placement: str) -> tuple[list[tuple[str, str]], int]:
    """Move ``pairs[target]`` to the placement's slot, keeping the other pairs in their order."""
    others = pairs[:target] + pairs[target + 1:]
    index = slot(placement, len(pairs))
    return others[:index] + [pairs[target]] + others[index:], index


def make_items(config: RetrievalConfig) -> list[RetrievalItem]:
    """``n_trials`` x the three placements, deterministic in ``seed``."""
    config.check()
    rng = random.Random(config.seed)
    items = []
    for trial in range(config.n_trials):
        keys: list[str] = []
        while len(keys) < config.n_pairs:
            key = "".join(rng.choices(string.ascii_lowercase, k=5))
            if key not in keys:
                keys.append(key)
        values = [str(v) for v in rng.sample(range(1000, 10000), config.n_pairs)]
        pairs = list(zip(keys, values, strict=True))
        target = rng.randrange(config.n_pairs)
        for placement in PLACEMENTS:
            placed, index = place(pairs, target, placement)
            items.append(RetrievalItem(trial, placement, placed, index))
    return items


def continuation_logprobs(loaded: LoadedModel, prompt: str, continuations: list[str],
                          batch_size: int = 8) -> torch.Tensor:
    """``[continuation]`` log p(continuation | prompt), teacher-forced and summed over its tokens.

    The prompt is encoded under the model's BOS policy, each continuation without special tokens and
    appended to it (right padding), so every continuation is scored after the same prompt tokens.
    """
    tok = loaded.text_tokenizer
    prompt_ids = encode(loaded, prompt, max_tokens=10**9)
    answers = [list(tok(c, add_special_tokens=False).input_ids) for c in continuations]
    if not all(answers):
        raise InputError("a retrieval answer encodes to no tokens")
    limit = loaded.arch.max_positions
    longest = len(prompt_ids) + max(len(a) for a in answers)
    if limit is not None and longest > limit:
        raise InputError(f"retrieval prompts need {longest} positions, beyond the context of {loaded.name} "
                         f"({limit}); use fewer --retrieval-pairs")
    pad = next((t for t in (tok.pad_token_id, tok.eos_token_id) if t is not None), 0)
    scores = []
    for start in range(0, len(answers), batch_size):
        chunk = answers[start:start + batch_size]
        width = len(prompt_ids) + max(len(a) for a in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, answer in enumerate(chunk):
            ids = prompt_ids + answer
            input_ids[row, :len(ids)] = torch.tensor(ids)
            attention_mask[row, :len(ids)] = 1
        with torch.no_grad():
            logits = loaded.model(input_ids=input_ids.to(loaded.device),
                                  attention_mask=attention_mask.to(loaded.device)).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
        for row, answer in enumerate(chunk):
            # Logits at position p predict token p + 1: the answer's tokens are predicted from P - 1 on.
            positions = torch.arange(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(answer))
            scores.append(logprobs[row, positions, torch.tensor(answer)].sum())
    return torch.stack(scores).double()


def score_item(loaded: LoadedModel, item: RetrievalItem, batch_size: int = 8) -> dict:
    """One item's row: the right answer's log-probability, the best distractor's, rank and correctness."""
    scores = continuation_logprobs(loaded, item.prompt, item.candidates, batch_size)
    right = float(scores[item.target])
    distractors = torch.cat([scores[:item.target], scores[item.target + 1:]])
    return {
        "trial": item.trial, "placement": item.placement, "slot": item.target, "n_pairs": len(item.pairs),
        "key": item.key, "answer": item.pairs[item.target][1],
        "logprob_answer": right, "logprob_best_distractor": float(distractors.max()),
        "rank": int((distractors > right).sum()) + 1,
        "correct": bool(right > distractors.max()),
    }


def run_retrieval(loaded: LoadedModel, config: RetrievalConfig, progress=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score every item: (per-item table, accuracy and mean log-likelihood by placement)."""
    if not is_language_model(loaded):
        raise InputError(f"{loaded.name} is not a causal language model: the retrieval task needs next-token "
                         "log-probabilities")
    rows = []
    for item in make_items(config):
        rows.append(score_item(loaded, item, config.batch_size))
        if progress is not None:
            progress.update(1)
    trials = pd.DataFrame(rows)
    return trials, summarize(trials)


def summarize(trials: pd.DataFrame) -> pd.DataFrame:
    """Accuracy, mean log-likelihood of the answer and mean margin over the best distractor, by placement."""
    margin = trials["logprob_answer"] - trials["logprob_best_distractor"]
    table = (trials.assign(margin=margin).groupby("placement", sort=False)
             .agg(accuracy=("correct", "mean"), mean_logprob=("logprob_answer", "mean"),
                  mean_margin=("margin", "mean"), n=("correct", "size"), n_pairs=("n_pairs", "first"))
             .reindex(list(PLACEMENTS)).reset_index())
    table["chance"] = 1.0 / table["n_pairs"]
    return table


def retrieval_figure(model: str, by_placement: pd.DataFrame) -> go.Figure:
    fig = make_subplots(rows=1, cols=2, subplot_titles=("accuracy", "mean log p(answer)"))
    fig.add_bar(x=by_placement["placement"], y=by_placement["accuracy"], name="accuracy", row=1, col=1)
    fig.add_scatter(x=by_placement["placement"], y=by_placement["chance"], mode="lines", name="chance",
                    line={"dash": "dot"}, row=1, col=1)
    fig.add_bar(x=by_placement["placement"], y=by_placement["mean_logprob"], name="log p(answer)", row=1, col=2)
    fig.update_layout(title=f"{model}: key-value retrieval by position of the queried pair")
    fig.update_xaxes(title_text="queried pair placed")
    fig.update_yaxes(range=[0, 1], row=1, col=1)
    return fig
