"""optimize() as a user calls it: options, profiles, reports, and the errors that guard them."""

import pytest
import torch
from torch import nn

import kiln
from kiln.backends import onnxruntime as ort_backend
from kiln.backends.inductor import InductorBackend
from kiln.backends.base import Availability
from kiln.verify import TOLERANCE
from kiln.types import Precision

FP32 = TOLERANCE[Precision.FP32]  # compiled fp32 engines against eager


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return torch.tanh(self.fc(x))


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return Tiny().eval(), (torch.randn(2, 4),)


def test_optimize_returns_a_model_with_eager_outputs_and_a_report(tiny):
    model, inputs = tiny
    compiled = kiln.optimize(model, "cpu-x86", inputs, backend="onnxruntime")
    torch.testing.assert_close(compiled(*inputs), model(*inputs), rtol=FP32.rtol, atol=FP32.atol)
    text = compiled.report.render()
    for section in ("Passes", "Backend decisions", "Verification against eager", "onnxruntime"):
        assert section in text
    assert compiled.report.verified_draws == 2 and all(v["ok"] for v in compiled.report.verification)


def test_optimize_names_an_unknown_option_and_suggests_the_closest(tiny):
    with pytest.raises(kiln.OptionsError, match="did you mean 'backend'"):
        kiln.optimize(*tiny[:1], "cpu-x86", tiny[1], backnd="onnxruntime")


def test_optimize_names_an_unknown_profile_and_lists_known_ones(tiny):
    with pytest.raises(kiln.ProfileError) as info:
        kiln.optimize(tiny[0], "cpu-x68", tiny[1])
    assert "cpu-x68" in str(info.value) and "cpu-x86" in str(info.value)


def test_optimize_refuses_a_precision_the_profiles_device_cannot_run(tiny):
    with pytest.raises(kiln.OptionsError, match="does not run fp8"):
        kiln.optimize(tiny[0], "cpu-x86", tiny[1], precision="fp8")


def test_optimize_refuses_a_profile_whose_device_cannot_run_fp32(tiny):
    with pytest.raises(kiln.OptionsError, match="does not run fp32"):
        kiln.optimize(tiny[0], "intel-npu", tiny[1])


def test_optimize_for_a_gpu_profile_on_a_cpu_only_machine_says_why_nothing_can_build(tiny):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(kiln.BackendUnavailable) as info:
        kiln.optimize(tiny[0], "a100", tiny[1])
    message = str(info.value)
    assert "tensorrt" in message and "GPU" in message


def test_naming_an_unavailable_backend_fails_with_its_install_hint(tiny, monkeypatch):
    monkeypatch.setattr(InductorBackend, "available", lambda self: Availability(False, "no C++ compiler", "apt-get install g++"))
    with pytest.raises(kiln.BackendUnavailable, match="apt-get install g"):
        kiln.optimize(tiny[0], "cpu-x86", tiny[1], backend="inductor")


def test_a_backend_that_computes_wrong_answers_is_a_verification_error(tiny, monkeypatch):
    real_call = ort_backend.OnnxRuntimeEngine.__call__
    monkeypatch.setattr(ort_backend.OnnxRuntimeEngine, "__call__", lambda self, *x: tuple(o + 0.5 for o in real_call(self, *x)))
    with pytest.raises(kiln.VerificationError) as info:
        kiln.optimize(tiny[0], "cpu-x86", tiny[1], backend="onnxruntime")
    assert "output" in str(info.value) and "0.5" in str(info.value)


def test_turning_verification_off_is_recorded_in_the_report(tiny):
    compiled = kiln.optimize(tiny[0], "cpu-x86", tiny[1], backend="onnxruntime", verify=False)
    assert compiled.report.verification == []
    assert any("verify=False" in note for note in compiled.report.notes)


def test_options_object_and_keywords_combine(tiny):
    options = kiln.CompileOptions(backend="onnxruntime", verify_draws=0)
    compiled = kiln.optimize(tiny[0], "cpu-x86", tiny[1], options=options, seed=3)
    assert compiled.report.verified_draws == 0 and compiled.backends == {"p0": "onnxruntime"}


def test_a_user_profile_file_drives_the_backend_choice(tiny, tmp_path):
    profile = tmp_path / "mine.yaml"
    profile.write_text(
        "name: mine\ndescription: a laptop\nprimary_device: cpu\nselect: prefer\n"
        "devices:\n  cpu:\n    kind: cpu\n    model: laptop\n    memory_gb: 16\n    memory_bandwidth_gbs: 50\n"
        "    peak_tflops: {fp32: 0.5}\n    backends: [onnxruntime]\n")
    compiled = kiln.optimize(tiny[0], profile, tiny[1])
    assert compiled.backends == {"p0": "onnxruntime"} and compiled.profile["name"] == "mine"


def test_autotune_reaches_the_backend_build_settings_and_the_cache_key(tiny, monkeypatch, tmp_path):
    seen = []
    real_compile = ort_backend.OnnxRuntimeBackend.compile
    monkeypatch.setattr(ort_backend.OnnxRuntimeBackend, "compile",
                        lambda self, partition, settings: seen.append(settings.autotune) or real_compile(self, partition, settings))
    kiln.optimize(tiny[0], "cpu-x86", tiny[1], backend="onnxruntime", autotune=True, verify_draws=0, cache=False)
    assert seen == [True]
    assert not kiln.CompileOptions().autotunes  # by default only effort="max" autotunes
    assert kiln.CompileOptions(autotune=True).cache_fields() != kiln.CompileOptions().cache_fields()


def test_renamed_options_still_read_their_old_spelling_for_a_release_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="backend_fallback"):
        opts = kiln.CompileOptions(allow_fallback=True)
    assert opts.backend_fallback is True and opts.allow_fallback is None
    with pytest.warns(DeprecationWarning, match="time_against_fp32=False"):
        opts = kiln.CompileOptions(select="prefer")
    assert opts.time_against_fp32 is False and not opts.times_against_fp32("measure")
    assert kiln.CompileOptions(select="prefer", time_against_fp32=True).times_against_fp32("prefer")
    assert kiln.CompileOptions().times_against_fp32("measure") and not kiln.CompileOptions().times_against_fp32("prefer")
    assert not kiln.CompileOptions(effort="fast").times_against_fp32("measure")  # fast: one build, no fp32 race


def test_plan_assumes_a_precision_with_assume_precision_and_reads_the_old_keyword_with_a_warning():
    model, x = torch.nn.Sequential(torch.nn.Linear(8, 8)).eval(), torch.randn(2, 8)
    assumed = kiln.plan(model, "cpu-x86", (x,), assume_precision="bf16")
    assert {r["precision"] for r in assumed.report.placement} == {"bf16"}
    with pytest.warns(DeprecationWarning, match="assume_precision"):
        old = kiln.plan(model, "cpu-x86", (x,), precision="bf16")
    assert {r["precision"] for r in old.report.placement} == {"bf16"}
