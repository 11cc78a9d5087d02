"""Hardware profiles: the shipped set, `extends:` merging, and the strict loader's errors.

Each test states one rule of the schema; an error test checks that the ProfileError names the
file, the culprit (dotted field or value) and, for typos, the closest known name.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from kiln.errors import ProfileError
from kiln.hardware_profiles import available, load
from kiln.types import DeviceKind, Precision

EXPECTED_PROFILES = {"cpu-x86", "cpu-arm", "a100", "h100", "a10", "t4", "l4", "jetson-orin", "intel-npu", "ascend-910"}
NVIDIA_DATACENTER = ["a100", "h100", "a10", "t4", "l4"]

# A small valid user profile; tests copy it, break one thing, and write it to tmp_path.
VALID = {
    "name": "custom",
    "description": "a test profile",
    "primary_device": "cpu",
    "select": "prefer",
    "devices": {
        "cpu": {
            "kind": "cpu",
            "model": "test cpu",
            "cores": 4,
            "memory_gb": 16,
            "memory_bandwidth_gbs": 50,
            "peak_tflops": {"fp32": 0.5, "int8": 2.0},
            "backends": ["onnxruntime", "inductor"],
        },
        "gpu": {
            "kind": "gpu",
            "model": "test gpu",
            "memory_gb": 8,
            "memory_bandwidth_gbs": 300,
            "peak_tflops": {"fp32": 10, "fp16": 40},
            "backends": ["onnxruntime"],
        },
    },
    "links": [
        {"from": "cpu", "to": "gpu", "bandwidth_gbs": 25, "latency_us": 10},
        {"from": "gpu", "to": "cpu", "bandwidth_gbs": 25, "latency_us": 10},
    ],
}


def write(tmp_path: Path, data: dict | str, filename: str = "custom.yaml") -> Path:
    path = tmp_path / filename
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def valid() -> dict:
    return copy.deepcopy(VALID)


def load_error(target) -> ProfileError:
    with pytest.raises(ProfileError) as info:
        load(target)
    return info.value


# --- the shipped profiles -------------------------------------------------------------------


def test_shipped_profiles_include_every_target():
    assert EXPECTED_PROFILES <= set(available())


def test_base_files_are_not_listed_and_not_loadable_by_name():
    assert not [name for name in available() if name.startswith("_")]
    assert (Path(load("a100").source_file).parent / "_nvidia_datacenter_host.yaml").is_file()
    load_error("_nvidia_datacenter_host")


@pytest.mark.parametrize("name", available())
def test_every_shipped_profile_loads_and_is_complete(name):
    profile = load(name)
    assert profile.name == name
    assert profile.description
    assert profile.primary_device in profile.devices
    assert profile.primary is profile.devices[profile.primary_device]
    assert profile.select in ("prefer", "measure")
    assert len(profile.digest) == 64
    for device in profile.devices.values():
        peaks = device.peak_tflops
        assert peaks.get(Precision.FP32, 0) > 0 or peaks.get(Precision.FP16, 0) > 0, device.name
        assert all(value > 0 for value in peaks.values()), device.name
        assert device.memory_gb > 0 and device.memory_bandwidth_gbs > 0, device.name
        assert device.backends, device.name
    for link in profile.links:
        assert link.source in profile.devices and link.target in profile.devices
        assert link.bandwidth_gbs > 0 and link.latency_us > 0
    assert profile.summary().startswith(f"{name}: ")


@pytest.mark.parametrize("name", sorted(EXPECTED_PROFILES))
def test_every_datasheet_figure_in_a_shipped_profile_names_its_source(name):
    text = (Path(load(name).source_file)).read_text()
    assert "# source:" in text


@pytest.mark.parametrize("name", available())
def test_multi_device_profiles_link_every_device_to_the_primary_both_ways(name):
    profile = load(name)
    pairs = {(link.source, link.target) for link in profile.links}
    for device in profile.devices:
        if device != profile.primary_device:
            assert (device, profile.primary_device) in pairs
            assert (profile.primary_device, device) in pairs


@pytest.mark.parametrize("name", NVIDIA_DATACENTER)
def test_nvidia_datacenter_profiles_share_the_host_base(name):
    profile = load(name)
    assert profile.primary_device == "gpu" and profile.select == "prefer"
    assert profile.primary.kind is DeviceKind.GPU
    assert profile.primary.backends == ("tensorrt", "inductor", "onnxruntime")
    assert profile.devices["cpu"].kind is DeviceKind.CPU
    assert profile.devices["cpu"].backends == ("onnxruntime", "inductor")
    assert {(link.source, link.target) for link in profile.links} == {("cpu", "gpu"), ("gpu", "cpu")}


def test_throughput_figures_are_dense_datasheet_values():
    a100 = load("a100").primary.peak_tflops
    assert a100[Precision.FP16] == 312 and a100[Precision.INT8] == 624  # not the 624 / 1248 sparse
    h100 = load("h100").primary.peak_tflops
    assert h100[Precision.FP8] == pytest.approx(1978.9)  # not 3,958 sparse
    l4 = load("l4").primary.peak_tflops
    assert l4[Precision.FP8] == pytest.approx(242.5)  # datasheet 485 is with sparsity


def test_precisions_match_each_architecture():
    assert Precision.FP8 in load("h100").primary.precisions
    assert Precision.FP8 in load("l4").primary.precisions
    assert Precision.FP8 not in load("a100").primary.precisions
    t4 = load("t4").primary.precisions
    assert {Precision.FP16, Precision.INT8, Precision.INT4} <= t4
    assert Precision.BF16 not in t4  # Turing has no bf16


def test_h100_crosses_pcie_gen5_and_t4_gen3():
    bandwidth = {name: load(name).links[0].bandwidth_gbs for name in ("h100", "a100", "t4")}
    assert bandwidth["t4"] < bandwidth["a100"] < bandwidth["h100"]


def test_jetson_orin_shares_memory_between_gpu_dla_and_cpu():
    profile = load("jetson-orin")
    assert profile.primary_device == "gpu"
    assert profile.devices["dla"].kind is DeviceKind.NPU
    assert profile.devices["dla"].backends == ("tensorrt",)
    assert profile.devices["dla"].precisions == {Precision.INT8, Precision.FP16}
    assert {d.memory_bandwidth_gbs for d in profile.devices.values()} == {204.8}
    assert min(link.bandwidth_gbs for link in profile.links) > max(link.bandwidth_gbs for link in load("h100").links)


def test_intel_npu_and_ascend_have_an_npu_primary():
    intel = load("intel-npu")
    assert intel.primary.kind is DeviceKind.NPU
    assert intel.primary.backends == ("openvino", "onnxruntime")
    assert intel.primary.peak_tflops[Precision.FP16] == intel.primary.peak_tflops[Precision.INT8] / 2
    ascend = load("ascend-910")
    assert ascend.primary.kind is DeviceKind.NPU and ascend.primary.backends == ("onnxruntime",)
    assert ascend.primary.peak_tflops == {Precision.FP16: 256, Precision.INT8: 512}


def test_cpu_arm_measures_its_backends():
    profile = load("cpu-arm")
    assert profile.select == "measure"
    assert profile.primary.backends == ("onnxruntime", "inductor")
    assert {"neon", "sve", "bf16", "i8mm"} <= set(profile.primary.features)


# --- extends --------------------------------------------------------------------------------


def test_extends_merges_nested_keys_child_wins(tmp_path):
    write(tmp_path, valid(), "base.yaml")
    child = write(tmp_path, {"name": "child", "description": "bigger cpu", "extends": "base",
                             "devices": {"cpu": {"memory_gb": 64, "peak_tflops": {"bf16": 1.0}}}}, "child.yaml")
    profile = load(child)
    cpu = profile.devices["cpu"]
    assert profile.name == "child" and profile.description == "bigger cpu"
    assert cpu.memory_gb == 64  # overridden
    assert cpu.memory_bandwidth_gbs == 50 and cpu.model == "test cpu"  # inherited
    assert cpu.peak_tflops == {Precision.FP32: 0.5, Precision.INT8: 2.0, Precision.BF16: 1.0}  # merged
    assert "gpu" in profile.devices and len(profile.links) == 2  # inherited whole


def test_extends_replaces_lists_whole(tmp_path):
    write(tmp_path, valid(), "base.yaml")
    child = write(tmp_path, {"extends": "base", "devices": {"cpu": {"backends": ["inductor"]}},
                             "links": [{"from": "cpu", "to": "gpu", "bandwidth_gbs": 5, "latency_us": 1}]}, "child.yaml")
    profile = load(child)
    assert profile.devices["cpu"].backends == ("inductor",)
    assert len(profile.links) == 1 and profile.links[0].bandwidth_gbs == 5


def test_a_user_profile_can_extend_a_shipped_one(tmp_path):
    child = write(tmp_path, {"name": "a100-40gb", "description": "A100 40GB", "extends": "a100",
                             "devices": {"gpu": {"memory_gb": 40, "memory_bandwidth_gbs": 1555}}}, "mine.yaml")
    profile = load(child)
    assert profile.primary.memory_gb == 40
    assert profile.primary.peak_tflops == load("a100").primary.peak_tflops
    assert "cpu" in profile.devices  # from the shipped base under a100


def test_a_user_profile_can_extend_the_shipped_profile_of_its_own_name(tmp_path):
    child = write(tmp_path, {"name": "a100", "description": "my a100", "extends": "a100",
                             "devices": {"gpu": {"memory_gb": 40}}}, "a100.yaml")
    assert load(child).primary.memory_gb == 40


def test_an_extends_cycle_is_an_error(tmp_path):
    write(tmp_path, {**valid(), "extends": "b"}, "a.yaml")
    write(tmp_path, {**valid(), "extends": "a"}, "b.yaml")
    error = load_error(tmp_path / "a.yaml")
    assert "cycle" in str(error)
    assert "a.yaml -> b.yaml -> a.yaml" in str(error)


def test_a_profile_extending_itself_is_a_cycle(tmp_path):
    error = load_error(write(tmp_path, {**valid(), "extends": "self"}, "self.yaml"))
    assert "cycle" in str(error) and "self.yaml" in str(error)


def test_extending_an_unknown_profile_is_an_error(tmp_path):
    error = load_error(write(tmp_path, {**valid(), "extends": "nowhere"}))
    assert "nowhere" in str(error) and "custom.yaml: extends" in str(error)


# --- strict loading: each mistake names its culprit -----------------------------------------


def test_a_misspelled_field_names_the_file_the_dotted_field_and_the_fix(tmp_path):
    data = valid()
    data["devices"]["cpu"]["memroy_gb"] = data["devices"]["cpu"].pop("memory_gb")
    error = load_error(write(tmp_path, data))
    message = str(error)
    assert "custom.yaml" in message
    assert "devices.cpu.memroy_gb" in message
    assert "memory_gb" in error.fix
    assert "unknown field" in message


def test_a_misspelled_top_level_field_suggests_the_right_one(tmp_path):
    data = valid()
    data["primary_devce"] = data.pop("primary_device")
    error = load_error(write(tmp_path, data))
    assert "custom.yaml: primary_devce" in str(error) and "primary_device" in error.fix


def test_a_wrong_type_names_the_field_and_the_value(tmp_path):
    data = valid()
    data["devices"]["cpu"]["memory_gb"] = "lots"
    message = str(load_error(write(tmp_path, data)))
    assert "custom.yaml: devices.cpu.memory_gb" in message
    assert "'lots'" in message and "number" in message


def test_a_boolean_is_not_a_number(tmp_path):
    data = valid()
    data["devices"]["cpu"]["cores"] = True
    assert "devices.cpu.cores" in str(load_error(write(tmp_path, data)))


def test_a_missing_required_field_is_named(tmp_path):
    data = valid()
    del data["devices"]["gpu"]["peak_tflops"]
    message = str(load_error(write(tmp_path, data)))
    assert "missing required field" in message
    assert "custom.yaml: devices.gpu.peak_tflops" in message


def test_an_unknown_precision_is_named(tmp_path):
    data = valid()
    data["devices"]["gpu"]["peak_tflops"]["fp9"] = 100
    message = str(load_error(write(tmp_path, data)))
    assert "devices.gpu.peak_tflops.fp9" in message
    assert "fp32" in message  # lists the known precisions


def test_a_throughput_figure_must_be_positive(tmp_path):
    data = valid()
    data["devices"]["gpu"]["peak_tflops"]["fp16"] = 0
    assert "devices.gpu.peak_tflops.fp16" in str(load_error(write(tmp_path, data)))


def test_memory_must_be_positive(tmp_path):
    data = valid()
    data["devices"]["gpu"]["memory_bandwidth_gbs"] = -1
    assert "devices.gpu.memory_bandwidth_gbs" in str(load_error(write(tmp_path, data)))


def test_an_unknown_backend_suggests_the_closest(tmp_path):
    data = valid()
    data["devices"]["cpu"]["backends"] = ["onnxrunitme"]
    error = load_error(write(tmp_path, data))
    assert "'onnxrunitme'" in str(error) and "devices.cpu.backends" in str(error)
    assert "did you mean 'onnxruntime'" in error.fix


def test_planned_backends_are_valid_names_in_a_profile(tmp_path):
    data = valid()
    data["devices"]["gpu"]["backends"] = ["tensorrt", "openvino", "onnxruntime"]
    assert load(write(tmp_path, data)).devices["gpu"].backends == ("tensorrt", "openvino", "onnxruntime")


def test_an_unknown_device_kind_lists_the_known_ones(tmp_path):
    data = valid()
    data["devices"]["gpu"]["kind"] = "tpu"
    error = load_error(write(tmp_path, data))
    assert "'tpu'" in str(error) and "devices.gpu.kind" in str(error)
    assert all(kind.value in error.fix for kind in DeviceKind)


def test_primary_device_must_name_a_declared_device(tmp_path):
    data = valid()
    data["primary_device"] = "npu"
    error = load_error(write(tmp_path, data))
    assert "custom.yaml: primary_device" in str(error)
    assert "cpu" in error.fix and "gpu" in error.fix


def test_a_link_must_name_declared_devices(tmp_path):
    data = valid()
    data["links"][1]["to"] = "dsp"
    message = str(load_error(write(tmp_path, data)))
    assert "links[1].to" in message and "'dsp'" in message


def test_an_unknown_select_mode_is_an_error(tmp_path):
    data = valid()
    data["select"] = "fastest"
    error = load_error(write(tmp_path, data))
    assert "'fastest'" in str(error) and "prefer" in error.fix and "measure" in error.fix


def test_malformed_yaml_names_the_file(tmp_path):
    path = write(tmp_path, "name: broken\ndevices: {cpu: [unclosed\n", "broken.yaml")
    message = str(load_error(path))
    assert "broken.yaml" in message and "YAML" in message


def test_a_yaml_file_that_is_not_a_mapping_is_an_error(tmp_path):
    assert "mapping" in str(load_error(write(tmp_path, "- just\n- a list\n", "list.yaml")))


def test_an_unknown_shipped_profile_suggests_the_closest(tmp_path):
    error = load_error("a1000")
    assert "'a1000'" in str(error)
    assert "did you mean 'a100'" in error.fix


def test_a_missing_profile_file_names_the_path(tmp_path):
    assert "missing.yaml" in str(load_error(tmp_path / "missing.yaml"))


# --- digest -----------------------------------------------------------------------------------


def test_the_digest_is_stable_and_changes_with_any_figure(tmp_path):
    first = load(write(tmp_path, valid(), "one.yaml")).digest
    assert load(write(tmp_path, valid(), "two.yaml")).digest == first  # same content, same digest
    changed = valid()
    changed["devices"]["gpu"]["peak_tflops"]["fp16"] = 41
    assert load(write(tmp_path, changed, "three.yaml")).digest != first


def test_the_digest_covers_inherited_figures(tmp_path):
    write(tmp_path, valid(), "base.yaml")
    child = write(tmp_path, {"extends": "base", "name": "child"}, "child.yaml")
    before = load(child).digest
    changed = valid()
    changed["devices"]["cpu"]["memory_bandwidth_gbs"] = 51
    write(tmp_path, changed, "base.yaml")
    assert load(child).digest != before


def test_shipped_profiles_have_distinct_digests():
    digests = [load(name).digest for name in available()]
    assert len(set(digests)) == len(digests)
