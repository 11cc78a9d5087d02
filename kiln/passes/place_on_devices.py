"""Decide which device, and which backend there, runs each graph node (decide only).

Each node may go to a device where one of the device's backends supports it (the backend's
capability table; when only planning, devices this machine lacks are judged by the table
alone). Among those, the solver (kiln/placement/solver.py) picks the assignment with the
lowest estimated end-to-end latency under kiln's cost model (placement/cost_model.py): node
times plus tensor transfers over the profile's links, graph inputs and outputs on the host.
Why a min cut, not a DP over the topological order: the objective is a sum of per-node and
per-edge terms, which a min cut minimises exactly for two devices (alpha-expansion moves for
more), on any DAG, where a DP is exact only on chains.

Then, in order: user pins win (`CompileOptions(pin={"classifier": "cpu"})`, matched against
module paths from `nn_module_stack` or node names); devices whose memory cannot hold the
weights placed there keep the nodes that save the most time per byte and send the rest to
the host; ops no backend supports anywhere run eagerly in PyTorch on the host ("eager"). On
each device one backend takes all its nodes when one can. Every node's NodeDecision carries
its reasons: unsupported there, cheaper there, kept with its neighbours, doesn't fit, pinned.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch.fx import GraphModule, Node

from kiln.backends import registry
from kiln.errors import BackendUnavailable, OptionsError
from kiln.fx_helpers import in_module, module_hint
from kiln.passes.context import PassContext
from kiln.passes.result import PassResult, Skip
from kiln.placement import cost_model as cm
from kiln.placement.solver import Problem, Value, solve
from kiln.ir import DECISION_META, EAGER
from kiln.types import NodeDecision, Precision

INPUTS, OUTPUT = "\x00inputs", "\x00output"  # solver units pinned to the host


def place_on_devices(gm: GraphModule, ctx: PassContext) -> PassResult:
    profile, host = ctx.profile, cm.host_device(ctx.profile)
    units = [n for n in gm.graph.nodes if _is_unit(n)]
    precision = {n: _precision(n, ctx) for n in units}
    costs = {n: cm.node_cost(gm, n, precision[n]) for n in units}
    backend_cache: dict[str, tuple] = {}
    options, refusals = _candidates(units, ctx, costs, precision, backend_cache)
    pinned = _pins(units, ctx, options, refusals)
    eager = [n for n in units if not options[n]]
    if eager and not ctx.options.eager_fallback:
        first = eager[0]
        raise BackendUnavailable(f"no backend supports {first.target} (node {first.name}) on any device: "
                                 + "; ".join(f"{d}: {r}" for d, r in refusals[first].items()),
                                 where=f"profile {profile.name}",
                                 fix="allow eager_fallback=True, or add a device/backend that runs it")
    for node in eager:
        seconds = cm.node_seconds(costs[node], profile.devices[host], Precision.FP32)
        options[node] = {host: (EAGER, seconds if seconds is not None else 0.0)}
    evicted: dict[Node, str] = {}
    labels = _solve(gm, units, options, costs, ctx, host)
    for _ in profile.devices:  # each round frees at least one over-full device
        if not _evict_over_capacity(units, labels, options, costs, ctx, host, evicted, pinned):
            break
        labels = _solve(gm, units, options, costs, ctx, host)
    backends = _backends_per_device(units, labels, options, ctx, backend_cache)
    skips = _decide(gm, units, labels, backends, options, refusals, pinned, evicted, eager, ctx)
    counts: dict[str, int] = {}
    for node in units:
        key = f"{labels[node]}/{backends[node]}"
        counts[key] = counts.get(key, 0) + 1
    placed = sum(isinstance(d := n.meta.get(DECISION_META), NodeDecision) and d.device is not None for n in gm.graph.nodes)
    return PassResult(False, counts, tuple(skips), annotated=placed)


def _is_unit(node: Node) -> bool:
    """Nodes placed by the solver: ATen ops producing tensors. getitem follows its producer,
    assertions their input, and shape arithmetic is recomputed where it is used."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return False
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) or isinstance(val, (list, tuple)) and all(isinstance(v, torch.Tensor) for v in val)


def _precision(node: Node, ctx: PassContext) -> Precision:
    decision = node.meta.get(DECISION_META)
    if isinstance(decision, NodeDecision):
        return decision.precision
    # without assign_precision's decision: the requested precision, fp32 for "auto"
    return ctx.options.precision if isinstance(ctx.options.precision, Precision) else Precision.FP32


