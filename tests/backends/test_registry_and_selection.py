import pytest
import torch

from kiln.backends import registry
from kiln.build import select
from kiln.backends.base import Availability, Support
from kiln.errors import BackendError, BackendUnavailable
from kiln.verify import OutputCheck


def test_registry_lists_known_backends_for_an_unknown_name():
    with pytest.raises(BackendUnavailable) as info:
        registry.get("onnxrunitme")
    assert "onnxruntime" in str(info.value) and "did you mean" in str(info.value)


def test_registry_holds_every_backend_the_shipped_profiles_name():
    from kiln.hardware_profiles import available, load

    named = {b for name in available() for d in load(name).devices.values() for b in d.backends}
    assert named <= set(registry.BACKENDS), named - set(registry.BACKENDS)


class _Engine:
    backend = "fake"

    def __init__(self, delay: float, wrong: bool = False):
        self.delay, self.wrong = delay, wrong

    def __call__(self, *inputs):
        import time

        time.sleep(self.delay)
        return (inputs[0] + (1.0 if self.wrong else 0.0),)


class _Backend:
    def __init__(self, name, engine=None, available=True, error=None, unsupported=None):
        self.name, self._engine, self._available, self._error, self._unsupported = name, engine, available, error, unsupported

    def available(self):
        return Availability(self._available, "" if self._available else "not installed", "pip install it")

    def supports(self, node, device, precision=None, check_ready=True):
        return Support(False, self._unsupported) if self._unsupported else Support(True)

    def compile(self, partition, settings):
        if self._error:
            raise self._error
        return self._engine


@pytest.fixture
def fakes(monkeypatch):
    table = {}
    monkeypatch.setattr(registry, "get", lambda name: table[name])
    return table


def _check(engine):
    x = torch.ones(2)
    got = engine(x)[0]
    ok = bool(torch.equal(got, x))
    return [OutputCheck("out", float((got - x).abs().max()), 0.0 if ok else 1.0, 1.0, ok)]


def _partition(convnet_partition):
    return convnet_partition[0]


def test_measure_keeps_the_fastest_verified_candidate_and_records_every_other(fakes, convnet_partition, settings):
    fakes.update({"slow": _Backend("slow", _Engine(0.004)), "fast": _Backend("fast", _Engine(0.0)),
                  "wrong": _Backend("wrong", _Engine(0.0, wrong=True)), "crashes": _Backend("crashes", error=RuntimeError("segv-ish")),
                  "absent": _Backend("absent", available=False), "partial": _Backend("partial", _Engine(0), unsupported="no op foo")})
    # 0.2 s per candidate: enough rounds for the timing to tell 4 ms from 0 beyond the noise
    chosen = select.select_engine(_partition(convnet_partition), tuple(fakes), "measure", settings, _check, 0.2, False)
    assert chosen.backend == "fast"
    status = {r.backend: r.status for r in chosen.candidates}
    assert status == {"slow": "slower", "fast": "chosen", "wrong": "mismatch", "crashes": "failed",
                      "absent": "unavailable", "partial": "unsupported"}
    reasons = {r.backend: r.reason for r in chosen.candidates}
    assert "segv-ish" in reasons["crashes"] and "no op foo" in reasons["partial"] and "pip install" in reasons["absent"]
    # only two built and verified, told apart by the first timing: it decides
    assert reasons["fast"].startswith("fastest verified") and "apart beyond the noise" in reasons["fast"]
    assert chosen.apart == {"slow"}  # what the host record keeps, for effort="default" to leave it out


def test_with_three_timed_the_winner_is_re_timed_against_its_runner_up_alone(fakes, convnet_partition, settings):
    fakes.update({"slowest": _Backend("slowest", _Engine(0.008)), "slow": _Backend("slow", _Engine(0.004)),
                  "fast": _Backend("fast", _Engine(0.0))})
    chosen = select.select_engine(_partition(convnet_partition), tuple(fakes), "measure", settings, _check, 0.05, False)
    reasons = {r.backend: r.reason for r in chosen.candidates}
    assert chosen.backend == "fast" and "re-timed against slow" in reasons["fast"]


def test_prefer_takes_the_first_available_backend_and_does_not_build_the_rest(fakes, convnet_partition, settings):
    fakes.update({"absent": _Backend("absent", available=False), "first": _Backend("first", _Engine(0.0)),
                  "second": _Backend("second", error=AssertionError("must not be built"))})
    chosen = select.select_engine(_partition(convnet_partition), tuple(fakes), "prefer", settings, _check, 0.05, False)
    assert chosen.backend == "first"
    assert [r.status for r in chosen.candidates] == ["unavailable", "chosen", "not tried"]


def test_prefer_raises_on_a_build_failure_unless_fallback_is_allowed(fakes, convnet_partition, settings):
    fakes.update({"crashes": _Backend("crashes", error=RuntimeError("bad build")), "next": _Backend("next", _Engine(0.0))})
    with pytest.raises(BackendError, match="backend_fallback"):
        select.select_engine(_partition(convnet_partition), tuple(fakes), "prefer", settings, _check, 0.05, False)
    chosen = select.select_engine(_partition(convnet_partition), tuple(fakes), "prefer", settings, _check, 0.05, True)
    assert chosen.backend == "next" and chosen.candidates[0].status == "failed"


def test_selection_fails_with_every_candidates_reason_when_none_works(fakes, convnet_partition, settings):
    fakes.update({"absent": _Backend("absent", available=False), "wrong": _Backend("wrong", _Engine(0.0, wrong=True))})
    with pytest.raises(BackendUnavailable) as info:
        select.select_engine(_partition(convnet_partition), tuple(fakes), "measure", settings, _check, 0.05, False)
    assert "absent: unavailable" in str(info.value) and "wrong: mismatch" in str(info.value)


def test_each_timed_block_starts_after_a_quiet_pause_and_an_untimed_call(monkeypatch):
    # a runtime's worker threads keep spinning after its calls and take the cores the next
    # engine runs on: every block gives them SETTLE_SECONDS to park before anything is timed
    events = []
    monkeypatch.setattr(select.time, "sleep", lambda seconds: events.append(("sleep", seconds)))

    def engine(name):
        return lambda *inputs: events.append(("call", name))

    select.time_interleaved([engine("a"), engine("b")], (torch.zeros(1),), budget_seconds=0.0, block=2)
    timed = events[4:]  # after two warm-up calls per engine
    assert timed[:4] == [("sleep", select.SETTLE_SECONDS), ("call", "a"), ("call", "a"), ("call", "a")]
    assert timed[4:8] == [("sleep", select.SETTLE_SECONDS), ("call", "b"), ("call", "b"), ("call", "b")]
    assert events.count(("sleep", select.SETTLE_SECONDS)) == 2 * 3  # every block of the 3 rounds
    assert select.SETTLE_SECONDS >= 0.05


def test_the_registry_and_the_plan_datas_backend_names_name_the_same_backends():
    from kiln.ir import BACKEND_NAMES

    assert set(registry.BACKENDS) == set(BACKEND_NAMES)
