"""What the live page says when something fails: one line, never a traceback (which would show the server's
paths), and for a model that transformers refuses to load, the problem its log report names.

transformers logs a load report (a table of mismatched or unconvertible weights) and then raises a
``RuntimeError`` that only says "look at the above report": the page has no such report above, so
``capture_load_report`` keeps the log lines of the load and ``load_error_message`` names the problem."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager

from headlab.errors import HeadlabError

ANSI = re.compile(r"\x1b\[[0-9;]*m")
MAX_LINE = 300  # characters of an unexpected error's first line
SHAPE = re.compile(r"ckpt:\s*(?:torch\.Size\()?(\[[^\]]*\])\)?\s*vs\s*model:\s*(?:torch\.Size\()?(\[[^\]]*\])")


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.extend(ANSI.sub("", record.getMessage()).splitlines())
        except Exception:  # noqa: BLE001 - a log line that cannot be formatted is not worth a failed load
            pass


@contextmanager
def capture_load_report() -> Iterator[list[str]]:
    """The warning lines transformers logs inside the block (its load report among them), ANSI colours removed."""
    handler = _Lines()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)


def load_error_message(err: BaseException, report: list[str]) -> str:
    """Why a model did not load, in one line: a ``HeadlabError``'s own message; transformers' "look at the
    above report" as the mismatched tensors of that report; anything else as its type and first line."""
    if isinstance(err, HeadlabError):
        return str(err)  # written for the user already
    text = str(err)
    if "above report" not in text:
        return short_error(err)
    mismatched = [line for line in report if "MISMATCH" in line and "|" in line]
    if mismatched:
        cells = [cell.strip() for cell in mismatched[0].split("|")]
        shapes = SHAPE.search(mismatched[0])
        example = f"{cells[0]} is {shapes[1]} in the checkpoint but {shapes[2]} in the model" if shapes \
            else cells[0]
        return (f"its weights do not fit the architecture its config.json describes ({len(mismatched)} "
                f"mismatched tensor{'s' if len(mismatched) > 1 else ''}, e.g. {example}): fix config.json to "
                "match the weights, or export the model again")
    if "conversion" in text.lower():
        return ("transformers could not convert its weights to the architecture its config.json names: check "
                "that config.json's model_type and architectures match the checkpoint")
    return ("transformers refused its weights: they do not match the architecture its config.json describes "
            "(check config.json against the checkpoint)")


def short_error(err: BaseException) -> str:
    """``"ValueError: first line"``: enough to act on, without the rest of a long message or a traceback."""
    if isinstance(err, HeadlabError):
        return str(err)
    return f"{type(err).__name__}: {first_line(str(err))}"


def first_line(text: str) -> str:
    line = next((part.strip() for part in str(text).splitlines() if part.strip()), "")
    return line if len(line) <= MAX_LINE else line[: MAX_LINE - 1] + "…"
