"""Batching for serving: which artifacts a server can batch, and that a batched call gives each
request exactly the rows it gets alone.

The artifacts are `serving_models.Masked` (per-token and pooled outputs over a padded
sequence) compiled with a dynamic batch and sequence length, for ONNX Runtime and OpenVINO."""

from __future__ import annotations

import pytest
import torch

import kiln
from kiln.errors import InputMismatch, ServingError
from kiln.serving import batch_layout, run_batched
from kiln.types import Dim, InputSpec, TensorSpec
from kiln.verify import TOLERANCE
from serving.serving_models import example

FP32 = TOLERANCE[kiln.Precision.FP32]
BATCH = Dim("batch", 1, 32)


def spec(*tensors: TensorSpec) -> InputSpec:
    return InputSpec(tensors, call_structure="")


def test_a_static_batch_is_refused_naming_the_input_and_the_dynamic_to_compile_with():
    static = spec(TensorSpec("x", torch.float32, (BATCH, 8)), TensorSpec("mask", torch.float32, (2, 8)))
    with pytest.raises(ServingError) as caught:
        batch_layout(static, where="model.kiln")
    assert "input 'mask' has a static batch of 2 on axis 0" in caught.value.what
    assert caught.value.fix == "compile again with dynamic={'x': {0: 'batch'}, 'mask': {0: 'batch'}}"
    assert caught.value.where == "model.kiln"


def test_a_scalar_input_is_refused_as_unbatchable():
    with pytest.raises(ServingError, match="input 'scale' is a scalar"):
        batch_layout(spec(TensorSpec("x", torch.float32, (BATCH, 8)), TensorSpec("scale", torch.float32, ())), where="m")


def test_inputs_with_different_dynamic_dims_on_axis_0_are_refused():
    other = Dim("rows", 1, 32)
    with pytest.raises(ServingError, match="'x' has 'batch', 'y' has 'rows'"):
        batch_layout(spec(TensorSpec("x", torch.float32, (BATCH, 8)), TensorSpec("y", torch.float32, (other, 8))), where="m")


def test_a_batch_dim_of_one_row_at_most_is_refused():
    with pytest.raises(ServingError, match="at most 1 row"):
        batch_layout(spec(TensorSpec("x", torch.float32, (Dim("batch", 0, 1), 8))), where="m")


def test_a_shared_dynamic_batch_dim_is_the_layout():
    layout = batch_layout(spec(TensorSpec("x", torch.float32, (BATCH, 8)), TensorSpec("m", torch.int64, (BATCH,))), where="m")
    assert (layout.dim, layout.max_rows, layout.input_names) == (BATCH, 32, ("x", "m"))


@pytest.fixture(params=["onnxruntime", "openvino"])
def compiled(request, ort_artifact, openvino_artifact):
    model = kiln.load({"onnxruntime": ort_artifact, "openvino": openvino_artifact}[request.param])
    assert model.backends == {"p0": request.param}
    return model


def alone(compiled, x, mask) -> tuple[torch.Tensor, ...]:
    out = compiled(x, mask)
    return out["tokens"], out["pooled"]


def test_each_request_in_a_batched_call_gets_the_rows_it_gets_alone(compiled):
    requests = [example(rows, seq=6, seed=seed) for seed, rows in enumerate([1, 3, 2, 1, 4])]
    results = run_batched(compiled, requests, max_rows=32)
    for request, result in zip(requests, results):
        for got, want in zip(result, alone(compiled, *request)):
            torch.testing.assert_close(got, want, rtol=FP32.rtol, atol=FP32.atol)


def test_requests_of_different_sequence_lengths_are_answered_from_separate_calls(compiled):
    requests = [example(2, seq=3, seed=1), example(1, seq=7, seed=2), example(2, seq=3, seed=3)]
    calls = []
    original = compiled.run_flat
    compiled.run_flat = lambda tensors: calls.append(tuple(tensors[0].shape)) or original(tensors)
    results = run_batched(compiled, requests, max_rows=32)
    assert sorted(calls) == [(1, 7, 8), (4, 3, 8)]  # the two length-3 requests shared one call
    for request, result in zip(requests, results):
        assert result[0].shape[:2] == request[0].shape[:2]
        for got, want in zip(result, alone(compiled, *request)):
            torch.testing.assert_close(got, want, rtol=FP32.rtol, atol=FP32.atol)


def test_calls_never_exceed_the_max_rows(compiled):
    requests = [example(3, seq=4, seed=seed) for seed in range(4)]
    calls = []
    original = compiled.run_flat
    compiled.run_flat = lambda tensors: calls.append(tensors[0].shape[0]) or original(tensors)
    run_batched(compiled, requests, max_rows=7)
    assert calls == [6, 6]


def test_a_bad_request_is_refused_alone_naming_the_input_and_the_others_are_answered(ort_artifact):
    compiled = kiln.load(ort_artifact)
    good = example(2, seq=5, seed=1)
    wrong_dtype = (good[0].double(), good[1])
    wrong_rank = (good[0][0], good[1])
    missing = (good[0], None)
    lengths_disagree = (good[0], good[1][:, :4])
    too_many_rows = example(9, seq=5, seed=2)
    results = run_batched(compiled, [good, wrong_dtype, wrong_rank, missing, lengths_disagree, too_many_rows, good], max_rows=8)
    assert all(isinstance(r, InputMismatch) for r in results[1:4])
    assert "input 'x'" in str(results[1]) and "float32" in str(results[1])
    assert "input 'x'" in str(results[2]) and "rank 2" in str(results[2])
    assert "input 'mask'" in str(results[3]) and "expected a tensor" in str(results[3])
    assert isinstance(results[4], ServingError) and "dim 'seq' is 4 here but 5 in input 'x'" in str(results[4])
    assert isinstance(results[5], ServingError) and "9 rows, more than the 8" in str(results[5])
    for result in (results[0], results[6]):
        for got, want in zip(result, alone(compiled, *good)):
            torch.testing.assert_close(got, want, rtol=FP32.rtol, atol=FP32.atol)


def test_with_seq_padded_requests_of_different_lengths_share_one_call_and_each_gets_its_own_answer(compiled):
    from kiln.serving.batching import Batcher

    batcher = Batcher(compiled, max_rows=32, pad={"seq": "mask"})
    assert batcher.cut_axes == {0: {"seq": [1]}}  # per-token output: cut back on axis 1; pooled: nothing to cut
    requests = [example(2, seq=3, seed=1), example(1, seq=7, seed=2), example(2, seq=5, seed=3)]
    calls = []
    original = compiled.run_flat
    compiled.run_flat = lambda tensors: calls.append(tuple(tensors[0].shape)) or original(tensors)
    results = batcher(requests)
    assert calls == [(5, 7, 8)]
    for request, result in zip(requests, results):
        assert result[0].shape[:2] == request[0].shape[:2]
        for got, want in zip(result, alone(compiled, *request)):
            torch.testing.assert_close(got, want, rtol=FP32.rtol, atol=FP32.atol)


@pytest.mark.parametrize("pad, message", [
    ({"tokens": "mask"}, "cannot pad dim 'tokens'"),
    ({"batch": "mask"}, "cannot pad dim 'batch'"),
    ({"seq": "attention_mask"}, "mask input 'attention_mask' does not carry dim 'seq'"),
])
def test_a_pad_naming_no_padable_dim_or_no_mask_is_refused(ort_artifact, pad, message):
    from kiln.serving.batching import Batcher

    with pytest.raises(ServingError, match=message):
        Batcher(kiln.load(ort_artifact), max_rows=8, pad=pad)
