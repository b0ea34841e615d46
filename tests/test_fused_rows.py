"""The compiled row pass (kernels/fused_rows.c) on hand-made tiles, against float64 formulas; how it is
built, cached and refused. (The whole torch backend with and without it is held to eager in
test_torch_backend_speedpath.py.)"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from headlab.errors import InputError
from headlab.kernels import fused_rows
from headlab.kernels.fused_rows import FUSED_ENV

MASKED = torch.finfo(torch.float32).min


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """A build into an empty cache folder, forgotten again afterwards."""
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path))
    fused_rows.build.cache_clear()
    yield tmp_path
    fused_rows.build.cache_clear()


def compiled() -> fused_rows.FusedRows:
    fused, why = fused_rows.build()
    assert fused is not None, why  # CI installs a C compiler: the compiled pass must build there
    return fused


def tile(seed: int = 0):
    """``[batch 2, head 3, rows 5, keys 37]`` base-2 scores (37: not a multiple of the vector width), with
    masked entries, one row without any key, one row far above its reference shift."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(2, 3, 5, 37, generator=gen) * 4
    s[..., 30:] = MASKED  # a causal-like masked tail
    s[0, 1, 2] = MASKED  # sees nothing
    s[1, 2, 3, 7] = 60.0  # 2^60 above the reference: the row sum leaves [2^-24, 2^24]
    return s


def run(fused, s, reference, sinks=None, weight=None, threads=1, n_q=9, start=3, n_k=50, lo=4):
    batch, n_heads, rows, _ = s.shape
    shift = torch.zeros(batch, n_heads, n_q) + (0.5 if reference else 0.0)
    sums, dots, centres = (torch.zeros(batch, n_heads, n_q) for _ in range(3))
    weight = torch.ones(batch, n_q) if weight is None else weight
    mass = torch.zeros(batch, n_heads, n_k)
    e = torch.full_like(s, float("nan"))
    redone = fused.run(s.clone(), e, shift, sums, dots, centres, start, weight, sinks, mass, lo, reference, threads)
    return dict(e=e, shift=shift, sum=sums, dot=dots, centre=centres, mass=mass, redone=redone)


def expected(s, reference, sinks=None, weight=None, n_q=9, start=3, n_k=50, lo=4):
    """float64: the row shift (reference 0.5 where within 24 bits, else the maximum), e, l, the entropy,
    the key mass."""
    s64 = s.double()
    visible = s > -1e38
    sees = visible.any(-1)
    m = torch.where(visible, s64, -math.inf).amax(-1)
    base = torch.full_like(m, 0.5 if reference else 0.0)
    l_ref = torch.where(visible, torch.exp2(s64), 0.0).sum(-1)
    keep = reference & (l_ref >= 2.0**-24) & (l_ref <= 2.0**24)
    extra = torch.where(keep | ~sees, 0.0, m)
    shifted = (s - extra.float()[..., None]).double()  # s - m rounds in fp32, as in the pass (and the torch ops)
    e = torch.where(visible, torch.exp2(shifted), 0.0)
    total = e.sum(-1)
    p = e / total[..., None]
    entropy = torch.where(sees, -(p * torch.log(p.clamp_min(1e-300))).sum(-1), 0.0)
    w = torch.ones(s.shape[0], n_q, dtype=torch.float64) if weight is None else weight.double()
    den = total if sinks is None else total + torch.exp2(sinks.double()[None, :, None] - (base + extra))
    row_w = torch.where(sees, w[:, None, start : start + s.shape[2]] / den, 0.0)
    mass = torch.zeros(s.shape[0], s.shape[1], n_k, dtype=torch.float64)
    mass[..., lo : lo + s.shape[-1]] = (row_w[..., None] * e).sum(-2)
    return dict(e=e, shift=base + extra, sum=total, entropy=entropy, mass=mass, sees=sees,
                redone=int((reference & ~keep & sees).sum()))


