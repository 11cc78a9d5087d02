"""Building a lowered precision plan that holds its budget and pays for itself on this host.

assign_precision chooses a plan from simulations; the built engine is the proof. This search
takes the pass's plan and the alternatives it weighed, and a `build` step (kiln's Builder, or a
fake in tests) that re-decides, builds and verifies a plan, returning the compiled model:

1. Build the chosen plan. A build that misses the budget is rebuilt with the most sensitive
   BACK_OFF_SHARES of its lowered layers back at fp32 (the simulation rounds as each backend
   does and measures few samples, so a built plan can land just outside the budget).
2. precision="auto" only: when no backend builds the lowered plan within the budget, build the
   next alternative the same way (a mix of int8 and bf16 can miss where plain int8 holds), and
   when none is left, build at fp32 instead, with a note (CompileOptions.fp32_fallback); an
   explicit precision raises.
3. precision="auto" with timing (CompileOptions.time_against_fp32): build fp32 too and time
   both interleaved; keep the lowered plan only when it is faster here by more than MIN_LEAD,
   in that race and again in a second race (a burst of other load during one race must not
   decide: a tie goes to fp32, the more accurate plan). A plan that loses makes way for the
   next alternative, built and timed the same way; fp32 is kept when none wins. A winning plan
   whose runner-up was estimated to save nearly as much (assign_precision's CLOSE_ESTIMATE) is
   raced against the runner-up too, and kept only when more than MIN_LEAD faster in both races
   (a tie goes to the runner-up, which saves less and so is the more accurate). Every build is verified; the losers' chosen candidates stay in the report as
   slower. Each race against fp32 is stored in a RaceHistory (the host record); where it knows
   the plan clearly won here before (effort="default"), neither fp32 nor a race is run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol

from kiln.errors import BackendError, BackendUnavailable, VerificationError
from kiln.ir import LayerPlan, Scheme
from kiln.report import Report

# Shares of a plan's lowered layers put back at fp32, most sensitive first, on each rebuild
# after a budget miss; after the last one the miss is final.
BACK_OFF_SHARES = (0.25, 0.5)
# How much faster than fp32 a lowered plan must run, in both races, to be kept: less is a tie.
MIN_LEAD = 0.03
BUILD_FAILURES = (BackendUnavailable, BackendError, VerificationError)

LayerPlans = Mapping[str, LayerPlan]  # layer node name -> its plan, for every weighted layer


class Built(Protocol):
    """What a build step returns: anything with its own report (CompiledModel)."""

    report: Report


# Re-decides (None: the passes' own decision), builds and verifies; raises a BUILD_FAILURES error.
BuildStep = Callable[[LayerPlans | None], Built]
# Times two built models interleaved on the same inputs: (seconds per call of a, of b).
Race = Callable[[Built, Built], tuple[float, float]]


class RaceHistory(Protocol):
    """What this host measured in earlier races of a plan against fp32 (kiln.build.effort.RecordedRaces)."""

    def known_win(self, plans: LayerPlans) -> str | None:
        """Why racing `plans` against fp32 can be left out (a clear win recorded here), or None."""

    def store(self, plans: LayerPlans, lowered_s: float, fp32_s: float) -> None:
        """Record a race of `plans` against fp32 (seconds per call of each)."""


@dataclass
class Choice:
    """What assign_precision decided: its plan, and under "auto" the other precisions' plans
    that fit the budget, most estimated saving first."""

    plans: dict[str, LayerPlan]
    alternatives: list[tuple[Scheme, dict[str, LayerPlan]]] = field(default_factory=list)
    # the first alternative's estimated saving is close to the plan's: time both when the plan wins
    race_runner_up: bool = False


def build_plan(build: BuildStep, choice: Choice, *, auto: bool, fp32_fallback: bool = True,
               race: Race | None = None, history: RaceHistory | None = None) -> Built:
    """Build `choice` as the module docstring says; `race` set means time against fp32, and
    `history` what this host measured in such races before."""
    notes: list[str] = []
    alternatives = list(choice.alternatives)
    plans, decided = choice.plans, True  # decided: still the passes' own plan (not an alternative)
    while True:
        try:
            built, plans = _within_budget(build, plans, notes, decided=decided)
            break
        except BUILD_FAILURES as exc:
            lowered = count_lowered(plans)
            if not (auto and lowered and (fp32_fallback or alternatives)):
                raise
            failed = (f"precision=auto: no backend built the plan with {lowered} lowered layers within the budget "
                      f"({exc.what[:300]})")
            if alternatives:  # the next plan the pass weighed, before giving up on lowering
                (scheme, plans), decided = alternatives.pop(0), False
                notes.append(f"{failed}; next: {scheme}")
                continue
            built = build(all_fp32(plans, f"auto: the lowered plan failed ({type(exc).__name__})"))
            notes.append(f"{failed}; built at fp32 instead")
            break
    if auto and race is not None and count_lowered(plans):
        built = _faster_than_fp32(build, built, plans, alternatives, race, notes,
                                  race_runner_up=choice.race_runner_up and decided, history=history)
    built.report.notes = list(dict.fromkeys([*built.report.notes, *notes]))
    return built


def _within_budget(build: BuildStep, plans: dict[str, LayerPlan], notes: list[str],
                   decided: bool = True) -> tuple[Built, dict[str, LayerPlan]]:
    """The built model and the plan it holds; `decided`: `plans` is the passes' own decision."""
    current: dict[str, LayerPlan] | None = None if decided else plans  # None: the passes' own decision
    for share in (*BACK_OFF_SHARES, None):
        try:
            return build(current), dict(current or plans)
        except VerificationError as exc:
            layers = dict(current or plans)
            lowered = count_lowered(layers)
            if share is None or not lowered:
                raise
            to = float_fallback(layers)
            current, raised = most_sensitive_raised(
                layers, share, f"back to {to or 'fp32'}: the plan with {lowered} lowered layers missed the budget once built", to)
            notes.append(f"precision: the plan with {lowered} lowered layers missed the budget once built "
                         f"({exc.what[:200]}); its {raised} most sensitive "
                         f"{f'{Scheme.INT8_STATIC} layers went to {to}' if to else 'lowered layers went back to fp32'} and it was rebuilt")
    raise AssertionError("unreachable")  # the last share re-raises


