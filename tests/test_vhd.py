"""VHD and VHR (analyses/vhd.py) on the tiny LVLM twins, against step-by-step oracles.

- VHD from two teacher-forced passes equals the per-step definition: for each t, z at the last row of
  (prompt + y_<t) run alone with and without the image, no cache.
- VHR's layer-by-layer selection: chosen[l] must equal the above-median heads of ‖z_l − z_l(no image)‖
  when the heads chosen in earlier layers are scaled by a plain HeadScale (the oracle), and the edited
  logits must equal that HeadScale run. In layer 1 (the first reinforced layer; layer 0 is never
  edited) the image stream's z is untouched by VHR at every step, so its selection at every step of a
  KV-cached generation must equal the selection from unreinforced teacher-forced VHD.
"""

from __future__ import annotations

import random

import pytest
import torch

import headlab
from headlab.analyses.lvlm_fixes import generate_with_vhr
from headlab.analyses.vhd import (
    VhrScale,
    above_median,
    capture_z,
    outlier_mask,
    t_vhd,
    vhd_of,
    vhr_layers,
    without_image,
)
from headlab.errors import InputError
from headlab.interventions import HeadScale
from headlab.lvlm import LvlmSample, build_inputs
from headlab.training import lvlm_data as D


@pytest.fixture(scope="module", params=["tiny-llava", "tiny-qwen2-vl"])
def lvlm(request):
    return headlab.load(request.param, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def samples():
    ims = [D.render(D.random_scene(random.Random(i))) for i in range(2)]
    return [LvlmSample("What is here?", [ims[0]]), LvlmSample("Describe the picture.", [ims[1]])]


def _last_z(loaded, sample: LvlmSample, prefix: torch.Tensor, layers: list[int]) -> torch.Tensor:
    """z ``[layer, head, d]`` at the last row of the sample's prompt + ``prefix`` tokens, run alone."""
    inputs = build_inputs(loaded, [sample])
    t = dict(inputs.tensors)
    t["input_ids"] = torch.cat([t["input_ids"], prefix[None]], 1)
    t["attention_mask"] = torch.ones_like(t["input_ids"])
    if "mm_token_type_ids" in t:
        t["mm_token_type_ids"] = torch.cat([t["mm_token_type_ids"], torch.zeros_like(prefix[None])], 1)
    with torch.no_grad(), capture_z(loaded, layers) as store:
        loaded.model(**t)
    return torch.stack([store[layer][0][0, -1] for layer in layers])


@pytest.mark.parametrize("remove", ["drop", "blank"])
def test_vhd_matches_stepwise_definition(lvlm, samples, remove):
    layers = list(range(lvlm.arch.n_layers))
    tokens = torch.tensor([[72, 105, 33, 10], [65, 66, 67, 68]])  # any continuation: teacher forcing
    trace = vhd_of(lvlm, samples, tokens, remove=remove)
    assert trace.vhd.shape == (2, 4, lvlm.arch.n_layers, lvlm.arch.n_heads)
    plain = without_image(samples, remove)
    for b in range(2):
        for t in range(4):
            with_img = _last_z(lvlm, samples[b], tokens[b, :t], layers)
            without = _last_z(lvlm, plain[b], tokens[b, :t], layers)
            expected = (with_img - without).norm(dim=-1)
            assert torch.allclose(trace.vhd[b, t], expected, atol=1e-4), (b, t)
            assert torch.allclose(trace.z_norm_without[b, t], without.norm(dim=-1), atol=1e-4)
    assert bool((trace.vhd > 0).any())


def test_blank_keeps_the_image_tokens(lvlm, samples):
    dropped = build_inputs(lvlm, without_image(samples, "drop"))
    blank = build_inputs(lvlm, without_image(samples, "blank"))
    original = build_inputs(lvlm, samples)
    assert dropped.image_spans == [[], []]
    assert blank.image_spans == original.image_spans
    with pytest.raises(InputError, match="unknown image removal"):
        without_image(samples, "erase")


def test_t_vhd_and_outliers_by_hand():
    vhd = torch.tensor([[1.0, 5.0, 2.0, 0.0], [3.0, 3.0, 9.0, 1.0]])  # [layer, head]
    assert t_vhd(vhd, k=2, aggregation="topk_mean").item() == pytest.approx((9 + 5) / 2)
    assert t_vhd(vhd, k=2, aggregation="layer_topk_sum").item() == pytest.approx((5 + 2) + (9 + 3))
    z_norm = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 50.0, 1.0]])
    mask = outlier_mask(vhd, z_norm)
    # layer 1, head 2: VHD 9 > mean 4 + std 3.5 and ‖z‖ 50 > mean + std; layer 0 has no ‖z‖ surge
    assert mask.tolist() == [[False] * 4, [False, False, True, False]]
    assert t_vhd(vhd, k=2, aggregation="layer_topk_sum", z_norm_without=z_norm).item() == pytest.approx(7 + 6)
    # torch.median is the lower middle value for an even count: layer 1 has median 3, so only head 2 is above
    assert above_median(vhd).tolist() == [[False, True, True, False], [False, False, True, False]]
    with pytest.raises(InputError, match="aggregation"):
        t_vhd(vhd, aggregation="max")


