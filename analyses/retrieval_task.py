"""A built-in position-bias probe task: key-value retrieval with the queried pair first, middle or last.

Each trial draws ``n_pairs`` distinct keys (five random letters) and values (four digits) from a
seeded generator and asks for the value of one key. The same pairs appear three times, with the
queried pair moved to the first, middle or last slot and the others in their original order, so the
placements differ in position only (lost in the middle, Liu et al. 2023, with headlab's own format).
The model is scored by teacher forcing: the log-probability of each candidate value's tokens after
the prompt, summed over the answer tokens. The prediction is the candidate (the right value or one of
the other values in the context) with the highest log-probability. On random-init models the numbers
are chance; the task is for trained causal language models.

A high accuracy at one placement can be a default preference rather than retrieval: the "absent" trials
ask for a key that is not in the list (same pairs, original order) and record which slot's value the model
picks anyway (``absent_baseline``). If it picks the first value most of the time, "first = 1.00" says little.

Scoring reads the logits at the answer positions only (``logits_to_keep``): the output layer over the whole
vocabulary at every prompt position was most of the task's cost.

``run_retrieval`` scores the items as one ``headlab.tally`` pass named "retrieval" (one unit per item, its rows in
``RetrievalRows``), so ranks or a resumed run split it; every item is drawn from the seed before the pass, so an
item does not depend on which items ran before it in this process.
"""

from __future__ import annotations

import copy
import inspect
import random
import string
from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from headlab.analyses.configs import RetrievalConfig
from headlab.batching import encode
from headlab.errors import InputError
from headlab.loading import LoadedModel
from headlab.tally import Mergeable, Pass, run_pass

PLACEMENTS = ("first", "middle", "last")
ABSENT = "absent"  # trials whose queried key is not in the list: which slot's value is picked anyway
INSTRUCTION = "Below is a list of keys and their values. Remember them."


@dataclass
class RetrievalItem:
    """One prompt: ``pairs`` in context order, the queried pair at ``target``."""

    trial: int
    placement: str
    pairs: list[tuple[str, str]]
    target: int  # -1 for an absent-key trial
    absent_key: str | None = None

    @property
    def key(self) -> str:
        return self.absent_key if self.absent_key is not None else self.pairs[self.target][0]

    @property
    def prompt(self) -> str:
        lines = [INSTRUCTION, *(f"key {k}: value {v}" for k, v in self.pairs),
                 f"What is the value of key {self.key}?", "Answer:"]
        return "\n".join(lines)

    @property
    def candidates(self) -> list[str]:
        """Every value in the context as a continuation (leading space), in context order."""
        return [f" {v}" for _, v in self.pairs]


