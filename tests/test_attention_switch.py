"""The one switch into headlab's attention function (``headlab.kernels.attention_function.headlab_attention``).

A probe, an ``intervene`` block, a trace and the eager rollout all switch through it: nested in any order they
give back exactly the implementation in force before (on error too), the model's logits are bit-exact after,
a probe sees the edited attention wherever it sits relative to ``intervene``, and probes/ and interventions/
meet only in kernels/, not in each other.
"""

from __future__ import annotations

import contextlib
import itertools

import import_graph
import pytest
import torch
from conftest import TEXT

import headlab
from headlab.interventions import KeyKnockout, ScoreBoost
from headlab.kernels.attention_function import (
    ATTN_IMPLEMENTATION,
    active_editor,
    active_patterns,
    active_reader,
    headlab_attention,
    other_attention,
)
from headlab.probes import AttentionProbe
from headlab.probes.position import eager_attention

PATTERN = "blocks.1.attn.hook_pattern"


def encode(loaded, texts=TEXT[:2]):
    return loaded.text_tokenizer(texts, return_tensors="pt", padding=True)


def blocks(loaded) -> dict[str, contextlib.AbstractContextManager]:
    """Fresh context managers of every kind that switches the attention implementation."""
    return {
        "probe": AttentionProbe(loaded, backend="torch"),
        "intervene": headlab.intervene(loaded, ScoreBoost([(1, None)], keys=[0], alpha=0.5)),
        "trace": headlab.trace(loaded, [PATTERN], stats=False),
        "eager": eager_attention(loaded.model),
    }


def implementation(loaded) -> str:
    return loaded.model.config._attn_implementation


@pytest.mark.parametrize("start", ["sdpa", "eager"])
@pytest.mark.parametrize("order", list(itertools.permutations(["probe", "intervene", "trace", "eager"])))
def test_nesting_in_any_order_restores_the_implementation(load_model, order, start):
    loaded = load_model("tiny-llama")
    enc = encode(loaded)
    loaded.model.set_attn_implementation(start)
    try:
        with torch.no_grad():
            before = loaded.model(**enc).logits
            made = blocks(loaded)
            seen: list[str] = []  # the implementation before entering each level
            with contextlib.ExitStack() as stack:
                for name in order:
                    seen.append(implementation(loaded))
                    # Each level restores the implementation it found: checked as the levels unwind.
                    stack.callback(lambda want=seen[-1], name=name: _check_restored(loaded, want, name))
                    stack.enter_context(made[name])
                    assert implementation(loaded) == ("eager" if name == "eager" else ATTN_IMPLEMENTATION)
                loaded.model(**enc)
            after = loaded.model(**enc).logits
        assert implementation(loaded) == start
        assert active_reader() is None and active_editor() is None and active_patterns() is None
        assert torch.equal(before, after)
    finally:
        loaded.model.set_attn_implementation("sdpa")


def _check_restored(loaded, want: str, name: str) -> None:
    assert implementation(loaded) == want, f"{name} did not give back {want}"


@pytest.mark.parametrize("name", ["probe", "intervene", "trace", "eager"])
@pytest.mark.parametrize("inside", [None, "probe", "intervene"])
def test_restored_on_error(load_model, name, inside):
    loaded = load_model("tiny-llama")
    enc = encode(loaded)
    made = blocks(loaded)
    with torch.no_grad():
        before = loaded.model(**enc).logits
        with contextlib.ExitStack() as outer:
            if inside is not None:
                outer.enter_context(made[inside])
            found = implementation(loaded)
            reader, editor, patterns = active_reader(), active_editor(), active_patterns()
            with pytest.raises(RuntimeError, match="boom"), made[name] if name != inside else blocks(loaded)[name]:
                loaded.model(**enc)
                raise RuntimeError("boom")
            assert implementation(loaded) == found
            assert (active_reader(), active_editor(), active_patterns()) == (reader, editor, patterns)
        after = loaded.model(**enc).logits
    assert implementation(loaded) == "sdpa"
    assert active_reader() is None and active_editor() is None and active_patterns() is None
    assert torch.equal(before, after)


