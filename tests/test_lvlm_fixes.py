"""The LVLM fixes (analyses/lvlm_fixes.py) against a direct eager reimplementation of each method.

The oracle is an attention function of its own (registered with transformers as ``fix_oracle``): it
materialises the scores of every call, applies the method's formula where the papers' code does (image
columns, last row, layer ranges, φ-sinks found on the layer input at prefill, the vision tower's own
eager attention maps for PAINT) and takes the softmax itself. headlab's path (per-sample positions,
one ScoreEdit per call, VAR as a recombination of group partial outputs, the KV cache, the no-image
stream for guidance) must give the same scores at every generation step of a padded batch.

VCD is checked against two plain uncached forwards per step (the image and the same noised pixels), the
adaptive PAI / VAF against the unfixed and the non-adaptive model on steps whose previous distribution is forced
one-hot or uniform, and VAF's two key spans on llava-smol's own chat template.
"""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

import headlab
from headlab.analyses.lvlm_fixes import (
    FIXES,
    FixContext,
    NoFix,
    Pai,
    Paint,
    Vaf,
    Var,
    Vcd,
    Vhr,
    contrastive_logits,
    diffusion_alpha_bar,
    diffusion_noise,
    generate_fixed,
    make_fix,
    normalised_entropy,
    paint_tokens,
    vaf_layers,
    vaf_span_keys,
)
from headlab.errors import InputError
from headlab.interventions import ScoreBoost, ScoreScale, every_head
from headlab.lvlm import LvlmSample, build_inputs

STEPS = 5
ORACLE: dict = {}


def oracle_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention ``[batch, head, query, dim]`` -> ``[batch, query, head, dim]`` with ORACLE's edit."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = (query.float() @ key.float().transpose(-1, -2)) * scaling
    layer, n_q, n_k = getattr(module, "layer_idx", None), query.shape[2], key.shape[2]
    rows = torch.arange(n_k - n_q, n_k)  # the columns of this call's query rows
    edit = ORACLE.get("edit") if layer is not None else None  # the vision tower runs plain
    if edit is not None:
        scores = edit.scores(layer, scores, rows, n_k)
    if attention_mask is not None:
        scores = scores + attention_mask[..., :n_k].float()
    probs = scores.softmax(-1)
    if edit is not None:
        probs = edit.probs(layer, probs, rows, n_k)
    out = probs @ value.float()
    return out.to(query.dtype).transpose(1, 2).contiguous(), probs


