"""The view registry: each analysis contributes its dashboard page here, the app core never changes.

A view renders one run of its analysis (and, optionally, compares two runs of it). Register one with
``@register_view("<analysis>")`` on a ``View`` subclass in a module that the analysis registry
(``headlab.analyses.registry``) names as the analysis's ``view``; the app imports those modules. Runs of an
analysis without a view are shown by ``GenericView``: their saved figures, tables and summary.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from headlab.errors import HeadlabError
from headlab.result import Result


class View:
    """How the dashboard shows runs of one analysis. Subclasses override what they know better.

    ``render`` draws one run into the current Streamlit container; ``compare`` draws two runs of the
    same analysis side by side; ``key_figures`` picks the few summary numbers shown in the runs table.
    The defaults are the generic ones, so a new view may override only ``render``.
    """

    analysis: str = ""
    title: str = "Run"

    def render(self, run: Result, key: str) -> None:
        from .generic import render_generic

        render_generic(run, key)

    def compare(self, left: Result, right: Result, key: str) -> None:
        from .generic import compare_generic

        compare_generic(left, right, key)

    def key_figures(self, manifest: dict) -> dict[str, object]:
        """Up to four scalar summary values of a run, for the runs table (from the manifest only)."""
        summary = manifest.get("summary") or {}
        scalars = {k: v for k, v in summary.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
        return dict(list(scalars.items())[:4])


class GenericView(View):
    title = "Run (generic view)"


_VIEWS: dict[str, View] = {}
_BROKEN_VIEWS: dict[str, str] = {}  # module -> error, for view modules that failed to import


def register_view(analysis: str, title: str | None = None) -> Callable[[type[View]], type[View]]:
    """Class decorator: ``@register_view("sinks")`` makes the class the page of runs with that analysis."""

    def decorate(cls: type[View]) -> type[View]:
        if not (isinstance(cls, type) and issubclass(cls, View)):
            raise HeadlabError(f"@register_view({analysis!r}) decorates View subclasses, got {cls!r}")
        existing = _VIEWS.get(analysis)
        # Re-importing the same module (Streamlit reruns, reloads) re-registers the same class name: allowed.
        if existing is not None and type(existing).__qualname__ != cls.__qualname__:
            raise HeadlabError(f"analysis {analysis!r} already has the view {type(existing).__qualname__}; "
                               f"pick one of them for {cls.__qualname__}")
        view = cls()
        view.analysis = analysis
        view.title = title or cls.title
        _VIEWS[analysis] = view
        return cls

    return decorate


def get_view(analysis: str) -> View:
    """The registered view of ``analysis``, or the generic one."""
    load_views()
    return _VIEWS.get(analysis) or GenericView()


def registered_views() -> dict[str, View]:
    load_views()
    return dict(_VIEWS)


def load_views() -> None:
    """Import the view module of every analysis in ``headlab.analyses.registry`` (their ``@register_view``
    decorators run on import)."""
    from headlab.analyses.registry import ANALYSES

    for module in dict.fromkeys(a.view for a in ANALYSES.values() if a.view is not None):
        try:
            importlib.import_module(module)
            _BROKEN_VIEWS.pop(module, None)
        except Exception as err:  # one analysis's broken page must not take the other pages down
            _BROKEN_VIEWS[module] = f"{type(err).__name__}: {err}"


def broken_views() -> dict[str, str]:
    """View modules that failed to import, with the error (their runs fall back to the generic view)."""
    load_views()
    return dict(_BROKEN_VIEWS)
