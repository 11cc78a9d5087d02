"""A seeded generator of small, valid, random PyTorch models for differential fuzzing of kiln.

    model, example_inputs, dynamic = random_model(seed)

The model is an interpreter over a random list of steps (one op each: conv, linear, norms,
activations, attention, reshapes, broadcasts, reductions, concat/split, pooling, embedding),
so torch.export traces only the ops the steps name. Everything random comes from the seed: the
structure from `random.Random`, the weights from torch's RNG under a fixed seed, so two calls
with one seed give models with the same structure, weights and outputs.

Each step is validated while the model grows: it must run eagerly at the example's batch
size and, when the batch is dynamic, at a second batch size, giving consistent shapes (axis 0
follows the batch or does not depend on it), so a model never bakes the example batch into a
shape. A finished model is kept only if it runs eagerly (also at batch 1 when dynamic), its
outputs are finite, and it is well conditioned: its float32 outputs agree with a float64 run
far inside kiln's fp32 tolerance, so a mismatch later is the compiler's, not rounding noise.
A seed whose draft fails any check moves on to the next draft of the same seed.
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn

MAX_STEPS = 8
MAX_PER_SAMPLE = 4096  # elements per batch sample of any intermediate value
MAX_ATTEMPTS = 50
FLOAT_NAMES = ("x", "y", "z")
FP32_RTOL = FP32_ATOL = 1e-4  # kiln.verify.TOLERANCE[FP32]; the conditioning check uses a fraction
CONDITIONING = 0.2  # float32-vs-float64 error may use at most this fraction of the fp32 tolerance


@dataclass
class Step:
    kind: str
    args: tuple[int, ...]  # indices into the value list (inputs first, then step outputs)
    params: dict = field(default_factory=dict)
    label: str = ""


@dataclass(frozen=True)
class InputInfo:
    name: str
    shape: tuple[int, ...]  # at the example batch size
    batched: bool  # axis 0 is the (possibly dynamic) batch
    is_ids: bool = False
    high: int = 0  # ids are drawn in [0, high)


class FuzzModel(nn.Module):
    """Runs `steps` over its inputs; returns the values `outputs` names as `out_kind`."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleDict()
        self.steps: list[Step] = []
        self.input_names: list[str] = []
        self.outputs: list[int] = []
        self.out_kind = "single"
        self.out_keys: list[str] = []
        self.fuzz_info: dict = {}

    def forward(self, x=None, y=None, z=None, ids=None):
        given = {"x": x, "y": y, "z": z, "ids": ids}
        env = [given[n] for n in self.input_names]
        for step in self.steps:
            out = OPS[step.kind](self, step, [env[i] for i in step.args])
            env.extend(out if isinstance(out, (tuple, list)) else (out,))
        outs = [env[i] for i in self.outputs]
        if self.out_kind == "single":
            return outs[0]
        if self.out_kind == "tuple":
            return tuple(outs)
        if self.out_kind == "list":
            return list(outs)
        return {k: v for k, v in zip(self.out_keys, outs)}


# ----------------------------------------------------------------------------------------------
# Step implementations: (model, step, args) -> tensor or tuple of tensors. Shapes that depend on
# the batch read it at run time (x.shape[0]) so dynamic batch stays symbolic under export.

def _layer(m: FuzzModel, s: Step) -> nn.Module:
    return m.layers[s.params["layer"]]


def _tensor(m: FuzzModel, name: str) -> torch.Tensor:
    return getattr(m, name)


def _act(m, s, a):
    x, fn, p = a[0], s.params["fn"], s.params
    if "layer" in p:
        return _layer(m, s)(x)
    if fn == "relu":
        return F.relu(x) if p.get("style") else torch.relu(x)
    if fn == "gelu":
        return F.gelu(x)
    if fn == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if fn == "silu":
        return F.silu(x)
    if fn == "hardswish":
        return F.hardswish(x)
    if fn == "sigmoid":
        return torch.sigmoid(x) if p.get("style") else x.sigmoid()
    if fn == "tanh":
        return torch.tanh(x)
    if fn == "relu6":
        return F.relu6(x)
    if fn == "hardtanh":
        return F.hardtanh(x, p["lo"], p["hi"])
    if fn == "softmax":
        return F.softmax(x, dim=p["dim"]) if p.get("style") else x.softmax(p["dim"])
    if fn == "log_softmax":
        return F.log_softmax(x, dim=p["dim"])
    if fn == "dropout":
        return F.dropout(x, p["p"], training=m.training)
    raise AssertionError(fn)


def _module(m, s, a):
    return _layer(m, s)(a[0])


def _matmul_w(m, s, a):
    w = _tensor(m, s.params["w"])
    return torch.matmul(a[0], w) if s.params.get("style") else a[0] @ w


def _matmul_vv(m, s, a):
    x, p = a[0], s.params
    if p["form"] == "gram":
        return x @ x.transpose(-1, -2)
    if p["form"] == "gram_t":
        return torch.matmul(x.transpose(-1, -2), x)
    if p["form"] == "bmm_self":
        return torch.bmm(x, x.transpose(1, 2))
    if p["form"] == "bmm_w":
        return torch.bmm(x, _tensor(m, p["w"]))
    if p["form"] == "bmm":
        return torch.bmm(x, a[1])
    return torch.matmul(x, a[1])


