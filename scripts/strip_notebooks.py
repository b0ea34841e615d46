"""Remove outputs, execution counts and run metadata from notebooks, so that git holds only their source.

    python scripts/strip_notebooks.py                # every notebooks/*.ipynb, in place
    python scripts/strip_notebooks.py path.ipynb …   # chosen notebooks
    python scripts/strip_notebooks.py --check        # change nothing; exit 1 naming the unstripped ones

CI runs the check as a test (tests/test_notebooks.py): strip before you commit a notebook you ran.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
# Cell metadata written by running a notebook, not by its author.
RUN_CELL_METADATA = ("execution", "collapsed", "scrolled", "ExecuteTime")
RUN_NOTEBOOK_METADATA = ("widgets", "papermill")


def strip(nb: nbformat.NotebookNode) -> bool:
    """Strip ``nb`` in place; True when something was removed."""
    changed = False
    for cell in nb.cells:
        for key in RUN_CELL_METADATA:
            if key in cell.metadata:
                del cell.metadata[key]
                changed = True
        if cell.cell_type == "code":
            if cell.get("outputs"):
                cell.outputs = []
                changed = True
            if cell.get("execution_count") is not None:
                cell.execution_count = None
                changed = True
        elif "attachments" in cell and not cell.attachments:
            del cell["attachments"]
            changed = True
    for key in RUN_NOTEBOOK_METADATA:
        if key in nb.metadata:
            del nb.metadata[key]
            changed = True
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, help="notebooks (default: notebooks/*.ipynb)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a notebook needs stripping")
    args = parser.parse_args(argv)
    paths = args.paths or sorted(NOTEBOOKS.glob("*.ipynb"))
    if not paths:
        print(f"no notebooks found in {NOTEBOOKS}", file=sys.stderr)
        return 2
    unstripped = []
    for path in paths:
        if not path.is_file():
            print(f"error: {path} is not a file", file=sys.stderr)
            return 2
        nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
        if strip(nb):
            unstripped.append(path)
            if not args.check:
                nbformat.write(nb, path)
    if args.check:
        for path in unstripped:
            print(f"{path}: has outputs or run metadata; run python scripts/strip_notebooks.py", file=sys.stderr)
        return 1 if unstripped else 0
    for path in unstripped:
        print(f"stripped {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
