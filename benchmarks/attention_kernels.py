"""Kernel benchmark: what one attention call with statistics costs against a plain fused forward.

One attention call (batch 1, causal, GQA, random q/k/v, fixed seed), timed and measured per method:

- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention(..., is_causal=True, enable_gqa=True)``;
  on CUDA in bf16 it runs the flash kernel. No statistics. The baseline.
- ``headlab-forward`` (CUDA only): the Triton forward kernel alone (output, lse, entropy, first mass).
- ``headlab-stats``: everything ``attention_with_stats`` returns by default, i.e. forward plus the
  column pass (mass received per key, key counts): the Triton backend on CUDA, the torch backend on CPU.
- ``eager``: ``headlab.kernels.eager_attention_with_stats``, which materialises the
  ``[batch, head, T, T]`` fp32 probabilities (what ``output_attentions`` costs); ``OOM`` when it does not fit.

Shapes. CUDA: Qwen3-14B attention (40 query heads, 8 kv heads, head_dim 128) and Llama-style (32 / 8 /
128), T in {1k, 4k, 16k, 32k}, bf16. CPU: the same head_dim with 8 query heads on 2 kv heads (fewer
heads than the GPU shapes, so that eager fits and a run takes minutes) and smollm2-135m's attention (9 / 3 /
64), fp32, T in {1k, 2k, 4k}.

Measurement. CUDA: one warm-up call (compilation), then the median of ``--repeats`` calls timed with CUDA
events; peak memory = ``torch.cuda.max_memory_allocated`` during the timed calls minus the memory held
before (the inputs), i.e. the extra memory a method needs. CPU: each (method, T) runs in a fresh
process (this script with ``--_worker``, one torch thread by default): peak = growth of ``ru_maxrss`` over
the first call after ``gc.collect()`` / ``malloc_trim``, time = the minimum **process CPU time**
(``time.process_time``: this process only, so other work on a shared machine changes it far less than wall
time) of the calls after it; a worker killed by the OOM killer is reported as ``OOM``. Memory is quoted in
MiB and against eager (sdpa's own peak is allocator noise, 8-30 MiB, so no ratio to it).
On CUDA the script also checks the compiled Triton kernels against
eager at T = 1024 (max abs error of the output and each statistic, in the JSON under ``check``).

Usage (repository root)::

    python benchmarks/attention_kernels.py                      # CUDA if present, else CPU
    python benchmarks/attention_kernels.py --device cpu --lengths 1024 2048 4096 --repeats 3
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
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
GPU_SHAPES = {"qwen3-14b": (40, 8, 128), "llama": (32, 8, 128)}
CPU_SHAPES = {"cpu-8h": (8, 2, 128), "smollm2": (9, 3, 64)}
GPU_LENGTHS = [1024, 4096, 16384, 32768]
CPU_LENGTHS = [1024, 2048, 4096]


def make_inputs(heads: int, kv_heads: int, dim: int, n: int, dtype: torch.dtype, device: str):
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, heads, n, dim, generator=gen, device=device, dtype=dtype)
    k = torch.randn(1, kv_heads, n, dim, generator=gen, device=device, dtype=dtype)
    v = torch.randn(1, kv_heads, n, dim, generator=gen, device=device, dtype=dtype)
    return q, k, v


def method_fn(method: str, q, k, v):
    """A zero-argument callable running one attention call of ``method``."""
    from headlab.kernels import MaskSpec, eager_attention_with_stats, torch_attention_with_stats

    mask = MaskSpec(causal=True)
    scale = q.shape[-1] ** -0.5
    if method == "sdpa":
        return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    if method == "eager":
        return lambda: eager_attention_with_stats(q, k, v, mask, scale)
    if method == "headlab-stats" and q.device.type == "cpu":
        return lambda: torch_attention_with_stats(q, k, v, mask, scale)
    from headlab.kernels.triton_backend import triton_attention_with_stats, triton_forward

    if method == "headlab-stats":
        return lambda: triton_attention_with_stats(q, k, v, mask, scale)
    if method == "headlab-forward":
        return lambda: triton_forward(q, k, v, mask, scale)
    raise ValueError(f"unknown method {method}")


# --- CUDA: in-process, CUDA events and the allocator's peak counter ---------------------------------

def measure_cuda(method: str, q, k, v, repeats: int) -> dict:
    fn = method_fn(method, q, k, v)
    try:
        fn()  # warm-up: Triton compilation, cuBLAS/cuDNN plans
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
            del result
        peak = torch.cuda.max_memory_allocated() - base
    except torch.OutOfMemoryError:
        gc.collect()
        torch.cuda.empty_cache()
        return {"status": "OOM"}
    return {"status": "ok", "time_s": statistics.median(times), "peak_mib": peak / 2**20}


def check_against_eager(shape: tuple[int, int, int]) -> dict:
    """Max abs difference of compiled Triton vs eager at T = 1024 (bf16 and fp32 inputs)."""
    from headlab.kernels import MaskSpec, StatsRequest, eager_attention_with_stats
    from headlab.kernels.triton_backend import triton_attention_with_stats

    report = {}
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = make_inputs(*shape, 1024, dtype, "cuda")
        mask = MaskSpec(causal=True)
        request = StatsRequest(distance=True, key_groups=(torch.arange(1024, device="cuda") % 3)[None],
                               n_groups=3, group_outputs=True)
        got = triton_attention_with_stats(q, k, v, mask, shape[2] ** -0.5, request=request)
        want = eager_attention_with_stats(q, k, v, mask, shape[2] ** -0.5, request=request)
        errors = {"out": (got[0].float() - want[0].float()).abs().max().item()}
        for name in ("lse", "entropy", "key_mass", "first_mass", "distance_mass", "group_mass", "group_out"):
            errors[name] = (getattr(got[1], name).float() - getattr(want[1], name).float()).abs().max().item()
        report[str(dtype).replace("torch.", "")] = errors
    return report


def run_cuda(args) -> dict:
    rows = []
    for shape_name, shape in GPU_SHAPES.items():
        for n in args.lengths or GPU_LENGTHS:
            q, k, v = make_inputs(*shape, n, torch.bfloat16, "cuda")
            for method in ("sdpa", "headlab-forward", "headlab-stats", "eager"):
                rows.append({"shape": shape_name, "T": n, "method": method, **measure_cuda(method, q, k, v,
                                                                                          args.repeats)})
                print(rows[-1], flush=True)
            del q, k, v
    return {"device": torch.cuda.get_device_name(), "dtype": "bfloat16", "rows": rows,
            "check": check_against_eager(GPU_SHAPES["llama"])}


# --- CPU: one fresh process per case, RSS growth ----------------------------------------------------

def worker(args) -> None:
    torch.set_num_threads(args.threads)
    heads, kv_heads, dim = CPU_SHAPES[args.shape]
    q, k, v = make_inputs(heads, kv_heads, dim, args.n, torch.float32, "cpu")
    fn = method_fn(args.method, q, k, v)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    times = []
    for _ in range(args.repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    print(json.dumps({"status": "ok", "time_s": min(times), "times_s": times, "peak_mib": peak_kib / 1024,
                      "loadavg": os.getloadavg()}))


def run_cpu_case(args, shape: str, method: str, n: int) -> dict:
    heads = CPU_SHAPES[shape][0]
    if method == "eager" and heads * n * n * 4 * 3 > args.max_eager_gib * 2**30:
        return {"status": f"skipped (> {args.max_eager_gib} GiB)"}
    cmd = [sys.executable, __file__, "--_worker", "--shape", shape, "--method", method, "--n", str(n),
           "--repeats", str(args.repeats), "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode == -signal.SIGKILL:
        return {"status": "OOM"}
    if done.returncode != 0:
        if "memory" in done.stderr.lower():
            return {"status": "OOM"}
        raise RuntimeError(f"{method} T={n} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_cpu(args) -> dict:
    rows = []
    for shape_name in CPU_SHAPES:
        for n in args.lengths or CPU_LENGTHS:
            for method in ("sdpa", "headlab-stats", "eager"):
                rows.append({"shape": shape_name, "T": n, "method": method,
                             **run_cpu_case(args, shape_name, method, n)})
                print(rows[-1], flush=True)
    return {"device": f"CPU ({platform.processor() or platform.machine()}, {args.threads} threads)",
            "dtype": "float32", "time": "process CPU time, minimum of the repeats", "rows": rows}


# --- report -----------------------------------------------------------------------------------------

def table(result: dict) -> str:
    shapes = {"qwen3-14b": "H=40 KV=8 d=128", "llama": "H=32 KV=8 d=128", "cpu-8h": "H=8 KV=2 d=128",
              "smollm2": "H=9 KV=3 d=64"}
    lines = [f"device: {result['device']}, {result['dtype']}, batch 1, causal", "",
             "| shape | T | method | time ms | peak extra MiB | time / sdpa | memory / eager |",
             "|---|---:|---|---:|---:|---:|---:|"]
    ok = [r for r in result["rows"] if r["status"] == "ok"]
    base = {(r["shape"], r["T"]): r for r in ok if r["method"] == "sdpa"}
    eager = {(r["shape"], r["T"]): r for r in ok if r["method"] == "eager"}
    for row in result["rows"]:
        label = f"| {shapes[row['shape']]} | {row['T']} | {row['method']} |"
        if row["status"] != "ok":
            lines.append(f"{label} {row['status']} | | | |")
            continue
        ref, big = base.get((row["shape"], row["T"])), eager.get((row["shape"], row["T"]))
        time_ratio = f"{row['time_s'] / ref['time_s']:.2f}" if ref else ""
        mem_ratio = f"{row['peak_mib'] / big['peak_mib']:.3f}" if big and big["peak_mib"] > 0 else ""
        lines.append(f"{label} {row['time_s'] * 1000:.1f} | {row['peak_mib']:.1f} | {time_ratio} | {mem_ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--lengths", type=int, nargs="+")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-eager-gib", type=float, default=24.0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--_worker", action="store_true")
    parser.add_argument("--shape")
    parser.add_argument("--method")
    parser.add_argument("--n", type=int)
    args = parser.parse_args()
    if args._worker:
        worker(args)
        return
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    result = run_cuda(args) if device == "cuda" else run_cpu(args)
    result.update(torch=torch.__version__, repeats=args.repeats, command=" ".join(sys.argv))
    text = table(result)
    print(text)
    if "check" in result:
        print("compiled Triton vs eager, max abs error at T=1024:", json.dumps(result["check"], indent=1))
    out = args.out or RESULTS / f"kernels_{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
