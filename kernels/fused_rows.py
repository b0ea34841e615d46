"""The torch backend's row pass on CPU, compiled for this machine: ``fused_rows.c`` through ctypes.

After a chunk's score product, the chunk body reads from each row its exponentials, row sum, entropy dot and
key-mass share. As torch ops these are separate passes over a tile larger than the L2 cache; the compiled pass
reads each row once while it sits in cache (on smollm2-135m shapes, 9 x 32 x 4096 scores: about 0.7 ms against
1.9 ms for the torch ops). It is built on first use with the system C compiler (``$CC``, else ``cc``, ``gcc``
or ``clang``), with ``-march=native``, into ``$HEADLAB_HOME/kernels/`` (default ``~/.cache/headlab``) under a
name keyed by the source, the compiler and the CPU, so a cache shared between machines never runs code built
for another CPU. Without a compiler the torch ops do the same work (they stay the reference the tests hold
the compiled pass to).

The vector width follows the compiler's target (``LANES`` in ``fused_rows.c``: 16 floats under AVX-512, 8 under
AVX2, 4 else). ``$HEADLAB_FUSED_ROWS_CFLAGS``: extra compiler flags, appended (and keyed into the cached
name), e.g. ``-mno-avx512f`` to run an AVX2 build on an AVX-512 CPU, as ``benchmarks/speedpath.py`` does to
measure an AVX2 machine.

``$HEADLAB_FUSED_ROWS``: ``auto`` (default: the compiled pass where it builds), ``on`` (an error where it does
not) or ``off`` (the torch ops).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from headlab.errors import HeadlabError, InputError
from headlab.home import headlab_home

log = logging.getLogger(__name__)
FUSED_ENV = "HEADLAB_FUSED_ROWS"
CFLAGS_ENV = "HEADLAB_FUSED_ROWS_CFLAGS"
SOURCE = Path(__file__).with_name("fused_rows.c")
# -O3 for the vector loops; no -ffast-math: the pass relies on IEEE infinities and NaN (a NaN row sum must
# fail the shift's range check).
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-shared", "-fPIC"]
_P, _L = ctypes.c_void_p, ctypes.c_long
# A chunk with fewer scores runs on the calling thread alone: handing work to a pool thread costs tens of
# microseconds, about what this many scores take (decoding steps are far below it).
SPLIT_MIN_SCORES = 1 << 15


def mode() -> str:
    """``$HEADLAB_FUSED_ROWS`` checked: auto, on or off."""
    text = os.environ.get(FUSED_ENV, "auto").strip().lower() or "auto"
    if text not in ("auto", "on", "off"):
        raise InputError(f"${FUSED_ENV} must be auto, on or off, got {text!r}")
    return text


def cpu_identity() -> str:
    """The CPU model and feature flags (``-march=native`` code is only valid where they match)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        wanted = [line for line in lines if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return "\n".join(dict.fromkeys(wanted))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def flags() -> list[str]:
    """The compiler flags: ``FLAGS`` and ``$HEADLAB_FUSED_ROWS_CFLAGS``."""
    return FLAGS + os.environ.get(CFLAGS_ENV, "").split()


def find_compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


class FusedRows:
    """The loaded pass: ``run`` does one chunk, its heads split over ``threads`` (ctypes drops the GIL)."""

    def __init__(self, path: Path):
        self.path = path
        self.fn = ctypes.CDLL(str(path)).headlab_fused_rows
        self.fn.argtypes = [_P, _P, _L, _L, _L, _L, _L, _P, _P, _P, _P, _L, _L, _P, _P, _P, _L, _L, ctypes.c_int]
        self.fn.restype = _L
        self.pool: ThreadPoolExecutor | None = None  # threads - 1 workers: the calling thread takes a share
        self.workers = 0

    def run(self, scores: torch.Tensor, e: torch.Tensor, row_shift: torch.Tensor, row_sum: torch.Tensor,
            row_dot: torch.Tensor, dot_center: torch.Tensor, start: int, weight: torch.Tensor,
            sinks: torch.Tensor | None, key_mass: torch.Tensor, lo: int, reference: bool, threads: int) -> int:
        """scores / e ``[batch, head, rows, width]`` contiguous fp32; row arrays ``[batch, head, query]``;
        ``weight`` ``[batch, query]``; ``sinks`` ``[head]`` (base 2) or None; ``key_mass`` ``[batch, head, key]``.
        Fills e, the rows [start, start + rows) of the row arrays and adds to key_mass [lo, lo + width).
        Returns how many rows fell back from their reference shift to their maximum."""
        batch, n_heads, rows, width = scores.shape
        n_q, n_k = row_sum.shape[-1], key_mass.shape[-1]
        # The C side trusts these shapes: a wrong one would not raise there, it would write elsewhere.
        tensors = (scores, e, row_shift, row_sum, row_dot, dot_center, weight, key_mass)
        fits = all(t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu"
                   for t in tensors + (() if sinks is None else (sinks,)))
        fits &= e.shape == scores.shape and weight.shape == (batch, n_q) and key_mass.shape == (batch, n_heads, n_k)
        fits &= all(t.shape == (batch, n_heads, n_q) for t in (row_shift, row_sum, row_dot, dot_center))
        fits &= 0 <= start and start + rows <= n_q and 0 <= lo and lo + width <= n_k
        fits &= sinks is None or sinks.shape == (n_heads,)
        if not fits:
            raise ValueError("fused row pass: tensors of the wrong shape, dtype, layout or device")

        def part(bh_lo: int, bh_hi: int) -> int:
            return self.fn(scores.data_ptr(), e.data_ptr(), bh_lo, bh_hi, rows, width, n_heads,
                           row_shift.data_ptr(), row_sum.data_ptr(), row_dot.data_ptr(), dot_center.data_ptr(),
                           n_q, start, weight.data_ptr(), None if sinks is None else sinks.data_ptr(),
                           key_mass.data_ptr(), n_k, lo, int(reference))

        n_bh = batch * n_heads
        threads = 1 if scores.numel() < SPLIT_MIN_SCORES else max(1, min(threads, n_bh))
        if threads == 1:
            return part(0, n_bh)
        if self.pool is None or self.workers < threads - 1:
            if self.pool is not None:
                self.pool.shutdown(wait=False)
            self.pool, self.workers = ThreadPoolExecutor(threads - 1, thread_name_prefix="headlab-rows"), threads - 1
        bounds = [n_bh * i // threads for i in range(threads + 1)]
        others = [self.pool.submit(part, bounds[i], bounds[i + 1]) for i in range(1, threads)]
        return part(bounds[0], bounds[1]) + sum(f.result() for f in others)  # this thread takes the first share


@functools.cache
def build() -> tuple[FusedRows | None, str]:
    """The compiled pass (built once per machine, then loaded from the cache) and a line saying where it
    came from or why there is none (logged once per process as a warning: the statistics still come, slower)."""
    fused, why = _build()
    if fused is None:
        log.warning("%s; the torch backend's row pass runs as torch ops (slower)", why)
    return fused, why


def _build() -> tuple[FusedRows | None, str]:
    cc = find_compiler()
    if cc is None:
        return None, "no C compiler found ($CC, cc, gcc or clang)"
    source = SOURCE.read_bytes()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as err:
        return None, f"the C compiler {cc} does not run: {err}"
    cflags = flags()
    key = hashlib.sha256(b"\0".join([source, " ".join(cflags).encode(), version.encode(),
                                     cpu_identity().encode()])).hexdigest()[:16]
    try:
        path = headlab_home() / "kernels" / f"fused_rows-{key}.so"
    except HeadlabError as err:  # an unusable cache folder costs speed, not the run
        return None, str(err)
    if not path.exists():
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
            os.close(fd)
            done = subprocess.run([cc, *cflags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True,
                                  timeout=300)
            if done.returncode != 0:
                return None, f"{cc} could not build the fused row pass: {done.stderr.strip()[-300:]}"
            os.replace(tmp, path)  # atomic: a concurrent process loads either nothing or the whole library
            tmp = None
        except (OSError, subprocess.SubprocessError) as err:
            return None, f"could not build the fused row pass in {path.parent}: {err}"
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
    try:
        return FusedRows(path), f"compiled row pass {path}"
    except OSError as err:
        return None, f"could not load {path}: {err}"


def pick(device: torch.device) -> FusedRows | None:
    """The compiled pass for a call on ``device``, or None for the torch ops (GPU tensors, ``off``, no build)."""
    wanted = mode()
    if wanted == "off" or device.type != "cpu":
        return None
    fused, why = build()
    if fused is None and wanted == "on":
        raise InputError(f"${FUSED_ENV}=on but {why}; install a C compiler or set {FUSED_ENV}=auto")
    return fused
