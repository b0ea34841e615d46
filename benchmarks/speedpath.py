"""Statistics path against a plain sdpa forward on smollm2-135m, in process CPU time; quiet and busy machine.

Cases (batch 1, fp32, ``torch.no_grad()``, ``use_cache=False``), one prompt of T tokens from the bundled
prompts:

- ``sdpa``: the model as loaded (transformers' sdpa attention). The baseline of every ratio.
- ``stats``: the same forward inside ``AttentionProbe`` (headlab's attention function on every layer, the
  torch backend's chunked kernel, all default statistics; the callback drops them), with the row pass
  compiled for this CPU (``kernels/fused_rows.c``) where it builds.
- ``stats-torch-ops`` (quiet rows): the same with ``$HEADLAB_FUSED_ROWS=off``, the row pass as torch ops:
  what the compiled pass saves, measured in the same rounds.
- ``attn-sdpa`` / ``attn-stats`` (at ``--attention-T``): one attention call at smollm2's shape (9 query
  heads, 3 kv heads, head_dim 64, causal, random q/k/v): ``scaled_dot_product_attention(is_causal=True,
  enable_gqa=True)`` against ``torch_attention_with_stats`` (``attn-stats-torch-ops``: with the torch ops).

Measurement. Time is **process CPU time** (``time.process_time``, user + system of this process only), so
other processes on the machine change it far less than wall time. Rounds interleave the cases (sdpa,
stats, sdpa, stats, ...) so that drifts hit both alike; each number is the **minimum** over ``--rounds``
rounds, after one warm-up call per case. Peak memory of a call (``--memory``): in a fresh process (this
script with ``--_memory``), the peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs`` after loading)
of the first forward minus the RSS before it, in MiB.

First forward (``--first``): each case's first forward in a fresh process (this script with ``--_first``:
load the model, then one forward), wall and process CPU time, ``--first-rounds`` processes per case,
alternating; the ratio is the stats process's first forward over the sdpa process's (each pays its own
first-call costs: allocator, thread pool, the row pass's load or build).

The CPU (``cpu`` in the JSON): lscpu's model name, flags and cache sizes, and the per-core caches from
``/sys/devices/system/cpu/cpu0/cache``, so that every figure names the machine it came from.

Busy machine (``--busy``): the same interleaved rounds with the default torch thread count while a
competing CPU-bound process runs: ``python -c "while True: pass"`` started by this script (``--busy-pin``
pins it with ``taskset`` to one cpu), killed afterwards. Both cases run under the same load, so the ratio
is what a user on a shared machine sees; ``os.getloadavg()`` is recorded before and after.

Usage (repository root)::

    python benchmarks/speedpath.py                      # T = 1k, 4k, 8k, one thread, 3 rounds
    python benchmarks/speedpath.py --busy --lengths 1024 4096
    python benchmarks/speedpath.py --lengths 1024 4096 --first --out benchmarks/results/speedpath_cpu_x.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from pathlib import Path
from unittest import mock

import torch

RESULTS = Path(__file__).resolve().parent / "results"
BUSY_LOOP = "while True: pass"
# Set to run an AVX-512 CPU as an AVX2 one (torch's kernels, MKL, oneDNN, the row pass's build); recorded.
EMULATION_ENV = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "HEADLAB_FUSED_ROWS_CFLAGS",
                 "HEADLAB_CHUNK_ROWS", "OMP_NUM_THREADS")


def cpu_time(fn: Callable[[], object]) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def interleaved(cases: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Process CPU seconds of each case per round, the cases alternating within every round."""
    for fn in cases.values():
        fn()  # warm-up: thread pool, allocator, headlab's attention function registered
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            times[name].append(cpu_time(fn))
    return times


def torch_ops_row_pass():
    """The statistics path with its row pass as torch ops instead of the compiled one."""
    from headlab.kernels.fused_rows import FUSED_ENV

    return mock.patch.dict(os.environ, {FUSED_ENV: "off"})


