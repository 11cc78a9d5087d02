"""Engines in torch's .pt2 archive format are read as zips, against an allow-list of what kiln
writes, before torch opens them: nothing in an artifact is unpickled, exec()ed or eval()ed.

An eager engine (a torch.export program) is built from a small Linear model and put into an
artifact in place of its ONNX engine; an Inductor engine comes from a real AOTInductor build.
Each hostile test adds or edits one thing in the .pt2 and rewrites the manifest's checksums, so
that only the allow-list can catch it. Payloads create a marker file when they run: the tests
assert the refusal (an ArtifactError naming the member) and that the marker never appeared.
"""

from __future__ import annotations

import hashlib
import io
import json
import pathlib
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

import kiln
from kiln.backends.base import BackendSettings
from kiln.backends.eager import EagerBackend
from kiln.frontend.capture import capture
from kiln.hardware_profiles import load as load_profile
from kiln.ir import PartitionGraph
from kiln.verify import TOLERANCE

FP32 = TOLERANCE[kiln.Precision.FP32]
X = torch.randn(2, 8, generator=torch.Generator().manual_seed(5))


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)
        self.register_buffer("offset", torch.full((4,), 0.5), persistent=False)  # a constant, not a weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x)) + self.offset


def net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


class Touch:
    """Unpickling this creates `path`: proof that a pickle ran."""

    def __init__(self, path: Path):
        self.path = pathlib.Path(path)

    def __reduce__(self):
        return (pathlib.Path.touch, (self.path,))


