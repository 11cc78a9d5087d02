"""kiln's TensorRT code against NVIDIA's real compiled Python bindings, without a GPU.

The bindings wheels of the newest TensorRT 10 and 11 (`tensorrt-cu12-bindings`,
`tensorrt-cu13-bindings`, with their `tensorrt` shim packages) are downloaded once with pip into
a cache this test manages (~/.cache/kiln-test, or $KILN_TEST_CACHE), never into kiln's own
environment: kiln's other tests expect no `tensorrt` module there. The bindings link
libnvinfer, libnvonnxparser and libnvinfer_plugin, which are not on PyPI for this machine; stand-ins
compiled here from tests/backends/tensorrt_stub.c, whose factories return NULL, let
`import tensorrt` succeed with every enum, property and pybind11 signature real (`Builder()`
then raises). Each check runs in a subprocess with that cache on its path:
`kiln/backends/tensorrt_api.py` reads every TensorRT use in kiln's TensorRT modules and checks
it against the module there.

The runtime-only `tensorrt-lean-cu13` wheels ship a real library that loads on a CPU machine:
kiln's logger receives its messages. A Runtime made without a GPU crashes the process when it
is used or destroyed, so that test also runs in a subprocess, which leaves with os._exit.

Skipped only when pip cannot download the wheels (the reason is shown). Cold, the downloads
take seconds (the lean libraries are ~45 MB); warm, each check is one short subprocess.
Bump the versions below when NVIDIA releases new ones: that is how kiln learns of a removal.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from kiln.backends import tensorrt_api
from kiln.backends.tensorrt_config import PrecisionPlan, derive_build_config
from kiln.hardware_profiles import load
from kiln.types import Precision

ROOT = Path(__file__).resolve().parents[2]
API_SCRIPT = ROOT / "kiln" / "backends" / "tensorrt_api.py"
STUB = Path(__file__).with_name("tensorrt_stub.c")
CACHE = Path(os.environ.get("KILN_TEST_CACHE") or Path.home() / ".cache" / "kiln-test")
# major -> (shim package, version): the newest of each major on PyPI when last bumped
BINDINGS = {10: ("tensorrt-cu12", "10.16.1.11"), 11: ("tensorrt-cu13", "11.4.0.106")}
LEAN = ("tensorrt-lean-cu13", "11.4.0.106")
POLYGRAPHY = "polygraphy==0.53.6"
NATIVE = ("nvinfer", "nvonnxparser", "nvinfer_plugin")  # the libraries the bindings link, as lib<name>.so.<major>


def _run(command: list[str], what: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} took over {timeout} s")


def _install(name: str, wanted: list[str], stubs: int | None = None) -> Path:
    """CACHE/name with site/ (the `wanted` requirements' wheels installed, an sdist shim's
    package beside them) and, when `stubs` is a major, stubs/ with the stand-in native
    libraries. Built once, then reused."""
    folder = CACHE / name
    if (folder / "ready").is_file():
        return folder
    work = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    (work / "downloads").mkdir(parents=True)
    got = _run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
                "-d", str(work / "downloads"), *wanted], "pip download")
    if got.returncode != 0:
        shutil.rmtree(work, ignore_errors=True)
        pytest.skip(f"could not download {', '.join(wanted)} with pip: {got.stderr.strip()[-400:]}")
    wheels = sorted(str(p) for p in (work / "downloads").glob("*.whl"))
    got = _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", "--disable-pip-version-check",
                "--target", str(work / "site"), *wheels], "pip install --target")
    assert got.returncode == 0, got.stderr
    # TensorRT's shim is an sdist whose one package re-exports the bindings' module (`import tensorrt`)
    for sdist in (work / "downloads").glob("*.tar.gz"):
        _extract_package(sdist, work / "site")
    if stubs is not None:
        compiler = shutil.which("cc") or shutil.which("gcc")
        assert compiler, "the conformance test compiles stand-in libraries and needs a C compiler (cc or gcc)"
        (work / "stubs").mkdir()
        for name in NATIVE:
            target = work / "stubs" / f"lib{name}.so.{stubs}"
            got = _run([compiler, "-shared", "-fPIC", f"-Wl,-soname,{target.name}", "-o", str(target), str(STUB)], "cc")
            assert got.returncode == 0, got.stderr
    shutil.rmtree(work / "downloads")  # installed; the lean libraries' wheel alone is 45 MB
    (work / "ready").write_text(f"{' '.join(wanted)}\n")
    if (folder / "ready").is_file():  # another run finished first
        shutil.rmtree(work, ignore_errors=True)
    else:
        shutil.rmtree(folder, ignore_errors=True)
        work.rename(folder)
    return folder


def _extract_package(sdist: Path, site: Path) -> None:
    with tarfile.open(sdist) as archive:
        members = [m for m in archive.getmembers() if len(Path(m.name).parts) > 2 and m.name.endswith(".py")
                   and not Path(m.name).parts[1].endswith((".egg-info", "tests"))]
        for member in members:
            member.name = str(Path(*Path(member.name).parts[1:]))
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python 3.11.4+
        archive.extractall(site, members=members, **safe)


def _tensorrt(shim: str, version: str, packages: tuple[str, ...], stubs: int | None) -> Path:
    return _install(f"{shim}-{version}", [f"{shim}=={version}", *(f"{shim}-{p}=={version}" for p in packages)], stubs)


def _env(folder: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(folder / "site"), str(ROOT)])
    if (folder / "stubs").is_dir():
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(folder / "stubs"), env.get("LD_LIBRARY_PATH")]))
    return env


def _check(major: int, *arguments: str) -> dict:
    shim, version = BINDINGS[major]
    folder = _tensorrt(shim, version, ("bindings",), stubs=major)
    got = _run([sys.executable, str(API_SCRIPT), "--json", *arguments], f"the API check against TensorRT {version}",
               timeout=120, env=_env(folder))
    assert got.stdout.strip(), f"the API check printed nothing (exit {got.returncode}): {got.stderr[-2000:]}"
    result = json.loads(got.stdout.strip().splitlines()[-1])
    assert result["version"] == version
    return result


def _flags_kiln_derives(major: int) -> set[str]:
    """Every builder and network flag derive_build_config yields for the plan kinds kiln builds, on
    the GPU profiles and the Jetson DLA."""
    plans = [PrecisionPlan(Precision.TF32), PrecisionPlan(Precision.TF32, {"n": Precision.FP32}),
             PrecisionPlan(Precision.FP16, {"n": Precision.FP16}), PrecisionPlan(Precision.BF16, {"n": Precision.BF16}),
             PrecisionPlan(Precision.INT8, {"n": Precision.INT8}, explicit_quantization=True),
             PrecisionPlan(Precision.FP8, {"n": Precision.FP8}, explicit_quantization=True)]
    members = set()
    for profile, device in (("h100", "gpu"), ("a100", "gpu"), ("t4", "gpu"), ("jetson-orin", "gpu"), ("jetson-orin", "dla")):
        spec = load(profile).devices[device]
        for plan in plans:
            for compatible in (False, True):
                try:
                    config = derive_build_config(spec, plan, (), Path("/tmp/p.plan"), trt_major=major,
                                                 version_compatible=compatible, hardware_compatibility="AMPERE_PLUS")
                except Exception:  # a plan this device refuses: nothing reaches TensorRT
                    continue
                members |= {f"BuilderFlag.{f}" for f in config.flags | config.cleared_flags}
                members |= {f"NetworkDefinitionCreationFlag.{f}" for f in config.network_flags}
    return members


@pytest.mark.parametrize("major", sorted(BINDINGS))
def test_every_tensorrt_name_call_and_flag_kiln_uses_fits_the_real_bindings(major):
    members = _flags_kiln_derives(major)
    assert "BuilderFlag.TF32" in members and "BuilderFlag.GPU_FALLBACK" in members
    arguments = [a for m in sorted(members) for a in ("--member", m)]
    result = _check(major, *arguments)
    assert result["uses"] >= 50, result  # the scan found kiln's calls (a broken scan finds few)
    assert result["problems"] == [], "\n".join(f"{p['where']}: {p['use']}: {p['problem']}" for p in result["problems"])


@pytest.mark.parametrize("major", sorted(BINDINGS))
def test_every_tensorrt_datatype_is_in_kilns_tables(major):
    assert _check(major)["datatypes"] == sorted(tensorrt_api.DATATYPES)


WRONG = '''
def wrong(trt, builder_config: trt.IBuilderConfig, layer: trt.ILayer, tensor: trt.ITensor, cache):
    builder_config.set_flag(trt.BuilderFlag.OBEY_PRECISON_CONSTRAINTS)
    layer.set_output_type(0, trt.DataType.HALF)
    builder_config.set_timing_cache(cache, ignore_mismatches=False)
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE)
    builder_config.int8_calibrator = None
    tensor.dtype = trt.DataType.HALF
'''


@pytest.mark.parametrize("major", sorted(BINDINGS))
def test_the_check_fails_on_a_misspelt_flag_a_removed_method_and_a_wrong_keyword(major, tmp_path):
    (tmp_path / "wrong.py").write_text(WRONG)
    found = {p["where"].split(":")[-1]: p["problem"] for p in _check(major, "--source", str(tmp_path / "wrong.py"))["problems"]}
    assert "no attribute 'OBEY_PRECISON_CONSTRAINTS'" in found["3"]
    assert "no keyword argument 'ignore_mismatches'" in found["5"]
    assert "needs pool_size" in found["6"]
    if major == 11:  # removed with weak typing
        assert "ILayer has no attribute 'set_output_type'" in found["4"]
        assert "IBuilderConfig has no attribute 'int8_calibrator'" in found["7"]
        assert "ITensor.dtype is read-only" in found["8"]
    else:  # still there, deprecated: kiln may not use it either
        assert "set_output_type is deprecated" in found["4"] and "Deprecated in TensorRT 10.12" in found["4"]
        assert "int8_calibrator is deprecated" in found["7"]


@pytest.mark.parametrize("major", sorted(BINDINGS))
def test_the_check_fails_on_kilns_own_backend_with_one_call_broken(major, tmp_path):
    source = (ROOT / "kiln" / "backends" / "tensorrt.py").read_text()
    broken = source.replace("ignore_mismatch=False", "ignore_mismatches=False").replace(".execute_async_v3(", ".execute_async_v2(")
    assert broken.count("ignore_mismatches") == 1 and ".execute_async_v2(" in broken
    (tmp_path / "tensorrt.py").write_text(broken)
    problems = [p["problem"] for p in _check(major, "--source", str(tmp_path / "tensorrt.py"))["problems"]]
    assert len(problems) == 2, problems
    assert any("ignore_mismatches" in p for p in problems) and any("execute_async_v2" in p for p in problems)


LOGGER_RUN = r'''
import json, os, sys
import tensorrt_lean
sys.modules["tensorrt"] = tensorrt_lean  # the lean runtime under the name kiln imports
from kiln.backends import tensorrt as backend

status = backend.TensorRTBackend().available()
logger = backend._make_logger(tensorrt_lean)
runtime = tensorrt_lean.Runtime(logger)  # without a GPU, TensorRT logs a CUDA initialisation failure here
gpu = not logger.errors
if gpu:  # with one, a plan that is not an engine draws an error instead
    runtime.deserialize_cuda_engine(b"not a TensorRT plan")
print(json.dumps({"version": tensorrt_lean.__version__, "errors": logger.errors, "gpu": gpu,
                  "available": status.ok, "reason": status.reason}), flush=True)
os._exit(0)  # never destroy a Runtime made without a GPU: that crashes the process
'''


def test_kilns_logger_receives_the_lean_runtimes_own_messages():
    shim, version = LEAN
    folder = _tensorrt(shim, version, ("bindings", "libs"), stubs=None)
    got = _run([sys.executable, "-c", LOGGER_RUN], f"the lean runtime {version}", timeout=180, env=_env(folder))
    assert got.returncode == 0, f"exit {got.returncode}: {got.stderr[-2000:]}"
    result = json.loads(got.stdout.strip().splitlines()[-1])
    assert result["version"] == version and result["errors"], result
    if not result["gpu"]:
        assert any("CUDA" in e for e in result["errors"]), result["errors"]  # TensorRT's text, not kiln's
        assert not result["available"] and "no CUDA GPU is present" in result["reason"]


COMPARE_RUN = r'''
import importlib.util, json, sys
import numpy, onnx
from onnx import TensorProto, helper, numpy_helper
from polygraphy import constants
from polygraphy.backend.onnx import BytesFromOnnx, ModifyOutputs, OnnxFromPath
from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

# kiln's module by path: it needs numpy, onnx and polygraphy, not kiln's package (torch)
spec = importlib.util.spec_from_file_location("tensorrt_compare", sys.argv[1])
compare = sys.modules["tensorrt_compare"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)

def model(path, w2):
    rng = numpy.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((4, 8)).astype(numpy.float32), "w1")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="mm1"), helper.make_node("Relu", ["h1"], ["r1"], name="relu"),
             helper.make_node("MatMul", ["r1", "w2"], ["h2"], name="mm2"), helper.make_node("Tanh", ["h2"], ["y"], name="tanh")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                              [w1, numpy_helper.from_array(w2, "w2")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)

def runner(path, name):
    return OnnxrtRunner(SessionFromOnnx(BytesFromOnnx(ModifyOutputs(OnnxFromPath(path), outputs=constants.MARK_ALL))), name=name)

w2 = numpy.random.default_rng(1).standard_normal((8, 3)).astype(numpy.float32)
model("good.onnx", w2)
bad = w2.copy()
bad[0, 0] += 0.5
model("bad.onnx", bad)
feeds = [{"x": numpy.random.default_rng(2).standard_normal((2, 4)).astype(numpy.float32)} for _ in range(2)]
found = compare.compare_runners([runner("bad.onnx", "under_test"), runner("good.onnx", "reference")], feeds, "good.onnx",
                                1e-5, 1e-5, owners={"mm2": "linear_1"})
same = compare.compare_runners([runner("good.onnx", "a"), runner("good.onnx", "b")], feeds, "good.onnx", 1e-5, 1e-5)
# the TensorRT half needs a GPU; here, that the Polygraphy calls it makes take kiln's arguments
import inspect
from polygraphy.backend import trt as poly_trt
calls = {"NetworkFromOnnxPath": ["strongly_typed"], "ModifyNetworkOutputs": ["outputs"], "CreateConfig": ["tf32"],
         "EngineFromNetwork": ["config"], "TrtRunner": ["name"]}
missing = [f"{cls}({arg}=)" for cls, args in calls.items() for arg in args
           if arg not in inspect.signature(getattr(poly_trt, cls).__init__).parameters]
print("RESULT " + json.dumps({"found": found.__dict__ if found else None, "text": found.describe() if found else "",
                              "same": same.__dict__ if same else None, "missing": missing}), flush=True)
'''


def test_polygraphy_comparison_names_the_first_diverging_layer_and_its_kiln_node(tmp_path):
    folder = _install(POLYGRAPHY.replace("==", "-"), [POLYGRAPHY])
    module = ROOT / "kiln" / "backends" / "tensorrt_compare.py"
    got = subprocess.run([sys.executable, "-c", COMPARE_RUN, str(module)], capture_output=True, text=True, timeout=300,
                         env=_env(folder), cwd=tmp_path)
    lines = [line for line in got.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"exit {got.returncode}: {got.stderr[-2000:]}{got.stdout[-2000:]}"
    result = json.loads(lines[-1][len("RESULT "):])
    # mm1 and relu agree; mm2 reads the changed weight; tanh and y follow it
    assert result["found"] == {"tensor": "h2", "node": "mm2", "op": "MatMul", "owner": "linear_1", "agreeing": 2,
                               "compared": 4}
    assert "MatMul node mm2 (kiln node linear_1)" in result["text"]
    assert result["same"] is None
    assert result["missing"] == []