def save(result: dict, out: Path) -> None:
    """Print the result's table and write the whole result as JSON."""
    print(result["markdown"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written {out}")


def model_cases(loaded, ids: torch.Tensor, compare: bool = False) -> dict[str, Callable[[], object]]:
    from headlab.probes import AttentionProbe

    model = loaded.model

    def forward(*make):
        def run():
            with torch.no_grad(), ExitStack() as stack:
                for m in make:
                    stack.enter_context(m())
                model(input_ids=ids, use_cache=False)
        return run

    def probe():
        return AttentionProbe(loaded, on_stats=lambda layer, stats: None)

    cases = {"sdpa": forward(nullcontext), "stats": forward(probe)}
    if compare:
        cases["stats-torch-ops"] = forward(torch_ops_row_pass, probe)
    return cases


def attention_cases(n: int, compare: bool = False) -> dict[str, Callable[[], object]]:
    from headlab.kernels import MaskSpec, torch_attention_with_stats

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 9, n, 64, generator=gen)
    k, v = (torch.randn(1, 3, n, 64, generator=gen) for _ in range(2))
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def stats():
        return torch_attention_with_stats(q, k, v, MaskSpec(causal=True), 0.125)

    def stats_torch_ops():
        with torch_ops_row_pass():
            return stats()

    cases = {"attn-sdpa": lambda: sdpa(q, k, v, is_causal=True, enable_gqa=True), "attn-stats": stats}
    if compare:
        cases["attn-stats-torch-ops"] = stats_torch_ops
    return cases


def prompt_ids(loaded, n_tokens: int) -> torch.Tensor:
    from headlab.prompts import bundled_prompts

    text = " ".join(bundled_prompts())
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids[0]
    return ids.repeat(n_tokens // len(ids) + 1)[:n_tokens][None]


def summarise(times: dict[str, list[float]], base: str) -> dict[str, dict]:
    best = {name: min(values) for name, values in times.items()}
    return {name: {"cpu_s": best[name], "ratio_to_sdpa": best[name] / best[base], "rounds_s": times[name]}
            for name in times}


def start_busy(pin: int | None) -> subprocess.Popen:
    cmd = [sys.executable, "-c", BUSY_LOOP]
    if pin is not None:
        cmd = ["taskset", "-c", str(pin), *cmd]
    proc = subprocess.Popen(cmd)
    time.sleep(1.0)  # let it reach the loop
    return proc


def memory_worker(case: str, n: int) -> None:
    """Fresh process: ru_maxrss growth over the first call of one case (MiB), printed as JSON."""
    import gc

    import headlab

    torch.set_num_threads(1)
    loaded = headlab.load("smollm2-135m", dtype="float32", device="cpu")
    fn = (model_cases(loaded, prompt_ids(loaded, n)) | attention_cases(n))[case]
    gc.collect()
    before = status_kib("VmRSS")
    # Reset the peak RSS (VmHWM) so that loading the model does not hide the forward's peak (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fn()
    print(json.dumps({"peak_mib": (status_kib("VmHWM") - before) / 1024}))


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def first_worker(case: str, n: int) -> None:
    """Fresh process: wall and CPU seconds of the first forward of one case, printed as JSON."""
    import headlab

    torch.set_num_threads(1)
    loaded = headlab.load("smollm2-135m", dtype="float32", device="cpu")
    fn = (model_cases(loaded, prompt_ids(loaded, n)) | attention_cases(n))[case]
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    print(json.dumps({"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}))


def first_forward(n: int, rounds: int, cases=("sdpa", "stats")) -> dict:
    """First-forward times of fresh processes, the cases alternating; minimum and all rounds, ratio to sdpa."""
    runs: dict[str, list[dict]] = {case: [] for case in cases}
    for _ in range(rounds):
        for case in cases:
            done = subprocess.run([sys.executable, __file__, "--_first", case, str(n)], capture_output=True,
                                  text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            if done.returncode != 0 or not lines:
                raise RuntimeError(f"first-forward worker {case} {n} failed: {done.stderr[-500:]}")
            runs[case].append(json.loads(lines[-1]))
    out: dict = {}
    for case, values in runs.items():
        out[case] = {key: min(v[key] for v in values) for key in ("wall_s", "cpu_s")} | {"rounds": values}
    for case in cases:
        for key in ("wall_s", "cpu_s"):
            out[case][f"ratio_{key}"] = out[case][key] / out[cases[0]][key]
    return out


def cpu_info() -> dict:
    """lscpu's model name, flags and caches, and the per-core caches the kernel reports in /sys."""
    info: dict = {}
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key in ("Model name", "Vendor ID", "CPU family", "Model", "Hypervisor vendor") or "cache" in key:
            info[key] = value
        elif key == "Flags":
            info["Flags"] = value
            info["vector"] = ("avx512f" if "avx512f" in value.split() else
                              "avx2" if "avx2" in value.split() else "other")
    caches = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind, size = ((index / name).read_text().strip() for name in ("level", "type", "size"))
        except OSError:
            continue
        caches[f"L{level} {kind}"] = size
    info["cpu0_caches"] = caches
    info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return info


def memory(case: str, n: int) -> float | None:
    done = subprocess.run([sys.executable, __file__, "--_memory", case, str(n)], capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])["peak_mib"] if done.returncode == 0 and lines else None


def run(args) -> dict:
    import headlab
    from headlab.kernels import fused_rows
    from headlab.kernels.torch_backend import pick_chunk_size

    loaded = headlab.load("smollm2-135m", dtype="float32", device="cpu")
    result: dict = {"model": "smollm2-135m", "dtype": "float32", "batch": 1, "rounds": args.rounds,
                    "measure": "process CPU time (time.process_time), minimum over interleaved rounds",
                    "torch": torch.__version__, "chunk_rows": {n: pick_chunk_size(1, 9, n) for n in args.lengths},
                    "machine": platform.processor() or platform.machine(), "cpu": cpu_info(),
                    "env": {name: os.environ[name] for name in EMULATION_ENV if name in os.environ},
                    "cpu_count": os.cpu_count(), "command": " ".join(sys.argv), "quiet": [], "busy": [],
                    "row_pass": fused_rows.build()[1]}
    default_threads = torch.get_num_threads()  # torch's own default: one per physical core
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    for n in args.lengths:
        cases = model_cases(loaded, prompt_ids(loaded, n), compare=True)
        row = {"T": n, "threads": args.threads, **summarise(interleaved(cases, args.rounds), "sdpa")}
        if n == args.attention_T:
            row.update(summarise(interleaved(attention_cases(n, compare=True), args.rounds), "attn-sdpa"))
        if args.memory:
            row["peak_mib"] = {case: memory(case, n) for case in ("sdpa", "stats")}
        if args.first:
            row["first"] = first_forward(n, args.first_rounds)
        result["quiet"].append(row)
        print(json.dumps({k: (v["ratio_to_sdpa"] if isinstance(v, dict) and "ratio_to_sdpa" in v else v)
                          for k, v in row.items()}), flush=True)
    result["quiet_loadavg"] = [load_before, os.getloadavg()]
    if args.busy:
        torch.set_num_threads(args.busy_threads or default_threads)
        threads = torch.get_num_threads()
        busy = start_busy(args.busy_pin)
        try:
            load = [os.getloadavg()]
            for n in args.busy_lengths or args.lengths:
                times = interleaved(model_cases(loaded, prompt_ids(loaded, n)), args.rounds)
                row = {"T": n, "threads": threads, **summarise(times, "sdpa")}
                if n == args.attention_T:
                    row.update(summarise(interleaved(attention_cases(n), args.rounds), "attn-sdpa"))
                result["busy"].append(row)
                print("busy", json.dumps({"T": n, "ratio": row["stats"]["ratio_to_sdpa"]}), flush=True)
            load.append(os.getloadavg())
        finally:
            busy.kill()
            busy.wait()
        result["busy_load"] = {"how": f"one competing process `{sys.executable} -c '{BUSY_LOOP}'`"
                                      + (f" pinned to cpu {args.busy_pin} with taskset" if args.busy_pin is not None
                                         else " (not pinned)") + f"; torch threads {threads}",
                               "loadavg": load}
    return result


def markdown(result: dict) -> str:
    cpu = result.get("cpu", {})
    lines = [f"CPU: {cpu.get('Model name', '?')} ({cpu.get('vector', '?')}; L2 {cpu.get('L2 cache', '?')}, "
             f"L3 {cpu.get('L3 cache', '?')}), torch {result['torch']}"
             + (f"; run with {' '.join(f'{k}={v}' for k, v in result['env'].items())}" if result.get("env") else ""),
             "",
             "| T | threads | load | sdpa s | stats s | stats / sdpa | attention call / sdpa's "
             "| same, torch-ops row pass: stats / sdpa | call / sdpa's | first forward / sdpa's (wall, CPU) |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]

    def ratio(row: dict, case: str) -> str:
        return f"{row[case]['ratio_to_sdpa']:.2f}" if case in row else ""

    def first(row: dict) -> str:
        if "first" not in row:
            return ""
        stats = row["first"]["stats"]
        return f"{stats['ratio_wall_s']:.2f}, {stats['ratio_cpu_s']:.2f}"

    for kind in ("quiet", "busy"):
        for row in result[kind]:
            lines.append(f"| {row['T']} | {row['threads']} | {kind} | {row['sdpa']['cpu_s']:.3f} | "
                         f"{row['stats']['cpu_s']:.3f} | {ratio(row, 'stats')} | {ratio(row, 'attn-stats')} | "
                         f"{ratio(row, 'stats-torch-ops')} | {ratio(row, 'attn-stats-torch-ops')} | {first(row)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--attention-T", type=int, default=4096, help="T of the single attention call timed")
    parser.add_argument("--memory", action="store_true", help="also peak RSS growth per case (fresh processes)")
    parser.add_argument("--first", action="store_true",
                        help="also the first forward of a fresh process per case (wall and CPU time)")
    parser.add_argument("--first-rounds", type=int, default=2, help="fresh processes per case for --first")
    parser.add_argument("--busy", action="store_true", help="also time under one competing CPU-bound process")
    parser.add_argument("--busy-lengths", type=int, nargs="+")
    parser.add_argument("--busy-threads", type=int, help="torch threads under load (default: torch's default)")
    parser.add_argument("--busy-pin", type=int, help="pin the competing process to this cpu (taskset)")
    parser.add_argument("--out", type=Path, default=RESULTS / "speedpath_cpu.json")
    parser.add_argument("--_memory", nargs=2, metavar=("CASE", "T"), help=argparse.SUPPRESS)
    parser.add_argument("--_first", nargs=2, metavar=("CASE", "T"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._memory:
        memory_worker(args._memory[0], int(args._memory[1]))
        return
    if args._first:
        first_worker(args._first[0], int(args._first[1]))
        return
    result = run(args)
    result["markdown"] = markdown(result)
    save(result, args.out)


if __name__ == "__main__":
    main()
