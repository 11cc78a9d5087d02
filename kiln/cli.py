"""kiln's command line: compile | sweep | prune | run | bench | inspect | profiles | export-triton | serve | loadtest.

Thin by design: each command parses its arguments and calls the Python API. Exit codes:
0 ok, 2 usage error, 1 any other error, reported as one line (the traceback only with --debug).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import logging
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from kiln.errors import KilnError
from kiln.options import MOE_FORMS


class UsageError(KilnError):
    """The command line itself is wrong (exit code 2)."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if getattr(args, "command", None) == "compile" and not args.plan_only and not args.output:
        parser.error("kiln compile needs -o/--output (or --plan-only to place without building)")
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return 2
    _configure_progress(args)
    try:
        return args.handler(args)
    except UsageError as exc:
        print(f"kiln: usage error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KilnError as exc:
        if args.debug:
            raise
        print(f"kiln: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kiln: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # anything else is kiln's bug: still one line unless --debug
        if args.debug:
            raise
        print(f"kiln: internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
              "(run again with --debug for the traceback)", file=sys.stderr)
        return 1


def _one_line(exc: KilnError) -> str:
    text = f"{exc.where}: {exc.what}" if exc.where else exc.what
    text = " ".join(text.split())
    return f"{text} (fix: {' '.join(exc.fix.split())})" if exc.fix else text


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress output")
    common.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    common.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser = argparse.ArgumentParser(prog="kiln", description="Compile PyTorch models into verified engines for named hardware.")
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("compile", parents=[common], help="capture, optimise, build and verify a model; write an artifact")
    p.add_argument("model", help="MODULE:FACTORY (returns a model, or (model, example_inputs)) or a torch.export .pt2 file")
    p.add_argument("--profile", default="cpu-x86", help="hardware profile name or YAML path (default cpu-x86)")
    p.add_argument("--input-spec", action="append", default=[], metavar="NAME=SHAPE:DTYPE[:LOW:HIGH]",
                   help="an example input drawn at random, e.g. input_ids=1x128:int64:0:30000 (repeat per input, in call order)")
    # the old spelling (run's --input reads .npy files): still read, with a note, for one release
    p.add_argument("--input", dest="old_input_spec", action="append", default=[], help=argparse.SUPPRESS)
    p.add_argument("--dynamic", action="append", default=[], metavar="NAME:AXIS=DIM[:MIN:MAX]",
                   help="mark an axis dynamic, e.g. input_ids:0=batch:1:64")
    p.add_argument("--factory-arg", action="append", default=[], metavar="KEY=VALUE", help="keyword for FACTORY, e.g. batch=8")
    p.add_argument("--backend", help="use this backend only")
    p.add_argument("--select", choices=["prefer", "measure"], help="override the profile's backend selection")
    p.add_argument("--effort", choices=["fast", "default", "max"],
                   help="how many candidate engines are built: fast builds the one predicted to win; default (the "
                        "default) only those that could still win, judged by what this host measured before; max builds "
                        "and times every candidate, with autotuning")
    p.add_argument("--backend-fallback", action="store_true",
                   help="with --select prefer: a backend whose build fails moves on to the next one (recorded)")
    p.add_argument("--time-against-fp32", action=argparse.BooleanOptionalAction, default=None,
                   help="precision=auto: build fp32 too and keep the lowered plan only if it runs faster here "
                        "(default: when the profile measures backends)")
    p.add_argument("--precision", help="auto (default), or every layer at one of fp32, bf16, fp16, int8, int4-weight, fp8")
    p.add_argument("--min-cosine", type=float, metavar="C",
                   help="accuracy budget: each output's cosine to eager at least C (e.g. 0.995); default 0.9999 with rel. error 1e-2")
    p.add_argument("--max-rel-error", type=float, metavar="E", help="accuracy budget: each output's relative L2 error at most E")
    p.add_argument("--calibration", metavar="MODULE:FACTORY|FILE.pt",
                   help="calibration samples for integer precisions: a factory returning an iterable of inputs shaped like "
                        "the example (given the --factory-arg keys it accepts), or a torch.save'd list of them")
    p.add_argument("--calibration-observer", choices=["minmax", "percentile", "mse"], help="activation ranges for static int8")
    p.add_argument("--moe-form", choices=list(MOE_FORMS),
                   help="how mixture-of-experts blocks are captured (auto: dispatch in PyTorch on a CPU profile, else "
                        "blocked, else dense, each where it agrees with the model)")
    p.add_argument("--int4-group-size", type=int, choices=[32, 64, 128], help="weights per scale for int4 weight-only")
    p.add_argument("--sparsity", choices=["2:4"], help="prune the layers the accuracy budget allows to 2:4 structured "
                   "sparsity, for devices with sparse tensor cores (opt-in: it changes answers)")
    p.add_argument("--keep-fp32", action="append", default=[], metavar="MODULE",
                   help="keep a module's layers (path prefix, e.g. classifier) or a node at fp32 whatever the precision (repeatable)")
    p.add_argument("--no-verify", action="store_true", help="skip verification against eager (recorded in the report)")
    p.add_argument("--autotune", action="store_true", help="let backends benchmark kernel variants while building (slower builds)")
    p.add_argument("-o", "--output", help="artifact path (a file, or a directory if it ends with /); "
                                          "an existing path is refused unless it is a kiln artifact and --overwrite is given")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing kiln artifact at -o (atomically); anything else there is still refused")
    p.add_argument("--pin", action="append", default=[], metavar="MODULE=DEVICE",
                   help="place a module (path prefix, e.g. classifier) or node on a device of the profile (repeatable)")
    p.add_argument("--plan-only", action="store_true",
                   help="place and partition only, build nothing: works for devices this machine lacks")
    p.add_argument("--assume-precision", metavar="P",
                   help="with --plan-only: plan as if every op ran at P (e.g. fp16 for an NPU) instead of deciding per layer")
    p.add_argument("--html", metavar="FILE", help="with --plan-only: also draw the placed graph as an HTML page")
    p.set_defaults(handler=_compile)

    p = sub.add_parser("sweep", parents=[common], help="compile a model at a series of settings; latency against accuracy, "
                                                         "the Pareto front, one artifact per point")
    p.add_argument("model", help="MODULE:FACTORY returning (model, example_inputs), e.g. kiln.examples.models:minilm")
    p.add_argument("--profile", default="cpu-x86", help="hardware profile name or YAML path (default cpu-x86)")
    p.add_argument("--factory-arg", action="append", default=[], metavar="KEY=VALUE", help="keyword for FACTORY, e.g. batch=1")
    p.add_argument("--settings", help="comma-separated PRECISION[:MIN_COSINE][+prune=LEVEL] "
                                      "(default fp32,auto,auto:0.999,auto:0.995,auto:0.99)")
    p.add_argument("--evaluate", choices=["sentence-pairs", "photos"],
                   help="the bundled real data for the example models (MiniLM: sentence-pairs, EfficientNet-Lite0: photos), "
                        "with its held-out calibration samples")
    p.add_argument("--calibration-samples", type=int, default=12, metavar="N",
                   help="with --evaluate: how many held-out calibration samples (default 12; auto measures each layer on each)")
    p.add_argument("--metric", metavar="MODULE:FN", help="your metric(predict, dataset) -> float, higher is better")
    p.add_argument("--dataset", metavar="MODULE:FACTORY", help="a factory returning the metric's inputs (given the "
                                                               "--factory-arg keys it accepts)")
    p.add_argument("--calibration", metavar="MODULE:FACTORY|FILE.pt", help="calibration samples, as for kiln compile")
    p.add_argument("--effort", choices=["fast", "default", "max"], help="candidate engines built per point, as for kiln compile")
    p.add_argument("--backend", help="use this backend only")
    p.add_argument("--measure-seconds", type=float, help="timing budget per engine and per candidate (default 1.0)")
    p.add_argument("-o", "--output", required=True, help="folder for each point's artifact, sweep.json and sweep.png")
    p.add_argument("--no-plot", action="store_true", help="leave out sweep.png (matplotlib not needed)")
    p.add_argument("--pick", type=int, metavar="N", help="also copy point N's artifact to OUTPUT/picked.kiln")
    p.set_defaults(handler=_sweep)

    p = sub.add_parser("prune", parents=[common], help="remove the lowest-norm attention heads, FFN neurons and conv "
                                                       "channels; write a smaller dense model (.pt2 for kiln compile)")
    p.add_argument("model", help="MODULE:FACTORY returning (model, example_inputs)")
    p.add_argument("--factory-arg", action="append", default=[], metavar="KEY=VALUE", help="keyword for FACTORY, e.g. batch=8")
    p.add_argument("--level", type=float, required=True, help="fraction of prunable parameters to remove, e.g. 0.3")
    p.add_argument("--parts", default="heads,neurons,channels", help="what to prune (default heads,neurons,channels)")
    p.add_argument("-o", "--output", required=True,
                   help="FILE.pt2 (a torch.export program `kiln compile` reads) or FILE.pt (torch.save of the module)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file at -o")
    p.set_defaults(handler=_prune)

    p = sub.add_parser("run", parents=[common], help="run an artifact on random or .npy inputs")
    p.add_argument("artifact")
    p.add_argument("--expected-digest", metavar="DIGEST",
                   help="refuse the artifact unless its digest (see `kiln inspect`) is this")
    # `compile --pin MODULE=DEVICE` places layers; run once took --pin for the digest: still read, with a note
    p.add_argument("--pin", dest="pin_digest", metavar="DIGEST", help=argparse.SUPPRESS)
    p.add_argument("--input-file", action="append", default=[], metavar="NAME=FILE.npy", help="an input read from a .npy file")
    # the old spelling (compile's --input-spec draws inputs): still read, with a note, for one release
    p.add_argument("--input", dest="old_input_file", action="append", default=[], help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help="seed for random inputs")
    p.add_argument("--out", help="directory to write outputs as .npy")
    p.set_defaults(handler=_run)

    p = sub.add_parser("bench", parents=[common], help="time an artifact on random inputs of its spec")
    p.add_argument("artifact")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.set_defaults(handler=_bench)

    p = sub.add_parser("inspect", parents=[common], help="show an artifact's report: passes, placement, backend decisions, verification")
    p.add_argument("artifact")
    p.add_argument("--expected-digest", metavar="DIGEST",
                   help="refuse the artifact unless its digest (printed by inspect) is this")
    p.add_argument("--load-engines", action="store_true",
                   help="also check and load every engine, and time kiln.load and a first call on inputs drawn from the "
                        "input spec (by default only the manifest is read, so nothing in the artifact runs)")
    p.add_argument("--html", metavar="FILE", help="also draw the placed graph (devices, precisions, partitions) as an HTML page")
    p.set_defaults(handler=_inspect)

    p = sub.add_parser("profile-host", parents=[common], help="measure this CPU and write a hardware profile to start from")
    p.add_argument("-o", "--output", required=True, help="profile YAML to write")
    p.add_argument("--name", help="profile name (default: the file's stem)")
    p.add_argument("--seconds", type=float, default=0.5, help="timing budget per measurement")
    p.set_defaults(handler=_profile_host)

    p = sub.add_parser("profiles", parents=[common], help="list or show hardware profiles")
    p.add_argument("action", choices=["list", "show"])
    p.add_argument("name", nargs="?")
    p.set_defaults(handler=_profiles)

    p = sub.add_parser("export-triton", parents=[common], help="write an artifact into a Triton Inference Server model repository")
    p.add_argument("artifact")
    p.add_argument("--repository", required=True, help="the model repository folder (created if missing)")
    p.add_argument("--name", help="model name in the repository (default: the artifact's file name)")
    p.add_argument("--max-batch", type=int, help="max_batch_size (default: the compiled batch range, at most 64)")
    p.add_argument("--max-queue-delay-us", type=int, default=1000, help="dynamic batching: longest wait to fill a batch")
    p.add_argument("--instances", type=int, default=1, help="model instances (instance_group count)")
    p.add_argument("--backend", choices=["auto", "python"], default="auto",
                   help="auto: Triton's native backend where one fits, else python; python: always the python backend")
    p.add_argument("--overwrite", action="store_true", help="replace a model this command wrote before")
    p.set_defaults(handler=_export_triton)

    p = sub.add_parser("serve", parents=[common], help="serve an artifact over HTTP with Ray Serve, batching requests")
    p.add_argument("artifact")
    p.add_argument("--replicas", type=int, default=1, help="replicas, each loading the artifact once")
    p.add_argument("--max-batch", type=int, default=16, help="most rows one engine call takes")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="longest wait to fill a batch")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs each replica reserves (and its engine threads)")
    p.add_argument("--address", help="join this Ray cluster (e.g. ray://head:10001 or auto) instead of starting one here")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host of Ray Serve's proxy")
    p.add_argument("--port", type=int, default=8000, help="HTTP port of Ray Serve's proxy")
    p.add_argument("--name", help="application name and route (default: the artifact's file name)")
    p.add_argument("--pad", action="append", default=[], metavar="DIM=MASK_INPUT",
                   help="let requests of different DIM sizes share a call, padded with MASK_INPUT zero there (e.g. seq=attention_mask)")
    p.set_defaults(handler=_serve)

    p = sub.add_parser("loadtest", parents=[common], help="closed-loop HTTP load on a served model: throughput, P50/P99, errors")
    p.add_argument("url", help="kiln serve route (http://HOST:PORT/NAME) or Triton's http://HOST:PORT/v2/models/NAME/infer")
    p.add_argument("--artifact", help="draw the request body from this artifact's input spec")
    p.add_argument("--body", help="a JSON file to send as the request body instead")
    p.add_argument("--rows", type=int, default=1, help="rows per drawn request (with --artifact)")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts, each run in turn")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per concurrency")
    p.add_argument("--plot", metavar="PNG", help="also draw throughput against P99 latency")
    p.set_defaults(handler=_loadtest)
    return parser


