"""The empirical position-bias graph: statistics path vs eager attention, trend fit, rollout, retrieval, CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TEXT
from typer.testing import CliRunner

from headlab.analyses.position_bias import (
    PositionBiasConfig,
    analyze_position_bias,
    empirical_rollout,
    fit_exponential_trend,
)
from headlab.analyses.retrieval_task import (
    PLACEMENTS,
    RetrievalConfig,
    RetrievalItem,
    continuation_logprobs,
    make_items,
    place,
    run_retrieval,
    score_item,
)
from headlab.batching import batches
from headlab.cli import analyze_app
from headlab.errors import InputError
from headlab.kernels import distance_bins
from headlab.probes.position import eager_attention, head_mean_attention, relative_bins, uniform_alpha
from headlab.result import Result

runner = CliRunner()
OFF = {"rollout_tokens": 0, "retrieval_trials": 0}


def eager_attentions(loaded, batch) -> tuple[torch.Tensor, ...]:
    with torch.no_grad(), eager_attention(loaded.model):
        return loaded.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            output_attentions=True).attentions


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-gpt2", "minilm"])
def test_profiles_from_statistics_equal_eager_attention(load_model, name):
    """Distance and key-position profiles from the O(H·T) path equal a hand reduction of eager T x T attention."""
    loaded = load_model(name)
    config = PositionBiasConfig(max_tokens=40, batch_size=2, backend="torch", **OFF)
    result = analyze_position_bias(loaded, TEXT, config, progress=False)
    n_layers, n_heads = loaded.arch.n_layers, loaded.arch.n_heads
    n_bins = result.tensors["distance_mass"].shape[-1]
    mass = torch.zeros(n_layers, n_heads, 2, n_bins, dtype=torch.float64)
    count = torch.zeros(n_layers, 2, n_bins, dtype=torch.float64)
    key_mass = torch.zeros(n_layers, n_heads, 40, dtype=torch.float64)
    key_pairs = torch.zeros(n_layers, 40, dtype=torch.float64)
    for batch in batches(loaded, TEXT, 40, 2):
        attentions = eager_attentions(loaded, batch)
        for row in range(len(batch.indices)):
            length = int(batch.attention_mask[row].sum())  # right padding: real tokens first
            i = torch.arange(length)[:, None]
            j = torch.arange(length)[None, :]
            visible = (j <= i) if loaded.arch.causal else torch.ones(length, length, dtype=torch.bool)
            side = (j > i).long().expand(length, length)
            bins = distance_bins((i - j).abs())
            for layer, probs in enumerate(attentions):
                p = probs[row, :, :length, :length].double()  # [head, query, key]
                for s, b in zip(side[visible].tolist(), bins[visible].tolist(), strict=True):
                    count[layer, s, b] += 1
                mass[layer].view(n_heads, -1).index_add_(1, (side * n_bins + bins)[visible], p[:, visible])
                key_mass[layer, :, :length] += p.sum(1)
                key_pairs[layer, :length] += visible.sum(0)
    torch.testing.assert_close(result.tensors["distance_count"].double(), count)
    torch.testing.assert_close(result.tensors["distance_mass"].double(), mass, atol=1e-4, rtol=1e-4)
    seen = key_pairs > 0
    want = (key_mass / key_pairs[:, None])
    got = result.tensors["position_mean"].double()
    torch.testing.assert_close(got[:, :, :40][seen[:, None].expand_as(want)], want[seen[:, None].expand_as(want)],
                               atol=1e-4, rtol=1e-4)
    if loaded.arch.causal:
        assert result.tensors["distance_mass"][:, :, 1].abs().max() == 0
    else:
        assert result.tensors["distance_mass"][:, :, 1].sum() > 0, "an encoder attends to later keys too"


def test_uniform_baseline_equals_uniform_attention():
    length = 9
    causal = torch.tril(torch.ones(length, length, dtype=torch.float64))
    uniform = causal / causal.sum(-1, keepdim=True)
    received = uniform.sum(0) / causal.sum(0)  # mean over the queries that see each key
    torch.testing.assert_close(uniform_alpha(length, causal=True), received)
    torch.testing.assert_close(uniform_alpha(4, causal=False), torch.full((4,), 0.25, dtype=torch.float64))


@pytest.mark.parametrize("window", [1, 3, 8, 20])
def test_uniform_baseline_under_a_sliding_window_equals_uniform_attention(window):
    """Query i sees keys i - w < j <= i (transformers' rule); a key's baseline is its mean over the queries that
    see it. A window at least as long as the prompt is the causal baseline."""
    length = 9
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    seen = ((j <= i) & (i - j < window)).double()
    received = (seen / seen.sum(-1, keepdim=True)).sum(0) / seen.sum(0)
    torch.testing.assert_close(uniform_alpha(length, causal=True, window=window), received)
    if window >= length:
        torch.testing.assert_close(uniform_alpha(length, causal=True, window=window), uniform_alpha(length, True))


def test_layer_windows_and_the_theory_mask_of_a_mixed_model():
    """Gemma-3-like: 5 sliding : 1 global layers; the baseline gets each layer's window, the theory the most common
    layer type's mask and RoPE base (sliding: window 4, base 10000)."""
    from types import SimpleNamespace

    from headlab.analyses.position_bias import layer_windows, model_graph_spec

    config = SimpleNamespace(sliding_window=4, layer_types=["sliding_attention"] * 5 + ["full_attention"],
                             rope_parameters={"sliding_attention": {"rope_theta": 1e4},
                                              "full_attention": {"rope_theta": 1e6}})
    loaded = SimpleNamespace(model=SimpleNamespace(config=config),
                             arch=SimpleNamespace(n_layers=6, causal=True, head_dim=8))
    assert layer_windows(loaded) == [4, 4, 4, 4, 4, None]
    uniform, rope = model_graph_spec(loaded, 16)
    assert (uniform.mask, uniform.window, rope.mask, rope.rope_base) == ("window", 4, "window", 1e4)
    config.layer_types = ["full_attention"] * 4 + ["sliding_attention"] * 2
    uniform, rope = model_graph_spec(loaded, 16)
    assert (uniform.mask, rope.rope_base) == ("causal", 1e6)
    del config.layer_types  # Mistral: a sliding_window without layer types slides everywhere
    assert layer_windows(loaded) == [4] * 6


def test_relative_bins_leave_out_the_first_token():
    assert relative_bins(11, 10).tolist() == [-1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert relative_bins(7, 3).tolist() == [-1, 0, 0, 1, 1, 2, 2]


def test_random_model_near_uniform_attention_matches_the_theory(load_model):
    """Random init attends almost uniformly: the ratios to uniform are ~1 and the rollout follows the theory."""
    loaded = load_model("tiny-llama")
    config = PositionBiasConfig(max_tokens=48, rollout_tokens=32, rollout_prompts=2, retrieval_trials=0)
    result = analyze_position_bias(loaded, TEXT, config, progress=False)
    ratios = result.summary["segment_ratio_to_uniform"]
    assert all(abs(r - 1) < 0.05 for r in ratios.values()), ratios
    table = result.tables["rollout_first_mass"]
    np.testing.assert_allclose(table["rollout"], table["theory_uniform_rollout"], atol=0.02)
    np.testing.assert_allclose(table["residual"], table["theory_uniform_residual"], atol=0.02)


@pytest.mark.parametrize("k", [0.003, 0.05, -0.01])
def test_trend_fit_recovers_k(k):
    positions = np.arange(1, 400)
    exact = fit_exponential_trend(positions, 0.02 * np.exp(-k * positions))
    assert exact.k == pytest.approx(k, rel=1e-9) and exact.a == pytest.approx(0.02, rel=1e-9)
    assert exact.r2 == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    noisy = 0.02 * np.exp(-k * positions) * rng.lognormal(0, 0.2, len(positions))
    fit = fit_exponential_trend(positions, noisy, weights=np.full(len(positions), 3.0))
    assert fit.k == pytest.approx(k, abs=2e-3 if abs(k) > 0.005 else 3e-4)
    weights = fit.debias_weights(5)
    np.testing.assert_allclose(weights, fit(0) / fit(np.arange(5)))


def test_trend_fit_needs_two_positions():
    with pytest.raises(InputError, match="at least two positions"):
        fit_exponential_trend([3, 4], [0.1, 0.0])


def test_rollout_is_the_product_of_head_mean_eager_attention(load_model):
    loaded = load_model("tiny-qwen3")
    config = PositionBiasConfig(max_tokens=64, rollout_tokens=20, rollout_prompts=2)
    first_mass, example, used = empirical_rollout(loaded, TEXT, config)
    assert used == 2 and example.shape == (2, loaded.arch.n_layers, 20, 20)
    (batch,) = batches(loaded, TEXT[:1], 20, 1)
    layers = [a[0].double().mean(0) for a in eager_attentions(loaded, batch)]
    product = layers[0]
    half = [(a + torch.eye(20, dtype=torch.float64)) / 2 for a in layers]
    residual = half[0]
    for a, h in zip(layers[1:], half[1:], strict=True):
        product, residual = a @ product, h @ residual
    torch.testing.assert_close(example[0, -1], product)
    torch.testing.assert_close(example[1, -1], residual)
    assert first_mass.shape == (2, loaded.arch.n_layers)
    assert loaded.model.config._attn_implementation == "sdpa", "the implementation must come back"


def test_eager_attention_restores_the_implementation_on_error(load_model):
    loaded = load_model("tiny-llama")
    with pytest.raises(RuntimeError, match="boom"), eager_attention(loaded.model):
        assert loaded.model.config._attn_implementation == "eager"
        raise RuntimeError("boom")
    assert loaded.model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="one unpadded prompt"):
        head_mean_attention(loaded, torch.zeros(2, 5, dtype=torch.long))


def test_placement_moves_only_the_queried_pair():
    pairs = [(f"k{i}", f"{1000 + i}") for i in range(7)]
    for placement, index in (("first", 0), ("middle", 3), ("last", 6)):
        placed, slot = place(pairs, 4, placement)
        assert slot == index and placed[slot] == pairs[4]
        assert [p for p in placed if p != pairs[4]] == [p for p in pairs if p != pairs[4]]
    items = make_items(RetrievalConfig(n_trials=3, n_pairs=6, seed=1))
    assert items == make_items(RetrievalConfig(n_trials=3, n_pairs=6, seed=1)), "deterministic in the seed"
    assert [i.placement for i in items[:3]] == list(PLACEMENTS)
    for trial in range(3):
        same = [i for i in items if i.trial == trial]
        assert len({i.key for i in same}) == 1 and len({frozenset(i.pairs) for i in same}) == 1
        assert [i.target for i in same] == [0, 3, 5]
        assert len({k for k, _ in same[0].pairs}) == 6 and len({v for _, v in same[0].pairs}) == 6
    assert f"What is the value of key {items[0].key}?" in items[0].prompt
    assert f"key {items[0].key}: value {items[0].pairs[0][1]}" in items[0].prompt


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_scoring_equals_a_hand_computation_from_the_logits(load_model, name):
    loaded = load_model(name)
    item = make_items(RetrievalConfig(n_trials=1, n_pairs=4, seed=3))[1]
    scores = continuation_logprobs(loaded, item.prompt, item.candidates, batch_size=3)  # padded batches
    tok = loaded.text_tokenizer
    prompt_ids = tok(item.prompt).input_ids
    for n, answer in enumerate(item.candidates):
        answer_ids = tok(answer, add_special_tokens=False).input_ids
        ids = torch.tensor([prompt_ids + answer_ids])
        with torch.no_grad():
            logits = loaded.model(input_ids=ids).logits[0].double()
        logprobs = torch.log_softmax(logits, -1)
        want = sum(float(logprobs[len(prompt_ids) - 1 + m, t]) for m, t in enumerate(answer_ids))
        assert float(scores[n]) == pytest.approx(want, abs=1e-3)
    row = score_item(loaded, item)
    others = [float(s) for m, s in enumerate(scores) if m != item.target]
    assert row["logprob_answer"] == pytest.approx(float(scores[item.target]), abs=1e-4)
    assert row["correct"] == (row["logprob_answer"] > max(others))
    assert row["rank"] == 1 + sum(s > row["logprob_answer"] for s in others)


def test_retrieval_refuses_encoders_and_prompts_beyond_the_context(load_model):
    with pytest.raises(InputError, match="not a causal language model"):
        run_retrieval(load_model("minilm"), RetrievalConfig(n_trials=1))
    item = RetrievalItem(0, "first", [(f"key{i:03d}", f"{1000 + i}") for i in range(120)], 0)
    with pytest.raises(InputError, match="beyond the context"):
        continuation_logprobs(load_model("tiny-gpt2"), item.prompt, item.candidates)


def test_retrieval_is_skipped_with_a_note_for_an_encoder(load_model):
    config = PositionBiasConfig(max_tokens=32, rollout_tokens=16, rollout_prompts=1, retrieval_trials=2)
    result = analyze_position_bias(load_model("minilm"), TEXT[:2], config, progress=False)
    assert "retrieval_by_placement" not in result.tables
    assert any("retrieval task skipped" in note for note in result.summary["notes"])
    assert any("bidirectional" in note for note in result.summary["notes"])


FAST = ["--model", "tiny-qwen3", "--n-prompts", "3", "--max-tokens", "32", "--rollout-tokens", "16",
        "--rollout-prompts", "2", "--retrieval-trials", "2", "--retrieval-pairs", "4", "--quiet"]


def test_cli_writes_a_complete_run(tmp_path):
    result = runner.invoke(analyze_app, ["position-bias", *FAST, "--out", str(tmp_path), "--name", "pb"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "first third / middle" in text and "last third / middle" in text and "retrieval accuracy" in text
    assert "middle vs ends" not in text, "one ratio of both ends cannot tell U-shaped from monotone"
    assert "queried key absent (2 trials)" in text and "T <= 32" in text
    assert "retrieval task: 8 items, about" in text and "--retrieval-trials 0 skips it" in text
    run = Result.load(tmp_path / "pb")
    assert run.analysis == "position_bias" and run.model == "tiny-qwen3"
    assert set(run.figures) == {"distance_profile", "position_profile", "segments", "lost_in_the_middle", "rollout",
                                "rollout_residual", "first_mass_vs_depth", "retrieval"}
    assert set(run.tables) >= {"distance_profile", "position_profile", "relative_profile", "segments", "trend",
                               "rollout_first_mass", "retrieval_trials", "retrieval_by_placement"}
    assert run.tensors["rollout_example"].shape == (2, 4, 16, 16)
    assert run.tensors["debias_weights"].shape == (4, 32)
    assert len(run.tables["retrieval_trials"]) == 2 * 3
    assert len(run.tables["retrieval_absent_trials"]) == 2
    assert run.tables["retrieval_absent_baseline"]["count"].sum() == 2
    assert run.config["rollout_tokens"] == 16 and run.config["n_prompts"] == 3
    assert "# Position bias" in run.report
    assert [p.name for p in tmp_path.iterdir()] == ["pb"]


@pytest.mark.parametrize("args,message", [
    (["--rollout-tokens", "5000"], "--rollout-tokens must lie between 0"),
    (["--rollout-tokens", "-1"], "--rollout-tokens must lie between 0"),
    (["--n-relative", "2"], "--n-relative must be at least 3"),
    (["--retrieval-pairs", "1"], "--retrieval-pairs must lie between 2 and 200"),
    (["--retrieval-trials", "-3"], "--retrieval-trials must be >= 0"),
    (["--max-tokens", "0"], "--max-tokens must be a positive"),
    (["--model", "tiny-gpt2", "--max-tokens", "5000"], "beyond the context"),
    (["--model", "qwen3-14bb"], "did you mean qwen3-14b"),
    (["--n-prompts", "0"], "--n-prompts must be positive"),
    (["--name", "../escape"], "is not allowed"),
])
def test_cli_bad_input(tmp_path, args, message):
    out = tmp_path / "runs"
    base = ["--model", "tiny-qwen3", "--n-prompts", "2", "--max-tokens", "16", "--quiet", "--out", str(out)]
    result = runner.invoke(analyze_app, ["position-bias", *base, *args])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert text.startswith("error:") and message in text, text
    assert "Traceback" not in result.output
    assert not out.exists() or not any(out.iterdir())


def test_cli_missing_prompt_file(tmp_path):
    result = runner.invoke(analyze_app, ["position-bias", "--prompts", str(tmp_path / "nope.txt"), "--quiet",
                                         "--out", str(tmp_path / "runs")])
    assert result.exit_code == 2 and "is missing" in result.output


# ----------------------------------------------------------------------------------------- dashboard page


def plotly_array(value) -> np.ndarray:
    """A plotly JSON array: a list, or plotly's typed-array encoding {dtype, bdata, shape}."""
    import base64

    if isinstance(value, dict):
        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
    return np.asarray(value, dtype=float)


@pytest.fixture(scope="module")
def position_runs(tmp_path_factory, load_model):
    root = tmp_path_factory.mktemp("position-runs")
    config = PositionBiasConfig(max_tokens=24, rollout_tokens=12, rollout_prompts=1, retrieval_trials=1,
                                retrieval_pairs=3)
    analyze_position_bias(load_model("tiny-qwen3"), TEXT, config, progress=False).save(root, "pb-qwen3")
    analyze_position_bias(load_model("tiny-llama"), TEXT[:2], config, progress=False).save(root, "pb-llama")
    return root


def test_dashboard_page_draws_the_run_from_its_tensors(position_runs, monkeypatch):
    import json

    from streamlit.testing.v1 import AppTest

    from headlab.dashboard import launch
    from headlab.dashboard.views.position_bias import head_distance_figure, segment_ratio

    monkeypatch.setenv("HEADLAB_RUNS", str(position_runs))
    run = Result.load(position_runs / "pb-qwen3")
    at = AppTest.from_file(str(launch.APP_FILE), default_timeout=120)
    at.query_params["page"], at.query_params["run"] = "run", "pb-qwen3"
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    assert at.header[0].value == "Position bias: pb-qwen3"
    specs = [json.loads(element.proto.spec) for element in at.get("plotly_chart")]
    distance = specs[0]["data"][0]
    pairs = run.tensors["distance_count"][0, 0] > 0
    np.testing.assert_allclose(plotly_array(distance["y"]),
                               run.tensors["distance_mean"][0, 0, 0][pairs].numpy(), rtol=1e-6)
    assert len(head_distance_figure(run, 1).data) == run.tensors["distance_mean"].shape[1]
    np.testing.assert_allclose(segment_ratio(run, 0).numpy(),
                               (run.tensors["segment_mean"][:, :, 0] / run.tensors["segment_uniform"][:, :1]).numpy())
    at.query_params["page"], at.query_params["left"], at.query_params["right"] = "compare", "pb-llama", "pb-qwen3"
    at.run()
    assert not at.exception, [e.message for e in at.exception]


# ------------------------------------------------------------------ issue 12: faster scoring, honest summaries


@pytest.mark.slow
def test_shared_prompt_scoring_equals_one_forward_per_candidate_on_smollm2(load_model):
    """The KV-cache scoring (prompt once, answers on top) against the old full forward per candidate with a
    log-softmax at every position: measured max difference 3.5e-5 nats (fp32), the brief allows 1e-4."""
    loaded = load_model("smollm2-135m")
    tok = loaded.text_tokenizer
    for item in make_items(RetrievalConfig(n_trials=1, n_pairs=8, seed=0), absent=True):
        scores = continuation_logprobs(loaded, item.prompt, item.candidates)
        prompt_ids = tok(item.prompt).input_ids
        answers = [tok(c, add_special_tokens=False).input_ids for c in item.candidates]
        width = len(prompt_ids) + max(len(a) for a in answers)
        ids = torch.full((len(answers), width), tok.eos_token_id)
        mask = torch.zeros_like(ids)
        for row, answer in enumerate(answers):
            ids[row, :len(prompt_ids) + len(answer)] = torch.tensor(prompt_ids + answer)
            mask[row, :len(prompt_ids) + len(answer)] = 1
        with torch.no_grad():
            logprobs = torch.log_softmax(loaded.model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        want = [sum(float(logprobs[row, len(prompt_ids) - 1 + m, t]) for m, t in enumerate(answer))
                for row, answer in enumerate(answers)]
        assert scores.tolist() == pytest.approx(want, abs=1e-4)


def test_absent_key_items_and_baseline(load_model):
    config = RetrievalConfig(n_trials=3, n_pairs=5, seed=2)
    plain, with_absent = make_items(config), make_items(config, absent=True)
    assert [i for i in with_absent if i.placement != "absent"] == plain, "absent items change nothing else"
    absent = [i for i in with_absent if i.placement == "absent"]
    assert len(absent) == 3
    for item in absent:
        assert item.key not in {k for k, _ in item.pairs} and f"value of key {item.key}?" in item.prompt
    trials, by_placement, absent_trials, baseline = run_retrieval(load_model("tiny-llama"), config)
    assert len(trials) == 9 and len(absent_trials) == 3 and "absent" not in set(by_placement["placement"])
    # Hand count of the picked slots: slot 0 first, 2 middle (5 // 2), 4 last, the rest other.
    names = {0: "first", 2: "middle", 4: "last", 1: "other", 3: "other"}
    picked = [names[s] for s in absent_trials["picked_slot"]]
    assert baseline.set_index("picked")["count"].to_dict() == {p: picked.count(p) for p in
                                                                ("first", "middle", "last", "other")}
    assert baseline["share"].sum() == pytest.approx(1.0)
    assert baseline["chance"].tolist() == pytest.approx([0.2, 0.2, 0.2, 0.4])


@pytest.mark.parametrize("first,last,shape", [
    (1.3, 1.4, "U-shaped"), (0.68, 3.3, "recency"), (1.5, 0.7, "primacy"), (0.8, 0.9, "peaks in the middle"),
    (1.001, 0.999, "flat"), (1.01, 1.5, "recency"),
])
def test_position_shape_says_u_shaped_only_when_both_ends_exceed_the_middle(first, last, shape):
    from headlab.analyses.position_bias import position_shape

    assert shape in position_shape(first, last)
    if shape != "U-shaped":
        assert "U-shaped" not in position_shape(first, last).split(",")[0]


def test_rollout_separation_by_hand():
    from headlab.analyses.position_bias import rollout_separation

    model = torch.tensor([0.05, 0.3, 0.6, 0.95, 1.0])
    theory = torch.tensor([0.07, 0.2, 0.5, 0.8, 1.0])
    sep = rollout_separation(model, theory)
    assert (sep["model_layer_0.5"], sep["theory_layer_0.5"]) == (3, 3)
    assert (sep["model_layer_0.9"], sep["theory_layer_0.9"]) == (4, 5)
    assert sep["max_gap_layer"] == 4 and sep["max_gap_model"] == pytest.approx(0.95)
    assert rollout_separation(torch.tensor([0.1, 0.2]), torch.tensor([0.1, 0.2]))["model_layer_0.5"] is None


def test_summary_reports_both_ends_separately(load_model):
    config = PositionBiasConfig(max_tokens=32, rollout_tokens=16, rollout_prompts=1, retrieval_trials=1,
                                retrieval_pairs=4)
    lines: list[str] = []
    result = analyze_position_bias(load_model("tiny-llama"), TEXT[:3], config, progress=False, log=lines.append)
    summary = result.summary
    relative = result.tensors["relative_mean"].mean((0, 1)) / result.tensors["relative_uniform"].mean(0)
    third = len(relative) // 3
    middle = relative[third:len(relative) - third].mean()
    assert summary["first_vs_middle"] == pytest.approx(float(relative[:third].mean() / middle), rel=1e-5)
    assert summary["last_vs_middle"] == pytest.approx(float(relative[-third:].mean() / middle), rel=1e-5)
    assert summary["mean_prompt_tokens"] == summary["n_tokens"] / 3 and summary["max_tokens"] == 32
    assert set(summary["rollout_separation"]) == {"rollout", "residual"}
    assert set(summary["retrieval_absent_pick"]) == {"first", "middle", "last", "other"}
    assert any(line.startswith("retrieval task: 4 items, about") for line in lines)
    assert result.prompts == TEXT[:3] and result.provenance["settings"]["dtype"] == "float32"


def test_a_string_is_not_a_list_of_prompts(load_model):
    from headlab.errors import PromptError

    with pytest.raises(PromptError, match="single string"):
        analyze_position_bias(load_model("tiny-llama"), "one prompt", PositionBiasConfig(max_tokens=16, **OFF))
