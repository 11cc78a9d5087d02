"""Minimal repros of kiln bugs the differential fuzzer found (tests/fuzz, bench/fuzz_long.py).

All are fixed; each test stays as the regression test of its bug and says what it was.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kiln
from kiln.verify import TOLERANCE

TOL = TOLERANCE[kiln.Precision.FP32]


def _optimize(model, inputs, **kw):
    return kiln.optimize(model.eval(), "cpu-x86", inputs, verify_draws=1, **kw)


def _assert_close(got, want):
    torch.testing.assert_close(got, want, rtol=TOL.rtol, atol=TOL.atol)


def test_groupnorm_4d_on_onnxruntime():
    """Was: onnxscript's ORT fusions rewrite GroupNorm on 4-D input into
    com.microsoft.GroupNorm, which only ORT's CUDA/ROCm providers implement; the CPU session
    failed to load ('Could not find an implementation for GroupNorm(1)'). kiln now falls back
    to the unfused graph."""
    model = nn.GroupNorm(2, 4)
    x = torch.randn(2, 4, 5, 5)
    compiled = _optimize(model, (x,), backend="onnxruntime")
    _assert_close(compiled(x), model(x))


def test_sdpa_rank3_is_reported_unsupported_by_onnxruntime_before_any_build():
    """Was: the ONNX capability check accepted 3-D scaled_dot_product_attention and the
    exporter then asserted 'only 4D query, key, and value are supported'. The capability table
    now refuses such nodes with the reason, so placement never hands them to ONNX Runtime:
    without eager fallback that is an error naming the reason; with it (the default) the node
    runs eagerly and the report says why."""
    class Attention(nn.Module):
        def forward(self, q):
            return F.scaled_dot_product_attention(q, q, q)

    with pytest.raises(kiln.BackendUnavailable, match="only with 4-d query"):
        _optimize(Attention(), (torch.randn(2, 5, 4),), backend="onnxruntime", eager_fallback=False)
    compiled = _optimize(Attention(), (torch.randn(2, 5, 4),), backend="onnxruntime")
    assert compiled.backends == {"p0": "eager"} and "only with 4-d query" in str(compiled.report)


def test_onnx_export_failure_names_the_reason(monkeypatch):
    """Was: BackendError kept only the first line of the exporter's error, for a
    ConversionError a generic banner ('Failed to convert ... Next steps:', with ANSI colour
    codes), losing the real reason."""
    # torch.onnx.export fails as it does on a rank-3 SDPA (see above): a multi-line ConversionError
    # whose first line is a banner, chained to the exception that says what is wrong
    banner = ("Failed to convert the exported program to an ONNX model. \x1b[96mThis is step 3/3\x1b[0m of exporting the "
              "model to ONNX. Next steps:\n- If there is a missing ONNX function, implement it and register it to the "
              "registry.\n\n## Exception summary\n\n<class 'AssertionError'>: only 4D query, key, and value are supported")

    def failing_export(*args, **kwargs):
        try:
            raise AssertionError("only 4D query, key, and value are supported")
        except AssertionError as inner:
            raise RuntimeError(banner) from inner

    monkeypatch.setattr(torch.onnx, "export", failing_export)
    with pytest.raises(kiln.BackendError) as info:
        _optimize(nn.Linear(4, 4), (torch.randn(2, 4),), backend="onnxruntime")
    message = str(info.value)
    assert "only 4D query, key, and value are supported" in message, message
    assert "\x1b[" not in message, "terminal colour codes in the message"


def test_mul_scalar_first_on_onnxruntime():
    """Was: torch.mul(0.5, x) captured as aten.mul.Tensor(0.5, x), which the ONNX exporter fails
    on ('float' object has no attribute 'dtype'); the put_scalar_operands_last pass swaps it."""
    class Scale(nn.Module):
        def forward(self, x):
            return torch.mul(0.5, x)

    x = torch.randn(3)
    compiled = _optimize(Scale(), (x,), backend="onnxruntime")
    _assert_close(compiled(x), 0.5 * x)


def test_dynamic_batch_reshape_of_chunk():
    """Was: capture always exported size-oblivious with dynamic dims, which for a reshape of a
    non-contiguous view adds a batch != 1 guard and refused a valid model; now size-oblivious
    export is only the retry after a plain export fails."""
    class SplitHeads(nn.Module):
        def forward(self, x):  # x: (batch, 1, 24) -> the middle third as (batch, 1, 1, 8)
            return x.chunk(3, dim=-1)[1].reshape(x.shape[0], 1, 1, 8)

    compiled = _optimize(SplitHeads(), (torch.randn(3, 1, 24),), dynamic={"x": {0: "batch"}}, backend="onnxruntime")
    for batch in (1, 5):
        x = torch.randn(batch, 1, 24)
        _assert_close(compiled(x), SplitHeads()(x))


def test_a_dynamic_batch_captured_from_an_example_of_one_is_right_at_every_batch_on_inductor():
    """Was (masked-family seed 7): an example of batch 1 made torch.export specialise the dynamic
    batch, kiln retried it size-oblivious, and AOTInductor compiled that program into an engine
    right for row 0 and off by ~1.2 on every later row (torch 2.13, reproduced without kiln).
    kiln now re-exports from the example repeated to size 2 first; and its second verification
    draw takes another batch size, so an engine right only at the example's batch fails."""
    from fuzz.masked import masked_model

    model, example, dynamic = masked_model(7)
    assert example["input_ids"].shape[0] == 1 and dynamic
    compiled = _optimize(model, example, dynamic=dynamic, backend="inductor", cache=False, isolate=False)
    for batch in (2, 3):
        ids, mask = torch.randint(0, 50, (batch, 12)), torch.ones(batch, 12, dtype=torch.int64)
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask)
        _assert_close(compiled(input_ids=ids, attention_mask=mask), want)


