"""Finding the runs under a runs folder: complete ones, and the others with the reason they cannot be read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from headlab.errors import HeadlabError, RunStoreError
from headlab.result import Result
from headlab.runs import MANIFEST, TMP_MARKER, check_part_name, check_runs_dir, read_manifest, run_path


@dataclass(frozen=True)
class RunInfo:
    """A complete run, described from its manifest only (nothing heavy is read)."""

    name: str
    path: Path
    manifest: dict

    @property
    def analysis(self) -> str:
        return str(self.manifest.get("analysis", "?"))

    @property
    def model(self) -> str:
        return str(self.manifest.get("model", "?"))

    @property
    def created(self) -> str:
        return str(self.manifest.get("created", ""))

    @property
    def n_prompts(self) -> int | None:
        """How many prompts the run read, where its manifest says: ``config.n_prompts`` or ``summary.n_prompts``
        (sinks, position bias), the recorded prompts (``provenance.prompts.n``), or the items a LoFiT run trained
        or evaluated on (``summary.n_items``: one prompt each). None for runs that count other things (circuits:
        prompt pairs per task; hallucination: images or questions)."""
        config = self.manifest.get("config") or {}
        summary = self.manifest.get("summary") or {}
        recorded = ((self.manifest.get("provenance") or {}).get("prompts") or {})
        for value in (config.get("n_prompts"), summary.get("n_prompts"),
                      recorded.get("n") if isinstance(recorded, dict) else None, summary.get("n_items")):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return int(value)
        return None


@dataclass(frozen=True)
class BrokenRun:
    """A folder in the runs folder that is not a readable run, and why."""

    name: str
    reason: str


@dataclass(frozen=True)
class RunListing:
    runs_dir: Path
    runs: list[RunInfo]
    broken: list[BrokenRun]

    def names(self) -> list[str]:
        return [run.name for run in self.runs]

    def get(self, name: str) -> RunInfo | None:
        return next((run for run in self.runs if run.name == name), None)


def discover_runs(runs_dir: Path) -> RunListing:
    """All runs under ``runs_dir``, newest first; a missing folder is an empty listing.

    A run is complete when its manifest says so and every table and figure it lists is on disk;
    anything else is listed in ``broken`` with the reason (never raised: one bad run must not hide the others).
    """
    runs_dir = check_runs_dir(runs_dir)
    runs: list[RunInfo] = []
    broken: list[BrokenRun] = []
    if not runs_dir.is_dir():
        return RunListing(runs_dir, runs, broken)
    for entry in sorted(runs_dir.iterdir()):
        if entry.is_symlink():
            # A link may point anywhere on the machine; the dashboard reads nothing outside the runs folder.
            if not entry.name.startswith("."):
                broken.append(BrokenRun(entry.name, "a symbolic link: headlab reads nothing outside the runs folder; "
                                                    "copy the run here instead of linking it"))
            continue
        if not entry.is_dir():
            continue
        if entry.name.startswith("."):
            if TMP_MARKER in entry.name:
                broken.append(BrokenRun(entry.name, "incomplete: still being written, or the writer crashed "
                                                    "(`headlab runs clean` removes leftovers of killed runs)"))
            continue
        try:
            run_path(runs_dir, entry.name)  # a name headlab would write: no spaces, brackets or other characters
        except RunStoreError:
            broken.append(BrokenRun(entry.name, "not a run name headlab writes (letters, digits, '.', '_' and '-' "
                                                "only): rename the folder to open it"))
            continue
        try:
            manifest = read_manifest(entry)
            if manifest.get("partial"):
                broken.append(BrokenRun(entry.name, f"a part (shard {manifest.get('shard')}) of a run split with "
                                                    "--shard: `headlab runs merge` joins the parts into the run"))
                continue
            _check_files(entry, manifest)
        except RunStoreError as err:
            broken.append(BrokenRun(entry.name, str(err)))
            continue
        runs.append(RunInfo(entry.name, entry, manifest))
    runs.sort(key=lambda run: run.created, reverse=True)
    return RunListing(runs_dir, runs, broken)


def _check_files(path: Path, manifest: dict) -> None:
    for field in ("analysis", "model", "tables", "figures"):
        if field not in manifest:
            raise RunStoreError(f"{path / MANIFEST} has no {field!r}; the run is corrupt, run it again")
    if not isinstance(manifest["tables"], list) or not isinstance(manifest["figures"], list):
        raise RunStoreError(f"{path / MANIFEST} lists tables or figures in the wrong form; the run is corrupt")
    for name in (*manifest["tables"], *manifest["figures"]):
        check_part_name(name, "table or figure")
    root = path.resolve()
    files = [path / MANIFEST, path / "report.md", path / "tensors.safetensors",
             *(path / "tables" / f"{name}.parquet" for name in manifest["tables"]),
             *(path / "figures" / f"{name}.json" for name in manifest["figures"])]
    for file in files:
        if (file.exists() or file.is_symlink()) and not file.resolve().is_relative_to(root):
            raise RunStoreError(f"{file.relative_to(path)} in run {path.name} links outside the run folder; "
                                "headlab reads nothing outside the runs folder")
    missing = [f"tables/{name}.parquet" for name in manifest["tables"]
               if not (path / "tables" / f"{name}.parquet").is_file()]
    missing += [f"figures/{name}.json" for name in manifest["figures"]
                if not (path / "figures" / f"{name}.json").is_file()]
    if missing:
        raise RunStoreError(f"run {path.name} is missing {', '.join(missing)}; it is corrupt, run it again")


def load_run(runs_dir: Path, name: str) -> Result:
    """Read run ``name`` (a bare name inside ``runs_dir``; paths and '..' are refused)."""
    path = run_path(runs_dir, name)
    if not path.is_dir():
        raise RunStoreError(f"no run named {name!r} in {Path(runs_dir).resolve()}")
    try:
        return Result.load(path)
    except HeadlabError:
        raise
    except Exception as err:  # parquet/safetensors/plotly parse errors: a damaged file, said plainly
        raise RunStoreError(f"run {name} cannot be read ({type(err).__name__}: {err}); "
                            "it is corrupt, run it again") from err


# Settings that change what a number means: runs that differ in them are compared with a warning.
_SETTING_KEYS = ("max_tokens", "eps", "bos", "n_relative", "rollout_tokens", "retrieval_pairs", "chat_template",
                 "generate", "seed")


def comparison_warnings(left: RunInfo, right: RunInfo) -> list[str]:
    """Why two runs' numbers may not be comparable: prompts, model, settings, headlab version (one line each)."""
    from headlab import __version__

    a, b = left.manifest, right.manifest
    warnings = []
    if a.get("analysis") != b.get("analysis"):
        warnings.append(f"different analyses: {a.get('analysis')} vs {b.get('analysis')}")
    if a.get("model") != b.get("model") or a.get("revision") != b.get("revision"):
        warnings.append(f"different models: {a.get('model')} vs {b.get('model')}")
    if a.get("input_hash") != b.get("input_hash"):
        warnings.append("different prompts (input hashes differ): differences may come from the inputs, not the models")
    config_a, config_b = a.get("config") or {}, b.get("config") or {}
    if config_a.get("max_tokens") != config_b.get("max_tokens"):
        warnings.append(f"different --max-tokens ({config_a.get('max_tokens')} vs {config_b.get('max_tokens')}): "
                        "Sink_1 and position profiles depend on the token count T, so these numbers do not compare")
    changed = [k for k in _SETTING_KEYS if k != "max_tokens" and config_a.get(k) != config_b.get(k)]
    settings_a = (a.get("provenance") or {}).get("settings") or {}
    settings_b = (b.get("provenance") or {}).get("settings") or {}
    changed += [k for k in ("dtype", "backend") if settings_a.get(k) != settings_b.get(k)]
    if changed:
        warnings.append("different settings: " + ", ".join(
            f"{k} {config_a.get(k, settings_a.get(k))} vs {config_b.get(k, settings_b.get(k))}" for k in changed))
    versions = {run.name: str(run.manifest.get("headlab_version")) for run in (left, right)}
    if len(set(versions.values())) > 1:
        warnings.append("written by different headlab versions: "
                        + ", ".join(f"{name} {v}" for name, v in versions.items()))
    other = [f"{name} ({v})" for name, v in versions.items() if v != __version__]
    if other:
        warnings.append(f"written by another headlab version than this one ({__version__}): {', '.join(other)}")
    return warnings
