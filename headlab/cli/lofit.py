"""``headlab lofit select|train|apply|export|eval``: LoFiT head selection and head offsets from the shell.

``--out`` of select, train and eval is the run directory itself (``sel/``, ``offsets/``): a headlab run
(manifest, tables, tensors, figures) written atomically; a train run's ``tensors.safetensors`` is what
``HeadOffsets.load(run_dir)`` reads. Every bad input is one ``error:`` line, exit code 2, checked before the
model loads where it can be (data, ranking, --k, --out), and nothing is half-written.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from headlab.cli.app import (
    DEVICE_OPTION,
    DTYPE_OPTION,
    OFFLINE_OPTION,
    QUIET_OPTION,
    THREADS_OPTION,
    console,
    print_written,
    quiet_hub_progress,
    reported_errors,
    use_threads,
)
from headlab.errors import InputError
from headlab.runs import run_target

lofit_app = typer.Typer(help="LoFiT: select heads, train head offsets, apply, export and evaluate them.",
                        no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)

DATA_OPTION = typer.Option(..., help="JSONL: {prompt, target} (sft) or {prompt, chosen, rejected} (dpo)")
OBJECTIVE_OPTION = typer.Option("sft", help="sft (loss on the target tokens) or dpo (beta --beta, frozen reference)")
EPOCHS_OPTION = typer.Option(5, help="passes over the data")
BATCH_OPTION = typer.Option(8, help="items per optimiser step")
SEED_OPTION = typer.Option(42, help="seed of the init and the data order")
BETA_OPTION = typer.Option(0.5, help="DPO beta")
MAX_TOKENS_OPTION = typer.Option(512, help="longest prompt + completion in tokens (longer items are refused)")
MODEL_OPTION = typer.Option("smollm2-135m", help="alias, tiny-* zoo model, local folder or hub id")


def _load(model: str, dtype: str, device: str, offline: bool):
    from headlab.loading import load

    return load(model, dtype=dtype, device=device, local_files_only=offline)


def _offsets_run(path: Path):
    """(HeadOffsets, the model the offsets were trained on) from a train run directory or a safetensors file."""
    from headlab.interventions import HeadOffsets
    from headlab.runs import read_manifest

    path = Path(path)
    offsets = HeadOffsets.load(path)
    model = read_manifest(path)["model"] if path.is_dir() else None
    return offsets, model


def _config(objective, lr, lambda_l1, epochs, batch_size, seed, beta, max_tokens):
    from headlab.analyses.lofit import LofitConfig

    config = LofitConfig(objective=objective, lr=lr, lambda_l1=lambda_l1, epochs=epochs, batch_size=batch_size,
                         seed=seed, beta=beta, max_tokens=max_tokens)
    config.check()
    return config


@lofit_app.command("select")
def select(
    data: Path = DATA_OPTION,
    model: str = MODEL_OPTION,
    objective: str = OBJECTIVE_OPTION,
    lambda_l1: float = typer.Option(5e-4, help="L1 weight on A (sparsity of the head scalings)"),
    lr: float = typer.Option(5e-3, help="AdamW learning rate of A"),
    epochs: int = EPOCHS_OPTION,
    batch_size: int = BATCH_OPTION,
    seed: int = SEED_OPTION,
    beta: float = BETA_OPTION,
    max_tokens: int = MAX_TOKENS_OPTION,
    out: Path = typer.Option(None, help="run directory to write (default: runs folder / lofit-select-<model>-<time>)"),
    dtype: str = DTYPE_OPTION,
    device: str = DEVICE_OPTION,
    offline: bool = OFFLINE_OPTION,
    quiet: bool = QUIET_OPTION,
    threads: int = THREADS_OPTION,
) -> None:
    """Step 1: train a scaling A per head (v = 0, model frozen, + lambda·Σ|A|) and rank the heads by ‖A‖₂."""
    started = time.perf_counter()
    quiet_hub_progress(quiet)
    with reported_errors(model, "lower --batch-size or --max-tokens"):
        from headlab.analyses.lofit import select_heads
        from headlab.analyses.lofit_data import read_items

        config = _config(objective, lr, lambda_l1, epochs, batch_size, seed, beta, max_tokens)
        items = read_items(data, objective)
        runs_dir, name = run_target(out, "lofit-select", model)
        loaded = _load(model, dtype, device, offline)
        used = use_threads(threads)
        result = select_heads(loaded, items, config, progress=not quiet)
        path = result.save(runs_dir, name)
    top = ", ".join(f"{layer}.{h}" for layer, h, _ in result.summary["top_heads"])
    console.print(f"top heads by ‖A‖₂: {top}", highlight=False, soft_wrap=True)
    print_written(path, used, time.perf_counter() - started)


@lofit_app.command("train")
def train(
    data: Path = DATA_OPTION,
    heads: Path = typer.Option(..., help="a `headlab lofit select` run directory (its ranking)"),
    k: int = typer.Option(32, help="train offsets on the top K heads of the ranking"),
    model: str = MODEL_OPTION,
    objective: str = OBJECTIVE_OPTION,
    lr: float = typer.Option(1e-2, help="AdamW learning rate of v"),
    epochs: int = EPOCHS_OPTION,
    batch_size: int = BATCH_OPTION,
    seed: int = SEED_OPTION,
    beta: float = BETA_OPTION,
    max_tokens: int = MAX_TOKENS_OPTION,
    out: Path = typer.Option(None, help="run directory to write (default: runs folder / lofit-train-<model>-<time>)"),
    dtype: str = DTYPE_OPTION,
    device: str = DEVICE_OPTION,
    offline: bool = OFFLINE_OPTION,
    quiet: bool = QUIET_OPTION,
    threads: int = THREADS_OPTION,
) -> None:
    """Step 2: a fresh model (A = 0), offsets v trained on the top-K heads only; saved as a run."""
    started = time.perf_counter()
    quiet_hub_progress(quiet)
    with reported_errors(model, "lower --batch-size or --max-tokens"):
        from headlab.analyses.lofit import load_ranking, top_pairs, train_offsets
        from headlab.analyses.lofit_data import read_items

        config = _config(objective, lr, 0.0, epochs, batch_size, seed, beta, max_tokens)
        items = read_items(data, objective)
        ranking = load_ranking(heads)
        pairs = top_pairs(ranking, k)
        runs_dir, name = run_target(out, "lofit-train", model)
        loaded = _load(model, dtype, device, offline)
        load_ranking(heads, loaded)  # the ranking's model shape against this model
        used = use_threads(threads)
        result = train_offsets(loaded, items, pairs, config, ranking=ranking, progress=not quiet)
        path = result.save(runs_dir, name)
    console.print(f"offsets on {k} heads ({result.summary['trained_parameters']} parameters), task loss "
                  f"{result.summary['first_task_loss']:.4f} -> {result.summary['final_task_loss']:.4f}",
                  highlight=False, soft_wrap=True)
    print_written(path, used, time.perf_counter() - started)


@lofit_app.command("apply")
def apply(
    offsets: Path = typer.Option(..., help="a `headlab lofit train` run directory (or an offsets .safetensors)"),
    prompt: list[str] = typer.Option(..., help="prompt to complete (repeat for several)"),
    model: str = typer.Option(None, help="model (default: the one the offsets were trained on)"),
    max_new_tokens: int = typer.Option(32, help="greedy tokens to generate"),
    dtype: str = DTYPE_OPTION,
    device: str = DEVICE_OPTION,
    offline: bool = OFFLINE_OPTION,
    threads: int = THREADS_OPTION,
) -> None:
    """Greedy completions without and with the offsets (removed again afterwards)."""
    with reported_errors(model or "the model", "use --dtype bfloat16"):
        import torch

        from headlab.interventions import intervene

        if max_new_tokens < 1:
            raise InputError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
        edit, trained_on = _offsets_run(offsets)
        model = model or trained_on
        if model is None:
            raise InputError("--model is needed with an offsets .safetensors file (a run directory names its model)")
        loaded = _load(model, dtype, device, offline)
        edit.validate(loaded.arch)
        use_threads(threads)
        tok = loaded.text_tokenizer
        for text in prompt:
            ids = tok(text, return_tensors="pt").input_ids.to(loaded.device)
            kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False,
                          pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
            with torch.no_grad():
                before = loaded.model.generate(ids, **kwargs)[0, ids.shape[1]:]
                with intervene(loaded, edit):
                    after = loaded.model.generate(ids, **kwargs)[0, ids.shape[1]:]
            console.print(f"prompt: {text!r}", highlight=False, soft_wrap=True)
            console.print(f"  without offsets: {tok.decode(before, skip_special_tokens=True)!r}", highlight=False,
                          soft_wrap=True)
            console.print(f"  with offsets:    {tok.decode(after, skip_special_tokens=True)!r}", highlight=False,
                          soft_wrap=True)


@lofit_app.command("export")
def export(
    offsets: Path = typer.Option(..., help="a `headlab lofit train` run directory (or an offsets .safetensors)"),
    out: Path = typer.Option(..., help="new folder for the model with the offsets in o_proj's bias"),
    model: str = typer.Option(None, help="model (default: the one the offsets were trained on)"),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16"),
    offline: bool = OFFLINE_OPTION,
) -> None:
    """Bake the offsets into o_proj's bias (W_O·v per layer): a plain transformers checkpoint."""
    with reported_errors(model or "the model", "export on a machine with more memory"):
        from headlab.analyses.lofit_export import export_offsets

        edit, trained_on = _offsets_run(offsets)
        model = model or trained_on
        if model is None:
            raise InputError("--model is needed with an offsets .safetensors file (a run directory names its model)")
        out = Path(out).expanduser()
        if out.exists():
            raise InputError(f"{out} already exists; choose a new folder for the exported model")
        loaded = _load(model, dtype, "cpu", offline)
        path = export_offsets(loaded, edit, out)
    console.print(f"model with offsets in o_proj's bias written to {path} (AutoModelForCausalLM.from_pretrained)",
                  highlight=False, soft_wrap=True)


