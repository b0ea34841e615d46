"""Tests never touch the network: the hub is forced offline before transformers is imported."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

import headlab  # noqa: E402

TEXT = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Attention sinks appear early.",
    "def f(x):\n    return x * 2",
]


@pytest.fixture(scope="session")
def load_model():
    cache: dict[str, headlab.LoadedModel] = {}

    def get(name: str) -> headlab.LoadedModel:
        if name not in cache:
            cache[name] = headlab.load(name, dtype="float32", device="cpu")
        return cache[name]

    return get
