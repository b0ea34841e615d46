"""LoFiT: head selection, head offsets, apply/export, evaluation and every bad input, on tiny models.

Oracles: a constructed model in which one head alone reaches the residual stream (selection must rank it
first), losses recomputed by hand from unpadded single-sequence forwards, greedy ``generate`` for exact
match, plain transformers loading for export.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import headlab
from headlab.analyses.lofit import (
    LofitConfig,
    dpo_loss,
    frozen,
    load_ranking,
    offsets_of,
    select_heads,
    sft_loss,
    top_pairs,
    train_offsets,
)
from headlab.analyses.lofit_batches import completion_batch, pad_id
from headlab.analyses.lofit_data import DPOItem, SFTItem, read_items, write_items
from headlab.analyses.lofit_eval import exact_match, multiple_choice, read_mc_csv
from headlab.analyses.lofit_export import export_offsets
from headlab.cli import headlab_app
from headlab.errors import InputError
from headlab.interventions import HeadOffsets, intervene
from headlab.result import Result

LIVE = (1, 2)  # the one head of the constructed model whose output reaches the residual stream


def items_sft(n: int = 16, seed: int = 0) -> list[SFTItem]:
    g = torch.Generator().manual_seed(seed)
    words = ["cat", "dog", "sun", "map", "pen", "cup", "box", "hat"]
    out = []
    for _ in range(n):
        picks = torch.randint(0, len(words), (3,), generator=g).tolist()
        out.append(SFTItem(" ".join(words[i] for i in picks), " " + words[picks[0]]))
    return out


def items_dpo(n: int = 6) -> list[DPOItem]:
    return [DPOItem(i.prompt, i.target, " zz") for i in items_sft(n, seed=3)]


@pytest.fixture()
def tiny():
    return headlab.load("tiny-llama")


@pytest.fixture()
def one_head():
    """tiny-llama whose o_proj keeps only head LIVE's columns: no other head's z reaches the output, so the
    task gradient of every other head's A is exactly zero."""
    loaded = headlab.load("tiny-llama")
    d = loaded.arch.head_dim
    with torch.no_grad():
        for layer in range(loaded.arch.n_layers):
            weight = loaded.arch.o_proj(layer).weight
            for h in range(loaded.arch.n_heads):
                if (layer, h) != LIVE:
                    weight[:, h * d : (h + 1) * d] = 0
    return loaded


def logits(loaded, ids: torch.Tensor, *edits) -> torch.Tensor:
    with torch.no_grad(), intervene(loaded, *edits):
        return loaded.model(ids).logits


def test_selection_ranks_the_only_head_that_carries_the_signal_first(one_head):
    result = select_heads(one_head, items_sft(16), LofitConfig(epochs=3, batch_size=4, lr=5e-3, lambda_l1=5e-4))
    ranking = result.tables["ranking"]
    assert (int(ranking["layer"][0]), int(ranking["head"][0])) == LIVE
    # The dead heads only feel the L1 pull (Adam: steps of ~lr per coordinate around 0); the live head moves
    # with the task gradient for all 12 steps. Measured: live 0.168, largest dead 0.0042.
    assert ranking.a_norm[0] > 10 * ranking.a_norm[1]
    assert len(ranking) == 16 and result.tensors["a_norm"].shape == (4, 4)
    assert result.summary["ranking"][0][:2] == list(LIVE) and len(result.summary["curve_task_loss"]) == 12
    curve = result.tables["curve"]
    by_epoch = curve.groupby("epoch").task_loss.mean()
    assert len(curve) == 12 and by_epoch.iloc[-1] < by_epoch.iloc[0]


def test_sft_loss_is_the_target_only_cross_entropy(tiny):
    items = items_sft(5)
    offsets = HeadOffsets.create(tiny.arch, [(0, 1), (2, 3)], init="normal", std=0.3,
                                 generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), intervene(tiny, offsets):
        batched = sft_loss(tiny, items, 512)
        total, count = 0.0, 0
        for item in items:  # unpadded, one at a time
            prompt = tiny.text_tokenizer(item.prompt).input_ids
            target = tiny.text_tokenizer(item.target, add_special_tokens=False).input_ids
            ids = torch.tensor([prompt + target])
            out = tiny.model(ids).logits[0, len(prompt) - 1 : -1]
            total += float(F.cross_entropy(out, torch.tensor(target), reduction="sum"))
            count += len(target)
    assert float(batched) == pytest.approx(total / count, rel=1e-5)


