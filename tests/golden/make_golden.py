"""Record the golden tables that the renovation must keep (1e-6): ``python tests/golden/make_golden.py``.

Each case runs one CLI command on a real model into a scratch runs folder and copies the run's tables
here as ``<case>/<table>.parquet``. ``tests/test_golden.py`` runs the same commands and compares.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent

# case -> (command, arguments); {data} is a synthetic 2-image CHAIR set written beside the runs.
CASES: dict[str, tuple[str, list[str]]] = {
    "sinks": ("analyze", ["sinks"]),
    "position_bias": ("analyze", ["position-bias", "--retrieval-trials", "0"]),
    "circuits_ioi": ("analyze", ["circuits", "--tasks", "ioi", "--n", "16"]),
    "fix_pai_llava_smol": ("analyze", ["hallucination", "--model", "llava-smol", "--bench", "chair", "--data", "{data}",
                                       "--methods", "none,pai", "--n", "2", "--max-new-tokens", "16"]),
}


def write_images(folder: Path) -> Path:
    """Two synthetic icon images with COCO-style annotations (headlab's own generator, fixed seed)."""
    from headlab.training.lvlm_data import eval_scenes, write_dataset

    write_dataset(folder, eval_scenes("in-distribution", 2, 1234))
    return folder


def run_case(case: str, scratch: Path) -> Path:
    """Run one case into ``scratch/runs`` and return its run directory."""
    command, args = CASES[case]
    data = scratch / "data"
    if "{data}" in args and not data.exists():
        write_images(data)
    args = [a.replace("{data}", str(data)) for a in args]
    runs = scratch / "runs" / case
    proc = subprocess.run([str(BIN / command), *args, "--out", str(runs), "--quiet", "--threads", "1"],
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{case}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    if (runs / "manifest.json").exists():  # analyze hallucination writes the run at --out itself
        return runs
    (run,) = [p for p in runs.iterdir() if (p / "manifest.json").exists()]
    return run


def normalised(table, scratch: Path):
    """A table with the scratch folder's path replaced in its text columns, so two runs compare."""
    table = table.copy()
    for column in table.columns:
        if table[column].dtype == object:
            table[column] = table[column].map(lambda v: v.replace(str(scratch), "{scratch}") if isinstance(v, str)
                                              else v)
    return table


def main(cases: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases or list(CASES):
            run = run_case(case, Path(tmp))
            target = HERE / case
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir()
            for path in sorted((run / "tables").glob("*.parquet")):
                normalised(pd.read_parquet(path), Path(tmp)).to_parquet(target / path.name)
            print(case, sorted(p.name for p in target.iterdir()))


if __name__ == "__main__":
    main(sys.argv[1:])
