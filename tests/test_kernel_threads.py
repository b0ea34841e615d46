"""The chunk loop's thread choice (kernels/threads.py): the faster of one thread and torch's count, with a
look at the other now and then; torch's count restored after every call, on error too."""

from __future__ import annotations

import pytest
import torch

from headlab.errors import InputError
from headlab.kernels.threads import MIN_SCORES, THREADS_ENV, ThreadChooser


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_tries_both_then_keeps_the_faster_and_looks_again(monkeypatch, two_threads):
    monkeypatch.delenv(THREADS_ENV, raising=False)
    chooser = ThreadChooser(explore=4)
    assert chooser.pick(2) == 2  # nothing measured: torch's count first
    chooser.record(2, 8e-9)
    assert chooser.pick(2) == 1  # then one thread
    chooser.record(1, 1e-9)  # one thread was 8x faster (a busy machine)
    picks = [chooser.pick(2) for _ in range(8)]
    assert picks.count(1) == 6 and picks.count(2) == 2  # every 4th call looks at the other choice
    for _ in range(4):  # the load went away: torch's count is faster now (an average: it takes a few calls)
        chooser.record(2, 1e-10)
    assert chooser.pick(2) == 2


def test_one_thread_and_fixed_counts(monkeypatch, two_threads):
    chooser = ThreadChooser()
    monkeypatch.delenv(THREADS_ENV, raising=False)
    assert chooser.pick(1) == 1
    monkeypatch.setenv(THREADS_ENV, "1")
    with chooser.loop(10) as used:  # a fixed count holds for every call, small ones too
        assert used == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2 and chooser.cost == {}  # a fixed count is not measured
    monkeypatch.setenv(THREADS_ENV, "many")
    with pytest.raises(InputError, match=THREADS_ENV), chooser.loop(MIN_SCORES):
        pass


def test_the_loop_restores_torch_threads_on_error(monkeypatch, two_threads):
    monkeypatch.delenv(THREADS_ENV, raising=False)
    chooser = ThreadChooser()
    chooser.cost = {"many": 1.0, "one": 1e-3}
    with pytest.raises(RuntimeError), chooser.loop(MIN_SCORES) as used:
        assert used == 1 and torch.get_num_threads() == 1
        raise RuntimeError("inside the kernel")
    assert torch.get_num_threads() == 2
    with chooser.loop(10) as used:  # too small to time: torch's count, nothing recorded
        assert used == 2
    assert chooser.cost == {"many": 1.0, "one": 1e-3}
