"""How each runtime kiln wraps treats NaN and Inf, op by op, measured without kiln.

    python bench/nonfinite_semantics.py [--out bench/results/nonfinite_semantics.md]

One single-op module per op family the fuzzer draws; its input holds NaN, +Inf and -Inf at a
few positions among finite values. Each runtime runs the op from its own entry point, with
nothing of kiln in between: ONNX Runtime from torch.onnx.export (dynamo) and an
InferenceSession, OpenVINO from openvino.convert_model of the torch.export program, Inductor
from torch.compile. The table says where a runtime's NaN/Inf positions or Inf values differ
from eager PyTorch's, so a fuzzing mismatch on a NaN/Inf input can be traced to the runtime
(an upstream difference) or to kiln.
"""

from __future__ import annotations

import argparse
import io
import platform
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class Op(nn.Module):
    def __init__(self, fn, params: dict | None = None):
        super().__init__()
        self.fn, self.layers = fn, nn.ModuleDict(params or {})

    def forward(self, x):
        return self.fn(self, x)


def _ops() -> dict[str, tuple[Op, tuple[int, ...]]]:
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(6).eval()
    bn.running_mean.uniform_(-1, 1)
    return {
        "relu": (Op(lambda m, x: torch.relu(x)), (2, 6, 5)),
        "gelu": (Op(lambda m, x: F.gelu(x)), (2, 6, 5)),
        "gelu_tanh": (Op(lambda m, x: F.gelu(x, approximate="tanh")), (2, 6, 5)),
        "gelu_after_permute": (Op(lambda m, x: F.gelu(x.permute(0, 2, 1))), (2, 6, 5)),
        "silu": (Op(lambda m, x: F.silu(x)), (2, 6, 5)),
        "hardswish": (Op(lambda m, x: F.hardswish(x)), (2, 6, 5)),
        "sigmoid": (Op(lambda m, x: torch.sigmoid(x)), (2, 6, 5)),
        "tanh": (Op(lambda m, x: torch.tanh(x)), (2, 6, 5)),
        "relu6": (Op(lambda m, x: F.relu6(x)), (2, 6, 5)),
        "hardtanh": (Op(lambda m, x: F.hardtanh(x, -0.5, 0.5)), (2, 6, 5)),
        "clamp_min": (Op(lambda m, x: x.clamp(min=0.1)), (2, 6, 5)),
        "maximum": (Op(lambda m, x: torch.maximum(x, torch.zeros_like(x))), (2, 6, 5)),
        "softmax": (Op(lambda m, x: x.softmax(-1)), (2, 6, 5)),
        "log_softmax": (Op(lambda m, x: F.log_softmax(x, -1)), (2, 6, 5)),
        "layer_norm": (Op(lambda m, x: m.layers["n"](x), {"n": nn.LayerNorm(5)}), (2, 6, 5)),
        "group_norm": (Op(lambda m, x: m.layers["n"](x), {"n": nn.GroupNorm(2, 6)}), (2, 6, 5)),
        "batch_norm": (Op(lambda m, x: m.layers["n"](x), {"n": bn}), (2, 6, 5)),
        "batch_norm_batch_stats": (Op(lambda m, x: m.layers["n"](x), {"n": nn.BatchNorm1d(6, track_running_stats=False)}),
                                   (2, 6, 5)),
        "linear": (Op(lambda m, x: m.layers["l"](x), {"l": nn.Linear(5, 4)}), (2, 6, 5)),
        "max_pool1d": (Op(lambda m, x: F.max_pool1d(x, 2)), (2, 6, 6)),
        "max_pool2d": (Op(lambda m, x: F.max_pool2d(x, 2)), (2, 3, 4, 4)),
        "avg_pool2d": (Op(lambda m, x: F.avg_pool2d(x, 2)), (2, 3, 4, 4)),
        "adaptive_avg_pool2d": (Op(lambda m, x: F.adaptive_avg_pool2d(x, 1)), (2, 3, 4, 4)),
        "amax": (Op(lambda m, x: x.amax(-1)), (2, 6, 5)),
        "sum": (Op(lambda m, x: x.sum(-1)), (2, 6, 5)),
        "mean": (Op(lambda m, x: x.mean(-1)), (2, 6, 5)),
        "conv1d": (Op(lambda m, x: m.layers["c"](x), {"c": nn.Conv1d(6, 4, 3)}), (2, 6, 5)),
        "conv2d_pointwise_strided": (Op(lambda m, x: m.layers["c"](x), {"c": nn.Conv2d(2, 8, 1, stride=3)}), (2, 2, 7, 1)),
        # a NaN in a key a causal mask hides: PyTorch's kernel never reads it, an additive mask does
        "sdpa_causal": (Op(lambda m, x: F.scaled_dot_product_attention(x, x, x, is_causal=True)), (2, 2, 6, 4)),
        "sdpa_bool_mask": (Op(lambda m, x: F.scaled_dot_product_attention(
            x, x, x, attn_mask=torch.ones(6, 6, dtype=torch.bool).tril())), (2, 2, 6, 4)),
    }


