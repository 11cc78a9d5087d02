"""kiln's packages import one way, lowest layer first (scripts/import_graph.py holds the layers)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "import_graph.py"


@pytest.fixture(scope="module")
def graph():
    spec = importlib.util.spec_from_file_location("import_graph", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["import_graph"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def test_no_two_kiln_units_import_each_other_even_through_others(graph):
    assert graph.cycles(graph.unit_edges(graph.all_imports())) == []


def test_every_import_runs_down_the_layers_including_imports_inside_functions(graph):
    assert graph.violations(graph.unit_edges(graph.all_imports())) == []


def test_every_kiln_unit_has_a_place_in_the_layers(graph):
    units = {graph.unit_of(graph.module_name(p)) for p in graph.ROOT.rglob("*.py")}
    assert units <= {u for layer in graph.LAYERS for u in layer}


def test_the_guard_catches_an_import_back_up_and_a_cycle(graph):
    # a backend reaching up into the passes, and the passes importing the backend back
    up = graph.Import("kiln.backends.onnxruntime", "kiln.passes.pipeline", 1, deferred=True)
    down = graph.Import("kiln.passes.pipeline", "kiln.backends.base", 1, deferred=False)
    edges = graph.unit_edges([up, down])
    assert [line.split(":")[0] for line in graph.violations(edges)] == ["backends -> passes"]
    assert graph.cycles(edges) == [["backends", "passes"]]
