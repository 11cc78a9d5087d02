"""The profile field that says which devices have sparse tensor cores (structured_sparsity)."""

import pytest

from kiln.errors import ProfileError
from kiln.hardware_profiles import available, load

from .test_schema import valid, write

# Ampere, Hopper and Ada GPUs and Orin's GPU and DLAs skip 2:4 sparse weights
SPARSE_DEVICES = {("a100", "gpu"), ("a10", "gpu"), ("h100", "gpu"), ("l4", "gpu"), ("jetson-orin", "gpu"),
                  ("jetson-orin", "dla")}


def test_devices_with_sparse_tensor_cores_list_2_4_and_no_other_device_does():
    for name in available():
        profile = load(name)
        for device in profile.devices.values():
            expected = ("2:4",) if (name, device.name) in SPARSE_DEVICES else ()
            assert device.structured_sparsity == expected, f"{name}.{device.name}"
    assert load("t4").primary.structured_sparsity == ()  # Turing has none


def test_a_misspelt_field_is_an_error_naming_it_with_the_close_match(tmp_path):
    data = valid()
    data["devices"]["gpu"]["structured_sparsty"] = ["2:4"]
    with pytest.raises(ProfileError, match=r"(?s)devices\.gpu\.structured_sparsty.*did you mean 'structured_sparsity'"):
        load(write(tmp_path, data))


@pytest.mark.parametrize("value, match", [(["2:8"], "unknown structured sparsity pattern '2:8'"),
                                          ("2:4", "expected list"),
                                          ([124], "(?s)unknown structured sparsity pattern 124.*quote it")])
def test_an_unknown_pattern_or_a_wrong_type_is_an_error_naming_the_field(tmp_path, value, match):
    # an unquoted 2:4 is a base-60 integer to YAML 1.1 (124): the fix says to quote it
    data = valid()
    data["devices"]["gpu"]["structured_sparsity"] = value
    with pytest.raises(ProfileError, match=match) as caught:
        load(write(tmp_path, data))
    assert "devices.gpu.structured_sparsity" in str(caught.value)


def test_a_user_profile_may_declare_2_4_on_its_own_gpu(tmp_path):
    data = valid()
    data["devices"]["gpu"]["structured_sparsity"] = ["2:4"]
    profile = load(write(tmp_path, data))
    assert profile.devices["gpu"].structured_sparsity == ("2:4",) and profile.devices["cpu"].structured_sparsity == ()
    assert "structured sparsity: 2:4" in profile.summary()
