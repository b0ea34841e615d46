"""The command line, the roof of the house: ``analyze <analysis> …`` and ``headlab …``."""

from headlab.cli.app import analyze_app, headlab_app

__all__ = ["analyze_app", "headlab_app"]