def _input(shape: tuple[int, ...]) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    flat = x.view(-1)
    flat[0], flat[7], flat[13] = float("nan"), float("inf"), float("-inf")
    return x


def _differs(got: torch.Tensor, want: torch.Tensor) -> str:
    got, want = got.double(), want.double()
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)}"
    nan_g, nan_w = torch.isnan(got), torch.isnan(want)
    if not torch.equal(nan_g, nan_w):
        return f"NaN at {int(nan_g.sum())} places, eager {int(nan_w.sum())}"
    inf_g, inf_w = torch.isinf(got), torch.isinf(want)
    if not torch.equal(inf_g, inf_w) or not torch.equal(got[inf_w], want[inf_w]):
        return f"Inf at {int(inf_g.sum())} places, eager {int(inf_w.sum())}"
    finite = torch.isfinite(want)
    if finite.any() and float((got[finite] - want[finite]).abs().max()) > 1e-4 + 1e-4 * float(want[finite].abs().max()):
        return "finite values differ"
    return ""


def _onnxruntime(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "op.onnx"
        program = torch.export.export(module, (x,), strict=False)
        with io.StringIO() as sink:
            stdout, sys.stdout = sys.stdout, sink
            try:
                torch.onnx.export(program, (x,), str(path), dynamo=True, opset_version=20)
            finally:
                sys.stdout = stdout
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def _openvino(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    import openvino as ov

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ov.convert_model(torch.export.export(module, (x,), strict=False))
        compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return torch.from_numpy(compiled(x.numpy())[compiled.outputs[0]])


def _inductor(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    torch._dynamo.reset()
    with torch.no_grad():
        return torch.compile(module, backend="inductor")(x)


RUNTIMES = {"onnxruntime": _onnxruntime, "openvino": _openvino, "inductor": _inductor}


def versions() -> dict[str, str]:
    found = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("onnxruntime", "openvino"):
        try:
            module = __import__(name)
            found[name] = getattr(module, "__version__", "") or module.get_version()
        except ImportError:
            found[name] = "not installed"
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the table as markdown here")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES))
    args = parser.parse_args(argv)
    runtimes = [r for r in args.runtimes.split(",") if r]
    rows = []
    for name, (module, shape) in _ops().items():
        module.eval()
        x = _input(shape)
        with torch.no_grad():
            want = module(x)
        cells = []
        for runtime in runtimes:
            try:
                cells.append(_differs(RUNTIMES[runtime](module, x), want) or "same")
            except Exception as exc:  # noqa: BLE001 - a runtime that cannot run the op is a fact, not a failure here
                cells.append(f"error: {type(exc).__name__}")
        rows.append((name, cells))
        print(f"{name:22s} " + "  ".join(f"{r}: {c}" for r, c in zip(runtimes, cells)), flush=True)
    header = "| op | " + " | ".join(runtimes) + " |"
    lines = [f"NaN/Inf through single ops, each runtime from its own entry point (no kiln): {versions()}", "",
             "Input: random values with NaN, +Inf and -Inf at three positions. 'same' means NaN and Inf land where eager "
             "PyTorch puts them, with eager's Inf values, and the finite values agree at fp32 tolerance.", "",
             header, "|" + "---|" * (len(runtimes) + 1)]
    lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