AttentionInterface.register("fix_oracle", oracle_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register("fix_oracle", eager_mask)


class OracleEdit:
    """Columns of the padded batch: ``inputs`` tells where images, system turns and the text after sit."""

    def __init__(self, inputs, n_layers: int):
        self.first = inputs.first_real
        self.image = inputs.image_mask.clone()
        self.system = inputs.system_mask.clone()
        self.after = torch.stack([self.first[b] + inputs.text_after[b] for b in range(len(self.first))])
        self.prompt_last = inputs.image_mask.shape[1] - 1  # left padding: every prompt ends in this column
        self.n_layers = n_layers

    def last_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """``[query]``: rows that were the last row when the model computed them. With a KV cache (the official
        code's generate) those rows' edited outputs stay in the cache: the last prompt row and every new token."""
        return rows >= self.prompt_last

    def cols(self, mask: torch.Tensor, n_k: int) -> torch.Tensor:
        out = torch.zeros(mask.shape[0], n_k, dtype=torch.bool)
        out[:, :mask.shape[1]] = mask[:, :n_k]
        return out  # [batch, key]

    def scores(self, layer, scores, rows, n_k):
        return scores

    def probs(self, layer, probs, rows, n_k):
        return probs


class PaiOracle(OracleEdit):
    alpha = 0.2  # the tests raise it: a random tiny model's scores are near 0, so 0.2 |s| barely moves them

    def scores(self, layer, scores, rows, n_k):
        if layer < 2:
            return scores
        keys = self.cols(self.image, n_k)[:, None, None, :] & self.last_rows(rows)[None, None, :, None]
        return torch.where(keys, scores + self.alpha * scores.abs(), scores)


class PaintOracle(OracleEdit):
    def __init__(self, inputs, n_layers, local, summary, alpha, beta):
        super().__init__(inputs, n_layers)
        self.local, self.summary = local, summary  # [batch, column] bool
        self.alpha, self.beta = alpha, beta

    def scores(self, layer, scores, rows, n_k):
        if layer < 2:
            return scores
        boost = torch.where(self.cols(self.local, n_k), self.alpha, torch.where(self.cols(self.summary, n_k),
                                                                                self.beta, 0.0))
        boost = boost[:, None, None, :] * self.last_rows(rows)[None, None, :, None]
        return scores + boost * scores.abs()


class VafOracle(OracleEdit):
    """``span``: "before-image" (every column from the first real token to the first image column, the official
    ``:SYS_LEN``) or "system" (the system turn's columns)."""

    image_scale, system_scale = 1.15, 0.95

    def __init__(self, inputs, n_layers: int, span: str = "before-image"):
        super().__init__(inputs, n_layers)
        if span == "before-image":
            columns = torch.arange(inputs.image_mask.shape[1])
            first_image = inputs.image_mask.int().argmax(dim=1)  # every sample here has an image
            self.system = (columns[None, :] >= self.first[:, None]) & (columns[None, :] < first_image[:, None])

    def scores(self, layer, scores, rows, n_k):
        if layer not in vaf_layers(self.n_layers):
            return scores
        factor = torch.where(self.cols(self.image, n_k), self.image_scale,
                             torch.where(self.cols(self.system, n_k), self.system_scale, 1.0))
        after = rows[None, :] >= self.after[:, None]  # [batch, query]
        return torch.where(after[:, None, :, None], scores * factor[:, None, None, :], scores)


class VarOracle(OracleEdit):
    """φ on each layer's input at prefill (a pre-hook), then per head and row: select, scale sinks, redistribute."""

    def __init__(self, inputs, n_layers, dims, tau, p=0.6, summ=0.2, rho=0.5):
        super().__init__(inputs, n_layers)
        self.real = inputs.real_mask
        self.dims, self.tau, self.p, self.summ, self.rho = dims, tau, p, summ, rho
        self.sink: dict[int, torch.Tensor] = {}
        self.selected = 0

    def find(self, layer, hidden):
        if layer in self.sink or hidden.shape[1] != self.real.shape[1]:
            return
        x = hidden.float()
        rms = torch.sqrt(x.pow(2).mean(-1) + 1e-6)
        value = torch.stack([(x[..., d] / rms).abs() for d in self.dims]).amax(0)
        self.sink[layer] = (value > self.tau) & self.real

    def probs(self, layer, probs, rows, n_k):
        if layer < 2:
            return probs
        sink = self.cols(self.sink[layer], n_k)
        image = self.cols(self.image, n_k)
        visual = sink & image
        rest = image & ~visual
        out = probs.clone()
        for b in range(probs.shape[0]):
            if not visual[b].any():
                continue
            n_image = int(image[b].sum())
            for h in range(probs.shape[1]):
                for r, column in enumerate(rows.tolist()):
                    if column < self.after[b]:
                        continue
                    a = probs[b, h, r]
                    image_mass, rest_mass = float(a[image[b]].sum()), float(a[rest[b]].sum())
                    if image_mass < self.summ or rest_mass / (image_mass + 1e-6 * n_image) < self.rho:
                        continue
                    self.selected += 1
                    budget = (1 - self.p) * float(a[sink[b]].sum())
                    new = a.clone()
                    new[sink[b]] = a[sink[b]] * self.p
                    new[rest[b]] = a[rest[b]] + budget * a[rest[b]] / rest_mass
                    out[b, h, r] = new
        return out


@pytest.fixture(scope="module")
def lvlm():
    return headlab.load("tiny-llava")


def images():
    out = []
    for i, colour in enumerate([(220, 30, 30), (30, 200, 60), (40, 40, 210)]):
        im = Image.new("RGB", (48, 48), (250, 250, 250))
        for x in range(8 + 4 * i, 30 + 4 * i):
            for y in range(10, 40 - 3 * i):
                im.putpixel((x, y), colour)
        out.append(im)
    return out


def samples():
    a, b, c = images()
    return [LvlmSample("Describe the image.", [a]),
            LvlmSample("What is shown in this picture, in a few words?", [b], system="Answer briefly."),
            LvlmSample("Name the objects.", [c])]


def oracle_scores(lvlm, batch, edit_of, *, hooks=None):
    """Greedy scores ``[batch, STEPS, vocab]`` from the oracle attention, recomputed without a cache each step."""
    model = lvlm.model
    inputs = build_inputs(lvlm, batch, padding_side="left")
    edit = edit_of(inputs)
    ORACLE["edit"] = edit
    previous = model.config._attn_implementation
    model.set_attn_implementation("fix_oracle")
    handles = [] if hooks is None else hooks(edit)
    try:
        tensors = dict(inputs.tensors)
        steps = []
        with torch.no_grad():
            for _ in range(STEPS):
                logits = model(**tensors).logits[:, -1].float()
                steps.append(logits)
                nxt = logits.argmax(-1, keepdim=True)
                tensors["input_ids"] = torch.cat([tensors["input_ids"], nxt], 1)
                tensors["attention_mask"] = torch.cat([tensors["attention_mask"], torch.ones_like(nxt)], 1)
    finally:
        for h in handles:
            h.remove()
        model.set_attn_implementation(previous)
        ORACLE.clear()
    return torch.stack(steps, 1), edit


def headlab_scores(lvlm, batch, methods):
    tokens, scores = generate_fixed(lvlm, batch, methods, max_new_tokens=STEPS, return_scores=True)
    return scores


def test_registry_names_every_method():
    assert {"none", "pai", "paint", "vaf", "var", "vhr", "vcd"} <= set(FIXES)
    assert isinstance(make_fix("pai", alpha=0.5), Pai) and make_fix("pai", alpha=0.5).alpha == 0.5
    with pytest.raises(InputError, match="unknown fix"):
        make_fix("nope")
    with pytest.raises(InputError, match="fix pai"):
        make_fix("pai", strength=1)
    vcd = make_fix("vcd", cd_alpha=2, noise_step=400)
    assert isinstance(vcd, Vcd)
    assert (vcd.cd_alpha, vcd.cd_beta, vcd.noise_step, vcd.schedule) == (2, 0.1, 400, "sigmoid")
    assert make_fix("pai", adaptive="entropy").adaptive == "entropy" and Pai().adaptive == Vaf().adaptive == "off"
    for name, options, message in (("vcd", {"control": True}, "no random control"),
                                   ("vcd", {"noise_step": 1000}, "noise_step must lie in"),
                                   ("vcd", {"cd_beta": 1.5}, "cd_beta must lie in"),
                                   ("vcd", {"schedule": "cosine"}, "schedule must be one of sigmoid, linear"),
                                   ("pai", {"adaptive": "always"}, "adaptive must be one of off, entropy"),
                                   ("vaf", {"span": "user"}, "span must be one of before-image, system")):
        with pytest.raises(InputError, match=message):
            make_fix(name, **options)


def test_plain_generation_matches_the_oracle_without_edits(lvlm):
    batch = samples()
    ours = headlab_scores(lvlm, batch, [NoFix()])
    theirs, _ = oracle_scores(lvlm, batch, lambda inputs: OracleEdit(inputs, lvlm.arch.n_layers))
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-4)