def read_zip(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def with_engine(artifact: Path, target: Path, engine: bytes, backend: str | None = None) -> Path:
    """A copy of a one-partition zip artifact whose engine file is `engine` (a .pt2), with the
    manifest's sha256 and size updated to match, so every check before the allow-list passes."""
    files = read_zip(artifact.read_bytes())
    manifest = json.loads(files["manifest.json"])
    [item] = manifest["engines"][0]["files"]
    del files[item["path"]]
    item.update(path="engines/p0.pt2", sha256=hashlib.sha256(engine).hexdigest(), size=len(engine))
    files["engines/p0.pt2"] = engine
    if backend is not None:
        manifest["engines"][0]["backend"] = backend
        manifest["plan"]["partitions"][0]["backend"] = backend
    files["manifest.json"] = json.dumps(manifest).encode()
    target.write_bytes(zip_bytes(files))
    return target


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """An ONNX artifact of Net (the frame for the eager engine) and the eager .pt2's members."""
    root = tmp_path_factory.mktemp("pt2")
    model = net()
    artifact = kiln.optimize(model, "cpu-x86", (X,), backend="onnxruntime").save(root / "onnx.kiln")
    captured = capture(model, (X,))
    graph = PartitionGraph("p0", captured.gm, captured.input_spec.names, captured.output_names, captured.example_inputs, None)
    engine = EagerBackend().compile(graph, BackendSettings(load_profile("cpu-x86").primary, threads=1, workdir=root))
    engine.save(root, "p0")
    return {"artifact": artifact, "eager": read_zip((root / "p0.pt2").read_bytes())}


def eager_artifact(built, tmp_path: Path, edit=None) -> Path:
    members = dict(built["eager"])
    if edit is not None:
        edit(members)
    return with_engine(built["artifact"], tmp_path / "eager.kiln", zip_bytes(members), backend="eager")


def refused(path: Path, marker: Path | None, *words: str) -> str:
    with pytest.raises(kiln.ArtifactError) as info:
        kiln.load(path)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    if marker is not None:
        assert not marker.exists(), "the payload ran while the artifact was loaded"
    return message


def edit_json(members: dict[str, bytes], name: str, edit) -> None:
    data = json.loads(members[name])
    edit(data)
    members[name] = json.dumps(data).encode()


# ---------------------------------------------------------------- what kiln writes passes

def test_the_eager_engine_kiln_writes_holds_only_allow_listed_members(built):
    names = {name.partition("/")[2] for name in built["eager"]}
    assert {"models/model.json", "data/weights/model_weights_config.json", "data/constants/model_constants_config.json",
            "data/sample_inputs/model.pt", "archive_version"} <= names
    assert any(n.startswith("data/constants/tensor_") for n in names)  # the buffer is stored as raw bytes


def test_an_eager_engine_written_by_kiln_loads_and_runs(built, tmp_path):
    loaded = kiln.load(eager_artifact(built, tmp_path))
    assert loaded.backends == {"p0": "eager"}
    with torch.no_grad():
        want = net()(X)
    torch.testing.assert_close(loaded(X), want, rtol=FP32.rtol, atol=FP32.atol)


# ---------------------------------------------------------------- pickles

def test_an_eager_engine_with_a_legacy_pickled_weights_member_is_refused_before_it_is_unpickled(built, tmp_path):
    marker = tmp_path / "ran"
    path = eager_artifact(built, tmp_path, lambda m: m.update({"archive/data/weights/model.pt": pickle.dumps(Touch(marker))}))
    refused(path, marker, "data/weights/model.pt", "eager")


def test_an_eager_engine_whose_constants_config_points_at_a_pickled_member_is_refused_before_it_is_unpickled(built, tmp_path):
    marker = tmp_path / "ran"

    payload = pickle.dumps(Touch(marker))

    def point_at_payload(config):
        # an opaque-object constant with use_pickle false (and tensor metadata, as a raw tensor
        # has): torch pickle.loads every opaque_obj_ member whatever use_pickle says
        meta = dict(next(iter(config["config"].values()))["tensor_meta"])
        meta.update(dtype=1, sizes=[{"as_int": len(payload)}], strides=[{"as_int": 1}])  # uint8 bytes
        config["config"]["model.evil"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": False, "tensor_meta": meta}

    def edit(members):
        edit_json(members, "archive/data/constants/model_constants_config.json", point_at_payload)
        members["archive/data/constants/opaque_obj_0"] = payload

    refused(eager_artifact(built, tmp_path, edit), marker, "model_constants_config.json", "opaque_obj_0")


def test_an_eager_engine_whose_weights_config_says_use_pickle_is_refused(built, tmp_path):
    marker = tmp_path / "ran"

    def edit(members):
        config_name = "archive/data/weights/model_weights_config.json"
        config = json.loads(members[config_name])
        fqn, entry = next(iter(config["config"].items()))
        members[f"archive/data/weights/{entry['path_name']}"] = torch_saved(Touch(marker))
        entry["use_pickle"] = True
        members[config_name] = json.dumps(config).encode()

    refused(eager_artifact(built, tmp_path, edit), marker, "model_weights_config.json", "raw tensor bytes")


def torch_saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("member", ["archive/extra/notes.txt", "archive/data/weights/weight_0.pkl",
                                    "archive/models/other.json", "archive/data/aotinductor/model/x.so"])
def test_an_eager_engine_with_a_member_kiln_never_writes_is_refused_naming_it(built, tmp_path, member):
    path = eager_artifact(built, tmp_path, lambda m: m.update({member: b"{}"}))
    refused(path, None, repr(member.partition("/")[2]))


def test_an_eager_engine_with_pickled_sample_inputs_is_refused(built, tmp_path):
    marker = tmp_path / "ran"
    path = eager_artifact(built, tmp_path, lambda m: m.update({"archive/data/sample_inputs/model.pt": torch_saved(Touch(marker))}))
    refused(path, marker, "sample_inputs")


def test_an_eager_engine_with_members_outside_one_root_folder_is_refused(built, tmp_path):
    path = eager_artifact(built, tmp_path, lambda m: m.update({"other/data/weights/model.pt": b"x"}))
    refused(path, None, "other/data/weights/model.pt")


# ---------------------------------------------------------------- code in the program's JSON

def test_an_eager_engine_carrying_guards_code_is_refused(built, tmp_path):
    # Python source torch exec()s when it rebuilds the module (with sample inputs present, which
    # kiln also refuses); kiln never writes any, so it is refused whatever it says.
    marker = tmp_path / "ran"
    guard = f"__import__('pathlib').Path({str(marker)!r}).touch() is None"
    path = eager_artifact(built, tmp_path, lambda m: edit_json(m, "archive/models/model.json",
                                                              lambda p: p.update(guards_code=[guard])))
    refused(path, marker, "guards_code")


def test_an_eager_engine_whose_shape_expression_is_python_code_is_refused_before_sympy_evals_it(built, tmp_path):
    marker = tmp_path / "ran"
    expression = f"__import__('pathlib').Path({str(marker)!r}).touch()"

    def edit(program):
        values = program["graph_module"]["graph"]["tensor_values"]
        first = next(iter(values.values()))
        first["sizes"][0] = {"as_expr": {"expr_str": expression, "hint": {"as_int": 2}}}

    path = eager_artifact(built, tmp_path, lambda m: edit_json(m, "archive/models/model.json", edit))
    refused(path, marker, "not plain sympy")


def test_an_eager_engine_calling_something_that_is_not_an_operator_is_refused(built, tmp_path):
    def edit(program):
        program["graph_module"]["graph"]["nodes"][0]["target"] = "torch.os.system"

    path = eager_artifact(built, tmp_path, lambda m: edit_json(m, "archive/models/model.json", edit))
    refused(path, None, "'torch.os.system'", "not an operator")


# ---------------------------------------------------------------- AOTInductor packages

@pytest.fixture(scope="module")
def inductor(tmp_path_factory) -> Path:
    return kiln.optimize(net(), "cpu-x86", (X,), backend="inductor").save(tmp_path_factory.mktemp("inductor") / "ind.kiln")


def test_an_inductor_package_kiln_built_passes_the_allow_list_and_loads(inductor):
    loaded = kiln.load(inductor)
    assert loaded.backends == {"p0": "inductor"}
    with torch.no_grad():
        want = net()(X)
    torch.testing.assert_close(loaded(X), want, rtol=FP32.rtol, atol=FP32.atol)


def test_an_inductor_package_with_a_torch_export_program_smuggled_in_is_refused_before_torch_unpickles_it(built, inductor, tmp_path):
    # torch's package loader deserialises any models/*.json in the package, legacy pickled
    # weights included, before it opens the compiled model.
    marker = tmp_path / "ran"
    files = read_zip(inductor.read_bytes())
    [engine_name] = [n for n in files if n.endswith(".pt2")]
    package = read_zip(files[engine_name])
    root = next(iter(package)).partition("/")[0]
    for name, data in built["eager"].items():
        rest = name.partition("/")[2]
        if rest.startswith(("models/", "data/weights/", "data/constants/", "data/sample_inputs/")):
            package[f"{root}/{rest}"] = data
    package[f"{root}/data/weights/model.pt"] = pickle.dumps(Touch(marker))
    path = with_engine(inductor, tmp_path / "smuggled.kiln", zip_bytes(package))
    refused(path, marker, "Inductor engine holds member", "which kiln never writes")
