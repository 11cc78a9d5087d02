"""The precision search, driven by a fake build step: which plans it builds, in which order,
what it keeps, and what the report says. No engine is built here; tests/test_precision.py
runs the real builds end to end."""

from __future__ import annotations

import math

import pytest

from kiln.build import precision_search
from kiln.build.precision_search import Choice, build_plan
from kiln.errors import BackendUnavailable, VerificationError
from kiln.ir import LayerPlan, Scheme
from kiln.report import CandidateRecord, Report


def _plans(scheme: Scheme, count: int = 8) -> dict[str, LayerPlan]:
    # layer i caused error i / 100 alone: the last ones are the most sensitive
    return {f"l{i}": LayerPlan(f"l{i}", "linear", f"w{i}", scheme, error=i / 100, reason="fits") for i in range(count)}


class Built:
    """A built model as the search sees it: its report, and the plan it was built from."""

    def __init__(self, plans: dict[str, LayerPlan], label: str):
        self.plans, self.label = plans, label
        self.report = Report("net", "cpu-x86", "x")
        self.report.candidates = [CandidateRecord("p0", label, "chosen", "fastest verified")]
        self.report.notes = [f"built {label}"]

    def scheme(self) -> str:
        return ",".join(sorted({str(p.scheme) for p in self.plans.values() if p.scheme != Scheme.FP32})) or "fp32"


class FakeBuild:
    """Records every plan it is asked for; `fail` decides per call whether the build raises."""

    def __init__(self, first: dict[str, LayerPlan], fail=lambda plans, call: None):
        self.first, self.fail, self.calls = first, fail, []

    def __call__(self, plans):
        plans = dict(self.first if plans is None else plans)
        self.calls.append(plans)
        error = self.fail(plans, len(self.calls))
        if error is not None:
            raise error
        built = Built(plans, "")
        built.label = built.scheme()
        built.report.candidates[0].backend = built.label
        return built


def _lowered(plans) -> set[str]:
    return {name for name, p in plans.items() if p.scheme != Scheme.FP32}


def test_a_plan_that_misses_the_budget_once_built_is_rebuilt_with_its_most_sensitive_quarter_at_fp32():
    first = _plans(Scheme.INT8_STATIC)
    build = FakeBuild(first, lambda plans, call: VerificationError("cosine 0.99") if call == 1 else None)
    built = build_plan(build, Choice(first), auto=False)
    assert len(build.calls) == 2
    raised = _lowered(first) - _lowered(build.calls[1])
    assert len(raised) == math.ceil(0.25 * 8) and raised == {"l7", "l6"}  # the two with the largest solo errors
    assert all("missed the budget once built" in build.calls[1][name].reason for name in raised)
    assert built.plans == build.calls[1]
    assert any("its 2 most sensitive lowered layers went back to fp32 and it was rebuilt" in n for n in built.report.notes)


def _mixed(int8: int = 6, bf16: int = 2) -> dict[str, LayerPlan]:
    plans = _plans(Scheme.INT8_STATIC, int8 + bf16)
    return {name: p.at_float(Scheme.BF16, "int8 missed; bf16 fits") if i >= int8 else p
            for i, (name, p) in enumerate(plans.items())}


def test_a_mixed_int8_and_bf16_plan_that_misses_the_budget_moves_its_most_sensitive_int8_layers_to_bf16():
    first = _mixed()  # l0..l5 int8, l6 and l7 bf16
    build = FakeBuild(first, lambda plans, call: VerificationError("cosine 0.99") if call == 1 else None)
    built = build_plan(build, Choice(first), auto=True, fp32_fallback=False)
    rebuilt = build.calls[1]
    assert _lowered(rebuilt) == set(first)  # every layer stays lowered: the backend builds only such mixes
    moved = {name for name, p in rebuilt.items() if p.scheme == Scheme.BF16} - {"l6", "l7"}
    assert moved == {"l5", "l4"}  # a quarter of the 6 int8 layers, rounded up, the most sensitive first
    assert all(rebuilt[n].input_range is None and "back to bf16" in rebuilt[n].reason for n in moved)
    assert any("2 most sensitive int8-static layers went to bf16" in n for n in built.report.notes)


