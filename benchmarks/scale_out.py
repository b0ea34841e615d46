"""What data parallelism buys on this machine: one process against two torchrun ranks and a two-job array.

Each case runs the real command line (``analyze sinks`` or ``analyze position-bias`` on smollm2-135m) in fresh
processes and times the wall clock from start to the run on disk, model loading included, because that is what
a user waits for. The prompts: ``--n-prompts`` distinct English prompts made by joining two of the bundled ones
(prompt i = bundled[i mod m] + bundled[(7i + 3) mod m]), long enough for ``--max-tokens``. Cases:

- ``one process, 1 thread`` and ``one process, 2 threads``: the baselines (``--threads``);
- ``torchrun 2 ranks x 1 thread``: ``torchrun --nproc-per-node 2`` (gloo), each rank its own replica;
- ``2 shards x 1 thread + merge``: ``--shard 0/2`` and ``--shard 1/2`` started together, then
  ``headlab runs merge`` (which opens the model again for what follows the first pass).

Every parallel run is checked against the one-process run (tables within 1e-6) before its time counts.
The speed-up is the 1-thread process's time over the case's; ``startup`` (the same command on one prompt) is
the fixed cost in every process (imports, model load), and the second column of speed-ups takes it out of
both sides. Usage (repository root, an idle machine)::

    python benchmarks/scale_out.py                       # sinks, 256 prompts x 128 tokens
    python benchmarks/scale_out.py --analysis position-bias --n-prompts 32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BIN = Path(sys.executable).parent


def prompt_file(folder: Path, n: int) -> Path:
    from headlab.cli.scaling import write_prompts_file
    from headlab.prompts import bundled_prompts

    bundled = bundled_prompts()
    return write_prompts_file(folder, [f"{bundled[i % len(bundled)]} {bundled[(7 * i + 3) % len(bundled)]}"
                                       for i in range(n)])


def command(args: argparse.Namespace, prompts: Path) -> list[str]:
    base = [args.analysis, "--model", args.model, "--prompts", str(prompts), "--max-tokens",
            str(args.max_tokens), "--batch-size", str(args.batch_size), "--quiet"]
    if args.analysis == "position-bias":  # the profile pass only: rollout and retrieval are small fixed costs
        base += ["--rollout-tokens", "0", "--retrieval-trials", "0"]
    return base


def timed(argvs: list[list[str]], env: dict) -> float:
    """Start every command at once, wait for all; seconds of wall clock."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen(a, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for a in argvs]
    for p, a in zip(procs, argvs, strict=True):
        out, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(a)} failed ({p.returncode}):\n{err[-3000:]}")
    return time.perf_counter() - t0


def same_tables(a: Path, b: Path) -> None:
    import pandas as pd

    from headlab.result import Result

    x, y = Result.load(a), Result.load(b)
    for key in x.tables:
        pd.testing.assert_frame_equal(x.tables[key], y.tables[key], check_exact=False, rtol=1e-6, atol=1e-7)


def cases(base: list[str], runs: Path, env: dict) -> dict:
    """Each case: a function that runs it under ``runs`` and returns its seconds."""
    analyze, headlab = str(BIN / "analyze"), str(BIN / "headlab")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29611"]

    def out(name: str, folder: Path = runs) -> list[str]:
        return ["--out", str(folder), "--name", name]

    def shards_and_merge() -> float:
        jobs = [[analyze, *base, "--threads", "1", "--shard", f"{k}/2", *out(f"p{k}", runs / "parts")]
                for k in range(2)]
        merge = [headlab, "runs", "merge", str(runs / "parts" / "p0"), str(runs / "parts" / "p1"), *out("merged")]
        return timed(jobs, env) + timed([merge], env)

    return {
        "startup (1 prompt, 1 thread)": lambda: timed([[analyze, *base, "--n-prompts", "1", "--threads", "1",
                                                        *out("startup")]], env),
        "one process, 1 thread": lambda: timed([[analyze, *base, "--threads", "1", *out("one")]], env),
        "one process, 2 threads": lambda: timed([[analyze, *base, "--threads", "2", *out("two")]],
                                                {**env, "OMP_NUM_THREADS": "2"}),
        "torchrun 2 ranks x 1 thread": lambda: timed([[*torchrun, analyze, *base, "--threads", "1", *out("ranks")]],
                                                     env),
        "2 shards x 1 thread + merge": shards_and_merge,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--analysis", default="sinks", choices=["sinks", "position-bias"])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n-prompts", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="rounds, cases interleaved; the minimum counts")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    work = Path(tempfile.mkdtemp(prefix="headlab-scale-"))
    base = command(args, prompt_file(work, args.n_prompts))
    times: dict[str, list[float]] = {}
    try:
        for round_ in range(args.repeats):
            runs = work / f"round{round_}"
            for name, case in cases(base, runs, env).items():
                times.setdefault(name, []).append(case())
                print(f"round {round_}: {name}: {times[name][-1]:.1f} s", flush=True)
            for name in ("two", "ranks", "merged"):
                same_tables(runs / "one", runs / name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best = {name: min(t) for name, t in times.items()}
    startup = best.pop("startup (1 prompt, 1 thread)")
    base_time = best["one process, 1 thread"]
    print(f"\n{args.analysis} on {args.model}: {args.n_prompts} prompts x {args.max_tokens} tokens, batch "
          f"{args.batch_size}; wall clock incl. model load, min of {args.repeats}; startup {startup:.1f} s")
    print("| case | seconds | speed-up vs 1 thread | without the startup |\n|---|---|---|---|")
    for name, seconds in best.items():
        print(f"| {name} | {seconds:.1f} | {base_time / seconds:.2f}x | "
              f"{(base_time - startup) / (seconds - startup):.2f}x |")
    record = {"analysis": args.analysis, "model": args.model, "n_prompts": args.n_prompts,
              "max_tokens": args.max_tokens, "batch_size": args.batch_size, "repeats": args.repeats,
              "seconds": times, "best": best, "startup_seconds": startup,
              "speedup_vs_1_thread": {k: base_time / v for k, v in best.items()},
              "speedup_without_startup": {k: (base_time - startup) / (v - startup) for k, v in best.items()},
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "command": " ".join(["python", "benchmarks/scale_out.py", *sys.argv[1:]])}
    out_file = args.out or RESULTS / f"scale_out_{args.analysis}_cpu.json"
    out_file.write_text(json.dumps(record, indent=1))
    print(f"saved {out_file}")


if __name__ == "__main__":
    main()
