"""`kiln export-triton` / kiln.serving.triton_repository: the model repository Triton documents,
every config.pbtxt parsed with Triton's own schema (tritonclient's model_config_pb2), and each
native engine file loaded with the runtime that Triton's backend for it uses.

A real Triton server runs the python-backend repository in test_triton_server.py; the native
backends (onnxruntime, openvino, tensorrt_plan) are not in the server this suite can start,
so they are checked here by schema and by loading their engine files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

import kiln
from kiln.cli import main
from kiln.errors import ServingError
from kiln.serving import triton_repository
from kiln.serving.triton import TensorConfig, check_config, model_config
from kiln.verify import TOLERANCE
from serving import serving_models
from serving.serving_models import example

FP32 = TOLERANCE[kiln.Precision.FP32]


def parsed(model_dir) -> model_config_pb2.ModelConfig:
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def test_an_onnxruntime_artifact_goes_to_the_native_backend_with_its_batching_and_tensors(ort_artifact, tmp_path):
    export = triton_repository(ort_artifact, tmp_path, name="masked", max_batch=16, max_queue_delay_us=2000, instances=2)
    config = parsed(export.model_dir)
    assert (export.backend, config.name, config.backend, config.max_batch_size) == ("onnxruntime", "masked", "onnxruntime", 16)
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert [(g.count, g.kind) for g in config.instance_group] == [(2, model_config_pb2.ModelInstanceGroup.KIND_CPU)]
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("x", model_config_pb2.TYPE_FP32, [-1, 8]), ("mask", model_config_pb2.TYPE_FP32, [-1])]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("output.tokens", model_config_pb2.TYPE_FP32, [-1, 3]), ("output.pooled", model_config_pb2.TYPE_FP32, [3])]
    assert config.parameters["inter_op_thread_count"].string_value == "1"
    assert sorted(p.name for p in (export.model_dir / "1").iterdir()) == ["model.onnx"]


def test_the_onnx_file_triton_loads_takes_and_gives_the_configs_names_and_the_artifacts_answers(ort_artifact, tmp_path):
    import onnxruntime

    export = triton_repository(ort_artifact, tmp_path)
    config = parsed(export.model_dir)
    session = onnxruntime.InferenceSession(str(export.model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [i.name for i in config.input]
    assert [o.name for o in session.get_outputs()] == [o.name for o in config.output]
    x, mask = example(3, seq=6)
    got = session.run(None, {"x": x.numpy(), "mask": mask.numpy()})
    want = kiln.load(ort_artifact)(x, mask)
    np.testing.assert_allclose(got[0], want["tokens"].numpy(), rtol=FP32.rtol, atol=FP32.atol)
    np.testing.assert_allclose(got[1], want["pooled"].numpy(), rtol=FP32.rtol, atol=FP32.atol)


def test_an_openvino_artifact_goes_to_the_native_backend_and_its_ir_loads_with_the_configs_names(openvino_artifact, tmp_path):
    import openvino

    export = triton_repository(openvino_artifact, tmp_path, name="masked_ov")
    config = parsed(export.model_dir)
    assert (export.backend, config.backend) == ("openvino", "openvino")
    assert sorted(p.name for p in (export.model_dir / "1").iterdir()) == ["model.bin", "model.xml"]
    assert config.parameters["PERFORMANCE_HINT"].string_value == "LATENCY"
    model = openvino.Core().read_model(str(export.model_dir / "1" / "model.xml"))
    assert sorted(n for i in model.inputs for n in i.get_names()) == sorted(i.name for i in config.input)
    assert {o.name for o in config.output} <= {n for o in model.outputs for n in o.get_names()}
    compiled = openvino.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    x, mask = example(2, seq=4)
    result = compiled({"x": x.numpy(), "mask": mask.numpy()})
    want = kiln.load(openvino_artifact)(x, mask)
    np.testing.assert_allclose(result["output.pooled"], want["pooled"].numpy(), rtol=FP32.rtol, atol=FP32.atol)


def test_the_python_backend_gets_the_artifact_and_a_model_py_that_runs_it_through_kiln(ort_artifact, tmp_path):
    export = triton_repository(ort_artifact, tmp_path, name="masked_py", backend="python", instances=2)
    config = parsed(export.model_dir)
    assert (export.backend, config.backend) == ("python", "python")
    assert sorted(p.name for p in (export.model_dir / "1").iterdir()) == ["model.kiln", "model.py"]
    assert "from kiln.serving.triton_python import TritonPythonModel" in (export.model_dir / "1" / "model.py").read_text()
    assert config.parameters["kiln_threads"].string_value.isdigit()
    assert kiln.artifact.digest(export.model_dir / "1" / "model.kiln") == kiln.artifact.digest(ort_artifact)


def test_a_tensorrt_config_names_the_plan_platform_and_gpu_instances():
    text = model_config("net", "tensorrt", 8, [TensorConfig("x", torch.float16, (3, -1, -1))],
                        [TensorConfig("logits", torch.float32, (10,))], 500, 1, True, {})
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert (config.platform, config.backend) == ("tensorrt_plan", "")
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert list(config.input[0].dims) == [3, -1, -1] and config.input[0].data_type == model_config_pb2.TYPE_FP16


def test_a_batch_only_tensor_is_declared_as_one_element_reshaped_to_none():
    text = model_config("m", "python", 4, [TensorConfig("ids", torch.int64, ())], [TensorConfig("score", torch.float32, ())],
                        0, 1, False, {})
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert list(config.input[0].dims) == [1] and list(config.input[0].reshape.shape) == []
    assert config.input[0].HasField("reshape") and config.output[0].HasField("reshape")


def test_a_config_triton_would_reject_is_refused_as_a_kiln_bug():
    with pytest.raises(ServingError, match="not a valid Triton ModelConfig") as caught:
        check_config('name: "m"\nmax_batch_sise: 4\n', where="m/config.pbtxt")
    assert "kiln bug" in caught.value.fix
    with pytest.raises(ServingError, match="not a valid Triton ModelConfig"):
        check_config('name: "m"\ninstance_group [ { kind: KIND_TPU } ]\n', where="m/config.pbtxt")


def test_an_artifact_with_a_static_batch_is_refused_naming_the_input_and_the_dynamic(tmp_path):
    static = serving_models.compile_masked(tmp_path / "static.kiln", "onnxruntime", dynamic=None)
    with pytest.raises(ServingError) as caught:
        triton_repository(static, tmp_path / "repo")
    assert "input 'x' has a static batch of 2 on axis 0" in caught.value.what
    assert caught.value.fix == "compile again with dynamic={'x': {0: 'batch'}, 'mask': {0: 'batch'}}"
    assert not (tmp_path / "repo").exists()


def test_a_max_batch_outside_the_compiled_range_is_refused(ort_artifact, tmp_path):
    with pytest.raises(ServingError, match=r"max batch 64 lies outside the compiled range batch\[1..32\]"):
        triton_repository(ort_artifact, tmp_path, max_batch=64)


def test_the_default_max_batch_is_the_compiled_range(ort_artifact, tmp_path):
    assert triton_repository(ort_artifact, tmp_path).max_batch == 32


def test_a_model_is_replaced_only_with_overwrite_and_a_folder_kiln_did_not_write_never(ort_artifact, tmp_path):
    triton_repository(ort_artifact, tmp_path, name="m")
    with pytest.raises(ServingError, match="already in the repository"):
        triton_repository(ort_artifact, tmp_path, name="m")
    assert triton_repository(ort_artifact, tmp_path, name="m", backend="python", overwrite=True).backend == "python"
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("keep")
    with pytest.raises(ServingError, match="kiln did not write it"):
        triton_repository(ort_artifact, tmp_path, name="theirs", overwrite=True)
    assert (tmp_path / "theirs" / "notes.txt").read_text() == "keep"


def test_the_readme_lists_per_model_what_was_not_carried_over(ort_artifact, openvino_artifact, tmp_path):
    ort = triton_repository(ort_artifact, tmp_path, name="a")
    ov = triton_repository(openvino_artifact, tmp_path, name="b")
    readme = (tmp_path / "README.md").read_text()
    assert "## a\n" in readme and "## b\n" in readme
    for line in ort.not_carried + ov.not_carried:
        assert f"- {line}\n" in readme
    assert any("cannot disable single optimizers" in line for line in ort.not_carried) or \
        not kiln.artifact.describe(ort_artifact).manifest["engines"][0]["meta"].get("disabled_optimizers")
    triton_repository(ort_artifact, tmp_path, name="a", backend="python", overwrite=True)
    readme = (tmp_path / "README.md").read_text()
    assert readme.count("## a\n") == 1 and "served by Triton's `python` backend" in readme


def test_a_model_with_several_partitions_goes_to_the_python_backend_and_refuses_a_native_one():
    from kiln.serving.triton import _triton_backend

    two = {"plan": {"partitions": [{"backend": "onnxruntime"}, {"backend": "eager"}]}}
    assert _triton_backend(two, "auto") == "python"
    with pytest.raises(ServingError, match="onnxruntime \\+ eager"):
        _triton_backend(two, "onnxruntime")
    assert _triton_backend({"plan": {"partitions": [{"backend": "inductor"}]}}, "auto") == "python"


def test_the_cli_writes_the_repository_and_prints_what_was_not_carried_over(ort_artifact, tmp_path, capsys):
    rc = main(["export-triton", str(ort_artifact), "--repository", str(tmp_path), "--name", "m", "--max-batch", "8",
               "--max-queue-delay-us", "500", "--instances", "2"])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"wrote {tmp_path / 'm'} (Triton backend onnxruntime, max_batch_size 8)" in out
    record = json.loads((tmp_path / "m" / "kiln-export.json").read_text())
    for line in record["not_carried"]:
        assert f"  - {line}" in out
    config = parsed(tmp_path / "m")
    assert (config.max_batch_size, config.dynamic_batching.max_queue_delay_microseconds, config.instance_group[0].count) == (8, 500, 2)


def test_the_cli_refuses_a_static_batch_in_one_line(tmp_path, capsys):
    static = serving_models.compile_masked(tmp_path / "static.kiln", "onnxruntime", dynamic=None)
    assert main(["export-triton", str(static), "--repository", str(tmp_path / "repo")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("kiln: error:")
    assert "input 'x' has a static batch of 2" in err and "dynamic={'x': {0: 'batch'}" in err


def test_a_missing_serving_extra_is_named_with_its_install_hint():
    from kiln.serving import require

    with pytest.raises(ServingError) as caught:
        require("kiln_no_such_module.grpc", "checking a Triton model config")
    assert "needs kiln_no_such_module" in caught.value.what
    assert caught.value.fix.startswith("pip install 'kiln[serve]'")


class Total(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum()  # one number for the whole batch: no row belongs to any one request


def test_an_output_without_the_batch_on_axis_0_is_refused_by_export_and_by_batching(tmp_path):
    from kiln.serving import run_batched

    path = kiln.optimize(Total(), "cpu-x86", (torch.randn(2, 4),), dynamic={"x": {0: "batch"}},
                         backend="onnxruntime").save(tmp_path / "total.kiln")
    with pytest.raises(ServingError, match="does not keep the batch on axis 0"):
        triton_repository(path, tmp_path / "repo")
    results = run_batched(kiln.load(path), [(torch.randn(1, 4),), (torch.randn(2, 4),)], max_rows=8)
    assert all(isinstance(r, ServingError) and "not the 3 rows of the batch on axis 0" in str(r) for r in results)
