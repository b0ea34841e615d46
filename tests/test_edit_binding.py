"""Binding an edit to a model returns the state a run needs and leaves the edit as it was.

``edit.bind(arch)`` resolves heads, alphas, means, … for one model into a ``Bound``; ``headlab.intervene``
and the nnsight backend run those bindings. So an edit object is never tied to the last model it saw: it
comes out of ``intervene`` unchanged, and one object serves two models (different head counts) in turn and
inside nested blocks at once, each with its own resolution. The oracle for every edited forward is the
same edit built afresh and installed alone.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch

import headlab
from headlab.analyses import lvlm_fixes  # noqa: F401  (registers visual_redistribute in INTERVENTIONS)
from headlab.errors import InputError
from headlab.interventions import (
    INTERVENTIONS,
    AttentionOverride,
    Bound,
    BoundZEdit,
    HeadMeanAblate,
    HeadOffsets,
    HeadPatch,
    HeadScale,
    Hook,
    KeyKnockout,
    LayerPlan,
    Positions,
    Redistribute,
    ResidualAdd,
    Reweight,
    ScoreBoost,
    ScoreScale,
    ZEdit,
)
from headlab.interventions.z_site import ZCall
from headlab.probes import nnsight_backend as nb
from headlab.probes import trace

# Two rows of tiny-llama ids, the second right-padded (as in test_nnsight_backend).
IDS = torch.tensor([[256, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100],
                    [256, 65, 32, 99, 97, 116, 46, 257, 257, 257, 257, 257]])
MASK = torch.tensor([[1] * 12, [1] * 7 + [0] * 5])


def _output(loaded, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits ``[batch, position, vocab]`` (a decoder) or hidden states ``[batch, position, d_model]`` (minilm)."""
    with torch.no_grad():
        out = loaded.model(input_ids=ids, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out[0]


def _minilm_batch(loaded) -> tuple[torch.Tensor, torch.Tensor]:
    enc = loaded.text_tokenizer(["Attention sinks appear early in the network.", "A cat."], padding=True,
                                return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _z_source(loaded) -> object:
    """A trace of hook_z on every layer of another input of IDS's shape (HeadPatch / HeadMeanAblate source)."""
    other = IDS.clone()
    other[:, 1:6] = torch.tensor([66, 67, 68, 69, 70])
    with torch.no_grad(), trace(loaded, names=[f"blocks.{layer}.attn.hook_z" for layer in range(4)]) as t:
        loaded.model(input_ids=other, attention_mask=MASK)
    return t


def _builders(loaded) -> dict[str, Callable[[], object]]:
    """Every registered intervention, built with simple arguments for tiny-llama (4 layers x 4 heads, d 64)."""
    arch = loaded.arch
    source = _z_source(loaded)
    return {
        "head_scale": lambda: HeadScale([(1, None), (2, 3)], alpha=0.5),
        "head_mean_ablate": lambda: HeadMeanAblate([(1, 1), (3, None)], source=source),
        "head_patch": lambda: HeadPatch([(2, 0), (3, None)], source=source, rows=(1, 5)),
        "head_offsets": lambda: HeadOffsets.create(arch, [(1, 0), (3, None)], init="normal", std=0.3,
                                                   generator=torch.Generator().manual_seed(0)),
        "score_boost": lambda: ScoreBoost([(1, None)], keys=[0, 1], alpha=0.5, rows="from:2"),
        "score_scale": lambda: ScoreScale([(2, 1)], gamma=1.5, keys="from:1"),
        "reweight": lambda: Reweight([(1, 0), (2, None)], groups=[([0], 0.5), ([2, 3], 2.0)], rest=0.8),
        "key_knockout": lambda: KeyKnockout([(1, None)], keys=[0]),
        "attention_override": lambda: AttentionOverride([(2, 2)], keys=[1, 2]),
        "redistribute": lambda: Redistribute([(1, None)], sources=[0], targets=[1, 2, 3], p=0.3),
        "residual_add": lambda: ResidualAdd(1, torch.randn(arch.hidden_size,
                                                           generator=torch.Generator().manual_seed(1)), scale=2.0),
        "hook": lambda: Hook("blocks.1.hook_resid_post", lambda x: 0.5 * x, rows="last"),
        "visual_redistribute": lambda: lvlm_fixes.VisualRedistribute(
            2, Positions.of("all"), p=0.3, summ=0.0, rho=0.0, text_sinks=Positions.of([0]),
            visual_sinks=Positions.of([1]), image_rest=Positions.of([2, 3, 4]), n_image=torch.tensor([4, 4]),
            has_visual_sink=torch.tensor([True, True])),
    }


_PLAIN = (list, tuple, dict, str, int, float, bool, type(None), Positions)


def _snapshot(edit) -> dict:
    """Every attribute of ``edit`` beside a copy: tensors cloned, plain values deep-copied; other objects (a
    Trace) are kept as they are, and must stay the same object."""
    out = {}
    for name, value in vars(edit).items():
        if isinstance(value, torch.Tensor):
            out[name] = (value, value.detach().clone())
        elif isinstance(value, _PLAIN):
            out[name] = (value, copy.deepcopy(value))
        else:
            out[name] = (value, value)
    return out


def _assert_unchanged(edit, before: dict) -> None:
    now = vars(edit)
    assert set(now) == set(before), f"{type(edit).__name__} gained {set(now) - set(before)}"
    for name, (obj, saved) in before.items():
        assert now[name] is obj, f"{type(edit).__name__}.{name} was replaced"
        if isinstance(saved, torch.Tensor):
            assert torch.equal(now[name].detach(), saved), f"{type(edit).__name__}.{name} was written"
        elif saved is not obj:
            assert now[name] == saved, f"{type(edit).__name__}.{name} was changed"


def test_every_registered_intervention_is_unchanged_by_intervene(load_model):
    loaded = load_model("tiny-llama")
    builders = _builders(loaded)
    # Composed interventions (the LVLM fixes) run per batch of images through generate_fixed, not intervene.
    plain = {name for name, cls in INTERVENTIONS.items() if cls.site != "composed"}
    assert set(builders) == plain, "a registered intervention has no builder here: add one"
    clean = _output(loaded, IDS, MASK)
    for name, build in builders.items():
        edit = build()
        before = _snapshot(edit)
        edit.validate(loaded.arch)  # only checks
        _assert_unchanged(edit, before)
        with headlab.intervene(loaded, edit) as active:
            edited = _output(loaded, IDS, MASK)
            assert [b.edit for b in active.bound] == [edit]
        assert not torch.equal(edited, clean), f"{name} must change the forward"
        _assert_unchanged(edit, before)


def test_bind_returns_the_resolution_and_validate_only_checks(load_model):
    llama, minilm = load_model("tiny-llama"), load_model("minilm")  # 4 x 4 heads, 6 x 12 heads
    edit = HeadScale([(1, None), (2, 3)], alpha=0.5)
    small, large = edit.bind(llama.arch), edit.bind(minilm.arch)
    assert isinstance(small, BoundZEdit) and small.edit is edit
    assert small.heads_of(1) == [0, 1, 2, 3] and large.heads_of(1) == list(range(12))
    assert len(small.state["alpha"]) == 5 and len(large.state["alpha"]) == 13
    assert edit.layers() == [1, 2] == small.layers()
    with pytest.raises(TypeError):
        small.state["alpha"] = {}  # read-only: a site cannot rewrite its resolution
    with pytest.raises(InputError, match="head 7 of layer 1 does not exist"):
        HeadScale([(1, 7)], alpha=0.0).validate(llama.arch)
    HeadScale([(1, 7)], alpha=0.0).validate(minilm.arch)
    # Alphas per head are counted on the model: four on tiny-llama's layer, twelve on minilm's.
    per_head = HeadScale([(0, None)], alpha=[1.0, 2.0, 3.0, 4.0])
    per_head.bind(llama.arch)
    with pytest.raises(InputError, match="4 alphas for 12 heads"):
        per_head.validate(minilm.arch)
    assert vars(per_head) == {"heads": [(0, None)], "alpha": [1.0, 2.0, 3.0, 4.0], "rows": "all"}


def _fresh_edits() -> list[Callable[[], object]]:
    """Edits naming every head of a layer: their resolution depends on the model's head count."""
    return [lambda: HeadScale([(1, None), (0, 2)], alpha=0.0),
            lambda: ScoreBoost([(1, None)], keys=[0, 1], alpha=0.7),
            lambda: KeyKnockout([(2, None)], keys=[0])]


@pytest.mark.parametrize("which", range(3))
def test_one_edit_on_two_models_in_turn(load_model, which):
    llama, minilm = load_model("tiny-llama"), load_model("minilm")
    m_ids, m_mask = _minilm_batch(minilm)
    build = _fresh_edits()[which]
    edit = build()
    before = _snapshot(edit)
    results = []
    for loaded, ids, mask in ((llama, IDS, MASK), (minilm, m_ids, m_mask), (llama, IDS, MASK)):
        with headlab.intervene(loaded, edit):
            results.append(_output(loaded, ids, mask))
        with headlab.intervene(loaded, build()):
            expected = _output(loaded, ids, mask)
        assert torch.equal(results[-1], expected)
        assert not torch.equal(expected, _output(loaded, ids, mask)), "the edit must change something"
    assert torch.equal(results[0], results[2])
    _assert_unchanged(edit, before)


# z edits: their hooks sit on each model's own modules. (Attention-site edits of two models cannot be nested:
# the editor in force, kernels.attention_function.active_editor(), holds one model's attention edits at a time.)
NESTED = [lambda: HeadScale([(1, None), (0, 2)], alpha=0.0),
          lambda: HeadScale([(2, None)], alpha=-1.5, rows="from:2")]


@pytest.mark.parametrize("which", range(len(NESTED)))
def test_one_edit_on_two_models_at_once(load_model, which):
    """Nested blocks on two models share the edit object; each model runs its own resolution."""
    llama, minilm = load_model("tiny-llama"), load_model("minilm")
    m_ids, m_mask = _minilm_batch(minilm)
    build = NESTED[which]
    with headlab.intervene(llama, build()):
        expected_llama = _output(llama, IDS, MASK)
    with headlab.intervene(minilm, build()):
        expected_minilm = _output(minilm, m_ids, m_mask)
    edit = build()
    before = _snapshot(edit)
    with headlab.intervene(llama, edit):
        with headlab.intervene(minilm, edit):
            # The inner binding (12 heads a layer) must not leak into the outer one (4 heads), nor back.
            assert torch.equal(_output(llama, IDS, MASK), expected_llama)
            assert torch.equal(_output(minilm, m_ids, m_mask), expected_minilm)
        assert torch.equal(_output(llama, IDS, MASK), expected_llama)
    _assert_unchanged(edit, before)


def test_the_same_edit_nested_on_one_model_is_not_a_conflict(load_model):
    llama = load_model("tiny-llama")
    patch = HeadPatch([(2, None)], source=_z_source(llama))
    with headlab.intervene(llama, patch):
        expected = _output(llama, IDS, MASK)
        with headlab.intervene(llama, patch):  # two bindings of one edit: one edit, no claim against itself
            assert torch.equal(_output(llama, IDS, MASK), expected)
    with pytest.raises(InputError, match="both replace z"):
        with headlab.intervene(llama, patch, HeadPatch([(2, 1)], source=patch.source)):
            pass


def test_layer_plan_compiles_bound_edits(load_model):
    arch = load_model("tiny-llama").arch
    edits = [AttentionOverride([(1, 0)], keys=[0]), KeyKnockout([(1, None)], keys=[0])]
    bound = LayerPlan(1, [e.bind(arch) for e in edits], arch.n_heads)
    assert bound.needed_cells == [0, 2, 3]
    assert [h.tolist() for h in bound.post_heads] == [[0], [0, 1, 2, 3]]


# --- the nnsight runtime applies the bound edits' own method ----------------------------------------------

def _nnsight_edits(loaded) -> list[list]:
    source = _z_source(loaded)
    offsets = HeadOffsets.create(loaded.arch, [(1, 0), (2, 3), (3, None)], init="normal", std=0.3,
                                 generator=torch.Generator().manual_seed(0))
    return [[HeadScale([(0, 1), (2, None)], alpha=0.0)],
            [HeadScale([(1, 2), (3, 0)], alpha=[2.5, -1.0], rows="last")],
            [offsets],
            [HeadPatch([(2, 0), (3, None)], source=source, rows=(1, 5))],
            [HeadScale([(0, 1)], alpha=3.0), offsets, HeadPatch([(3, 1)], source=source, rows="from:2")]]


@pytest.mark.parametrize("remote", [False, "local"])
def test_nnsight_z_edits_equal_intervene_and_leave_the_edits_unchanged(load_model, remote):
    loaded = load_model("tiny-llama")
    clean = _output(loaded, IDS, MASK)
    for edits in _nnsight_edits(loaded):
        with headlab.intervene(loaded, *edits):
            expected = _output(loaded, IDS, MASK)
        before = [_snapshot(e) for e in edits]
        got = nb.z_edited_logits(loaded, *edits, input_ids=IDS, attention_mask=MASK, remote=remote)
        assert not torch.equal(expected, clean), "the edit must change something"
        assert torch.equal(got, expected), [e.describe() for e in edits]
        for edit, saved in zip(edits, before, strict=True):
            _assert_unchanged(edit, saved)


class Negate(ZEdit):
    """A z edit nnsight_backend has never heard of: z <- -z on the chosen heads and rows."""

    def __init__(self, heads, rows="all"):
        self.heads, self.rows = heads, rows

    def edit_z(self, z: torch.Tensor, call: ZCall, bound: Bound) -> torch.Tensor:
        heads = bound.heads_of(call.layer)
        return self._where(z, -z[:, :, heads], call, heads)


def test_a_new_z_edit_runs_through_nnsight_by_its_own_method(load_model):
    loaded = load_model("tiny-llama")
    edit = Negate([(1, None), (3, 2)], rows="last")
    with headlab.intervene(loaded, edit):
        expected = _output(loaded, IDS, MASK)
    assert not torch.equal(expected, _output(loaded, IDS, MASK))
    assert torch.equal(nb.z_edited_logits(loaded, edit, input_ids=IDS, attention_mask=MASK), expected)
    # Without headlab on the server an edit needs its plain-tensor form, which Negate does not give.
    with pytest.raises(InputError, match="Negate is not a per-element scale and shift"):
        nb.z_edited_logits(loaded, edit, input_ids=IDS, attention_mask=MASK, remote="local")
