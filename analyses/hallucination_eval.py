"""``analyze hallucination``: the training-free fixes compared on one evaluation, CHAIR or POPE.

Every method generates on the same images (CHAIR: one caption each; POPE: one answer per question), greedy,
batched with the KV cache (analyses/lvlm_fixes.py); the run holds one table of method × metric with a
percentile bootstrap CI of each value and of its difference from ``none`` on the same images or questions
(paired), the captions or answers themselves, and the image list (the papers' "500 random images" cannot be
redrawn: headlab stores which images it used). ``controls=True`` adds, for every method that has one (all but
VCD), its random control of the same size (random keys, patches, sinks or heads): an effect is real only where
it beats its control, not just zero.

Data (``--data DIR``): CHAIR reads COCO ``instances_*.json`` / ``captions_*.json`` (or headlab's
``annotations.json`` / ``captions.json``) with the images in ``DIR/images`` or ``DIR`` (or ``DIR/val2014``);
POPE reads ``pope_{split}.jsonl`` or the POPE repository's ``coco_pope_{split}.json`` (JSON lines
``{question_id, image, text, label}``). An annotated CHAIR image missing on disk is refused unless
``allow_missing_images`` (then the run lists the missing ones). Below ``MIN_CI_N`` images or questions per
split the report shows the CIs but gives no verdict on them, and the run carries a warning.

Scale (``headlab.tally``): the generation is one pass, ``generate``, whose units are (run, batch of images or
questions) pairs, run by run; each unit's captions or answers (and T-VHD rows) are ``rows``, so a sharded, ranked
or resumed run holds the outputs of one run, and the metrics, bootstrap CIs (seeded by ``seed`` alone) and
tables are computed from them after the merge. A batch's generation depends on that batch only (the random
controls draw from a seed and the batch); VAR, which finds its sink dimensions on its first batch, is shown that
batch first in a process that starts later in its run.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from headlab.errors import InputError, RunStoreError

if TYPE_CHECKING:
    from headlab.tally import Pass

BENCHES = ("chair", "pope")
SPLITS = ("random", "popular", "adversarial")
CAPTION_PROMPT = "Describe the image."
IMAGE_FOLDERS = ("images", "val2014", ".")
CHAIR_METRICS = ("chair_s", "chair_i", "recall", "precision", "f1", "mean_length_words")
POPE_METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")
# Below this many images (CHAIR) or questions per split (POPE) the percentile bootstrap says nothing: with n units
# a resample can only take a handful of values (CHAIR_s on 4 images: 5), the percentile interval is too narrow even
# for normal data (by about sqrt((n - 1) / n), more for skewed or bounded metrics; Hesterberg 2015, "What teachers
# should know about the bootstrap"), and when every unit moves the same way it collapses to a point ([-1, -1] on 4
# images). 20 is a common floor for percentile intervals: below it their coverage falls well short of 95%. A floor,
# not a guarantee: the report gives no verdict below it, and says why.
MIN_CI_N = 20
SHOWN_MISSING = 5  # missing images named in a message; the run's table lists them all


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
    allow_missing_images: bool = False  # CHAIR: draw from the annotated images on disk when some are missing

    def check(self) -> None:
        from .hallucination_metrics import POPE_PARSERS
        from .lvlm_fixes import FIXES

        if self.bench not in BENCHES:
            raise InputError(f"--bench {self.bench!r}: use chair or pope")
        unknown = [m for m in self.methods if m not in FIXES]
        if unknown:
            raise InputError(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(sorted(FIXES))}")
        if len(set(self.methods)) != len(self.methods) or not self.methods:
            raise InputError(f"--methods: name each method once ({', '.join(sorted(FIXES))})")
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
        """(label, method, control) of every run, ``none`` first; no control for a method without one (VCD)."""
        from .lvlm_fixes import FIXES

        out = [("none", "none", False)] if "none" in self.methods else []
        for name in self.methods:
            if name != "none":
                out.append((name, name, False))
                if self.controls and FIXES[name].has_control:
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


def first_names(names: Sequence[str], shown: int = SHOWN_MISSING) -> str:
    """``"a.jpg, b.jpg and 4 more"``: the first ``shown`` names and the count of the rest."""
    head = ", ".join(names[:shown])
    return head + (f" and {len(names) - shown} more" if len(names) > shown else "")


@dataclass
class ChairDraw:
    """The images a CHAIR run evaluates, the annotated images missing on disk, and how many are annotated."""

    images: list[Path]
    missing: list[str]
    annotated: int


def chair_draw(data: Path, n: int, seed: int, allow_missing: bool = False) -> ChairDraw:
    """A seeded random draw of ``n`` annotated images that exist on disk, in file-name order (stored in the run).

    An annotated image missing on disk is refused (``InputError`` naming the first few and the count) unless
    ``allow_missing``: a run silently evaluating 14 of the 20 images its annotations describe misleads."""
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
    missing = sorted(names - set(present))
    if missing and not allow_missing:
        raise InputError(f"{len(missing)} of {len(names)} annotated images are not in {folder}: "
                         f"{first_names(missing)}; put them there, or pass --allow-missing-images to evaluate "
                         f"the {len(present)} that are")
    chosen = sorted(random.Random(seed).sample(present, min(n, len(present))))
    return ChairDraw([folder / name for name in chosen], missing, len(names))


def chair_images(data: Path, n: int, seed: int, allow_missing: bool = False) -> list[Path]:
    """The images of ``chair_draw`` (checked before the model loads)."""
    return chair_draw(data, n, seed, allow_missing).images


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


@dataclass
class Sample:
    """What a run evaluates: ``n`` units of its bootstrap (CHAIR: images; POPE: questions of its smallest split),
    ``text`` for the report, the warnings about it and the annotated images missing on disk (CHAIR)."""

    n: int
    text: str
    warnings: list[str]
    missing: list[str] = field(default_factory=list)

    @property
    def ci_meaningful(self) -> bool:
        return self.n >= MIN_CI_N


def chair_sample(config: HallucinationConfig, draw: ChairDraw) -> Sample:
    n, missing = len(draw.images), draw.missing
    notes = ([f"--n {config.n} asked"] if n < config.n else []) + (
        [f"{len(missing)} of the {draw.annotated} annotated images missing on disk"] if missing else [])
    text = f"n = {n} images" + (f" ({'; '.join(notes)})" if notes else "")
    warnings = []
    if missing:
        warnings.append(f"{len(missing)} of {draw.annotated} annotated images are missing on disk "
                        f"({first_names(missing)}); evaluating {n} of the {draw.annotated - len(missing)} there "
                        "(--allow-missing-images)")
    elif n < config.n:
        warnings.append(f"--n {config.n} asks for more images than the data holds: evaluating {n}")
    return Sample(n, text, warnings + _small(n, "images"), missing)


def pope_sample(config: HallucinationConfig, questions: dict[str, list[dict]]) -> Sample:
    counts = {split: len(questions[split]) for split in config.splits}
    n = min(counts.values())
    text = (f"n = {n} questions per split" if len(set(counts.values())) == 1
            else "n = " + ", ".join(f"{k} questions ({split})" for split, k in counts.items()))
    short = {split: k for split, k in counts.items() if k < config.n}
    warnings = [f"--n {config.n} asks for more questions than the split holds: {k} in {split}"
                for split, k in short.items()]
    if short:
        text += f" (--n {config.n} asked)"
    return Sample(n, text, warnings + _small(n, "questions in a split"))


def _small(n: int, unit: str) -> list[str]:
    if n >= MIN_CI_N:
        return []
    return [f"{n} {unit}: too few for a bootstrap CI to mean anything (fewer than {MIN_CI_N}); the CIs and the "
            f"differences from none are shown, but they are no evidence of an effect, or of none: use --n "
            f"{MIN_CI_N} or more"]


def analyze_hallucination(loaded, data: Path, config: HallucinationConfig | None = None, *, progress: bool = True,
                          warn: Callable[[str], None] | None = None):
    """Every configured method (and control) on ``data``; a ``Result`` with the metric table and the outputs.

    ``warn`` receives each warning about the sample (too small for a CI, images missing on disk, fewer than
    ``--n``) before any generation; they are also in ``summary["warnings"]`` and the report."""
    from tqdm.auto import tqdm

    config = config or HallucinationConfig()
    config.check()
    data = Path(data)
    runs = config.labels()
    if config.bench == "chair":
        draw = chair_draw(data, config.n, config.seed, config.allow_missing_images)
        images, sample = draw.images, chair_sample(config, draw)
        jobs = [(image, config.prompt) for image in images]
    else:
        questions = pope_questions(data, config.splits, config.n)
        sample = pope_sample(config, questions)
        jobs = [(q["path"], q["text"] + config.pope_suffix) for split in config.splits for q in questions[split]]
    if warn is not None:
        for line in sample.warnings:
            warn(line)
    from headlab.tally import run_pass

    bar = tqdm(total=len(jobs) * len(runs), desc="generating", unit="sample", disable=not progress)
    generation = Generation(loaded, jobs, runs, config)
    try:
        run_pass(generation.as_pass(), on_unit=lambda unit: _advance(bar, generation, unit))
    finally:
        bar.close()
    outputs, described, token_rows = generation.texts(), generation.described(), generation.records.token_rows
    if config.bench == "chair":
        result = _chair_result(loaded, data, config, images, outputs, described, sample)
        if token_rows:
            result.tables["t_vhd"] = pd.DataFrame(token_rows)
        return result
    return _pope_result(loaded, config, questions, outputs, described, sample)


class Outputs:
    """Per generated batch, in job order: ``texts``, one row per (image, prompt) ``{"run", "job", "text"}``;
    ``token_rows``, the T-VHD rows (``--t-vhd``); ``settings``, each run's settings once per process that ran
    it (``{"run", "settings"}``: what VAR found on its first batch is among them).

    A ``headlab.tally.Mergeable`` by its protocol, not by inheritance: tally imports torch, and the CLI imports
    this module to check its inputs before any model (or torch) loads."""

    merging = {"texts": "rows", "token_rows": "rows", "settings": "rows"}

    def __init__(self) -> None:
        self.texts: list[dict[str, Any]] = []
        self.token_rows: list[dict[str, Any]] = []
        self.settings: list[dict[str, Any]] = []

    def state_dict(self) -> dict[str, Any]:
        from headlab.tally import Mergeable

        return Mergeable.state_dict(self)  # type: ignore[arg-type]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from headlab.tally import Mergeable

        Mergeable.load_state_dict(self, state)  # type: ignore[arg-type]

    def merge(self, state: dict[str, Any]) -> None:
        from headlab.tally import Mergeable

        Mergeable.merge(self, state)  # type: ignore[arg-type]


class Generation:
    """Every run's generation on ``jobs`` as units: unit ``u`` generates batch ``u % n_batches`` (``batch_size``
    jobs) under run ``u // n_batches`` of ``runs`` (``(label, method, control)``, as ``config.labels()``), into
    ``records`` (an ``Outputs``). Each process makes its own method objects."""

    def __init__(self, loaded, jobs: Sequence[tuple[Path, str]], runs: Sequence[tuple[str, str, bool]],
                 config: HallucinationConfig):
        self.loaded, self.jobs, self.runs, self.config = loaded, list(jobs), list(runs), config
        self.n_batches = -(-len(self.jobs) // config.batch_size)
        self.n_units = len(self.runs) * self.n_batches
        self.records = Outputs()
        self.methods: dict[str, Any] = {}  # label -> the method object of this process
        self.t_vhd = config.t_vhd and config.bench == "chair"

    def as_pass(self) -> Pass:
        """The pass ``generate``."""
        from headlab.tally import Pass

        return Pass("generate", self.n_units, self.step, {"outputs": self.records})

    def label(self, unit: int) -> str:
        return self.runs[unit // self.n_batches][0]

    def batch(self, b: int) -> list[tuple[Path, str]]:
        return self.jobs[b * self.config.batch_size:(b + 1) * self.config.batch_size]

    def _method(self, r: int, b: int):
        """Run ``r``'s method object, made on its first unit in this process; a method that learns from its
        first batch (VAR's sink dimensions, when not given) is shown batch 0 first when this process starts
        later in the run, so every batch is generated as in one run."""
        label, name, control = self.runs[r]
        if label not in self.methods:
            method = self.config.make(name, control)
            if b > 0:
                _first_batch(self.loaded, method, self.batch(0), self.config)
            self.methods[label] = method
            return method, True
        return self.methods[label], False

    def step(self, unit: int) -> None:
        r, b = divmod(unit, self.n_batches)
        label = self.runs[r][0]
        method, first = self._method(r, b)
        chunk = self.batch(b)
        rows: list[dict] | None = [] if self.t_vhd else None
        texts = generate_all(self.loaded, chunk, method, batch_size=self.config.batch_size,
                             max_new_tokens=self.config.new_tokens, token_rows=rows)
        start = b * self.config.batch_size
        self.records.texts += [{"run": label, "job": start + i, "text": text} for i, text in enumerate(texts)]
        self.records.token_rows += [{"method": label, **row} for row in rows or []]
        if first or b == 0:  # the settings once this process's method has seen its first batch
            self.records.settings.append({"run": label, "settings": method.settings()})

    def texts(self) -> dict[str, list[str]]:
        """label -> one text per job, in job order (``RunStoreError`` when a merge lacks a shard's units)."""
        out: dict[str, list[str]] = {label: [] for label, _, _ in self.runs}
        for row in self.records.texts:
            out[row["run"]].append(row["text"])
        for label in out:
            jobs = [row["job"] for row in self.records.texts if row["run"] == label]
            if jobs != list(range(len(self.jobs))):
                raise RunStoreError(f"the merged generations of {label} hold {len(jobs)} of {len(self.jobs)} "
                                    "outputs, or not in order: merge the states of every shard, in shard order")
        return out

    def described(self) -> dict[str, dict]:
        """label -> the method's settings (after its first batch), in run order. Every process that ran a method
        recorded them; they must agree (settings that depend on which batches a process saw would make the
        merged outputs those of no single run)."""
        found: dict[str, dict] = {}
        for row in self.records.settings:
            first = found.setdefault(row["run"], row["settings"])
            if first != row["settings"]:
                raise RunStoreError(f"the shards ran {row['run']} with different settings ({first} and "
                                    f"{row['settings']}): it learns from the batches it sees, and the shards "
                                    "saw different ones")
        return {label: found[label] for label, _, _ in self.runs}


def _first_batch(loaded, method, chunk: Sequence[tuple[Path, str]], config: HallucinationConfig) -> None:
    """Let ``method`` learn what it learns from its first batch (VAR: the sink dimensions of the model, when
    ``dims`` is not given) without generating on it: the same inputs ``generate_fixed`` builds for that batch."""
    if not hasattr(method, "sink_dims") or getattr(method, "dims", None) is not None:
        return  # every other method draws only from its seed and the batch at hand
    from headlab.lvlm import LvlmSample, build_inputs, load_image

    from .lvlm_fixes import FixContext

    samples = [LvlmSample(prompt, [load_image(image)]) for image, prompt in chunk]
    inputs = build_inputs(loaded, samples, padding_side="left").to(loaded.device)
    method.sink_dims(FixContext(loaded, samples, inputs))


def _advance(bar, generation: Generation, unit: int) -> None:
    """One generated batch on the bar, named by its run."""
    bar.set_postfix_str(generation.label(unit))
    bar.update(len(generation.batch(unit % generation.n_batches)))


def _rows_with_ci(label: str, metric: str, value: float, ci: Sequence[float], delta: dict | None,
                  split: str | None = None, control: dict | None = None, n: int | None = None) -> dict:
    """One table row: the value and its CI; ``delta`` from ``none`` and ``vs_control`` (method − its random
    control), each a paired difference on the same images or questions with its CI; ``n`` the units resampled
    (below ``MIN_CI_N`` the CIs mean nothing)."""
    row = {"method": label, "metric": metric, "value": value, "ci_low": ci[0], "ci_high": ci[1],
           "delta": None, "delta_ci_low": None, "delta_ci_high": None,
           "vs_control": None, "vs_control_ci_low": None, "vs_control_ci_high": None, "n": n}
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


def _chair_result(loaded, data, config, images, outputs, described, sample: Sample):
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
                                      control=versus.get(metric), n=len(names)))
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
    tables = {"metrics": table, "captions": pd.DataFrame(captions), "images": pd.DataFrame({"image": names}),
              "synonyms": words}
    if sample.missing:
        tables["missing_images"] = pd.DataFrame({"image": sample.missing})
    return _result(loaded, config, described, tables, summary, meta,
                   _figure(table, CHAIR_METRICS[:5], f"{loaded.title}: CHAIR per method"), sample)