@pytest.mark.parametrize("lanes", [None, 4, 8, 16])
@pytest.mark.parametrize("reference", [True, False])
@pytest.mark.parametrize("sinks", [None, torch.tensor([-3.0, 0.0, 40.0])])
def test_row_pass_matches_float64(fresh_build, monkeypatch, reference, sinks, lanes):
    """Every vector width the source may be built with (None: the one of the compiler's target), through
    ``$HEADLAB_FUSED_ROWS_CFLAGS``, which also keys the cached build."""
    if lanes is not None:
        monkeypatch.setenv(fused_rows.CFLAGS_ENV, f"-DLANES={lanes}")
        assert f"-DLANES={lanes}" in fused_rows.flags()
    s = tile()
    weight = torch.ones(2, 9)
    weight[1, 4] = 0.0  # a row not counted in the key mass
    got = run(compiled(), s, reference, sinks, weight)
    want = expected(s, reference, sinks, weight)
    rows = slice(3, 8)
    assert got["redone"] == want["redone"] == (1 if reference else 0)
    torch.testing.assert_close(got["e"].double(), want["e"], rtol=2e-7, atol=0)
    torch.testing.assert_close(got["shift"][..., rows].double(), want["shift"], rtol=0, atol=1e-6)
    torch.testing.assert_close(got["sum"][..., rows].double(), want["sum"], rtol=1e-6, atol=0)
    # The entropy from the pass's outputs as the chunk body reads them: (l · (log2 l - t) - dot) / l, in nats.
    sums, dots, centres = (got[name][..., rows].double() for name in ("sum", "dot", "centre"))
    entropy = torch.where(want["sees"], (sums * (sums.log2() - centres) - dots) / sums * math.log(2), 0.0)
    torch.testing.assert_close(entropy, want["entropy"], rtol=0, atol=1e-5)
    torch.testing.assert_close(got["mass"].double(), want["mass"], rtol=1e-6, atol=1e-7)
    assert got["mass"][..., :4].eq(0).all() and got["mass"][..., 41:].eq(0).all()  # only keys [lo, lo + w)
    assert got["sum"][0, 1, 5] == 0 and got["e"][0, 1, 2].eq(0).all()  # the row without keys


def test_exponentials_across_the_float_range(fresh_build):
    """2^x to within 2 ulp wherever the result is a normal float, exactly 0 below 2^-126 and for masked
    scores."""
    x = torch.cat([torch.linspace(-126.0, 126.0, 100_003), torch.tensor([-126.5, -1e4, MASKED, 0.0, 1.0])])
    s = x.view(1, 1, 1, -1)
    got = run(compiled(), s, reference=False, n_q=1, start=0, n_k=x.numel(), lo=0)["e"].view(-1)
    # reference=False shifts by the maximum, 126: compare against 2^(x - 126), the difference taken in fp32
    # as the pass takes it
    want = torch.exp2((x - 126.0).double())
    normal = want >= 2.0**-126
    assert ((got.double()[normal] - want[normal]).abs() / want[normal]).max() < 2.5e-7
    assert got[~normal].eq(0).all()


def test_threads_split_heads_and_agree(fresh_build, monkeypatch):
    s, fused = tile(seed=1), compiled()
    one = run(fused, s, True, threads=1)
    two = run(fused, s, True, threads=2)
    assert fused.workers == 0  # this small chunk stays on the calling thread
    monkeypatch.setattr(fused_rows, "SPLIT_MIN_SCORES", 0)
    split = run(fused, s, True, threads=2)
    assert fused.workers == 1  # the calling thread and one pool thread
    for name in ("e", "shift", "sum", "dot", "centre", "mass"):
        assert torch.equal(one[name], two[name]) and torch.equal(one[name], split[name]), name


def test_build_is_cached_per_cpu_and_leaves_no_temporaries(fresh_build, monkeypatch):
    first = compiled().path
    assert first.parent == fresh_build / "kernels" and first.exists()
    fused_rows.build.cache_clear()
    assert compiled().path == first  # loaded from the cache
    monkeypatch.setattr(fused_rows, "cpu_identity", lambda: "another CPU")
    fused_rows.build.cache_clear()
    other = compiled().path
    assert other != first  # code built with -march=native is never loaded on another CPU
    assert sorted(p.name for p in (fresh_build / "kernels").iterdir()) == sorted([first.name, other.name])


def test_without_a_compiler_auto_takes_torch_ops_and_on_refuses(fresh_build, monkeypatch):
    monkeypatch.setattr(fused_rows, "find_compiler", lambda: None)
    monkeypatch.setenv(FUSED_ENV, "auto")
    assert fused_rows.pick(torch.device("cpu")) is None
    monkeypatch.setenv(FUSED_ENV, "on")
    with pytest.raises(InputError, match="no C compiler"):
        fused_rows.pick(torch.device("cpu"))
    assert list(Path(fresh_build).glob("kernels/*")) == []


