"""``headlab models``, ``headlab dashboard``, ``headlab runs clean`` and ``headlab zoo train``: everything
that is not an analysis of a model."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer
from rich.table import Table

from headlab.cli.output import console, fail, warn
from headlab.errors import HeadlabError
from headlab.runs import default_runs_dir, runs_dir_flag


def models() -> None:
    """List model aliases and the tiny offline models."""
    from headlab.zoo.catalog import ALIASES, BUNDLED_MODELS, EMBEDDED, TINY_DESCRIPTIONS

    table = Table(title="headlab models")
    table.add_column("name")
    table.add_column("what")

    for alias, hub_id in ALIASES.items():
        table.add_row(alias, BUNDLED_MODELS.get(alias, hub_id))
    for tiny, description in TINY_DESCRIPTIONS.items():
        table.add_row(tiny, description)
    for name, description in EMBEDDED.items():
        table.add_row(name, description)
    console.print(table)
    console.print("Also: any Hugging Face id (org/name), a local folder in Hugging Face format, or a .gguf file.")



def dashboard(
    runs: Path = typer.Option(None, help="runs folder to browse (default: $HEADLAB_RUNS or ./runs)"),
    port: int = typer.Option(8501, help="port to serve on"),
    host: str = typer.Option("127.0.0.1", help="address to listen on; 0.0.0.0 exposes the dashboard to the network"),
) -> None:
    """Browse saved runs in a Streamlit app (localhost only unless --host says otherwise)."""
    from headlab.dashboard.launch import (
        check_dashboard_runs,
        check_port_free,
        dashboard_url,
        run_child,
        streamlit_command,
    )

    try:
        runs_dir = check_dashboard_runs(runs or default_runs_dir())
        command = streamlit_command(runs_dir, host, port)
        check_port_free(host, port)  # before printing a URL that might serve another process
    except HeadlabError as err:
        fail(str(err))
    console.print(f"headlab dashboard on {dashboard_url(host, port)} (runs: {runs_dir}); Ctrl+C stops it",
                  highlight=False, soft_wrap=True)
    raise typer.Exit(code=run_child(command))


def runs_clean(
    runs: Path = typer.Option(None, help="runs folder (default: $HEADLAB_RUNS or ./runs)"),
    dry_run: bool = typer.Option(False, help="list what would be removed, remove nothing"),
) -> None:
    """Remove the leftovers of killed runs (hidden .<name>.tmp-* folders); runs still being written are kept."""
    from headlab.runs import clean_leftovers

    try:
        removed, spared = clean_leftovers(runs or default_runs_dir(), dry_run=dry_run,
                                          flag=runs_dir_flag(runs, "--runs"))
    except HeadlabError as err:
        fail(str(err))
    verb = "would remove" if dry_run else "removed"
    for path in removed:
        console.print(f"{verb} {path}", highlight=False, soft_wrap=True)
    for item in spared:
        console.print(f"kept {item.path}: still being written ({item.writer})", highlight=False, soft_wrap=True)
    console.print(f"{len(removed)} leftover(s) {verb}, {len(spared)} kept", highlight=False)


def runs_merge(
    parts: list[Path] = typer.Argument(..., help="the partial runs of every shard (written with --shard i/n)"),
    out: Path = typer.Option(None, help="runs folder for the merged run (default: $HEADLAB_RUNS or ./runs)"),
    name: str = typer.Option(None, help="name of the merged run (default: <analysis>-<model>-<time>)"),
) -> None:
    """Join the parts of a job array (--shard i/n) into the one run a single process would have written.

    The parts must be the n shards of one command (same model, settings, prompts and headlab version). The merge
    runs the command again with the parts' accumulator states in place of its first pass: the model is opened
    (for what follows that pass, e.g. the head-pattern pass of sinks), the prompts are not run through it."""
    import tempfile

    from headlab.cli.apps import analyze_app, headlab_app
    from headlab.cli.scaling import MergeParts, argv_with_prompts, merging, write_prompts_file
    from headlab.partial_runs import check_parts, part_prompts, part_states, read_part

    try:
        ordered = check_parts([read_part(p) for p in parts])
        first = ordered[0]
        states = [part_states(p) for p in ordered]
        prompts = part_prompts(first)
    except HeadlabError as err:
        fail(str(err))
    program, *argv = first.manifest["argv"]
    if out is not None:
        argv += ["--out", str(out)]
    if name is not None:
        argv += ["--name", name]
    with tempfile.TemporaryDirectory(prefix="headlab-merge-") as tmp:
        if prompts is not None:
            argv = argv_with_prompts(argv, write_prompts_file(Path(tmp), prompts))
        console.print(f"merging {len(ordered)} parts: {program} {' '.join(argv)}", highlight=False, soft_wrap=True)
        with merging(MergeParts(states, prompts, first.manifest["fingerprint"], [p.path for p in ordered])):
            app = analyze_app if program == "analyze" else headlab_app
            code = app(args=argv, prog_name=program, standalone_mode=False)
    if code:  # the command said what went wrong; its exit code is the merge's
        raise typer.Exit(code)


class ZooModel(str, Enum):
    backcopy = "backcopy"
    backcopy_nobos = "backcopy-nobos"
    llava_smol = "llava-smol"
    llava_real = "llava-real"


def zoo_train(
    model: ZooModel = typer.Argument(ZooModel.backcopy, help="backcopy (sequences start with BOS) or backcopy-nobos"),
    checkpoint: Path = typer.Option(None, help="checkpoint folder (default: ./models/<model>); written atomically"),
    steps: int = typer.Option(4600, help="optimizer steps"),
    batch_size: int = typer.Option(64, help="sequences per step (T = 64 tokens each)"),
    lr: float = typer.Option(3e-3, help="peak learning rate (after 100 warmup steps)"),
    final_lr_ratio: float = typer.Option(0.1, help="cosine decay to this fraction of --lr (1: constant)"),
    weight_decay: float = typer.Option(0.5, help="AdamW weight decay on matrices"),
    seed: int = typer.Option(0, help="seed of the init, the data stream and the evaluation set"),
    threads: int = typer.Option(2, help="CPU threads (results are deterministic for a given seed and count)"),
    eval_every: int = typer.Option(200, help="evaluate and write the checkpoint every N steps"),
    quiet: bool = typer.Option(False, help="no progress lines (the last line still says where the checkpoint is)"),
    out: Path = typer.Option(None, hidden=True, help="deprecated: --checkpoint"),
) -> None:
    """Train a 4-layer Llama-style model on Bigram-Backcopy (Guo et al., 2024) on the CPU: real attention sinks.

    llava-smol: the vision tower + projector of an LVLM on frozen smollm2-135m, with its own recipe
    (headlab/training/llava_smol.py; only --checkpoint and --seed apply; one thread, about 80 minutes).
    llava-real: the projector between DINOv2-S and frozen smollm2-135m, trained on photo scenes
    (headlab/training/llava_real.py; only --checkpoint and --seed apply; one thread, about 90 minutes).
    A checkpoint is a model folder, not a run: elsewhere --out is the runs folder."""
    import dataclasses

    if out is not None:
        # --out means the runs folder on every other command; here it used to mean the checkpoint folder.
        warn("--out of `zoo train` is deprecated: use --checkpoint (--out is the runs folder on every other command)")
        checkpoint = checkpoint or out
    log = (lambda line: None) if quiet else (lambda line: console.print(line, highlight=False, soft_wrap=True))
    if model == ZooModel.llava_smol:
        from headlab.training.llava_smol import train_llava_smol_cli

        return train_llava_smol_cli(checkpoint, seed, fail, log)
    if model == ZooModel.llava_real:
        from headlab.training.llava_real import train_llava_real_cli

        return train_llava_real_cli(checkpoint, seed, fail, log)

    from headlab.training.backcopy import BackcopyTask
    from headlab.training.backcopy_training import TrainConfig, train_backcopy

    folder = checkpoint or Path("models") / model.value
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, final_lr_ratio=final_lr_ratio,
                         weight_decay=weight_decay, seed=seed,
                         threads=threads, eval_every=eval_every,
                         task=dataclasses.replace(BackcopyTask(), use_bos=model == ZooModel.backcopy))
    try:
        train_backcopy(config, folder, log=log)
    except HeadlabError as err:
        fail(str(err))
    console.print(f"checkpoint written to {folder}", highlight=False, soft_wrap=True)
