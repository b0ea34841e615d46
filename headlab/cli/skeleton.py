"""The one shape of a command that writes a run: check → load → run → save → print.

Every check that needs no model runs first (the model options, the command's own, the inputs, the run's
target), so a bad flag never waits for a model to load; the run is written atomically (``Result.save``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from headlab.checks import check_positive_tokens
from headlab.cli.model_args import ModelArgs, Runtime, open_model
from headlab.cli.output import note, print_written, reported_errors, warn
from headlab.cli.scaling import adopt_parts, command_argv, fingerprint_of_parts, launch_ranks, plan_scale
from headlab.errors import HeadlabError, InputError, RunStoreError
from headlab.partial_runs import write_partial
from headlab.runs import check_new_run, check_writable, default_run_name, default_runs_dir, runs_dir_flag

# Below this many tokens per prompt, per-prompt statistics (Sink_1, position profiles) describe almost nothing.
MIN_USEFUL_TOKENS = 8


@dataclass
class Prepared:
    """What the checks produced for the run step: the target, the inputs and the command's own values."""

    runs_dir: Path
    run_name: str
    texts: list[str] | None = None
    source: dict | None = None
    extra: Any = None
    inputs: Any = None  # what else a run reads (images, questions): part of its fingerprint for --resume and merges


def runs_folder_target(analysis: str, model: str, out: Path | None, name: str | None) -> tuple[Path, str]:
    """``--out`` is the runs folder and ``--name`` the run (default: ``<analysis>-<model>-<time>``)."""
    runs_dir = check_writable(out or default_runs_dir(), runs_dir_flag(out))
    run_name = name if name is not None else default_run_name(analysis, model)
    check_new_run(runs_dir, run_name)
    return runs_dir, run_name


def read_prompt_set(model: str, prompts: str | None, n_prompts: int | None) -> tuple[list[str], dict]:
    """The prompts (the model's bundled set unless given; ``-`` reads stdin) and where they came from."""
    from headlab.prompts import read_prompts
    from headlab.provenance import describe_source
    from headlab.zoo.catalog import default_prompt_file

    if n_prompts is not None and n_prompts <= 0:
        raise InputError(f"--n-prompts must be positive, got {n_prompts}")
    default = default_prompt_file(model)
    return read_prompts(prompts if prompts is not None else default)[:n_prompts], describe_source(prompts, default)


def check_token_count(max_tokens: int) -> None:
    check_positive_tokens(max_tokens)
    if max_tokens < MIN_USEFUL_TOKENS:
        warn(f"--max-tokens {max_tokens} is below {MIN_USEFUL_TOKENS} tokens per prompt: the statistics describe "
             "the first few positions only and say little about the model")


def check_prompt_lengths(loaded, texts: list[str], max_tokens: int) -> float:
    """The mean prompt length in tokens (after the --max-tokens cut); says how many prompts the cut shortens, and
    warns when the prompts are too short to mean much."""
    from headlab.batching import check_max_tokens, encode

    check_max_tokens(loaded, max_tokens)
    lengths = [len(encode(loaded, text, sys.maxsize)) for text in texts]
    cut = sum(n > max_tokens for n in lengths)
    if cut:
        note(f"{cut} of {len(texts)} prompts are longer than --max-tokens {max_tokens} tokens: each is cut to its "
             f"first {max_tokens} (the longest has {max(lengths)})")
    mean = sum(min(n, max_tokens) for n in lengths) / len(texts)
    if mean < MIN_USEFUL_TOKENS:
        warn(f"prompts average {mean:.1f} tokens: statistics over fewer than {MIN_USEFUL_TOKENS} tokens per prompt "
             "say little about the model; use longer prompts")
    return mean


def record_provenance(result, loaded, args: ModelArgs, prepared: Prepared) -> None:
    """The prompts, where they came from and how the model ran, into the run's manifest."""
    from headlab.kernels.dispatch import backend_in_use
    from headlab.provenance import model_settings

    requested = "nnsight" if args.runtime == Runtime.nnsight else args.kernel_name
    settings = model_settings(loaded, dtype=args.dtype, device=args.device, threads=args.threads_used(),
                              backend=requested, backend_used=backend_in_use(loaded.device, requested))
    if args.placement is not None:
        settings.update(**args.placement, placement=loaded.placement)
    if args.remote:
        settings["remote"] = "ndif"
    provenance = {**result.provenance, "settings": settings}
    if prepared.texts is not None:
        result.prompts = prepared.texts
        provenance["prompt_source"] = prepared.source
    result.provenance = provenance