def _default_synonyms(data: Path):
    """headlab's COCO list, unless the data folder ships its own (headlab's synthetic sets do)."""
    from .hallucination_metrics import load_synonym_list

    own = data / "synonyms.txt"
    return load_synonym_list(own if own.is_file() else None)


def _pope_result(loaded, config, questions, outputs, described, sample: Sample):
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
                rows.append(_rows_with_ci(label, metric, entry["edited"], entry["edited_ci"], delta, split, vs,
                                          len(questions[split])))
        mean = own.get("mean_f1") or own["splits"][config.splits[0]]["f1"]

        def mean_f1(result):
            return (result.get("mean_f1") or result["splits"][config.splits[0]]["f1"]) if result is not None else None

        rows.append(_rows_with_ci(label, "mean_f1", mean["edited"], mean["edited_ci"], mean_f1(paired), "all",
                                  mean_f1(versus), sample.n))
        summary[label] = {"mean_f1": mean["edited"], **{f"{s}_f1": own["splits"][s]["f1"]["edited"]
                                                        for s in config.splits},
                          **{f"{s}_yes_ratio": own["splits"][s]["yes_ratio"]["edited"] for s in config.splits}}
        if paired is not None:
            m = paired.get("mean_f1") or paired["splits"][config.splits[0]]["f1"]
            summary[label]["delta_mean_f1"] = [m["delta"], m["ci_low"], m["ci_high"]]
    table = pd.DataFrame(rows)
    meta = {"parser": config.parser, "splits": config.splits}
    figure = _figure(table[table["split"] == "all"], ("mean_f1",), f"{loaded.title}: POPE mean F1 per method")
    return _result(loaded, config, described, {"metrics": table, "answers": pd.DataFrame(answers)}, summary, meta,
                   figure, sample)


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


