"""Streamlit entry point: ``streamlit run app.py -- --runs DIR`` (what ``headlab dashboard`` starts).

Without ``--runs`` the app reads ``$HEADLAB_RUNS`` or ``./runs``, as ``analyze`` writes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import streamlit as st

from headlab.dashboard.pages import main
from headlab.runs import default_runs_dir


def runs_dir_from_argv(argv: list[str]) -> Path:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--runs", type=Path, default=None)
    # parse_known_args: under streamlit's test harness argv belongs to the test runner.
    args, _ = parser.parse_known_args(argv)
    return args.runs or default_runs_dir()


st.set_page_config(page_title="headlab", layout="wide")
main(runs_dir_from_argv(sys.argv[1:]))
