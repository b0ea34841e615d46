"""The vision-language commands: ``analyze vhd``, ``analyze hallucination`` and ``headlab fix``.

- ``analyze vhd --images DIR --prompts FILE``: VHD heatmaps and T-VHD of hallucinated vs correct object
  tokens (with ``--annotations``: a COCO instances file naming each image's objects);
- ``analyze hallucination --bench chair|pope --data DIR --methods none,vhr,var,pai,paint,vaf``: one run with
  the method × metric table (bootstrap CIs), the captions or answers, and a dashboard page;
- ``headlab fix --method none --method pai … --image IMG --prompt "…"``: each fix's generation side by side.

Method options: ``--set pai.alpha=0.5 --set var.tau=15`` (the fields of each method's dataclass). Every
input file is read before the model loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from headlab.checks import at_least
from headlab.cli import options
from headlab.cli.model_args import ModelArgs, Runtime, takes_model
from headlab.cli.output import console, say, warn
from headlab.cli.skeleton import Prepared, run_and_save, runs_folder_target
from headlab.errors import InputError

LVLM_HELP = "an LVLM: llava-smol, llava-real, tiny-llava, tiny-qwen2-vl, llava-1.5-7b (local), …"
# The fixes generate with the model's KV cache and hooks on the local modules.
LOCAL = (Runtime.local,)
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
    check_method_names(methods, "--methods")
    return methods


def check_method_names(methods: list[str], flag: str) -> None:
    """Unknown fixes, named with the command's own flag (``--method`` or ``--methods``)."""
    from headlab.analyses.lvlm_fixes import FIXES

    unknown = [m for m in methods if m not in FIXES]
    if unknown:
        raise InputError(f"{flag}: unknown {', '.join(unknown)}; choose from {', '.join(sorted(FIXES))}")


@takes_model("llava-smol", LVLM_HELP)
def vhd(
    images: Path = typer.Option(..., help="folder of image files"),
    prompts: Path = typer.Option(..., help="text file, one prompt a line (every image gets every prompt)"),
    annotations: Path = typer.Option(None, help="COCO instances JSON: objects per image, to label hallucinations"),
    synonyms: Path = typer.Option(None, help="synonym list (one 'object, synonym, …' line each; default: the "
                                             "annotation categories)"),
    max_images: int = typer.Option(64, help="use at most this many images (sorted by name)"),
    max_new_tokens: int = typer.Option(24, help="greedy tokens per answer"),
    remove: str = typer.Option("drop", help="how the image is removed: drop (tokens removed, positions "
                                            "recomputed) or blank (a grey image of the same size)"),
    k: int = typer.Option(8, help="top-k heads of the T-VHD aggregations"),
    batch_size: int = typer.Option(8, help="samples per forward"),
    out: Path = options.RUNS_FOLDER,
    name: str = options.run_name("vhd"),
    quiet: bool = options.QUIET,
    *,
    model_args: ModelArgs,
) -> None:
    """VHD (He et al., 2025): how much each head's output changes without the image, per generated token."""

    def prepare(args: ModelArgs) -> Prepared:
        from headlab.analyses.configs import VhdConfig
        from headlab.analyses.hallucination_metrics import load_coco_objects, load_synonyms
        from headlab.prompts import read_prompts
        from headlab.provenance import describe_source

        config = VhdConfig(max_new_tokens=max_new_tokens, remove=remove, k=k, batch_size=batch_size)
        config.check()
        at_least(max_images, 1, "--max-images")
        from headlab.lvlm import LvlmSample, image_files, load_image  # torch: after the plain checks

        files = image_files(images)[:max_images]
        texts = read_prompts(prompts)
        pictures = [load_image(f) for f in files]  # every file decoded before the model loads
        truth = table = None
        if annotations is not None:
            objects = load_coco_objects(annotations)
            missing = [f.name for f in files if f.name not in objects]
            if missing:
                raise InputError(f"--annotations {annotations} has no entry for {', '.join(missing[:3])}: pass the "
                                 "annotation file of these images")
            truth = [objects[f.name] for f in files for _ in texts]
            names = sorted({o for objs in objects.values() for o in objs})
            table = load_synonyms(synonyms) if synonyms is not None else {n.lower(): n for n in names}
        samples = [LvlmSample(text, [picture]) for picture in pictures for text in texts]
        return Prepared(*runs_folder_target("vhd", args.model, out, name), texts=texts,
                        source=describe_source(str(prompts)), extra=(config, samples, truth, table))

    def run(loaded, prepared: Prepared):
        from headlab.analyses.vhd import analyze_vhd

        config, samples, truth, table = prepared.extra
        return analyze_vhd(loaded, samples, config, truth=truth, synonyms=table)

    def show(result, path: Path) -> None:
        summary = result.summary
        say(f"VHD on {model_args.model}: {summary['samples']} samples, {summary['tokens']} tokens; top heads "
            + ", ".join(f"L{h['layer']}H{h['head']} {h['vhd']:.3g}" for h in summary["top_heads"]))
        for status, entry in summary["object_tokens"].items():
            say(f"  {status} object tokens: {entry['tokens']}, mean T-VHD (layer top-{k} sum) "
                f"{entry['mean_t_vhd_layer_topk_sum']:.4g}")

    run_and_save(model_args, command="analyze vhd", prepare=prepare, run=run, show=show, quiet=quiet,
                 runtimes=LOCAL, advice="lower --batch-size or --max-images, or use --dtype bfloat16")


