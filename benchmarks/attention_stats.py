"""CPU benchmark: what reading attention statistics costs, against plain sdpa and eager ``output_attentions``.

Model: a tiny random-init Qwen3-style causal LM built from a config (no hub, no download): 4 layers,
8 query heads, 2 kv heads (GQA), head_dim 32, hidden 256, fp32, eval mode. Input: one sequence of
``T`` random token ids (batch 1, fixed seed). Three ways to run one forward pass under
``torch.no_grad()`` (``use_cache=False`` everywhere, so no KV cache is built):

- ``sdpa``: the plain forward with ``attn_implementation="sdpa"``; no statistics. The baseline.
- ``headlab-stats``: the forward inside ``headlab.probes.AttentionProbe``; every layer runs
  ``headlab.kernels`` (torch backend on CPU, query chunks, never T x T) and its ``AttentionStats``
  go to ``KeyImportance(n_layers, n_heads, 8, 0.3)`` and ``RowMeans(n_layers, n_heads)``.
- ``eager-output_attentions``: ``attn_implementation="eager"`` and ``output_attentions=True``, which
  keeps one ``[1, head, T, T]`` fp32 matrix per layer; each is then reduced with
  ``headlab.kernels.stats_from_probs`` into the same two accumulators (and released layer by
  layer), so the work matches ``headlab-stats``. The reduction is inside the timed/measured region.

How it is measured. Each (method, T) runs in a fresh Python process (this script re-invoked with a
hidden ``--_worker`` flag), so peaks of one case never leak into another and a real out-of-memory
kill (SIGKILL from the kernel OOM killer) is reported instead of crashing the benchmark. Inside
the worker: build the model, create the input, ``gc.collect()`` and ``malloc_trim(0)``, then read
``ru_maxrss`` (``resource.getrusage(RUSAGE_SELF)``), run the **first** forward pass of the process,
and read ``ru_maxrss`` again: ``peak MiB`` = the difference (peak RSS growth of that forward). No
warm-up runs before it, so no warm-up can inflate the baseline; the flip side is that one-time
lazy initialisation (thread pool, kernel dispatch caches) is counted too, which matters only at
small T. That first forward is also the warm-up for timing: ``time s`` is the minimum **process CPU
time** (``time.process_time``, this process only, so other work on a shared machine changes it far less
than wall time) of the ``--repeats`` forward passes that follow it. The JSON also keeps the
current RSS right before the measured forward (``rss_before_mib``) and the pre-forward ``ru_maxrss``
(``maxrss_before_mib``): when the latter is larger, part of the forward's peak hid under an older
peak and ``peak MiB`` is a lower bound; ``peak_over_rss_mib`` (peak minus the current RSS before)
is the upper-bound reading.

The cpus may be shared with other work: the worker also records, over the timed repeats, the CPU
time that other processes used (``/proc/stat`` busy time minus its own ``getrusage`` time), as
``other_load_cores``; rows above 0.1 cores are listed under the table, since with two torch threads
a busy second core slows OpenMP barriers down by an order of magnitude (``--threads 1`` avoids it).

Eager is not started when its attention weights alone, ``L * H * T^2 * 4`` bytes, exceed
``--max-eager-gib`` or 90 % of the memory available now; the row then says
``skipped (estimated X GiB)``. A ``RuntimeError``/``MemoryError`` about memory inside the worker,
or the worker being killed by SIGKILL, is recorded as ``OOM``. Ratios are against the ``sdpa`` row of
the same T measured in the same run.

Usage (from the repository root)::

    HF_HUB_OFFLINE=1 python benchmarks/attention_stats.py --lengths 512 2048 8192 --repeats 3
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

METHODS = ("sdpa", "headlab-stats", "eager-output_attentions")
MODEL_CONFIG: dict[str, Any] = dict(
    vocab_size=260, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=2, head_dim=32, max_position_embeddings=16384, tie_word_embeddings=True,
)
N_THREADS = 1
SEED = 0
N_KEYS, EPS = 8, 0.3
DEFAULT_JSON = Path("benchmarks/results/attention_stats_cpu.json")
BUSY_CORES = 0.1  # foreign CPU load above which a timing is flagged as shared
MIB = 2**20
GIB = 2**30


# --------------------------------------------------------------------------------------------- worker


def maxrss_bytes() -> int:
    """Peak RSS of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def current_rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def busy_cpu_seconds() -> float | None:
    """CPU seconds all processes on the machine spent busy so far (``/proc/stat``, all cpus)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def release_free_memory() -> None:
    """Collect garbage and hand freed heap back to the OS, so the baseline RSS is as low as it gets."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def build_model():
    """The tiny Qwen3-style model, fp32 eval, wrapped as a headlab ``LoadedModel``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from headlab.arch import Arch
    from headlab.loading import LoadedModel

    cfg = AutoConfig.for_model("qwen3", **MODEL_CONFIG)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    loaded = LoadedModel("bench-qwen3", model, None, Arch.from_model(model, None), "benchmark")
    return model, loaded


def make_runner(method: str, model, loaded) -> tuple[Callable[[Any], None], Callable[[], dict[str, float]]]:
    """One forward pass of ``method`` (statistics included), and a reader of a small checksum."""
    import torch

    from headlab.kernels import MaskSpec, stats_from_probs
    from headlab.probes import AttentionProbe, KeyImportance, RowMeans

    n_layers, n_heads = loaded.arch.n_layers, loaded.arch.n_heads
    keys = KeyImportance(n_layers, n_heads, N_KEYS, EPS)
    rows = RowMeans(n_layers, n_heads)

    def on_stats(layer: int, stats) -> None:
        keys.add(layer, stats)
        rows.add(layer, stats)

    def check() -> dict[str, float]:
        if rows.rows.sum() == 0:
            return {}
        return {"mean_entropy": float(rows.entropy().mean()), "mean_first_mass": float(rows.first_mass().mean()),
                "mean_alpha_key0": float(keys.alpha()[:, :, 0].mean())}

    if method == "sdpa":
        model.set_attn_implementation("sdpa")

        def run(ids) -> None:
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)

    elif method == "headlab-stats":
        model.set_attn_implementation("sdpa")

        def run(ids) -> None:
            with torch.no_grad(), AttentionProbe(loaded, on_stats=on_stats):
                model(input_ids=ids, use_cache=False)

    elif method == "eager-output_attentions":
        model.set_attn_implementation("eager")
        causal = MaskSpec(causal=True)

        def run(ids) -> None:
            with torch.no_grad():
                out = model(input_ids=ids, use_cache=False, output_attentions=True)
                attentions = list(out.attentions)
                del out
                for layer in range(n_layers):
                    probs, attentions[layer] = attentions[layer], None
                    stats = stats_from_probs(probs, causal)
                    del probs
                    on_stats(layer, stats)
                    del stats

    else:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return run, check


def is_oom(err: BaseException) -> bool:
    if isinstance(err, MemoryError):
        return True
    text = str(err).lower()
    return "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text \
        or "failed to allocate" in text


def worker(method: str, length: int, repeats: int, threads: int) -> dict[str, Any]:
    """Run inside the fresh process: memory on the first forward, time over the next ``repeats``."""
    import torch

    torch.set_num_threads(threads)
    model, loaded = build_model()
    run, check = make_runner(method, model, loaded)
    gen = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, 256, (1, length), generator=gen)

    release_free_memory()
    rss_before = current_rss_bytes()
    before = maxrss_bytes()
    try:
        start = time.perf_counter()
        run(ids)
        first_s = time.perf_counter() - start
        after = maxrss_bytes()
        times = []
        busy0, own0, wall0 = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
        for _ in range(repeats):
            start = time.process_time()
            run(ids)
            times.append(time.process_time() - start)
        busy1, own1, wall1 = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
    except (RuntimeError, MemoryError) as err:
        if is_oom(err):
            return {"status": "OOM", "note": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
        raise
    return {
        "status": "ok",
        "time_s": min(times) if times else first_s,
        "times_s": times,
        "first_forward_s": first_s,
        "peak_mib": (after - before) / MIB,
        "maxrss_before_mib": before / MIB,
        "maxrss_after_mib": after / MIB,
        "rss_before_mib": None if rss_before is None else rss_before / MIB,
        "peak_over_rss_mib": None if rss_before is None else (after - rss_before) / MIB,
        "own_cpu_cores": (own1 - own0) / max(wall1 - wall0, 1e-9),
        # CPU time other processes burnt on this machine while the repeats ran, in cores: > ~0.1 means
        # the timings shared the cpus (with 2 threads, OpenMP barriers then slow down a lot).
        "other_load_cores": None if busy0 is None or busy1 is None
        else max(0.0, (busy1 - busy0) - (own1 - own0)) / max(wall1 - wall0, 1e-9),
        "check": check(),
    }


# --------------------------------------------------------------------------------------------- driver


def eager_estimate_bytes(length: int) -> int:
    """The ``output_attentions`` matrices alone: L * H * T^2 fp32."""
    return MODEL_CONFIG["num_hidden_layers"] * MODEL_CONFIG["num_attention_heads"] * length**2 * 4


def run_case(method: str, length: int, repeats: int, threads: int, timeout: float) -> dict[str, Any]:
    """One (method, T) in a fresh interpreter; the worker prints its result as the last stdout line."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", method, str(length),
           "--repeats", str(repeats), "--threads", str(threads)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "note": f"worker ran past {timeout:.0f} s"}
    if proc.returncode == -signal.SIGKILL:
        return {"status": "OOM", "note": "worker killed by SIGKILL (kernel OOM killer)"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"status": "error", "note": f"exit {proc.returncode}: {' | '.join(tail)[:400]}"}
    return json.loads(lines[-1])