def test_vhr_layers_scale_with_depth():
    assert vhr_layers(32) == [1] + list(range(18, 32))
    assert vhr_layers(30) == [1] + list(range(17, 30))  # smollm2-135m: 13 = round(14 · 30/32)
    assert vhr_layers(4) == [1, 2, 3]
    assert vhr_layers(32, n_last=18) == [1] + list(range(14, 32))
    with pytest.raises(InputError):
        vhr_layers(4, n_last=9)


def test_vhr_layer_by_layer_selection_and_exact_logits(lvlm, samples):
    arch = lvlm.arch
    layers = vhr_layers(arch.n_layers)
    sample = samples[:1]
    inputs = build_inputs(lvlm, sample)
    ref_inputs = build_inputs(lvlm, without_image(sample))
    with torch.no_grad(), capture_z(lvlm, layers) as store:
        lvlm.model(**ref_inputs.tensors)
    reference = {layer: store[layer][0][:, -1] for layer in layers}
    with torch.no_grad():
        before = lvlm.model(**inputs.tensors).logits
    edit = VhrScale([(layer, h) for layer in layers for h in range(arch.n_heads)], alpha=2.0, reference=reference)
    with torch.no_grad(), headlab.intervene(lvlm, edit):
        edited = lvlm.model(**inputs.tensors).logits
    chosen = {layer: edit.chosen[layer][0] for layer in layers}
    # Oracle, layer by layer: HeadScale on the earlier layers' choices, then the median rule on this layer.
    for i, layer in enumerate(layers):
        earlier = [(lay, h) for lay in layers[:i] for h in range(arch.n_heads) if chosen[lay][h]]
        with torch.no_grad(), headlab.intervene(lvlm, *([HeadScale(earlier, alpha=2.0, rows="last")]
                                                          if earlier else [])):
            with capture_z(lvlm, [layer]) as zs:
                lvlm.model(**inputs.tensors)
        vhd = (zs[layer][0][0, -1] - reference[layer][0]).norm(dim=-1)
        assert torch.equal(above_median(vhd), chosen[layer]), layer
    assert all(0 < int(c.sum()) < arch.n_heads for c in chosen.values())
    heads = [(layer, h) for layer in layers for h in range(arch.n_heads) if chosen[layer][h]]
    with torch.no_grad(), headlab.intervene(lvlm, HeadScale(heads, alpha=2.0, rows="last")):
        oracle = lvlm.model(**inputs.tensors).logits
    assert torch.allclose(edited, oracle, atol=1e-5)
    assert not torch.allclose(edited[:, -1], before[:, -1], atol=1e-4)  # the edit does something
    assert torch.allclose(edited[:, :-1], before[:, :-1], atol=1e-6)  # only the predicting row is edited
    with torch.no_grad():
        after = lvlm.model(**inputs.tensors).logits
    assert torch.equal(after, before)  # bit-exact after the block


def test_vhr_generation_per_step_and_once(lvlm, samples):
    n = 4
    base, _ = generate_with_vhr(lvlm, samples, max_new_tokens=n)
    tokens, log = generate_with_vhr(lvlm, samples, max_new_tokens=n, vhr=True, alpha=2.0)
    assert len(log["chosen"]) == tokens.shape[1]
    # Layer 1 is the first reinforced layer: its z in the image stream is never changed by VHR, so the
    # per-step selection there equals the unreinforced teacher-forced VHD's, at every KV-cached step.
    trace = vhd_of(lvlm, samples, tokens, layers=[1])
    for t, chosen in enumerate(log["chosen"]):
        assert torch.equal(chosen[1], above_median(trace.vhd[:, t, 0])), t
    # Once: the first step's heads reused = plain HeadScale on those heads, one sample at a time.
    once, log_once = generate_with_vhr(lvlm, samples[:1], max_new_tokens=n, vhr=True, per_step=False)
    first = log_once["chosen"][0]
    heads = [(layer, h) for layer, c in first.items() for h in range(lvlm.arch.n_heads) if c[0, h]]
    fixed, _ = generate_with_vhr(lvlm, samples[:1], max_new_tokens=n, heads=heads, alpha=2.0)
    assert torch.equal(once, fixed)
    assert all(torch.equal(step[layer], first[layer]) for step in log_once["chosen"] for layer in first)
    again, _ = generate_with_vhr(lvlm, samples, max_new_tokens=n)
    assert torch.equal(again, base)  # nothing left installed
