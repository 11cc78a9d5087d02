"""Triton Inference Server model repositories from kiln artifacts.

    repository/
      README.md                 what each model's export could not carry over to Triton
      NAME/
        config.pbtxt            checked against Triton's own ModelConfig schema before it is written
        kiln-export.json        what kiln wrote here (so a later export may replace it)
        1/
          model.onnx | model.xml + model.bin | model.plan      a native backend's engine file, or
          model.kiln + model.py                                 the python backend: kiln runs the artifact

A single-partition ONNX Runtime, OpenVINO or TensorRT artifact goes to Triton's native backend
for that runtime; anything else (Inductor, several partitions, an eager fallback) to the python
backend, whose generated model.py loads the artifact with kiln once per instance and batches over
the requests Triton hands it (kiln.serving.triton_python).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kiln import artifact
from kiln.artifact.manifest import sha256_file
from kiln.errors import KilnError, ServingError
from kiln.frontend.input_spec import random_inputs
from kiln.host import usable_cores
from kiln.serving import artifact_name, require
from kiln.serving.batching import BatchLayout, batch_layout, flat_output_names
from kiln.types import Dim, InputSpec

# kiln backend -> (Triton config line choosing the backend, model file name in the version folder)
NATIVE = {
    "onnxruntime": ('backend: "onnxruntime"', "model.onnx"),
    "openvino": ('backend: "openvino"', "model.xml"),
    "tensorrt": ('platform: "tensorrt_plan"', "model.plan"),
}
TRITON_DTYPES = {
    torch.float32: "TYPE_FP32", torch.float16: "TYPE_FP16", torch.bfloat16: "TYPE_BF16", torch.float64: "TYPE_FP64",
    torch.int64: "TYPE_INT64", torch.int32: "TYPE_INT32", torch.int16: "TYPE_INT16", torch.int8: "TYPE_INT8",
    torch.uint8: "TYPE_UINT8", torch.bool: "TYPE_BOOL",
}
PYTHON_MODEL = '''"""Triton python-backend model written by `kiln export-triton` for {model!r} (artifact digest {digest}).

Triton's python backend imports this file in its own interpreter, which must be able to import
kiln and the runtimes the artifact uses (kiln/serving/triton_python.py does the work: it loads
model.kiln beside this file once per instance and runs each batch of requests through it)."""

from kiln.serving.triton_python import TritonPythonModel  # noqa: F401  (the class Triton looks for)
'''
EXPORT_RECORD = "kiln-export.json"
DEFAULT_MAX_BATCH = 64


@dataclass(frozen=True)
class TensorConfig:
    """One input or output as Triton's config states it: dims without the batch axis, -1 dynamic."""

    name: str
    dtype: torch.dtype
    dims: tuple[int, ...]


@dataclass
class TritonExport:
    """What `triton_repository` wrote, and what it could not carry over to Triton."""

    model_dir: Path
    backend: str  # the Triton backend: onnxruntime | openvino | tensorrt | python
    max_batch: int
    config_text: str
    not_carried: list[str] = field(default_factory=list)