def _assert_changes_and_matches(lvlm, batch, methods, edit_of, **kw):
    base = headlab_scores(lvlm, batch, [NoFix()])
    ours = headlab_scores(lvlm, batch, methods)
    theirs, edit = oracle_scores(lvlm, batch, edit_of, **kw)
    assert (ours - base).abs().max() > 5e-3, "the method did not change the scores: the comparison would be empty"
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-4)
    return edit


def test_pai_matches_eager_reimplementation(lvlm):
    def edit_of(inputs):
        edit = PaiOracle(inputs, lvlm.arch.n_layers)
        edit.alpha = 40.0
        return edit

    _assert_changes_and_matches(lvlm, samples(), [Pai(alpha=40.0)], edit_of)


@pytest.mark.parametrize("span", ["before-image", "system"])
def test_vaf_matches_eager_reimplementation(lvlm, span):
    assert vaf_layers(32) == [9, 10, 11, 12, 13, 14] and vaf_layers(lvlm.arch.n_layers) == [1, 2]
    def edit_of(inputs):
        edit = VafOracle(inputs, lvlm.arch.n_layers, span)
        edit.image_scale, edit.system_scale = 40.0, 0.1
        return edit

    _assert_changes_and_matches(lvlm, samples(), [Vaf(image_scale=40.0, system_scale=0.1, span=span)], edit_of)


