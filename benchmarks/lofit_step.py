"""LoFiT training-step benchmark on smollm2-135m: one optimiser step with LoFiT hooks against a plain
forward + backward of the same batch with the model frozen (the issue's target: ratio <= 1.2).

Cases (batch 8, 64 tokens, SFT loss on the last 4 tokens), alternating within each repeat so that drifts in
machine load hit every case alike:
- ``plain``: the frozen model, inputs_embeds requiring grad so that the backward runs through every layer
  (as step 1's A on every head needs), loss backward; no hooks.
- ``select``: LoFiT step 1: ``HeadOffsets`` A on all 270 heads through ``headlab.intervene``, loss + λΣ|A|,
  backward, AdamW step.
- ``train-top8``: LoFiT step 2: v on 8 heads of layers 14-19 (the backward stops at layer 14), AdamW step.
- ``plain-from-14``: the plain model with the backward stopped at layer 14's input, step 2's reference.

Time = process CPU time (``time.process_time``), minimum over ``--repeats``, one torch thread by default.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lofit_step.py --json benchmarks/results/lofit_step_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

import headlab
from headlab.interventions import HeadOffsets, intervene

TOP8 = [(16, 7), (17, 1), (16, 1), (18, 2), (19, 1), (16, 6), (17, 7), (14, 5)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = headlab.load("smollm2-135m")
    model, arch = loaded.model, loaded.arch
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (args.batch, args.tokens), generator=g)
    labels = ids[:, -4:]

    def loss_of(logits: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits[:, -5:-1].flatten(0, 1).float(), labels.flatten())

    every = [(layer, h) for layer in range(arch.n_layers) for h in range(arch.n_heads)]
    select = HeadOffsets.create(arch, every, init="normal", generator=g)
    select.v.requires_grad_(False)
    select_opt = torch.optim.AdamW([select.A], lr=5e-3, weight_decay=0.0)
    top = HeadOffsets.create(arch, TOP8, init="normal", generator=g)
    top.A.requires_grad_(False)
    top_opt = torch.optim.AdamW([top.v], lr=1e-2, weight_decay=0.0)
    embed = model.get_input_embeddings()

    def plain() -> None:
        x = embed(ids).detach().requires_grad_(True)
        loss_of(model(inputs_embeds=x).logits).backward()

    def plain_from_14() -> None:
        holder = {}

        def grab(module, a, kw):
            hidden = (a[0] if a else kw["hidden_states"]).detach().requires_grad_(True)
            holder["x"] = hidden
            return ((hidden, *a[1:]), kw) if a else (a, {**kw, "hidden_states": hidden})

        handle = arch.layers[14].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            loss_of(model(ids).logits).backward()
        finally:
            handle.remove()

    def step(offsets: HeadOffsets, optimizer, l1: bool) -> None:
        with intervene(loaded, offsets):
            loss = loss_of(model(ids).logits)
        if l1:
            loss = loss + 5e-4 * offsets.A.abs().sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    cases = {"plain": plain, "select": lambda: step(select, select_opt, True),
             "plain-from-14": plain_from_14, "train-top8": lambda: step(top, top_opt, False)}
    for fn in cases.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            start = time.process_time()
            fn()
            times[name].append(time.process_time() - start)
    best = {name: min(values) for name, values in times.items()}
    result = {
        "model": "smollm2-135m", "batch": args.batch, "tokens": args.tokens, "threads": torch.get_num_threads(),
        "seconds_min": best, "seconds_all": times,
        "ratio_select_vs_plain": best["select"] / best["plain"],
        "ratio_train_top8_vs_plain_from_14": best["train-top8"] / best["plain-from-14"],
        "ratio_train_top8_vs_plain": best["train-top8"] / best["plain"],
        "load_average": os.getloadavg(), "machine": platform.machine(),
        "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lofit_step.py --json "
                   "benchmarks/results/lofit_step_cpu.json",
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
