"""The effort setting: which candidate backends a partition's selection builds, from what this
host measured before (kiln/build/effort.py, kiln/build/host_record.py)."""

import dataclasses

import pytest
import torch
from torch import nn

import kiln
from kiln.build.effort import SKIP_FACTOR, plan_candidates
from kiln.build.host_record import HostRecord, Recorded, graph_kind
from kiln.errors import OptionsError

NAMES = ("onnxruntime", "inductor", "openvino")


def _recorded(**factors) -> dict[str, Recorded]:
    return {name: Recorded(name, factor, 10.0 * factor, 3.0, "2026-12-07", 20) for name, factor in factors.items()}


def test_max_builds_and_times_every_candidate_even_on_a_profile_that_prefers():
    plan = plan_candidates(NAMES, "prefer", "max", _recorded(inductor=3.0))
    assert plan.mode == "measure" and plan.order == NAMES and not plan.left_out


def test_default_leaves_out_a_candidate_recorded_slower_than_the_winner_with_the_figure():
    plan = plan_candidates(NAMES, "measure", "default", _recorded(onnxruntime=1.04, inductor=1.31, openvino=1.0))
    assert plan.order == ("onnxruntime", "openvino")  # within the noise of one timing: still built
    assert "1.31x the fastest candidate's time" in plan.left_out["inductor"]
    assert "effort='max'" in plan.left_out["inductor"]


def test_default_leaves_out_a_candidate_recorded_5_percent_slower_or_more():
    # default promises an engine within 5% of what max picks; a candidate 5% behind cannot beat that
    plan = plan_candidates(NAMES, "measure", "default", _recorded(onnxruntime=1.06, inductor=1.31, openvino=1.0))
    assert plan.order == ("openvino",) and set(plan.left_out) == {"onnxruntime", "inductor"}


def test_default_leaves_out_a_closer_candidate_only_where_its_timing_put_it_behind_beyond_the_noise():
    def recorded(factor: float, apart: bool) -> dict[str, Recorded]:
        return {"openvino": Recorded("openvino", 1.0, 10.0, 3.0, "2026-12-07", 20),
                "onnxruntime": Recorded("onnxruntime", factor, 10.0 * factor, 3.0, "2026-12-07", 20, apart)}

    names = ("onnxruntime", "openvino")
    behind = plan_candidates(names, "measure", "default", recorded(1.03, apart=True))
    assert behind.order == ("openvino",) and "behind it beyond the noise" in behind.left_out["onnxruntime"]
    assert plan_candidates(names, "measure", "default", recorded(1.03, apart=False)).order == names  # within the noise
    assert plan_candidates(names, "measure", "default", recorded(1.01, apart=True)).order == names  # a tie
    assert plan_candidates(names, "measure", "fast", recorded(1.03, apart=True)).order == ("openvino", "onnxruntime")


def test_default_builds_a_candidate_this_host_never_measured():
    plan = plan_candidates(NAMES, "measure", "default", _recorded(onnxruntime=1.0, openvino=1.5))
    assert plan.order == ("onnxruntime", "inductor") and set(plan.left_out) == {"openvino"}


def test_a_record_never_leaves_out_every_candidate():
    plan = plan_candidates(("onnxruntime", "openvino"), "measure", "default", _recorded(onnxruntime=1.2, openvino=1.5))
    assert plan.order == ("onnxruntime",)


def test_default_on_a_profile_that_prefers_changes_nothing():
    plan = plan_candidates(NAMES, "prefer", "default", _recorded(onnxruntime=2.0))
    assert plan == plan_candidates(NAMES, "prefer", "default", {})
    assert plan.mode == "prefer" and plan.order == NAMES


def test_fast_builds_the_recorded_winner_first_and_falls_back_in_order():
    plan = plan_candidates(NAMES, "measure", "fast", _recorded(onnxruntime=1.2, openvino=1.0))
    assert plan.mode == "prefer" and plan.fallback
    assert plan.order == ("openvino", "inductor", "onnxruntime")  # winner, never measured, recorded loser
    assert "openvino was predicted to win" in plan.why_first


def test_fast_without_a_record_takes_the_device_s_first_preference():
    plan = plan_candidates(NAMES, "measure", "fast", {})
    assert plan.order[0] == "onnxruntime" and "first preference" in plan.why_first


