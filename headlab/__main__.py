"""``python -m headlab analyze sinks …`` = ``analyze sinks …``; ``python -m headlab runs merge …`` = ``headlab runs
merge …`` (what ``--nproc`` starts on each rank, and a way to run headlab where its scripts are not on the PATH)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from headlab.cli import analyze_app, headlab_app

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["analyze"]:
        analyze_app(args=argv[1:], prog_name="analyze")
    else:  # "headlab lofit eval …" as --nproc hands it on, or "lofit eval …" as a user types it
        headlab_app(args=argv[1:] if argv[:1] == ["headlab"] else argv, prog_name="headlab")


if __name__ == "__main__":
    main()
