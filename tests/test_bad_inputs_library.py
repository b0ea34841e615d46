"""Bad inputs reached through the library (and the CLI on top of it): each is one ``HeadlabError`` naming what
was wrong and what to do, never a traceback from Pillow, safetensors, transformers or the file system.

Decompression-bomb images, damaged offsets files, offsets that cannot be baked into a bias, attention-free
architectures (GGUF and local folders) and an unusable ``$HEADLAB_HOME``.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import headlab
from headlab.analyses.lofit_export import export_offsets
from headlab.cli import analyze_app, headlab_app
from headlab.errors import CacheFolderError, InputError, UnsupportedArchitectureError
from headlab.home import headlab_home
from headlab.interventions import HeadOffsets
from headlab.lvlm import load_image
from headlab.zoo import gguf

runner = CliRunner()


def _one_line_error(result) -> str:
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and text.startswith("error:"), result.output
    assert "Traceback" not in result.output
    return text


# ---------------------------------------------------------------------------------- decompression bombs


def _flat_png(path: Path, width: int, height: int) -> Path:
    """A valid all-black 1-bit PNG: tens of kilobytes on disk, width × height pixels once decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + the packed bits of one row
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


# 10000² is over Pillow's limit (it only warns); 20000² is over twice it (Pillow raises its own error).
@pytest.mark.parametrize("side", [10000, 20000])
def test_decompression_bomb_image_is_an_input_error(tmp_path, side):
    png = _flat_png(tmp_path / "bomb.png", side, side)
    with pytest.raises(InputError, match=rf"bomb.png is {side}×{side} pixels, over the 89,478,485-pixel limit.*"
                                         "resize it"):
        load_image(png)


def test_fix_reports_a_decompression_bomb_in_one_line(tmp_path):
    png = _flat_png(tmp_path / "bomb.png", 20000, 20000)
    result = runner.invoke(headlab_app, ["fix", "--model", "tiny-llava", "--image", str(png), "--quiet"])
    assert "20000×20000 pixels" in _one_line_error(result)


def test_an_image_under_the_limit_still_loads(tmp_path):
    assert load_image(_flat_png(tmp_path / "small.png", 40, 30)).size == (40, 30)


# ---------------------------------------------------------------------------------------- offsets files


@pytest.fixture(scope="module")
def tiny():
    return headlab.load("tiny-llama")


def _offsets(tiny, rows="all") -> HeadOffsets:
    offsets = HeadOffsets.create(tiny.arch, [(1, 0), (3, 2)], init="normal", std=0.5,
                                 generator=torch.Generator().manual_seed(0), rows=rows)
    with torch.no_grad():
        offsets.A.zero_()
    return offsets


def test_corrupt_or_foreign_offsets_file_is_an_input_error(tiny, tmp_path):
    run = tmp_path / "run"  # stands for a `headlab lofit train` run directory whose tensors file was damaged
    run.mkdir()
    written = run / "tensors.safetensors"
    _offsets(tiny).save(written)
    written.write_bytes(written.read_bytes()[:40])  # truncated: the header promises more than the file holds
    with pytest.raises(InputError, match=r"run/tensors.safetensors is not a readable safetensors file.*"
                                         r"re-run `headlab lofit train`"):
        HeadOffsets.load(run)
    foreign = tmp_path / "notes.safetensors"
    foreign.write_text("these are not tensors")
    with pytest.raises(InputError, match="notes.safetensors is not a readable safetensors file"):
        HeadOffsets.load(foreign)
    with pytest.raises(InputError, match="no HeadOffsets at"):
        HeadOffsets.load(tmp_path / "missing.safetensors")


def test_save_into_a_folder_writes_what_load_reads_from_it(tiny, tmp_path):
    offsets = _offsets(tiny)
    existing = tmp_path / "existing"
    existing.mkdir()
    for folder in (existing, tmp_path / "new"):  # an existing folder, and a new one save creates
        assert offsets.save(folder) == folder / "tensors.safetensors"
        back = HeadOffsets.load(folder)
        assert back.pairs == offsets.pairs and torch.equal(back.v, offsets.v.detach())
    file = tmp_path / "offsets.safetensors"
    assert offsets.save(file) == file and HeadOffsets.load(file).pairs == offsets.pairs
    with pytest.raises(InputError, match="cannot write HeadOffsets to .*nowhere"):
        offsets.save(tmp_path / "nowhere" / "deeper" / "offsets.safetensors")
    (existing / "manifest.json").write_text("{}")  # now it looks like a run: its tensors are not replaced
    with pytest.raises(InputError, match="is a headlab run directory"):
        offsets.save(existing)


