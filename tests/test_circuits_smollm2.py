"""Circuits on a real LM, smollm2-135m: IOI and name induction (12 prompts each, seed 0).

Senders are the heads of layers 23..29 (63 of 270) to keep the file near a minute on one core; the
full run (``analyze circuits --model smollm2-135m --tasks ioi,name-induction --n 32 --method path``)
scores all 270 and finds the same top heads (docs/circuits.md). Thresholds come from measurements:
- clean model, N = 16: IOI accuracy 1.0, LD 5.87 (cf -4.08); name induction 1.0, LD 6.54 (cf -7.03);
- path patching to the logits, IOI N = 16: 23.3 (58.6), 29.1 (30.9), 23.0 (21.0), then 23.2, 23.1, 23.7;
  name induction: 23.2 (39.6), 29.1 (28.5), 23.7 (18.9), 23.1, 18.6, 29.2;
- attribution vs path on layers 18..29: Spearman 0.91 (IOI), 0.78 (name induction);
- mean-ablating IOI's top 6: LD 5.87 -> 1.73 (drop 4.13); 5 random 6-head sets: drop 0.08 ± 0.77, max 1.19.
"""

from __future__ import annotations

import pytest
import torch

from headlab.analyses.circuit_tasks import make_task, tokenize_task
from headlab.analyses.circuits import ablation_test, overlap, spearman, top_heads
from headlab.analyses.path_patching import attribution_patching, clean_and_cf, path_patching

pytestmark = pytest.mark.slow
LAYERS = range(23, 30)
SENDERS = [(layer, h) for layer in LAYERS for h in range(9)]


@pytest.fixture(scope="module")
def smollm(load_model):
    torch.set_num_threads(1)
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def scored(smollm):
    out = {}
    for task in ("ioi", "name-induction"):
        batch = tokenize_task(smollm, make_task(task, 12, tokenizer=smollm.text_tokenizer))
        path = path_patching(smollm, batch, SENDERS, senders_per_pass=21)
        attribution = attribution_patching(smollm, batch)
        ranked = [SENDERS[int(i)] for i in torch.argsort(path, descending=True)]
        out[task] = {"batch": batch, "path": path, "attribution": attribution, "top": ranked[:6]}
    return out


def test_clean_model_solves_both_tasks(smollm, scored):
    for task, (min_ld, max_cf) in {"ioi": (4.0, -2.0), "name-induction": (5.0, -5.0)}.items():
        runs = clean_and_cf(smollm, scored[task]["batch"])
        assert float((runs.ld_clean > 0).float().mean()) == 1.0, task
        assert runs.ld_clean.mean() > min_ld and runs.ld_cf.mean() < max_cf, task


def test_path_patching_finds_the_mover_heads(scored):
    assert scored["ioi"]["top"][:3] == [(23, 3), (29, 1), (23, 0)]
    assert set(scored["name-induction"]["top"][:2]) == {(23, 2), (29, 1)}
    top = scored["ioi"]["path"].max()
    assert 45 < float(top) < 75  # 58.6 measured at N = 16


def test_attribution_agrees_with_exact_path_patching(scored):
    for task, floor in (("ioi", 0.75), ("name-induction", 0.6)):
        attribution = scored[task]["attribution"][LAYERS.start:].flatten()
        assert spearman(attribution, scored[task]["path"]) > floor, task
        # the linear estimate can swap the first two (N = 12: 29.1 before 23.3 for IOI)
        assert top_heads(scored[task]["attribution"], k=1)[0] in scored[task]["top"][:2], task


def test_the_two_circuits_share_the_late_movers(scored):
    shared = overlap(scored["ioi"]["top"], scored["name-induction"]["top"])
    assert {(29, 1), (23, 2)} <= set(shared["shared"]) and shared["iou"] >= 0.3


def test_ablating_the_circuit_beats_random_heads(smollm, scored):
    check = ablation_test(smollm, scored["ioi"]["batch"], scored["ioi"]["top"], draws=3)
    assert check["drop_circuit"] > 3.0
    assert check["drop_random_max"] < 2.0 and check["random_at_least_circuit"] == 0


def test_attention_override_repairs_colored_objects(smollm):
    """The paper's repair on this model. Colored Objects (1 shot) is near chance here: on 32 prompts (seed 0)
    the listed colour ranked first is the answer on 41%. Path patching on those 32 prompts finds three
    negative heads, 24.4 (-52.5), 23.3 (-13.1), 29.0 (-12.8); made to attend at the final position to the
    two wrong colours only, they lift it, on 64 held-out prompts (seed 1), from 40.6% to 100% (LD 0.13 ->
    5.05; 24.4 alone: 71.9%), while 3 random heads leave it at or below chance (5 draws: 32.2% ± 13.7%,
    max 45.3%; this draw: 31.3%). Here: 12 held-out prompts (seed 1), measured 41.7% -> 100%, LD 0.27 -> 4.68."""
    from headlab.analyses.circuit_repair import override_effect

    task = make_task("colored-objects", 12, seed=1, tokenizer=smollm.text_tokenizer)
    repaired = override_effect(smollm, task.examples, [(24, 4), (23, 3), (29, 0)])
    assert repaired["accuracy3_before"] < 0.7 and repaired["accuracy3_after"] >= 0.9
    assert repaired["ld_after"] > repaired["ld_before"] + 2.0
    control = override_effect(smollm, task.examples, [(21, 8), (23, 8), (2, 2)])
    assert control["accuracy3_after"] <= control["accuracy3_before"] + 0.2
