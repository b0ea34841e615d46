"""The nnsight backend against headlab's own path: statistics, z-site edits, analyses, the remote path.

The oracle is headlab's native statistics (the torch backend of its fused attention function, itself
checked against eager attention in test_probe_vs_eager) and ``headlab.intervene``. Nothing here touches
the network: the remote path runs as nnsight's serialised dry run (``remote="local"``: the trace is
pickled as for NDIF and unpickled with headlab's modules hidden) or against a fake trace.
"""

from __future__ import annotations

import ast
import builtins
from pathlib import Path

import pytest
import torch

import headlab
from headlab.errors import InputError
from headlab.interventions import HeadMeanAblate, HeadOffsets, HeadPatch, HeadScale, KeyKnockout
from headlab.kernels import StatsRequest
from headlab.probes import AttentionProbe, remote_probe, trace
from headlab.probes import nnsight_backend as nb

# What an NDIF server lets trace code import (the brief's list; stricter than nnsight's own dry run).
WHITELIST = {"torch", "numpy", "math", "collections", "typing", "einops", "pandas", "enum"}
REMOTE_PROBE = Path(remote_probe.__file__)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows, the second right-padded (padding keys and padding query rows must not count)."""
    ids = torch.tensor([[256, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100],
                        [256, 65, 32, 99, 97, 116, 46, 257, 257, 257, 257, 257]])
    mask = torch.tensor([[1] * 12, [1] * 7 + [0] * 5])
    return ids, mask


def _native(loaded, ids, mask, request=None):
    with torch.no_grad(), AttentionProbe(loaded, backend="torch", request=request) as probe:
        out = loaded.model(input_ids=ids, attention_mask=mask)
    return probe.last, out.logits if hasattr(out, "logits") else out[0]


def _assert_same_stats(native, got, layers, atol=2e-6):
    for layer in layers:
        a, b = native[layer], got[layer]
        assert torch.equal(a.row_counted, b.row_counted) and torch.equal(a.first_key, b.first_key)
        assert torch.equal(a.key_count, b.key_count)
        torch.testing.assert_close(b.key_mass, a.key_mass, rtol=0, atol=atol)
        counted = a.row_counted[:, None, :].expand_as(a.lse)
        for name in ("lse", "entropy", "first_mass"):
            torch.testing.assert_close(getattr(b, name)[counted], getattr(a, name)[counted], rtol=0, atol=atol)
        if a.distance_mass is not None:
            assert torch.equal(a.distance_count, b.distance_count)
            torch.testing.assert_close(b.distance_mass, a.distance_mass, rtol=0, atol=atol)


# --- the remote probe's code: whitelisted imports only ---------------------------------------------------

def _guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
    if level or name.split(".")[0] not in WHITELIST:
        raise ImportError(f"{name!r} is not whitelisted on the remote server")
    return builtins.__import__(name, globals, locals, fromlist, level)


def _exec_guarded(source: str, filename: str) -> dict:
    guarded = dict(vars(builtins), __import__=_guarded_import)
    namespace = {"__builtins__": guarded, "__name__": "remote_probe_sandbox"}
    exec(compile(source, filename, "exec"), namespace)
    return namespace


def test_the_import_hook_refuses_what_a_server_refuses():
    for line in ("import dataclasses", "import functools", "from abc import ABC", "import headlab",
                 "from __future__ import annotations", "from . import remote_probe"):
        with pytest.raises(ImportError):
            _exec_guarded(line, "<check>")
    assert "torch" in _exec_guarded("import torch, math, collections", "<check>")


def test_remote_probe_imports_only_whitelisted_modules_and_runs_so():
    source = REMOTE_PROBE.read_text()
    imported = {alias.name for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)}
    assert imported <= WHITELIST, imported - WHITELIST
    assert not any(isinstance(node, ast.ClassDef) for node in ast.walk(ast.parse(source)))
    sandbox = _exec_guarded(source, str(REMOTE_PROBE))  # the whole module executes under the hook
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 9, 8), torch.randn(2, 2, 9, 8)
    padding = torch.ones(2, 9, dtype=torch.bool)
    padding[1, 6:] = False
    ours = sandbox["attention_statistics"](q, k, None, 0.3, padding, None, True, True, 4)
    reference = remote_probe.attention_statistics(q, k, None, 0.3, padding, None, True, True, 4)
    for name, value in reference.items():
        assert torch.equal(ours[name], value), name
    x = torch.randn(2, 9, 32)
    selected = torch.rand(2, 9, 4) > 0.5
    scale, shift = torch.rand(4, 8), torch.rand(4, 8)
    edited = sandbox["edit_z"](x, 4, selected, scale, shift, True)
    assert torch.equal(edited, remote_probe.edit_z(x, 4, selected, scale, shift, True))
    z, new = x.view(2, 9, 4, 8), edited.view(2, 9, 4, 8)
    assert torch.equal(new[~selected], z[~selected])  # only where selected ...
    torch.testing.assert_close(new[selected], ((1 + scale) * z + shift)[selected])  # ... (1 + A) z + v


def test_remote_probe_against_eager_probabilities():
    """Hand oracle: softmax of masked scores, with GQA, a sink logit and chunks smaller than the input."""
    torch.manual_seed(1)
    q, k = torch.randn(1, 4, 7, 8), torch.randn(1, 2, 7, 8)
    sinks = torch.tensor([0.5, -1.0, 0.0, 2.0])
    got = remote_probe.attention_statistics(q, k, None, 0.35, None, sinks, True, False, 3)
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(2, dim=1)) * 0.35
    scores = scores.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
    full = torch.cat([scores, sinks.view(1, 4, 1, 1).expand(1, 4, 7, 1)], dim=-1)
    probs = torch.softmax(full, dim=-1)[..., :7]
    torch.testing.assert_close(got["lse"], torch.logsumexp(full, dim=-1))
    torch.testing.assert_close(got["key_mass"], probs.sum(2))
    torch.testing.assert_close(got["first_mass"], probs[..., 0])
    torch.testing.assert_close(got["entropy"], torch.special.entr(probs).sum(-1))
    assert torch.equal(got["key_count"][0], torch.arange(7, 0, -1).float())  # queries that see key j: 7 - j


# --- statistics through nnsight equal headlab's own ------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3", "tiny-gpt2"])
def test_nnsight_statistics_equal_native(load_model, name):
    loaded = load_model(name)
    ids, mask = _batch()
    request = StatsRequest(distance=True)
    native, logits = _native(loaded, ids, mask, request)
    run = nb.run_trace(loaded, ids, mask, layers=range(loaded.arch.n_layers), request=request, chunk_rows=5)
    _assert_same_stats(native, run.stats, range(loaded.arch.n_layers))
    torch.testing.assert_close(run.logits, logits, rtol=0, atol=1e-5)


def test_remote_dry_run_gives_the_same_statistics(load_model):
    """remote="local": the trace is serialised as for NDIF and run with headlab's modules hidden."""
    loaded = load_model("tiny-llama")
    ids, mask = _batch()
    native, _ = _native(loaded, ids, mask)
    run = nb.run_trace(loaded, ids, mask, layers=[0, 2, 3], remote="local")
    assert sorted(run.stats) == [0, 2, 3]
    _assert_same_stats(native, run.stats, [0, 2, 3])


