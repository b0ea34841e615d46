"""Plotly figures in notebooks, offline: ``headlab.notebook.offline_plots()``.

Plotly's own choices each miss something in a notebook that is executed and then opened elsewhere:
``notebook_connected`` loads plotly.js from a CDN; ``notebook`` embeds plotly.js but every figure's HTML
still loads MathJax from a CDN; ``plotly_mimetype`` alone shows only where plotly's extension is
installed (JupyterLab, Notebook 7, VS Code). ``offline_plots()`` registers and selects a renderer named
``headlab`` that writes both: the plotly mimetype, and HTML that carries plotly.js itself in the
session's first figure and loads no script from anywhere (no MathJax: headlab's figures use no LaTeX).
"""

from __future__ import annotations

import json

import plotly.io as pio
from plotly.io._base_renderers import MimetypeRenderer  # plotly's base class of every renderer

RENDERER = "headlab"
PLOTLY_MIMETYPE = "application/vnd.plotly.v1+json"


class OfflineRenderer(MimetypeRenderer):
    """The plotly mimetype plus self-contained HTML (plotly.js in the first figure only)."""

    def __init__(self, height: int = 525):
        self.height = height
        # plotly.js goes into the first figure's HTML, later ones reuse it. A dict, because plotly renders
        # with a shallow copy of the registered renderer: the copies must share this state.
        self.state = {"plotlyjs_shown": False}

    def to_mimebundle(self, fig_dict: dict) -> dict:
        first = not self.state["plotlyjs_shown"]
        self.state["plotlyjs_shown"] = True
        html = pio.to_html(fig_dict, include_plotlyjs=first, include_mathjax=False, full_html=False,
                           default_width="100%", default_height=self.height, validate=False)
        figure = json.loads(pio.to_json(fig_dict, validate=False, remove_uids=False))
        return {PLOTLY_MIMETYPE: figure, "text/html": html}


def offline_plots() -> OfflineRenderer:
    """Show plotly figures with the ``headlab`` renderer from now on (this session); returns it."""
    renderer = OfflineRenderer()
    pio.renderers[RENDERER] = renderer
    pio.renderers.default = RENDERER
    return renderer