def _configure_progress(args: argparse.Namespace) -> None:
    from kiln.progress import terminal_handler

    log = logging.getLogger("kiln")
    if args.quiet or args.json or not sys.stderr.isatty() or log.handlers:
        return
    log.addHandler(terminal_handler())
    log.setLevel(logging.INFO)


# ---------------------------------------------------------------- compile

def _compile(args: argparse.Namespace) -> int:
    import kiln

    if not args.plan_only:
        from kiln.artifact import check_target

        check_target(args.output, args.overwrite)  # before the model loads and builds, so a refused path costs nothing
    model, example = _load_model(args.model, args.factory_arg)
    specs = args.input_spec + _renamed(args.old_input_spec, "kiln compile --input", "--input-spec")
    if specs:
        example = _named_inputs(model, [_random_input(spec) for spec in specs])
    if example is None:
        raise UsageError(f"no example inputs for {args.model}",
                         fix="give --input-spec NAME=SHAPE:DTYPE per input, or return (model, inputs) from the factory")
    if args.assume_precision and not args.plan_only:
        raise UsageError("--assume-precision plans without building", fix="add --plan-only, or use --precision to build at a precision")
    dynamic = _parse_dynamic(args.dynamic)
    overrides: dict[str, Any] = {"verify": not args.no_verify}
    if args.backend:
        overrides["backend"] = args.backend
    if args.select:
        overrides["select"] = args.select
    if args.effort:
        overrides["effort"] = args.effort
    if args.backend_fallback:
        overrides["backend_fallback"] = True
    if args.time_against_fp32 is not None:
        overrides["time_against_fp32"] = args.time_against_fp32
    if args.autotune:
        overrides["autotune"] = True
    if args.moe_form:
        overrides["moe_form"] = args.moe_form
    if args.pin:
        overrides["pin"] = dict(_parse_kv(item) for item in args.pin)
    overrides.update(_precision_options(args))
    kwargs = {}
    if isinstance(example, dict):
        example, kwargs = (), example
    if args.plan_only:
        overrides.pop("verify")
        planned = kiln.plan(model, args.profile, example, example_kwargs=kwargs, dynamic=dynamic,
                            options=kiln.CompileOptions.build(**overrides), assume_precision=args.assume_precision)
        if args.html:
            Path(args.html).write_text(planned.html())
        if args.json:
            print(json.dumps({"plan": planned.plan.to_dict(), "report": planned.report.to_dict()}, default=str))
        else:
            print(planned.render())
        return 0
    compiled = kiln.optimize(model, args.profile, example, example_kwargs=kwargs, dynamic=dynamic, **overrides)
    path = compiled.save(args.output, overwrite=args.overwrite)
    if args.json:
        print(json.dumps({"artifact": str(path), "backends": compiled.backends, "report": compiled.report.to_dict()}, default=str))
    else:
        print(compiled.report.render())
        print(f"\nwrote {path}")
    return 0


