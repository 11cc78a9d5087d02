"""How fast kiln runs a mixture-of-experts model against eager PyTorch and torch.compile.

The model: a Mixtral-style causal LM built from a transformers config with seeded random
weights (hidden 256, intermediate 512, 4 layers, 8 heads / 4 key-value heads, 8 experts, top-2,
vocabulary 1000, sequence 128). Small enough to build in minutes on two cores, shaped like the
real thing where it matters here: the experts hold most of the weights and FLOPs (the small
vocabulary keeps the LM head from dominating), and 8 experts top-2 is Mixtral's routing.

Contenders, at batch 1 and 8, timed interleaved in one process (cpu_peers.time_interleaved):
  eager (loop)            transformers' reference experts forward (experts_implementation="eager"):
                          a Python loop over the experts hit, data-dependent token lists
  eager (grouped_mm)      transformers 5's default where it can dispatch it (this install): tokens
                          sorted by expert, a grouped matmul
  torch.compile (loop)    torch.compile of the loop model, default mode (graph breaks reported)
  kiln fp32 / kiln auto   kiln.optimize(loop model, "cpu-x86", precision="fp32" / default "auto"),
                          cache off; kiln captures each experts module as one kiln::moe_experts
                          node run in PyTorch between the compiled partitions (moe_form="auto":
                          dispatch on a CPU profile)
  kiln auto, min_cosine   precision "auto" with Budget(min_cosine=0.999) alone: the experts fit it
                          at bf16 (the default budget also bounds the relative L2 error at 1e-2,
                          which this random-weight model's logits spend on a few layers)
  kiln fp32, blocked      at batch 8 (--static-at): moe_form="blocked", the static form in plain
                          matmuls that a GPU profile takes, for the choice
Each row: median and p99 ms, speed-up over eager (loop) and over eager (grouped_mm), cosine of
the logits to eager (loop) on the example inputs.

kiln is imported before torch, as a user script would: it shortens PyTorch's OpenMP spin
(kiln.host), which otherwise holds the cores OpenVINO needs after each eager partition. The
header gives GOMP_SPINCOUNT as the run had it; eager and torch.compile run under it too.

Run:
    PYTHONPATH=. python bench/moe.py                      # writes bench/results/moe.md and .json
    PYTHONPATH=. python bench/moe.py --batches 1 --out /tmp/moe.md
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import kiln  # before torch: see the docstring
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from cpu_peers import CORES, log, p99, time_interleaved  # noqa: E402

SEQ = 128


def build_model(moe_impl: str):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                           max_position_embeddings=512, use_cache=False)
    model = MixtralForCausalLM(config).eval()
    model.set_experts_implementation(moe_impl)
    return model


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.reshape(1, -1).double(), b.reshape(1, -1).double()).item()


def graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def run_batch(batch: int, args) -> list[dict]:
    loop_model = build_model("eager")
    grouped_model = copy.deepcopy(loop_model)
    grouped_model.set_experts_implementation("grouped_mm")
    ids = torch.randint(0, 1000, (batch, SEQ), generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        reference = loop_model(ids).logits
    rows: dict[str, dict] = {}
    calls: dict[str, object] = {}

    def add(label: str, call, build_s: float | None, note: str = "") -> None:
        with torch.no_grad():
            out = call()
        logits = out["logits"] if isinstance(out, dict) else out.logits
        rows[label] = {"batch": batch, "contender": label, "build_s": build_s, "note": note,
                       "cosine_to_eager": cosine(logits, reference),
                       "max_abs_err": (logits - reference).abs().max().item()}
        calls[label] = call

    add("eager (loop)", lambda: loop_model(ids), None)
    add("eager (grouped_mm)", lambda: grouped_model(ids), None, "transformers' default experts implementation here")
    torch._dynamo.reset()
    before = graph_breaks()
    compiled_loop = torch.compile(loop_model)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            compiled_loop(ids)
        add("torch.compile (loop)", lambda: compiled_loop(ids), time.perf_counter() - start,
            f"{graph_breaks() - before} graph breaks")
    except Exception as exc:  # reported as what happened, not hidden
        rows["torch.compile (loop)"] = {"batch": batch, "contender": "torch.compile (loop)",
                                        "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    loose = kiln.Budget(min_cosine=0.999)
    kiln_rows = [("kiln fp32", "fp32", "auto", None), ("kiln auto", "auto", "auto", None),
                 ("kiln auto, min_cosine 0.999", "auto", "auto", loose)]
    if batch in args.static_at:
        kiln_rows.append(("kiln fp32, blocked form", "fp32", "blocked", None))
    for label, precision, form, budget in kiln_rows:
        log(f"batch {batch}: {label} ...")
        start = time.perf_counter()
        extra = {} if budget is None else {"accuracy_budget": budget}
        with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
            warnings.simplefilter("ignore", kiln.UnprovenAccuracyWarning)  # no calibration data here: said in the note
            built = kiln.optimize(loop_model, "cpu-x86", ids, precision=precision, moe_form=form, cache=False, **extra)
        note = f"{', '.join(sorted(set(built.backends.values())))}; {built.report.precision_summary or 'fp32'}"
        forms = sorted({b['form'] for b in built.report.experts if b['form']})
        note += f"; MoE form: {', '.join(forms) or 'none'}"
        add(label, lambda built=built: built(ids), time.perf_counter() - start, note)
        rows[label]["expert_load"] = built.report.experts
    log(f"batch {batch}: timing {len(calls)} contenders interleaved ...")
    with torch.no_grad():
        samples, errors = time_interleaved(calls, args.rounds, args.iters)
    loop_ms = statistics.median(samples["eager (loop)"]) * 1e3
    grouped_ms = statistics.median(samples["eager (grouped_mm)"]) * 1e3
    for label, row in rows.items():
        if label in errors:
            row["error"] = errors[label]
        if label in samples:
            med = statistics.median(samples[label]) * 1e3
            row.update(median_ms=med, p99_ms=p99(samples[label]) * 1e3, vs_eager_loop=loop_ms / med,
                       vs_eager_grouped=grouped_ms / med)
    return list(rows.values())


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(rows: list[dict], header: list[str]) -> str:
    lines = header + ["", "| batch | contender | median ms | p99 ms | x eager (loop) | x eager (grouped_mm) | cosine to eager "
                      "| build s | note |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        note = r.get("error") or r.get("note", "")
        lines.append(f"| {r['batch']} | {r['contender']} | {fmt(r.get('median_ms'), '.1f')} | {fmt(r.get('p99_ms'), '.1f')} "
                     f"| {fmt(r.get('vs_eager_loop'), '.2f')} | {fmt(r.get('vs_eager_grouped'), '.2f')} "
                     f"| {fmt(r.get('cosine_to_eager'), '.6f')} | {fmt(r.get('build_s'), '.0f')} | {note} |")
    loads = [r for r in rows if r["contender"] == "kiln fp32" and r.get("expert_load")]
    for r in loads:
        lines += ["", f"Per-expert load at batch {r['batch']} ({r['batch'] * SEQ} tokens, top-2; tokens routed to each "
                  "expert on the example inputs, from kiln's report):", ""]
        lines += [f"- {b['block']}: {b['load']} (sum {sum(b['load'])})" for b in r["expert_load"]]
    return "\n".join(lines) + "\n"


def cpu_flags() -> str:
    text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout if sys.platform.startswith("linux") else ""
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Flags")), "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=5, help="timed calls per contender per round")
    parser.add_argument("--out", default=str(HERE / "results" / "moe.md"))
    parser.add_argument("--static-at", default="8", help="batches at which kiln fp32 with moe_form='blocked' runs too")
    args = parser.parse_args(argv)
    args.static_at = {int(b) for b in args.static_at.split(",") if b.strip()}
    from kiln.profile_host import cpu_model

    load_start = os.getloadavg()
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        rows += run_batch(batch, args)
        torch._dynamo.reset()
    load_end = os.getloadavg()
    flags = cpu_flags()
    header = [f"# A mixture-of-experts model: kiln against eager and torch.compile ({datetime.date.today().isoformat()})", "",
              f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
              "- model: Mixtral-style, from a transformers config with seeded random weights: hidden 256, intermediate 512, "
              f"4 layers, 8 heads (4 key-value), 8 experts top-2, vocabulary 1000, sequence {SEQ}",
              f"- machine: {cpu_model()}, {CORES} usable cores (torch threads {torch.get_num_threads()}); "
              f"AVX512_BF16 {'yes' if 'avx512_bf16' in flags else 'no'}, AMX {'yes' if 'amx_tile' in flags else 'no'}",
              f"- load average (1, 5, 15 min): {', '.join(f'{x:.1f}' for x in load_start)} at start, "
              f"{', '.join(f'{x:.1f}' for x in load_end)} at end: "
              + ("other work shared the cores during the run (1-min load above the core count): the ratios, measured "
                 "interleaved, are the figures to read, not the absolute times"
                 if max(load_start[0], load_end[0]) > CORES else "a quiet machine (1-min load at or below the core count)"),
              f"- torch {torch.__version__}, python {platform.python_version()}; GOMP_SPINCOUNT "
              f"{os.environ.get('GOMP_SPINCOUNT', 'unset (libgomp default)')}, OMP_WAIT_POLICY "
              f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}",
              "- kiln's lowered plans were measured on the example inputs only (no calibration data)",
              f"- {args.rounds} rounds x {args.iters} timed calls per contender, interleaved",
              f"- lscpu flags: {flags}"]
    table = markdown(rows, header)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    meta = {"argv": sys.argv, "cpu": cpu_model(), "cores": CORES, "torch": torch.__version__, "loadavg_start": load_start,
            "loadavg_end": load_end, "lscpu_flags": flags}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    log(f"wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
