"""A self-contained HTML page (inline SVG and CSS, no scripts, nothing fetched) drawing a
placed graph: one column band per partition, nodes coloured by device and outlined by
precision, edges between partitions drawn heavier, each partition headed by its device,
backend, node count and estimated vs measured time. Node details are SVG <title> tooltips.
An artifact made by kiln.sweep also shows the sweep's latency-accuracy curve, its Pareto front
joined, and this artifact's point ringed (drawn here, so the page needs no plotting library)."""

from __future__ import annotations

import html

DEVICE_COLOURS = ("#8ecae6", "#ffb703", "#90be6d", "#f28482", "#cdb4db", "#bde0fe", "#e9c46a")
PRECISION_COLOURS = {"fp32": "#333333", "tf32": "#6c757d", "bf16": "#d62828", "fp16": "#f77f00", "fp8": "#7b2cbf",
                     "int8": "#2a9d8f", "int4": "#264653"}
ROWS, NODE_W, NODE_H, GAP_X, GAP_Y, HEADER = 36, 150, 18, 14, 6, 64


def render_html(report, title: str | None = None) -> str:
    records = report.placement
    partitions = _partition_order(report, records)
    devices = list(dict.fromkeys(r["device"] for r in records))
    colour = {d: DEVICE_COLOURS[i % len(DEVICE_COLOURS)] for i, d in enumerate(devices)}
    times = {p.name: p for p in report.partitions}
    position, boxes, x = {}, [], 20
    for name in partitions:
        members = [r for r in records if r["partition"] == name]
        columns = max(1, -(-len(members) // ROWS))
        for i, record in enumerate(members):
            position[record["node"]] = (x + (i // ROWS) * (NODE_W + GAP_X), HEADER + 20 + (i % ROWS) * (NODE_H + GAP_Y))
        width = columns * (NODE_W + GAP_X) - GAP_X
        boxes.append((name, x, width, members))
        x += width + 3 * GAP_X
    height = HEADER + 40 + min(ROWS, max((len(b[3]) for b in boxes), default=1)) * (NODE_H + GAP_Y)
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{x}" height="{height}" font-family="sans-serif" font-size="10">']
    for name, left, width, members in boxes:
        svg.append(_box(name, left, width, height, members, times.get(name)))
    part_of = {r["node"]: r["partition"] for r in records}
    for record in records:
        for source in record["inputs"]:
            if source in position:
                svg.append(_edge(position[source], position[record["node"]], part_of[source] != record["partition"]))
    for record in records:
        svg.append(_node(record, position[record["node"]], colour))
    svg.append("</svg>")
    heading = html.escape(title or f"{report.model} on {report.profile}")
    legend = "".join(f'<span class="key" style="background:{c}">{html.escape(d)}</span>' for d, c in colour.items())
    legend += "".join(f'<span class="key" style="border:2px solid {c}">{p}</span>' for p, c in PRECISION_COLOURS.items()
                      if any(r["precision"] == p for r in records))
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in report.notes)
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>" + heading + "</title><style>"
            "body{font-family:sans-serif;margin:16px} .key{display:inline-block;padding:2px 8px;margin:2px;border-radius:3px}"
            "</style></head><body><h2>" + heading + "</h2><p>Devices (fill) and precisions (outline): " + legend + "</p>"
            + "".join(svg) + "<ul>" + notes + "</ul>" + sweep_section(getattr(report, "sweep", None)) + "</body></html>")


def _partition_order(report, records) -> list[str]:
    named = [p.name for p in report.partitions]
    return named + [p for p in dict.fromkeys(r["partition"] for r in records) if p not in named]


def _box(name, left, width, height, members, record) -> str:
    device = members[0]["device"] if members else (record.device if record else "")
    backend = record.backend if record else (members[0]["backend"] if members else "")
    figures = []
    if record is not None and record.estimated_ms is not None:
        figures.append(f"est. {record.estimated_ms:.3f} ms")
    if record is not None and record.measured_ms is not None:
        figures.append(f"measured {record.measured_ms:.3f} ms")
    lines = [f"{name}: {device} / {backend}", f"{len(members)} nodes", ", ".join(figures)]
    text = "".join(f'<text x="{left + 4}" y="{16 + 14 * i}">{html.escape(t)}</text>' for i, t in enumerate(lines) if t)
    return (f'<rect x="{left - 6}" y="4" width="{width + 12}" height="{height - 8}" fill="#f7f7f7" stroke="#999" '
            f'stroke-dasharray="4 3"/>' + text)


def _edge(start, end, crossing: bool) -> str:
    (x1, y1), (x2, y2) = start, end
    style = 'stroke="#d62828" stroke-width="2"' if crossing else 'stroke="#bbb" stroke-width="0.6"'
    return f'<line x1="{x1 + NODE_W}" y1="{y1 + NODE_H / 2}" x2="{x2}" y2="{y2 + NODE_H / 2}" {style}/>'


def _node(record, position, colour) -> str:
    x, y = position
    tip = html.escape(f"{record['node']} ({record['op']}) on {record['device']} via {record['backend']}, "
                      f"{record['precision']}, est. {record['est_us']} us\n" + "\n".join(record["reasons"]))
    label = html.escape(f"{record['node']}: {record['op']}"[:26])
    outline = PRECISION_COLOURS.get(record["precision"], "#333")
    return (f'<g><title>{tip}</title><rect x="{x}" y="{y}" width="{NODE_W}" height="{NODE_H}" rx="3" '
            f'fill="{colour[record["device"]]}" stroke="{outline}" stroke-width="1.5"/>'
            f'<text x="{x + 4}" y="{y + 13}">{label}</text></g>')


CURVE_W, CURVE_H, MARGIN = 640, 360, 56
FRONT, OTHER, MINE = "#d62828", "#457b9d", "#ffb703"


def sweep_section(sweep: dict | None) -> str:
    """The sweep this artifact belongs to: latency (x) against accuracy (y), every built point
    labelled with its number (details as tooltips), the front joined, this point ringed."""
    built = [p for p in (sweep or {}).get("points", []) if p.get("status") == "built" and p.get("median_ms") is not None
             and p.get("accuracy") is not None]
    if not built:
        return ""
    xs, ys = [p["median_ms"] for p in built], [p["accuracy"] for p in built]
    x_low, x_high = min(xs) * 0.95, max(xs) * 1.05
    y_low, y_high = min(ys), max(ys)
    y_low, y_high = (y_low - 1e-9, y_high + 1e-9) if y_high - y_low < 1e-9 else (y_low - (y_high - y_low) * 0.08,
                                                                                 y_high + (y_high - y_low) * 0.08)

    def at(point: dict) -> tuple[float, float]:
        return (MARGIN + (point["median_ms"] - x_low) / (x_high - x_low) * (CURVE_W - 2 * MARGIN),
                CURVE_H - MARGIN - (point["accuracy"] - y_low) / (y_high - y_low) * (CURVE_H - 2 * MARGIN))

    name = html.escape(sweep.get("accuracy_name", "accuracy"))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{CURVE_W}" height="{CURVE_H}" font-family="sans-serif" '
             f'font-size="10" class="sweep-curve">',
             f'<rect x="{MARGIN}" y="{MARGIN}" width="{CURVE_W - 2 * MARGIN}" height="{CURVE_H - 2 * MARGIN}" fill="#fafafa" stroke="#999"/>',
             f'<text x="{CURVE_W / 2}" y="{CURVE_H - 14}" text-anchor="middle">latency, median ms ({x_low:.3g} to {x_high:.3g})</text>',
             f'<text x="14" y="{CURVE_H / 2}" transform="rotate(-90 14 {CURVE_H / 2})" text-anchor="middle">'
             f'{name} ({y_low:.6g} to {y_high:.6g})</text>']
    front = sorted((p for p in built if p.get("on_front")), key=lambda p: p["median_ms"])
    if len(front) > 1:
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in map(at, front))
        parts.append(f'<polyline points="{path}" fill="none" stroke="{FRONT}" stroke-width="2"/>')
    for point in built:
        x, y = at(point)
        mine = point["index"] == sweep.get("this_point")
        tip = html.escape(f"#{point['index']} {point['label']}: {point['median_ms']:.3f} ms, {name} {point['accuracy']:.6g}"
                          + (", on the Pareto front" if point.get("on_front") else "") + (" (this artifact)" if mine else ""))
        ring = f'<circle cx="{x:.1f}" cy="{y:.1f}" r="10" fill="none" stroke="{MINE}" stroke-width="3"/>' if mine else ""
        parts.append(f'<g class="sweep-point"><title>{tip}</title>{ring}<circle cx="{x:.1f}" cy="{y:.1f}" r="5" '
                     f'fill="{FRONT if point.get("on_front") else OTHER}"/><text x="{x + 8:.1f}" y="{y - 6:.1f}">'
                     f'#{point["index"]} {html.escape(point["label"])}</text></g>')
    parts.append("</svg>")
    mine = next((p for p in built if p["index"] == sweep.get("this_point")), None)
    caption = (f"This artifact is point #{mine['index']} ({html.escape(mine['label'])})"
               + (", on the Pareto front." if mine.get("on_front") else ", off the Pareto front.")) if mine else ""
    return (f"<h3>Sweep: latency against {name}</h3><p>Red: the Pareto front (no other point is as fast and as accurate). "
            f"{caption}</p>" + "".join(parts))