def test_auto_builds_the_next_alternative_when_the_chosen_plan_misses_the_budget_after_backing_off():
    first, second = _mixed(), _plans(Scheme.INT8_STATIC)
    build = FakeBuild(first, lambda plans, call: VerificationError("cosine 0.98") if Scheme.BF16 in
                      {p.scheme for p in plans.values()} else None)
    built = build_plan(build, Choice(first, [(Scheme.INT8_STATIC, second)]), auto=True)
    assert built.scheme() == "int8-static" and built.plans == second
    assert len(build.calls) == 4  # the mix, twice backed off, then the alternative
    assert any("no backend built the plan with 8 lowered layers" in n and n.endswith("next: int8-static")
               for n in built.report.notes)


def test_only_a_plan_mixing_int8_with_one_float_scheme_backs_off_to_that_scheme():
    assert precision_search.float_fallback(_mixed()) == Scheme.BF16
    assert precision_search.float_fallback(_plans(Scheme.INT8_STATIC)) is None
    assert precision_search.float_fallback(_plans(Scheme.BF16)) is None


def test_the_back_off_grows_then_the_last_miss_is_final_for_an_explicit_precision():
    first = _plans(Scheme.INT8_STATIC)
    build = FakeBuild(first, lambda plans, call: VerificationError("cosine 0.9"))
    with pytest.raises(VerificationError):
        build_plan(build, Choice(first), auto=False)
    assert [len(_lowered(c)) for c in build.calls] == [8, 6, 3]  # a quarter of 8, then half of the 6 left


def test_auto_builds_at_fp32_with_a_note_when_no_backend_builds_the_lowered_plan():
    first = _plans(Scheme.BF16)
    build = FakeBuild(first, lambda plans, call: BackendUnavailable("no backend could run it") if _lowered(plans) else None)
    built = build_plan(build, Choice(first), auto=True)
    assert [len(_lowered(c)) for c in build.calls] == [8, 0]
    assert built.scheme() == "fp32"
    assert any("no backend built the plan with 8 lowered layers within the budget" in n and n.endswith("built at fp32 instead")
               for n in built.report.notes)


@pytest.mark.parametrize("options", [{"auto": False}, {"auto": True, "fp32_fallback": False}])
def test_an_explicit_precision_or_a_refused_fp32_fallback_no_backend_builds_is_an_error(options):
    first = _plans(Scheme.INT8_STATIC)
    build = FakeBuild(first, lambda plans, call: BackendUnavailable("no backend could run it"))
    with pytest.raises(BackendUnavailable):
        build_plan(build, Choice(first), **options)
    assert len(build.calls) == 1


def test_without_timing_the_lowered_plan_is_kept_untimed():
    first = _plans(Scheme.BF16)
    build = FakeBuild(first)
    built = build_plan(build, Choice(first), auto=True, race=None)
    assert len(build.calls) == 1 and built.scheme() == "bf16"


def _race(*timings):
    """A race answering (lowered seconds, fp32 seconds) from `timings`, in order, the last one
    again for every later race (the re-timing of a won race)."""
    answers = list(timings)

    def race(lowered, fp32):
        race.calls += 1
        return answers.pop(0) if len(answers) > 1 else answers[0]
    race.calls = 0
    return race


def test_a_lowered_plan_slower_than_fp32_here_makes_way_for_fp32():
    first = _plans(Scheme.INT8_STATIC)
    build = FakeBuild(first)
    built = build_plan(build, Choice(first), auto=True, race=_race((2.0e-3, 1.0e-3)))
    assert built.scheme() == "fp32"
    verdict = next(n for n in built.report.notes if "timed interleaved" in n)
    assert "(8 layers, int8-static) ran 2.00 ms, fp32 1.00 ms" in verdict and verdict.endswith("fp32 kept")
    status = {c.backend: (c.status, c.reason) for c in built.report.candidates}
    assert status == {"int8-static": ("slower", "with the int8-static plan: not faster than fp32 here"),
                      "fp32": ("chosen", "fastest verified")}


def test_a_lowered_plan_faster_than_fp32_is_kept_and_the_fp32_build_is_reported_slower():
    first = _plans(Scheme.BF16)
    build = FakeBuild(first)
    built = build_plan(build, Choice(first), auto=True, race=_race((0.5e-3, 1.0e-3)))
    assert built.scheme() == "bf16"
    assert any(n.endswith("the lowered plan kept") for n in built.report.notes)
    assert [(c.backend, c.status) for c in built.report.candidates] == [("fp32", "slower"), ("bf16", "chosen")]


