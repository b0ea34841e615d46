"""LoFiT on smollm2-135m, one-shot Colored Objects (methods.md §4-5): does the head selection localise?

Held-out exact-match accuracy (Wilson 95% intervals; paired differences on the same test items) of:
clean model; step 1 (A on every head, v = 0); step 2 with v on the top-K heads by ‖A‖₂; and, trained the
same way, v on K random heads and on the K heads with the lowest ‖A‖₂. Every step is a headlab run
(select, one train run per head set, one eval run) under --runs; the numbers go to --json.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/lofit_colored_objects.py --threads 1 \
        --json benchmarks/results/lofit_colored_objects.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import headlab
from headlab.analyses.circuit_tasks import colored_objects_task
from headlab.analyses.lofit import (
    LofitConfig,
    binomial_summary,
    offsets_of,
    random_pairs,
    select_heads,
    top_pairs,
    train_offsets,
)
from headlab.analyses.lofit_data import SFTItem, data_hash
from headlab.analyses.lofit_eval import accuracy_result, exact_match, paired_difference
from headlab.interventions import HeadOffsets


def split_items(tokenizer, n_train: int, n_test: int, seed: int) -> tuple[list[SFTItem], list[SFTItem]]:
    """Distinct one-shot prompts (answer = the asked object's colour, one token), train then test."""
    task = colored_objects_task(2 * (n_train + n_test), seed=seed, tokenizer=tokenizer)
    unique = list({e.prompt: SFTItem(e.prompt, e.answer) for e in task.examples}.values())
    if len(unique) < n_train + n_test:
        raise SystemExit(f"only {len(unique)} distinct prompts")
    return unique[:n_train], unique[n_train : n_train + n_test]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n-train", type=int, default=200)
    parser.add_argument("--n-test", type=int, default=300)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--select-lr", type=float, default=5e-3)
    parser.add_argument("--lambda-l1", type=float, default=5e-4)
    parser.add_argument("--train-lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts and of the random heads")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    loaded = headlab.load(args.model)
    arch = loaded.arch
    train, test = split_items(loaded.text_tokenizer, args.n_train, args.n_test, args.seed)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    timings: dict[str, float] = {}

    def timed(name: str, fn):
        t0 = time.perf_counter()
        out = fn()
        timings[name] = time.perf_counter() - t0
        print(f"{name}: {timings[name]:.0f} s", flush=True)
        return out

    outcomes: dict[str, list[bool]] = {}
    outcomes["clean"] = timed("eval clean", lambda: exact_match(loaded, test))
    print("clean", binomial_summary(outcomes["clean"]), flush=True)

    select_config = LofitConfig(lr=args.select_lr, lambda_l1=args.lambda_l1, epochs=args.epochs)
    selection = timed("select", lambda: select_heads(loaded, train, select_config))
    selection.save(args.runs, f"lofit-select-colored-objects-{stamp}")
    ranking = selection.tables["ranking"]
    print("top heads", selection.summary["top_heads"], flush=True)

    scalings = HeadOffsets(
        [(layer, h) for layer in range(arch.n_layers) for h in range(arch.n_heads)],
        torch.nn.Parameter(selection.tensors["A"].clone()),
        torch.nn.Parameter(torch.zeros_like(selection.tensors["A"])))
    outcomes["step1_A_all_heads"] = timed("eval step 1", lambda: exact_match(loaded, test, scalings))
    print("step 1", binomial_summary(outcomes["step1_A_all_heads"]), flush=True)

    top = top_pairs(ranking, args.k)
    lowest = [(int(r.layer), int(r.head)) for r in ranking.tail(args.k).itertuples()]
    rand = random_pairs(arch, args.k, seed=args.seed)
    head_sets = {"top": top, "random": rand, "lowest": lowest}
    train_config = LofitConfig(lr=args.train_lr, lambda_l1=0.0, epochs=args.epochs)
    trained_runs = {}
    for label, pairs in head_sets.items():
        run = timed(f"train {label}", lambda pairs=pairs, label=label: train_offsets(
            loaded, train, pairs, train_config, ranking=ranking, label=label))
        trained_runs[label] = str(run.save(args.runs, f"lofit-train-{label}-colored-objects-{stamp}"))
        outcomes[f"step2_v_{label}_{args.k}"] = timed(f"eval {label}",
                                                     lambda run=run: exact_match(loaded, test, offsets_of(run)))
        print(label, pairs, binomial_summary(outcomes[f"step2_v_{label}_{args.k}"]), flush=True)

    config = {"task": "colored-objects (1 shot)", **vars(args), "runs": str(args.runs),
              "json": str(args.json) if args.json else None}
    config = {k: str(v) if isinstance(v, Path) else v for k, v in config.items()}
    evaluation = accuracy_result(loaded.name, outcomes, [i.prompt for i in test], config, data_hash(test))
    eval_path = evaluation.save(args.runs, f"lofit-eval-colored-objects-{stamp}")

    top_key = f"step2_v_top_{args.k}"
    result = {
        "model": loaded.name, "task": "colored-objects, 1 shot (analyses.circuit_tasks)",
        "n_train": len(train), "n_test": len(test), "k": args.k, "epochs_per_step": args.epochs,
        "select": {"lr": args.select_lr, "lambda_l1": args.lambda_l1, "heads": arch.n_layers * arch.n_heads},
        "train": {"lr": args.train_lr, "trained_parameters": args.k * arch.head_dim},
        "batch_size": select_config.batch_size, "seed_optimiser": select_config.seed, "seed_data": args.seed,
        "accuracy": {name: binomial_summary(correct) for name, correct in outcomes.items()},
        "top_minus_random": paired_difference(outcomes[top_key], outcomes[f"step2_v_random_{args.k}"]),
        "top_minus_lowest": paired_difference(outcomes[top_key], outcomes[f"step2_v_lowest_{args.k}"]),
        "top_minus_clean": paired_difference(outcomes[top_key], outcomes["clean"]),
        "heads": {label: [f"{layer}.{h}" for layer, h in pairs] for label, pairs in head_sets.items()},
        "top_heads_a_norm": selection.summary["top_heads"],
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "seconds_total": round(time.perf_counter() - started, 1),
        "threads": torch.get_num_threads(), "machine": f"{platform.machine()}, 2 CPU cores shared with other jobs",
        "runs": {"select": str(selection.path), "train": trained_runs, "eval": str(eval_path)},
        "command": "OMP_NUM_THREADS=1 .venv/bin/python scripts/lofit_colored_objects.py --threads 1 "
                   "--json benchmarks/results/lofit_colored_objects.json",
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