def _candidates(units, ctx: PassContext, costs, precision, cache: dict):
    """node -> {device: (backend, seconds)} where it can run, and node -> {device: why not}."""
    options = {n: {} for n in units}
    refusals = {n: {} for n in units}
    for name, device in ctx.profile.devices.items():
        usable, why = [], []
        for backend_name in ctx.options.backends_for(device):
            backend, reason = _backend(backend_name, cache, ctx.plan_only)
            (usable.append(backend) if backend is not None else why.append(f"{backend_name}: {reason}"))
        for node in units:
            seconds = cm.node_seconds(costs[node], device, precision[node])
            if seconds is None:
                refusals[node][name] = f"{name} does not run {precision[node].value}"
                continue
            reasons = list(why)
            for backend in usable:
                support = _supports(backend, node, device, precision[node], not ctx.plan_only)
                if support.ok:
                    options[node][name] = (backend.name, seconds)
                    break
                reasons.append(f"{backend.name}: {support.reason}")
            else:
                refusals[node][name] = "; ".join(reasons) or "no backends listed"
    return options, refusals


def _backend(name: str, cache: dict, planning: bool = False):
    """(backend, "") when it can take part, else (None, why). A plan for another machine asks
    only the capability table, so a runtime missing here does not exclude its backend."""
    if name not in cache:
        try:
            backend = registry.get(name)
            status = backend.available()
            ok = status.ok or planning
            cache[name] = (backend, "") if ok else (None, f"{status.reason} ({status.install_hint})")
        except BackendUnavailable as exc:
            cache[name] = (None, exc.what)
    return cache[name]


def _supports(backend, node: Node, device, precision: Precision, check_ready: bool):
    return backend.supports(node, device, precision, check_ready=check_ready)


def _pins(units, ctx: PassContext, options, refusals) -> dict[Node, str]:
    pinned: dict[Node, str] = {}
    for key, device in ctx.options.pin.items():
        if device not in ctx.profile.devices:
            raise OptionsError(f"pin {key!r} names device {device!r}, which profile {ctx.profile.name} lacks",
                               where="options.pin", fix=f"use one of {', '.join(ctx.profile.devices)}")
        matched = [n for n in units if in_module(n, key)]
        if not matched:
            raise OptionsError(f"pin {key!r} matches no node", where="options.pin", fix=module_hint(units, key))
        for node in matched:
            if device not in options[node]:
                raise OptionsError(f"pin {key!r} puts node {node.name} ({node.target}) on {device}, which cannot run it: "
                                   f"{refusals[node].get(device, '')}", where="options.pin", fix="pin a smaller module, or another device")
            options[node] = {device: options[node][device]}
            pinned[node] = f"pinned to {device} by CompileOptions(pin={{{key!r}: {device!r}}})"
    return pinned


def _solve(gm: GraphModule, units, options, costs, ctx: PassContext, host: str) -> dict[Node, str]:
    names = {n: n.name for n in units}
    cost = {names[n]: {d: s for d, (_, s) in options[n].items()} for n in units}
    cost[INPUTS] = {host: 0.0}
    cost[OUTPUT] = {host: 0.0}
    problem = Problem(list(ctx.profile.devices), cost, _values(gm, units, names),
                      lambda size, a, b: cm.transfer_seconds(size, a, b, ctx.profile))
    primary = ctx.profile.primary_device
    problem.start = {names[n]: primary for n in units if primary in options[n]}
    labels = solve(problem)
    return {n: labels[names[n]] for n in units}


def _values(gm: GraphModule, units, names) -> list[Value]:
    """Tensors between units: each unit's output (through getitem for multi-output ops), the
    graph inputs as one host-resident unit, and the graph output as one host-resident reader."""
    unit_set = set(units)
    values = []

    def readers(node: Node) -> tuple[str, ...]:
        found = []
        for user in node.users:
            if user in unit_set:
                found.append(names[user])
            elif user.op == "output":
                found.append(OUTPUT)
            elif user.op == "call_function" and not _is_unit(user):  # views/getitem: follow through
                found.extend(readers(user))
        return tuple(dict.fromkeys(found))

    for node in [*units, *(n for n in gm.graph.nodes if n.op == "placeholder")]:
        producer = INPUTS if node.op == "placeholder" else names[node]
        outputs = [u for u in node.users if u.op == "call_function" and u.target.__name__ == "getitem"] \
            if isinstance(node.meta.get("val"), (tuple, list)) else [node]
        for out in outputs:
            consumers = readers(out)
            if consumers:
                values.append(Value(producer, cm.tensor_bytes(out.meta.get("val")), consumers))
    return values