def test_the_second_verification_draw_takes_another_size_of_each_dynamic_dim():
    from kiln.build.inputs import verification_draws
    from kiln.frontend.capture import capture

    captured = capture(nn.Linear(4, 4).eval(), (torch.randn(1, 4),), dynamic={"input": {0: "batch"}})
    draws = verification_draws(captured, kiln.CompileOptions(verify_draws=2))
    assert [d[0].shape[0] for d in draws] == [1, 1, 2]


def test_an_ort_fusion_rewrite_that_changes_an_output_falls_back_to_the_unfused_graph():
    """Was (general-family seed 812): onnxscript 0.7.2's ORT fusion rule mha2 dropped the
    flatten after an attention whose result is a model output, so ONNX Runtime returned
    (2, 16, 8) where eager returns (2, 128) (reproduced without kiln: torch.onnx export, then
    ort_fusions.optimize_for_ort). kiln checks the fused engine on the example inputs and builds
    from the unfused graph when the rewrite changed an answer, saying so in the report."""
    from fuzz.generator import call, random_model

    model, example, dynamic = random_model(812)
    compiled = _optimize(model, example, dynamic=dynamic, backend="onnxruntime", cache=False, precision="fp32")
    with torch.no_grad():
        want = call(model, example)
    for got, expected in zip(call(compiled, example), want):
        _assert_close(got, expected)
    detail = next(c.detail for c in compiled.report.candidates if c.status == "chosen")
    assert "changed the graph's answer" in detail or "ORT fusion rules applied" in detail, detail


def test_a_padded_strided_pointwise_conv_after_an_elementwise_op_matches_eager_on_openvino():
    """Was (general-family seed 364): OpenVINO 2026.4's CPU plugin gave Conv1d(k=1, stride=3,
    padding=1) after a division an output of length 3 where eager gives 2 (it strides before
    padding once the input shape is static; reproduced with openvino.convert_model alone). The
    OpenVINO capability table now refuses such a convolution, so it runs in eager PyTorch."""
    pytest.importorskip("openvino")
    from fuzz.generator import call, random_model

    model, example, dynamic = random_model(364)
    compiled = _optimize(model, example, dynamic=dynamic, backend="openvino", cache=False, precision="fp32")
    assert "eager" in compiled.backends.values()
    with torch.no_grad():
        _assert_close(call(compiled, example), call(model, example))


def test_an_input_openvinos_frontend_names_by_a_number_is_still_wired_to_its_tensor():
    """Was (general-family seed 1460): OpenVINO's frontend named one input '14' and kept an unread
    input beside it, and kiln, wiring inputs by name, refused the build. Unnamed inputs now go to
    the read partition input of their rank."""
    pytest.importorskip("openvino")
    from fuzz.generator import call, random_model

    model, example, dynamic = random_model(1460)
    compiled = _optimize(model, example, dynamic=dynamic, backend="openvino", cache=False, precision="fp32")
    assert set(compiled.backends.values()) == {"openvino"}
    with torch.no_grad():
        for got, want in zip(call(compiled, example), call(model, example)):
            _assert_close(got, want)