def _attention(m, s, a):
    p = s.params
    x = a[0]
    kv = a[1] if len(a) > 1 else x
    b, L, S, H, dh = x.shape[0], p["L"], p["S"], p["H"], p["dh"]
    if p["fused"]:
        q, k, v = m.layers[p["qkv"]](x).chunk(3, dim=-1)
    else:
        q, k, v = m.layers[p["q"]](x), m.layers[p["k"]](kv), m.layers[p["v"]](kv)
    if H:
        q = q.reshape(b, L, H, dh).transpose(1, 2)
        k = k.view(b, S, H, dh).transpose(1, 2)
        v = v.reshape(b, S, H, dh).permute(0, 2, 1, 3)
    mask = None
    if p["mask"] in ("additive", "bool"):
        mask = _tensor(m, p["mask_name"])
    if p["impl"] == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=p["mask"] == "causal", scale=p["scale"])
    else:
        scale = p["scale"] if p["scale"] is not None else 1.0 / math.sqrt(q.shape[-1])
        scores = q @ k.transpose(-2, -1) * scale
        if p["mask"] == "causal":
            scores = scores.masked_fill(_tensor(m, p["mask_name"]), float("-inf"))
        elif p["mask"] == "additive":
            scores = scores + mask
        elif p["mask"] == "bool":
            scores = scores.masked_fill(~mask, float("-inf"))
        out = torch.softmax(scores, dim=-1) @ v
    if H:
        out = out.transpose(1, 2).reshape(b, L, H * dh)
    return m.layers[p["o"]](out) if p["o"] else out


def _reshape(m, s, a):
    x, p = a[0], s.params
    f = p["form"]
    if f == "flatten":
        return torch.flatten(x, p["start"], p["end"]) if p.get("style") else x.flatten(p["start"], p["end"])
    if f == "flatten_mod":
        return _layer(m, s)(x)
    if f in ("reshape", "view"):
        shape = (x.shape[0], *p["shape"]) if p["keep0"] else tuple(p["shape"])
        return x.reshape(shape) if f == "reshape" else x.view(shape)
    if f == "permute":
        return x.permute(*p["perm"])
    if f == "transpose":
        return x.transpose(p["d0"], p["d1"])
    if f == "transpose_contig":
        return x.transpose(p["d0"], p["d1"]).contiguous()
    if f == "unsqueeze":
        return x.unsqueeze(p["dim"])
    if f == "squeeze":
        return x.squeeze(p["dim"])
    raise AssertionError(f)


def _binary(m, s, a):
    p = s.params
    x = a[0]
    if p["src"] == "value":
        other = a[1]
    elif p["src"] == "param":
        other = _tensor(m, p["w"])
    elif p["src"] == "param_expr":  # weights-only work: kiln's constant folding precomputes it
        w, w2 = _tensor(m, p["w"]), _tensor(m, p["w2"])
        other = (w * w2 + 0.5 * w).transpose(-1, -2).transpose(-1, -2) if w.dim() >= 2 else w * w2 + 0.5 * w
    else:
        other = p["c"]
    op, flip = p["op"], p["flip"]
    lhs, rhs = (other, x) if flip else (x, other)
    if op == "add":
        return lhs + rhs if p.get("alpha") is None else torch.add(lhs, rhs, alpha=p["alpha"])
    if op == "sub":
        return lhs - rhs
    if op == "mul":
        return torch.mul(lhs, rhs) if p.get("style") else lhs * rhs
    if op == "div":
        if p["src"] == "value":  # a value denominator is kept away from zero
            return lhs / (rhs.abs() + 1.0)
        return torch.div(lhs, rhs) if p.get("style") else lhs / rhs
    raise AssertionError(op)


def _reduce(m, s, a):
    x, p = a[0], s.params
    dims = p["dims"]
    if p["op"] == "sum":
        return x.sum() if dims is None else torch.sum(x, dim=dims, keepdim=p["keepdim"])
    if p["op"] == "mean":
        return x.mean() if dims is None else x.mean(dim=dims, keepdim=p["keepdim"])
    return torch.amax(x, dim=dims, keepdim=p["keepdim"])


def _concat(m, s, a):
    p = s.params
    parts = [a[i] for i in p["order"]]
    return torch.cat(parts, dim=p["dim"]) if p["form"] == "cat" else torch.stack(parts, dim=p["dim"])


def _split(m, s, a):
    p = s.params
    if p["form"] == "chunk":
        return tuple(torch.chunk(a[0], p["n"], dim=p["dim"]))
    return tuple(torch.split(a[0], p["sizes"], dim=p["dim"]))


def _pool(m, s, a):
    x, p = a[0], s.params
    f, nd = p["form"], p["nd"]
    if f == "max":
        fn = F.max_pool1d if nd == 1 else F.max_pool2d
        return fn(x, p["k"], p["stride"], p["pad"], p["dil"], ceil_mode=p["ceil"])
    if f == "avg":
        fn = F.avg_pool1d if nd == 1 else F.avg_pool2d
        return fn(x, p["k"], p["stride"], p["pad"], ceil_mode=p["ceil"], count_include_pad=p["cip"])
    if f == "module":
        return _layer(m, s)(x)
    fn = F.adaptive_avg_pool1d if nd == 1 else F.adaptive_avg_pool2d
    return fn(x, p["out"])


def _embedding(m, s, a):
    if "layer" in s.params:
        return _layer(m, s)(a[0])
    return F.embedding(a[0], _tensor(m, s.params["w"]))


OPS = {
    "act": _act, "module": _module, "matmul_w": _matmul_w, "matmul_vv": _matmul_vv, "attention": _attention,
    "reshape": _reshape, "binary": _binary, "reduce": _reduce, "concat": _concat, "split": _split, "pool": _pool,
    "embedding": _embedding,
}


# ----------------------------------------------------------------------------------------------
# The builder: grows a model step by step, validating each step on example values.

class _Reject(Exception):
    pass


def _dim(rng: random.Random, lo: int = 1, hi: int = 16) -> int:
    """A size in [lo, hi], mostly small, sometimes 1."""
    if lo <= 1 and rng.random() < 0.1:
        return 1
    return rng.choice([v for v in (2, 3, 4, 5, 6, 7, 8, 9, 12, 16) if lo <= v <= hi] or [lo])