@lofit_app.command("eval")
def evaluate(
    data: Path = typer.Option(..., help="JSONL {prompt, target} (exact match) or a TruthfulQA-style .csv (MC1/MC2)"),
    model: str = typer.Option(None, help="model (default: the offsets' model, else smollm2-135m)"),
    offsets: Path = typer.Option(None, help="a `headlab lofit train` run directory; without it: the clean model"),
    batch_size: int = typer.Option(16, help="items per forward pass (exact match)"),
    max_tokens: int = MAX_TOKENS_OPTION,
    out: Path = typer.Option(None, help="run directory to write (default: runs folder / lofit-eval-<model>-<time>)"),
    dtype: str = DTYPE_OPTION,
    device: str = DEVICE_OPTION,
    offline: bool = OFFLINE_OPTION,
    threads: int = THREADS_OPTION,
) -> None:
    """Exact match (completion JSONL) or MC1/MC2 (TruthfulQA CSV), clean and with the offsets."""
    started = time.perf_counter()
    with reported_errors(model or "the model", "lower --batch-size"):
        if batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {batch_size}")
        edit, trained_on = _offsets_run(offsets) if offsets is not None else (None, None)
        model = model or trained_on or "smollm2-135m"
        result, target, used = _evaluate(Path(data), model, edit, batch_size, max_tokens, out, dtype, device,
                                         offline, threads, offsets)
        path = result.save(*target)
    for line in result.report.splitlines()[2:]:
        console.print(line, highlight=False, soft_wrap=True)
    print_written(path, used, time.perf_counter() - started)