# ----------------------------------------------------------------------------------------------- export


def test_export_refuses_offsets_on_some_rows_only(tiny, tmp_path):
    with pytest.raises(InputError, match=r"rows='last' only, but o_proj's bias acts at every position.*"
                                         r"`headlab lofit apply`"):
        export_offsets(tiny, _offsets(tiny, rows="last"), tmp_path / "exported")
    assert not (tmp_path / "exported").exists()
    assert export_offsets(tiny, _offsets(tiny), tmp_path / "everywhere").is_dir()  # rows="all" still exports


# ------------------------------------------------------------------------------- attention-free models


def _mamba_gguf(path: Path) -> Path:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "mamba")
    writer.add_name("headlab-test-mamba")
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_tensor("token_embd.weight", torch.zeros(16, 8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_mamba_gguf_is_refused_before_converting(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf, "_convert", lambda *a: pytest.fail("an attention-free GGUF was converted"))
    path = _mamba_gguf(tmp_path / "mamba.gguf")
    with pytest.raises(UnsupportedArchitectureError, match=r"GGUF architecture 'mamba' is not supported for "
                                                           r"attention analysis.*no attention heads.*llama"):
        gguf.converted_folder(path, cache=tmp_path / "cache")
    assert "mamba" not in gguf.supported_gguf_architectures()


def test_mamba_gguf_from_the_cli_is_one_error_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path / "home"))
    path = _mamba_gguf(tmp_path / "mamba.gguf")
    result = runner.invoke(analyze_app, ["sinks", "--model", str(path), "--quiet", "--out", str(tmp_path / "runs")])
    assert "'mamba' is not supported for attention analysis" in _one_line_error(result)
    assert not list((tmp_path / "home").glob("models/*"))


def test_mamba_folder_is_an_architecture_error_not_a_tokenizer_one(tmp_path):
    from safetensors.torch import save_file
    from transformers import MambaConfig

    folder = tmp_path / "mamba"
    MambaConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, state_size=4).save_pretrained(folder)
    save_file({"backbone.embeddings.weight": torch.zeros(16, 8)}, str(folder / "model.safetensors"))
    with pytest.raises(UnsupportedArchitectureError, match=r"'mamba' is not supported for attention analysis: "
                                                           r"it is a state-space \(Mamba\) model"):
        headlab.load(str(folder))


# -------------------------------------------------------------------------------------------- the cache


def test_headlab_home_that_is_a_file_or_under_one(tmp_path, monkeypatch):
    file = tmp_path / "file"
    file.write_text("x")
    monkeypatch.setenv("HEADLAB_HOME", str(file))
    with pytest.raises(CacheFolderError, match=r"\$HEADLAB_HOME=.*file is a file, not a folder: set HEADLAB_HOME "
                                               "to a folder you can write"):
        headlab_home()
    # Any use of the cache reports it, e.g. a GGUF load (it used to fail with NotADirectoryError).
    with pytest.raises(CacheFolderError, match="is a file"):
        headlab.load(str(_mamba_gguf(tmp_path / "mamba.gguf")))
    monkeypatch.setenv("HEADLAB_HOME", str(file / "sub"))
    with pytest.raises(CacheFolderError, match=r"\$HEADLAB_HOME=.*file/sub cannot be created \(Not a directory\)"):
        headlab_home()


def test_headlab_home_is_created_when_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path / "a" / "b"))
    assert headlab_home() == tmp_path / "a" / "b" and (tmp_path / "a" / "b").is_dir()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder, so nothing would fail")
def test_headlab_home_that_cannot_be_written(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        monkeypatch.setenv("HEADLAB_HOME", str(locked))
        with pytest.raises(CacheFolderError, match="cannot be written"):
            headlab_home()
        monkeypatch.setenv("HEADLAB_HOME", str(locked / "sub"))
        with pytest.raises(CacheFolderError, match=r"cannot be created \(Permission denied\)"):
            headlab_home()
    finally:
        locked.chmod(0o700)