def test_dpo_loss_is_log2_at_the_reference_and_follows_the_formula(tiny):
    items = items_dpo(4)

    def logp(prompt: str, completion: str) -> float:
        p = tiny.text_tokenizer(prompt).input_ids
        c = tiny.text_tokenizer(completion, add_special_tokens=False).input_ids
        out = torch.log_softmax(tiny.model(torch.tensor([p + c])).logits[0, len(p) - 1 : -1], -1)
        return float(out.gather(-1, torch.tensor(c)[:, None]).sum())

    with torch.no_grad():
        reference = torch.tensor([[logp(i.prompt, i.chosen), logp(i.prompt, i.rejected)] for i in items])
        assert float(dpo_loss(tiny, items, reference, 0.5, 512)) == pytest.approx(math.log(2), abs=1e-5)
        offsets = HeadOffsets.create(tiny.arch, [(3, 0)], init="normal", std=0.5,
                                     generator=torch.Generator().manual_seed(2))
        with intervene(tiny, offsets):
            got = float(dpo_loss(tiny, items, reference, 0.5, 512))
            policy = torch.tensor([[logp(i.prompt, i.chosen), logp(i.prompt, i.rejected)] for i in items])
    margin = (policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1])
    assert got == pytest.approx(float(-F.logsigmoid(0.5 * margin).mean()), rel=1e-5)
    assert got != pytest.approx(math.log(2), abs=1e-4)


def test_dpo_training_raises_the_chosen_margin(tiny):
    items = items_dpo(6)
    run = train_offsets(tiny, items, [(2, 0), (3, 1)], LofitConfig(objective="dpo", lr=5e-2, epochs=4, batch_size=3))
    curve = run.tables["curve"]
    assert curve.task_loss.iloc[0] == pytest.approx(math.log(2), abs=1e-2)  # v starts at N(0, 1e-3)
    assert curve.task_loss.iloc[-1] < curve.task_loss.iloc[0] - 0.05


def test_training_leaves_the_model_frozen_and_bit_exact(tiny):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    flags = [p.requires_grad for p in tiny.model.parameters()]
    ids = torch.randint(0, 250, (2, 10))
    base = logits(tiny, ids)
    run = train_offsets(tiny, items_sft(8), [(1, 0), (3, 3)], LofitConfig(lr=1e-2, lambda_l1=0, epochs=1))
    offsets = offsets_of(run)
    assert not torch.equal(logits(tiny, ids, offsets), base)
    assert torch.equal(logits(tiny, ids), base)  # removed: bit-exact
    assert all(torch.equal(v, before[k]) for k, v in tiny.model.state_dict().items())
    assert [p.requires_grad for p in tiny.model.parameters()] == flags
    assert torch.count_nonzero(offsets.A) == 0 and run.summary["trained_parameters"] == 2 * 16


def test_frozen_restores_flags_on_error(tiny):
    with pytest.raises(RuntimeError), frozen(tiny.model):
        assert not any(p.requires_grad for p in tiny.model.parameters())
        raise RuntimeError("boom")
    assert all(p.requires_grad for p in tiny.model.parameters())


