"""Capture: how kiln turns a model and its example call into a graph and an input spec.

Each test states one rule of the frontend, through `capture()` directly where the rule is about
the spec and through `kiln.optimize()` where it is about what the compiled model does. Error
tests check that the CaptureError names the culprit (input, dim, axis, source line) and says
what to try, because a message about guards and constraints the user never wrote is the
failure kiln exists to avoid.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import kiln
from kiln.errors import CaptureError, InputMismatch, KilnError
from kiln.frontend.capture import capture
from kiln.types import Dim
from kiln.verify import TOLERANCE

TOL = TOLERANCE[kiln.Precision.FP32]


def assert_close(got: Any, want: Any) -> None:
    torch.testing.assert_close(got, want, rtol=TOL.rtol, atol=TOL.atol)


def compile_cpu(model: nn.Module, example_inputs: Any, **kwargs: Any) -> kiln.CompiledModel:
    return kiln.optimize(model, "cpu-x86", example_inputs, backend="onnxruntime", **kwargs)


def eager(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    with torch.no_grad():
        return model(*args, **kwargs)


def placeholders(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def first_line(err: KilnError) -> str:
    """'where: what' -- the part of the message that names the culprit (the fix follows)."""
    return str(err).split("\n")[0]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["capture", "optimize"])
def entry(request):
    """Capture errors must surface the same through capture() and through optimize()."""
    if request.param == "capture":
        return lambda model, example_inputs, example_kwargs=None, dynamic=None: capture(
            model, example_inputs, example_kwargs, dynamic)
    return lambda model, example_inputs, example_kwargs=None, dynamic=None: compile_cpu(
        model, example_inputs, example_kwargs=example_kwargs, dynamic=dynamic)


# ---------------------------------------------------------------------------------------------
# Models


class QueryKey(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(4, 3)
        self.k = nn.Linear(4, 3)

    def forward(self, query, key, scale_up: bool = False):
        y = self.q(query) * self.k(key)
        return y * 2 if scale_up else y


class Settings(nn.Module):
    """Takes non-tensor settings of each plain type next to its tensor."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, scale: float = 1.0, mode: str = "sum", mask=None, relu: bool = False):
        y = self.lin(x) * scale
        if mask is not None:
            y = y * mask
        y = torch.relu(y) if relu else y
        return y.sum(-1) if mode == "sum" else y.amax(-1)


class Variadic(nn.Module):
    def forward(self, *xs):
        return xs[0] * xs[1]


class Nested(nn.Module):
    def forward(self, pair, feats):
        return pair[0] + pair[1] * feats["a"] - feats["b"]


class XAndMask(nn.Module):
    """Two inputs that must agree on the batch size."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x, mask):
        return self.lin(x) * mask


class Record(Mapping):
    """A Mapping with attribute access and None fields left out, as transformers' ModelOutput."""

    def __init__(self, **fields: Any):
        self._fields = {k: v for k, v in fields.items() if v is not None}

    def __getitem__(self, key: str) -> Any:
        return self._fields[key]

    def __iter__(self):
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_fields"][name]
        except KeyError:
            raise AttributeError(name) from None


