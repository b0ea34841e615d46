"""The LVLM fixes (analyses/lvlm_fixes.py) against a direct eager reimplementation of each method.

The oracle is an attention function of its own (registered with transformers as ``fix_oracle``): it
materialises the scores of every call, applies the method's formula where the papers' code does (image
columns, last row, layer ranges, φ-sinks found on the layer input at prefill, the vision tower's own
eager attention maps for PAINT) and takes the softmax itself. headlab's path (per-sample positions,
one ScoreEdit per call, VAR as a recombination of group partial outputs, the KV cache, the no-image
stream for guidance) must give the same scores at every generation step of a padded batch.
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
    NoFix,
    Pai,
    Paint,
    Vaf,
    Var,
    Vhr,
    generate_fixed,
    make_fix,
    paint_tokens,
    vaf_layers,
)
from headlab.errors import InputError
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
    image_scale, system_scale = 1.15, 0.95
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
    assert {"none", "pai", "paint", "vaf", "var", "vhr"} <= set(FIXES)
    assert isinstance(make_fix("pai", alpha=0.5), Pai) and make_fix("pai", alpha=0.5).alpha == 0.5
    with pytest.raises(InputError, match="unknown fix"):
        make_fix("vcd")
    with pytest.raises(InputError, match="fix pai"):
        make_fix("pai", strength=1)


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


def test_vaf_matches_eager_reimplementation(lvlm):
    assert vaf_layers(32) == [9, 10, 11, 12, 13, 14] and vaf_layers(lvlm.arch.n_layers) == [1, 2]
    def edit_of(inputs):
        edit = VafOracle(inputs, lvlm.arch.n_layers)
        edit.image_scale, edit.system_scale = 40.0, 0.1
        return edit

    _assert_changes_and_matches(lvlm, samples(), [Vaf(image_scale=40.0, system_scale=0.1)], edit_of)


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