def _prune(args: argparse.Namespace) -> int:
    import kiln

    output = Path(args.output)
    if output.suffix not in (".pt2", ".pt"):
        raise UsageError(f"-o {output} is neither .pt2 nor .pt", fix="name the output FILE.pt2 (for kiln compile) or FILE.pt")
    if output.exists() and not args.overwrite:
        raise UsageError(f"{output} exists", fix="choose another path, or add --overwrite")
    if ":" not in args.model:
        # An exported program's layers are graph constants: slicing them would not reshape its views.
        raise UsageError(f"kiln prune needs the model's Python modules, not {args.model}",
                         fix="name MODULE:FACTORY returning (model, example_inputs)")
    model, example = _load_model(args.model, args.factory_arg)
    if example is None:
        raise UsageError(f"{args.model} gave no example inputs", fix="return (model, example_inputs) from the factory")
    example = tuple(example) if isinstance(example, (tuple, list)) else (example,)
    pruned = kiln.prune(model, example, args.level, parts=args.parts)
    if output.suffix == ".pt2":
        # An exported program carries its example inputs, so `kiln compile pruned.pt2` needs no --input-spec.
        torch.export.save(torch.export.export(pruned.model.eval(), example, strict=False), output)
    else:
        torch.save(pruned.model, output)
    if args.json:
        print(json.dumps({"output": str(output), **pruned.to_dict()}))
    else:
        print(pruned.describe())
        print(f"\nwrote {output}")
    return 0


