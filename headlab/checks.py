"""Checks of plain values, shared by the configs and the core: no torch, so the command line runs them before
anything heavy is imported. Each failure is one ``InputError`` naming the flag."""

from __future__ import annotations

import os

from headlab.errors import InputError

NDIF_KEY_ENV = "NDIF_API_KEY"


def at_least(value: int, low: int, flag: str, why: str = "") -> None:
    if value < low:
        raise InputError(f"{flag} must be at least {low}{why}, got {value}")


def check_positive_tokens(max_tokens: int) -> None:
    if max_tokens <= 0:
        raise InputError(f"--max-tokens must be a positive number of tokens, got {max_tokens}")


def ndif_key() -> str:
    """The NDIF API key from ``$NDIF_API_KEY``; ``InputError`` before any compute when it is missing."""
    key = os.environ.get(NDIF_KEY_ENV, "").strip()
    if not key:
        raise InputError(f"--remote runs on NDIF and needs an API key: set ${NDIF_KEY_ENV} to your NDIF key, or "
                         "drop --remote to run locally")
    return key
