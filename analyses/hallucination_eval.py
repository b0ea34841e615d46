"""``analyze hallucination``: the training-free fixes compared on one evaluation, CHAIR or POPE.

Every method generates on the same images (CHAIR: one caption each; POPE: one answer per question), greedy,
batched with the KV cache (analyses/lvlm_fixes.py); the run holds one table of method × metric with a
percentile bootstrap CI of each value and of its difference from ``none`` on the same images or questions
(paired), the captions or answers themselves, and the image list (the papers' "500 random images" cannot be
redrawn: headlab stores which images it used). ``controls=True`` adds, for every method, its random
control of the same size (random keys, patches, sinks or heads): an effect is real only where it beats its
control, not just zero.

Data (``--data DIR``): CHAIR reads COCO ``instances_*.json`` / ``captions_*.json`` (or headlab's
``annotations.json`` / ``captions.json``) with the images in ``DIR/images`` or ``DIR`` (or ``DIR/val2014``);
POPE reads ``pope_{split}.jsonl`` or the POPE repository's ``coco_pope_{split}.json`` (JSON lines
``{question_id, image, text, label}``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from headlab.errors import InputError

BENCHES = ("chair", "pope")
SPLITS = ("random", "popular", "adversarial")
CAPTION_PROMPT = "Describe the image."
IMAGE_FOLDERS = ("images", "val2014", ".")
CHAIR_METRICS = ("chair_s", "chair_i", "recall", "precision", "f1", "mean_length_words")
POPE_METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


@dataclass
class HallucinationConfig:
    bench: str = "chair"
    methods: list[str] = field(default_factory=lambda: ["none"])
    options: dict[str, dict] = field(default_factory=dict)  # per method: dataclass fields (e.g. {"var": {"tau": 15}})
    controls: bool = False
    n: int = 500  # CHAIR: images; POPE: questions per split
    batch_size: int = 16
    max_new_tokens: int | None = None  # default: 64 for captions, 8 for answers
    prompt: str = CAPTION_PROMPT
    pope_suffix: str = ""  # appended to each POPE question (LLaVA-1.5's harness: " Answer the question using …")
    splits: list[str] = field(default_factory=lambda: list(SPLITS))
    parser: str = "official"
    synonyms: str | None = None
    resamples: int = 2000
    seed: int = 0
    t_vhd: bool = False  # CHAIR: T-VHD (layer top-8 sum, plain model, image dropped) of every caption token

    def check(self) -> None:
        from .hallucination_metrics import POPE_PARSERS
        from .lvlm_fixes import FIXES

        if self.bench not in BENCHES:
            raise InputError(f"--bench {self.bench!r}: use chair or pope")
        unknown = [m for m in self.methods if m not in FIXES]
        if unknown:
            raise InputError(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(sorted(FIXES))}")
        if len(set(self.methods)) != len(self.methods) or not self.methods:
            raise InputError("--methods: name each method once (none, vhr, var, pai, paint, vaf)")
        stray = sorted(set(self.options) - set(self.methods))
        if stray:
            raise InputError(f"--set names {', '.join(stray)}, which is not among --methods")
        if self.n < 1 or self.batch_size < 1 or (self.max_new_tokens is not None and self.max_new_tokens < 1):
            raise InputError("--n, --batch-size and --max-new-tokens must be at least 1")
        if self.parser not in POPE_PARSERS:
            raise InputError(f"--parser {self.parser!r}: use one of {', '.join(POPE_PARSERS)}")
        bad = [s for s in self.splits if not s]
        if bad or not self.splits:
            raise InputError("--splits: name at least one POPE split (random, popular, adversarial)")
        for name in self.methods:
            self.make(name, control=False)  # unknown options fail here, before the model loads

    def labels(self) -> list[tuple[str, str, bool]]:
        """(label, method, control) of every run, ``none`` first."""
        out = [("none", "none", False)] if "none" in self.methods else []
        for name in self.methods:
            if name != "none":
                out.append((name, name, False))
                if self.controls:
                    out.append((f"{name}-control", name, True))
        return out

    def make(self, name: str, control: bool):
        from .lvlm_fixes import make_fix

        options = dict(self.options.get(name, {}))
        if control:
            options["control"] = True
        return make_fix(name, **options)

    @property
    def new_tokens(self) -> int:
        return self.max_new_tokens or (64 if self.bench == "chair" else 8)


# ---------------------------------------------------------------------------------------------------
# Inputs


def image_folder(data: Path) -> Path:
    for name in IMAGE_FOLDERS:
        folder = data / name
        if folder.is_dir() and any(p.suffix.lower() in (".png", ".jpg", ".jpeg") for p in folder.iterdir()):
            return folder
    raise InputError(f"{data} holds no images (looked in {', '.join(IMAGE_FOLDERS)}): put the image files in "
                     f"{data}/images")


def chair_images(data: Path, n: int, seed: int) -> list[Path]:
    """A seeded random draw of ``n`` annotated images that exist on disk, in file-name order (stored in the run)."""
    from .hallucination_metrics import find_coco_files, read_coco_json

    files = find_coco_files(data)
    names: set[str] = set()
    for kind in ("instances", "captions"):
        for path in files[kind]:
            names |= {im["file_name"] for im in read_coco_json(path, kind).get("images", []) if "file_name" in im}
    folder = image_folder(data)
    present = sorted(name for name in names if (folder / name).is_file())
    if not present:
        raise InputError(f"none of the annotated images is in {folder}: pass the folder the annotations describe")
    chosen = sorted(random.Random(seed).sample(present, min(n, len(present))))
    return [folder / name for name in chosen]


def pope_questions(data: Path, splits: Sequence[str], n: int) -> dict[str, list[dict]]:
    """The first ``n`` questions of each split's file, with the image path resolved (checked before the model loads)."""
    from .hallucination_metrics import load_pope

    folder = image_folder(data)
    out = {}
    for split in splits:
        candidates = [data / f"pope_{split}.jsonl", data / f"coco_pope_{split}.json", data / f"coco_pope_{split}.jsonl"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise InputError(f"no POPE file for split {split!r} in {data} (pope_{split}.jsonl or coco_pope_{split}"
                             ".json); build one with headlab.analyses.pope_build or pass --splits")
        items = load_pope(path)[:n]
        for item in items:
            image = folder / item["image"]
            if not image.is_file():
                raise InputError(f"{path.name}: question {item.get('question_id')} names {item['image']}, which is "
                                 f"not in {folder}")
            item["path"] = image
        out[split] = items
    return out


# ---------------------------------------------------------------------------------------------------
# Generation


def generate_all(loaded, prompts: Sequence[tuple[Path, str]], method, *, batch_size: int, max_new_tokens: int,
                 progress: Callable[[int], None] | None = None, token_rows: list | None = None) -> list[str]:
    """Greedy text for each (image, prompt) under ``method``, in batches. ``token_rows``: a list that receives
    one row per generated token with its T-VHD (the plain model's, teacher-forced on the generated text)."""
    from headlab.lvlm import LvlmSample, load_image

    from .lvlm_fixes import decode, generate_fixed

    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        samples = [LvlmSample(prompt, [load_image(image)]) for image, prompt in chunk]
        tokens = generate_fixed(loaded, samples, [method], max_new_tokens=max_new_tokens)
        texts += decode(loaded, tokens)
        if token_rows is not None and tokens.shape[1]:
            token_rows += _t_vhd_rows(loaded, samples, tokens, [image.name for image, _ in chunk])
        if progress is not None:
            progress(len(chunk))
    return texts


def _t_vhd_rows(loaded, samples, tokens, images: Sequence[str]) -> list[dict]:
    from .vhd import t_vhd, vhd_of

    trace = vhd_of(loaded, samples, tokens)
    values = t_vhd(trace.vhd, aggregation="layer_topk_sum", z_norm_without=trace.z_norm_without)  # [batch, step]
    tok = loaded.text_tokenizer
    return [{"image": images[b], "step": t, "token": tok.decode(tokens[b, t:t + 1]), "t_vhd": float(values[b, t])}
            for b in range(tokens.shape[0]) for t in range(tokens.shape[1]) if trace.valid[b, t]]


# ---------------------------------------------------------------------------------------------------
# The analysis


def analyze_hallucination(loaded, data: Path, config: HallucinationConfig | None = None, *, progress: bool = True):
    """Every configured method (and control) on ``data``; a ``Result`` with the metric table and the outputs."""
    from tqdm.auto import tqdm

    config = config or HallucinationConfig()
    config.check()
    data = Path(data)
    runs = config.labels()
    if config.bench == "chair":
        images = chair_images(data, config.n, config.seed)
        jobs = [(image, config.prompt) for image in images]
    else:
        questions = pope_questions(data, config.splits, config.n)
        jobs = [(q["path"], q["text"] + config.pope_suffix) for split in config.splits for q in questions[split]]
    bar = tqdm(total=len(jobs) * len(runs), desc="generating", unit="sample", disable=not progress)
    outputs: dict[str, list[str]] = {}
    described: dict[str, dict] = {}
    token_rows: list[dict] = []
    for label, name, control in runs:
        method = config.make(name, control)
        bar.set_postfix_str(label)
        rows = [] if config.t_vhd and config.bench == "chair" else None
        outputs[label] = generate_all(loaded, jobs, method, batch_size=config.batch_size,
                                      max_new_tokens=config.new_tokens, progress=bar.update, token_rows=rows)
        token_rows += [{"method": label, **row} for row in rows or []]
        described[label] = method.settings()
    bar.close()
    if config.bench == "chair":
        result = _chair_result(loaded, data, config, images, outputs, described)
        if token_rows:
            result.tables["t_vhd"] = pd.DataFrame(token_rows)
        return result
    return _pope_result(loaded, config, questions, outputs, described)


def _rows_with_ci(label: str, metric: str, value: float, ci: Sequence[float], delta: dict | None,
                  split: str | None = None, control: dict | None = None) -> dict:
    """One table row: the value and its CI; ``delta`` from ``none`` and ``vs_control`` (method − its random
    control), each a paired difference on the same images or questions with its CI."""
    row = {"method": label, "metric": metric, "value": value, "ci_low": ci[0], "ci_high": ci[1],
           "delta": None, "delta_ci_low": None, "delta_ci_high": None,
           "vs_control": None, "vs_control_ci_low": None, "vs_control_ci_high": None}
    if split is not None:
        row = {"split": split, **row}
    if delta is not None:
        row.update(delta=delta["delta"], delta_ci_low=delta["ci_low"], delta_ci_high=delta["ci_high"])
    if control is not None:
        row.update(vs_control=control["delta"], vs_control_ci_low=control["ci_low"],
                   vs_control_ci_high=control["ci_high"])
    return row


def _control_of(label: str, scored: dict):
    """The run of ``label``'s random control, if there is one (never for a control itself)."""
    return None if label.endswith("-control") else scored.get(f"{label}-control")


def _chair_result(loaded, data, config, images, outputs, described):
    from .hallucination_metrics import (
        bootstrap_chair,
        chair_from_coco,
        load_synonym_list,
        paired_bootstrap_chair,
    )

    synonyms = load_synonym_list(config.synonyms) if config.synonyms else _default_synonyms(data)
    names = [p.name for p in images]
    scored = {label: chair_from_coco(list(zip(names, texts, strict=True)), data, synonyms=synonyms)
              for label, texts in outputs.items()}
    rows, captions, summary = [], [], {}
    base = scored.get("none")
    for label, result in scored.items():
        absolute = bootstrap_chair(result, n=config.resamples, seed=config.seed)["metrics"]
        paired = (paired_bootstrap_chair(base, result, n=config.resamples, seed=config.seed)["metrics"]
                  if base is not None and label != "none" else {})
        control = _control_of(label, scored)
        versus = (paired_bootstrap_chair(control, result, n=config.resamples, seed=config.seed)["metrics"]
                  if control is not None else {})
        for metric in CHAIR_METRICS:
            entry = absolute[metric]
            rows.append(_rows_with_ci(label, metric, entry["value"], entry["ci"], paired.get(metric),
                                      control=versus.get(metric)))
        summary[label] = {m: absolute[m]["value"] for m in CHAIR_METRICS} | {
            "mentions": int(result.mentions.sum()),
            **({f"delta_{m}": [paired[m]["delta"], paired[m]["ci_low"], paired[m]["ci_high"]]
                for m in ("chair_i", "chair_s", "recall", "f1")} if paired else {})}
        for i, row in enumerate(result.rows()):
            captions.append({"method": label, "image": names[i], "caption": outputs[label][i], **row})
    table = pd.DataFrame(rows)
    first = next(iter(scored.values()))
    meta = {"lemmatizer": first.lemmatizer, "synonyms": first.synonyms, "count": first.count}
    # The list travels with the run, so the dashboard can mark a user's synonyms without reading outside its folder.
    words = pd.DataFrame(sorted(synonyms.entries.items()), columns=["word", "object"])
    return _result(loaded, config, described, {"metrics": table, "captions": pd.DataFrame(captions),
                                               "images": pd.DataFrame({"image": names}), "synonyms": words},
                   summary, meta, _figure(table, CHAIR_METRICS[:5], f"{loaded.name}: CHAIR per method"))


def _default_synonyms(data: Path):
    """headlab's COCO list, unless the data folder ships its own (headlab's synthetic sets do)."""
    from .hallucination_metrics import load_synonym_list

    own = data / "synonyms.txt"
    return load_synonym_list(own if own.is_file() else None)


def _pope_result(loaded, config, questions, outputs, described):
    from .hallucination_metrics import paired_bootstrap_pope, pope_eval

    scored: dict[str, dict] = {}
    answers = []
    for label, texts in outputs.items():
        scored[label], start = {}, 0
        for split in config.splits:
            items = questions[split]
            part = texts[start:start + len(items)]
            start += len(items)
            scored[label][split] = pope_eval(part, items, parser=config.parser)
            for item, text, read in zip(items, part, scored[label][split].answers, strict=True):
                answers.append({"method": label, "split": split, "question_id": item.get("question_id"),
                                "image": item["image"], "question": item["text"], "label": item["label"],
                                "answer": text, "read_as": read})
    rows, summary = [], {}
    base = scored.get("none")
    for label, splits in scored.items():
        own = paired_bootstrap_pope(splits, splits, n=config.resamples, seed=config.seed)  # CIs of the values
        paired = (paired_bootstrap_pope(base, splits, n=config.resamples, seed=config.seed)
                  if base is not None and label != "none" else None)
        control = _control_of(label, scored)
        versus = (paired_bootstrap_pope(control, splits, n=config.resamples, seed=config.seed)
                  if control is not None else None)
        for split in config.splits:
            for metric in POPE_METRICS:
                entry = own["splits"][split][metric]
                delta = paired["splits"][split][metric] if paired is not None else None
                vs = versus["splits"][split][metric] if versus is not None else None
                rows.append(_rows_with_ci(label, metric, entry["edited"], entry["edited_ci"], delta, split, vs))
        mean = own.get("mean_f1") or own["splits"][config.splits[0]]["f1"]

        def mean_f1(result):
            return (result.get("mean_f1") or result["splits"][config.splits[0]]["f1"]) if result is not None else None

        rows.append(_rows_with_ci(label, "mean_f1", mean["edited"], mean["edited_ci"], mean_f1(paired), "all",
                                  mean_f1(versus)))
        summary[label] = {"mean_f1": mean["edited"], **{f"{s}_f1": own["splits"][s]["f1"]["edited"]
                                                        for s in config.splits},
                          **{f"{s}_yes_ratio": own["splits"][s]["yes_ratio"]["edited"] for s in config.splits}}
        if paired is not None:
            m = paired.get("mean_f1") or paired["splits"][config.splits[0]]["f1"]
            summary[label]["delta_mean_f1"] = [m["delta"], m["ci_low"], m["ci_high"]]
    table = pd.DataFrame(rows)
    meta = {"parser": config.parser, "splits": config.splits}
    figure = _figure(table[table["split"] == "all"], ("mean_f1",), f"{loaded.name}: POPE mean F1 per method")
    return _result(loaded, config, described, {"metrics": table, "answers": pd.DataFrame(answers)}, summary, meta,
                   figure)


def _figure(table: pd.DataFrame, metrics: Sequence[str], title: str):
    import plotly.graph_objects as go

    fig = go.Figure()
    for metric in metrics:
        part = table[table["metric"] == metric]
        fig.add_trace(go.Bar(name=metric, x=part["method"], y=part["value"],
                             error_y=dict(type="data", symmetric=False, array=part["ci_high"] - part["value"],
                                          arrayminus=part["value"] - part["ci_low"])))
    fig.update_layout(title=title, barmode="group", yaxis_title="value (95% bootstrap CI)")
    return fig


def _result(loaded, config, described, tables, summary, meta, figure):
    from headlab.result import Result

    lines = [f"# Hallucination fixes on {loaded.name}: {config.bench.upper()}", "",
             f"- methods: {', '.join(label for label, _, _ in config.labels())}; n = {config.n}; "
             f"{config.new_tokens} new tokens; greedy", f"- {meta}", "", "| method | " + " | ".join(
                 k for k in next(iter(summary.values())) if not k.startswith("delta")) + " |"]
    keys = [k for k in next(iter(summary.values())) if not k.startswith("delta")]
    lines.append("|" + "---|" * (len(keys) + 1))
    for label, entry in summary.items():
        lines.append(f"| {label} | " + " | ".join(f"{entry[k]:.4g}" for k in keys) + " |")
    settings = {**config.__dict__, "methods_run": described, "scoring": meta}  # meta never shadows an option
    return Result("hallucination", loaded.name, settings, tables=tables, figures={"metrics": figure},
                  summary={"bench": config.bench, "methods": summary, **meta}, report="\n".join(lines))
