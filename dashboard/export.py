"""Static exports from the page: figures as PNG/SVG (kaleido driving a local chromium), tables as CSV."""

from __future__ import annotations

import os
import shutil

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio

from headlab.errors import HeadlabError

IMAGE_FORMATS = {"png": "image/png", "svg": "image/svg+xml"}
# Where Debian installs chromium, tried when no browser is on PATH.
DEBIAN_CHROMIUM = "/usr/bin/chromium"


class ExportError(HeadlabError):
    pass


def figure_image(fig: go.Figure, fmt: str, width: int = 900, height: int | None = None) -> bytes:
    """The figure rendered as PNG or SVG bytes by kaleido (needs chromium or chrome on the machine); ``height``
    defaults to the figure's own (layer x head heatmaps grow with the layers), else 600 px."""
    height = height or fig.layout.height or 600
    if fmt not in IMAGE_FORMATS:
        raise ExportError(f"cannot export a figure as {fmt!r}; choose one of {', '.join(IMAGE_FORMATS)}")
    browser = find_browser()
    if browser is None:
        raise ExportError(f"{fmt.upper()} export needs chromium: apt-get install chromium, "
                          "or set BROWSER_PATH to a chrome/chromium binary")
    # kaleido's launcher (choreographer) searches PATH and reads BROWSER_PATH; tell it about a browser found elsewhere.
    os.environ.setdefault("BROWSER_PATH", browser)
    try:
        return pio.to_image(fig, format=fmt, width=width, height=height)
    except Exception as err:  # kaleido raises plain RuntimeErrors/ChromeNotFoundError when no browser runs
        raise ExportError(f"{fmt.upper()} export failed ({type(err).__name__}: {err}); install chromium "
                          "(apt-get install chromium) or set BROWSER_PATH to a chrome/chromium binary") from err


def table_csv(table: pd.DataFrame) -> bytes:
    return table.to_csv(index=False).encode("utf-8")


def find_browser() -> str | None:
    """The chromium/chrome binary kaleido will drive, or None."""
    return (os.environ.get("BROWSER_PATH") or shutil.which("chromium") or shutil.which("google-chrome")
            or (DEBIAN_CHROMIUM if os.access(DEBIAN_CHROMIUM, os.X_OK) else None))