def _evaluate(data: Path, model: str, edit, batch_size: int, max_tokens: int, out, dtype, device, offline, threads,
              offsets_path):
    """(the lofit-eval Result, its (runs folder, name), the thread count): checks first, then the model."""
    from headlab.analyses.lofit_data import data_hash, read_items
    from headlab.analyses.lofit_eval import accuracy_result, exact_match, mc_summary, multiple_choice, read_mc_csv
    from headlab.result import Result

    is_csv = data.suffix.lower() == ".csv"
    items = read_mc_csv(data) if is_csv else read_items(data, "sft")
    target = run_target(out, "lofit-eval", model)
    loaded = _load(model, dtype, device, offline)
    if edit is not None:
        edit.validate(loaded.arch)
    used = use_threads(threads)
    config = {"data": str(data), "offsets": None if offsets_path is None else str(offsets_path),
              "batch_size": batch_size, "max_tokens": max_tokens}
    if not is_csv:
        conditions = {"clean": exact_match(loaded, items, None, batch_size, max_tokens)}
        if edit is not None:
            conditions["offsets"] = exact_match(loaded, items, edit, batch_size, max_tokens)
        result = accuracy_result(loaded.name, conditions, [i.prompt for i in items], config, data_hash(items),
                                 loaded.revision)
    else:
        tables, summary = {}, {}
        for name, applied in [("clean", None)] + ([("offsets", edit)] if edit is not None else []):
            table = multiple_choice(loaded, items, applied, max_tokens)
            tables[f"mc_{name}"] = table
            summary.update({f"{key}_{name}": value for key, value in mc_summary(table).items()})
        lines = [f"{name}: MC1 {summary[f'mc1_{name}']:.3f} ± {summary[f'mc1_se_{name}']:.3f}, MC2 "
                 f"{summary[f'mc2_{name}']:.3f} ± {summary[f'mc2_se_{name}']:.3f} ({summary[f'n_{name}']} questions)"
                 for name in ("clean", "offsets") if f"mc1_{name}" in summary]
        result = Result("lofit-eval", loaded.name, config, tables=tables, summary=summary,
                        report="# LoFiT evaluation (multiple choice)\n\n" + "\n".join(lines) + "\n",
                        revision=loaded.revision)
    return result, target, used
