"""Shards of a pass: ``i/n`` parsed and checked without torch (the command line checks it before anything loads)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from headlab.errors import InputError

SHARD_SPEC = re.compile(r"^(\d+)/(\d+)$")


@dataclass(frozen=True)
class Shard:
    """Part ``index`` of ``count`` (0-based): a contiguous block of the units, so that concatenating the shards'
    rows in shard order gives the rows of one run in input order."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str, flag: str = "--shard") -> Shard:
        """``"i/n"`` with 0 <= i < n."""
        match = SHARD_SPEC.match(text.strip())
        if not match:
            raise InputError(f"{flag} {text!r} is not of the form i/n (shard i of n, counting from 0): e.g. "
                             f"{flag} 0/4 … {flag} 3/4")
        index, count = int(match[1]), int(match[2])
        if count < 1 or index >= count:
            raise InputError(f"{flag} {text}: i must be in 0 … n-1 and n at least 1, e.g. {flag} 0/{max(count, 2)}")
        return cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def units(self, n_units: int) -> range:
        """This shard's units of ``n_units``: shard i gets ``[i·n/c, (i+1)·n/c)`` (sizes differ by at most one)."""
        return range(self.index * n_units // self.count, (self.index + 1) * n_units // self.count)

    @property
    def whole(self) -> bool:
        return self.count == 1