def _precision_options(args: argparse.Namespace) -> dict[str, Any]:
    """--precision, the budget, calibration data and their settings as optimize() options."""
    import kiln

    options: dict[str, Any] = {}
    if args.precision:
        options["precision"] = args.precision
    if args.min_cosine is not None or args.max_rel_error is not None:
        options["accuracy_budget"] = kiln.Budget(min_cosine=args.min_cosine, max_rel_error=args.max_rel_error)
    if args.calibration:
        options["calibration"] = _load_calibration(args.calibration, args.factory_arg)
    if args.calibration_observer:
        options["calibration_observer"] = args.calibration_observer
    if args.int4_group_size:
        options["int4_group_size"] = args.int4_group_size
    if args.sparsity:
        options["sparsity"] = args.sparsity
    if args.keep_fp32:
        options["keep_fp32"] = tuple(args.keep_fp32)
    return options


def _load_calibration(source: str, factory_args: list[str]) -> list:
    """Calibration samples from a torch.save'd file or a MODULE:FACTORY; the factory gets the
    --factory-arg keys its signature names (batch=8 shapes the samples as it shapes the model)."""
    if source.endswith(".pt") or Path(source).is_file():
        try:
            samples = torch.load(source, weights_only=True)
        except Exception as exc:
            first = str(exc).split(". ")[0]  # torch's own message runs on for a paragraph
            raise UsageError(f"cannot read calibration samples from {source}: {type(exc).__name__}: {first}",
                             fix="save a list of samples (each a tensor or a tuple of tensors) with torch.save(samples, path)") from None
    else:
        factory = _factory(source, "--calibration", "a .pt file", "kiln.examples.accuracy:photo_calibration",
                           "a list of samples")
        accepted = inspect.signature(factory).parameters
        samples = factory(**{k: v for k, v in (_parse_kv(item) for item in factory_args) if k in accepted})
    try:
        return list(samples)
    except TypeError:
        raise UsageError(f"--calibration {source} gave {type(samples).__name__}, not an iterable of samples",
                         fix="return or save a list of inputs, each shaped like the example inputs") from None