def _evict_over_capacity(units, labels, options, costs, ctx: PassContext, host: str, evicted: dict, pinned: dict) -> bool:
    """Over-full devices keep the nodes that save the most time per weight byte; the others
    lose that device as an option. Returns whether anything moved."""
    moved = False
    for name, device in ctx.profile.devices.items():
        if name == host:
            continue
        placed = [n for n in units if labels[n] == name]
        capacity = device.memory_gb * 1e9
        weights = {k: v for n in placed for k, v in costs[n].weight_bytes.items()}
        if sum(weights.values()) <= capacity:
            continue

        def saving_per_byte(node: Node) -> float:
            here = options[node][name][1]
            there = options[node].get(host, (None, math.inf))[1]
            return (there - here) / max(sum(costs[node].weight_bytes.values()), 1.0)

        kept: set[str] = set()
        for node in sorted(placed, key=saving_per_byte, reverse=True):
            new = {k: v for k, v in costs[node].weight_bytes.items() if k not in kept}
            must_stay = host not in options[node] or node in pinned
            if sum(weights[k] for k in kept) + sum(new.values()) <= capacity or must_stay:
                kept.update(new)
                continue
            del options[node][name]
            evicted[node] = (f"doesn't fit on {name}: its {device.memory_gb:g} GB cannot hold all "
                             f"{sum(weights.values()) / 1e9:.3g} GB of weights placed there; nodes saving the most time per byte stayed")
            moved = True
    return moved


def _backends_per_device(units, labels, options, ctx: PassContext, cache: dict) -> dict[Node, str]:
    """One backend per device when a single one can take all its nodes (fewer partitions)."""
    chosen = {}
    for name, device in ctx.profile.devices.items():
        placed = [n for n in units if labels[n] == name and options[n][name][0] != EAGER]
        common = next((b for b in ctx.options.backends_for(device) if all(options[n][name][0] == b or
                                                                     _also_supports(n, b, name, ctx, cache) for n in placed)), None)
        for node in placed:
            chosen[node] = common or options[node][name][0]
    for node in units:
        chosen.setdefault(node, EAGER)
    return chosen


def _also_supports(node: Node, backend_name: str, device: str, ctx: PassContext, cache: dict) -> bool:
    backend, _ = _backend(backend_name, cache, ctx.plan_only)
    if backend is None:
        return False
    return _supports(backend, node, ctx.profile.devices[device], _precision(node, ctx), not ctx.plan_only).ok


def _decide(gm, units, labels, backends, options, refusals, pinned, evicted, eager, ctx: PassContext) -> list[Skip]:
    skips = []
    for node in units:
        device = labels[node]
        here = options[node][device][1]
        reasons = [f"on {device} via {backends[node]}: est. {here * 1e6:.1f} us"]
        if node in pinned:
            reasons.append(pinned[node])
        if node in eager:
            reasons.append(f"no backend supports {node.target} on any device ({'; '.join(f'{d}: {r}' for d, r in refusals[node].items())}); "
                           f"runs eagerly in PyTorch on {device}")
            skips.append(Skip(node.name, f"eager fallback for {node.target} on {device}"))
        others = {d: s for d, (_, s) in options[node].items() if d != device}
        if others:
            best = min(others, key=others.get)
            if others[best] >= here:
                reasons.append(f"cheaper here than on {best} ({others[best] * 1e6:.1f} us)")
            else:
                reasons.append(f"kept with its neighbours: {best} would take {others[best] * 1e6:.1f} us but moving tensors costs more")
        for other, why in refusals[node].items():
            reasons.append(f"not on {other}: {why}")
        if node in evicted:
            reasons.append(evicted[node])
            skips.append(Skip(node.name, evicted[node]))
        old = node.meta.get(DECISION_META)
        base = old if isinstance(old, NodeDecision) else NodeDecision(precision=_precision(node, ctx))
        node.meta[DECISION_META] = dataclasses.replace(base, device=device, backend=backends[node], reasons=(*base.reasons, *reasons))
    _follow_producers(gm, labels, backends)
    return skips


def _follow_producers(gm: GraphModule, labels, backends) -> None:
    """getitem, assertions and shape arithmetic go with a placed node they read or, for a graph
    input, with a placed node that reads the same input."""
    placed = lambda n: isinstance(n.meta.get(DECISION_META), NodeDecision) and n.meta[DECISION_META].device  # noqa: E731
    for node in gm.graph.nodes:
        if node.op != "call_function" or node in labels:
            continue
        neighbours = [*node.all_input_nodes, *(u for a in node.all_input_nodes for u in a.users if u is not node)]
        source = next((a for a in neighbours if placed(a)), None)
        if source is not None:
            decision = source.meta[DECISION_META]
            node.meta[DECISION_META] = NodeDecision(decision.precision, decision.device, decision.backend,
                                             (f"follows {source.name}",))
