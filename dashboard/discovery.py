"""Finding the runs under a runs folder: complete ones, and the others with the reason they cannot be read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from headlab.errors import HeadlabError, RunStoreError
from headlab.result import Result
from headlab.runs import MANIFEST, TMP_MARKER, check_runs_dir, read_manifest, run_path


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
        config = self.manifest.get("config") or {}
        summary = self.manifest.get("summary") or {}
        value = config.get("n_prompts", summary.get("n_prompts"))
        return int(value) if isinstance(value, (int, float)) else None


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
        if not entry.is_dir():
            continue
        if entry.name.startswith("."):
            if TMP_MARKER in entry.name:
                broken.append(BrokenRun(entry.name, "incomplete: still being written, or the writer crashed"))
            continue
        try:
            manifest = read_manifest(entry)
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
