"""The house's floors hold: no import cycle among the product modules, and the ground floor (``headlab/``, with
its zoo and training floors, not its CLI) reaches up into the other folders at most twice.

The graph is rebuilt from the source with pyproject's package-dir mapping; imports inside functions count.
"""

from __future__ import annotations

import import_graph


def test_the_graph_sees_the_product():
    graph = import_graph.edges()
    assert "headlab.kernels.dispatch" in graph and "headlab.cli.analyze" in graph
    assert "headlab.kernels" in graph["headlab.probes.attention"]  # an edge it must find


def test_no_import_cycle():
    assert import_graph.cycles(import_graph.edges()) == []


def test_core_reaches_up_at_most_twice():
    ups = [(a, b) for a, b in import_graph.up_edges(import_graph.edges()) if not a.startswith("headlab.cli")]
    core = [(a, b) for a, b in ups if import_graph.floor(a) == 0]
    assert len(core) <= 2, core
    assert ups == core, [e for e in ups if e not in core]  # above the ground floor nothing reaches up at all


def test_the_cycle_finder_finds_cycles():
    assert import_graph.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
