import pytest
import torch

from kiln.backends.inductor import InductorBackend
from kiln.hardware_profiles import load
from kiln.types import Precision
from kiln.verify import TOLERANCE

backend = InductorBackend()
if not backend.available().ok:
    pytest.skip(backend.available().reason, allow_module_level=True)

TOL = TOLERANCE[Precision.FP32]


def test_inductor_takes_every_aten_op_on_cpu_at_float_precisions():
    graph = torch.fx.Graph()
    node = graph.call_function(torch.ops.aten.kthvalue.default, (graph.placeholder("x"), 1))
    assert backend.supports(node, load("cpu-x86").primary).ok


def test_inductor_engine_runs_saves_and_loads_to_the_same_outputs(convnet_partition, settings, tmp_path):
    graph, _ = convnet_partition
    engine = backend.compile(graph, settings)
    x = torch.randn(4, 3, 8, 8)
    for got, want in zip(engine(x), graph.gm(x)):
        torch.testing.assert_close(got, want, rtol=TOL.rtol, atol=TOL.atol)
    out_dir = tmp_path / "saved"
    out_dir.mkdir()
    entry = engine.save(out_dir, "p0")
    assert entry.files == ["p0.pt2"]
    reloaded = backend.load(out_dir, entry, settings)
    for a, b in zip(engine(x), reloaded(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
