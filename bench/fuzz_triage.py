"""Sort a fuzzing campaign's failures (bench/fuzz_long.py --out) by cause and write the table.

    python bench/fuzz_triage.py /tmp/a.json /tmp/b.json --out bench/results/fuzz_campaign.md

Each failure lands in one of:
  upstream    a NaN/Inf probe that differs where the runtime itself treats NaN or Inf unlike
              PyTorch for an op the model uses (bench/nonfinite_semantics.py measures that per
              op without kiln; its table in bench/results/ is read here)
  fixed       a failure a kiln commit fixed: the seed passes when re-run after the fix (--rerun)
  open        anything else: to be triaged by hand
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from fuzz_long import signature  # noqa: E402

SEMANTICS = ROOT / "bench" / "results" / "nonfinite_semantics.md"
# The fuzz generator's step names that run each measured op (attention runs a softmax inside).
STEPS_OF = {"layer_norm": {"layernorm"}, "group_norm": {"groupnorm"}, "batch_norm": {"batchnorm1d", "batchnorm2d"},
            "softmax": {"softmax", "attention"}, "log_softmax": {"log_softmax"}, "clamp_min": {"clamp"},
            "sdpa_causal": {"attention"}, "sdpa_bool_mask": {"attention"}, "gelu_after_permute": {"gelu"},
            "batch_norm_batch_stats": {"batchnorm1d", "batchnorm2d"}, "conv2d_pointwise_strided": {"conv2d"},
            "maximum": {"maximum"}}


# Failures reproduced by hand without kiln (the runtime fed the same torch.export program through
# its own entry point), with what was found.
REPRODUCED_UPSTREAM = {
    ("openvino", 524): "OpenVINO 2026.4.1 drops eager's NaN after mean -> batchnorm -> strided 1x1 conv "
                       "(openvino.convert_model of the same program, static shape, reproduces it)",
}


# What fixed each failure that passes on re-run: the kiln commit, and the cause it found.
_WIDENED = ("1bc3602: a dynamic batch captured from an example of one is exported from the example repeated to size 2 "
            "(torch 2.13's AOTInductor ran the size-oblivious program wrong past row 0; OpenVINO failed to infer it)")
FIXED_BY = {
    **{("inductor", s): _WIDENED for s in (7, 79, 91, 107, 137, 143, 157, 161, 169, 197, 235, 287, 371, 377, 391, 431, 437,
                                           479, 481)},
    **{("openvino", s): _WIDENED for s in (91, 107, 1493, 1507, 1739, 1825)},
    ("onnxruntime", 812): "3e4b2b4: a fused ONNX Runtime engine is checked on the example inputs (onnxscript 0.7.2's mha2 "
                          "rule dropped a flatten); the unfused graph is used",
    **{("openvino", s): "126fa04: OpenVINO's table refuses a padded, strided 1x1 convolution (its CPU plugin strides "
                        "before padding)" for s in (242, 364, 1892)},
    **{("openvino", s): "73cdabb: OpenVINO's table refuses group_norm of a 2-d input (no CPU kernel)" for s in (994, 1090, 1854)},
    ("openvino", 1460): "1d7e701: an input OpenVINO's frontend names by a number is wired by rank",
}


def upstream_nonfinite() -> dict[str, set[str]]:
    """runtime -> generator step names whose NaN/Inf output the runtime itself gives unlike
    PyTorch, read from bench/nonfinite_semantics.py's table (measured without kiln)."""
    rows = [line.strip("|").split("|") for line in SEMANTICS.read_text().splitlines() if line.startswith("| ")]
    header = [c.strip() for c in rows[0]]
    found: dict[str, set[str]] = collections.defaultdict(set)
    for row in rows[1:]:
        cells = [c.strip() for c in row]
        for runtime, cell in zip(header[1:], cells[1:]):
            if cell != "same":
                found[runtime] |= STEPS_OF.get(cells[0], {cells[0]})
    return found


def is_upstream_nonfinite(result: dict, table: dict[str, set[str]]) -> str | None:
    if result["outcome"] != "mismatch" or "NaN and Inf" not in result.get("error", ""):
        return None
    steps = {step.split("(")[0].strip().lower() for step in result.get("ops", "").split("-> [", 1)[-1].split("] ->")[0].split(";")}
    hits = sorted(steps & table.get(result["backend"], set()))
    return ", ".join(hits) if hits else None


FAILURE_LINE = re.compile(r"seed (\d+): (\w+) ([^:]*): (.*)")