def quiet_hub_progress(quiet: bool) -> None:
    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def run_and_save(args: ModelArgs, *, command: str, prepare: Callable[[ModelArgs], Prepared],
                 run: Callable[[Any, Prepared], Any], show: Callable[[Any, Path], None], advice: str,
                 quiet: bool = False, runtimes: Sequence[Runtime] = (Runtime.local, Runtime.nnsight)) -> None:
    """The skeleton: ``args.check_plain`` and ``prepare(args)`` (the command's checks, inputs and target: no
    torch, so a bad value is reported in about a second) → ``args.resolved`` → load → ``run(loaded, prepared)``
    under ``--kernel`` and the scale plan (``cli.scaling``: shards, ranks, checkpoints) → provenance → atomic save
    → ``show(result, path)``. A ``--shard`` job writes a partial run instead; ranks after 0 write nothing."""
    started = time.perf_counter()
    with reported_errors(args.model, advice):
        args.check_plain(command=command, runtimes=runtimes)
        plan = plan_scale(args.scale, command=command, device_map=args.device_map, remote=args.remote,
                          runtime=args.runtime.value)
        prepared = prepare(args)
        if plan.merge is not None:
            adopt_parts(plan.merge, prepared)
        if plan.mode == "launch":  # this process only starts the ranks: they load, run and write
            code = launch_ranks(plan.nproc, prepared.texts)
            if code:
                raise SystemExit(code)
            return
        quiet_hub_progress(quiet)
        if plan.ranks is not None:
            from headlab.distributed import rank_device

            args = dataclasses.replace(args, device=rank_device(plan.ranks, args.device))
            if not plan.ranks.main:
                os.environ["TQDM_DISABLE"] = "1"  # one set of progress bars: rank 0's
        args = args.resolved()
        fingerprint = plan.fingerprint(command, args.model, prepared.extra, prepared.texts, prepared.inputs) \
            if args.scale.scalable else None
        if plan.merge is not None and fingerprint_of_parts(plan.merge) != {**fingerprint, "shard": None}:
            raise RunStoreError("the parts were made with other settings or prompts than this command has now "
                                "(a prompt file changed?): merge them where they were made")
        checkpoint = plan.open_checkpoint(prepared.runs_dir, prepared.run_name, fingerprint) if fingerprint else None
        for line in plan.notes:
            note(line)
        from headlab.tally import ShardDone  # here, not above: importing it imports torch

        try:
            loaded, result = _run_scaled(args, plan, checkpoint, prepared, run)
        except ShardDone as done:
            path = write_partial(prepared.runs_dir, prepared.run_name, pass_name=done.name, states=done.states,
                                 prompts=prepared.texts,
                                 record={"command": command, "argv": command_argv(), "model": args.model,
                                         "fingerprint": fingerprint, "shard": str(plan.shard)})
            plan.drop_checkpoint()
            note(f"shard {plan.shard} of pass {done.name!r} written to {path}; when every shard is done: "
                 f"headlab runs merge <the {plan.shard.count} parts> --out RUNS")
            return
        except HeadlabError:
            plan.drop_checkpoint()  # a refused input: nothing worth resuming
            raise
        if not plan.writes:
            plan.drop_checkpoint()
            return
        record_provenance(result, loaded, args, prepared)
        result.provenance = {**result.provenance, "scale": plan.describe()}
        path = result.save(prepared.runs_dir, prepared.run_name)
        plan.drop_checkpoint()
    show(result, path)
    print_written(path, args.threads_used(), time.perf_counter() - started)


def _run_scaled(args: ModelArgs, plan, checkpoint, prepared: Prepared, run: Callable[[Any, Prepared], Any]):
    """Load and run under the plan's scale; a torchrun rank joins its process group first and leaves it after."""
    from headlab.tally import scaled

    if plan.ranks is not None:
        from headlab.distributed import start

        plan.backend = start(plan.ranks, args.device)
    try:
        loaded = open_model(args)
        with args.kernel_in_use(), scaled(plan.scale(checkpoint)):
            result = run(loaded, prepared)
        return loaded, result
    finally:
        if plan.ranks is not None:
            from headlab.distributed import stop

            stop()