def _factory(target: str, what: str, file_kind: str, example: str, returning: str):
    """The callable MODULE:FACTORY names (the current directory importable)."""
    if ":" not in target:
        raise UsageError(f"{what} {target!r} is neither MODULE:FACTORY nor {file_kind}", fix=f"e.g. {example}")
    module_name, factory_name = target.split(":", 1)
    sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import {module_name!r}: {exc}", fix="check the module path and that its packages are installed") from None
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise UsageError(f"{module_name} has no callable {factory_name!r}", fix=f"name a function returning {returning}")
    return factory


def _load_model(target: str, factory_args: list[str]) -> tuple[torch.nn.Module, Any]:
    if target.endswith(".pt2") or Path(target).is_file():
        try:
            exported = torch.export.load(target)
        except Exception as exc:
            raise UsageError(f"cannot read {target} as a torch.export program: {type(exc).__name__}: {exc}",
                             fix="save it with torch.export.save(exported_program, path)") from None
        example = getattr(exported, "example_inputs", None)
        module = exported.module()
        # An exported module refuses train()/eval(); it is already an inference graph, and
        # capture asks for eval mode, so give it the plain nn.Module methods back.
        for name in ("train", "eval"):
            if name in vars(module):
                delattr(module, name)
        module.eval()
        return module, (tuple(example[0]) if example else None)
    factory = _factory(target, "model", "a .pt2 file", "kiln.examples.models:minilm", "the model")
    kwargs = dict(_parse_kv(item) for item in factory_args)
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as exc:
        raise UsageError(f"{target} does not take {', '.join(f'{k}=' for k in kwargs)} ({exc})",
                         fix="give --factory-arg only for the factory's own parameters") from None
    except ValueError:
        pass  # no signature to check (a builtin): the call itself will tell
    result = factory(**kwargs)
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module):
        return result
    if isinstance(result, torch.nn.Module):
        return result, None
    raise UsageError(f"{target} returned {type(result).__name__}", fix="return a torch.nn.Module, or (module, example_inputs)")