class _Builder:
    def __init__(self, seed: int, attempt: int):
        self.seed, self.attempt = seed, attempt
        self.rng = random.Random(seed * 1000003 + attempt)
        self.model = FuzzModel()
        self.dynamic = self.rng.random() < 0.35
        self.batch = self.rng.choice([2, 3, 4]) if self.dynamic else self.rng.choice([1, 1, 2, 2, 3, 4])
        self.batch2 = self.batch + self.rng.choice([1, 2, 3])  # a second size to prove batch-generic shapes
        self.envs: list[list[torch.Tensor]] = []  # one value list per validation batch size
        self.batched: list[bool] = []
        self.is_ids: list[bool] = []
        self.inputs: list[InputInfo] = []
        self.counter = 0

    # -- helpers ---------------------------------------------------------------------------
    def name(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def shape(self, i: int) -> tuple[int, ...]:
        return tuple(self.envs[0][i].shape)

    def floats(self, pred=lambda shape, batched: True) -> list[int]:
        return [i for i in range(len(self.envs[0])) if not self.is_ids[i] and pred(self.shape(i), self.batched[i])]

    def pick(self, candidates: list[int]) -> int:
        if not candidates:
            raise _Reject("no candidate value")
        return self.rng.choices(candidates, weights=[1 + 2 * k for k in range(len(candidates))])[0]

    def first_free_axis(self, i: int) -> int:
        return 1 if self.batched[i] else 0

    def add_param(self, tensor: torch.Tensor, prefix: str = "w") -> str:
        name = self.name(prefix)
        if tensor.is_floating_point() and self.rng.random() < 0.7:
            self.model.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
        else:
            self.model.register_buffer(name, tensor)
        return name

    def add_layer(self, module: nn.Module) -> str:
        name = self.name("l")
        self.model.layers[name] = module.eval()
        return name

    def add(self, kind: str, args: tuple[int, ...], params: dict, label: str) -> list[int]:
        """Append a step after checking it on every validation env; return the new value indices."""
        step = Step(kind, tuple(args), params, label)
        results = []
        try:
            with torch.no_grad():
                for env in self.envs:
                    out = OPS[kind](self.model, step, [env[i] for i in args])
                    results.append(list(out) if isinstance(out, (tuple, list)) else [out])
        except Exception as exc:
            raise _Reject(f"{label}: {type(exc).__name__}: {exc}") from None
        flags = []
        for k, first in enumerate(results[0]):
            if not torch.is_tensor(first) or not first.is_floating_point():
                raise _Reject(f"{label}: non-float result")
            per_sample = first.numel() // max(1, first.shape[0]) if first.dim() else 1
            if per_sample > MAX_PER_SAMPLE or first.numel() == 0:
                raise _Reject(f"{label}: size {tuple(first.shape)}")
            if len(results) == 1:
                flags.append(first.dim() > 0 and first.shape[0] == self.batch and self.batched_hint(args))
                continue
            second = results[1][k]
            s1, s2 = tuple(first.shape), tuple(second.shape)
            if s1 and s2 and s1[0] == self.batch and s2[0] == self.batch2 and s1[1:] == s2[1:]:
                flags.append(True)
            elif s1 == s2:
                flags.append(False)
            else:
                raise _Reject(f"{label}: shape {s1} at batch {self.batch} but {s2} at {self.batch2}")
        self.model.steps.append(step)
        start = len(self.envs[0])
        for env, outs in zip(self.envs, results):
            env.extend(outs)
        self.batched.extend(flags)
        self.is_ids.extend([False] * len(flags))
        return list(range(start, len(self.envs[0])))

    def batched_hint(self, args) -> bool:
        # static models: "batched" only steers which axes ops avoid; follow the first argument
        return bool(args) and self.batched[args[0]]

    # -- inputs ------------------------------------------------------------------------------
    def make_inputs(self) -> None:
        rng = self.rng
        n_float = rng.choices([1, 2, 3], weights=[6, 3, 1])[0]
        has_ids = rng.random() < 0.2
        if has_ids and rng.random() < 0.25:
            n_float = 0
        first_shape = None
        for k in range(n_float):
            name = FLOAT_NAMES[k]
            batched = k == 0 or not self.dynamic or rng.random() < 0.75
            if first_shape is not None and rng.random() < 0.4:
                rest = first_shape  # same layout as x: binary ops between inputs become likely
            else:
                rank = rng.choices([1, 2, 3, 4], weights=[1, 3, 4, 4])[0]
                rest = self.sample_shape(rank - 1 if batched else rank)
            shape = ((self.batch,) if batched else ()) + tuple(rest)
            if k == 0:
                first_shape = rest
            self.inputs.append(InputInfo(name, shape, batched))
        if has_ids:
            vocab = rng.choice([3, 5, 10, 16, 50])
            rest = rng.choice([(), (_dim(rng, 2),), (_dim(rng, 2),), (_dim(rng, 2, 4), _dim(rng, 2, 4))])
            self.inputs.append(InputInfo("ids", (self.batch, *rest), True, True, vocab))
        self.model.input_names = [i.name for i in self.inputs]
        self.model.fuzz_info["inputs"] = self.inputs
        gen = torch.Generator().manual_seed(self.seed)
        batches = [self.batch, self.batch2] if self.dynamic else [self.batch]
        for b in batches:
            self.envs.append([_draw(info, b, gen) for info in self.inputs])
        self.batched = [i.batched for i in self.inputs]
        self.is_ids = [i.is_ids for i in self.inputs]

    def sample_shape(self, rank: int) -> tuple[int, ...]:
        for _ in range(20):
            shape = tuple(_dim(self.rng) for _ in range(rank))
            if math.prod(shape) <= 1024:
                return shape
        return tuple(_dim(self.rng, 1, 4) for _ in range(rank))

    # -- ops ---------------------------------------------------------------------------------
    def op_act(self):
        rng = self.rng
        i = self.pick(self.floats())
        fn = rng.choice(["relu", "gelu", "gelu_tanh", "silu", "hardswish", "sigmoid", "tanh", "relu6", "hardtanh",
                         "softmax", "log_softmax", "dropout"])
        rank = len(self.shape(i))
        params: dict[str, Any] = {"fn": fn, "style": rng.random() < 0.5}
        if fn == "hardtanh":
            lo = rng.choice([-1.0, -0.5, -2.0, 0.0])
            params.update(lo=lo, hi=lo + rng.choice([0.5, 1.0, 2.0, 3.0]))
        if fn in ("softmax", "log_softmax"):
            if rank == 0:
                raise _Reject("softmax of a scalar")
            params["dim"] = rng.choice([rng.randrange(rank), -1])
        if fn == "dropout":
            params["p"] = rng.choice([0.1, 0.5])
        if rng.random() < 0.35:  # the nn.Module spelling of the same op
            module = {
                "relu": lambda: nn.ReLU(), "gelu": lambda: nn.GELU(), "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
                "silu": lambda: nn.SiLU(), "hardswish": lambda: nn.Hardswish(), "sigmoid": lambda: nn.Sigmoid(),
                "tanh": lambda: nn.Tanh(), "relu6": lambda: nn.ReLU6(),
                "hardtanh": lambda: nn.Hardtanh(params["lo"], params["hi"]),
                "softmax": lambda: nn.Softmax(dim=params["dim"]), "log_softmax": lambda: nn.LogSoftmax(dim=params["dim"]),
                "dropout": lambda: nn.Dropout(params["p"]),
            }[fn]()
            params["layer"] = self.add_layer(module)
        self.add("act", (i,), params, f"{fn}{'(mod)' if 'layer' in params else ''}")

    def op_linear(self, then_bn: bool = False):
        rng = self.rng
        i = self.pick(self.floats(lambda s, b: len(s) >= 1 and s[-1] <= 64))
        d_in = self.shape(i)[-1]
        d_out = _dim(rng, 1, 16)
        bias = rng.random() < 0.75
        layer = self.add_layer(nn.Linear(d_in, d_out, bias=bias))
        (j,) = self.add("module", (i,), {"layer": layer}, f"linear({d_in}->{d_out}{'' if bias else ',nobias'})")
        if then_bn or (len(self.shape(j)) == 2 and rng.random() < 0.2):
            self.op_batchnorm(j)

    def op_conv(self, then_bn: bool = False):
        rng = self.rng
        i = self.pick(self.floats(lambda s, b: len(s) in (3, 4) and s[1] <= 32))
        shape = self.shape(i)
        nd = len(shape) - 2
        c_in = shape[1]
        groups = rng.choice([g for g in range(1, c_in + 1) if c_in % g == 0]) if rng.random() < 0.4 else 1
        c_out = groups * rng.choice([1, 2, 3, 4]) if groups > 1 else _dim(rng, 1, 16)
        if rng.random() < 0.15 and groups > 1:
            c_out = groups  # depthwise
        k = rng.choice([1, 2, 3, 3, 5])
        stride = rng.choice([1, 1, 1, 2, 3])
        dil = rng.choice([1, 1, 1, 2])
        if stride == 1 and rng.random() < 0.15:
            pad: Any = "same"
        else:
            pad = rng.choice([0, 0, 1, k // 2, (k - 1) * dil // 2])
        if nd == 2 and pad != "same" and rng.random() < 0.2:
            pad = (rng.choice([0, 1]), rng.choice([0, 1, 2]))
        bias = rng.random() < 0.7
        cls = nn.Conv1d if nd == 1 else nn.Conv2d
        layer = self.add_layer(cls(c_in, c_out, k, stride=stride, padding=pad, dilation=dil, groups=groups, bias=bias))
        label = f"conv{nd}d({c_in}->{c_out},k={k},s={stride},p={pad},d={dil},g={groups}{'' if bias else ',nobias'})"
        (j,) = self.add("module", (i,), {"layer": layer}, label)
        if then_bn:
            self.op_batchnorm(j)

    def op_batchnorm(self, i: int | None = None):
        rng = self.rng
        if i is None:
            i = self.pick(self.floats(lambda s, b: len(s) in (2, 3, 4)))
        shape = self.shape(i)
        if len(shape) not in (2, 3, 4):
            raise _Reject("batchnorm rank")
        cls = nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d
        track = rng.random() < 0.92
        affine = rng.random() < 0.8
        bn = cls(shape[1], eps=rng.choice([1e-5, 1e-3]), momentum=rng.choice([0.1, 0.3, None]), affine=affine,
                 track_running_stats=track)
        layer = self.add_layer(bn)
        self.add("module", (i,), {"layer": layer}, f"batchnorm{len(shape) - 2 if len(shape) == 4 else 1}d"
                 f"({shape[1]}{'' if affine else ',noaffine'}{'' if track else ',batchstats'})")

    def op_layernorm(self):
        rng = self.rng
        i = self.pick(self.floats(lambda s, b: len(s) >= 1))
        shape = self.shape(i)
        free = len(shape) - self.first_free_axis(i)
        if free < 1:
            raise _Reject("layernorm needs a non-batch axis")
        k = rng.choice([1, 1, 2]) if free >= 2 else 1
        normalized = shape[-k:]
        if math.prod(normalized) < 4:
            raise _Reject("layernorm over fewer than 4 elements is ill-conditioned")
        if rng.random() < 0.25:
            params = {"layer": self.add_layer(nn.LayerNorm(normalized, elementwise_affine=False))}
            label = f"layernorm({normalized},noaffine)"
        else:
            bias = rng.random() < 0.85
            params = {"layer": self.add_layer(nn.LayerNorm(normalized, eps=rng.choice([1e-5, 1e-6]), bias=bias))}
            label = f"layernorm({normalized}{'' if bias else ',nobias'})"
        self.add("module", (i,), params, label)

    def op_groupnorm(self):
        rng = self.rng
        i = self.pick(self.floats(lambda s, b: len(s) >= 2 and s[1] >= 2))
        shape = self.shape(i)
        c = shape[1]
        groups = rng.choice([g for g in range(1, c + 1) if c % g == 0])
        if math.prod(shape[2:]) * (c // groups) < 4:
            raise _Reject("groupnorm over fewer than 4 elements is ill-conditioned")
        affine = rng.random() < 0.8
        layer = self.add_layer(nn.GroupNorm(groups, c, affine=affine))
        self.add("module", (i,), {"layer": layer}, f"groupnorm({groups},{c}{'' if affine else ',noaffine'})")

    def op_matmul(self):
        rng = self.rng
        form = rng.choice(["w", "w", "gram", "gram_t", "bmm_self", "bmm_w", "vv", "bmm"])
        if form == "w":
            i = self.pick(self.floats(lambda s, b: len(s) >= 1))
            k = self.shape(i)[-1]
            n = _dim(rng, 1, 16)
            w = self.add_param(torch.randn(k, n) / math.sqrt(k))
            self.add("matmul_w", (i,), {"w": w, "style": rng.random() < 0.5}, f"matmul(x,W[{k}x{n}])")
        elif form in ("gram", "gram_t"):
            i = self.pick(self.floats(lambda s, b: len(s) >= 2 and (len(s) > 2 or not b)))
            self.add("matmul_vv", (i,), {"form": form}, f"matmul({form})")
        elif form == "bmm_self":
            i = self.pick(self.floats(lambda s, b: len(s) == 3))
            self.add("matmul_vv", (i,), {"form": form}, "bmm(x,x^T)")
        elif form == "bmm_w":
            i = self.pick(self.floats(lambda s, b: len(s) == 3 and not b))
            s = self.shape(i)
            w = self.add_param(torch.randn(s[0], s[2], _dim(rng, 1, 8)) / math.sqrt(s[2]))
            self.add("matmul_vv", (i,), {"form": form, "w": w}, "bmm(x,W)")
        else:
            rank3 = form == "bmm"
            i = self.pick(self.floats(lambda s, b: len(s) == 3 if rank3 else len(s) >= 2))
            si = self.shape(i)

            def fits(s, b):
                if rank3:
                    return len(s) == 3 and s[0] == si[0] and s[1] == si[2] and b == self.batched[i]
                if len(s) < 2 or s[-2] != si[-1]:
                    return False
                try:
                    torch.broadcast_shapes(si[:-2], s[:-2])
                    return True
                except RuntimeError:
                    return False

            j = self.pick(self.floats(fits))
            self.add("matmul_vv", (i, j), {"form": form}, f"{'bmm' if rank3 else 'matmul'}(a,b)")

    def op_attention(self):
        rng = self.rng
        i = self.pick(self.floats(lambda s, b: len(s) == 3 and s[2] <= 64))
        b, L, D = self.shape(i)
        cross = [j for j in self.floats(lambda s, bb: len(s) == 3 and s[0] == b and s[2] <= 64)
                 if j != i and self.batched[j] == self.batched[i]]
        args: tuple[int, ...] = (i,)
        S, D2 = L, D
        if cross and rng.random() < 0.3:
            j = self.pick(cross)
            args, (S, D2) = (i, j), self.shape(j)[1:]
        H = rng.choice([0, 1, 2, 4])
        dh = rng.choice([2, 4, 8])
        E = H * dh if H else rng.choice([4, 8])
        fused = len(args) == 1 and rng.random() < 0.4
        params: dict[str, Any] = {"L": L, "S": S, "H": H, "dh": dh, "fused": fused,
                                  "impl": rng.choice(["sdpa", "sdpa", "manual"]),
                                  "scale": rng.choice([None, None, 0.5, 1.0 / E]),
                                  "mask": rng.choice(["none", "causal", "additive", "bool"])}
        if fused:
            params["qkv"] = self.add_layer(nn.Linear(D, 3 * E))
        else:
            params["q"] = self.add_layer(nn.Linear(D, E))
            params["k"] = self.add_layer(nn.Linear(D2, E, bias=rng.random() < 0.7))
            params["v"] = self.add_layer(nn.Linear(D2, E))
        params["o"] = self.add_layer(nn.Linear(E, _dim(rng, 2, 16))) if rng.random() < 0.7 else None
        mask_shape = rng.choice([(L, S), (1, L, S)] + ([(1, 1, L, S)] if H else []))
        if params["mask"] == "causal" and params["impl"] == "manual":
            params["mask_name"] = self.add_param(torch.ones(L, S, dtype=torch.bool).triu(1), "m")
        elif params["mask"] == "additive":
            mask = torch.randn(mask_shape)
            if rng.random() < 0.5:  # blocked positions, never a whole row
                blocked = torch.rand(mask_shape) < 0.3
                blocked[..., 0] = False
                mask = mask.masked_fill(blocked, rng.choice([float("-inf"), -1e4]))
            params["mask_name"] = self.add_param(mask, "m")
        elif params["mask"] == "bool":
            keep = torch.rand(mask_shape) < 0.7
            keep[..., 0] = True
            params["mask_name"] = self.add_param(keep, "m")
        label = (f"attention({params['impl']},{'cross' if len(args) > 1 else 'self'},H={H},E={E},mask={params['mask']}"
                 f"{',fused' if fused else ''}{',scale' if params['scale'] is not None else ''})")
        self.add("attention", args, params, label)

    def op_reshape(self):
        rng = self.rng
        i = self.pick(self.floats(lambda s, b: len(s) >= 1))
        shape = self.shape(i)
        free0 = self.first_free_axis(i)
        rank = len(shape)
        forms = ["reshape", "view", "unsqueeze"]
        if rank - free0 >= 2:
            forms += ["flatten", "flatten_mod", "permute", "transpose", "transpose_contig"]
        if any(shape[d] == 1 for d in range(free0, rank)):
            forms.append("squeeze")
        form = rng.choice(forms)
        params: dict[str, Any] = {"form": form}
        if form in ("flatten", "flatten_mod"):
            start = rng.randrange(free0, rank - 1)
            end = rng.choice([rng.randrange(start + 1, rank), -1])
            params.update(start=start, end=end, style=rng.random() < 0.5)
            if form == "flatten_mod":
                params["layer"] = self.add_layer(nn.Flatten(start, end))
            label = f"flatten({start},{end})"
        elif form in ("reshape", "view"):
            rest = shape[free0:]
            target = _factorize(rng, math.prod(rest))
            if rng.random() < 0.3 and target:
                target[rng.randrange(len(target))] = -1
            params.update(shape=tuple(target), keep0=bool(free0))
            label = f"{form}({'B,' if free0 else ''}{tuple(target)})"
        elif form == "permute":
            axes = list(range(free0, rank))
            rng.shuffle(axes)
            params["perm"] = tuple(range(free0)) + tuple(axes)
            label = f"permute{params['perm']}"
        elif form.startswith("transpose"):
            d0, d1 = rng.sample(range(free0, rank), 2)
            params.update(d0=d0 - rank if rng.random() < 0.3 else d0, d1=d1)
            label = f"{form}({d0},{d1})"
        elif form == "unsqueeze":
            params["dim"] = rng.randrange(free0, rank + 1)
            label = f"unsqueeze({params['dim']})"
        else:
            params["dim"] = rng.choice([d for d in range(free0, rank) if shape[d] == 1])
            label = f"squeeze({params['dim']})"
        self.add("reshape", (i,), params, label)

    def op_binary(self, residual: bool = False):
        rng = self.rng
        i = self.pick(self.floats())
        shape = self.shape(i)
        op = "add" if residual else rng.choice(["add", "sub", "mul", "div"])
        params: dict[str, Any] = {"op": op, "flip": rng.random() < 0.3, "style": rng.random() < 0.5}
        args: tuple[int, ...] = (i,)
        if residual:
            same = [j for j in self.floats(lambda s, b: s == shape) if j != i and self.batched[j] == self.batched[i]]
            j = self.pick(same)
            params.update(src="value", flip=False)
            args, label = (i, j), "residual_add"
        else:
            src = rng.choice(["value", "value", "param", "param", "param_expr", "const"])
            if src == "value":
                def fits(s, b):
                    try:
                        out = torch.broadcast_shapes(shape, s)
                    except RuntimeError:
                        return False
                    # a batched value only meets values that broadcast without touching its batch axis
                    if self.batched[i] and b:
                        return len(s) == len(shape)
                    return len(out) == len(shape) if self.batched[i] else not b
                j = self.pick([j for j in self.floats(fits) if j != i] or [i])
                args = (i, j)
                label = f"{op}(a{shape},b{self.shape(j)})"
            elif src in ("param", "param_expr"):
                if self.batched[i]:  # drop the batch axis (and maybe more), or keep it as size 1
                    lead = rng.choice([1, 1, 2, 0])
                    pshape = list(shape[min(lead, len(shape)):])
                    if lead == 0:
                        pshape[0] = 1
                else:
                    pshape = list(shape[rng.randint(0, min(len(shape), 2)):])
                for d in range(len(pshape)):
                    if rng.random() < 0.4:
                        pshape[d] = 1
                value = torch.randn(pshape)
                if op == "div":
                    value = value.sign().where(value != 0, torch.ones(())) * (0.5 + value.abs().clamp(max=2.0))
                    params["flip"] = False
                params["w"] = self.add_param(value)
                if src == "param_expr":
                    params["w2"] = self.add_param(torch.rand(pshape) + 0.5)  # positive: keeps a divisor away from 0
                label = f"{op}(a{shape},{'f(W1,W2)' if src == 'param_expr' else 'W'}{tuple(pshape)})"
            else:
                params["c"] = rng.choice([0.5, 2.0, -1.5, 3.0])
                label = f"{op}(a,{params['c']})"
            params["src"] = src
            if op == "add" and rng.random() < 0.2:
                params["alpha"] = rng.choice([0.5, -2.0])
        self.add("binary", args, params, label)

    def op_reduce(self):
        rng = self.rng
        i = self.pick(self.floats(lambda s, b: len(s) >= 1))
        rank = len(self.shape(i))
        op = rng.choice(["sum", "mean", "amax"])
        keepdim = rng.random() < 0.5
        if rng.random() < 0.08 and op != "amax":
            dims = None
        else:
            free0 = self.first_free_axis(i) if rng.random() < 0.85 else 0
            axes = list(range(free0, rank)) or list(range(rank))
            dims = sorted(rng.sample(axes, rng.randint(1, min(2, len(axes)))))
            if rng.random() < 0.3:
                dims = [d - rank for d in dims]
            dims = dims[0] if len(dims) == 1 and rng.random() < 0.5 else tuple(dims)
        self.add("reduce", (i,), {"op": op, "dims": dims, "keepdim": keepdim}, f"{op}({dims},keepdim={keepdim})")

    def op_concat(self):
        rng = self.rng
        i = self.pick(self.floats(lambda s, b: len(s) >= 1))
        shape = self.shape(i)
        form = rng.choice(["cat", "cat", "stack"])
        free0 = self.first_free_axis(i)
        if form == "cat":
            if len(shape) <= free0:
                raise _Reject("cat needs a non-batch axis")
            dim = rng.randrange(free0, len(shape))
            others = [j for j in self.floats(lambda s, b: len(s) == len(shape) and all(
                s[d] == shape[d] for d in range(len(s)) if d != dim)) if self.batched[j] == self.batched[i]]
        else:
            dim = rng.randrange(free0, len(shape) + 1)
            others = [j for j in self.floats(lambda s, b: s == shape) if self.batched[j] == self.batched[i]]
        parts = [i] + [self.pick(others) for _ in range(rng.randint(1, 2))]
        uniq = sorted(set(parts))
        order = [uniq.index(p) for p in parts]
        self.add("concat", tuple(uniq), {"form": form, "dim": dim if rng.random() < 0.7 else dim - len(shape) - (form == "stack"),
                                         "order": order}, f"{form}(n={len(parts)},dim={dim})")

    def op_split(self):
        rng = self.rng
        i = self.pick(self.floats(lambda s, b: any(v >= 2 for v in s[1 if b else 0:])))
        shape = self.shape(i)
        free0 = self.first_free_axis(i)
        dim = rng.choice([d for d in range(free0, len(shape)) if shape[d] >= 2])
        if rng.random() < 0.4:
            n = rng.randint(2, min(4, shape[dim]))
            params = {"form": "chunk", "n": n, "dim": dim}
            label = f"chunk({n},dim={dim})"
        else:
            size = shape[dim]
            if rng.random() < 0.5:
                sizes: Any = rng.randint(1, size - 1)
            else:
                cut = sorted(rng.sample(range(1, size), min(size - 1, rng.randint(1, 2))))
                sizes = [b - a for a, b in zip([0] + cut, cut + [size])]
            params = {"form": "split", "sizes": sizes, "dim": dim}
            label = f"split({sizes},dim={dim})"
        self.add("split", (i,), params, label)

    def op_pool(self):
        rng = self.rng
        i = self.pick(self.floats(lambda s, b: len(s) in (3, 4)))
        shape = self.shape(i)
        nd = len(shape) - 2
        spatial = shape[2:]
        form = rng.choice(["max", "max", "avg", "avg", "adaptive", "module"])
        params: dict[str, Any] = {"form": form, "nd": nd}
        if form == "adaptive":
            out = tuple(rng.randint(1, s) for s in spatial)
            params["out"] = out[0] if nd == 1 or rng.random() < 0.3 and len(set(out)) == 1 else out
            label = f"adaptive_avg_pool{nd}d({params['out']})"
        elif form == "module":
            cls = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d}[nd]
            out = rng.choice([1, min(spatial)])
            params["layer"] = self.add_layer(cls(out))
            label = f"AdaptiveAvgPool{nd}d({out})"
        else:
            k = rng.randint(1, min(3, min(spatial)) if min(spatial) >= 1 else 1)
            if min(spatial) >= 2 and rng.random() < 0.5:
                k = max(k, 2)
            stride = rng.randint(1, k)
            pad = rng.randint(0, k // 2)
            params.update(k=k, stride=stride, pad=pad, dil=1, ceil=rng.random() < 0.2, cip=rng.random() < 0.5)
            label = f"{form}_pool{nd}d(k={k},s={stride},p={pad}{',ceil' if params['ceil'] else ''}" \
                    f"{',no_pad_count' if form == 'avg' and not params['cip'] else ''})"
        self.add("pool", (i,), params, label)

    def op_embedding(self, i: int):
        rng = self.rng
        info = self.inputs[i]
        d = _dim(rng, 2, 16)
        if rng.random() < 0.7:
            pad_idx = rng.choice([None, None, 0])
            params = {"layer": self.add_layer(nn.Embedding(info.high, d, padding_idx=pad_idx))}
            label = f"embedding({info.high},{d}{',pad0' if pad_idx == 0 else ''})"
        else:
            params = {"w": self.add_param(torch.randn(info.high, d))}
            label = f"F.embedding({info.high},{d})"
        self.add("embedding", (i,), params, label)

    # -- the whole model ----------------------------------------------------------------------
    OP_WEIGHTS = {
        "act": 14, "linear": 10, "conv": 10, "conv_bn": 5, "linear_bn": 2, "batchnorm": 4, "layernorm": 5,
        "groupnorm": 3, "matmul": 6, "attention": 6, "reshape": 10, "binary": 12, "residual": 4, "reduce": 6,
        "concat": 4, "split": 3, "pool": 6,
    }

    def build(self) -> FuzzModel:
        rng = self.rng
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 7919 + self.attempt)
            self.make_inputs()
            for k, info in enumerate(self.inputs):
                if info.is_ids:
                    self.op_embedding(k)
            n_steps = rng.randint(1, MAX_STEPS)
            names, weights = zip(*self.OP_WEIGHTS.items())
            done, tries = 0, 0
            while done < n_steps and tries < 6 * MAX_STEPS:
                tries += 1
                kind = rng.choices(names, weights=weights)[0]
                snapshot = self.snapshot()
                try:
                    if kind == "conv_bn":
                        self.op_conv(then_bn=True)
                    elif kind == "linear_bn":
                        self.op_linear(then_bn=True)
                    elif kind == "residual":
                        self.op_binary(residual=True)
                    else:
                        getattr(self, f"op_{kind}")()
                    done += 1
                except _Reject:
                    self.restore(snapshot)
            if done == 0:
                raise _Reject("no step could be added")
            self.choose_outputs()
            self.randomize_norms()
            self.warm_up_batchnorm()
        return self.model

    def snapshot(self):
        m = self.model
        return (len(m.steps), set(m.layers.keys()), set(dict(m.named_parameters(recurse=False))),
                set(dict(m.named_buffers(recurse=False))), [len(e) for e in self.envs], len(self.batched))

    def restore(self, snap) -> None:
        n_steps, layers, params, buffers, env_lens, n_flags = snap
        m = self.model
        del m.steps[n_steps:]
        for name in list(m.layers.keys()):
            if name not in layers:
                del m.layers[name]
        for name in list(dict(m.named_parameters(recurse=False))):
            if name not in params:
                delattr(m, name)
        for name in list(dict(m.named_buffers(recurse=False))):
            if name not in buffers:
                delattr(m, name)
        for env, n in zip(self.envs, env_lens):
            del env[n:]
        del self.batched[n_flags:]
        del self.is_ids[n_flags:]

    def choose_outputs(self) -> None:
        rng = self.rng
        m = self.model
        n_inputs = len(self.inputs)
        computed = [i for i in self.floats() if i >= n_inputs]
        last = computed[-1]
        n_out = rng.choices([1, 2, 3], weights=[5, 3, 2])[0]
        outs = [last]
        pool = [i for i in computed if i != last]
        while len(outs) < n_out and pool:
            outs.append(pool.pop(rng.randrange(len(pool))))
        if rng.random() < 0.04:
            outs.append(last)  # the same tensor twice
        if rng.random() < 0.03 and self.floats(lambda s, b: True):
            outs.append(self.floats()[0])  # an input returned as is
        rng.shuffle(outs)
        m.outputs = outs
        if len(outs) == 1:
            m.out_kind = rng.choice(["single", "single", "single", "tuple", "dict"])
        else:
            m.out_kind = rng.choice(["tuple", "tuple", "list", "dict"])
        m.out_keys = [rng.choice(["logits", "h", "out", "features", "score"]) + str(k) for k in range(len(outs))]

    def randomize_norms(self) -> None:
        for module in self.model.modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
                with torch.no_grad():
                    if getattr(module, "weight", None) is not None:
                        module.weight.copy_(torch.empty_like(module.weight).uniform_(0.5, 1.5))
                    if getattr(module, "bias", None) is not None:
                        module.bias.copy_(torch.randn_like(module.bias) * 0.3)

    def warm_up_batchnorm(self) -> None:
        """Give BatchNorm real running statistics: forward passes in train mode, then eval."""
        bns = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        if not bns:
            return
        momenta = [bn.momentum for bn in bns]
        for bn in bns:
            bn.momentum = None  # cumulative average of the warm-up batches
        self.model.train()
        try:
            with torch.no_grad():
                gen = torch.Generator().manual_seed(self.seed + 17)
                for _ in range(2):
                    batch = max(self.batch, 2) if self.dynamic else self.batch
                    inputs = [_draw(info, batch, gen, offset=0.7, scale=1.5) for info in self.inputs]
                    self.model(**dict(zip(self.model.input_names, inputs)))
        except Exception:
            # e.g. one value per channel in a batch of 1: set statistics directly instead
            for bn in bns:
                bn.running_mean.normal_(0.0, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
        finally:
            self.model.eval()
            for bn, momentum in zip(bns, momenta):
                bn.momentum = momentum


def _factorize(rng: random.Random, n: int) -> list[int]:
    """`n` as a product of 1..3 random factors."""
    factors = []
    parts = rng.randint(1, 3)
    for _ in range(parts - 1):
        divisors = [d for d in range(1, n + 1) if n % d == 0]
        d = rng.choice(divisors)
        factors.append(d)
        n //= d
    factors.append(n)
    rng.shuffle(factors)
    return factors


def _draw(info: InputInfo, batch: int, gen: torch.Generator, offset: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    shape = ((batch,) + info.shape[1:]) if info.batched else info.shape
    if info.is_ids:
        return torch.randint(0, info.high, shape, generator=gen, dtype=torch.int64)
    return torch.randn(shape, generator=gen) * scale + offset


def draw_inputs(model: FuzzModel, batch: int | None = None, seed: int = 0):
    """Inputs for `model` in the call form of its example (tuple or dict), at `batch` (the
    example's batch when None; only batched inputs change size)."""
    infos: list[InputInfo] = model.fuzz_info["inputs"]
    b = model.fuzz_info["batch"] if batch is None else batch
    gen = torch.Generator().manual_seed(seed)
    values = [_draw(info, b, gen) for info in infos]
    if model.fuzz_info["call"] == "dict":
        return {info.name: v for info, v in zip(infos, values)}
    return tuple(values)


def call(model, inputs):
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def describe(model: FuzzModel) -> str:
    info = model.fuzz_info
    ins = ", ".join(f"{i.name}{list(i.shape)}{'(ids<%d)' % i.high if i.is_ids else ''}" for i in info["inputs"])
    ops = "; ".join(s.label for s in model.steps)
    dyn = " dynamic batch" if info["dynamic"] else ""
    return f"inputs {ins}{dyn} -> [{ops}] -> {model.out_kind}{model.outputs}"


def _leaves(out) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(out) if x is not None]


def _well_conditioned(model: FuzzModel, draws: list) -> str | None:
    """None if float32 eager agrees with float64 eager far inside the fp32 tolerance."""
    m64 = copy.deepcopy(model).double()
    for inputs in draws:
        as64 = {k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()} if isinstance(inputs, dict) \
            else tuple(v.double() if v.is_floating_point() else v for v in inputs)
        with torch.no_grad():
            got, want = _leaves(call(model, inputs)), _leaves(call(m64, as64))
        for g, w in zip(got, want):
            if not torch.isfinite(g).all() or g.abs().max() > 1e5:
                return "non-finite or huge output"
            bound = CONDITIONING * (FP32_ATOL + FP32_RTOL * w.abs())
            if ((g.double() - w).abs() > bound).any():
                return f"ill-conditioned: float32 differs from float64 by {float((g.double() - w).abs().max()):.2e}"
    return None


def _try(seed: int, attempt: int):
    builder = _Builder(seed, attempt)
    model = builder.build()
    model.fuzz_info.update(seed=seed, attempt=attempt, dynamic=builder.dynamic, batch=builder.batch,
                           call="dict" if any(i.is_ids for i in builder.inputs) or builder.rng.random() < 0.3 else "tuple")
    example = draw_inputs(model, seed=seed)
    dynamic = None
    if builder.dynamic:
        dynamic = {i.name: {0: "batch"} for i in builder.inputs if i.batched}
    # validation: eager runs (at other batch sizes too when dynamic) and is well conditioned
    draws = [example, draw_inputs(model, seed=seed + 1)]
    if builder.dynamic:
        draws += [draw_inputs(model, batch=1, seed=seed + 2), draw_inputs(model, batch=builder.batch2 + 2, seed=seed + 3)]
    try:
        reason = _well_conditioned(model, draws)
    except Exception as exc:
        reason = f"eager failed: {type(exc).__name__}: {exc}"
    if reason is not None:
        raise _Reject(reason)
    return model, example, dynamic


def random_model(seed: int) -> tuple[FuzzModel, Any, dict | None]:
    """A random, valid, eager-runnable model for `seed`, its example inputs (a tuple of
    positional tensors or a dict of keyword tensors) and its `dynamic` mapping (or None).
    Deterministic: the same seed always gives the same model, weights and inputs."""
    last = None
    for attempt in range(MAX_ATTEMPTS):
        try:
            return _try(seed, attempt)
        except _Reject as exc:
            last = exc
    raise RuntimeError(f"seed {seed}: no valid model in {MAX_ATTEMPTS} attempts (last: {last})")
