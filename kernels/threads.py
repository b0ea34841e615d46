"""How many threads the chunked kernel's loop runs on: torch's own count, or one, whichever is faster now.

The chunk loop is a few dozen small tensor ops per chunk, and each op ends in a thread barrier. On an idle
machine the threads share the work; when another process holds a core, every barrier waits for a thread
the scheduler has taken away, and the loop ran 8-13x slower than sdpa's single fused call on the same
busy machine (one thread there: 0.9x). Neither choice is right everywhere, so the loop measures both:
wall time per score of each call, an exponential average per choice, the faster one used, the other
tried again every ``explore`` calls (64: two forwards of a 30-layer model) so that a change in load is
noticed. Calls too small to matter
(decoding steps) keep torch's count.

``$HEADLAB_KERNEL_THREADS``: ``auto`` (default), or a fixed count for the loop.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import torch

from headlab.errors import InputError

THREADS_ENV = "HEADLAB_KERNEL_THREADS"
MIN_SCORES = 1 << 18  # below this a call is too short to time (or to matter)


class ThreadChooser:
    """Per process: the last measured cost (seconds per score) of running the loop on one thread and on
    torch's count, and which to use next."""

    def __init__(self, explore: int = 64, decay: float = 0.5):
        self.explore, self.decay = explore, decay
        self.cost: dict[str, float] = {}
        self.calls = 0

    def pick(self, threads: int, fixed: int | None = None) -> int:
        """The thread count for the next call (``threads`` = torch's; ``fixed``: ``$HEADLAB_KERNEL_THREADS``)."""
        if fixed is not None:
            return fixed
        if threads <= 1:
            return threads
        self.calls += 1
        for choice in ("many", "one"):
            if choice not in self.cost:
                return threads if choice == "many" else 1
        best = min(self.cost, key=self.cost.get)
        if self.calls % self.explore == 0:
            best = "one" if best == "many" else "many"  # look again: the load may have changed
        return 1 if best == "one" else threads

    def record(self, used: int, seconds_per_score: float) -> None:
        choice = "one" if used == 1 else "many"
        old = self.cost.get(choice)
        self.cost[choice] = seconds_per_score if old is None else \
            self.decay * old + (1 - self.decay) * seconds_per_score

    @contextlib.contextmanager
    def loop(self, scores: int) -> Iterator[int]:
        """Run the block with the chosen thread count (restored after); ``scores``: the call's work."""
        threads, fixed = torch.get_num_threads(), fixed_threads()
        if scores < MIN_SCORES and fixed is None:
            yield threads
            return
        used = self.pick(threads, fixed)
        if used != threads:
            torch.set_num_threads(used)
        start = time.perf_counter()
        try:
            yield used
        finally:
            elapsed = time.perf_counter() - start
            if used != threads:
                torch.set_num_threads(threads)
        if threads > 1 and fixed is None:
            self.record(used, elapsed / scores)

def fixed_threads() -> int | None:
    text = os.environ.get(THREADS_ENV, "auto").strip()
    if text in ("", "auto"):
        return None
    if not text.isdigit() or int(text) < 1:
        raise InputError(f"${THREADS_ENV} must be auto or a number of threads >= 1, got {text!r}")
    return int(text)


CHOOSER = ThreadChooser()