def test_probe_protocol_and_refusals(load_model):
    loaded = load_model("tiny-qwen3")
    ids, mask = _batch()
    native, _ = _native(loaded, ids, mask)
    seen = []
    nb.NnsightProbe(loaded, lambda layer, stats: seen.append((layer, stats)), layers=[1, 3]).forward(ids, mask)
    assert [layer for layer, _ in seen] == [1, 3]
    _assert_same_stats(native, dict(seen), [1, 3])
    with pytest.raises(InputError, match="key groups"):
        nb.NnsightProbe(loaded, request=StatsRequest(key_groups=torch.zeros(2, 12, dtype=torch.long)))
    with pytest.raises(InputError, match="layer 9 does not exist"):
        nb.run_trace(loaded, ids, mask, layers=[9])


# --- z-site edits through nnsight equal headlab.intervene ------------------------------------------------

def _edit_sets(loaded, source_trace):
    offsets = HeadOffsets.create(loaded.arch, [(1, 0), (2, 3), (3, None)], init="normal", std=0.3,
                                 generator=torch.Generator().manual_seed(0))
    return [
        [HeadScale([(0, 1), (2, None)], alpha=0.0)],
        [HeadScale([(1, 2), (3, 0)], alpha=[2.5, -1.0], rows="last")],
        [HeadMeanAblate([(1, 1), (3, 2)], source=source_trace)],
        [offsets],
        [HeadPatch([(2, 0), (3, None)], source=source_trace, rows=(1, 5))],
        [HeadScale([(0, 1)], alpha=3.0), offsets, HeadPatch([(3, 1)], source=source_trace, rows="from:2")],
    ]


