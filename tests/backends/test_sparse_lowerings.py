"""The 2:4 lowerings on CPU: TensorRT's sparse-weights flag from weights the plan pruned, and the
Inductor-CUDA semi-structured conversion's rules and its refusal without CUDA. The conversion
itself runs in tests/backends/test_inductor_cuda_sparsity.py, on a CUDA GPU only."""

from pathlib import Path

import pytest
import torch
from torch import nn

from kiln.backends.inductor_sparsity import semi_structured_refusal, to_semi_structured
from kiln.backends.tensorrt_api import BUILDER_FLAGS
from kiln.backends.tensorrt_config import (PrecisionPlan as TrtPlan, derive_build_config, is_2_4_sparse, sparse_weight_nodes,
                                           trt_sparse_refusal)
from kiln.fx_helpers import attr_value
from kiln.hardware_profiles import load
from kiln.ir import LayerPlan, PrecisionPlan, Scheme
from kiln.precision.lowering import with_lowered_weights
from kiln.types import Precision

from .conftest import make_partition

ENGINE = Path("/tmp/kiln-test/p0.engine")


def _planned(sparse: bool):
    """A two-linear partition at fp16 whose first layer the plan prunes to 2:4 when `sparse`."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32)).eval()
    graph, _ = make_partition(model, (torch.randn(3, 64),))
    layers = [n for n in graph.gm.graph.nodes if n.op == "call_function" and "linear" in str(n.target)]
    graph.precision = PrecisionPlan([LayerPlan(n.name, "linear", str(n.args[1].target), Scheme.FP16,
                                               sparsity="2:4" if sparse and i == 0 else None) for i, n in enumerate(layers)])
    return with_lowered_weights(graph), layers[0].name


@pytest.mark.parametrize("sparse", [True, False])
def test_tensorrt_sets_sparse_weights_exactly_when_the_plan_pruned_layers_to_2_4(sparse):
    lowered, first = _planned(sparse)
    found = sparse_weight_nodes(lowered.gm)  # what the TensorRT backend reads from the partition it builds
    assert found == ((first,) if sparse else ())
    config = derive_build_config(load("a100").primary, TrtPlan(Precision.FP16, sparse_layers=found), (), ENGINE)
    assert ("SPARSE_WEIGHTS" in config.flags) is sparse
    assert any("2:4 sparse weights in 1 layers" in n for n in config.notes) is sparse
    assert set(BUILDER_FLAGS["SPARSE_WEIGHTS"]) == {10, 11}  # checked against the real bindings by test_tensorrt_conformance


def test_tensorrt_leaves_the_flag_off_on_a_gpu_without_sparse_tensor_cores():
    lowered, _ = _planned(True)
    config = derive_build_config(load("t4").primary, TrtPlan(Precision.FP16, sparse_layers=sparse_weight_nodes(lowered.gm)),
                                 (), ENGINE)
    assert "SPARSE_WEIGHTS" not in config.flags and any("no sparse tensor cores" in n for n in config.notes)


def test_tensorrt_needs_input_channels_in_whole_groups_of_four():
    assert trt_sparse_refusal((128, 256)) is None and trt_sparse_refusal((64, 32, 3, 3)) is None
    assert "254 input channels" in trt_sparse_refusal((128, 254))
    assert "no input-channel axis" in trt_sparse_refusal((128,))


@pytest.mark.parametrize("shape, dtype, refused", [
    ((64, 128), torch.float16, None), ((32, 64), torch.bfloat16, None), ((32, 128), torch.int8, None),
    ((48, 128), torch.float16, "rows a multiple of 32"), ((64, 96), torch.float16, "columns a multiple of 64"),
    ((32, 64), torch.int8, "columns a multiple of 128"), ((64, 128), torch.float32, "not float32"),
    ((64, 16, 3, 3), torch.float16, "2-D")])
def test_semi_structured_weights_follow_torchs_shape_and_dtype_rules(shape, dtype, refused):
    why = semi_structured_refusal(shape, dtype)
    assert (why is None) if refused is None else (refused in why)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_the_semi_structured_conversion_refuses_and_the_pruned_weights_run_dense():
    lowered, first = _planned(True)
    before = {k: v.clone() for k, v in lowered.gm.state_dict().items()}
    linears = [n for n in lowered.gm.graph.nodes if n.op == "call_function" and "linear" in str(n.target)]
    converted, refused = to_semi_structured(lowered.gm, {first: str(linears[0].args[1].target)})
    assert converted == [] and len(refused) == 1 and "no CUDA GPU" in refused[0] and refused[0].startswith(first)
    assert all(torch.equal(v, before[k]) for k, v in lowered.gm.state_dict().items())  # nothing was replaced
    (w1, b1), (w2, b2) = [(attr_value(lowered.gm, n.args[1]), attr_value(lowered.gm, n.args[2])) for n in linears]
    assert is_2_4_sparse(w1) and not is_2_4_sparse(w2)
    x = torch.randn(5, 64)
    with torch.no_grad():  # the dense pruned graph answers as the same weights do in eager PyTorch
        want = nn.functional.linear(torch.relu(nn.functional.linear(x, w1, b1)), w2, b2)
        torch.testing.assert_close(lowered.gm(x)[0], want)
