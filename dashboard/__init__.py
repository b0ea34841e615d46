"""headlab.dashboard."""

from headlab.bare_imports import refuse_bare

refuse_bare(__name__)  # headlab.bare_imports says why