def test_paint_matches_eager_reimplementation_with_the_towers_own_attention(lvlm):
    batch = samples()
    tower = lvlm.model.model.vision_tower

    def edit_of(inputs):
        # The vision tower's attention maps from transformers' own eager path, not headlab's q/k recomputation.
        previous = tower.config._attn_implementation
        tower.set_attn_implementation("eager")
        try:
            with torch.no_grad():
                att = tower(pixel_values=inputs.tensors["pixel_values"], output_attentions=True).attentions
        finally:
            tower.set_attn_implementation(previous)
        local = torch.zeros_like(inputs.image_mask)
        summary = torch.zeros_like(inputs.image_mask)
        for b in range(len(batch)):
            first_layer, second_last = att[0][b, :, 0, 1:].sum(0), att[-2][b, :, 0, 1:].sum(0)
            n = len(first_layer)
            top = set(torch.topk(first_layer, math.ceil(0.25 * n)).indices.tolist())
            q1, q3 = torch.quantile(second_last, torch.tensor([0.25, 0.75])).tolist()
            out = set((second_last > q3 + 1.5 * (q3 - q1)).nonzero().flatten().tolist())
            columns = inputs.image_mask[b].nonzero().flatten()
            for p in top - out:
                local[b, columns[p]] = True
            for p in out:
                summary[b, columns[p]] = True
        return PaintOracle(inputs, lvlm.arch.n_layers, local, summary, 40.0, 20.0)

    method = Paint(alpha=40.0, beta=20.0)
    _assert_changes_and_matches(lvlm, batch, [method], edit_of)
    found: dict = {}
    generate_fixed(lvlm, batch, [method], max_new_tokens=1, found=found)
    assert len(found["paint"]) == len(batch)
    assert all(len(c["local"]) == 4 - len(set(c["local"]) & set(c["summary"])) or len(c["local"]) <= 4
               for c in found["paint"])
    assert "chosen" not in vars(method)  # what a run found is the run's, not the method's


def test_paint_token_sets_by_hand():
    first = torch.tensor([0.1, 0.9, 0.2, 0.8, 0.3, 0.05, 0.7, 0.0])
    second = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 9.0])  # patch 7 is the only IQR outlier
    local, summary = paint_tokens(first, second, 0.25)
    assert summary == [7] and local == [1, 3]
    local, summary = paint_tokens(torch.tensor([0.0, 0.0, 0.0, 5.0]), torch.tensor([0.0, 0.0, 0.0, 5.0]), 0.25)
    assert summary == [3] and local == []  # a summary token leaves the local set


def test_var_matches_eager_reimplementation(lvlm):
    batch = samples()
    dims, tau = [0, 1, 2], 2.6  # about one image token in ten is a visual sink in layers 2 and 3

    def hooks(edit):
        return [lvlm.arch.layers[layer].register_forward_pre_hook(
            lambda m, a, kw, layer=layer: edit.find(layer, a[0] if a else kw["hidden_states"]), with_kwargs=True)
            for layer in range(lvlm.arch.n_layers)]

    method = Var(tau=tau, dims=dims)
    edit = _assert_changes_and_matches(lvlm, batch, [method], lambda inputs: VarOracle(inputs, lvlm.arch.n_layers,
                                                                                        dims, tau), hooks=hooks)
    assert edit.selected > 0
    found: dict = {}
    generate_fixed(lvlm, batch, [method], max_new_tokens=1, found=found)
    assert any(visual for layer in found["var"].values() for _, visual in layer)
    assert "sinks" not in vars(method)  # what a run found is the run's, not the method's


def test_var_paper_semantics_and_no_visual_sink_means_no_edit(lvlm):
    batch = samples()
    base = headlab_scores(lvlm, batch, [NoFix()])
    none_found = headlab_scores(lvlm, batch, [Var(tau=1e6, dims=[0])])
    torch.testing.assert_close(none_found, base, atol=2e-4, rtol=1e-4)
    code = headlab_scores(lvlm, batch, [Var(tau=2.6, dims=[0, 1, 2], p=0.6)])
    paper = headlab_scores(lvlm, batch, [Var(tau=2.6, dims=[0, 1, 2], p=0.4, paper_semantics=True)])
    assert (code - base).abs().max() > 1e-3
    torch.testing.assert_close(paper, code, atol=1e-5, rtol=1e-5)  # keep 1 − 0.4 = keep 0.6