class Outputs(nn.Module):
    """Returns its result in the container `kind` names."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        y = self.lin(x)
        if self.kind == "tuple":
            return y, y.sum(-1)
        if self.kind == "list":
            return [y, torch.sigmoid(y), y.amax(-1)]
        if self.kind == "nested dict":
            return {"logits": y, "probs": y.softmax(-1), "extra": (y * 2, [y - 1, y.mean()])}
        if self.kind == "mapping":
            return Record(last_hidden_state=y, pooler_output=y.mean(0), hidden_states=None)
        raise ValueError(self.kind)


class AllZeros(nn.Module):
    def forward(self, x):
        return torch.relu(-x.abs())


class DataDependentBranch(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x + 1
        return x - 1


BRANCH_LINE = inspect.getsourcelines(DataDependentBranch.forward)[1] + 1  # the `if x.sum() > 0:` line


class ViewsBatchAsTwo(nn.Module):
    def forward(self, x):
        return x.view(2, -1) * 2


class ReturnsString(nn.Module):
    def forward(self, x):
        return "done"


class ReturnsTensorAndInt(nn.Module):
    def forward(self, x):
        return x * 2, 3


class ReturnsTensorAndNone(nn.Module):
    def forward(self, x):
        return x * 2, None


class Sums(nn.Module):
    """Two inputs whose batch sizes the model never relates."""

    def forward(self, x, y):
        return x.sum(0), y.sum(0)


# ---------------------------------------------------------------------------------------------
# Inputs: names, positional and keyword tensors, constants


def test_capture_names_inputs_after_forward_parameters():
    captured = capture(QueryKey(), (torch.randn(2, 4), torch.randn(2, 4)))

    assert captured.input_spec.names == ("query", "key")
    assert [n.meta["val"].shape for n in placeholders(captured.gm)] == [torch.Size([2, 4])] * 2


def test_capture_names_keyword_inputs_after_their_keywords():
    from_kwargs = capture(QueryKey(), (torch.randn(2, 4),), {"key": torch.randn(2, 4)})
    from_dict = capture(QueryKey(), {"key": torch.randn(2, 4), "query": torch.randn(2, 4)})

    assert from_kwargs.input_spec.names == ("query", "key")
    assert set(from_dict.input_spec.names) == {"query", "key"}


def test_capture_names_variadic_inputs_by_position():
    captured = capture(Variadic(), (torch.randn(3), torch.randn(3)))

    assert captured.input_spec.names == ("input_0", "input_1")


def test_capture_names_nested_inputs_by_path_and_accepts_dynamic_dims_by_those_names():
    example = ((torch.randn(3), torch.randn(3)), {"a": torch.randn(3), "b": torch.randn(3)})
    names = ("pair.0", "pair.1", "feats.a", "feats.b")

    captured = capture(Nested(), example, dynamic={name: {0: "n"} for name in names})

    assert captured.input_spec.names == names
    assert all(t.shape == (Dim("n"),) for t in captured.input_spec.tensors)


def test_optimize_accepts_keyword_tensor_inputs_from_example_kwargs():
    model = QueryKey()
    compiled = compile_cpu(model, (torch.randn(2, 4),), example_kwargs={"key": torch.randn(2, 4)})
    query, key = torch.randn(2, 4), torch.randn(2, 4)

    assert compiled.input_spec.names == ("query", "key")
    assert_close(compiled(query, key=key), eager(model, query, key=key))


def test_optimize_accepts_a_dict_of_keyword_inputs():
    model = QueryKey()
    compiled = compile_cpu(model, {"query": torch.randn(2, 4), "key": torch.randn(2, 4)})
    query, key = torch.randn(2, 4), torch.randn(2, 4)

    assert_close(compiled(query=query, key=key), eager(model, query=query, key=key))


def test_capture_bakes_non_tensor_arguments_in_as_constants():
    settings = {"scale": 0.5, "mode": "max", "mask": None, "relu": True}

    captured = capture(Settings(), (torch.randn(2, 4),), settings)

    assert captured.input_spec.names == ("x",)
    assert captured.input_spec.constants == (0.5, "max", None, True)
    assert len(placeholders(captured.gm)) == 1


def test_optimize_runs_the_model_with_the_constant_flag_it_was_captured_with():
    model = QueryKey()
    compiled = compile_cpu(model, (torch.randn(2, 4), torch.randn(2, 4)), example_kwargs={"scale_up": True})
    query, key = torch.randn(2, 4), torch.randn(2, 4)

    got = compiled(query, key, scale_up=True)

    assert_close(got, eager(model, query, key, scale_up=True))
    assert not torch.allclose(got, eager(model, query, key, scale_up=False))


def test_optimize_bakes_in_float_string_and_none_settings():
    model = Settings()
    settings = {"scale": 0.5, "mode": "max", "mask": None, "relu": True}
    compiled = compile_cpu(model, (torch.randn(2, 4),), example_kwargs=settings)
    x = torch.randn(2, 4)

    assert_close(compiled(x, **settings), eager(model, x, **settings))


def test_capture_evaluates_the_model_in_eval_mode():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(p=0.5)).train()
    compiled = compile_cpu(model, (torch.randn(3, 4),))
    x = torch.randn(3, 4)

    assert_close(compiled(x), eager(model.eval(), x))  # dropout is the identity at inference


def test_capture_rejects_an_input_of_unsupported_type_naming_it(entry):
    with pytest.raises(CaptureError) as info:
        entry(QueryKey(), (torch.randn(2, 4), np.ones((2, 4), dtype=np.float32)))

    assert "key" in first_line(info.value)
    assert "ndarray" in first_line(info.value)


# ---------------------------------------------------------------------------------------------
# Outputs: structure comes back as the model returned it


def assert_same_structure(got: Any, want: Any, path: str = "output") -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{path}: {type(got).__name__} where eager gives a tensor"
        assert_close(got, want)
    elif isinstance(want, Mapping):
        assert isinstance(got, Mapping), f"{path}: {type(got).__name__} where eager gives a mapping"
        assert list(got.keys()) == list(want.keys()), path
        for key in want:
            assert_same_structure(got[key], want[key], f"{path}.{key}")
    else:
        assert type(got) is type(want), f"{path}: {type(got).__name__} where eager gives {type(want).__name__}"
        assert len(got) == len(want), path
        for index, (g, w) in enumerate(zip(got, want)):
            assert_same_structure(g, w, f"{path}.{index}")


@pytest.mark.parametrize("kind", ["tuple", "list", "nested dict", "mapping"])
def test_optimize_returns_outputs_in_the_models_structure(kind):
    model = Outputs(kind)
    compiled = compile_cpu(model, (torch.randn(2, 4),))
    x = torch.randn(2, 4)

    assert_same_structure(compiled(x), eager(model, x))


def test_dict_output_reads_by_key_and_by_attribute():
    compiled = compile_cpu(Outputs("nested dict"), (torch.randn(2, 4),))

    out = compiled(torch.randn(2, 4))

    assert isinstance(out, dict)
    assert out.logits is out["logits"]
    assert out.extra[1][0] is out["extra"][1][0]
    with pytest.raises(AttributeError, match="logits"):  # the error lists the outputs there are
        out.missing


def test_mapping_output_leaves_out_none_fields_and_reads_by_attribute():
    compiled = compile_cpu(Outputs("mapping"), (torch.randn(2, 4),))

    out = compiled(torch.randn(2, 4))

    assert list(out) == ["last_hidden_state", "pooler_output"]
    assert out.pooler_output is out["pooler_output"]
    assert compiled.report.outputs == ["output.last_hidden_state", "output.pooler_output"]


def test_transformers_model_output_comes_back_as_an_attribute_dict():
    modeling_outputs = pytest.importorskip("transformers.modeling_outputs")

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            y = self.lin(x)
            return modeling_outputs.BaseModelOutputWithPooling(last_hidden_state=y, pooler_output=y.mean(1))

    model = Encoder()
    compiled = compile_cpu(model, (torch.randn(2, 5, 4),))
    x = torch.randn(2, 5, 4)

    got, want = compiled(x), eager(model, x)

    assert_same_structure(got, want)
    assert_close(got.last_hidden_state, want.last_hidden_state)


def test_optimize_returns_none_outputs_in_place():
    model = ReturnsTensorAndNone()
    compiled = compile_cpu(model, (torch.randn(2, 4),))
    x = torch.randn(2, 4)

    got = compiled(x)

    assert got[1] is None
    assert_close(got[0], eager(model, x)[0])


def test_optimize_compiles_a_model_whose_output_is_all_zeros():
    model = AllZeros()
    compiled = compile_cpu(model, (torch.randn(2, 3),))
    x = torch.randn(2, 3)

    assert_close(compiled(x), eager(model, x))


# ---------------------------------------------------------------------------------------------
# Dynamic dims


def test_dynamic_dim_by_name_serves_other_batch_sizes():
    model = nn.Linear(4, 3)
    compiled = compile_cpu(model, (torch.randn(2, 4),), dynamic={"input": {0: "batch"}})

    assert compiled.input_spec.tensors[0].shape == (Dim("batch"), 4)
    for batch in (1, 3, 17):
        x = torch.randn(batch, 4)
        assert_close(compiled(x), eager(model, x))


def test_dynamic_dim_with_a_range_serves_both_ends_and_rejects_beyond_it():
    model = nn.Linear(4, 3)
    compiled = compile_cpu(model, (torch.randn(4, 4),), dynamic={"input": {0: kiln.Dim("batch", min=1, max=32)}})

    assert compiled.input_spec.dims() == {"batch": Dim("batch", 1, 32)}
    for batch in (1, 32):
        x = torch.randn(batch, 4)
        assert_close(compiled(x), eager(model, x))
    with pytest.raises(InputMismatch, match="batch"):
        compiled(torch.randn(33, 4))


def test_dynamic_accepts_negative_axes():
    captured = capture(nn.Linear(4, 3), (torch.randn(2, 4),), dynamic={"input": {-2: "batch"}})

    assert captured.input_spec.tensors[0].shape == (Dim("batch"), 4)


def test_inputs_sharing_a_dim_name_share_one_dim():
    model = XAndMask()
    compiled = compile_cpu(model, (torch.randn(2, 4), torch.randn(2, 3)),
                           dynamic={"x": {0: kiln.Dim("batch", 1, 16)}, "mask": {0: "batch"}})
    x, mask = torch.randn(6, 4), torch.randn(6, 3)

    assert compiled.input_spec.dims() == {"batch": Dim("batch", 1, 16)}
    assert [t.shape[0] for t in compiled.input_spec.tensors] == [Dim("batch", 1, 16)] * 2
    assert_close(compiled(x, mask), eager(model, x, mask))


def test_two_dynamic_dims_on_one_input_vary_independently():
    model = nn.Linear(4, 3)
    compiled = compile_cpu(model, (torch.randn(2, 5, 4),), dynamic={"input": {0: "batch", 1: "seq"}})

    for batch, seq in ((1, 1), (3, 7), (2, 5)):
        x = torch.randn(batch, seq, 4)
        assert_close(compiled(x), eager(model, x))


def test_dynamic_batch_accepts_an_example_of_size_one():
    model = nn.Linear(4, 3)
    compiled = compile_cpu(model, (torch.randn(1, 4),), dynamic={"input": {0: "batch"}})
    x = torch.randn(5, 4)

    assert_close(compiled(x), eager(model, x))


def test_a_dim_named_by_string_takes_the_range_of_the_dim_of_that_name():
    try:
        captured = capture(XAndMask(), (torch.randn(2, 4), torch.randn(2, 3)),
                           dynamic={"x": {0: "batch"}, "mask": {0: kiln.Dim("batch", 1, 8)}})
    except CaptureError as exc:  # refusing the pair as ambiguous is as good as honouring the Dim
        assert "batch" in str(exc)
        return

    assert captured.input_spec.dims() == {"batch": Dim("batch", 1, 8)}


def test_capture_rejects_two_ranges_for_one_dim_name(entry):
    with pytest.raises(CaptureError) as info:
        entry(XAndMask(), (torch.randn(2, 4), torch.randn(2, 3)),
              dynamic={"x": {0: kiln.Dim("batch", 1, 16)}, "mask": {0: kiln.Dim("batch", 1, 8)}})

    assert "batch" in first_line(info.value)


# ---------------------------------------------------------------------------------------------
# Capture errors name the culprit


def test_data_dependent_branch_error_names_the_source_line_and_suggests_where_or_cond(entry):
    with pytest.raises(CaptureError) as info:
        entry(DataDependentBranch(), (torch.randn(2, 3),))

    message = str(info.value)
    assert f"{Path(__file__).name}:{BRANCH_LINE}" in info.value.where
    assert "if x.sum() > 0" in info.value.where
    assert "torch.where" in info.value.fix and "torch.cond" in info.value.fix
    assert message.index(info.value.where) < message.index("Fix:")


@pytest.mark.parametrize("model", [ReturnsString(), ReturnsTensorAndInt()], ids=["string", "tensor-and-int"])
def test_capture_rejects_a_model_returning_non_tensors(entry, model):
    with pytest.raises(CaptureError) as info:
        entry(model, (torch.randn(2, 3),))

    assert "output" in first_line(info.value)
    assert "tensor" in info.value.fix


@pytest.mark.parametrize("model, culprit", [(ReturnsString(), "str"), (ReturnsTensorAndInt(), "int")],
                         ids=["string", "tensor-and-int"])
def test_non_tensor_output_error_names_the_type_returned(model, culprit):
    with pytest.raises(CaptureError) as info:
        capture(model, (torch.randn(2, 3),))

    assert re.search(rf"\b{culprit}\b", first_line(info.value))


def test_capture_rejects_a_model_that_is_not_a_module(entry):
    def plain_function(x):
        return x * 2

    with pytest.raises(CaptureError) as info:
        entry(plain_function, (torch.randn(2, 3),))

    assert "model" in info.value.where
    assert "function" in info.value.what
    assert "Module" in info.value.fix


@pytest.mark.parametrize("example_inputs", [None, (), {}], ids=["none", "empty-tuple", "empty-dict"])
def test_capture_rejects_a_call_without_example_inputs(entry, example_inputs):
    with pytest.raises(CaptureError) as info:
        entry(nn.Linear(3, 3), example_inputs)

    assert info.value.where == "example_inputs"


def test_optimize_without_example_inputs_is_a_capture_error():
    with pytest.raises(CaptureError, match="example_inputs"):
        kiln.optimize(nn.Linear(3, 3), "cpu-x86", backend="onnxruntime")


def test_capture_rejects_example_inputs_of_unsupported_type(entry):
    with pytest.raises(CaptureError) as info:
        entry(nn.Linear(3, 3), "x")

    assert info.value.where == "example_inputs"
    assert "str" in info.value.what


def test_dynamic_naming_an_unknown_input_is_an_error_listing_the_known_ones(entry):
    with pytest.raises(CaptureError) as info:
        entry(QueryKey(), (torch.randn(2, 4), torch.randn(2, 4)), dynamic={"querry": {0: "batch"}})

    assert "querry" in first_line(info.value)
    assert "query" in info.value.fix and "key" in info.value.fix


@pytest.mark.parametrize("axis", [2, -3])
def test_dynamic_axis_out_of_range_is_an_error_naming_input_and_axis(entry, axis):
    with pytest.raises(CaptureError) as info:
        entry(nn.Linear(4, 3), (torch.randn(2, 4),), dynamic={"input": {axis: "batch"}})

    assert "input" in info.value.where
    assert str(axis) in info.value.what
    assert "0..1" in info.value.fix


def test_dynamic_axis_given_neither_name_nor_dim_is_an_error(entry):
    with pytest.raises(CaptureError) as info:
        entry(nn.Linear(4, 3), (torch.randn(2, 4),), dynamic={"input": {0: 5}})

    assert "input" in info.value.where
    assert "kiln.Dim" in info.value.fix


def test_example_size_outside_the_dim_range_is_an_error_naming_input_and_dim(entry):
    with pytest.raises(CaptureError) as info:
        entry(nn.Linear(4, 3), (torch.randn(2, 4),), dynamic={"input": {0: kiln.Dim("batch", min=4, max=8)}})

    assert "input" in info.value.where
    assert "batch" in info.value.what and "2" in info.value.what


def test_dim_marked_dynamic_that_the_model_specializes_is_a_capture_error(entry):
    with pytest.raises(CaptureError) as info:
        entry(ViewsBatchAsTwo(), (torch.randn(2, 3),), dynamic={"x": {0: "batch"}})

    assert "batch" in first_line(info.value)
    assert "dynamic" in info.value.fix


def test_specialization_error_keeps_torchs_explanation_and_suggested_fix():
    with pytest.raises(CaptureError) as info:
        capture(ViewsBatchAsTwo(), (torch.randn(2, 3),), dynamic={"x": {0: "batch"}})

    message = str(info.value)
    assert "batch" in message and "Suggested fixes:" in message
    assert "L['tensors']" not in message  # torch's name for the input is replaced by the user's


def test_shared_dim_with_disagreeing_example_sizes_is_an_error_naming_inputs_and_dim():
    with pytest.raises(CaptureError) as info:
        capture(Sums(), (torch.randn(2, 4), torch.randn(3, 4)), dynamic={"x": {0: "batch"}, "y": {0: "batch"}})

    line = first_line(info.value)
    assert "batch" in line and re.search(r"\by\b", line) and "L['tensors']" not in str(info.value)


def test_dim_with_equal_min_and_max_is_refused_where_it_is_written():
    with pytest.raises(ValueError, match="min < max"):
        kiln.Dim("b", 2, 2)


def test_dim_name_that_is_not_an_identifier_is_a_capture_error():
    try:
        capture(nn.Linear(4, 3), (torch.randn(2, 4),), dynamic={"input": {0: "batch size"}})
    except CaptureError as exc:
        assert "batch size" in str(exc)
    except Exception as exc:
        raise AssertionError(f"bare {type(exc).__name__} escaped capture: {exc}") from exc
    else:
        raise AssertionError("an invalid dim name was accepted")


@pytest.mark.parametrize("axes", [[0], "batch"], ids=["list-of-axes", "bare-name"])
def test_dynamic_entry_that_is_not_a_mapping_is_a_capture_error_naming_the_input(axes):
    try:
        capture(nn.Linear(4, 3), (torch.randn(2, 4),), dynamic={"input": axes})
    except CaptureError as exc:
        assert "input" in exc.where
    except Exception as exc:
        raise AssertionError(f"bare {type(exc).__name__} escaped capture: {exc}") from exc
    else:
        raise AssertionError("a malformed dynamic entry was accepted")


class _Counter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("count", torch.zeros(1))
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        self.count += 1
        return self.fc(x) + self.count


def test_a_model_that_writes_its_own_buffers_is_refused_naming_the_buffer_and_line_with_its_state_untouched():
    model = _Counter()
    with pytest.raises(kiln.CaptureError) as info:
        kiln.optimize(model, "cpu-x86", torch.randn(2, 4), backend="onnxruntime", cache=False)
    assert "updates 'count' on every call" in info.value.what
    assert "test_capture.py" in info.value.where and "in forward" in info.value.where
    assert float(model.count) == 0.0  # neither capture nor a verification call advanced it


def test_optimize_leaves_each_module_in_the_train_or_eval_mode_it_came_in():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 4)).train()
    model[2].eval()
    compiled = kiln.optimize(model, "cpu-x86", torch.randn(2, 4), backend="onnxruntime", cache=False)
    assert [m.training for m in model.modules()] == [True, True, True, False]
    model.eval()
    with torch.no_grad():  # the compiled model is the inference graph: dropout off
        torch.testing.assert_close(compiled(torch.ones(2, 4)), model(torch.ones(2, 4)))


def test_a_transformers_model_asking_for_a_kv_cache_is_captured_without_it_and_the_report_says_so():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model, ids = transformers.LlamaModel(config).eval(), torch.randint(0, 100, (1, 8))
    assert model.config.use_cache
    compiled = kiln.optimize(model, "cpu-x86", (ids,), backend="onnxruntime", precision="fp32", cache=False)
    assert any("captured it with config.use_cache=False" in note for note in compiled.report.notes)
    assert model.config.use_cache  # the user's config as it was
    with torch.no_grad():
        want = model(ids, use_cache=False).last_hidden_state
    torch.testing.assert_close(compiled(ids).last_hidden_state, want, rtol=TOL.rtol, atol=TOL.atol)


def test_a_cache_object_in_the_outputs_of_a_model_without_the_flag_is_refused_with_use_cache_false_as_the_fix():
    cache_utils = pytest.importorskip("transformers.cache_utils")

    class ReturnsCache(nn.Module):
        def forward(self, x):
            return x * 2, cache_utils.DynamicCache()

    with pytest.raises(kiln.CaptureError) as info:
        kiln.optimize(ReturnsCache().eval(), "cpu-x86", torch.randn(2, 4), backend="onnxruntime", cache=False)
    assert "use_cache=False" in info.value.fix
