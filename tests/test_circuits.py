"""Circuit analysis on a hand-built model where one known head moves the answer to the final position.

``copy_model``: a 2-layer, 2-head Llama whose head (1, 0) attends from every query to the "name"
tokens (a marker dimension in their embedding) and copies the name's one-hot into the logits; head
(0, 1) does the same with a third of the gain; heads (0, 0) and (1, 1) have small random weights.
Task "first": ``<bos> name f f f`` -> name; task "second": ``<bos> f name f f`` -> name; the
counterfactual swaps in another name. Every method must rank (1, 0) first, and the top-1 circuits of the
two tasks must be {(1, 0)} both.
"""

from __future__ import annotations

import json
import random
import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import headlab
from headlab.analyses.circuit_tasks import (
    CircuitExample,
    CircuitTask,
    colored_objects_task,
    ioi_task,
    make_task,
    name_induction_task,
    read_jsonl,
    tokenize_task,
    write_jsonl,
)
from headlab.analyses.circuits import circuit_graph, overlap, top_heads
from headlab.analyses.path_patching import (
    activation_patching,
    attribution_patching,
    clean_and_cf,
    path_patching,
)
from headlab.arch import Arch
from headlab.errors import InputError
from headlab.interventions import HeadPatch
from headlab.loading import LoadedModel
from headlab.training.backcopy import BOS, PAD, UNK, word_tokenizer

NAMES = [f"w{i}" for i in range(10)]
FILLERS = [f"w{i}" for i in range(20, 30)]


def _copy_weights(seed: int = 0) -> tuple[LlamaForCausalLM, dict[str, int]]:
    vocab = {name: i for i, name in enumerate([f"w{i}" for i in range(40)] + [BOS, PAD, UNK])}
    d_model, n_heads, head_dim = 64, 2, 32
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=d_model, intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=n_heads, num_key_value_heads=n_heads, head_dim=head_dim,
                         max_position_embeddings=32, bos_token_id=vocab[BOS], pad_token_id=vocab[PAD],
                         eos_token_id=None, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    model = LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if name.endswith("norm.weight") else torch.zeros_like(p))
        embed = model.model.embed_tokens.weight
        embed[:, 1] = 1.0  # constant dim: what every query reads
        embed[torch.arange(len(vocab)), 2 + torch.arange(len(vocab))] = 1.0  # one-hot of the token
        names = [vocab[n] for n in NAMES]
        embed[names, 0] = 1.0  # marker: "this is a name"
        model.lm_head.weight[torch.arange(len(vocab)), 2 + torch.arange(len(vocab))] = 1.0
        rotary = head_dim // 2 - 1  # the slowest rotary pair: position barely rotates it
        for layer, head, gain in ((1, 0, 1.0), (0, 1, 1 / 3)):
            attn = model.model.layers[layer].self_attn
            attn.q_proj.weight[head * head_dim + rotary, 1] = 1.0
            attn.k_proj.weight[head * head_dim + rotary, 0] = 3.0
            for j, t in enumerate(names):
                attn.v_proj.weight[head * head_dim + j, 2 + t] = 1.0
                attn.o_proj.weight[2 + t, head * head_dim + j] = gain
        for layer, head in ((0, 0), (1, 1)):  # small random heads: noise every method must rank below
            attn = model.model.layers[layer].self_attn
            rows = slice(head * head_dim, (head + 1) * head_dim)
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                proj.weight[rows] = torch.randn(head_dim, d_model, generator=gen) * 0.3
            attn.o_proj.weight[:, rows] = torch.randn(d_model, head_dim, generator=gen) * 0.01
    return model, vocab


def copy_model() -> LoadedModel:
    model, vocab = _copy_weights()
    tokenizer = word_tokenizer(vocab, add_bos=True, max_length=32)
    return LoadedModel("copy", model, tokenizer, Arch.from_model(model, tokenizer), "constructed")


def copy_task(where: int, n: int = 12, seed: int = 0) -> CircuitTask:
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        a, b = rng.sample(NAMES, 2)
        words = rng.sample(FILLERS, 3)
        clean, cf = list(words), list(words)
        clean.insert(where, a)
        cf.insert(where, b)
        examples.append(CircuitExample(" ".join(clean), a, " ".join(cf), b))
    return CircuitTask(f"copy-{where}", examples)


@pytest.fixture(scope="module")
def loaded():
    return copy_model()


def test_clean_model_solves_both_tasks(loaded):
    for where in (0, 1):
        runs = clean_and_cf(loaded, tokenize_task(loaded, copy_task(where)))
        assert bool((runs.ld_clean > 0).all()) and bool((runs.ld_cf < 0).all())