def slot(placement: str, n_pairs: int) -> int:
    """Index of the queried pair for a placement: 0, n // 2 or n - 1."""
    return {"first": 0, "middle": n_pairs // 2, "last": n_pairs - 1}[placement]


def place(pairs: list[tuple[str, str]], target: int, placement: str) -> tuple[list[tuple[str, str]], int]:
    """Move ``pairs[target]`` to the placement's slot, keeping the other pairs in their order."""
    others = pairs[:target] + pairs[target + 1:]
    index = slot(placement, len(pairs))
    return others[:index] + [pairs[target]] + others[index:], index


def make_items(config: RetrievalConfig, absent: bool = False) -> list[RetrievalItem]:
    """``n_trials`` x the three placements, deterministic in ``seed``; with ``absent``, also one absent-key
    item per trial (the same pairs, in their drawn order, asked for a key that is not among them).

    The absent keys come from a separate generator, so the placed items are the same with or without them."""
    config.check()
    rng = random.Random(config.seed)
    absent_rng = random.Random(f"absent-{config.seed}")
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
        if absent:
            missing = "".join(absent_rng.choices(string.ascii_lowercase, k=5))
            while missing in keys:
                missing = "".join(absent_rng.choices(string.ascii_lowercase, k=5))
            items.append(RetrievalItem(trial, ABSENT, pairs, -1, absent_key=missing))
    return items


def continuation_logprobs(loaded: LoadedModel, prompt: str, continuations: list[str],
                          batch_size: int = 8) -> torch.Tensor:
    """``[continuation]`` log p(continuation | prompt), teacher-forced and summed over its tokens.

    The prompt is encoded under the model's BOS policy, each continuation without special tokens and
    appended to it (right padding), so every continuation is scored after the same prompt tokens.
    Only the positions that predict answer tokens go through the output layer and the log-softmax.
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
    if loaded.arch.causal and _takes_logits_to_keep(loaded.model):
        return _shared_prefix_logprobs(loaded, prompt_ids, answers, pad, batch_size)
    n_prompt = len(prompt_ids)
    keep_logits = _takes_logits_to_keep(loaded.model)
    scores = []
    for start in range(0, len(answers), batch_size):
        chunk = answers[start:start + batch_size]
        n_answer = max(len(a) for a in chunk)
        # Logits at position p predict token p + 1: the answer's tokens are predicted from P - 1 on.
        positions = torch.arange(n_prompt - 1, n_prompt - 1 + n_answer)
        # The last answer token is never an input that predicts anything we score: leave it out.
        width = n_prompt + n_answer - 1
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        targets = torch.zeros((len(chunk), n_answer), dtype=torch.long)
        valid = torch.zeros((len(chunk), n_answer), dtype=torch.bool)
        for row, answer in enumerate(chunk):
            ids = (prompt_ids + answer)[:width]
            input_ids[row, :len(ids)] = torch.tensor(ids)
            attention_mask[row, :len(ids)] = 1
            targets[row, :len(answer)] = torch.tensor(answer)
            valid[row, :len(answer)] = True
        extra = {"logits_to_keep": positions.to(loaded.device)} if keep_logits else {}
        with torch.no_grad():
            logits = loaded.model(input_ids=input_ids.to(loaded.device),
                                  attention_mask=attention_mask.to(loaded.device), **extra).logits
        if not keep_logits:
            logits = logits[:, positions.to(logits.device)]
        logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()  # [row, answer position, vocab]
        picked = logprobs.gather(-1, targets[..., None])[..., 0]  # [row, answer position]
        scores.extend(picked.masked_fill(~valid, 0.0).sum(-1))
    return torch.stack(scores).double()


def _shared_prefix_logprobs(loaded: LoadedModel, prompt_ids: list[int], answers: list[list[int]], pad: int,
                            batch_size: int) -> torch.Tensor:
    """The same scores with the prompt run once: its KV cache is shared by every candidate, which then adds
    only its own answer tokens (a causal model's prompt states do not depend on what follows them).

    ``[continuation]``; equal to the one-row-per-candidate forward up to float rounding (measured max
    difference 3.5e-5 nats on smollm2-135m, fp32, over 6 items)."""
    model, device = loaded.model, loaded.device
    n_prompt = len(prompt_ids)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt_ids], device=device), use_cache=True, logits_to_keep=1)
    first = torch.log_softmax(out.logits[0, -1].float(), dim=-1).cpu()  # predicts every answer's first token
    # transformers 5.x names the cache argument ``cache`` (``past_key_values`` is deprecated there).
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = getattr(out, "cache", None) or out.past_key_values
    scores = []
    for start in range(0, len(answers), batch_size):
        chunk = answers[start:start + batch_size]
        score = torch.stack([first[a[0]] for a in chunk]).double()
        n_rest = max(len(a) for a in chunk) - 1  # answer tokens after the first: inputs a[:-1], targets a[1:]
        if n_rest > 0:
            inputs = torch.full((len(chunk), n_rest), pad, dtype=torch.long)
            targets = torch.zeros((len(chunk), n_rest), dtype=torch.long)
            valid = torch.zeros((len(chunk), n_rest), dtype=torch.bool)
            for row, answer in enumerate(chunk):
                inputs[row, :len(answer) - 1] = torch.tensor(answer[:-1])
                targets[row, :len(answer) - 1] = torch.tensor(answer[1:])
                valid[row, :len(answer) - 1] = True
            mask = torch.cat([torch.ones((len(chunk), n_prompt), dtype=torch.long), valid.long()], dim=1)
            chunk_cache = copy.deepcopy(cache)
            chunk_cache.batch_repeat_interleave(len(chunk))
            positions = torch.arange(n_prompt, n_prompt + n_rest)
            with torch.no_grad():
                logits = model(input_ids=inputs.to(device), attention_mask=mask.to(device), **{cache_arg: chunk_cache},
                               position_ids=positions[None].expand(len(chunk), -1).to(device),
                               cache_position=positions.to(device), use_cache=True).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()  # [row, answer position, vocab]
            picked = logprobs.gather(-1, targets[..., None])[..., 0].masked_fill(~valid, 0.0)
            score = score + picked.sum(-1).double()
        scores.extend(score)
    return torch.stack(scores)


def _takes_logits_to_keep(model) -> bool:
    """Whether the model's forward can restrict its output layer to chosen positions (transformers LMs)."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def score_item(loaded: LoadedModel, item: RetrievalItem, batch_size: int = 8) -> dict:
    """One item's row: the right answer's log-probability, the best distractor's, rank and correctness."""
    scores = continuation_logprobs(loaded, item.prompt, item.candidates, batch_size)
    if item.target < 0:
        return score_absent(item, scores)
    right = float(scores[item.target])
    distractors = torch.cat([scores[:item.target], scores[item.target + 1:]])
    return {
        "trial": item.trial, "placement": item.placement, "slot": item.target, "n_pairs": len(item.pairs),
        "key": item.key, "answer": item.pairs[item.target][1],
        "logprob_answer": right, "logprob_best_distractor": float(distractors.max()),
        "rank": int((distractors > right).sum()) + 1,
        "correct": bool(right > distractors.max()),
    }


def score_absent(item: RetrievalItem, scores: torch.Tensor) -> dict:
    """An absent-key item's row: which slot's value the model prefers although none is right."""
    picked = int(scores.argmax())
    n = len(item.pairs)
    return {"trial": item.trial, "placement": ABSENT, "slot": -1, "n_pairs": n, "key": item.key, "answer": None,
            "picked_slot": picked, "picked_placement": slot_name(picked, n),
            "logprob_picked": float(scores[picked])}


def slot_name(index: int, n_pairs: int) -> str:
    """``first``, ``middle`` or ``last`` for those slots, ``other`` for the rest."""
    return next((p for p in PLACEMENTS if slot(p, n_pairs) == index), "other")


class RetrievalRows(Mergeable):
    """The scored items of the retrieval task: ``rows``, one ``score_item`` dict per item, in item order (a later
    shard's items come after an earlier one's, so merged rows are the rows of one run)."""

    merging = {"rows": "rows"}

    def __init__(self) -> None:
        self.rows: list[dict] = []


def run_retrieval(loaded: LoadedModel, config: RetrievalConfig, progress=None,
                  absent: bool = True) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None, pd.DataFrame | None]:
    """Score every item: (per-item table, accuracy and mean log-likelihood by placement, absent-key items,
    absent-key baseline); the last two are None without ``absent``.

    The items are one pass named "retrieval" (``headlab.tally.run_pass``), one unit per item; ``progress`` (a
    tqdm-like object) gets ``update(1)`` after each."""
    if not loaded.generates:
        raise InputError(f"{loaded.name} is not a causal language model: the retrieval task needs next-token "
                         "log-probabilities")
    # Every item is drawn before the pass, from the seed alone: a unit scored in another shard or rank, or
    # skipped by a resumed run, gets the same pairs and keys as in one uninterrupted run.
    items = make_items(config, absent=absent)
    scored = RetrievalRows()

    def step(unit: int) -> None:
        scored.rows.append(score_item(loaded, items[unit], config.batch_size))

    run_pass(Pass("retrieval", len(items), step, {"rows": scored}),
             on_unit=None if progress is None else lambda unit: progress.update(1))
    rows = scored.rows  # only now: merged or loaded states replace the list (under ranks: every rank's rows)
    trials = pd.DataFrame([r for r in rows if r["placement"] != ABSENT])
    if not absent:
        return trials, summarize(trials), None, None
    absent_trials = pd.DataFrame([r for r in rows if r["placement"] == ABSENT])
    return trials, summarize(trials), absent_trials, absent_baseline(absent_trials)


def absent_baseline(absent_rows: pd.DataFrame) -> pd.DataFrame:
    """How often each slot's value is picked when the queried key is absent; ``chance`` = 1 / n_pairs per slot
    (``other`` gathers the remaining slots, chance (n - 3) / n)."""
    n_pairs = int(absent_rows["n_pairs"].iloc[0])
    names = [*PLACEMENTS, "other"]
    counts = absent_rows["picked_placement"].value_counts().reindex(names, fill_value=0)
    return pd.DataFrame({"picked": names, "count": counts.to_numpy(), "n": len(absent_rows),
                         "share": counts.to_numpy() / len(absent_rows),
                         "chance": [1 / n_pairs] * 3 + [max(n_pairs - 3, 0) / n_pairs]})


def summarize(trials: pd.DataFrame) -> pd.DataFrame:
    """Accuracy, mean log-likelihood of the answer and mean margin over the best distractor, by placement."""
    trials = trials[trials["placement"] != ABSENT]
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