def test_saved_offsets_reload_to_identical_logits(tiny, tmp_path):
    run = train_offsets(tiny, items_sft(8), [(0, 0), (2, 2), (3, 1)], LofitConfig(lr=1e-2, lambda_l1=0, epochs=1))
    path = run.save(tmp_path, "offsets")
    ids = torch.randint(0, 250, (3, 9))
    loaded_back = HeadOffsets.load(path)
    assert loaded_back.pairs == [(0, 0), (2, 2), (3, 1)] and loaded_back.v.shape == (3, 16)
    assert torch.equal(logits(tiny, ids, loaded_back), logits(tiny, ids, offsets_of(run)))
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["config"]["d_head"] == 16 and manifest["config"]["model"] == "tiny-llama"
    assert len(manifest["config"]["data_hash"]) == 64 and manifest["config"]["objective"] == "sft"


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])  # o_proj without a bias / GPT-2 Conv1D with one
def test_export_equals_the_hooked_model(name, tmp_path):
    loaded = headlab.load(name)
    offsets = HeadOffsets.create(loaded.arch, [(1, 0), (1, 3), (3, 2)], init="normal", std=0.5,
                                 generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        offsets.A.zero_()
    ids = torch.randint(0, 250, (2, 12))
    hooked = logits(loaded, ids, offsets)
    assert (hooked - logits(loaded, ids)).abs().max() > 0.1  # the offsets matter
    folder = export_offsets(loaded, offsets, tmp_path / "exported")
    plain = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        exported = plain(ids).logits
    assert (exported - hooked).abs().max() < 1e-5
    assert torch.equal(logits(loaded, ids), logits(headlab.load(name), ids))  # the loaded model is untouched


def test_export_puts_wo_v_in_the_bias_not_v(tiny, tmp_path):
    offsets = HeadOffsets.create(tiny.arch, [(2, 1)], init="normal", std=1.0,
                                 generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        offsets.A.zero_()
    folder = export_offsets(tiny, offsets, tmp_path / "exported")
    plain = AutoModelForCausalLM.from_pretrained(folder)
    weight = tiny.arch.o_proj(2).weight  # [d_model, heads · d_head]
    expected = weight[:, 16:32] @ offsets.v.detach()[0]
    torch.testing.assert_close(plain.model.layers[2].self_attn.o_proj.bias.detach(), expected)
    assert float(plain.model.layers[0].self_attn.o_proj.bias.detach().abs().max()) == 0


def test_export_refuses_scalings_and_an_existing_folder(tiny, tmp_path):
    offsets = HeadOffsets.create(tiny.arch, [(2, 1)], init="normal")
    with pytest.raises(InputError, match="non-zero scalings A"):
        export_offsets(tiny, offsets, tmp_path / "x")
    (tmp_path / "y").mkdir()
    with torch.no_grad():
        offsets.A.zero_()
    with pytest.raises(InputError, match="already exists"):
        export_offsets(tiny, offsets, tmp_path / "y")


def test_exact_match_agrees_with_greedy_generation(tiny):
    items = items_sft(6) + [SFTItem("abc", "d")]
    offsets = HeadOffsets.create(tiny.arch, [(3, 0)], init="normal", std=2.0,
                                 generator=torch.Generator().manual_seed(5))
    for edit in (None, offsets):
        got = exact_match(tiny, items, edit, batch_size=3)
        expected = []
        for item in items:
            ids = torch.tensor([tiny.text_tokenizer(item.prompt).input_ids])
            target = tiny.text_tokenizer(item.target, add_special_tokens=False).input_ids
            with torch.no_grad(), intervene(tiny, *([edit] if edit is not None else [])):
                out = tiny.model.generate(ids, max_new_tokens=len(target), do_sample=False,
                                          pad_token_id=tiny.text_tokenizer.pad_token_id)
            expected.append(out[0, ids.shape[1]:].tolist() == target)
        assert got == expected
    # Teach the model one answer by brute force: exact match must see it.
    forced = [SFTItem("abc", "d")] * 8
    run = train_offsets(tiny, forced, [(3, 0), (3, 1), (3, 2), (3, 3)], LofitConfig(lr=0.3, lambda_l1=0, epochs=5))
    assert exact_match(tiny, forced[:1], offsets_of(run)) == [True]


MC_CSV = """Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source
Adversarial,Misc,What is red?,a cat,a cat; the cat,a dog; the sun,src
Adversarial,Misc,"Where, then?",the map,the map,a pen; a cup; a box,src
"""


def test_multiple_choice_matches_a_hand_computation(tiny, tmp_path):
    path = tmp_path / "tqa.csv"
    path.write_text(MC_CSV, encoding="utf-8")
    items = read_mc_csv(path)
    assert items[1].question == "Where, then?" and items[1].incorrect == ("a pen", "a cup", "a box")
    table = multiple_choice(tiny, items)

    def logp(prompt: str, answer: str) -> float:
        p = tiny.text_tokenizer(prompt).input_ids
        c = tiny.text_tokenizer(" " + answer, add_special_tokens=False).input_ids
        with torch.no_grad():
            out = torch.log_softmax(tiny.model(torch.tensor([p + c])).logits[0, len(p) - 1 : -1].double(), -1)
        return float(out.gather(-1, torch.tensor(c)[:, None]).sum())

    for item, row in zip(items, table.itertuples(), strict=True):
        prompt = f"Q: {item.question} A:"
        true = [logp(prompt, a) for a in item.true_answers()]
        false = [logp(prompt, a) for a in item.incorrect]
        assert row.mc1 == float(logp(prompt, item.best) > max(false))
        p_true, p_false = sum(math.exp(x) for x in true), sum(math.exp(x) for x in false)
        # float32 log-probs (batched, padded) against float64: measured relative gap 4e-6
        assert row.mc2 == pytest.approx(p_true / (p_true + p_false), rel=1e-4)
    assert len(items[0].true_answers()) == 2  # the best answer is not counted twice


# ---------------------------------------------------------------- bad inputs


def test_offsets_for_another_model_are_refused(tiny):
    other = SimpleNamespace(n_layers=30, n_heads=9, head_dim=64)
    offsets = HeadOffsets.create(other, [(0, 8)])
    with pytest.raises(InputError, match=r"\(30, 9, 64\).*\(4, 4, 16\)"), intervene(tiny, offsets):
        pass
    wrong_d = HeadOffsets([(0, 1)], torch.nn.Parameter(torch.zeros(1, 8)), torch.nn.Parameter(torch.zeros(1, 8)))
    with pytest.raises(InputError, match=r"expected \[1, 16\]"), intervene(tiny, wrong_d):
        pass
    wrong_head = HeadOffsets([(0, 7)], torch.nn.Parameter(torch.zeros(1, 16)), torch.nn.Parameter(torch.zeros(1, 16)))
    with pytest.raises(InputError, match="head 7 of layer 0 does not exist"), intervene(tiny, wrong_head):
        pass


def test_bad_data_files(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "target": "b"}\n\n{"prompt": "a", "target": \n', encoding="utf-8")
    with pytest.raises(InputError, match="line 3 is not valid JSON"):
        read_items(bad, "sft")
    bad.write_text('{"prompt": "a", "target": "b"}\n["a"]\n', encoding="utf-8")
    with pytest.raises(InputError, match="line 2 is a JSON list"):
        read_items(bad, "sft")
    bad.write_text('{"prompt": "a"}\n', encoding="utf-8")
    with pytest.raises(InputError, match="line 1 lacks target"):
        read_items(bad, "sft")
    bad.write_text('{"prompt": "a", "target": 3}\n', encoding="utf-8")
    with pytest.raises(InputError, match="target must be a string"):
        read_items(bad, "sft")
    dpo = tmp_path / "dpo.jsonl"
    write_items(items_dpo(2), dpo)
    with pytest.raises(InputError, match="line 1 has chosen/rejected: this is a DPO file; use --objective dpo"):
        read_items(dpo, "sft")
    assert len(read_items(dpo, "dpo")) == 2
    sft = tmp_path / "sft.jsonl"
    write_items(items_sft(2), sft)
    with pytest.raises(InputError, match="this is an SFT file"):
        read_items(sft, "dpo")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(InputError, match="holds no items"):
        read_items(empty, "sft")
    with pytest.raises(InputError, match="does not exist"):
        read_items(tmp_path / "nope.jsonl", "sft")
    with pytest.raises(InputError, match="lacks the column"):
        (tmp_path / "x.csv").write_text("Question,Best Answer\nq,a\n", encoding="utf-8")
        read_mc_csv(tmp_path / "x.csv")


def test_k_larger_than_the_ranking(one_head):
    result = select_heads(one_head, items_sft(4), LofitConfig(epochs=1, batch_size=4))
    with pytest.raises(InputError, match="--k 17 is larger than the ranking \\(16 heads\\)"):
        top_pairs(result.tables["ranking"], 17)
    assert top_pairs(result.tables["ranking"], 16)[0] == (int(result.tables["ranking"]["layer"][0]),
                                                          int(result.tables["ranking"]["head"][0]))


def test_tokenizer_without_pad_uses_eos_and_adds_nothing(tiny):
    tok = tiny.text_tokenizer
    vocab = len(tok)
    tok.pad_token = None
    assert tok.pad_token_id is None
    assert pad_id(tiny) == tok.eos_token_id
    batch = completion_batch(tiny, [("abc", "d"), ("abcdefg", "hi")], 64)
    assert int(batch.input_ids[0, -1]) == tok.eos_token_id and batch.target_mask[0].sum() == 1
    assert batch.target_mask[1].sum() == 2 and len(tok) == vocab
    assert tiny.model.get_input_embeddings().weight.shape[0] == tiny.model.config.vocab_size


# ---------------------------------------------------------------- CLI


def test_cli_select_train_eval_apply_export(one_head, tmp_path, monkeypatch):
    """Every lofit command writes one run: --out is the runs folder, --name the run (as for every command)."""
    runner = CliRunner()
    data = tmp_path / "train.jsonl"
    write_items(items_sft(8), data)
    runs = tmp_path / "runs"
    common = ["--model", "tiny-llama", "--data", str(data), "--epochs", "1", "--batch-size", "4", "--quiet",
              "--out", str(runs)]
    out = runner.invoke(headlab_app, ["lofit", "select", *common, "--name", "sel"])
    assert out.exit_code == 0, out.output
    assert load_ranking(runs / "sel").shape[0] == 16
    out = runner.invoke(headlab_app, ["lofit", "train", *common, "--heads", str(runs / "sel"), "--k", "3",
                                      "--name", "off"])
    assert out.exit_code == 0, out.output
    assert HeadOffsets.load(runs / "off").v.shape == (3, 16)
    out = runner.invoke(headlab_app, ["lofit", "eval", "--data", str(data), "--offsets", str(runs / "off"),
                                      "--out", str(runs), "--name", "ev", "--quiet", "--threads", "1"])
    assert out.exit_code == 0, out.output
    assert set(Result.load(runs / "ev").tables["accuracy"].condition) == {"clean", "offsets"}
    (tmp_path / "tqa.csv").write_text(MC_CSV, encoding="utf-8")
    out = runner.invoke(headlab_app, ["lofit", "eval", "--data", str(tmp_path / "tqa.csv"), "--offsets",
                                      str(runs / "off"), "--out", str(runs), "--name", "mc"])
    assert out.exit_code == 0 and "MC1" in out.output, out.output
    mc = Result.load(runs / "mc")
    assert set(mc.tables) == {"mc_clean", "mc_offsets"} and mc.summary["n_clean"] == 2
    out = runner.invoke(headlab_app, ["lofit", "apply", "--offsets", str(runs / "off"), "--prompt", "cat dog",
                                      "--max-new-tokens", "3", "--out", str(runs), "--name", "ap", "--quiet"])
    assert out.exit_code == 0 and "with offsets" in out.output, out.output
    applied = Result.load(runs / "ap")
    assert applied.analysis == "lofit-apply" and list(applied.tables["completions"].prompt) == ["cat dog"]
    out = runner.invoke(headlab_app, ["lofit", "export", "--offsets", str(runs / "off"), "--out", str(runs),
                                      "--name", "hf", "--threads", "1", "--quiet"])
    assert out.exit_code == 0, out.output
    exported = Result.load(runs / "hf")
    assert exported.analysis == "lofit-export" and (runs / "hf" / "model" / "config.json").is_file()
    assert exported.tables["bias_deltas"].bias_delta_norm.gt(0).all()

    # Bad input: one error line, exit 2, nothing written.
    dpo = tmp_path / "dpo.jsonl"
    write_items(items_dpo(2), dpo)
    cases = [
        (["lofit", "select", "--model", "tiny-llama", "--data", str(dpo), "--out", str(runs), "--name", "a"],
         "DPO file"),
        (["lofit", "train", *common, "--heads", str(runs / "sel"), "--k", "17", "--name", "b"],
         "larger than the ranking"),
        (["lofit", "train", *common, "--heads", str(runs / "off"), "--k", "2", "--name", "c"],
         "not a `headlab lofit select` run"),
        (["lofit", "select", *common, "--name", "sel"], "already exists"),
        (["lofit", "export", "--offsets", str(runs / "off"), "--out", str(runs), "--name", "hf"], "already exists"),
    ]
    for args, message in cases:
        out = runner.invoke(headlab_app, args)
        assert out.exit_code == 2, (args, out.output)
        assert message in out.output and "Traceback" not in out.output, out.output
    assert sorted(p.name for p in runs.iterdir()) == ["ap", "ev", "hf", "mc", "off", "sel"]