def results_from_log(path: Path, backend: str, start: int, families: list[str]) -> list[dict]:
    """The results of a fuzz_long.py run that was stopped before it wrote --out, read back from its
    progress output: a dot per passing seed, a line per failing one (its error cut at 150 characters),
    seeds in order from `start`. The models' descriptions are generated again from their seeds."""
    sys.path.insert(0, str(ROOT / "tests"))
    from fuzz.harness import describe_model, make_model

    results, seed = [], start
    for line in path.read_text().splitlines():
        match = FAILURE_LINE.search(line)
        if match is not None:
            failed = int(match.group(1))
            results += [_ok(s, backend, families) for s in range(seed, failed)]
            family = families[failed % len(families)]
            results.append({"seed": failed, "backend": backend, "family": family, "outcome": match.group(2),
                            "error_type": match.group(3), "error": match.group(4), "ops": describe_model(make_model(failed, family)[0]),
                            "details": {"from_log": True}})
            seed = failed + 1
        elif line and set(line.strip()) == {"."}:
            count = len(line.strip())
            results += [_ok(s, backend, families) for s in range(seed, seed + count)]
            seed += count
    return results


def _ok(seed: int, backend: str, families: list[str]) -> dict:
    return {"seed": seed, "backend": backend, "family": families[seed % len(families)], "outcome": "ok"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", type=Path, help="JSON files written by bench/fuzz_long.py --out")
    parser.add_argument("--log", action="append", default=[], metavar="BACKEND:START:FILE",
                        help="a stopped run's progress output, read back (repeatable)")
    parser.add_argument("--families", default="general,masked", help="the run's --families, for --log")
    parser.add_argument("--rerun", type=Path, help="a fuzz_long.py JSON re-running the failing seeds after fixes")
    parser.add_argument("--out", type=Path, help="write the table (markdown) here")
    parser.add_argument("--json", type=Path, help="write the counts and every failure with its cause here")
    parser.add_argument("--about", default="", help="a paragraph on the runs (commits, machine), put under the title")
    args = parser.parse_args(argv)
    results = [r for path in args.runs for r in json.loads(path.read_text())["results"]]
    for item in args.log:
        backend, start, file = item.split(":", 2)
        results += results_from_log(Path(file), backend, int(start), args.families.split(","))
    table = upstream_nonfinite()
    rerun = {}
    if args.rerun:
        rerun = {(r["backend"], r["seed"]): r for r in json.loads(args.rerun.read_text())["results"]}
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    families: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    causes: dict[tuple[str, str], list[dict]] = collections.defaultdict(list)
    for r in results:
        counts[r["backend"]][r["outcome"]] += 1
        families[r["backend"]][r.get("family", "general")] += 1
        if r["outcome"] == "ok":
            continue
        again = rerun.get((r["backend"], r["seed"]))
        if again is not None and again["outcome"] == "ok":
            fix = FIXED_BY.get((r["backend"], r["seed"]), "a kiln change")
            causes[(f"fixed, passes on re-run: {fix}", "")].append(r)
        elif (why := REPRODUCED_UPSTREAM.get((r["backend"], r["seed"]))) is not None:
            causes[(f"upstream, reproduced by hand: {why}", "")].append(r)
        elif (ops := is_upstream_nonfinite(r, table)) is not None:
            r = {**r, "error": f"model uses {ops}; {r['error']}"}
            causes[(f"upstream: {r['backend']} treats NaN/Inf unlike PyTorch in an op the model uses", "")].append(r)
        else:
            causes[("open", signature(again or r))].append(again or r)
    total = sum(sum(c.values()) for c in counts.values())
    lines = [f"# Differential fuzzing campaign: {total} models", "",
             f"Command: `python bench/fuzz_long.py --families general,masked ...`, sorted by `python bench/fuzz_triage.py` "
             f"(at kiln {_commit()}); every failure with its cause is in fuzz_campaign.json.", "",
             *([args.about, ""] if args.about else []),
             "| backend | models | general | masked | ok | kiln_error | mismatch | crash |", "|---|---|---|---|---|---|---|---|"]
    for backend, c in counts.items():
        lines.append(f"| {backend} | {sum(c.values())} | {families[backend]['general']} | {families[backend]['masked']} | "
                     f"{c['ok']} | {c['kiln_error']} | {c['mismatch']} | {c['crash']} |")
    lines += ["", "## Failures by cause", "", "| cause | count | seeds (backend:seed) | example |", "|---|---|---|---|"]
    for (cause, sig), rs in sorted(causes.items(), key=lambda kv: (kv[0][0], -len(kv[1]))):
        seeds = ", ".join(f"{r['backend']}:{r['seed']}" for r in rs[:8]) + (" ..." if len(rs) > 8 else "")
        example = re.sub(r"\s+", " ", f"{rs[0].get('error_type', '')}: {rs[0].get('error', '')}")[:200].replace("|", "/")
        lines.append(f"| {cause}{' / ' + sig[:80].replace('|', '/') if sig else ''} | {len(rs)} | {seeds} | {example} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({
            "counts": {b: dict(c) for b, c in counts.items()}, "families": {b: dict(c) for b, c in families.items()},
            "failures": [{"cause": cause, "signature": sig, **{k: r.get(k) for k in ("backend", "seed", "family", "outcome",
                                                                                      "error_type", "error", "ops")}}
                         for (cause, sig), rs in causes.items() for r in rs]}, indent=1))
    return 0


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    except OSError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