def test_auto_builds_the_next_precision_when_the_first_plan_measures_slower_than_fp32():
    first, second = _plans(Scheme.INT8_STATIC), _plans(Scheme.BF16, 8)
    build = FakeBuild(first)
    built = build_plan(build, Choice(first, [(Scheme.BF16, second)]), auto=True,
                       race=_race((2.0e-3, 1.0e-3), (0.5e-3, 1.0e-3)))
    assert [c.get("l0").scheme for c in build.calls] == [Scheme.INT8_STATIC, Scheme.FP32, Scheme.BF16]
    verdicts = [n for n in built.report.notes if "timed interleaved" in n]
    assert "int8-static) ran 2.00 ms, fp32 1.00 ms" in verdicts[0] and verdicts[0].endswith("next: bf16")
    assert "bf16) ran 0.50 ms" in verdicts[1] and verdicts[1].endswith("the lowered plan kept")
    assert built.scheme() == "bf16"
    chosen = [c.backend for c in built.report.candidates if c.status == "chosen"]
    assert chosen == ["bf16"]  # one chosen engine per partition, the losers reported slower


def test_a_winning_plan_whose_runner_up_was_estimated_close_is_timed_against_it_and_the_faster_kept():
    first, second = _mixed(), _plans(Scheme.BF16, 8)
    # races: mix vs fp32 (won twice), then the bf16 runner-up vs the mix (won twice)
    race = _race((0.6e-3, 1.0e-3), (0.6e-3, 1.0e-3), (0.6e-3, 0.5e-3))
    built = build_plan(FakeBuild(first), Choice(first, [(Scheme.BF16, second)], race_runner_up=True), auto=True, race=race)
    assert built.scheme() == "bf16" and race.calls == 3  # the lost race is not re-timed
    verdict = next(n for n in built.report.notes if "runner-up" in n)
    assert "plan ran 0.60 ms, the runner-up bf16 plan 0.50 ms" in verdict and verdict.endswith("the bf16 plan kept")
    statuses = sorted((c.backend, c.status) for c in built.report.candidates)
    assert statuses == [("bf16", "chosen"), ("bf16,int8-static", "slower"), ("fp32", "slower")]


def test_a_tie_with_the_runner_up_goes_to_the_runner_up_and_a_clear_win_keeps_the_plan():
    first, second = _mixed(), _plans(Scheme.BF16, 8)
    lead = precision_search.MIN_LEAD
    for mix_s, scheme in ((1.0e-3 * (1 - lead / 2), "bf16"), (1.0e-3 * (1 - 2 * lead), "bf16,int8-static")):
        race = _race((0.5e-3, 1.0e-3), (0.5e-3, 1.0e-3), (mix_s, 1.0e-3))
        choice = Choice(first, [(Scheme.BF16, second)], race_runner_up=True)
        assert build_plan(FakeBuild(first), choice, auto=True, race=race).scheme() == scheme


def test_a_runner_up_estimated_far_behind_is_not_built():
    first, second = _mixed(), _plans(Scheme.BF16, 8)
    build = FakeBuild(first)
    built = build_plan(build, Choice(first, [(Scheme.BF16, second)]), auto=True, race=_race((0.6e-3, 1.0e-3)))
    assert built.scheme() == "bf16,int8-static" and len(build.calls) == 2  # the plan and fp32


def test_when_every_alternative_loses_fp32_is_kept_and_a_failed_alternative_is_reported():
    first, second = _plans(Scheme.INT8_STATIC), _plans(Scheme.BF16)
    build = FakeBuild(first, lambda plans, call: BackendUnavailable("bf16 refused") if call == 3 else None)
    built = build_plan(build, Choice(first, [(Scheme.BF16, second)]), auto=True, race=_race((2.0e-3, 1.0e-3)))
    assert built.scheme() == "fp32"
    assert any("the bf16 plan failed (bf16 refused); fp32 kept" in n for n in built.report.notes)


def test_a_failed_fp32_comparison_build_keeps_the_lowered_plan_with_a_note():
    first = _plans(Scheme.BF16)
    build = FakeBuild(first, lambda plans, call: BackendUnavailable("fp32 refused") if not _lowered(plans) else None)
    built = build_plan(build, Choice(first), auto=True, race=_race())
    assert built.scheme() == "bf16"
    assert any("the fp32 comparison build failed (fp32 refused); the lowered plan is kept" in n for n in built.report.notes)


