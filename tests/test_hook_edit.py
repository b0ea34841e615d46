"""``Hook(name, fn)``: edits at the points ``headlab.trace`` reads, by the same names, held to the head and
residual edits that do the same thing."""

from __future__ import annotations

import pytest
import torch

import headlab
from headlab.errors import InputError
from headlab.interventions import HeadScale, Hook, ResidualAdd

IDS = torch.tensor([[5, 9, 20, 33, 41, 7, 12, 60], [5, 9, 21, 30, 44, 8, 13, 61]])


@pytest.fixture(scope="module")
def loaded():
    return headlab.load("tiny-llama", dtype="float32", device="cpu")


def _logits(loaded, *edits):
    with torch.no_grad(), headlab.intervene(loaded, *edits):
        return loaded.model(IDS).logits


def test_resid_post_hook_equals_residual_add(loaded):
    vector = torch.randn(loaded.arch.hidden_size, generator=torch.Generator().manual_seed(0))
    hooked = _logits(loaded, Hook("blocks.2.hook_resid_post", lambda x: x + 2.0 * vector, rows="last"))
    added = _logits(loaded, ResidualAdd(2, vector, point="resid_post", scale=2.0, rows="last"))
    assert torch.equal(hooked, added)
    assert not torch.equal(hooked, _logits(loaded))


def test_z_hook_equals_head_scale(loaded):
    def silence_head_1(z):  # [batch, query, head, d_head]
        z = z.clone()
        z[:, :, 1] = 0
        return z

    hooked = _logits(loaded, Hook("blocks.1.attn.hook_z", silence_head_1))
    scaled = _logits(loaded, HeadScale([(1, 1)], alpha=0.0))
    torch.testing.assert_close(hooked, scaled, rtol=0, atol=1e-6)


def test_trace_reads_what_the_hook_wrote(loaded):
    name = "blocks.2.hook_mlp_out"
    with torch.no_grad(), headlab.intervene(loaded, Hook(name, torch.zeros_like)), \
            headlab.trace(loaded, names=[name]) as t:
        loaded.model(IDS)
    assert torch.count_nonzero(t[name]) == 0


def test_model_is_bit_exact_after_a_hook_even_on_error(loaded):
    clean = _logits(loaded)

    def broken(x):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), torch.no_grad(), \
            headlab.intervene(loaded, Hook("blocks.0.hook_resid_pre", broken)):
        loaded.model(IDS)
    assert torch.equal(_logits(loaded), clean)


@pytest.mark.parametrize(("name", "says"), [
    ("blocks.1.attn.hook_pattern", "can be read"),
    ("blocks.1.hook_attn_out", "can be read"),
    ("blocks.1.attn.hook_q", "can be read"),
    ("resid_post", "can be read"),
])
def test_names_that_cannot_be_replaced_are_refused(name, says):
    with pytest.raises(InputError, match=says):
        Hook(name, lambda x: x)


def test_bad_layer_and_bad_output_are_input_errors(loaded):
    with pytest.raises(InputError, match="layer 9 does not exist"):
        _logits(loaded, Hook("blocks.9.hook_resid_post", lambda x: x))
    with pytest.raises(InputError, match="expected a tensor of shape"):
        _logits(loaded, Hook("blocks.1.hook_resid_post", lambda x: x[..., :3]))


@pytest.mark.slow
def test_hooks_on_smollm2_equal_the_head_and_residual_edits(load_model):
    """On real weights: the unedited model is the control (the edits move the logits), and each Hook equals the
    edit it spells out, on the IOI prompt's last row."""
    smol = load_model("smollm2-135m")
    enc = smol.tokenizer("When Mary and John went to the store, John gave a drink to", return_tensors="pt")

    def logits(*edits):
        with torch.no_grad(), headlab.intervene(smol, *edits):
            return smol.model(**enc).logits[0, -1]

    clean = logits()
    vector = torch.randn(smol.arch.hidden_size, generator=torch.Generator().manual_seed(0))
    steered = logits(Hook("blocks.12.hook_resid_post", lambda x: x + 4.0 * vector, rows="last"))
    assert torch.equal(steered, logits(ResidualAdd(12, vector, point="resid_post", scale=4.0, rows="last")))

    def silence(z):  # [batch, query, head, d_head]: heads 0-2 of layer 23
        z = z.clone()
        z[:, :, :3] = 0
        return z

    silenced = logits(Hook("blocks.23.attn.hook_z", silence))
    torch.testing.assert_close(silenced, logits(HeadScale([(23, 0), (23, 1), (23, 2)], alpha=0.0)), rtol=0,
                               atol=1e-5)
    assert (steered - clean).abs().max() > 1e-2 and (silenced - clean).abs().max() > 1e-3
    assert torch.equal(logits(), clean)  # bit-exact after every block