def test_every_method_ranks_the_copying_head_first(loaded):
    """Measured (task "first", 12 prompts): activation 85.5 for (1, 0), 14.3 for (0, 1), |score| < 0.2 for the
    random heads; path to the logits the same but 13.8 for (0, 1) (the later heads' final-position z are
    frozen); attribution 44.5 and 10.7 (a linear estimate under the final RMSNorm: ranks, not values)."""
    batch = tokenize_task(loaded, copy_task(0))
    heads = [(0, 0), (0, 1), (1, 0), (1, 1)]
    act = activation_patching(loaded, batch, heads, batch_size=5, senders_per_pass=3)
    attr = attribution_patching(loaded, batch, batch_size=5).flatten()
    path = path_patching(loaded, batch, heads, batch_size=5, senders_per_pass=3)
    for scores, strong in ((act, 80), (path, 80), (attr, 40)):
        assert int(scores.argmax()) == 2, scores
        assert scores[2] > strong and scores[1] > 8 and scores[0].abs() < 1 and scores[3].abs() < 1, scores
    # the last layer's heads reach the logits through themselves only: path = activation patching there
    torch.testing.assert_close(path[2:], act[2:], atol=1e-3, rtol=1e-4)
    assert abs(float(path[1] - act[1])) > 0.1  # (0, 1) also moves layer 1's final z, which path freezes
    frozen = path_patching(loaded, batch, heads, batch_size=5, senders_per_pass=3, freeze_mlps=True)
    torch.testing.assert_close(frozen, path, atol=1e-4, rtol=1e-4)  # this model's MLPs are zero


def test_activation_patching_equals_head_patch_one_head_at_a_time(loaded):
    """The batched tiles (one head per tile) against ``HeadPatch`` from a trace of the cf run."""
    batch = tokenize_task(loaded, copy_task(1, n=6))
    act = activation_patching(loaded, batch, [(0, 0), (1, 1)], senders_per_pass=2)
    runs = clean_and_cf(loaded, batch)
    for i, head in enumerate([(0, 0), (1, 1)]):
        with torch.no_grad(), headlab.trace(loaded, names=[f"blocks.{head[0]}.attn.hook_z"], stats=False) as cf:
            loaded.model(input_ids=batch.cf_ids, attention_mask=batch.attention_mask)
        with torch.no_grad(), headlab.intervene(loaded, HeadPatch([head], cf, rows="last")):
            logits = loaded.model(input_ids=batch.clean_ids, attention_mask=batch.attention_mask).logits[:, -1]
        rows = torch.arange(len(batch))
        ld = logits[rows, batch.answer_ids] - logits[rows, batch.cf_answer_ids]
        expected = 100 * (ld.mean() - runs.ld_clean.mean()) / (runs.ld_cf.mean() - runs.ld_clean.mean())
        assert float(act[i]) == pytest.approx(float(expected), abs=1e-3)


def test_path_patching_through_q_receivers(loaded):
    """Senders in layer 0 through the q of head (1, 0): its query reads only the constant dim, which the
    senders hardly move at the final position (measured |score| < 0.03); through its k and v at the final
    position (0, 1)'s name write reaches v, but the final (filler) key is barely attended (0.37); through
    the logits (0, 1) scores 13.8."""
    batch = tokenize_task(loaded, copy_task(0))
    senders = [(0, 0), (0, 1)]
    via_q = path_patching(loaded, batch, senders, receivers=[(1, 0, "q")], senders_per_pass=2)
    via_kv = path_patching(loaded, batch, senders, receivers=[(1, 0, "k"), (1, 0, "v")], senders_per_pass=2)
    direct = path_patching(loaded, batch, senders, senders_per_pass=2)
    assert via_q.abs().max() < 0.1 and 0.1 < via_kv[1] < 1 and direct[1] > 10
    with pytest.raises(InputError, match="receiver"):
        path_patching(loaded, batch, senders, receivers=[(1, 5, "q")])


def test_top_heads_overlap_and_graph(loaded):
    scores = {}
    for where in (0, 1):
        batch = tokenize_task(loaded, copy_task(where))
        scores[f"copy-{where}"] = attribution_patching(loaded, batch)
    circuits = {task: top_heads(s, top=0.25) for task, s in scores.items()}
    assert circuits == {"copy-0": [(1, 0)], "copy-1": [(1, 0)]}
    table = overlap(circuits["copy-0"], circuits["copy-1"])
    assert table["shared"] == [(1, 0)] and table["iou"] == 1.0 and table["share_a_in_b"] == 1.0
    graph = circuit_graph(scores["copy-0"], circuits["copy-0"])
    assert graph["nodes"]["a1.h0"]["in_graph"] and not graph["nodes"]["a0.h0"]["in_graph"]
    assert graph["edges"]["a1.h0->logits"]["in_graph"]
    assert graph["edges"]["a1.h0->logits"]["score"] == pytest.approx(float(scores["copy-0"][1, 0]))
    assert "input->a1.h0<v>" in graph["edges"] and "m0->m1" in graph["edges"]
    json.dumps(graph)


