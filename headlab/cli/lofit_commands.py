"""``headlab lofit select|train|apply|export|eval``: LoFiT head selection and head offsets from the shell.

Like every command, each writes one run: ``--out`` is the runs folder and ``--name`` the run (manifest, tables,
tensors, figures, written atomically). A train run's ``tensors.safetensors`` is what ``HeadOffsets.load(run_dir)``
reads; an export run carries the checkpoint in ``model/``. Every bad input is one ``error:`` line, exit code 2,
checked before the model loads where it can be (data, ranking, --k, the run's target), and nothing is
half-written.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer

from headlab.checks import at_least
from headlab.cli import options
from headlab.cli.model_args import ModelArgs, Runtime, takes_model
from headlab.cli.output import reported_errors, say
from headlab.cli.skeleton import Prepared, run_and_save, runs_folder_target
from headlab.errors import InputError

DATA_OPTION = typer.Option(..., help="JSONL: {prompt, target} (sft) or {prompt, chosen, rejected} (dpo)")
OBJECTIVE_OPTION = typer.Option("sft", help="sft (loss on the target tokens) or dpo (beta --beta, frozen reference)")
EPOCHS_OPTION = typer.Option(5, help="passes over the data")
BATCH_OPTION = typer.Option(8, help="items per optimiser step")
SEED_OPTION = typer.Option(42, help="seed of the init and the data order")
BETA_OPTION = typer.Option(0.5, help="DPO beta")
MAX_TOKENS_OPTION = typer.Option(512, help="longest prompt + completion in tokens (longer items are refused)")
OFFSETS_OPTION = typer.Option(..., help="a `headlab lofit train` run directory (or an offsets .safetensors)")
MODEL_HELP = "alias, tiny-* zoo model, local folder or hub id"
TRAINED_ON_HELP = "model (default: the one the offsets were trained on)"
# LoFiT trains and applies head offsets through hooks on the local modules.
LOCAL = (Runtime.local,)


def _offsets_run(path: Path):
    """(HeadOffsets, the model the offsets were trained on) from a train run directory or a safetensors file."""
    from headlab.interventions import HeadOffsets
    from headlab.runs import MANIFEST, read_manifest

    path = Path(path)
    offsets = HeadOffsets.load(path)
    # A train run names its model; a folder or file from HeadOffsets.save does not (then --model is needed).
    model = read_manifest(path)["model"] if (path / MANIFEST).is_file() else None
    return offsets, model


def _with_model(args: ModelArgs, trained_on: str | None, fallback: str | None = None) -> ModelArgs:
    """``--model``, else the model the offsets were trained on (else ``fallback``)."""
    model = args.model or trained_on or fallback
    if model is None:
        raise InputError("--model is needed with an offsets .safetensors file (a run directory names its model)")
    return dataclasses.replace(args, model=model)


def _config(objective, lr, lambda_l1, epochs, batch_size, seed, beta, max_tokens):
    from headlab.analyses.configs import LofitConfig

    config = LofitConfig(objective=objective, lr=lr, lambda_l1=lambda_l1, epochs=epochs, batch_size=batch_size,
                         seed=seed, beta=beta, max_tokens=max_tokens)
    config.check()
    return config


@takes_model("smollm2-135m", MODEL_HELP)
def select(
    data: Path = DATA_OPTION,
    objective: str = OBJECTIVE_OPTION,
    lambda_l1: float = typer.Option(5e-4, help="L1 weight on A (sparsity of the head scalings)"),
    lr: float = typer.Option(5e-3, help="AdamW learning rate of A"),
    epochs: int = EPOCHS_OPTION,
    batch_size: int = BATCH_OPTION,
    seed: int = SEED_OPTION,
    beta: float = BETA_OPTION,
    max_tokens: int = MAX_TOKENS_OPTION,
    out: Path = options.RUNS_FOLDER,
    name: str = options.run_name("lofit-select"),
    quiet: bool = options.QUIET,
    *,
    model_args: ModelArgs,
) -> None:
    """Step 1: train a scaling A per head (v = 0, model frozen, + lambda·Σ|A|) and rank the heads by ‖A‖₂."""

    def prepare(args: ModelArgs) -> Prepared:
        from headlab.analyses.lofit_data import read_items

        config = _config(objective, lr, lambda_l1, epochs, batch_size, seed, beta, max_tokens)
        items = read_items(data, objective)
        return Prepared(*runs_folder_target("lofit-select", args.model, out, name), extra=(config, items))

    def run(loaded, prepared: Prepared):
        from headlab.analyses.lofit import select_heads

        config, items = prepared.extra
        return select_heads(loaded, items, config, progress=not quiet)

    def show(result, path: Path) -> None:
        say("top heads by ‖A‖₂: " + ", ".join(f"{layer}.{h}" for layer, h, _ in result.summary["top_heads"]))

    run_and_save(model_args, command="headlab lofit select", prepare=prepare, run=run, show=show, quiet=quiet,
                 runtimes=LOCAL, advice="lower --batch-size or --max-tokens")


@takes_model("smollm2-135m", MODEL_HELP)
def train(
    data: Path = DATA_OPTION,
    heads: Path = typer.Option(..., help="a `headlab lofit select` run directory (its ranking)"),
    k: int = typer.Option(32, help="train offsets on the top K heads of the ranking"),
    objective: str = OBJECTIVE_OPTION,
    lr: float = typer.Option(1e-2, help="AdamW learning rate of v"),
    epochs: int = EPOCHS_OPTION,
    batch_size: int = BATCH_OPTION,
    seed: int = SEED_OPTION,
    beta: float = BETA_OPTION,
    max_tokens: int = MAX_TOKENS_OPTION,
    out: Path = options.RUNS_FOLDER,
    name: str = options.run_name("lofit-train"),
    quiet: bool = options.QUIET,
    *,
    model_args: ModelArgs,
) -> None:
    """Step 2: a fresh model (A = 0), offsets v trained on the top-K heads only; saved as a run."""

    def prepare(args: ModelArgs) -> Prepared:
        from headlab.analyses.lofit_data import read_items

        config = _config(objective, lr, 0.0, epochs, batch_size, seed, beta, max_tokens)
        items = read_items(data, objective)
        from headlab.analyses.lofit import load_ranking, top_pairs  # torch: after the plain checks

        ranking = load_ranking(heads)
        pairs = top_pairs(ranking, k)
        target = runs_folder_target("lofit-train", args.model, out, name)
        return Prepared(*target, extra=(config, items, ranking, pairs))

    def run(loaded, prepared: Prepared):
        from headlab.analyses.lofit import load_ranking, train_offsets

        config, items, ranking, pairs = prepared.extra
        load_ranking(heads, loaded)  # the ranking's model shape against this model
        return train_offsets(loaded, items, pairs, config, ranking=ranking, progress=not quiet)

    def show(result, path: Path) -> None:
        say(f"offsets on {k} heads ({result.summary['trained_parameters']} parameters), task loss "
            f"{result.summary['first_task_loss']:.4f} -> {result.summary['final_task_loss']:.4f}")

    run_and_save(model_args, command="headlab lofit train", prepare=prepare, run=run, show=show, quiet=quiet,
                 runtimes=LOCAL, advice="lower --batch-size or --max-tokens")


@takes_model(None, TRAINED_ON_HELP)
def apply(
    offsets: Path = OFFSETS_OPTION,
    prompt: list[str] = typer.Option(..., help="prompt to complete (repeat for several)"),
    max_new_tokens: int = typer.Option(32, help="greedy tokens to generate"),
    out: Path = options.RUNS_FOLDER,
    name: str = options.run_name("lofit-apply"),
    quiet: bool = options.QUIET,
    *,
    model_args: ModelArgs,
) -> None:
    """Greedy completions without and with the offsets (removed again afterwards), printed and saved as a run."""

    def prepare(args: ModelArgs) -> Prepared:
        at_least(max_new_tokens, 1, "--max-new-tokens")
        return Prepared(*runs_folder_target("lofit-apply", args.model, out, name), texts=list(prompt),
                        source={"kind": "command line"})

    def run(loaded, prepared: Prepared):
        from headlab.analyses.lofit_runs import apply_result

        return apply_result(loaded, edit, prepared.texts, max_new_tokens, str(offsets))

    def show(result, path: Path) -> None:
        for row in result.tables["completions"].itertuples():
            say(f"prompt: {row.prompt!r}")
            say(f"  without offsets: {row.without_offsets!r}")
            say(f"  with offsets:    {row.with_offsets!r}")

    with reported_errors(model_args.model or "the model", "use --dtype bfloat16"):
        edit, trained_on = _offsets_run(offsets)
        args = _with_model(model_args, trained_on)
    run_and_save(args, command="headlab lofit apply", prepare=prepare, run=run, show=show, quiet=quiet,
                 runtimes=LOCAL, advice="use --dtype bfloat16")


@takes_model(None, TRAINED_ON_HELP, dtype="float32", device="cpu")
def export(
    offsets: Path = OFFSETS_OPTION,
    out: Path = options.RUNS_FOLDER,
    name: str = options.run_name("lofit-export"),
    quiet: bool = options.QUIET,
    *,
    model_args: ModelArgs,
) -> None:
    """Bake the offsets into o_proj's bias (W_O·v per layer): a run whose model/ folder is a plain transformers
    checkpoint."""

    def prepare(args: ModelArgs) -> Prepared:
        return Prepared(*runs_folder_target("lofit-export", args.model, out, name))

    def run(loaded, prepared: Prepared):
        from headlab.analyses.lofit_runs import export_result

        return export_result(loaded, edit, str(offsets))

    def show(result, path: Path) -> None:
        from headlab.analyses.lofit_runs import EXPORTED_FOLDER

        say(f"model with offsets in o_proj's bias: {path / EXPORTED_FOLDER} (AutoModelForCausalLM.from_pretrained)")

    with reported_errors(model_args.model or "the model", "export on a machine with more memory"):
        edit, trained_on = _offsets_run(offsets)
        args = _with_model(model_args, trained_on)
    run_and_save(args, command="headlab lofit export", prepare=prepare, run=run, show=show, quiet=quiet,
                 runtimes=LOCAL, advice="export on a machine with more memory")


@takes_model(None, "model (default: the offsets' model, else smollm2-135m)", scalable=True)
def evaluate(
    data: Path = typer.Option(..., help="JSONL {prompt, target} (exact match) or a TruthfulQA-style .csv (MC1/MC2)"),
    offsets: Path = typer.Option(None, help="a `headlab lofit train` run directory; without it: the clean model"),
    batch_size: int = typer.Option(16, help="items per forward pass (exact match)"),
    max_tokens: int = MAX_TOKENS_OPTION,
    out: Path = options.RUNS_FOLDER,
    name: str = options.run_name("lofit-eval"),
    quiet: bool = options.QUIET,
    *,
    model_args: ModelArgs,
) -> None:
    """Exact match (completion JSONL) or MC1/MC2 (TruthfulQA CSV), clean and with the offsets."""

    def prepare(args: ModelArgs) -> Prepared:
        from headlab.analyses.lofit_data import read_items
        from headlab.analyses.lofit_eval import read_mc_csv

        at_least(batch_size, 1, "--batch-size")
        is_csv = Path(data).suffix.lower() == ".csv"
        items = read_mc_csv(data) if is_csv else read_items(data, "sft")
        # the items and the offsets run identify the inputs for --resume and merges
        return Prepared(*runs_folder_target("lofit-eval", args.model, out, name), extra=(is_csv, items),
                        inputs={"items": items, "offsets": None if offsets is None else str(Path(offsets).resolve())})

    def run(loaded, prepared: Prepared):
        if edit is not None:  # read from the offsets run below, before anything else
            edit.validate(loaded.arch)
        is_csv, items = prepared.extra
        return _evaluate(loaded, items, is_csv, edit, batch_size, max_tokens, data, offsets)

    with reported_errors(model_args.model or "the model", "lower --batch-size"):
        edit, trained_on = _offsets_run(offsets) if offsets is not None else (None, None)
        args = _with_model(model_args, trained_on, "smollm2-135m")
    run_and_save(args, command="headlab lofit eval", prepare=prepare, run=run, runtimes=LOCAL, quiet=quiet,
                 show=lambda result, path: say("\n".join(result.report.splitlines()[2:])),
                 advice="lower --batch-size")


def _evaluate(loaded, items, is_csv: bool, edit, batch_size: int, max_tokens: int, data: Path, offsets_path):
    """The lofit-eval Result: exact match per condition, or MC1/MC2 per condition."""
    from headlab.analyses.lofit_data import data_hash
    from headlab.analyses.lofit_eval import accuracy_result, evaluate_conditions, mc_summary
    from headlab.result import Result

    config = {"data": str(data), "offsets": None if offsets_path is None else str(offsets_path),
              "batch_size": batch_size, "max_tokens": max_tokens}
    outcomes = evaluate_conditions(loaded, items, {"clean": None, **({"offsets": edit} if edit is not None else {})},
                                   is_csv, batch_size, max_tokens)
    if not is_csv:
        return accuracy_result(loaded.name, outcomes, [i.prompt for i in items], config, data_hash(items),
                               loaded.revision)
    tables, summary = {}, {}
    for name, table in outcomes.items():
        tables[f"mc_{name}"] = table
        summary.update({f"{key}_{name}": value for key, value in mc_summary(table).items()})
    lines = [f"{name}: MC1 {summary[f'mc1_{name}']:.3f} ± {summary[f'mc1_se_{name}']:.3f}, MC2 "
             f"{summary[f'mc2_{name}']:.3f} ± {summary[f'mc2_se_{name}']:.3f} ({summary[f'n_{name}']} questions)"
             for name in ("clean", "offsets") if f"mc1_{name}" in summary]
    return Result("lofit-eval", loaded.name, config, tables=tables, summary=summary,
                  report="# LoFiT evaluation (multiple choice)\n\n" + "\n".join(lines) + "\n",
                  revision=loaded.revision)