def _faster_than_fp32(build: BuildStep, lowered: Built, plans: dict[str, LayerPlan],
                      alternatives: list[tuple[Scheme, dict[str, LayerPlan]]], race: Race, notes: list[str],
                      race_runner_up: bool = False, history: RaceHistory | None = None) -> Built:
    """Keep a lowered plan only if it runs faster than fp32 here: the profile's peak figures that
    chose it are estimates, and a runtime's low-precision kernels can lose to its fp32 ones. With
    `race_runner_up`, a winning plan is also timed against the first alternative, built too."""
    if history is not None and (known := history.known_win(plans)) is not None:
        schemes = ", ".join(sorted({str(p.scheme) for p in plans.values() if p.scheme != Scheme.FP32}))
        notes.append(f"precision=auto: the lowered plan ({count_lowered(plans)} layers, {schemes}) was not timed against "
                     f"fp32, which was not built: {known}; the lowered plan kept")
        if race_runner_up and alternatives:  # the record knows this plan against fp32, not against its runner-up
            losers: list[tuple[Built, str]] = []
            return _with_losers(_faster_of_two(build, lowered, schemes, alternatives[0], race, notes, losers), losers)
        return lowered
    try:
        fp32 = build(all_fp32(plans, "auto: fp32 measured against the lowered plan"))
    except BUILD_FAILURES as exc:
        notes.append(f"precision=auto: the fp32 comparison build failed ({exc.what[:200]}); the lowered plan is kept")
        return lowered
    losers: list[tuple[Built, str]] = []
    while True:
        schemes = ", ".join(sorted({str(p.scheme) for p in plans.values() if p.scheme != Scheme.FP32}))
        wins, timings, last = _beats(race, lowered, fp32)
        if history is not None:
            history.store(plans, *last)
        verdict = (f"precision=auto: the lowered plan ({count_lowered(plans)} layers, {schemes}) ran {timings} "
                   f"(timed interleaved here; kept only when at least {MIN_LEAD:.0%} faster in two races)")
        if wins:
            notes.append(f"{verdict}; the lowered plan kept")
            losers.append((fp32, f"at fp32: slower than the {schemes} plan here"))
            if race_runner_up and alternatives:
                lowered = _faster_of_two(build, lowered, schemes, alternatives[0], race, notes, losers)
            return _with_losers(lowered, losers)
        losers.append((lowered, f"with the {schemes} plan: not faster than fp32 here"))
        notes.append(f"{verdict}; fp32 kept" if not alternatives else f"{verdict}; next: {alternatives[0][0]}")
        if not alternatives:
            return _with_losers(fp32, losers)
        scheme, plans = alternatives.pop(0)
        try:
            lowered = build(plans)
        except BUILD_FAILURES as exc:
            notes.append(f"precision=auto: the {scheme} plan failed ({exc.what[:200]}); fp32 kept")
            return _with_losers(fp32, losers)


