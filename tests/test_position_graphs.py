"""Theory of position bias as graphs (methods.md §6): masks, synthetic attention, P^(t), walk counts."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from headlab.analyses.position_graphs import (
    GraphSpec,
    TheoryConfig,
    analyze_position_graphs,
    cumulative_attention,
    depth_to_reach,
    first_position_mass,
    mask_graph,
    repeated_attention,
    rope_scores,
    synthetic_attention,
    walk_count,
    walk_count_matrix,
)
from headlab.errors import InputError
from headlab.result import Result


def brute_force_walks(adjacency: torch.Tensor, source: int, target: int, t: int) -> int:
    """Enumerate every vertex sequence source = v_0, …, v_t = target and count those along edges."""
    n = adjacency.shape[0]
    count = 0
    for middle in itertools.product(range(n), repeat=t - 1):
        path = (source, *middle, target)
        count += all(adjacency[b, a] for a, b in itertools.pairwise(path))
    return count


def test_masks_are_the_graphs_they_claim():
    causal = mask_graph(GraphSpec("causal", n_tokens=6))
    assert torch.equal(causal, torch.ones(6, 6).tril().bool())
    window = mask_graph(GraphSpec("window", n_tokens=6, window=2))
    assert window[4].tolist() == [False, False, False, True, True, False]
    prefix = mask_graph(GraphSpec("prefix", n_tokens=6, prefix=3))
    assert prefix[0].tolist() == [True, True, True, False, False, False]
    assert prefix[4].tolist() == [True, True, True, True, True, False]
    assert mask_graph(GraphSpec("bidirectional", n_tokens=4)).all()
    assert torch.equal(mask_graph(GraphSpec("decay", n_tokens=5)), mask_graph(GraphSpec("causal", n_tokens=5)))


def test_synthetic_attention_rows():
    uniform = synthetic_attention(GraphSpec("causal", n_tokens=5))
    torch.testing.assert_close(uniform[3], torch.tensor([0.25, 0.25, 0.25, 0.25, 0.0], dtype=torch.float64))
    decay = synthetic_attention(GraphSpec("decay", n_tokens=5, gamma=0.5))
    want = torch.tensor([0.125, 0.25, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(decay[3, :4], want / want.sum())
    for mask in ("causal", "window", "prefix", "decay", "bidirectional"):
        for encoding in ("none", "rope", "alibi"):
            attention = synthetic_attention(GraphSpec(mask, n_tokens=12, window=3, encoding=encoding, head_dim=8))
            torch.testing.assert_close(attention.sum(-1), torch.ones(12, dtype=torch.float64))
            assert (attention[~mask_graph(GraphSpec(mask, n_tokens=12, window=3))] == 0).all()


def test_rope_scores_equal_explicit_rotation():
    """The closed form against rotating one content vector by RoPE (rotate-half pairing) at each position."""
    n, d, base = 10, 8, 100.0
    content = torch.ones(d, dtype=torch.float64)
    inv_freq = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.arange(n, dtype=torch.float64)[:, None] * inv_freq  # [position, d/2]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    rotate_half = torch.cat([-content[d // 2:], content[: d // 2]])
    rotated = content * cos + rotate_half * sin  # [position, d]
    explicit = rotated @ rotated.T / math.sqrt(d)
    torch.testing.assert_close(rope_scores(n, d, base), explicit)
    assert rope_scores(n, d, base).diagonal().allclose(torch.full((n,), math.sqrt(d), dtype=torch.float64))


def test_cumulative_attention_is_the_product_in_layer_order():
    gen = torch.Generator().manual_seed(0)
    layers = torch.softmax(torch.randn(3, 5, 5, generator=gen, dtype=torch.float64), -1)
    cumulative = cumulative_attention(layers)
    torch.testing.assert_close(cumulative[0], layers[0])
    torch.testing.assert_close(cumulative[2], layers[2] @ layers[1] @ layers[0])
    eye = torch.eye(5, dtype=torch.float64)
    residual = cumulative_attention(layers, residual=True)
    torch.testing.assert_close(residual[1], (layers[1] + eye) / 2 @ ((layers[0] + eye) / 2))
    with pytest.raises(InputError, match="T, T"):
        cumulative_attention(layers[:, :4])


@pytest.mark.parametrize("encoding", ["none", "rope"])
def test_causal_mask_drains_into_the_first_token(encoding):
    spec = GraphSpec("causal", n_tokens=24, encoding=encoding, head_dim=16)
    attention = synthetic_attention(spec)
    first = first_position_mass(repeated_attention(attention, 60))  # [depth, query]
    assert (first[-1] > 0.99).all()
    assert (first[1:] >= first[:-1] - 1e-12).all(), "first-token mass never decreases with depth"
    resid = first_position_mass(repeated_attention(attention, 60, residual=True))
    assert (resid[-1] > 0.9).all()
    assert (resid[10, 1:] < first[10, 1:]).all(), "residuals slow the collapse down"


def test_smaller_windows_converge_more_slowly():
    depths = {}
    for window in (3, 6, 12):
        attention = synthetic_attention(GraphSpec("window", n_tokens=32, window=window))
        depths[window] = depth_to_reach(first_position_mass(repeated_attention(attention, 400)), 0.5)
    causal = synthetic_attention(GraphSpec("causal", n_tokens=32))
    depths["causal"] = depth_to_reach(first_position_mass(repeated_attention(causal, 400)), 0.5)
    assert None not in depths.values(), depths
    assert depths[3] > depths[6] > depths[12] > depths["causal"], depths


def test_bidirectional_uniform_attention_has_no_position_bias():
    attention = synthetic_attention(GraphSpec("bidirectional", n_tokens=8))
    torch.testing.assert_close(repeated_attention(attention, 5)[-1], torch.full((8, 8), 1 / 8, dtype=torch.float64))


def test_prefix_mask_puts_the_mass_on_the_prefix():
    attention = synthetic_attention(GraphSpec("prefix", n_tokens=16, prefix=4))
    final = repeated_attention(attention, 80)[-1]
    torch.testing.assert_close(final[:, :4].sum(-1), torch.ones(16, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(final[:, 0], torch.full((16,), 0.25, dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("t", [1, 2, 3, 4])
def test_walk_counts_match_brute_force(t):
    causal = mask_graph(GraphSpec("causal", n_tokens=5))
    counts = walk_count_matrix(causal, t)
    for i in range(5):
        for j in range(5):
            enumerated = brute_force_walks(causal, j, i, t)
            assert counts[i, j] == enumerated
            assert walk_count(i - j, t) == enumerated
    window = mask_graph(GraphSpec("window", n_tokens=5, window=2))
    prefix = mask_graph(GraphSpec("prefix", n_tokens=5, prefix=2))
    for graph in (window, prefix):
        counts = walk_count_matrix(graph, t)
        assert all(counts[i, j] == brute_force_walks(graph, j, i, t) for i in range(5) for j in range(5))


def test_walk_counts_are_exact_beyond_int64():
    causal = mask_graph(GraphSpec("causal", n_tokens=80))
    assert walk_count_matrix(causal, 40)[79, 0] == math.comb(79 + 39, 39) > 2**63


def test_bad_specs_are_clear_errors():
    with pytest.raises(InputError, match="unknown mask"):
        mask_graph(GraphSpec("diagonal"))
    with pytest.raises(InputError, match="positional encoding"):
        synthetic_attention(GraphSpec(encoding="sinusoid"))
    with pytest.raises(InputError, match="window >= 1"):
        mask_graph(GraphSpec("window", window=0))
    with pytest.raises(InputError, match="even head_dim"):
        synthetic_attention(GraphSpec(encoding="rope", head_dim=7))


def test_theory_run_round_trips(tmp_path):
    result = analyze_position_graphs(TheoryConfig(GraphSpec("window", n_tokens=12, window=4, encoding="rope",
                                                            head_dim=8), depth=6))
    assert result.tensors["cumulative"].shape == (6, 12, 12)
    assert set(result.figures) == {"cumulative", "cumulative_residual", "first_mass", "walk_counts"}
    loaded = Result.load(result.save(tmp_path, "theory"))
    assert loaded.analysis == "position_graphs"
    assert loaded.summary["graph"] == "window w=4, RoPE base=10000 d=8"
    assert len(loaded.tables["first_mass"]) == 2 * 6 * 12
