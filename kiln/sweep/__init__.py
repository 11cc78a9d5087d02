"""kiln.sweep: the latency-accuracy trade-off of one model over a series of settings, with its
Pareto front; each point a verified, saved artifact the user can pick.

    result = kiln.sweep(model, "cpu-x86", example, ["fp32", "auto", "auto:0.995", "auto:0.99"],
                        metric=my_metric, dataset=my_inputs, output_dir="sweep/")
    print(result.table()); result.plot("sweep/sweep.png"); engine = result.pick(3)
"""

from kiln.sweep.result import SweepPoint, SweepResult, pareto_front
from kiln.sweep.run import sweep
from kiln.sweep.settings import DEFAULT_SETTINGS, Setting, parse_settings

__all__ = ["sweep", "Setting", "SweepPoint", "SweepResult", "pareto_front", "parse_settings", "DEFAULT_SETTINGS"]