def test_unequal_lengths_and_multi_token_answers_are_refused(loaded):
    bad = [CircuitExample("w20 w1 w21", "w1", "w20 w2", "w2")]
    with pytest.raises(InputError, match="4 tokens and the counterfactual 3"):
        tokenize_task(loaded, bad)
    with pytest.raises(InputError, match="must be one token"):
        tokenize_task(loaded, [CircuitExample("w20 w1", "w1 w2", "w20 w2", "w2")])
    with pytest.raises(InputError, match="unknown task"):
        make_task("nope", 3)


def test_datasets_are_deterministic_and_read_back(tmp_path):
    a, b = ioi_task(20, seed=3), ioi_task(20, seed=3)
    assert a.examples == b.examples and a.examples != ioi_task(20, seed=4).examples
    first = a.examples[0]
    # the counterfactual flips S2 to the indirect object: the clean wrong answer is the subject
    s2, cf_s2 = first.prompt.split(",")[1], first.cf_prompt.split(",")[1]
    assert first.cf_answer.strip() in s2 and first.answer.strip() in cf_s2
    colored = colored_objects_task(5, seed=1, shots=2)
    assert colored.examples[0].prompt.count("Q: On the") == 3 and colored.examples[0].prompt.endswith("\nA:")
    assert " an orange" in "".join(e.prompt for e in colored_objects_task(40).examples)  # "an" before vowels
    assert name_induction_task(4).examples[0].prompt.startswith("The guests were")
    write_jsonl(a, tmp_path / "mine.jsonl")
    assert read_jsonl(tmp_path / "mine.jsonl").examples == a.examples
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x", "answer": "y"}\n')
    with pytest.raises(InputError, match="line 1: missing string field"):
        read_jsonl(tmp_path / "bad.jsonl")


def test_activation_patching_equals_transformer_bridge(loaded):
    """The same patching done with TransformerLens' TransformerBridge (hook_z at the final position)."""
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    batch = tokenize_task(loaded, copy_task(0, n=4)).slice(0, 4)
    head = (1, 0)
    ours = activation_patching(loaded, batch, [head])[0]
    model, _ = _copy_weights()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = build_bridge_from_module(model, "LlamaForCausalLM", hf_config=model.config)
        name = f"blocks.{head[0]}.attn.hook_z"
        with torch.no_grad():
            clean_logits = bridge(batch.clean_ids)[:, -1]
            cf_logits, cache = bridge.run_with_cache(batch.cf_ids, names_filter=lambda n: n == name)
            cf_logits = cf_logits[:, -1]

            def patch(z, hook):
                z = z.clone()
                z[:, -1, head[1]] = cache[name][:, -1, head[1]]
                return z

            patched = bridge.run_with_hooks(batch.clean_ids, fwd_hooks=[(name, patch)])[:, -1]
    rows = torch.arange(len(batch))

    def ld(logits):
        return (logits[rows, batch.answer_ids] - logits[rows, batch.cf_answer_ids]).mean()

    oracle = 100 * (ld(patched) - ld(clean_logits)) / (ld(cf_logits) - ld(clean_logits))
    assert float(ours) == pytest.approx(float(oracle), abs=1e-3)


def test_cached_prefix_equals_full_forwards(loaded):
    """One-token steps over the clean prefix's KV cache give the full-forward scores (left padding too)."""
    task = CircuitTask("mixed", copy_task(0, n=4).examples + [CircuitExample("w20 w1 w21 w22 w23 w24", "w1",
                                                                            "w20 w2 w21 w22 w23 w24", "w2")])
    batch = tokenize_task(loaded, task)
    heads = [(0, 0), (0, 1), (1, 0), (1, 1)]
    for method in (activation_patching, path_patching):
        cached = method(loaded, batch, heads, senders_per_pass=3, use_cache=True)
        full = method(loaded, batch, heads, senders_per_pass=3, use_cache=False)
        torch.testing.assert_close(cached, full, atol=1e-3, rtol=1e-4)
    kv = [(1, 0, "k"), (1, 0, "v"), (1, 1, "q")]
    torch.testing.assert_close(path_patching(loaded, batch, heads[:2], receivers=kv, use_cache=True),
                               path_patching(loaded, batch, heads[:2], receivers=kv, use_cache=False),
                               atol=1e-3, rtol=1e-4)