def machine(threads: int) -> dict[str, Any]:
    import torch
    import transformers

    total = None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    except (ValueError, OSError, AttributeError):
        pass
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "memory_gib": None if total is None else round(total, 1),
        "device": "cpu",
    }


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base <= 0:
        return None
    return value / base


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(rows: list[dict[str, Any]]) -> str:
    out = ["| T | method | time s | peak MiB | time / sdpa | memory / eager |",
           "|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        if r["status"] == "ok":
            cells = [fmt(r["time_s"], ".3f"), fmt(r["peak_mib"], ".1f"),
                     fmt(r.get("time_ratio"), ".2f"), fmt(r.get("memory_vs_eager"), ".3f")]
        else:
            label = r["status"] if r["status"] != "skipped" else r["note"]
            cells = [label, "—", "—", "—"]
        out.append(f"| {r['T']} | {r['method']} | " + " | ".join(cells) + " |")
    busy = [f"T={r['T']} {r['method']} ({r['other_load_cores']:.2f})" for r in rows
            if (r.get("other_load_cores") or 0) > BUSY_CORES]
    if busy:
        out.append(f"\nOther processes used > {BUSY_CORES} cores while these were timed (cores in brackets): "
                   + ", ".join(busy) + ".")
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192], help="sequence lengths T")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards after the measured first one")
    parser.add_argument("--repeats-long", type=int, nargs=2, metavar=("MIN_T", "N"), default=None,
                        help="use N repeats instead for T >= MIN_T (e.g. 8192 2)")
    parser.add_argument("--threads", type=int, default=N_THREADS, help="torch.set_num_threads in workers")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--max-eager-gib", type=float, default=16.0,
                        help="skip eager when L*H*T^2*4 bytes exceeds this")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per (method, T) worker")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the results")
    parser.add_argument("--_worker", nargs=2, metavar=("METHOD", "T"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args._worker:
        method, length = args._worker[0], int(args._worker[1])
        print(json.dumps(worker(method, length, args.repeats, args.threads)), flush=True)
        return

    methods = ["sdpa"] + [m for m in args.methods if m != "sdpa"]  # the baseline always runs, first
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for length in args.lengths:
        repeats = args.repeats
        if args.repeats_long and length >= args.repeats_long[0]:
            repeats = args.repeats_long[1]
        base: dict[str, Any] = {}
        for method in methods:
            row: dict[str, Any] = {"T": length, "method": method, "repeats": repeats}
            if method == "eager-output_attentions":
                need = eager_estimate_bytes(length)
                row["estimate_gib"] = need / GIB
                avail = available_bytes()
                if need > args.max_eager_gib * GIB or (avail is not None and need > 0.9 * avail):
                    row.update(status="skipped", note=f"skipped (estimated {need / GIB:.1f} GiB)")
                    rows.append(row)
                    print(f"T={length} {method}: {row['note']}", file=sys.stderr, flush=True)
                    continue
            tick = time.perf_counter()
            row.update(run_case(method, length, repeats, args.threads, args.timeout))
            row["wall_s"] = time.perf_counter() - tick
            if method == "sdpa" and row["status"] == "ok":
                base = row
            if row["status"] == "ok":
                row["time_ratio"] = ratio(row["time_s"], base.get("time_s"))
                # sdpa's own peak is allocator noise (8-30 MiB): memory is quoted in MiB and against eager
                row["memory_vs_eager"] = None
            rows.append(row)
            summary = (f"time {row['time_s']:.3f} s, peak {row['peak_mib']:.1f} MiB, "
                       f"other load {fmt(row.get('other_load_cores'), '.2f')} cores" if row["status"] == "ok"
                       else f"{row['status']}: {row.get('note', '')}")
            print(f"T={length} {method}: {summary} (worker {row['wall_s']:.0f} s)", file=sys.stderr, flush=True)

    eager_peak = {r["T"]: r["peak_mib"] for r in rows if r["method"] == "eager-output_attentions"
                  and r["status"] == "ok"}
    for r in rows:
        if r["status"] == "ok" and eager_peak.get(r["T"]):
            r["memory_vs_eager"] = r["peak_mib"] / eager_peak[r["T"]]
    table = markdown(rows)
    print(table)
    result = {
        "benchmark": "attention_stats",
        "description": "one forward pass, batch 1, fp32, CPU; peak = ru_maxrss growth over the first "
                       "forward in a fresh process; time = minimum process CPU time of the following repeats",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(args.threads),
        "model": {"model_type": "qwen3", **MODEL_CONFIG, "dtype": "float32", "random_init_seed": SEED},
        "statistics": {"KeyImportance": {"n_keys": N_KEYS, "eps": EPS}, "RowMeans": {}},
        "max_eager_gib": args.max_eager_gib,
        "total_wall_s": time.perf_counter() - started,
        "rows": rows,
        "markdown": table,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