@pytest.mark.parametrize("remote", [False, "local"])
def test_z_edits_give_the_logits_of_intervene(load_model, remote):
    loaded = load_model("tiny-llama")
    ids, mask = _batch()
    other = ids.clone()
    other[:, 1:6] = torch.tensor([66, 67, 68, 69, 70])
    with torch.no_grad(), trace(loaded, names=[f"blocks.{layer}.attn.hook_z" for layer in range(4)]) as t:
        loaded.model(input_ids=other, attention_mask=mask)
    with torch.no_grad():
        clean = loaded.model(input_ids=ids, attention_mask=mask).logits
    for edits in _edit_sets(loaded, t):
        with torch.no_grad(), headlab.intervene(loaded, *edits):
            expected = loaded.model(input_ids=ids, attention_mask=mask).logits
        got = nb.z_edited_logits(loaded, *edits, input_ids=ids, attention_mask=mask, remote=remote)
        assert not torch.equal(expected, clean), "the edit must change something"
        assert torch.equal(got, expected), [e.describe() for e in edits]
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=ids, attention_mask=mask).logits, clean), "model left as it was"


def test_attention_site_edits_are_refused(load_model):
    loaded = load_model("tiny-llama")
    ids, mask = _batch()
    with pytest.raises(InputError, match="attention function, which NDIF does not run"):
        nb.z_edited_logits(loaded, KeyKnockout([(0, None)], keys=1), input_ids=ids, attention_mask=mask)


# --- the analyses, unchanged, on the nnsight stand-in ----------------------------------------------------

PROMPTS = ["The quick brown fox jumps over the lazy dog near the river bank.", "Attention sinks appear early.",
           "def f(x):\n    return x * 2"]


@pytest.mark.parametrize("remote", [False, "local"])
def test_sinks_analysis_through_nnsight_equals_native(load_model, remote):
    from headlab.analyses.sinks import SinksConfig, analyze_sinks

    loaded = load_model("tiny-llama")
    config = SinksConfig(max_tokens=24, batch_size=2, pattern_prompts=0 if remote else 3)
    native = analyze_sinks(loaded, PROMPTS, config, progress=False)
    wrapped = nb.with_nnsight(loaded, remote=remote)
    through = analyze_sinks(wrapped, PROMPTS, config, progress=False)
    for name, value in native.tensors.items():
        other = through.tensors[name]
        if value.is_floating_point():
            torch.testing.assert_close(other, value, rtol=0, atol=1e-6, equal_nan=True, msg=name)
        else:
            assert torch.equal(other, value), name
    # Residual and layer-parts probes: hooks fired locally, or replayed on what the dry run brought back.
    for table in ("residual_norms", "secondary_sink_windows", "sink_formation"):
        assert native.tables[table].round(5).equals(through.tables[table].round(5)), table
    assert isinstance(wrapped.model, nb.NnsightModel) and loaded.model.config._attn_implementation == "sdpa"


def test_position_bias_through_nnsight_equals_native(load_model):
    from headlab.analyses.position_bias import PositionBiasConfig, analyze_position_bias

    loaded = load_model("tiny-qwen3")
    config = PositionBiasConfig(max_tokens=24, batch_size=2, rollout_tokens=12, rollout_prompts=1,
                                retrieval_trials=1)
    native = analyze_position_bias(loaded, PROMPTS, config, progress=False)
    through = analyze_position_bias(nb.with_nnsight(loaded), PROMPTS, config, progress=False)
    for name, value in native.tensors.items():
        torch.testing.assert_close(through.tensors[name].double(), value.double(), rtol=0, atol=1e-5,
                                   equal_nan=True, msg=name)
    assert native.summary["retrieval_mean_logprob"] == through.summary["retrieval_mean_logprob"]


# --- the remote path's plumbing, without a network ------------------------------------------------------