def triton_repository(path: str | Path, repository: str | Path, name: str | None = None, max_batch: int | None = None,
                      max_queue_delay_us: int = 1000, instances: int = 1, backend: str = "auto",
                      overwrite: bool = False) -> TritonExport:
    """Write the artifact at `path` into the Triton model repository `repository` as model
    `name` (default: the artifact's file name). backend="python" forces the python backend (for
    a server without the native one); "auto" picks the native backend where one fits."""
    path = Path(path).expanduser()
    description = artifact.describe(path)
    manifest = description.manifest
    spec = InputSpec.from_dict(manifest["input_spec"])
    layout = batch_layout(spec, where=str(path))
    name = name or artifact_name(path)
    max_batch = _checked_max_batch(max_batch, layout, path)
    if instances < 1 or max_queue_delay_us < 0:
        raise ServingError(f"instances={instances}, max_queue_delay_us={max_queue_delay_us}", where="triton_repository",
                           fix="give at least 1 instance and a delay of 0 or more microseconds")
    kind = _triton_backend(manifest, backend)
    partitions = manifest["plan"]["partitions"]
    threads = max(1, usable_cores() // instances)
    inputs = [TensorConfig(t.name, t.dtype, tuple(-1 if isinstance(d, Dim) else d for d in t.shape[1:])) for t in spec.tensors]
    outputs = probe_outputs(path, spec, layout)
    gpu = any(p.get("device_kind") == "gpu" for p in partitions) or kind == "tensorrt"
    parameters, not_carried = _carried_settings(kind, manifest, threads, spec)
    text = model_config(name, kind, max_batch, inputs, outputs, max_queue_delay_us, instances, gpu, parameters)
    model_dir = Path(repository).expanduser() / name
    _prepare(model_dir, overwrite)
    version = model_dir / "1"
    version.mkdir(parents=True)
    if kind == "python":
        _copy_artifact(path, version / "model.kiln")
        (version / "model.py").write_text(PYTHON_MODEL.format(model=name, digest=description.digest[:16]))
    else:
        _copy_engine_files(path, manifest, version, NATIVE[kind][1])
    (model_dir / "config.pbtxt").write_text(text)
    (model_dir / EXPORT_RECORD).write_text(json.dumps({"artifact": str(path), "digest": description.digest, "backend": kind,
                                                       "not_carried": not_carried}, indent=1))
    _write_readme(Path(repository).expanduser(), name, kind, path, not_carried)
    return TritonExport(model_dir, kind, max_batch, text, not_carried)


def model_config(name: str, backend: str, max_batch: int, inputs: list[TensorConfig], outputs: list[TensorConfig],
                 max_queue_delay_us: int, instances: int, gpu: bool, parameters: dict[str, str]) -> str:
    """config.pbtxt text, refused with ServingError unless Triton's ModelConfig schema parses it."""
    backend_line = NATIVE[backend][0] if backend in NATIVE else f'backend: "{backend}"'
    lines = [f'name: "{name}"', backend_line, f"max_batch_size: {max_batch}"]
    for section, tensors in (("input", inputs), ("output", outputs)):
        entries = ",\n".join(f'  {{\n    name: "{t.name}"\n    data_type: {_triton_dtype(t)}\n    dims: [ {", ".join(map(str, t.dims))} ]\n  }}'
                             .replace("dims: [  ]", "dims: [ 1 ]\n    reshape: { shape: [ ] }") for t in tensors)
        lines.append(f"{section} [\n{entries}\n]")
    lines.append(f"dynamic_batching {{\n  max_queue_delay_microseconds: {max_queue_delay_us}\n}}")
    lines.append(f"instance_group [\n  {{\n    count: {instances}\n    kind: {'KIND_GPU' if gpu else 'KIND_CPU'}\n  }}\n]")
    for key, value in parameters.items():
        lines.append(f'parameters {{\n  key: "{key}"\n  value: {{ string_value: "{value}" }}\n}}')
    text = "\n".join(lines) + "\n"
    check_config(text, where=f"{name}/config.pbtxt")
    return text


def check_config(text: str, where: str):
    """Parse config text with Triton's own schema (tritonclient's model_config_pb2); a field
    Triton would reject is a kiln bug, reported as ServingError."""
    model_config_pb2 = require("tritonclient.grpc.model_config_pb2", "checking a Triton model config")
    text_format = require("google.protobuf.text_format", "checking a Triton model config")
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise ServingError(f"the generated config.pbtxt is not a valid Triton ModelConfig: {exc}", where=where,
                           fix="this is a kiln bug; please report it with the artifact's `kiln inspect` output") from None


def probe_outputs(path: Path, spec: InputSpec, layout: BatchLayout) -> list[TensorConfig]:
    """Each flat output's name, dtype and per-row dims, read by running the artifact on two
    draws whose dynamic sizes all differ: an axis that changed with them is dynamic (-1)."""
    from kiln.runtime import load

    try:
        compiled = load(path)
    except KilnError as exc:
        raise ServingError(f"the artifact cannot run here, and its outputs' shapes are read by running it: {exc.what}",
                           where=str(path), fix="export on a machine where `kiln run` runs this artifact") from exc
    draws = []
    for offset in (0, 1):
        sizes = {d.name: min(d.max, max(d.min, 1 if d.name == layout.dim.name else 3) + offset) for d in spec.dims().values()}
        outs = compiled.run_flat(random_inputs(spec, seed=offset, sizes=sizes))
        draws.append((sizes[layout.dim.name], outs))
    names = flat_output_names(compiled.plan)
    configs = []
    for position, name in enumerate(names):
        (rows_a, a), (rows_b, b) = ((rows, outs[position]) for rows, outs in draws)
        if a.dim() == 0 or a.shape[0] != rows_a or b.shape[0] != rows_b:
            raise ServingError(f"output {name!r} has shape {tuple(a.shape)} for a batch of {rows_a}: it does not keep the batch on axis 0",
                               where=str(path), fix="serve a model whose every output has the batch as its first axis")
        if a.dim() != b.dim():
            raise ServingError(f"output {name!r} changes rank with the input sizes", where=str(path),
                               fix="serve a model whose outputs have a fixed rank")
        configs.append(TensorConfig(name, a.dtype, tuple(x if x == y else -1 for x, y in zip(a.shape[1:], b.shape[1:]))))
    return configs


def _triton_dtype(tensor: TensorConfig) -> str:
    if tensor.dtype not in TRITON_DTYPES:
        raise ServingError(f"{tensor.name!r} has dtype {tensor.dtype}, which Triton has no type for", where=tensor.name,
                           fix="serve a model whose inputs and outputs are plain numeric or bool tensors")
    return TRITON_DTYPES[tensor.dtype]


def _triton_backend(manifest: dict, asked: str) -> str:
    partitions = manifest["plan"]["partitions"]
    native = partitions[0]["backend"] if len(partitions) == 1 and partitions[0]["backend"] in NATIVE else None
    if asked == "auto":
        return native or "python"
    if asked == "python" or asked == native:
        return asked
    found = " + ".join(p["backend"] for p in partitions)
    raise ServingError(f"backend {asked!r} cannot serve this artifact (its partitions run on {found})", where="backend",
                       fix=f"use backend='auto' or 'python'{f' or {native!r}' if native else ''}")


def _checked_max_batch(max_batch: int | None, layout: BatchLayout, path: Path) -> int:
    if max_batch is None:
        return min(DEFAULT_MAX_BATCH, layout.max_rows)
    if not 1 <= max_batch <= layout.max_rows:
        raise ServingError(f"max batch {max_batch} lies outside the compiled range {layout.dim.name}[{layout.dim.min}..{layout.dim.max}]",
                           where=str(path), fix=f"give a max batch from 1 to {layout.max_rows}, or compile with a wider batch range")
    return max_batch


def _carried_settings(kind: str, manifest: dict, threads: int, spec: InputSpec) -> tuple[dict[str, str], list[str]]:
    """The execution settings kiln chose, as the backend's config parameters, and what cannot
    be carried over (one line each)."""
    meta = manifest["engines"][0].get("meta", {}) if manifest["engines"] else {}
    parameters: dict[str, str] = {}
    lost = ["the model's output structure: Triton serves the flat outputs by name "
            f"({', '.join(manifest['plan']['output_names'])})"]
    if kind == "python":
        parameters["kiln_threads"] = str(threads)
        return parameters, lost
    lost.append("kiln's per-call input checks (Triton checks dtypes and ranks from config.pbtxt, "
                "not the ranges of dynamic dims or of values)")
    checked = [t.name for t in spec.tensors if t.index_range is not None]
    if checked:
        lost.append(f"the index range check of {', '.join(checked)}: out-of-range ids reach the engine unchecked")
    if kind == "onnxruntime":
        parameters.update({"intra_op_thread_count": str(threads), "inter_op_thread_count": "1"})
        if meta.get("disabled_optimizers"):
            lost.append(f"ONNX Runtime optimizers kiln turned off ({', '.join(meta['disabled_optimizers'])}): "
                        "Triton's onnxruntime backend cannot disable single optimizers")
        lost.append("ONNX Runtime's intra-op spin time kiln sets (session.intra_op.spin_duration_us)")
    elif kind == "openvino":
        # kiln's OpenVINO engine compiles with the LATENCY hint (kiln/backends/openvino.py)
        parameters.update({"INFERENCE_NUM_THREADS": str(threads), "PERFORMANCE_HINT": "LATENCY"})
        used = str(meta.get("inference_precision", ""))
        if used == "bf16":
            parameters["HINT_BF16"] = "true"
        else:
            lost.append(f"OpenVINO inference precision {used or 'unknown'} as verified by kiln: Triton's openvino backend "
                        "exposes only HINT_BF16, so the server's default precision applies")
    elif kind == "tensorrt":
        built = meta.get("built_with", {})
        lost.append(f"the plan runs only where it was built ({built.get('gpu', 'the build GPU')}, TensorRT "
                    f"{built.get('tensorrt', '?')}): Triton must run the same TensorRT on the same GPU model")
    return parameters, lost


def _prepare(model_dir: Path, overwrite: bool) -> None:
    if not os.path.lexists(model_dir):
        return
    if not (model_dir / EXPORT_RECORD).is_file():
        raise ServingError("a folder of that name exists and kiln did not write it", where=str(model_dir),
                           fix="choose another --name or repository, or move the folder away")
    if not overwrite:
        raise ServingError("this model is already in the repository", where=str(model_dir),
                           fix="pass overwrite=True (--overwrite) to replace it, or choose another --name")
    shutil.rmtree(model_dir)


def _copy_artifact(path: Path, target: Path) -> None:
    if path.is_dir():
        shutil.copytree(path, target)
    else:
        shutil.copyfile(path, target)


def _copy_engine_files(path: Path, manifest: dict, version: Path, model_file: str) -> None:
    """The single engine's files, the main one renamed to what Triton's backend loads, each
    checked against the manifest's sha256 after copying."""
    files = manifest["engines"][0]["files"]
    main_suffix = Path(model_file).suffix
    archive = None if path.is_dir() else zipfile.ZipFile(path)
    try:
        for item in files:
            source = Path(item["path"])
            if source.suffix == main_suffix:
                target = version / model_file
            elif source.suffix == ".bin" and main_suffix == ".xml":
                target = version / "model.bin"  # OpenVINO reads the weights beside model.xml by its stem
            else:
                target = version / source.name  # ONNX external data keeps the name the model refers to
            if archive is None:
                shutil.copyfile(path / item["path"], target)
            else:
                with archive.open(item["path"]) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
            if sha256_file(target) != item["sha256"]:
                raise ServingError(f"engine file {item['path']} does not match its checksum", where=str(path),
                                   fix="the artifact is corrupt or was tampered with; rebuild it")
    finally:
        if archive is not None:
            archive.close()


_SECTION = re.compile(r"<!-- kiln model (?P<name>[^ ]+) -->\n.*?<!-- end (?P=name) -->\n", re.S)


def _write_readme(repository: Path, name: str, kind: str, path: Path, not_carried: list[str]) -> None:
    """One section per model in the repository's README.md; a re-export replaces its own."""
    readme = repository / "README.md"
    head = ("# Triton model repository\n\nWritten by `kiln export-triton`. Each section says what one model's export "
            "could not carry over from the kiln artifact to Triton.\n\n")
    sections = {m.group("name"): m.group(0) for m in _SECTION.finditer(readme.read_text())} if readme.is_file() else {}
    body = "\n".join(f"- {line}" for line in not_carried) or "- nothing"
    sections[name] = (f"<!-- kiln model {name} -->\n## {name}\n\nFrom `{path.name}`, served by Triton's `{kind}` backend.\n\n"
                      f"Not carried over:\n{body}\n<!-- end {name} -->\n")
    readme.write_text(head + "\n".join(sections[key] for key in sorted(sections)))