def test_pai_guidance_matches_two_uncached_passes(lvlm):
    """γ log p(y | image, boosted) − (γ − 1) log p(y | no image, plain), over tokens with p ≥ β · max."""
    batch = samples()
    gamma, beta = 1.5, 0.1
    ours = headlab_scores(lvlm, batch, [Pai(alpha=40.0, cfg=True, gamma=gamma, plausibility=beta)])
    model = lvlm.model
    with_image = build_inputs(lvlm, batch, padding_side="left")
    no_image = build_inputs(lvlm, [LvlmSample(s.prompt, (), s.system) for s in batch], padding_side="left")
    previous = model.config._attn_implementation
    model.set_attn_implementation("fix_oracle")
    try:
        a, b = dict(with_image.tensors), dict(no_image.tensors)
        edit = PaiOracle(with_image, lvlm.arch.n_layers)
        edit.alpha = 40.0
        steps = []
        with torch.no_grad():
            for _ in range(STEPS):
                ORACLE["edit"] = edit
                la = model(**a).logits[:, -1].float().log_softmax(-1)
                ORACLE.clear()
                lb = model(**b).logits[:, -1].float().log_softmax(-1)
                guided = gamma * la - (gamma - 1) * lb
                keep = la >= la.max(-1, keepdim=True).values + math.log(beta)
                guided = torch.where(keep, guided, torch.finfo(torch.float32).min)
                steps.append(guided)
                nxt = guided.argmax(-1, keepdim=True)
                for t in (a, b):
                    t["input_ids"] = torch.cat([t["input_ids"], nxt], 1)
                    t["attention_mask"] = torch.cat([t["attention_mask"], torch.ones_like(nxt)], 1)
    finally:
        model.set_attn_implementation(previous)
        ORACLE.clear()
    theirs = torch.stack(steps, 1)
    finite = theirs > torch.finfo(torch.float32).min / 2
    assert torch.equal(finite, ours > torch.finfo(torch.float32).min / 2)
    torch.testing.assert_close(ours[finite], theirs[finite], atol=5e-4, rtol=1e-4)


def test_controls_change_the_choice_not_its_size(lvlm):
    batch = samples()
    real, control = Paint(), Paint(control=True, seed=3)
    found_real: dict = {}
    found_control: dict = {}
    generate_fixed(lvlm, batch, [real], max_new_tokens=1, found=found_real)
    generate_fixed(lvlm, batch, [control], max_new_tokens=1, found=found_control)
    for a, b in zip(found_real["paint"], found_control["paint"], strict=True):
        assert len(a["local"]) == len(b["local"]) and len(a["summary"]) == len(b["summary"])
    assert [c["local"] for c in found_real["paint"]] != [c["local"] for c in found_control["paint"]]
    base = headlab_scores(lvlm, batch, [NoFix()])
    for method in (Pai(control=True), Vaf(control=True), Vhr(control=True)):
        assert (headlab_scores(lvlm, batch, [method]) - base).abs().max() > 1e-4, type(method).__name__