class _FakeEnvoy:
    """Records what a trace was opened with and stops there (no model, no network)."""

    def __init__(self):
        self.calls = []

    def trace(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return _Stop()


class _Stop:
    def __enter__(self):
        raise RuntimeError("stopped before running")

    def __exit__(self, *exc):
        return False


def test_remote_needs_a_key_before_any_compute(load_model, monkeypatch):
    loaded = load_model("tiny-llama")
    monkeypatch.delenv(nb.NDIF_KEY_ENV, raising=False)
    monkeypatch.setattr(nb, "envoy_of", lambda *a, **k: pytest.fail("nothing may be built without a key"))
    ids, mask = _batch()
    with pytest.raises(InputError, match="NDIF_API_KEY"):
        nb.run_trace(loaded, ids, mask, layers=[0], remote=True)
    with pytest.raises(InputError, match="NDIF_API_KEY"):
        nb.check_remote("meta-llama/Llama-3.1-8B", True)
    monkeypatch.setenv(nb.NDIF_KEY_ENV, "k-123")
    with pytest.raises(InputError, match="hub id"):
        nb.check_remote("tiny-llama", True)
    nb.check_remote("meta-llama/Llama-3.1-8B", True)


def test_remote_trace_gets_remote_true_the_key_and_plain_inputs(load_model, monkeypatch):
    import nnsight

    loaded = load_model("tiny-llama")
    fake = _FakeEnvoy()
    monkeypatch.setenv(nb.NDIF_KEY_ENV, "k-123")
    monkeypatch.setattr(nb, "envoy_of", lambda loaded_, remote: fake if remote is True else pytest.fail(remote))
    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", None)
    ids, mask = _batch()
    with pytest.raises(RuntimeError, match="stopped before running"):
        nb.run_trace(loaded, ids, mask, remote=True)
    ((args, kwargs),) = fake.calls
    assert kwargs == {"remote": True}
    (inputs,) = args
    assert torch.equal(inputs["input_ids"], ids) and torch.equal(inputs["attention_mask"], mask)
    # headlab's forward counts positions 0..T-1 in every row; nnsight would derive them from the mask.
    assert torch.equal(inputs["position_ids"], torch.arange(12).expand(2, -1))
    assert nnsight.CONFIG.API.APIKEY == "k-123"


def test_a_local_hook_edit_is_refused_on_the_remote_path(load_model):
    """z-site hooks of headlab.intervene cannot reach a server: the replay refuses them instead of dropping them."""
    loaded = load_model("tiny-llama")
    wrapped = nb.with_nnsight(loaded, remote="local")
    ids, mask = _batch()
    with pytest.raises(InputError, match="edits the forward"), torch.no_grad(), \
            headlab.intervene(wrapped, HeadScale([(1, 0)], alpha=0.0)):
        wrapped.model(input_ids=ids, attention_mask=mask)


@pytest.mark.slow
def test_smollm2_statistics_and_z_edits_through_nnsight(load_model):
    """Real weights (SmolLM2-135M: 30 layers, GQA 9/3, first-token sinks): every layer's statistics, and a
    z-site edit on the IOI name movers' layers, equal headlab's own."""
    from headlab.batching import batches

    loaded = load_model("smollm2-135m")
    batch = next(iter(batches(loaded, PROMPTS[:2] + ["When Mary and John went to the store, John gave a drink to"],
                              32, 3)))
    ids, mask = batch.input_ids, batch.attention_mask
    assert not bool(mask.all()), "the batch should carry padding"
    native, logits = _native(loaded, ids, mask, StatsRequest(distance=True))
    run = nb.run_trace(loaded, ids, mask, layers=range(30), request=StatsRequest(distance=True))
    _assert_same_stats(native, run.stats, range(30), atol=2e-5)
    torch.testing.assert_close(run.logits, logits, rtol=0, atol=1e-4)
    edits = [HeadScale([(23, 0), (23, 1), (29, None)], alpha=0.0), HeadScale([(12, 4)], alpha=2.0, rows="last")]
    with torch.no_grad(), headlab.intervene(loaded, *edits):
        expected = loaded.model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(nb.z_edited_logits(loaded, *edits, input_ids=ids, attention_mask=mask), expected)


def test_a_padding_mask_as_flash_attention_passes_it():
    """A [batch, key] mask (flash attention's form) means padding under the causal rule."""
    torch.manual_seed(2)
    q, k = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8)
    padding = torch.tensor([[1] * 6, [1] * 4 + [0] * 2]).bool()
    as_2d = remote_probe.attention_statistics(q, k, padding.long(), None, padding)
    dense = padding[:, None, None, :] & torch.ones(6, 6, dtype=torch.bool).tril()[None, None]
    as_4d = remote_probe.attention_statistics(q, k, dense, None, padding)
    for name, value in as_4d.items():
        assert torch.equal(as_2d[name], value), name


@pytest.mark.parametrize("remote", [False, "local"])
def test_an_encoder_through_nnsight(load_model, remote):
    """minilm (real BERT weights): bidirectional attention, and an o_proj at attention.output.dense, a path that
    collides with nnsight's own ``.output``."""
    loaded = load_model("minilm")
    enc = loaded.tokenizer(["The quick brown fox jumps over the lazy dog.", "Attention sinks."], return_tensors="pt",
                           padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    native, _ = _native(loaded, ids, mask)
    run = nb.run_trace(loaded, ids, mask, layers=range(6), remote=remote)
    _assert_same_stats(native, run.stats, range(6), atol=1e-5)
    edits = [HeadScale([(1, 2), (4, None)], alpha=0.0), HeadScale([(2, 1)], alpha=3.0, rows="last")]
    with torch.no_grad(), headlab.intervene(loaded, *edits):
        expected = loaded.model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(nb.z_edited_logits(loaded, *edits, input_ids=ids, attention_mask=mask, remote=remote),
                       expected)
