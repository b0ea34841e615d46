"""``analyze vhd --model M --images DIR --prompts FILE``: VHD heatmaps and T-VHD of hallucinated vs correct
object tokens (with ``--annotations``: a COCO instances file naming each image's objects).

Every image is asked every prompt (one prompt a line). Bad inputs (folder, files, options) are one
``error:`` line with exit code 2, checked before the model loads; the run is written atomically.
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


def read_prompts(path: Path) -> list[str]:
    if not path.is_file():
        raise InputError(f"--prompts {path}: no such file; pass a text file with one prompt a line")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as err:
        raise InputError(f"--prompts {path} is not UTF-8 text") from err
    if not lines:
        raise InputError(f"--prompts {path} is empty: one prompt a line")
    return lines


def vhd(
    model: str = typer.Option("llava-smol", help="an LVLM: llava-smol, tiny-llava, tiny-qwen2-vl, llava-1.5-7b, …"),
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
    dtype: str = DTYPE_OPTION,
    device: str = DEVICE_OPTION,
    out: Path = typer.Option(None, help="run directory (default: the runs folder + vhd-<model>-<time>)"),
    offline: bool = OFFLINE_OPTION,
    quiet: bool = QUIET_OPTION,
    threads: int = THREADS_OPTION,
) -> None:
    """VHD (He et al., 2025): how much each head's output changes without the image, per generated token."""
    from headlab.analyses.hallucination_metrics import load_coco_objects, load_synonyms
    from headlab.analyses.vhd import VhdConfig, analyze_vhd
    from headlab.lvlm import LvlmSample, image_files, load_image
    from headlab.runs import run_target

    started = time.perf_counter()
    quiet_hub_progress(quiet)
    with reported_errors(model, "lower --batch-size or --max-images, or use --dtype bfloat16"):
        config = VhdConfig(max_new_tokens=max_new_tokens, remove=remove, k=k, batch_size=batch_size)
        config.check()
        if max_images < 1:
            raise InputError(f"--max-images must be at least 1, got {max_images}")
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
        runs_dir, run_name = run_target(out, "vhd", model)
        used_threads = use_threads(threads)
        from headlab.loading import load

        loaded = load(model, dtype=dtype, device=device, local_files_only=offline)
        samples = [LvlmSample(text, [picture]) for picture in pictures for text in texts]
        result = analyze_vhd(loaded, samples, config, truth=truth, synonyms=table)
        result.prompts = texts
        path = result.save(runs_dir, run_name)
    summary = result.summary
    console.print(f"VHD on {model}: {summary['samples']} samples, {summary['tokens']} tokens; top heads "
                  + ", ".join(f"L{h['layer']}H{h['head']} {h['vhd']:.3g}" for h in summary["top_heads"]),
                  highlight=False, soft_wrap=True)
    for status, entry in summary["object_tokens"].items():
        console.print(f"  {status} object tokens: {entry['tokens']}, mean T-VHD (layer top-{k} sum) "
                      f"{entry['mean_t_vhd_layer_topk_sum']:.4g}", highlight=False, soft_wrap=True)
    print_written(path, used_threads, time.perf_counter() - started)