def test_attention_override_repairs_and_breaks(loaded):
    """Two names in the prompt: the copying head (1, 0) splits its attention between them (both carry the
    marker) and the model is right on 1 of 6 prompts (LD -0.36). Overriding (1, 0) at the final position
    onto the answer's position (1, after BOS) repairs it: 6 of 6, LD 6.98; onto the other name (2): 0 of 6,
    LD -2.71 (measured)."""
    from headlab.analyses.circuit_repair import override_effect

    rng = random.Random(1)
    examples = []
    for _ in range(6):
        a, b = rng.sample(NAMES, 2)
        examples.append(CircuitExample(f"{a} {b} w20 w21", a, f"{b} {a} w20 w21", b))
    repaired = override_effect(loaded, examples, [(1, 0)], keys_of=lambda _loaded, _ex: [1])
    broken = override_effect(loaded, examples, [(1, 0)], keys_of=lambda _loaded, _ex: [2])
    assert repaired["accuracy_before"] < 0.5 and repaired["accuracy_after"] == 1.0 and repaired["ld_after"] > 5
    assert broken["accuracy_after"] == 0.0 and broken["ld_after"] < repaired["ld_before"] - 1
    assert loaded.model.config._attn_implementation != "headlab"  # restored after the block


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_receiver_projections_match_trace(load_model, name):
    """q/k/v receivers (GQA kv heads on tiny-llama, GPT-2's fused c_attn) read the same slices as
    ``headlab.trace``'s hook_q/k/v at the final position; patching a run with its own values is a no-op."""
    from headlab.analyses.path_patching import _projection_hooks

    model = load_model(name)
    ids = model.text_tokenizer(["the cat sat on the mat"], return_tensors="pt").input_ids
    receivers = [(2, 3, "q"), (2, model.arch.n_kv_heads - 1, "k"), (3, 0, "v")]
    names = ["blocks.2.attn.hook_q", "blocks.2.attn.hook_k", "blocks.3.attn.hook_v"]
    with torch.no_grad(), headlab.trace(model, names=names, stats=False) as t, \
            _projection_hooks(model, receivers, None) as recorded:
        logits = model.model(input_ids=ids).logits
    for (layer, head, part), hook in zip(receivers, names, strict=True):
        torch.testing.assert_close(recorded[(layer, head, part)], t[hook][:, -1, head])
    with torch.no_grad(), _projection_hooks(model, receivers, dict(recorded)):
        same = model.model(input_ids=ids).logits
    torch.testing.assert_close(same, logits)
    other = {r: v + 1.0 for r, v in recorded.items()}
    with torch.no_grad(), _projection_hooks(model, receivers, other):
        moved = model.model(input_ids=ids).logits
    torch.testing.assert_close(moved[:, :-1], logits[:, :-1])  # only the final position is patched
    assert not torch.allclose(moved[:, -1], logits[:, -1])


def test_role_tags_find_the_movers(loaded):
    """The copying heads put > 0.9 of the final row on the name, the answer: movers; the random heads do
    not (their reading stays below the 0.3 threshold), and a zero score makes an answer-attending head."""
    from headlab.analyses.circuit_roles import tag_roles

    batch = tokenize_task(loaded, copy_task(0))
    scores = torch.tensor([[0.0, 14.3], [85.5, 0.1]])
    roles = tag_roles(loaded, batch, [(0, 0), (0, 1), (1, 0), (1, 1)], scores).set_index(["layer", "head"])
    assert roles.loc[(1, 0), "tag"] == "mover" and roles.loc[(0, 1), "tag"] == "mover"
    assert roles.loc[(1, 0), "to_answer"] > 0.9 and roles.loc[(1, 1), "tag"] == ""
    flipped = tag_roles(loaded, batch, [(1, 0)], -scores).iloc[0]
    assert flipped.tag == "negative mover"
    assert tag_roles(loaded, batch, [(1, 0)], scores * 0).iloc[0].tag == "answer-attending"


def test_final_attention_reads_the_edited_pattern(loaded):
    """``final_attention`` reads the final row under the edits: the copying head's mass on the name is
    > 0.9 (measured ~1), and 1.0 on a filler once overridden there; the other layer-1 head is unchanged."""
    from headlab.analyses.circuit_repair import final_attention
    from headlab.interventions import AttentionOverride

    examples = copy_task(0, n=4).examples  # the name sits at position 1, after BOS
    name = final_attention(loaded, examples, [(1, 0), (1, 1)], lambda _l, _e: [1])
    filler = AttentionOverride([(1, 0)], [3], rows="last")
    moved = final_attention(loaded, examples, [(1, 0), (1, 1)], lambda _l, _e: [3], [filler])
    plain = final_attention(loaded, examples, [(1, 1)], lambda _l, _e: [3])
    assert name[(1, 0)] > 0.9 and moved[(1, 0)] == pytest.approx(1.0, abs=1e-5)
    assert moved[(1, 1)] == pytest.approx(plain[(1, 1)], abs=1e-6)