def test_one_candidate_is_simply_tried():
    assert plan_candidates(("onnxruntime",), "measure", "fast", {}).order == ("onnxruntime",)


def test_effort_is_checked_and_max_turns_on_autotuning():
    with pytest.raises(OptionsError, match="did you mean 'fast'"):
        kiln.CompileOptions(effort="fats")
    assert kiln.CompileOptions(effort="max").autotunes and not kiln.CompileOptions().autotunes
    assert not kiln.CompileOptions(effort="max", autotune=False).autotunes
    assert SKIP_FACTOR > 1.0


# --- end to end, on a profile with two CPU backends -------------------------------------------

def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4)).eval(), torch.randn(2, 16)


def _two_backend_profile():
    base = kiln.hardware_profiles.load("cpu-x86")
    cpu = dataclasses.replace(base.devices["cpu"], backends=("onnxruntime", "openvino"))
    return dataclasses.replace(base, devices={"cpu": cpu})


def _kind(model, x, profile):
    planned = kiln.plan(model, profile, (x,), precision="fp32")
    return graph_kind(planned.plan.partitions[0].graph)


def test_default_effort_skips_what_this_host_measured_slower_and_says_so(tmp_path):
    model, x = _model()
    profile = _two_backend_profile()
    HostRecord.beside(tmp_path).store(_kind(model, x, profile), {"onnxruntime": (2.0, 4.0), "openvino": (3.0, 1.0)})
    compiled = kiln.optimize(model, profile, (x,), precision="fp32", cache_dir=str(tmp_path), cache=False)
    candidates = {c.backend: c for c in compiled.report.candidates}
    assert candidates["openvino"].status == "skipped" and "1.50x the fastest candidate's time" in candidates["openvino"].reason
    assert candidates["onnxruntime"].status == "chosen"
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
    assert "skipped" in str(compiled.report)


def test_a_measured_selection_is_recorded_for_the_next_compile(tmp_path):
    model, x = _model()
    profile = _two_backend_profile()
    compiled = kiln.optimize(model, profile, (x,), precision="fp32", cache_dir=str(tmp_path), cache=False)
    assert {c.status for c in compiled.report.candidates} == {"chosen", "slower"}
    recorded = HostRecord.beside(tmp_path).lookup(_kind(model, x, profile))
    assert set(recorded) == {"onnxruntime", "openvino"}
    assert recorded[compiled.backends["p0"]].factor == 1.0
    loser = next(r for name, r in recorded.items() if name != compiled.backends["p0"])
    assert loser.factor >= 1.0 and loser.build_seconds > 0


def test_fast_effort_builds_one_candidate(tmp_path):
    model, x = _model()
    compiled = kiln.optimize(model, _two_backend_profile(), (x,), precision="fp32", cache_dir=str(tmp_path), cache=False,
                             effort="fast")
    statuses = {c.backend: c.status for c in compiled.report.candidates}
    assert statuses == {"onnxruntime": "chosen", "openvino": "skipped"}
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


def test_the_default_effort_trusts_a_recorded_race_only_from_the_skip_factor_up(tmp_path):
    import torch
    from torch import nn

    from kiln.build.effort import RACE_SKIP_FACTOR, RecordedRaces
    from kiln.build.host_record import HostRecord
    from kiln.ir import LayerPlan, Scheme

    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4)))
    plans = {"l0": LayerPlan("l0", "linear", "w0", Scheme.INT8_STATIC)}
    record = HostRecord.beside(tmp_path)
    RecordedRaces(record, gm, trusted=False).store(plans, lowered_s=1.0e-3, fp32_s=1.0e-3 * RACE_SKIP_FACTOR)
    assert RecordedRaces(record, gm, trusted=False).known_win(plans) is None  # effort="max" races anyway
    known = RecordedRaces(record, gm, trusted=True).known_win(plans)
    assert f"({RACE_SKIP_FACTOR:.2f}x)" in known and "effort='default' does not race" in known
    RecordedRaces(record, gm, trusted=True).store(plans, lowered_s=1.0e-3, fp32_s=1.0e-3 * (RACE_SKIP_FACTOR - 0.02))
    assert RecordedRaces(record, gm, trusted=True).known_win(plans) is None  # too close to trust: raced again