def _parse_kv(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise UsageError(f"expected KEY=VALUE, got {item!r}")
    key, value = item.split("=", 1)
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, value


def _random_input(text: str) -> tuple[str, torch.Tensor]:
    """NAME=SHAPE:DTYPE[:LOW:HIGH] -> (NAME, random tensor); integer draws lie in [LOW, HIGH]."""
    from kiln.types import dtype_from_name

    fix = "write NAME=1x128:int64 or NAME=1x3x224x224:float32, optionally :LOW:HIGH (inclusive) for ints"
    try:
        name, rest = text.split("=", 1)
        shape_text, dtype_text, *bounds = rest.split(":")
        shape = [int(s) for s in shape_text.lower().split("x")] if shape_text else []
        dtype = dtype_from_name(dtype_text)
        if len(bounds) not in (0, 2):
            raise ValueError("give both LOW and HIGH, or neither")
        low, high = (int(bounds[0]), int(bounds[1])) if bounds else (0, 1)
    except ValueError as exc:
        raise UsageError(f"bad --input-spec {text!r} ({exc})", fix=fix) from None
    if not name or any(size < 0 for size in shape) or low > high:
        raise UsageError(f"bad --input-spec {text!r} (need a name, sizes >= 0 and LOW <= HIGH)", fix=fix)
    if dtype.is_floating_point:
        return name, torch.randn(shape).to(dtype)
    if dtype == torch.bool:
        return name, torch.randint(0, 2, shape).bool()
    return name, torch.randint(low, high + 1, shape, dtype=dtype)


def _named_inputs(model: torch.nn.Module, named: list[tuple[str, torch.Tensor]]):
    """Positional inputs when the names follow forward()'s parameters in order; keyword inputs
    when every name is a parameter; otherwise a usage error naming the stray input."""
    import inspect

    try:
        params = [p.name for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    except (TypeError, ValueError):
        params = []
    names = [name for name, _ in named]
    takes_varargs = any(p.kind is p.VAR_POSITIONAL for p in inspect.signature(model.forward).parameters.values())
    if not params or takes_varargs or names == params[:len(names)]:
        return tuple(tensor for _, tensor in named)
    stray = [n for n in names if n not in params]
    if stray:
        raise UsageError(f"--input-spec names {stray} are not parameters of {type(model).__name__}.forward",
                         fix=f"its parameters are: {', '.join(params)}")
    return dict(named)


def _parse_dynamic(items: list[str]) -> dict:
    from kiln.types import Dim

    dynamic: dict[str, dict[int, Dim]] = {}
    for item in items:
        try:
            target, spec = item.split("=", 1)
            name, axis = target.rsplit(":", 1)
            parts = spec.split(":")
            dim = Dim(parts[0], int(parts[1]), int(parts[2])) if len(parts) == 3 else Dim(parts[0])
            dynamic.setdefault(name, {})[int(axis)] = dim
        except ValueError as exc:
            raise UsageError(f"bad --dynamic {item!r} ({exc})", fix="write NAME:AXIS=DIM or NAME:AXIS=DIM:MIN:MAX") from None
    return dynamic


# ---------------------------------------------------------------- sweep

def _sweep(args: argparse.Namespace) -> int:
    import shutil

    import kiln

    model, example = _load_model(args.model, args.factory_arg)
    if example is None:
        raise UsageError(f"{args.model} returned no example inputs", fix="return (model, example_inputs) from the factory")
    if args.evaluate and (args.metric or args.dataset):
        raise UsageError("--evaluate and --metric/--dataset both name the evaluation data", fix="give one of them")
    if bool(args.metric) != bool(args.dataset):
        raise UsageError(f"{'--metric' if args.metric else '--dataset'} needs {'--dataset' if args.metric else '--metric'}",
                         fix="give both: --metric MODULE:FN --dataset MODULE:FACTORY")
    overrides: dict[str, Any] = {k: v for k, v in (("effort", args.effort), ("backend", args.backend),
                                                    ("measure_seconds", args.measure_seconds)) if v is not None}
    metric, dataset = None, None
    if args.evaluate:
        if args.calibration_samples < 1:
            raise UsageError(f"--calibration-samples {args.calibration_samples}", fix="give 1 or more")
        evaluation = _bundled_evaluation(args.evaluate, model, example, args.calibration_samples)
        metric, dataset, overrides["calibration"] = evaluation.metric, evaluation.dataset, evaluation.calibration
    elif args.metric:
        metric = _factory(args.metric, "--metric", "a function", "mymodule:accuracy", "a float")
        make = _factory(args.dataset, "--dataset", "a function", "mymodule:validation_inputs", "the inputs")
        accepted = inspect.signature(make).parameters
        dataset = make(**{k: v for k, v in (_parse_kv(item) for item in args.factory_arg) if k in accepted})
    if args.calibration:
        overrides["calibration"] = _load_calibration(args.calibration, args.factory_arg)
    folder = Path(args.output)
    result = kiln.sweep(model, args.profile, example, args.settings, metric=metric, dataset=dataset, output_dir=folder,
                        **overrides)
    result.to_json(folder / "sweep.json")
    if not args.no_plot:
        result.plot(folder / "sweep.png")
    if args.pick is not None:
        picked = shutil.copyfile(result.artifact_of(args.pick), folder / "picked.kiln")
        print(f"point {args.pick} copied to {picked}", file=sys.stderr)
    print(json.dumps(result.to_dict()) if args.json else result.table())
    return 0 if any(p.built for p in result.points) else 1


def _bundled_evaluation(name: str, model: torch.nn.Module, example: Any, calibration_samples: int):
    """kiln.examples.evaluators' data, shaped like the example inputs (batch, sequence, image size)."""
    from kiln.examples import evaluators

    tensors = example if isinstance(example, tuple) else (example,)
    if name == "sentence-pairs":
        if len(tensors) != 2 or tensors[0].dim() != 2:
            raise UsageError("--evaluate sentence-pairs calls the model with (input_ids, attention_mask)",
                             fix="use it with kiln.examples.models:minilm, or give --metric and --dataset")
        return evaluators.sentence_pairs(batch=tensors[0].shape[0], seq=tensors[0].shape[1],
                                         calibration_samples=calibration_samples)
    if len(tensors) != 1 or tensors[0].dim() != 4 or tensors[0].shape[2] != tensors[0].shape[3]:
        raise UsageError("--evaluate photos calls the model with square images (batch x 3 x size x size)",
                         fix="use it with kiln.examples.models:efficientnet_lite0, or give --metric and --dataset")
    return evaluators.photos(model, batch=tensors[0].shape[0], size=tensors[0].shape[2], calibration_samples=calibration_samples)


# ---------------------------------------------------------------- run / bench / inspect

def _artifact_inputs(compiled, items: list[str], seed: int) -> list[torch.Tensor]:
    import numpy as np

    from kiln.frontend.input_spec import random_inputs

    tensors = random_inputs(compiled.input_spec, seed)
    names = list(compiled.input_spec.names)
    for item in items:
        name, _, file = item.partition("=")
        if name not in names:
            raise UsageError(f"artifact has no input {name!r}", fix=f"inputs are: {', '.join(names)}")
        try:
            tensors[names.index(name)] = torch.from_numpy(np.load(file))
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read {file}: {exc}", fix="pass a .npy file written by numpy.save") from None
    return tensors


def _renamed(values: list[str], old: str, new: str) -> list[str]:
    """Values given under an option's old name, with a note naming the new one."""
    if values:
        print(f"kiln: note: `{old}` is now `{new}` (the old name is read for one more release)", file=sys.stderr)
    return values


def _expected_digest(args: argparse.Namespace) -> str | None:
    if args.pin_digest is None:
        return args.expected_digest
    if "=" in args.pin_digest:
        raise UsageError(f"kiln run --pin {args.pin_digest}: placement is fixed when the artifact is compiled",
                         fix="pass --pin MODULE=DEVICE to kiln compile; kiln run checks a digest with --expected-digest")
    if args.expected_digest and args.expected_digest != args.pin_digest:
        raise UsageError("kiln run got two different digests (--pin and --expected-digest)", fix="pass --expected-digest once")
    print("kiln: note: `kiln run --pin DIGEST` is now `--expected-digest DIGEST`", file=sys.stderr)
    return args.pin_digest


def _run(args: argparse.Namespace) -> int:
    import kiln
    from kiln.frontend.input_spec import check_call, rebuild_call

    compiled = kiln.load(args.artifact, expected_digest=_expected_digest(args))
    files = args.input_file + _renamed(args.old_input_file, "kiln run --input", "--input-file")
    tensors = _artifact_inputs(compiled, files, args.seed)
    call_args, call_kwargs = rebuild_call(compiled.input_spec, tensors)
    checked = check_call(compiled.input_spec, call_args, call_kwargs)
    outputs = compiled.run_flat(checked)
    rows = []
    for name, value in zip(compiled.plan.output_names, outputs):
        data = value.detach().contiguous()
        rows.append({"name": name, "shape": list(data.shape), "dtype": str(data.dtype).replace("torch.", ""),
                     "sum": float(data.double().sum()), "sha256": hashlib.sha256(data.numpy().tobytes()).hexdigest()[:16]})
        if args.out:
            import numpy as np

            Path(args.out).mkdir(parents=True, exist_ok=True)
            np.save(Path(args.out) / f"{name}.npy", data.numpy())
    if args.json:
        print(json.dumps({"outputs": rows}))
    else:
        for row in rows:
            print(f"{row['name']}: {row['dtype']}{row['shape']} sum={row['sum']:.6g} sha256={row['sha256']}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import kiln
    from kiln.frontend.input_spec import random_inputs

    if args.iters < 1 or args.warmup < 0:
        raise UsageError("--iters must be >= 1 and --warmup >= 0")
    compiled = kiln.load(args.artifact)
    tensors = random_inputs(compiled.input_spec, 0)
    for _ in range(args.warmup):
        compiled.run_flat(tensors)
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        compiled.run_flat(tensors)
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    result = {"median_ms": statistics.median(times), "p99_ms": times[min(len(times) - 1, int(0.99 * len(times)))],
              "iters": args.iters, "backends": compiled.backends}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"median {result['median_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms over {args.iters} calls "
              f"({', '.join(f'{k}: {v}' for k, v in compiled.backends.items())})")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from kiln.artifact import describe

    # The manifest alone: no engine is extracted or loaded unless asked, so inspecting an
    # artifact from elsewhere runs nothing from it.
    described = describe(args.artifact, expected_digest=args.expected_digest)
    manifest, report = described.manifest, described.report
    loaded, load_times = None, {}
    if args.load_engines:
        import kiln
        from kiln.frontend.input_spec import random_inputs

        start = time.perf_counter()
        loaded = kiln.load(args.artifact, expected_digest=described.digest)  # the manifest just read, nothing swapped in since
        load_times["load_seconds"] = time.perf_counter() - start
        inputs = random_inputs(loaded.input_spec, seed=1)  # drawn from the manifest's input spec, in range
        start = time.perf_counter()
        loaded.run_flat(inputs)
        load_times["first_call_seconds"] = time.perf_counter() - start
        load_times["first_call_inputs"] = ", ".join(f"{'x'.join(map(str, t.shape))} {str(t.dtype).replace('torch.', '')}"
                                                    for t in inputs)
    if args.html:
        from kiln.placement.html import render_html

        Path(args.html).write_text(render_html(report))
    if args.json:
        print(json.dumps({"digest": described.digest, "profile": manifest["profile"], "plan": manifest["plan"],
                          "report": report.to_dict(), "engines_loaded": loaded is not None, **load_times}, default=str))
    else:
        print(report.render())
        if loaded is not None:
            print(f"\nEngines loaded: {', '.join(f'{k} ({v})' for k, v in loaded.backends.items())}")
            print(f"Load: kiln.load {load_times['load_seconds']:.3f} s (checksums, engines), first call "
                  f"{load_times['first_call_seconds']:.3f} s (inputs drawn from the input spec: {load_times['first_call_inputs']})")
        print(f"\nArtifact digest (pin it with kiln.load(path, expected_digest=...) or kiln run --expected-digest): {described.digest}")
    return 0


def _profile_host(args: argparse.Namespace) -> int:
    from kiln.profile_host import write_profile

    if args.seconds <= 0:
        raise UsageError("--seconds must be positive")
    path = write_profile(Path(args.output), args.name, args.seconds)
    if args.json:
        print(json.dumps({"profile": str(path)}))
    else:
        print(Path(path).read_text())
        print(f"wrote {path} (load it with --profile {path})")
    return 0


def _profiles(args: argparse.Namespace) -> int:
    from kiln import hardware_profiles

    if args.action == "list":
        names = hardware_profiles.available()
        if args.json:
            print(json.dumps(names))
        else:
            for name in names:
                print(f"{name:14s} {hardware_profiles.load(name).description}")
        return 0
    if not args.name:
        raise UsageError("`kiln profiles show` needs a profile name", fix="see `kiln profiles list`")
    profile = hardware_profiles.load(args.name)
    if args.json:
        print(json.dumps({"name": profile.name, "description": profile.description, "primary_device": profile.primary_device,
                          "select": profile.select, "digest": profile.digest,
                          "devices": {n: {"kind": d.kind.value, "model": d.model, "memory_gb": d.memory_gb,
                                          "memory_bandwidth_gbs": d.memory_bandwidth_gbs, "backends": list(d.backends),
                                          "peak_tflops": {p.value: v for p, v in d.peak_tflops.items()}}
                                      for n, d in profile.devices.items()}}))
    else:
        print(profile.summary())
    return 0


# ---------------------------------------------------------------- serving

def _export_triton(args: argparse.Namespace) -> int:
    from kiln.serving.triton import triton_repository

    export = triton_repository(args.artifact, args.repository, name=args.name, max_batch=args.max_batch,
                               max_queue_delay_us=args.max_queue_delay_us, instances=args.instances,
                               backend=args.backend, overwrite=args.overwrite)
    if args.json:
        print(json.dumps({"model_dir": str(export.model_dir), "backend": export.backend, "max_batch": export.max_batch,
                          "not_carried": export.not_carried}))
        return 0
    print(f"wrote {export.model_dir} (Triton backend {export.backend}, max_batch_size {export.max_batch})")
    print("not carried over to Triton (also in the repository's README.md):")
    for line in export.not_carried:
        print(f"  - {line}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from kiln.serving import artifact_name
    from kiln.serving.ray_serve import deployment, serve

    name = args.name or artifact_name(args.artifact)
    app = deployment(args.artifact, replicas=args.replicas, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
                     num_cpus=args.num_cpus, pad=dict(_parse_kv(item) for item in args.pad) or None)  # refuses an unbatchable artifact before Ray starts
    import ray

    # Ctrl-C (SIGINT) stops the server even when it was started from a shell that ignores SIGINT
    # for its background jobs (`kiln serve ... &`, nohup, CI runners): Python installs no
    # KeyboardInterrupt handler for a signal it inherits as ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    ray.init(address=args.address, include_dashboard=False) if args.address else ray.init(include_dashboard=False)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(app, name=name, route_prefix=f"/{name}")
        url = f"http://{args.host}:{args.port}/{name}"
        if args.json:
            print(json.dumps({"url": url, "replicas": args.replicas, "max_batch": args.max_batch}), flush=True)
        else:
            print(f"serving {args.artifact} at {url} ({args.replicas} replicas, batches of up to {args.max_batch} rows, "
                  f"waiting up to {args.batch_wait_ms} ms); Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        if args.address:  # a cluster we joined keeps running: take only our application off it
            serve.delete(name)
        else:
            serve.shutdown()
        ray.shutdown()


def _loadtest(args: argparse.Namespace) -> int:
    from kiln.serving import loadtest

    if bool(args.artifact) == bool(args.body):
        raise UsageError("kiln loadtest needs one request body", fix="give --artifact ART (a body drawn from its spec) or --body FILE.json")
    try:
        levels = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1 or args.duration <= 0:
        raise UsageError(f"--concurrency {args.concurrency} --duration {args.duration}",
                         fix="give positive client counts such as 1,8,32 and a positive duration in seconds")
    body = loadtest.body_for(args.artifact, args.url, rows=args.rows) if args.artifact else Path(args.body).read_bytes()
    results = []
    for level in levels:
        results.append(loadtest.run_load(args.url, body, level, args.duration))
        if not args.json and not args.quiet:
            print(f"concurrency {level}: {results[-1].requests} requests, {results[-1].errors} errors", file=sys.stderr)
    if args.plot:
        loadtest.plot({args.url: results}, args.plot)
    if args.json:
        print(json.dumps(loadtest.as_json(results)))
    else:
        print(loadtest.render(results))
        first = next((r.first_error for r in results if r.first_error), None)
        if first:
            print(f"first error: {first}")
    return 1 if all(r.requests == 0 for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