@takes_model("llava-smol", LVLM_HELP, scalable=True)
def hallucination(
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
    allow_missing_images: bool = typer.Option(False, help="chair: evaluate the annotated images that are on disk "
                                                          "when some are missing; the run lists the missing ones"),
    out: Path = options.RUNS_FOLDER,
    name: str = options.run_name("hallucination"),
    quiet: bool = options.QUIET,
    *,
    model_args: ModelArgs,
) -> None:
    """CHAIR or POPE of several hallucination fixes on the same images, with bootstrap CIs and controls."""

    def prepare(args: ModelArgs) -> Prepared:
        from headlab.analyses.hallucination_eval import HallucinationConfig, chair_images, pope_questions

        chosen = split_methods(methods)
        config = HallucinationConfig(bench=bench, methods=chosen, options=parse_settings(settings, chosen),
                                     controls=controls, n=n, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                     prompt=prompt, pope_suffix=pope_suffix,
                                     splits=[s.strip() for s in splits.split(",") if s.strip()], parser=parser,
                                     synonyms=str(synonyms) if synonyms is not None else None, resamples=resamples,
                                     seed=seed, t_vhd=t_vhd, allow_missing_images=allow_missing_images)
        config.check()
        if synonyms is not None and not synonyms.is_file():
            raise InputError(f"--synonyms {synonyms}: no such file")
        # Every input file is read before the model loads.
        if bench == "chair":
            inputs = chair_images(data, n, seed, allow_missing=allow_missing_images)
        else:
            inputs = pope_questions(data, config.splits, n)
        # The images and questions (and the folder they came from) identify a run's inputs for --resume and merges.
        return Prepared(*runs_folder_target("hallucination", args.model, out, name), extra=config,
                        inputs={"data": str(data.resolve()), "items": inputs})

    def run(loaded, prepared: Prepared):
        from headlab.analyses.hallucination_eval import analyze_hallucination

        return analyze_hallucination(loaded, data, prepared.extra, progress=not quiet, warn=warn)

    run_and_save(model_args, command="analyze hallucination", prepare=prepare, run=run, quiet=quiet,
                 runtimes=LOCAL, show=lambda result, path: say(result.report),
                 advice="lower --batch-size or --n, or use --dtype bfloat16")


@takes_model("llava-smol", LVLM_HELP)
def fix(
    method: list[str] = typer.Option(["none", "pai"], help="a fix to run (repeat): none, vhr, var, pai, paint, vaf"),
    image: Path = typer.Option(..., help="an image file"),
    prompt: str = typer.Option("Describe the image.", help="the user prompt"),
    settings: list[str] = SET_OPTION,
    max_new_tokens: int = typer.Option(48, help="greedy tokens per generation"),
    out: Path = options.RUNS_FOLDER,
    name: str = options.run_name("fix"),
    quiet: bool = options.QUIET,
    *,
    model_args: ModelArgs,
) -> None:
    """Generate with each fix on one image; the answers side by side, printed and saved as a run."""

    def prepare(args: ModelArgs) -> Prepared:
        from headlab.analyses.hallucination_eval import HallucinationConfig

        at_least(max_new_tokens, 1, "--max-new-tokens")
        methods = list(dict.fromkeys(method))
        check_method_names(methods, "--method")
        options_by_method = parse_settings(settings, methods)
        config = HallucinationConfig(methods=methods, options=options_by_method)
        config.check()
        from headlab.lvlm import load_image  # torch: after the plain checks

        picture = load_image(image)
        fixes = {m: config.make(m, False) for m in methods}
        return Prepared(*runs_folder_target("fix", args.model, out, name),
                        extra=(picture, fixes, options_by_method))

    def run(loaded, prepared: Prepared):
        from headlab.analyses.fix_compare import compare_fixes

        picture, fixes, options_by_method = prepared.extra
        return compare_fixes(loaded, picture, image, prompt, fixes, max_new_tokens, options_by_method)

    def show(result, path: Path) -> None:
        from rich.table import Table

        from headlab.figures import model_title

        table = Table(title=f"{model_title(result.model)}: {prompt!r} on {image.name}", show_lines=True)
        for column, justify in (("method", "left"), ("generation", "left"), ("seconds", "right")):
            table.add_column(column, justify=justify)
        for row in result.tables["generations"].itertuples():
            table.add_row(row.method, row.generation, f"{row.seconds:.1f}")
        console.print(table)

    run_and_save(model_args, command="headlab fix", prepare=prepare, run=run, show=show, quiet=quiet,
                 runtimes=LOCAL, advice="lower --max-new-tokens or use --dtype bfloat16")