def scoring_text(meta: dict) -> str:
    """The scoring settings in words, for the report: CHAIR's synonym list, plural matching and counting, or
    POPE's answer parser and splits."""
    if "parser" in meta:
        return f"answers read by the {meta['parser']} parser; splits: {', '.join(meta['splits'])}"
    syn = meta.get("synonyms") or {}
    if syn.get("headlab_default"):
        synonyms = f"headlab's COCO list ({syn.get('objects')} objects; not the paper's list, not comparable to it)"
    else:
        synonyms = (f"{syn.get('path')} ({syn.get('objects')} objects, {syn.get('format')} format, sha256 "
                    f"{str(syn.get('sha256'))[:12]}…)")
    plurals = {"nltk-wordnet": "on (NLTK WordNet noun lemmas)",
               "builtin-singular": "on (headlab's built-in singulariser)"}.get(meta.get("lemmatizer"),
                                                                                str(meta.get("lemmatizer")))
    count = "every mention (as the reference CHAIR)" if meta.get("count") == "every" else "each object once a caption"
    return f"synonyms: {synonyms}; plural matching: {plurals}; counted: {count}"


def _differences(summary: dict, sample: Sample) -> list[str]:
    """Each method's paired difference from ``none`` on the headline metrics, with a verdict only where the
    sample is large enough for its CI to mean something."""
    lines = []
    for label, entry in summary.items():
        deltas = {k[len("delta_"):]: v for k, v in entry.items() if k.startswith("delta_")}
        if not deltas:
            continue
        parts = []
        for metric, (delta, low, high) in deltas.items():
            text = f"{metric} {delta:+.3g} [{low:.3g}, {high:.3g}]"
            if sample.ci_meaningful:
                text += " excludes 0" if low > 0 or high < 0 else " includes 0"
            parts.append(text)
        verdict = ("" if sample.ci_meaningful else
                   f" (no verdict: n = {sample.n} is too few for a CI to mean anything, under {MIN_CI_N})")
        lines.append(f"- {label}: " + "; ".join(parts) + verdict)
    if not lines:
        return []
    return ["", "## Difference from none (paired 95% bootstrap CI)", "", *lines]


