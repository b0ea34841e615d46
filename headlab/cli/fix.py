"""The LVLM fixes from the command line.

- ``headlab fix --model M --method none --method pai … --image IMG --prompt "…"``: the generations of each
  method side by side;
- ``analyze hallucination --model M --bench chair|pope --data DIR --methods none,vhr,var,pai,paint,vaf``:
  one run with the method × metric table (bootstrap CIs), the captions or answers, and a dashboard page.

Method options: ``--set pai.alpha=0.5 --set var.tau=15`` (the fields of each method's dataclass). Bad
inputs are one ``error:`` line, exit 2, before the model loads.
"""

from __future__ import annotations

import json
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

SET_OPTION = typer.Option(None, "--set", help="a method option, METHOD.FIELD=VALUE (e.g. pai.alpha=0.5, "
                                              "var.tau=15, vhr.layers=[20,21]); repeat for several")


def parse_settings(items: list[str] | None, methods: list[str]) -> dict[str, dict]:
    """``["pai.alpha=0.5", …]`` -> ``{"pai": {"alpha": 0.5}}``; values are JSON (numbers, lists, true) or text."""
    out: dict[str, dict] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        name, dot, option = key.strip().partition(".")
        if not sep or not dot or not option:
            raise InputError(f"--set {item!r}: write METHOD.FIELD=VALUE, e.g. pai.alpha=0.5")
        if name not in methods:
            raise InputError(f"--set {item!r}: {name} is not among the methods ({', '.join(methods)})")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(name, {})[option] = value
    return out


def split_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    if not methods:
        raise InputError("--methods is empty: name at least one of none, vhr, var, pai, paint, vaf")
    return methods


def fix(
    model: str = typer.Option("llava-smol", help="an LVLM: llava-smol, tiny-llava, llava-1.5-7b (local), …"),
    method: list[str] = typer.Option(["none", "pai"], help="a fix to run (repeat): none, vhr, var, pai, paint, vaf"),
    image: Path = typer.Option(..., help="an image file"),
    prompt: str = typer.Option("Describe the image.", help="the user prompt"),
    settings: list[str] = SET_OPTION,
    max_new_tokens: int = typer.Option(48, help="greedy tokens per generation"),
    dtype: str = DTYPE_OPTION,
    device: str = DEVICE_OPTION,
    offline: bool = OFFLINE_OPTION,
    quiet: bool = QUIET_OPTION,
    threads: int = THREADS_OPTION,
) -> None:
    """Generate with each fix on one image and print the answers side by side."""
    from rich.table import Table

    from headlab.analyses.hallucination_eval import HallucinationConfig
    from headlab.lvlm import LvlmSample, load_image

    quiet_hub_progress(quiet)
    with reported_errors(model, "lower --max-new-tokens or use --dtype bfloat16"):
        if max_new_tokens < 1:
            raise InputError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
        methods = list(dict.fromkeys(method))
        config = HallucinationConfig(methods=methods, options=parse_settings(settings, methods))
        config.check()
        picture = load_image(image)
        use_threads(threads)
        from headlab.analyses.lvlm_fixes import decode, generate_fixed
        from headlab.loading import load

        loaded = load(model, dtype=dtype, device=device, local_files_only=offline)
        table = Table(title=f"{model}: {prompt!r} on {image.name}", show_lines=True)
        table.add_column("method")
        table.add_column("generation")
        table.add_column("seconds", justify="right")
        for name in methods:
            started = time.perf_counter()
            tokens = generate_fixed(loaded, [LvlmSample(prompt, [picture])], [config.make(name, False)],
                                    max_new_tokens=max_new_tokens)
            table.add_row(name, decode(loaded, tokens)[0], f"{time.perf_counter() - started:.1f}")
    console.print(table)


def hallucination(
    model: str = typer.Option("llava-smol", help="an LVLM: llava-smol, tiny-llava, llava-1.5-7b (local), …"),
    bench: str = typer.Option("chair", help="chair (captions against COCO annotations) or pope (yes/no questions)"),
    data: Path = typer.Option(..., help="folder with COCO annotations + images (chair) or pope_{split}.jsonl + "
                                        "images (pope); `python -m headlab.training.lvlm_data DIR` writes a "
                                        "synthetic one"),
    methods: str = typer.Option("none,vhr,var,pai,paint,vaf", help="comma-separated fixes; none is the baseline"),
    controls: bool = typer.Option(False, help="also run each method's random control (random keys/patches/heads)"),
    settings: list[str] = SET_OPTION,
    n: int = typer.Option(500, help="chair: images (a seeded random draw, stored in the run); pope: questions per "
                                    "split"),
    batch_size: int = typer.Option(16, help="samples per generate call"),
    max_new_tokens: int = typer.Option(None, help="greedy tokens (default 64 for captions, 8 for answers)"),
    prompt: str = typer.Option("Describe the image.", help="the caption prompt (chair)"),
    pope_suffix: str = typer.Option("", help="text appended to every POPE question"),
    splits: str = typer.Option("random,popular,adversarial", help="POPE splits"),
    parser: str = typer.Option("official", help="POPE answer parser: official (the POPE repository's rule) or exact"),
    synonyms: Path = typer.Option(None, help="CHAIR synonym list in the reference format (default: the data "
                                             "folder's synonyms.txt, else headlab's own COCO list)"),
    resamples: int = typer.Option(2000, help="bootstrap resamples"),
    seed: int = typer.Option(0, help="seed of the image draw, the controls and the bootstrap"),
    t_vhd: bool = typer.Option(False, "--t-vhd", help="chair: also the T-VHD of every caption token (two "
                                                       "teacher-forced passes per batch and method)"),
    dtype: str = DTYPE_OPTION,
    device: str = DEVICE_OPTION,
    out: Path = typer.Option(None, help="run directory (default: the runs folder + hallucination-<model>-<time>)"),
    offline: bool = OFFLINE_OPTION,
    quiet: bool = QUIET_OPTION,
    threads: int = THREADS_OPTION,
) -> None:
    """CHAIR or POPE of several hallucination fixes on the same images, with bootstrap CIs and controls."""
    from headlab.analyses.hallucination_eval import (
        HallucinationConfig,
        analyze_hallucination,
        chair_images,
        pope_questions,
    )
    from headlab.runs import run_target

    started = time.perf_counter()
    quiet_hub_progress(quiet)
    with reported_errors(model, "lower --batch-size or --n, or use --dtype bfloat16"):
        chosen = split_methods(methods)
        config = HallucinationConfig(bench=bench, methods=chosen, options=parse_settings(settings, chosen),
                                     controls=controls, n=n, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                     prompt=prompt, pope_suffix=pope_suffix,
                                     splits=[s.strip() for s in splits.split(",") if s.strip()], parser=parser,
                                     synonyms=str(synonyms) if synonyms is not None else None, resamples=resamples,
                                     seed=seed, t_vhd=t_vhd)
        config.check()
        if synonyms is not None and not synonyms.is_file():
            raise InputError(f"--synonyms {synonyms}: no such file")
        # Every input file is read before the model loads.
        if bench == "chair":
            chair_images(data, n, seed)
        else:
            pope_questions(data, config.splits, n)
        runs_dir, run_name = run_target(out, "hallucination", model)
        used_threads = use_threads(threads)
        from headlab.loading import load

        loaded = load(model, dtype=dtype, device=device, local_files_only=offline)
        result = analyze_hallucination(loaded, data, config, progress=not quiet)
        path = result.save(runs_dir, run_name)
    console.print(result.report, highlight=False, soft_wrap=True)
    print_written(path, used_threads, time.perf_counter() - started)