def test_a_failing_compiler_is_reported_not_raised(fresh_build, monkeypatch):
    monkeypatch.setattr(fused_rows, "find_compiler", lambda: "/bin/false")
    fused, why = fused_rows.build()
    assert fused is None and "could not build" in why
    assert list(Path(fresh_build).glob("kernels/*")) == []  # nothing half-written


def test_off_meta_and_bad_values(monkeypatch):
    monkeypatch.setenv(FUSED_ENV, "off")
    assert fused_rows.pick(torch.device("cpu")) is None
    monkeypatch.setenv(FUSED_ENV, "auto")
    assert fused_rows.pick(torch.device("meta")) is None  # only CPU tensors take the compiled pass
    monkeypatch.setenv(FUSED_ENV, "fast")
    with pytest.raises(InputError, match="HEADLAB_FUSED_ROWS must be auto, on or off, got 'fast'"):
        fused_rows.pick(torch.device("cpu"))


def test_mismatched_tensors_are_refused_before_the_c_side(fresh_build):
    fused, s = compiled(), tile()
    buffers = dict(row=torch.zeros(2, 3, 9), weight=torch.ones(2, 9), mass=torch.zeros(2, 3, 50))
    good = (s, torch.empty_like(s), buffers["row"], buffers["row"].clone(), buffers["row"].clone(),
            buffers["row"].clone(), 3, buffers["weight"], None, buffers["mass"], 4, True, 1)
    fused.run(*good)
    for at, bad in [(9, torch.zeros(2, 3, 40)),  # keys [4, 41) do not fit in 40
                    (6, 7),  # rows [7, 12) do not fit in 9
                    (1, torch.empty(2, 3, 5, 37, dtype=torch.float64)),
                    (7, torch.ones(9, 2).t())]:  # not contiguous
        args = list(good)
        args[at] = bad
        with pytest.raises(ValueError, match="wrong shape"):
            fused.run(*args)


@pytest.mark.slow
def test_real_weights_agree_with_eager_and_the_torch_ops(load_model, monkeypatch):
    """smollm2-135m on 512 tokens (first-token sinks, a massive activation, scores far apart): every layer's
    statistics from the compiled row pass match eager attention as closely as the torch ops do."""
    from headlab.probes import AttentionProbe
    from headlab.prompts import bundled_prompts

    loaded = load_model("smollm2-135m")
    ids = loaded.tokenizer(" ".join(bundled_prompts()), return_tensors="pt").input_ids[:, :512]
    assert ids.shape[1] == 512

    def forward(backend: str, row_pass: str):
        monkeypatch.setenv(FUSED_ENV, row_pass)
        stats = {}
        with torch.no_grad(), AttentionProbe(loaded, on_stats=stats.__setitem__, backend=backend):
            logits = loaded.model(input_ids=ids, use_cache=False).logits
        return stats, logits

    eager, eager_logits = forward("eager", "off")
    for row_pass in ("on", "off"):
        stats, logits = forward("torch", row_pass)
        assert sorted(stats) == sorted(eager) and len(stats) == 30
        for layer, want in eager.items():
            got = stats[layer]
            torch.testing.assert_close(got.lse, want.lse, rtol=0, atol=1e-4)
            torch.testing.assert_close(got.entropy, want.entropy, rtol=0, atol=1e-4)
            torch.testing.assert_close(got.first_mass, want.first_mass, rtol=0, atol=1e-5)
            torch.testing.assert_close(got.key_mass, want.key_mass, rtol=1e-5, atol=1e-5 * 512)
        torch.testing.assert_close(logits, eager_logits, rtol=0, atol=1e-3)


def test_the_compiled_range_check_is_the_torch_backends():
    from headlab.kernels import torch_backend

    defines = dict(line.split()[1:3] for line in fused_rows.SOURCE.read_text().splitlines()
                   if line.startswith("#define SHIFT_"))
    assert float(defines["SHIFT_LOW"].rstrip("f")) == 2.0 ** -torch_backend.SHIFT_RANGE
    assert float(defines["SHIFT_HIGH"].rstrip("f")) == 2.0 ** torch_backend.SHIFT_RANGE