def _result(loaded, config, described, tables, summary, meta, figure, sample: Sample):
    from headlab.result import Result

    keys = [k for k in next(iter(summary.values())) if not k.startswith("delta")]
    lines = [f"# Hallucination fixes on {loaded.title}: {config.bench.upper()}", "",
             f"- methods: {', '.join(label for label, _, _ in config.labels())}; {sample.text}; "
             f"{config.new_tokens} new tokens; greedy", f"- scoring: {scoring_text(meta)}",
             *(f"- warning: {line}" for line in sample.warnings), "",
             "| method | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for label, entry in summary.items():
        lines.append(f"| {label} | " + " | ".join(f"{entry[k]:.4g}" for k in keys) + " |")
    lines += _differences(summary, sample)
    settings = {**config.__dict__, "methods_run": described, "scoring": meta}  # meta never shadows an option
    facts = {"n_evaluated": sample.n, "ci_min_n": MIN_CI_N, "ci_meaningful": sample.ci_meaningful,
             "warnings": sample.warnings}
    if config.bench == "chair":
        facts["missing_images"] = len(sample.missing)
    return Result("hallucination", loaded.name, settings, tables=tables, figures={"metrics": figure},
                  summary={"bench": config.bench, "methods": summary, **meta, **facts}, report="\n".join(lines))
