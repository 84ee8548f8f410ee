"""The page of `alignkit compare`: the reward-vs-KL frontier (gold score against KL to the base, one point per
run, one colour per method, the base at KL 0: the shape of the DPO paper's Figure 2) above the table. Runs
evaluated along the way (compare's frontier_points) add their snapshots' points, joined by a line from the base
to the final model."""

from __future__ import annotations

import html
import math

from alignkit.reporting.html import CSS, nice_ticks, padded_range, svg_data_uri

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def frontier_points(runs: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """(KL, gold mean) of every run by method, and the base's (0, its gold mean) as "base"."""
    points: dict[str, list[tuple[float, float]]] = {}
    for r in runs:
        points.setdefault(r["method"], []).append((r["kl"], r["gold_mean"]))
    if runs:
        points["base"] = [(0.0, sum(r["reference_gold_mean"] for r in runs) / len(runs))]
    return points


def frontier_paths(runs: list[dict]) -> dict[str, list[list[tuple[float, float]]]]:
    """Per method, each run's way as (KL, gold mean) from the base through its snapshots to its final model;
    only runs with snapshots evaluated (a path of more than its final point)."""
    paths: dict[str, list[list[tuple[float, float]]]] = {}
    for r in runs:
        if len(r.get("path", [])) > 1:
            way = [(0.0, r["reference_gold_mean"])] + [(p["kl"], p["gold_mean"]) for p in r["path"]]
            paths.setdefault(r["method"], []).append(way)
    return paths


def frontier_svg(
    points: dict[str, list[tuple[float, float]]],
    width: int = 640,
    height: int = 400,
    paths: dict[str, list[list[tuple[float, float]]]] | None = None,
) -> str:
    """A scatter of ``points``, one colour per key, with its legend and ticks; ``paths``: lines per key (each
    run's way), their inner points drawn small."""
    paths = paths or {}
    left, right, top, bottom = 62, 130, 36, 44
    pw, ph = width - left - right, height - top - bottom
    # KL 0 (the base) is always on the x axis; a degenerate range (every gold score equal, every KL 0) is
    # centred, so equal values are drawn at the same height rather than at the axis' two ends.
    on_paths = [pt for ways in paths.values() for way in ways for pt in way]
    xlo, xhi = padded_range([x for pts in points.values() for x, _ in pts] + [x for x, _ in on_paths] + [0.0])
    ylo, yhi = padded_range([y for pts in points.values() for _, y in pts] + [y for _, y in on_paths])

    def sx(v: float) -> float:
        return left + (v - xlo) / (xhi - xlo) * pw

    def sy(v: float) -> float:
        return top + ph - (v - ylo) / (yhi - ylo) * ph

    out = [f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fff" stroke="#bbb"/>']
    for v in nice_ticks(ylo, yhi):
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(v):.1f}" y2="{sy(v):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 6}" y="{sy(v) + 4:.1f}" text-anchor="end" class="tick">{v:g}</text>')
    for v in nice_ticks(xlo, xhi):
        out.append(f'<text x="{sx(v):.1f}" y="{top + ph + 16}" text-anchor="middle" class="tick">{v:g}</text>')
    out.append(
        f'<text x="{left + pw / 2:.1f}" y="{height - 8}" text-anchor="middle" class="axis">'
        "KL(policy || base), nats/token</text>"
    )
    out.append(
        f'<text x="14" y="{top + ph / 2:.1f}" text-anchor="middle" class="axis" '
        f'transform="rotate(-90 14 {top + ph / 2:.1f})">gold score (mean)</text>'
    )
    title = "one point per run" + (", lines: each run from the base through its snapshots" if paths else "")
    out.append(f'<text x="{left}" y="20" class="title">Gold reward vs KL to the base, {title}</text>')
    for i, (name, pts) in enumerate(points.items()):
        colour = "#000" if name == "base" else COLOURS[i % len(COLOURS)]
        for way in paths.get(name, []):
            way = [(x, y) for x, y in way if math.isfinite(x) and math.isfinite(y)]
            line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in way)
            out.append(f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-opacity="0.5"/>')
            for x, y in way[1:-1]:  # the snapshots (the base and the final model are drawn as points)
                out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{colour}" fill-opacity="0.6"/>')
        for x, y in pts:
            if math.isfinite(x) and math.isfinite(y):
                out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="4" fill="{colour}" fill-opacity="0.8"/>')
        ly = top + 14 + 18 * i
        out.append(f'<circle cx="{left + pw + 16}" cy="{ly - 4}" r="4" fill="{colour}"/>')
        out.append(f'<text x="{left + pw + 26}" y="{ly}" class="legend">{html.escape(name)}</text>')
    style = (
        "<style>text{font-family:system-ui,sans-serif;fill:#333}.tick{font-size:11px;fill:#555}"
        ".axis{font-size:11px;fill:#777}.title{font-size:13px;font-weight:600}.legend{font-size:11px}</style>"
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}">{style}' + "".join(out) + "</svg>"
    )


def compare_page(model: str, gold: str, runs: list[dict], table: tuple[list[str], list[list[str]]]) -> str:
    """The self-contained HTML page: title, the frontier, the table (header and cells as given)."""
    head, rows = table
    esc = html.escape
    cells = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>alignkit compare: {esc(model)}</title><style>{CSS}</style></head><body><main>"
        f"<h1>alignkit compare</h1><p>Base model {esc(model)}; gold scorer {esc(gold)}.</p>"
        f'<img alt="reward vs KL frontier" src="{svg_data_uri(frontier_svg(frontier_points(runs), paths=frontier_paths(runs)))}">'
        "<table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr></thead>"
        f"<tbody>{cells}</tbody></table></main></body></html>\n"
    )
