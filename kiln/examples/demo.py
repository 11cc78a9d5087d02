"""kiln's main job on a bundled example: compile all-MiniLM-L6-v2 for the cpu-x86 profile,
print the report, save and reload the artifact, and time it against eager PyTorch.

    python -m kiln.examples.demo [--model minilm|efficientnet] [--batch 8] [--profile cpu-x86]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import kiln
from kiln.examples import models


def _median_ms(fn, inputs, rounds: int) -> float:
    for _ in range(3):
        fn(*inputs)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn(*inputs)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["minilm", "efficientnet"], default="minilm")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--profile", default="cpu-x86")
    args = parser.parse_args(argv)
    logging.basicConfig(format="[kiln] %(message)s", stream=sys.stderr)
    logging.getLogger("kiln").setLevel(logging.INFO)

    model, inputs = models.minilm(args.batch) if args.model == "minilm" else models.efficientnet_lite0(args.batch)
    compiled = kiln.optimize(model, args.profile, inputs)
    print(compiled.report)

    with tempfile.TemporaryDirectory() as tmp:
        path = compiled.save(Path(tmp) / f"{args.model}.kiln")
        reloaded = kiln.load(path)
        print(f"\nsaved {path.name} ({path.stat().st_size / 1e6:.1f} MB) and reloaded it: {reloaded}")

        with torch.no_grad():
            rounds = 20
            eager, fast = [], []
            for _ in range(3):  # interleaved blocks: the machine's drift hits both alike
                eager.append(_median_ms(model, inputs, rounds))
                fast.append(_median_ms(reloaded, inputs, rounds))
        e, k = statistics.median(eager), statistics.median(fast)
        print(f"\n{args.model} batch {args.batch} on {args.profile}: eager {e:.1f} ms, kiln {k:.1f} ms "
              f"-> {e / k:.2f}x eager (median of interleaved runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
