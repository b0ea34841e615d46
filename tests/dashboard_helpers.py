"""Reading a Streamlit AppTest page in tests: its plotly charts, plotly's array encoding, element texts."""

from __future__ import annotations

import base64
import json

import numpy as np
from streamlit.testing.v1 import AppTest


def open_page(page: str, timeout: int = 120, **params: str) -> AppTest:
    """The dashboard app run once at ``?page=…&…`` (no exception raised on the page)."""
    from headlab.dashboard import launch

    at = AppTest.from_file(str(launch.APP_FILE), default_timeout=timeout)
    at.query_params["page"] = page
    for name, value in params.items():
        at.query_params[name] = value
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def charts(at: AppTest) -> list[dict]:
    return [json.loads(element.proto.spec) for element in at.get("plotly_chart")]


def array(value) -> np.ndarray:
    """A plotly JSON array: a list, or plotly's typed-array encoding {dtype, bdata, shape}."""
    if isinstance(value, dict):
        shape = [int(n) for n in str(value.get("shape", "-1")).split(",")]
        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"]).reshape(shape)
    return np.asarray(value, dtype=float)


def texts(elements) -> str:
    return " ".join(str(element.value) for element in elements)
