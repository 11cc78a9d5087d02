"""The sweep's curve as a PNG: latency (x) against accuracy (y), each point labelled with its
number and setting, the Pareto front joined and ringed, eager PyTorch as a dashed reference.
With a user's metric, a second panel shows 1 - cosine to eager (log scale), the error behind it.
matplotlib is imported here only, so kiln runs without it."""

from __future__ import annotations

from pathlib import Path

from kiln.errors import KilnError

FRONT, OTHER, EAGER = "#d62828", "#457b9d", "#6c757d"


def draw(result, path: Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise KilnError("drawing the sweep's curve needs matplotlib, which is not installed", where="kiln.sweep plot",
                        fix="pip install matplotlib, or leave the plot out (the table and JSON hold every number)") from None
    built = [p for p in result.points if p.built and p.median_ms is not None]
    panels = [("accuracy", result.accuracy_name)]
    if result.reference_score is not None:
        panels.append(("error", "1 - cosine to eager (lower is better; floored at 1e-12)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    for ax, (kind, name) in zip(axes[0], panels):
        _panel(ax, result, built, kind, name)
    fig.suptitle(f"kiln sweep: {result.model} on {result.profile}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _panel(ax, result, built, kind: str, name: str) -> None:
    def value(p):
        return p.accuracy if kind == "accuracy" else max(1 - p.cosine_min, 1e-12)

    front = sorted((p for p in built if p.on_front), key=lambda p: p.median_ms)
    rest = [p for p in built if not p.on_front]
    ax.scatter([p.median_ms for p in rest], [value(p) for p in rest], color=OTHER, label="point", zorder=3)
    ax.plot([p.median_ms for p in front], [value(p) for p in front], "-o", color=FRONT, label="Pareto front", zorder=4)
    for p in built:
        ax.annotate(f"#{p.index} {p.label}", (p.median_ms, value(p)), textcoords="offset points", xytext=(5, 4), fontsize=7)
    if result.eager_ms is not None:
        ax.axvline(result.eager_ms, color=EAGER, linestyle="--", linewidth=1, label=f"eager {result.eager_ms:.2f} ms")
    if kind == "accuracy" and result.reference_score is not None:
        ax.axhline(result.reference_score, color=EAGER, linestyle=":", linewidth=1, label="eager score")
    if kind == "error":
        ax.set_yscale("log")
    ax.set_xlabel("latency, median ms per call (interleaved)")
    ax.set_ylabel(name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