def _faster_of_two(build: BuildStep, chosen: Built, schemes: str, runner_up: tuple[Scheme, dict[str, LayerPlan]],
                   race: Race, notes: list[str], losers: list[tuple[Built, str]]) -> Built:
    """`chosen` when it runs more than MIN_LEAD faster than the runner-up plan in two races, else
    the runner-up: a tie goes to it, as the plan saving less estimated time is the more accurate."""
    scheme, plans = runner_up
    try:
        other = build(plans)
    except BUILD_FAILURES as exc:
        notes.append(f"precision=auto: the runner-up {scheme} plan failed ({exc.what[:200]}); the {schemes} plan kept")
        return chosen
    wins, timings, _ = _beats(race, chosen, other)
    notes.append(f"precision=auto: the {schemes} plan ran {timings.replace('fp32', 'the runner-up ' + str(scheme) + ' plan')} "
                 f"(its estimated saving was close); {f'the {schemes} plan kept' if wins else f'the {scheme} plan kept'}")
    if wins:
        losers.append((other, f"with the {scheme} plan: slower than the {schemes} plan here"))
        return chosen
    losers.append((chosen, f"with the {schemes} plan: not faster than the {scheme} plan here"))
    return other


def _beats(race: Race, lowered: Built, fp32: Built) -> tuple[bool, str, tuple[float, float]]:
    """Whether `lowered` runs more than MIN_LEAD faster than `fp32` in a race and in a second
    race after it (run only when the first is won), the timings as text, and the last race's
    (lowered, fp32) seconds."""
    texts = []
    for _ in range(2):
        lowered_s, fp32_s = race(lowered, fp32)
        texts.append(f"{lowered_s * 1e3:.2f} ms, fp32 {fp32_s * 1e3:.2f} ms")
        if lowered_s >= fp32_s * (1 - MIN_LEAD):
            return False, "; re-timed: ".join(texts), (lowered_s, fp32_s)
    return True, "; re-timed: ".join(texts), (lowered_s, fp32_s)


def _with_losers(kept: Built, losers: list[tuple[Built, str]]) -> Built:
    """`kept`, its report listing the losing builds' candidates first: their chosen engines as
    slower, with the reason."""
    earlier = []
    for loser, reason in losers:
        for candidate in loser.report.candidates:
            if candidate.status == "chosen":
                candidate.status, candidate.reason = "slower", reason
            earlier.append(candidate)
    kept.report.candidates = [*earlier, *kept.report.candidates]
    return kept


def count_lowered(plans: LayerPlans) -> int:
    return sum(p.scheme != Scheme.FP32 for p in plans.values())


def all_fp32(plans: LayerPlans, reason: str) -> dict[str, LayerPlan]:
    """Every lowered layer of `plans` back at fp32, with `reason`."""
    return {name: p.at_fp32(reason) if p.scheme != Scheme.FP32 else p for name, p in plans.items()}


def float_fallback(plans: LayerPlans) -> Scheme | None:
    """The float scheme a plan mixing static int8 with it backs off to (its most sensitive int8
    layers go there, so the plan stays one its backend builds), else None: back to fp32."""
    schemes = {p.scheme for p in plans.values()}
    floats = schemes & {Scheme.BF16, Scheme.FP16}
    return next(iter(floats)) if Scheme.INT8_STATIC in schemes and len(floats) == 1 else None


def most_sensitive_raised(plans: LayerPlans, share: float, reason: str,
                          to: Scheme | None = None) -> tuple[dict[str, LayerPlan], int]:
    """The most sensitive `share` of the lowered layers (by the error each caused alone), at
    least one, raised with `reason`: back at fp32, or with `to` (a float scheme) the plan's
    static int8 layers moved to it. Returns the new plans and how many were raised."""
    candidates = [p for p in plans.values() if (p.scheme == Scheme.INT8_STATIC if to else p.scheme != Scheme.FP32)]
    candidates.sort(key=lambda p: -(p.error or 0.0))
    chosen = {p.node for p in candidates[:max(1, math.ceil(share * len(candidates)))]} if candidates else set()
    raise_ = (lambda p: p.at_float(to, reason)) if to else (lambda p: p.at_fp32(reason))
    return {name: raise_(p) if name in chosen else p for name, p in plans.items()}, len(chosen)
