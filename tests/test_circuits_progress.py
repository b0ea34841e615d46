"""``analyze circuits`` tells its cost: a bar per phase, an estimate per task, and no unbounded task spec.

The spec checks are pure Python (no model, no tokenizer): the CLI runs them before the model loads. The
phases run on ``test_circuits``'s hand-built 2-layer copy model, with tqdm replaced by a recorder.
"""

from __future__ import annotations

import pytest
import torch
from test_circuits import copy_model, copy_task

from headlab.analyses import circuits as C
from headlab.analyses.circuit_tasks import TaskBatch, make_task, write_jsonl
from headlab.analyses.configs import MAX_SHOTS, parse_task_spec
from headlab.errors import InputError


def test_task_specs_are_checked_and_shots_capped_without_a_model():
    assert parse_task_spec("ioi") == ("ioi", {})
    assert parse_task_spec(f"colored-objects:{MAX_SHOTS}") == ("colored-objects", {"shots": MAX_SHOTS})
    C.CircuitsConfig(tasks=("ioi", f"colored-objects:{MAX_SHOTS}", "mine.jsonl")).check()
    for spec, message in ((f"colored-objects:{MAX_SHOTS + 1}", f"at most {MAX_SHOTS} shots"),
                          ("colored-objects:99", "at most 10 shots; each shot adds ~33 tokens"),
                          ("colored-objects:abc", "takes a number of shots"),  # was a ValueError from int()
                          ("colored-objects:", "takes a number of shots"),
                          ("ioi:2", "takes no ':2' argument"),
                          ("nope", "unknown task")):
        with pytest.raises(InputError, match=message):
            parse_task_spec(spec)
        with pytest.raises(InputError, match=message):  # config.check, which the CLI runs before loading
            C.CircuitsConfig(tasks=("ioi", spec)).check()
    with pytest.raises(InputError, match="at most"):
        make_task("colored-objects:99", 4)  # the builder refuses it too, before drawing a prompt


class Bar:
    """A tqdm stand-in that records what each bar was asked to show."""

    made: list[Bar] = []

    def __init__(self, iterable=None, total=None, desc=None, disable=False, **kwargs):
        self.iterable, self.total, self.desc, self.disable = iterable, total, desc, disable
        self.n, self.closed = 0, False
        Bar.made.append(self)

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.n += 1

    def update(self, n: int = 1) -> None:
        self.n += n

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def bars(monkeypatch):
    Bar.made = []
    monkeypatch.setattr(C, "tqdm", Bar)
    monkeypatch.setattr("tqdm.auto.tqdm", Bar)  # path_patching imports its bar at call time
    return Bar.made


def _tasks(tmp_path) -> tuple[str, str]:
    paths = []
    for where in (1, 2):
        path = tmp_path / f"copy-{where}.jsonl"
        write_jsonl(copy_task(where, n=6), path)
        paths.append(str(path))
    return tuple(paths)


def test_every_phase_has_a_bar_and_each_task_an_estimate(tmp_path, bars):
    torch.manual_seed(0)
    lines: list[str] = []
    config = C.CircuitsConfig(tasks=_tasks(tmp_path), n=6, top=0.25, method="path", draws=2, batch_size=4,
                              senders_per_pass=3)
    C.analyze_circuits(copy_model(), config, progress=True, log=lines.append)
    shown = {bar.desc: bar for bar in bars}
    for task in ("copy-1", "copy-2"):
        # clean runs: 2 chunks of 4 prompts; path patching: 2 chunks x ceil(4 heads / 3) passes
        for desc, total in ((f"clean runs {task}", 2), (f"path patching {task}", 4), (f"role tags {task}", 3),
                            (f"ablation test {task}", C.ablation_passes(2))):
            bar = shown[desc]
            assert (bar.total, bar.n, bar.closed, bar.disable) == (total, total, True, False), desc
    estimates = [line for line in lines if line.startswith("copy-1: 6 prompts of up to ")]
    assert len(estimates) == 1 and "ablation test 5 (--draws sets it)" in estimates[0]
    assert "more for this task (path scores ~" in estimates[0]
    assert any(line.startswith("ablation test copy-2: 5 passes, about ") and "--draws 0 skips" in line
               for line in lines)
    assert lines.index(estimates[0]) < next(i for i, line in enumerate(lines) if line.startswith("ablation test"))

    bars.clear()
    C.analyze_circuits(copy_model(), C.CircuitsConfig(tasks=config.tasks, n=6, draws=1), progress=False)
    assert bars and all(bar.disable for bar in bars)


def test_task_estimate_counts_the_passes_of_each_phase():
    ids = torch.zeros(32, 17, dtype=torch.long)
    batch = TaskBatch("ioi", ids, ids, torch.ones_like(ids), torch.zeros(32), torch.ones(32))
    # attribution 4 passes + role tags 3 x 16/32 + ablation 20 + 3 = 28.5 passes of 2 s
    line = C.task_estimate(batch, 2.0, C.CircuitsConfig(draws=20), n_heads=270)
    assert line.startswith("ioi: 32 prompts of up to 17 tokens, 2 s per pass over them; about 57 s more")
    assert "ablation test 23 (--draws sets it)" in line and "role tags ~1.5" in line
    # + path patching 0.075 x 271 heads = 20.3 passes
    assert "about 1.6 min more" in C.task_estimate(batch, 2.0, C.CircuitsConfig(method="path"), n_heads=270)
    bare = C.task_estimate(batch, 2.0, C.CircuitsConfig(draws=0, roles=False), n_heads=270)
    assert "about 8 s more" in bare and "ablation" not in bare and "role" not in bare