def test_a_lowered_plan_that_wins_the_first_race_but_loses_the_re_timing_makes_way_for_fp32():
    # one race can be won by a burst of load on fp32's blocks: the re-timing decides
    first = _plans(Scheme.BF16)
    race = _race((0.5e-3, 1.0e-3), (1.1e-3, 1.0e-3))
    built = build_plan(FakeBuild(first), Choice(first), auto=True, race=race)
    assert built.scheme() == "fp32" and race.calls == 2
    verdict = next(n for n in built.report.notes if "timed interleaved" in n)
    assert "ran 0.50 ms, fp32 1.00 ms; re-timed: 1.10 ms, fp32 1.00 ms" in verdict and verdict.endswith("fp32 kept")


def test_a_lowered_plan_within_the_minimum_lead_of_fp32_is_a_tie_and_fp32_is_kept():
    first = _plans(Scheme.INT8_STATIC)
    lead = precision_search.MIN_LEAD
    race = _race((1.0e-3 * (1 - lead / 2), 1.0e-3))
    built = build_plan(FakeBuild(first), Choice(first), auto=True, race=race)
    assert built.scheme() == "fp32" and race.calls == 1  # a lost first race is not re-timed
    kept = build_plan(FakeBuild(first), Choice(first), auto=True, race=_race((1.0e-3 * (1 - 2 * lead), 1.0e-3)))
    assert kept.scheme() == "int8-static"


class FakeHistory:
    """A race history that knows the plans in `wins` won clearly here, and keeps every race stored."""

    def __init__(self, wins=()):
        self.wins, self.stored = [dict(w) for w in wins], []

    def known_win(self, plans):
        return "recorded 1.50x" if dict(plans) in self.wins else None

    def store(self, plans, lowered_s, fp32_s):
        self.stored.append((_lowered(plans), lowered_s, fp32_s))


def test_a_plan_the_host_recorded_well_ahead_of_fp32_is_kept_without_building_fp32_or_racing():
    first = _plans(Scheme.BF16)
    build, race = FakeBuild(first), _race((2.0e-3, 1.0e-3))  # a race would keep fp32
    built = build_plan(build, Choice(first), auto=True, race=race, history=FakeHistory([first]))
    assert built.scheme() == "bf16" and race.calls == 0 and len(build.calls) == 1
    note = next(n for n in built.report.notes if "not timed against fp32" in n)
    assert "(8 layers, bf16)" in note and "recorded 1.50x" in note and note.endswith("the lowered plan kept")


def test_every_race_against_fp32_is_stored_with_its_last_timing_and_an_unknown_plan_is_raced():
    first, second = _plans(Scheme.INT8_STATIC), _plans(Scheme.BF16)
    history = FakeHistory([second])  # known, but only reached as an alternative after a lost race
    race = _race((2.0e-3, 1.0e-3), (0.5e-3, 1.0e-3), (0.6e-3, 1.0e-3))
    built = build_plan(FakeBuild(first), Choice(first, [(Scheme.BF16, second)]), auto=True, race=race, history=history)
    assert built.scheme() == "bf16" and race.calls == 3
    assert history.stored == [(set(first), 2.0e-3, 1.0e-3), (set(second), 0.6e-3, 1.0e-3)]


def test_a_known_plan_whose_runner_up_was_estimated_close_is_still_raced_against_the_runner_up():
    first, second = _mixed(), _plans(Scheme.BF16, 8)
    race = _race((0.6e-3, 0.5e-3))  # the runner-up wins
    built = build_plan(FakeBuild(first), Choice(first, [(Scheme.BF16, second)], race_runner_up=True), auto=True,
                       race=race, history=FakeHistory([first]))
    assert built.scheme() == "bf16" and race.calls == 1
    assert sorted((c.backend, c.status) for c in built.report.candidates) == [("bf16", "chosen"), ("bf16,int8-static", "slower")]


def test_most_sensitive_raised_takes_at_least_one_layer():
    plans, raised = precision_search.most_sensitive_raised(_plans(Scheme.FP16, 3), 0.1, "why")
    assert raised == 1 and _lowered(plans) == {"l0", "l1"} and plans["l2"].reason == "why"
