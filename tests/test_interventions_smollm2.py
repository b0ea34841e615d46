"""Interventions on real weights: smollm2-135m on the bundled IOI prompts, each edit against a control.

Measured (24 prompts, mean +- s.e. of logit(IO) - logit(S)): unedited 4.33 +- 0.55; the last row's
attention to the IO name knocked out in every head of every layer -3.72 +- 0.44; the same knockout of
the token right after the IO name (" and", the control) 4.03 +- 0.57.
"""

from __future__ import annotations

import statistics

import pytest
import torch

import headlab
from headlab.interventions import HeadPatch, KeyKnockout, every_head
from headlab.tasks import ioi_prompts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(load_model):
    return load_model("smollm2-135m")


def _logits(loaded, prompt: str, *edits) -> torch.Tensor:
    enc = loaded.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad(), headlab.intervene(loaded, *edits):
        return loaded.model(**enc).logits[0, -1]


def _logit_diff(loaded, example, *edits) -> float:
    logits = _logits(loaded, example.prompt, *edits)
    right, wrong = (loaded.tokenizer(name).input_ids[0] for name in (example.correct, example.wrong))
    return float(logits[right] - logits[wrong])


def _position(loaded, prompt: str, word: str) -> int:
    return loaded.tokenizer(prompt).input_ids.index(loaded.tokenizer(word).input_ids[0])


def _batched_logit_diffs(loaded, examples, *edits) -> list[float]:
    """One left-padded batch: positions count from each prompt's first real token, so one edit fits all."""
    tokenizer = loaded.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        enc = tokenizer([e.prompt for e in examples], return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side  # the tokenizer is shared with other tests
    with torch.no_grad(), headlab.intervene(loaded, *edits):
        logits = loaded.model(**enc).logits[:, -1]
    right = torch.tensor([tokenizer(e.correct).input_ids[0] for e in examples])
    wrong = torch.tensor([tokenizer(e.wrong).input_ids[0] for e in examples])
    rows = torch.arange(len(examples))
    return (logits[rows, right] - logits[rows, wrong]).tolist()


def test_knocking_out_the_indirect_object_flips_ioi_and_a_control_token_does_not(smollm2):
    every = every_head(range(smollm2.arch.n_layers))
    by_io: dict[int, list] = {}
    for example in ioi_prompts():
        by_io.setdefault(_position(smollm2, example.prompt, example.correct), []).append(example)
    base, knocked, control = [], [], []
    for io, examples in by_io.items():
        base += _batched_logit_diffs(smollm2, examples)
        knocked += _batched_logit_diffs(smollm2, examples, KeyKnockout(every, keys=io, rows="last"))
        control += _batched_logit_diffs(smollm2, examples, KeyKnockout(every, keys=io + 1, rows="last"))
    assert len(base) == 24
    assert statistics.mean(base) == pytest.approx(4.33, abs=0.01)  # the unbatched, unpadded measurement
    drop = [b - k for b, k in zip(base, knocked, strict=True)]
    control_drop = [b - c for b, c in zip(base, control, strict=True)]
    assert statistics.mean(knocked) < 0, knocked  # measured -3.72 +- 0.44
    assert statistics.mean(drop) > 5, drop  # measured 8.05
    assert abs(statistics.mean(control_drop)) < 1.5, control_drop  # measured 0.30
    assert sum(k < b for k, b in zip(knocked, base, strict=True)) == len(base)


def test_patching_every_head_at_the_last_row_gives_the_flipped_run(smollm2):
    """With every head's z at the last row taken from another prompt of the same length and the same last
    token, that row's residual stream is the other run's (embedding + attention from it + MLP of it): the
    logits must be the other run's, and patching from the same prompt must change nothing."""
    layers = range(smollm2.arch.n_layers)
    names = [f"blocks.{layer}.attn.hook_z" for layer in layers]
    examples = ioi_prompts()[:2]
    for index, example in enumerate(examples):
        flipped = examples[index ^ 1]  # the same sentence with the two names swapped
        runs = {}
        for key, prompt in (("flipped", flipped.prompt), ("same", example.prompt)):
            with torch.no_grad(), headlab.trace(smollm2, names=names, stats=False) as trace:
                smollm2.model(**smollm2.tokenizer(prompt, return_tensors="pt"))
            runs[key] = trace
        clean = _logits(smollm2, example.prompt)
        patched = _logits(smollm2, example.prompt, HeadPatch(every_head(layers), source=runs["flipped"],
                                                             rows="last"))
        torch.testing.assert_close(patched, _logits(smollm2, flipped.prompt), atol=2e-4, rtol=1e-5)
        same = _logits(smollm2, example.prompt, HeadPatch(every_head(layers), source=runs["same"], rows="last"))
        assert torch.equal(same, clean)
        right, wrong = (smollm2.tokenizer(name).input_ids[0] for name in (example.correct, example.wrong))
        assert float(clean[right] - clean[wrong]) > 0 > float(patched[right] - patched[wrong])