def test_the_switch_itself_nests_and_leaves_participants_alone(load_model):
    loaded = load_model("tiny-llama")
    model = loaded.model
    marker = object()  # a participant is only held and handed back: any object will do here
    with headlab_attention(model, reader=marker):
        assert implementation(loaded) == ATTN_IMPLEMENTATION and active_reader() is marker
        with other_attention(model, "eager", detached=True):
            assert implementation(loaded) == "eager" and active_reader() is None
        assert implementation(loaded) == ATTN_IMPLEMENTATION and active_reader() is marker
        with headlab_attention(model):  # nothing given: the enclosing reader stays
            assert active_reader() is marker
        with pytest.raises(KeyError), other_attention(model, "sdpa"):
            assert implementation(loaded) == "sdpa"
            raise KeyError("boom")
        assert implementation(loaded) == ATTN_IMPLEMENTATION and active_reader() is marker
    assert implementation(loaded) == "sdpa" and active_reader() is None


def test_probe_sees_the_edited_attention_inside_and_outside_intervene(load_model):
    loaded = load_model("tiny-llama")
    enc = encode(loaded)
    edits = (ScoreBoost([(1, None)], keys=[0], alpha=0.9), KeyKnockout([(2, 0)], keys=[0], rows="from:3"))
    with torch.no_grad():
        with AttentionProbe(loaded, backend="eager") as plain:
            loaded.model(**enc)
        # Probe inside intervene, and the pattern oracle (eager, edited) beside it.
        with headlab.intervene(loaded, *edits), AttentionProbe(loaded, backend="eager") as inside, \
                headlab.trace(loaded, [PATTERN, "blocks.2.attn.hook_pattern"], stats=False) as t:
            loaded.model(**enc)
        # Probe outside intervene: the same edited call.
        with AttentionProbe(loaded, backend="eager") as outside, headlab.intervene(loaded, *edits):
            loaded.model(**enc)
    rows = inside.last[1].row_counted  # [batch, query]
    pattern = t[PATTERN]  # [batch, head, query, key] with the score edit
    entropy = torch.special.entr(pattern).sum(-1)
    torch.testing.assert_close(inside.last[1].entropy.transpose(1, 2)[rows], entropy.transpose(1, 2)[rows],
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inside.last[1].first_mass.transpose(1, 2)[rows],
                               pattern[..., 0].transpose(1, 2)[rows], atol=1e-5, rtol=1e-5)
    key_mass = (pattern * rows[:, None, :, None]).sum(2)  # [batch, head, key]
    torch.testing.assert_close(inside.last[1].key_mass, key_mass, atol=1e-5, rtol=1e-5)
    assert (inside.last[1].first_mass - plain.last[1].first_mass).transpose(1, 2)[rows].abs().max() > 1e-3
    knocked = t["blocks.2.attn.hook_pattern"][:, 0]  # [batch, query, key], head 0 knocked out from row 3
    torch.testing.assert_close(inside.last[2].first_mass[:, 0][rows], knocked[..., 0][rows], atol=1e-5, rtol=1e-5)
    for layer in inside.last:  # the order of the blocks does not matter: the same numbers, bit for bit
        for field in ("lse", "entropy", "key_mass", "first_mass"):
            assert torch.equal(getattr(inside.last[layer], field), getattr(outside.last[layer], field)), (layer, field)


def test_probes_and_interventions_do_not_import_each_other():
    graph = import_graph.edges()

    def between(source: str, target: str) -> set[tuple[str, str]]:
        return {(a, b) for a, targets in graph.items() if a.startswith(source) for b in targets
                if b.startswith(target)}

    assert between("headlab.interventions", "headlab.probes") == set()
    # Only the nnsight runtime takes from interventions, and not for attention switching: it binds and applies
    # headlab's z edits itself, as intervene does locally. The call layout and positions live in kernels.
    allowed = {("headlab.probes.nnsight_backend", "headlab.interventions.base"),
               ("headlab.probes.nnsight_backend", "headlab.interventions.context"),
               ("headlab.probes.nnsight_backend", "headlab.interventions.z_site")}
    assert between("headlab.probes", "headlab.interventions") <= allowed
    # The attention function and the switch sit below both and import neither.
    below = graph["headlab.kernels.attention_function"]
    assert not {b for b in below if b.startswith(("headlab.probes", "headlab.interventions"))}
    assert "headlab.kernels.attention_function" in graph["headlab.probes.attention"]
    assert "headlab.kernels.attention_function" in graph["headlab.interventions.context"]