def test_methods_compose_and_leave_the_model_bit_exact(lvlm):
    batch = samples()
    before = {k: v.clone() for k, v in lvlm.model.state_dict().items()}
    attn = lvlm.model.config._attn_implementation
    tokens = generate_fixed(lvlm, batch, [Paint(), Vhr(), Var(tau=2.6, dims=[0, 1, 2])], max_new_tokens=3)
    assert tokens.shape == (3, 3)
    assert lvlm.model.config._attn_implementation == attn
    assert all(torch.equal(v, lvlm.model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(InputError, match="different query rows"):
        generate_fixed(lvlm, batch, [Pai(), Vaf()], max_new_tokens=1)  # last row vs text-after rows, same layer 2
    assert all(torch.equal(v, lvlm.model.state_dict()[k]) for k, v in before.items())


def test_paint_refuses_a_tower_without_cls():
    qwen = headlab.load("tiny-qwen2-vl")
    im = images()[0]
    with pytest.raises(InputError, match="CLS"):
        generate_fixed(qwen, [LvlmSample("Describe the image.", [im])], [Paint()], max_new_tokens=1)


# ---------------------------------------------------------------------------------------------------
# VCD


def test_contrastive_logits_keep_only_plausible_tokens():
    """Token 1 has the highest contrastive score but p(1 | image) = e^-3 · p(0) < 0.1 · max: it gets −inf and
    greedy takes token 0; with β = 0.01 (cutoff e^-4.6) it is plausible and wins."""
    real = torch.tensor([[0.0, -3.0, -1.0]])
    distorted = torch.tensor([[2.0, -10.0, 0.5]])
    scores = contrastive_logits(real, distorted, alpha=1.0, beta=0.1)
    torch.testing.assert_close(scores[0, [0, 2]], torch.tensor([-2.0, -2.5]))  # 2 · real − distorted
    assert scores[0, 1] == float("-inf") and int(scores.argmax()) == 0
    assert int(contrastive_logits(real, distorted, alpha=1.0, beta=0.01).argmax()) == 1
    torch.testing.assert_close(contrastive_logits(real, distorted, alpha=0.0, beta=0.0), real)  # α = 0: the logits


def test_diffusion_noise_follows_the_schedule_and_its_seed():
    alpha_bar = diffusion_alpha_bar("sigmoid")
    # The official code's schedule, recomputed as it does (fp32).
    betas = torch.sigmoid(torch.linspace(-6, 6, 1000)) * (0.5e-2 - 1e-5) + 1e-5
    torch.testing.assert_close(alpha_bar.float(), torch.cumprod(1 - betas, 0), atol=1e-6, rtol=1e-5)
    assert float(alpha_bar[500]) == pytest.approx(0.7448, abs=1e-4)
    assert float(diffusion_alpha_bar("linear")[500]) == pytest.approx(0.0778, abs=1e-4)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    noised = diffusion_noise(images, 500)
    assert torch.equal(noised, diffusion_noise(images, 500))
    assert not torch.equal(noised, diffusion_noise(images, 500, seed=1))
    # Per image, from the image itself: the same image gets the same noise at any position of any batch.
    assert torch.equal(diffusion_noise(images[[2, 0]], 500), noised[[2, 0]])
    eps = (noised - math.sqrt(alpha_bar[500]) * images) / math.sqrt(1 - alpha_bar[500])
    assert abs(float(eps.mean())) < 0.05 and float(eps.std()) == pytest.approx(1.0, abs=0.05)
    with pytest.raises(InputError, match="noise_step"):
        diffusion_noise(images, 1000)


def vcd_oracle(lvlm, batch, alpha, beta, steps=STEPS):
    """Greedy VCD from two plain uncached forwards per step: the image, and the same pixels under
    ``diffusion_noise`` (step 500, seed 0); the formula written out here. Scores ``[batch, steps, vocab]``."""
    inputs = build_inputs(lvlm, batch, padding_side="left")
    real = dict(inputs.tensors)
    noised = {**real, "pixel_values": diffusion_noise(real["pixel_values"], 500, seed=0)}
    out = []
    with torch.no_grad():
        for _ in range(steps):
            a = lvlm.model(**real).logits[:, -1].float()
            d = lvlm.model(**noised).logits[:, -1].float()
            cd = (1 + alpha) * a - alpha * d
            cd[a.softmax(-1) < beta * a.softmax(-1).max(-1, keepdim=True).values] = float("-inf")
            out.append(cd)
            nxt = cd.argmax(-1, keepdim=True)
            for t in (real, noised):
                t["input_ids"] = torch.cat([t["input_ids"], nxt], 1)
                t["attention_mask"] = torch.cat([t["attention_mask"], torch.ones_like(nxt)], 1)
                if "mm_token_type_ids" in t:  # Qwen2-VL: a generated token is text
                    t["mm_token_type_ids"] = torch.cat([t["mm_token_type_ids"], torch.zeros_like(nxt)], 1)
    return torch.stack(out, 1)


@pytest.mark.parametrize("alpha, beta", [(1.0, 0.1), (30.0, 0.0)])
def test_vcd_matches_two_plain_forwards(lvlm, alpha, beta):
    batch = samples()
    tokens, ours = generate_fixed(lvlm, batch, [Vcd(cd_alpha=alpha, cd_beta=beta)], max_new_tokens=STEPS,
                                  return_scores=True)
    theirs = vcd_oracle(lvlm, batch, alpha, beta)
    finite = torch.isfinite(theirs)
    assert torch.equal(finite, torch.isfinite(ours))
    torch.testing.assert_close(ours[finite], theirs[finite], atol=5e-4, rtol=1e-4)
    assert torch.equal(tokens, theirs.argmax(-1))  # each step's chosen token is the formula's argmax
    plain, base = generate_fixed(lvlm, batch, [NoFix()], max_new_tokens=STEPS, return_scores=True)
    assert (ours[finite] - base[finite]).abs().max() > 1e-2  # the contrast moved the scores
    if beta == 0.0:
        assert not torch.equal(tokens, plain)  # and, strong and without the plausibility cut, the choices


def test_vcd_on_qwen2_vl_matches_two_plain_forwards():
    """The distorted branch repeats the image stream's own call (M-RoPE positions, token types) with other pixels:
    on Qwen2-VL's patch tensor and 3-D positions too."""
    qwen = headlab.load("tiny-qwen2-vl")
    a, b, _ = images()
    batch = [LvlmSample("Describe the image.", [a]), LvlmSample("What is shown in this picture?", [b])]
    tokens, ours = generate_fixed(qwen, batch, [Vcd(cd_alpha=30.0, cd_beta=0.0)], max_new_tokens=STEPS,
                                  return_scores=True)
    theirs = vcd_oracle(qwen, batch, 30.0, 0.0)
    torch.testing.assert_close(ours, theirs, atol=5e-4, rtol=1e-4)
    assert torch.equal(tokens, theirs.argmax(-1))
    assert not torch.equal(tokens, generate_fixed(qwen, batch, [NoFix()], max_new_tokens=STEPS))


def test_vcd_alpha_zero_is_plain_greedy(lvlm):
    batch = samples()
    plain, base = generate_fixed(lvlm, batch, [NoFix()], max_new_tokens=STEPS, return_scores=True)
    tokens, scores = generate_fixed(lvlm, batch, [Vcd(cd_alpha=0.0)], max_new_tokens=STEPS, return_scores=True)
    assert torch.equal(tokens, plain)
    kept = torch.isfinite(scores)
    assert torch.equal(kept, base.softmax(-1) >= 0.1 * base.softmax(-1).amax(-1, keepdim=True))
    torch.testing.assert_close(scores[kept], base[kept], atol=2e-4, rtol=1e-4)


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_vcd_leaves_the_model_bit_exact_and_is_no_step_of_other_methods(lvlm):
    """The distorted branch's forward is not a generation step: VHR records one head choice and the adaptive PAI
    one strength per generated token, with VCD beside them as without it."""
    batch = samples()
    before = {k: v.clone() for k, v in lvlm.model.state_dict().items()}
    attn, hooks = lvlm.model.config._attn_implementation, _hooks(lvlm.model)
    found: dict = {}
    tokens = generate_fixed(lvlm, batch, [Vhr(), Pai(adaptive="entropy"), Vcd()], max_new_tokens=3, found=found)
    assert tokens.shape == (3, 3) and len(found["vhr"]) == 3 and len(found["pai"]) == 3
    generate_fixed(lvlm, batch, [Vcd(), Pai(cfg=True)], max_new_tokens=2)  # two second passes side by side
    assert lvlm.model.config._attn_implementation == attn and _hooks(lvlm.model) == hooks
    assert all(torch.equal(v, lvlm.model.state_dict()[k]) for k, v in before.items())


def test_vcd_has_no_control_in_a_controlled_run():
    from headlab.analyses.hallucination_eval import HallucinationConfig

    config = HallucinationConfig(methods=["none", "vcd", "pai"], controls=True)
    config.check()
    assert [label for label, _, _ in config.labels()] == ["none", "vcd", "pai", "pai-control"]


# ---------------------------------------------------------------------------------------------------
# Adaptive strength (PAI, VAF)


def test_normalised_entropy_is_zero_for_one_hot_and_one_for_uniform():
    one_hot = torch.full((2, 50), float("-inf"))
    one_hot[:, 7] = 0.0
    assert torch.equal(normalised_entropy(one_hot), torch.zeros(2))
    torch.testing.assert_close(normalised_entropy(torch.zeros(2, 50)), torch.ones(2))
    two = torch.full((1, 50), float("-inf"))
    two[0, :2] = 0.0
    torch.testing.assert_close(normalised_entropy(two), torch.tensor([math.log(2) / math.log(50)]))


def test_score_edit_strength_is_per_sample(lvlm):
    """One ScoreBoost with strength [0, 1, 0.5]: sample 0 as with no boost, sample 1 as the full boost, sample 2
    as a boost of half the alpha; with a static ScoreScale on overlapping keys the two still compose."""
    inputs = build_inputs(lvlm, samples(), padding_side="left")
    keys = FixContext(lvlm, samples(), inputs).image_keys()
    heads = every_head([1, 2])

    def last_logits(*edits):
        with torch.no_grad(), headlab.intervene(lvlm, *edits):
            return lvlm.model(**inputs.tensors).logits[:, -1].float()

    mixed = last_logits(ScoreBoost(heads, keys=keys, alpha=40.0, rows="last", strength=torch.tensor([0.0, 1.0, 0.5])))
    for b, alpha in enumerate((0.0, 40.0, 20.0)):
        assert torch.equal(mixed[b], last_logits(ScoreBoost(heads, keys=keys, alpha=alpha, rows="last"))[b])
    assert (mixed[1] - mixed[0]).abs().max() > 1e-2  # the boost is visible at this alpha
    scale = ScoreScale(every_head([2]), gamma=0.5, keys=[(0, 20)], rows="last")
    composed = last_logits(ScoreBoost(heads, keys=keys, alpha=0.5, rows="last", strength=torch.ones(3)), scale)
    static = last_logits(ScoreBoost(heads, keys=keys, alpha=0.5, rows="last"), scale)
    torch.testing.assert_close(composed, static, atol=1e-5, rtol=1e-5)


def forced_scores(lvlm, methods, force: str):
    """Greedy generation with the model's next-token distribution forced one-hot (token 3) or uniform at every
    step (a forward hook on ``lm_head``): what an adaptive method reads as the previous step's signal is 0 or 1.
    Returns the model's real last-position logits of each step ``[batch, STEPS, vocab]`` (before the forcing)."""
    seen = []

    def hook(module, args, output):
        seen.append(output[:, -1].float().clone())
        forced = torch.zeros_like(output)
        if force == "one-hot":
            forced.fill_(float("-inf"))
            forced[..., 3] = 0.0
        return forced

    handle = lvlm.model.lm_head.register_forward_hook(hook)
    try:
        generate_fixed(lvlm, samples(), methods, max_new_tokens=STEPS)
    finally:
        handle.remove()
    return torch.stack(seen[-STEPS:], 1)  # an adaptive method's first forward is its prompt signal


@pytest.mark.parametrize("method", ["pai", "vaf"])
def test_adaptive_strength_is_zero_after_a_one_hot_step_and_full_after_a_uniform_one(lvlm, method):
    def fix(adaptive: str):
        if method == "pai":
            return Pai(alpha=40.0, adaptive=adaptive)
        return Vaf(image_scale=40.0, system_scale=0.1, adaptive=adaptive)

    for force in ("one-hot", "uniform"):
        unfixed = forced_scores(lvlm, [NoFix()], force)
        fixed = forced_scores(lvlm, [fix("off")], force)
        adaptive = forced_scores(lvlm, [fix("entropy")], force)
        assert (fixed - unfixed).abs().max() > 5e-3, "the fix must move the scores for the test to say anything"
        expected = unfixed if force == "one-hot" else fixed
        torch.testing.assert_close(adaptive, expected, atol=2e-4, rtol=1e-4)


def test_adaptive_strength_is_the_previous_steps_entropy(lvlm):
    batch = samples()
    found: dict = {}
    _, scores = generate_fixed(lvlm, batch, [Pai(alpha=40.0, adaptive="entropy")], max_new_tokens=STEPS,
                               return_scores=True, found=found)
    strengths = torch.stack(found["pai"], 1)  # [batch, step]
    inputs = build_inputs(lvlm, batch, padding_side="left")
    with torch.no_grad():
        prompt = normalised_entropy(lvlm.model(**inputs.tensors).logits[:, -1])
    torch.testing.assert_close(strengths[:, 0], prompt, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(strengths[:, 1:], normalised_entropy(scores[:, :-1]), atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------
# VAF's key span


def test_vaf_spans_differ_by_the_user_header_on_llava_smol():
    """Official VAF scales every key before the first image token; the system turn alone leaves out the user turn's
    header, which on llava-smol's template is ``<|im_start|>user\\n``."""
    smol = headlab.load("llava-smol", dtype="float32", device="cpu")
    batch = [LvlmSample("Describe the image.", [images()[0]]),
             LvlmSample("What is shown?", [images()[1]], system="Answer briefly.")]
    inputs = build_inputs(smol, batch, padding_side="left")
    before, system = vaf_span_keys(inputs, "before-image"), vaf_span_keys(inputs, "system")
    assert Vaf().span == "before-image"
    for b in range(len(batch)):
        (start, stop), = before[b]
        (s_start, s_stop), = system[b]
        assert start == s_start == 0 and stop == inputs.image_spans[b][0][0] and s_stop < stop
        first = int(inputs.first_real[b])
        between = inputs.input_ids[b, first + s_stop: first + stop]
        assert smol.text_tokenizer.decode(between) == "<|im_start|>user\n"
    # The fix's own edit: the keys scaled by system_scale are the default span's.
    ctx = FixContext(smol, batch, inputs)
    suppressed = Vaf().edits(ctx)[1].keys
    assert [sample.items for sample in suppressed.samples] == [tuple(spans) for spans in before]
