"""Which query rows and which keys an edit touches, stated once and resolved on every call.

Positions are counted from the first real (non-padding) token of each sequence: position 0 is that
token (BOS when the tokenizer adds one), whatever the padding side. They are resolved per attention
call from the 2-D padding mask and the call's offsets, so one edit object holds at prefill and at
every decoding step with a KV cache (query row r of a call sits at column r + q_offset), batched,
with left or right padding.

Spec forms (``Positions(spec)`` or any of them directly where an edit takes positions):
- ``"all"``: every token (padding included: a padding row's output and a padding key's score never
  matter, and a head scaled "everywhere" is then scaled exactly everywhere);
- ``"last"``: the last real token of each sequence (at prefill the final prompt row, while decoding
  the new token);
- ``"from:N"``: real tokens at positions >= N (e.g. the text after an image of N tokens);
- an int, a ``(start, stop)`` span (stop excluded), or a list mixing both;
- ``Positions.per_sample([spec_0, spec_1, …])``: one spec per sequence of the batch (an image's own
  patches, the sinks found in each sample), for calls whose batch has exactly that many sequences.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from headlab.errors import InputError

PositionSpec = str | int | tuple[int, int] | Sequence[int | tuple[int, int]]


@dataclass(frozen=True)
class Positions:
    """A normalised position spec: ``kind`` is all / last / from / list / per_sample; ``items`` holds (start, stop)
    spans; ``samples`` one ``Positions`` per sequence (kind per_sample)."""

    kind: str
    start: int = 0
    items: tuple[tuple[int, int], ...] = ()
    samples: tuple[Positions, ...] = ()

    @classmethod
    def per_sample(cls, specs: Sequence[PositionSpec | Positions]) -> Positions:
        """One spec per sequence of the batch, in batch order."""
        samples = tuple(cls.of(spec) for spec in specs)
        if any(s.kind == "per_sample" for s in samples):
            raise InputError("Positions.per_sample takes one plain spec per sequence, not nested per-sample specs")
        return cls("per_sample", samples=samples)

    @classmethod
    def of(cls, spec: PositionSpec | Positions) -> Positions:
        if isinstance(spec, Positions):
            return spec
        if isinstance(spec, torch.Tensor):  # e.g. positions found by an analysis
            spec = spec.flatten().tolist()
        if isinstance(spec, str):
            if spec in ("all", "last"):
                return cls(spec)
            if spec.startswith("from:") and spec[5:].strip().isdigit():
                return cls("from", start=int(spec[5:]))
            raise InputError(f"unknown position spec {spec!r}; use 'all', 'last', 'from:N', an int, "
                             "a (start, stop) span or a list of them")
        if isinstance(spec, int):
            return cls("list", items=(_span(spec),))
        if isinstance(spec, tuple) and len(spec) == 2 and all(isinstance(x, int) for x in spec):
            return cls("list", items=(_span(spec),))
        if isinstance(spec, Sequence):
            return cls("list", items=tuple(_span(item) for item in spec))
        raise InputError(f"positions must be 'all', 'last', 'from:N', an int, a span or a list, got {spec!r}")

    def disjoint(self, other: Positions) -> bool:
        """True when no position can be in both (explicit spans only; all / last / from may always overlap)."""
        if self.kind == "per_sample" and other.kind == "per_sample":
            return len(self.samples) == len(other.samples) and all(
                a.disjoint(b) for a, b in zip(self.samples, other.samples, strict=True))
        if self.kind != "list" or other.kind != "list":
            return False
        return all(stop_a <= start_b or stop_b <= start_a
                   for start_a, stop_a in self.items for start_b, stop_b in other.items)

    def select(self, rel: torch.Tensor, real: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """``[batch, n]`` bool: which of the items at relative positions ``rel`` ``[batch, n]`` are chosen.

        ``real`` ``[batch, n]`` marks non-padding items; ``last`` ``[batch]`` is the position of each
        sequence's last real token.
        """
        if self.kind == "all":
            return torch.ones_like(real)
        if self.kind == "last":
            return real & (rel == last[:, None])
        if self.kind == "from":
            return real & (rel >= self.start)
        if self.kind == "per_sample":
            if len(self.samples) != rel.shape[0]:
                raise InputError(f"per-sample positions name {len(self.samples)} sequences but the call has "
                                 f"{rel.shape[0]}; build them for this batch")
            return torch.cat([s.select(rel[b:b + 1], real[b:b + 1], last[b:b + 1])
                              for b, s in enumerate(self.samples)])
        if len(self.items) > _FEW_SPANS:  # scattered positions (PAINT's patches): one lookup, not a pass per span
            table = _span_table(self.items, str(rel.device))
            inside = (rel >= 0) & (rel < len(table))
            return torch.where(inside, table[rel.clamp(0, len(table) - 1)], False) & real
        chosen = torch.zeros_like(real)
        for start, stop in self.items:
            chosen |= (rel >= start) & (rel < stop)
        return chosen & real


_FEW_SPANS = 4


@functools.lru_cache(maxsize=256)
def _span_table(items: tuple[tuple[int, int], ...], device: str) -> torch.Tensor:
    """``[max stop]`` bool: which positions the spans cover (built once per span list and device)."""
    table = torch.zeros(max(stop for _, stop in items), dtype=torch.bool)
    for start, stop in items:
        table[start:stop] = True
    return table.to(device)


def _span(item) -> tuple[int, int]:
    if isinstance(item, bool):
        raise InputError(f"a position must be an int or a (start, stop) span, got {item!r}")
    if isinstance(item, int):
        if item < 0:
            raise InputError(f"positions count from the first real token and are >= 0, got {item}; "
                             "use 'last' for the final token")
        return item, item + 1
    if isinstance(item, tuple) and len(item) == 2 and all(isinstance(x, int) for x in item):
        start, stop = item
        if not 0 <= start < stop:
            raise InputError(f"a span (start, stop) needs 0 <= start < stop, got {item}")
        return start, stop
    raise InputError(f"a position must be an int or a (start, stop) span, got {item!r}")


@dataclass
class SequenceLayout:
    """Where the real tokens of each sequence are: built from the 2-D padding mask of a forward call.

    - ``first``: ``[batch]`` column of the first real token (0 under right padding or none).
    - ``last_column``: ``[batch]`` column of the last real token seen so far (prompt and generated).
    - ``real``: ``[batch, column]`` bool over every column seen so far (cache included), or None.

    A position is a column's distance from ``first``: padding left inside a sequence (decoding a
    right-padded batch) is counted, as the KV cache counts it.
    """

    first: torch.Tensor
    last_column: torch.Tensor
    real: torch.Tensor | None

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor | None, batch: int, n_columns: int,
                  device: torch.device) -> SequenceLayout:
        """``attention_mask`` ``[batch, column]`` (1 = real) covering every column so far, or None (no padding)."""
        if attention_mask is None or attention_mask.dim() != 2:
            return cls(torch.zeros(batch, dtype=torch.long, device=device),
                       torch.full((batch,), n_columns - 1, dtype=torch.long, device=device), None)
        real = attention_mask.to(device=device).bool()
        last = real.shape[1] - 1 - real.flip(-1).int().argmax(dim=-1)
        return cls(real.int().argmax(dim=-1), last, real)

    @property
    def last(self) -> torch.Tensor:
        """``[batch]`` relative position of the last real token."""
        return self.last_column - self.first

    def span(self, n: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Relative positions ``[batch, n]`` and realness ``[batch, n]`` of columns offset .. offset + n - 1."""
        columns = torch.arange(offset, offset + n, device=self.first.device)
        rel = columns[None, :] - self.first[:, None]
        if self.real is None:
            real = torch.ones_like(rel, dtype=torch.bool)
        else:
            inside = columns < self.real.shape[1]
            real = torch.zeros_like(rel, dtype=torch.bool)
            real[:, inside] = self.real[:, columns[inside]]
        return rel, real

    def choose(self, positions: Positions, n: int, offset: int) -> torch.Tensor:
        """``[batch, n]`` bool: the columns offset .. offset + n - 1 that ``positions`` picks."""
        rel, real = self.span(n, offset)
        return positions.select(rel, real, self.last)
