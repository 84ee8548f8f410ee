"""One self-contained HTML page for a run folder: curves of what metrics.jsonl logged, the monitors'
events, summary.json, the eval table of eval.json and config.yaml. Plots are SVG drawn here (no plotting
library needed), embedded as data URIs, so the file can be mailed or archived on its own.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from alignkit.config import ConfigError
from alignkit.evaluation.gold_change import gold_summary

# ---------------------------------------------------------------------------------------------
# Reading the run folder
# ---------------------------------------------------------------------------------------------

# Logged on every row but not worth a curve: the x axis itself and wall-clock bookkeeping.
NOT_PLOTTED = {"step", "epoch", "elapsed_s"}
# Counters of trouble: a flat line at 0 says nothing the header does not, so they are drawn only when nonzero.
ONLY_WHEN_NONZERO = {"nonfinite_skipped"}


@dataclass
class Metrics:
    """metrics.jsonl split into training/eval rows and monitor events (rows with an "event" key)."""

    rows: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    unreadable_lines: list[int] = field(default_factory=list)  # 1-based; a run killed mid-write leaves one


def read_metrics(path: Path) -> Metrics:
    out = Metrics()
    if not path.is_file():
        return out
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            out.unreadable_lines.append(n)  # shown in the report, not hidden
            continue
        if not isinstance(row, dict):
            out.unreadable_lines.append(n)
        elif "event" in row:
            out.events.append(row)
        else:
            out.rows.append(row)
    # Numbered in step order (as drawn left to right); the sort is stable for events of one step.
    out.events.sort(key=lambda e: s if (s := _number(e.get("step"))) is not None else math.inf)
    return out


def _number(value) -> float | None:
    """A plottable value: numbers, and the "nan"/"inf" strings RunDir writes for non-finite floats."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
        return float(value)
    return None


def series(rows: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """key -> [(step, value), ...] in step order, for every numeric key of rows that carry a step."""
    out: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        step = _number(row.get("step"))
        if step is None or not math.isfinite(step):
            continue
        for key, value in row.items():
            v = _number(value)
            if key not in NOT_PLOTTED and v is not None:
                out.setdefault(key, []).append((step, v))
    for key in ONLY_WHEN_NONZERO & set(out):
        if all(v == 0 for _, v in out[key]):
            del out[key]
    for points in out.values():
        points.sort(key=lambda p: p[0])
    return out


# ---------------------------------------------------------------------------------------------
# Which curves go together
# ---------------------------------------------------------------------------------------------


@dataclass
class Group:
    """One figure of the report: a titled set of panels, each panel a list of keys drawn on one axes."""

    title: str
    panels: list[list[str]]


# (title, test on the key), in report order; a key goes to the first group whose test it passes.
GROUPS: list[tuple[str, object]] = [
    ("Loss", lambda k: k in ("loss", "eval/loss", "nll")),
    (
        "Rewards and margins",
        lambda k: k.startswith(("rewards/", "reward/", "gold_reward/", "gold_proxy/")) or k == "reward",
    ),
    ("Log-probabilities", lambda k: k.startswith("logps/")),
    (
        "KL to the reference",
        lambda k: k in ("kl", "sample_drift", "gold_kl") or k.startswith(("kl/", "logratio/", "gold_kl/")),
    ),
    ("Response length", lambda k: k.startswith("len/")),
    ("Diversity and entropy", lambda k: k.startswith(("distinct", "entropy"))),
    ("Gradient norm", lambda k: k == "grad_norm"),
    ("Learning rate", lambda k: k == "lr"),
    ("Evaluation", lambda k: k.startswith("eval/")),
    ("Throughput", lambda k: k in ("items_per_s", "tokens_per_s")),
    ("Other", lambda k: True),
]

# The last path part of keys drawn together on one axes: chosen next to rejected, policy next to reference.
_PAIRED = {"chosen": "rejected", "policy": "reference"}


def _panels(keys: list[str]) -> list[list[str]]:
    """Keys that differ only in chosen/rejected (or policy/reference) share an axes; train and eval loss
    share one; every other key gets its own (different scales on one axes hide each other)."""
    panels: list[list[str]] = []
    placed: set[str] = set()
    for key in keys:
        if key in placed:
            continue
        panel = [key]
        stem, _, last = key.rpartition("/")
        partners = {f"{stem}/{v}" for k, v in _PAIRED.items() if last == k}
        partners |= {f"{stem}/{k}" for k, v in _PAIRED.items() if last == v}
        if key == "loss":
            partners.add("eval/loss")
        panel += [k for k in keys if k in partners and k not in placed]
        placed.update(panel)
        panels.append(panel)
    return panels


def group_keys(keys: list[str]) -> list[Group]:
    """The report's figures for the keys present; groups with no key are left out."""
    remaining = list(keys)
    groups = []
    for title, test in GROUPS:
        mine = [k for k in remaining if test(k)]
        if mine:
            remaining = [k for k in remaining if k not in mine]
            groups.append(Group(title, _panels(sorted(mine, key=_key_order))))
    return groups


def _key_order(key: str) -> tuple:
    # "loss" first, then alphabetical; chosen before rejected comes free with alphabetical order.
    return (key != "loss", key)


# ---------------------------------------------------------------------------------------------
# SVG plots
# ---------------------------------------------------------------------------------------------

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"]
EVENT_COLORS = {"stop": "#d62728", "warn": "#e69500"}
EVENT_OTHER = "#7f7f7f"
FIGURE_WIDTH = 1140  # px; panels share it, up to 3 a row, none wider than half
PANEL_HEIGHT = 270


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    value = first
    while value <= hi + step * 1e-9:
        ticks.append(0.0 if abs(value) < step * 1e-9 else float(f"{value:.12g}"))  # no 0.6000000000000001
        value = first + len(ticks) * step
    return ticks


def _tick_label(value: float, step: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e5 or abs(value) < 1e-3:
        return f"{value:.2g}"
    decimals = max(0, -math.floor(math.log10(step))) if step > 0 else 0
    return f"{value:.{min(decimals, 6)}f}"


def padded_range(values: list[float]) -> tuple[float, float]:
    """An axis range for ``values`` (the finite ones): 5% of their span either side, or, for a constant, a band
    centred on it (so equal values are drawn at the same height, mid-axis)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return 0.0, 1.0
    lo, hi = min(finite), max(finite)
    # A constant, up to rounding (a mean of equal scores may differ from them in the last bit: a span of 1e-16
    # would put one at each end of the axis): centre it in a band of +-10% (or +-1 around 0).
    if math.isclose(lo, hi, rel_tol=1e-9):
        mid = (lo + hi) / 2
        pad = abs(mid) * 0.1 or 1.0
        return mid - pad, mid + pad
    pad = (hi - lo) * 0.05
    return lo - pad, hi + pad


def _esc(text: str) -> str:
    return html.escape(str(text), quote=True)


def _panel_svg(
    keys: list[str],
    data: dict[str, list[tuple[float, float]]],
    events: list[tuple[int, float, str]],
    xrange: tuple[float, float],
    x0: float,
    y0: float,
    width: float,
    height: float,
    xlabel: str = "step",
    title: str | None = None,
) -> list[str]:
    """SVG elements of one axes at (x0, y0): a line per key (its points joined in the order given), dashed
    verticals for events, title (``title``, else one made of the keys), ticks."""
    left, right, top, bottom = 62, 14, 44, 38
    pw, ph = width - left - right, height - top - bottom  # plot area
    px, py = x0 + left, y0 + top
    xlo, xhi = xrange
    if xhi == xlo:
        xlo, xhi = xlo - 1, xhi + 1
    ylo, yhi = padded_range([v for k in keys for _, v in data[k]])

    def sx(s: float) -> float:
        return px + (s - xlo) / (xhi - xlo) * pw

    def sy(v: float) -> float:
        return py + ph - (v - ylo) / (yhi - ylo) * ph

    out = [f'<rect x="{px:.1f}" y="{py:.1f}" width="{pw:.1f}" height="{ph:.1f}" fill="#fff" stroke="#bbb"/>']
    # grid and tick labels
    yt = nice_ticks(ylo, yhi)
    ystep = yt[1] - yt[0] if len(yt) > 1 else 1.0
    for v in yt:
        y = sy(v)
        out.append(f'<line x1="{px:.1f}" x2="{px + pw:.1f}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(
            f'<text x="{px - 6:.1f}" y="{y + 4:.1f}" text-anchor="end" class="tick">{_tick_label(v, ystep)}</text>'
        )
    xt = [t for t in nice_ticks(xlo, xhi, 6) if float(t).is_integer() or xhi - xlo < 5]
    xstep = xt[1] - xt[0] if len(xt) > 1 else 1.0
    for s in xt:
        x = sx(s)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{py:.1f}" y2="{py + ph:.1f}" stroke="#eee"/>')
        out.append(
            f'<text x="{x:.1f}" y="{py + ph + 16:.1f}" text-anchor="middle" class="tick">'
            f"{_tick_label(s, xstep)}</text>"
        )
    out.append(f'<text x="{px + pw:.1f}" y="{py + ph + 32:.1f}" text-anchor="end" class="axis">{_esc(xlabel)}</text>')
    # monitor events: dashed verticals numbered as in the events table
    for number, step, action in events:
        if not xlo <= step <= xhi:
            continue
        x, color = sx(step), EVENT_COLORS.get(action, EVENT_OTHER)
        out.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{py:.1f}" y2="{py + ph:.1f}" stroke="{color}" '
            'stroke-width="1.5" stroke-dasharray="5,3"/>'
        )
        out.append(f'<text x="{x + 3:.1f}" y="{py + 11:.1f}" class="event" fill="{color}">{number}</text>')
    # curves; a non-finite value breaks the line, and few points also get dots
    for i, key in enumerate(keys):
        color = COLORS[i % len(COLORS)]
        segments: list[list[tuple[float, float]]] = [[]]
        for s, v in data[key]:
            if math.isfinite(v):
                segments[-1].append((sx(s), sy(v)))
            elif segments[-1]:
                segments.append([])
        for seg in segments:
            if len(seg) > 1:
                pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in seg)
                out.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="1.8"/>')
        if len(data[key]) <= 40 or any(len(seg) == 1 for seg in segments):
            for seg in segments:
                out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.6" fill="{color}"/>' for x, y in seg]
    # title and legend above the axes
    out.append(f'<text x="{px:.1f}" y="{y0 + 17:.1f}" class="title">{_esc(title or _panel_title(keys))}</text>')
    lx = px
    for i, key in enumerate(keys if len(keys) > 1 else []):
        color = COLORS[i % len(COLORS)]
        out.append(f'<rect x="{lx:.1f}" y="{y0 + 26:.1f}" width="14" height="3" fill="{color}"/>')
        out.append(f'<text x="{lx + 18:.1f}" y="{y0 + 32:.1f}" class="legend">{_esc(key)}</text>')
        lx += 26 + 6.5 * len(key)
    return out


def _panel_title(keys: list[str]) -> str:
    if len(keys) == 1:
        return keys[0]
    if set(keys) == {"loss", "eval/loss"}:
        return "loss: train and eval"
    stem = keys[0].rpartition("/")[0]
    return f"{stem}: " + " vs ".join(k.rpartition("/")[2] for k in keys)


def group_svg(
    group: Group, data: dict[str, list[tuple[float, float]]], events: list[tuple[int, float, str]]
) -> str:
    """One figure: the group's panels in rows of up to three. ``events``: (number, step, action)."""
    # Every panel spans the run's steps, so curves and event lines line up from figure to figure.
    steps = [s for points in data.values() for s, _ in points]
    xrange = (min(steps), max(steps)) if steps else (0.0, 1.0)
    n = len(group.panels)
    cols = min(n, 3)
    width = FIGURE_WIDTH / max(cols, 2) if cols < 3 else FIGURE_WIDTH / 3
    rows = math.ceil(n / cols)
    total_w, total_h = width * cols, PANEL_HEIGHT * rows
    body = []
    for i, keys in enumerate(group.panels):
        r, c = divmod(i, cols)
        body += _panel_svg(keys, data, events, xrange, c * width, r * PANEL_HEIGHT, width, PANEL_HEIGHT)
    return _svg(total_w, total_h, body)


def _svg(width: float, height: float, body: list[str]) -> str:
    style = (
        "<style>text{font-family:system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;fill:#333}"
        ".tick{font-size:11px;fill:#555}.axis{font-size:11px;fill:#777}.title{font-size:13px;font-weight:600}"
        ".legend{font-size:11px}.event{font-size:10px;font-weight:700}</style>"
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}">{style}' + "".join(body) + "</svg>"
    )


def svg_data_uri(svg: str) -> str:
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode("utf-8")).decode("ascii")


# ---------------------------------------------------------------------------------------------
# Over-optimisation: gold and proxy against the KL (Gao, Schulman & Hilton 2022)
# ---------------------------------------------------------------------------------------------

# The keys of an online run's gold evaluation (alignkit.training.gold).
GOLD, GOLD_PROXY, GOLD_KL = "gold_reward/mean", "gold_proxy/mean", "gold_kl/per_response"


def overoptimisation_curves(rows: list[dict], label: str = "") -> dict[str, list[tuple[float, float]]] | None:
    """The gold evaluations of ``rows`` (those with a finite gold score, proxy score and KL) as {"gold": [(sqrt
    KL, change), ...], "proxy": [...]}, in step order: each mean score's change from the first evaluation (the
    starting policy's, step 0, when the run logged it) against the square root of the samples' KL to the
    reference in nats per response, the axes of Gao et al.'s Figure 1. A negative KL estimate (k1 can give one
    on a few samples) is drawn at 0. ``label`` (a run's name) goes before each key: "<label> gold". None when
    no row holds a gold evaluation."""
    points = []
    for row in rows:
        step, gold, proxy, kl = (_number(row.get(k)) for k in ("step", GOLD, GOLD_PROXY, GOLD_KL))
        values = (step, gold, proxy, kl)
        if all(v is not None and math.isfinite(v) for v in values):
            points.append((step, math.sqrt(max(kl, 0.0)), gold, proxy))
    if not points:
        return None
    points.sort(key=lambda p: p[0])
    _, _, gold0, proxy0 = points[0]
    prefix = f"{label} " if label else ""
    return {
        f"{prefix}gold": [(d, g - gold0) for _, d, g, _ in points],
        f"{prefix}proxy": [(d, p - proxy0) for _, d, _, p in points],
    }


def gold_evaluations(
    runs: list[tuple[Path, list[dict]]],
) -> tuple[dict[str, list[tuple[float, float]]], list[tuple[str, dict, list[dict]]]]:
    """The over-optimisation curves of every run with gold evaluations (keys named by run folder when there
    are several), and each run's gold summary from its gold_samples.jsonl ((name, summary, rows); none for a run
    without the file or a step-0 evaluation). A further run (past the first) without gold rows is an error."""
    names = [d.name for d, _ in runs]
    if len(set(names)) < len(names):
        names = [str(d) for d, _ in runs]
    curves: dict[str, list[tuple[float, float]]] = {}
    summaries = []
    for i, ((run_dir, rows), name) in enumerate(zip(runs, names)):
        run_curves = overoptimisation_curves(rows, name if len(runs) > 1 else "")
        if run_curves is None:
            if i > 0:
                raise ConfigError(f"with_runs: {run_dir} logged no gold evaluation (gold_reward=...)")
            continue
        curves |= run_curves
        try:
            gold = gold_summary(run_dir / "gold_samples.jsonl")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if gold is not None:
            summaries.append((name, gold, rows))
    return curves, summaries


def overoptimisation_html(curves: dict[str, list[tuple[float, float]]]) -> str:
    """The figure of ``overoptimisation_curves`` (of one run, or several merged): every curve on one axes,
    joined in step order."""
    keys = list(curves)
    xs = [d for points in curves.values() for d, _ in points]
    wide = len(keys) > 2
    width, height = FIGURE_WIDTH / (1 if wide else 2), PANEL_HEIGHT + 30
    xlabel = "sqrt(KL to the reference, nats per response)"
    title = "change from each run's first evaluation: gold vs proxy"
    body = _panel_svg(keys, curves, [], (min(xs), max(xs)), 0, 0, width, height, xlabel, title)
    uri = svg_data_uri(_svg(width, height, body))
    alt = "Over-optimisation: gold and proxy score against sqrt(KL)"
    return (
        '<p class="meta">Each point is one gold evaluation of the policy on held-out prompts (gold_reward/mean), '
        "with the proxy reward on the same samples (gold_proxy/mean), against the square root of their KL to "
        "the reference (gold_kl/per_response), as in Gao, Schulman &amp; Hilton 2022. Gold falling while the "
        "proxy rises is over-optimisation.</p>"
        f'<div class="plots"><figure id="plot-over-optimisation" class="{"" if wide else "half"}">'
        f'<figcaption>Gold and proxy score against sqrt(KL)</figcaption><img src="{uri}" alt="{_esc(alt)}">'
        "</figure></div>"
    )


def _interval(value: float, ci: list[float]) -> str:
    return f"{value:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]"


def gold_change_html(runs: list[tuple[str, dict, list[dict]]]) -> str:
    """The table of each run's gold evaluations against its step 0 (``evaluation.gold_change.gold_summary``),
    with the KL its row logged. ``runs``: (name, gold summary, metric rows)."""
    rows = []
    for name, gold, metric_rows in runs:
        kl = {_number(r.get("step")): _number(r.get(GOLD_KL)) for r in metric_rows if GOLD_KL in r}
        for c in gold["evaluations"]:
            win = f"{c['win_rate']:.3f} [{c['win_rate_ci95'][0]:.3f}, {c['win_rate_ci95'][1]:.3f}]"
            adjusted = _interval(c["length_adjusted_change"], c["length_adjusted_change_ci95"])
            change = _interval(c["change"], c["change_ci95"])
            proxy = _interval(c["proxy_change"], c["proxy_change_ci95"])
            rows.append(
                (name, c["step"], kl.get(c["step"]), c["gold"], change, c["length_change"], adjusted, win, proxy)
            )
    head = (
        "run", "step", "KL / response", "gold mean", "gold change vs step 0 [95% CI]", "Δ length (chars)",
        "length-adjusted change [95% CI]", "gold win rate [95% CI]", "proxy change vs step 0 [95% CI]",
    )  # fmt: skip
    since = [
        f"{_esc(name) or 'this run'}: step {b['from_step']} (its best gold) to step {b['to_step']}: gold "
        f"{_interval(b['gold_change'], b['gold_change_ci95'])}, proxy {_interval(b['proxy_change'], b['proxy_change_ci95'])}"
        for name, gold, _ in runs
        if (b := gold.get("since_best"))
    ]
    return (
        "<p class='meta'>Each evaluation against the starting policy's (step 0) on the same held-out prompts, one "
        "sample each at temperature 1: the change of the mean gold score, the same less what the change in reply "
        "length predicts (step 0's slope of gold on length), the gold win rate (ties half) and the change of the "
        "proxy on the same samples, each with a 95% percentile-bootstrap interval over the prompts, paired per "
        "prompt.</p>"
        + _table(rows, head)
        + (
            "<p class='meta'>Since the best gold evaluation (picked after the fact, so the fall from it reads "
            "larger than it is), paired per prompt: " + "; ".join(since) + ".</p>"
            if since
            else ""
        )
    )


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def _table(rows: list[tuple], head: tuple | None = None, cls: str = "") -> str:
    parts = [f'<table class="{cls}">' if cls else "<table>"]
    if head:
        parts.append("<thead><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in head) + "</tr></thead>")
    parts.append("<tbody>")
    for row in rows:
        cells = []
        for j, cell in enumerate(row):
            numeric = j > 0 and isinstance(cell, (int, float)) and not isinstance(cell, bool)
            cells.append(
                f'<td class="num">{_esc(_fmt(cell))}</td>' if numeric else f"<td>{_esc(_fmt(cell))}</td>"
            )
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</tbody></table>")
    return "".join(parts)


def summary_html(summary: dict) -> str:
    """Top-level values in one table; each nested mapping (final_metrics, eval_after, ...) in its own."""
    scalars = [(k, v) for k, v in summary.items() if not isinstance(v, dict)]
    nested = [(k, v) for k, v in summary.items() if isinstance(v, dict)]
    parts = ['<div class="tables">', "<div>" + _table(scalars, ("key", "value")) + "</div>"]
    for name, mapping in nested:
        rows = [(k, v) for k, v in mapping.items()]
        parts.append(f"<div><h4>{_esc(name)}</h4>" + _table(rows, ("key", "value")) + "</div>")
    parts.append("</div>")
    return "".join(parts)


def events_html(events: list[dict]) -> str:
    rows = []
    for number, e in enumerate(events, start=1):
        values = e.get("values")
        if not isinstance(values, dict):  # e.g. the loop's "nonfinite" rows: the numbers are the row itself
            values = {k: v for k, v in e.items() if k not in ("event", "step", "action", "message")}
        detail = ", ".join(f"{k}={_fmt(v)}" for k, v in values.items())
        action = e.get("action", "")
        badge = f'<span class="badge {_esc(action)}">{_esc(action or "–")}</span>'
        rows.append(
            f"<tr><td class='num'>{number}</td><td class='num'>{_esc(_fmt(e.get('step')))}</td>"
            f"<td>{_esc(e.get('event'))}</td><td>{badge}</td><td>{_esc(e.get('message', ''))}</td>"
            f"<td class='small'>{_esc(detail)}</td></tr>"
        )
    head = "".join(f"<th>{h}</th>" for h in ("#", "step", "monitor", "action", "message", "values"))
    return f'<table class="events"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _mean_std(d) -> str:
    return "–" if not d else f"{_fmt(d.get('mean'))} ± {_fmt(d.get('std'))}"


def eval_html(result: dict, max_samples: int = 20) -> str:
    """The table `alignkit eval` prints (policy vs reference), its settings, and the first samples.

    Reads the eval.json layout written by ``alignkit.stages.eval``: "policy" and "reference_stats" hold
    one model's statistics each, "win_rate" and "kl" the comparison, "samples" the responses.
    """
    pol, ref = result.get("policy") or {}, result.get("reference_stats") or {}
    rows: list[tuple[str, str, str]] = []
    if "score" in pol:
        rows.append(("score (mean ± std)", _mean_std(pol.get("score")), _mean_std(ref.get("score"))))
    if result.get("win_rate"):
        w = result["win_rate"]
        rows.append(
            ("win rate vs reference [95% CI]", f"{w['value']:.3f} [{w['low']:.3f}, {w['high']:.3f}]", "")
        )
    rows += [
        ("length, tokens", _mean_std(pol.get("length_tokens")), _mean_std(ref.get("length_tokens"))),
        ("length, words", _mean_std(pol.get("length_words")), _mean_std(ref.get("length_words"))),
        ("distinct-1", _fmt(pol.get("distinct_1")), _fmt(ref.get("distinct_1")) if ref else ""),
        ("distinct-2", _fmt(pol.get("distinct_2")), _fmt(ref.get("distinct_2")) if ref else ""),
        ("entropy, nats/token", _fmt(pol.get("entropy")), _fmt(ref.get("entropy")) if ref else ""),
    ]
    if result.get("kl"):
        kl = result["kl"]
        rows += [
            ("KL k1, nats/token", _fmt(kl.get("k1_per_token")), ""),
            ("KL k3, nats/token", _fmt(kl.get("k3_per_token")), ""),
            ("KL k1, nats/sequence", _fmt(kl.get("k1_per_sequence")), ""),
        ]
    body = "".join(
        f"<tr><td>{_esc(a)}</td><td class='num'>{_esc(b)}</td><td class='num'>{_esc(c)}</td></tr>"
        for a, b, c in rows
    )
    sampling = result.get("sampling") or {}
    notes = [
        f"model <code>{_esc(result.get('model'))}</code> vs reference <code>{_esc(result.get('reference'))}</code>",
        f"{_esc(result.get('n_prompts'))} prompts from {_esc(result.get('prompts'))}, "
        f"{_esc(result.get('samples_per_prompt', 1))} sample(s) each",
        "sampling " + ", ".join(f"{_esc(k)}={_esc(v)}" for k, v in sampling.items()),
        f"scorer: {_esc(result.get('scorer') or 'none')}",
    ]
    if result.get("kl", {}) and result["kl"].get("note"):
        notes.append(_esc(result["kl"]["note"]))
    parts = [
        '<table class="eval"><thead><tr><th></th><th>policy</th><th>reference</th></tr></thead>'
        f"<tbody>{body}</tbody></table>",
        '<ul class="notes">' + "".join(f"<li>{n}</li>" for n in notes) + "</ul>",
    ]
    samples = result.get("samples") or []
    if samples:
        shown = samples[:max_samples]
        srows = []
        for s in shown:
            prompt = s.get("prompt")
            prompt = (
                prompt
                if isinstance(prompt, str)
                else "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
            )
            srows.append(
                f"<tr><td class='text'>{_esc(prompt)}</td>"
                f"<td class='text'>{_esc(s.get('policy', ''))}</td><td class='num'>{_esc(_fmt(s.get('policy_score')))}</td>"
                f"<td class='text'>{_esc(s.get('reference', ''))}</td>"
                f"<td class='num'>{_esc(_fmt(s.get('reference_score')))}</td></tr>"
            )
        head = "".join(f"<th>{h}</th>" for h in ("prompt", "policy", "score", "reference", "score"))
        parts.append(
            f"<details><summary>samples ({len(shown)} of {len(samples)})</summary>"
            f'<table class="samples"><thead><tr>{head}</tr></thead><tbody>{"".join(srows)}</tbody></table></details>'
        )
    return "".join(parts)


# ---------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;color:#222;margin:0;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:24px 20px 60px}
h1{font-size:26px;margin:0 0 6px}h2{font-size:19px;margin:34px 0 10px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:20px 0 6px}h4{font-size:13px;margin:0 0 4px;color:#555}
.meta{color:#555;font-size:14px;margin:2px 0}code{font-size:13px;background:#eceef1;padding:1px 4px;border-radius:3px}
figure{margin:0;box-sizing:border-box;background:#fff;border:1px solid #e1e4e8;border-radius:6px;padding:8px}
figure.full{flex:1 1 100%}figure.half{flex:0 1 calc(50% - 7px)}
.plots{display:flex;flex-wrap:wrap;gap:14px}figure img{display:block;max-width:100%;height:auto}
figcaption{font-weight:600;font-size:14px;margin:0 0 2px 6px}
table{border-collapse:collapse;background:#fff;font-size:13px;margin:4px 0 12px}
th,td{border:1px solid #e1e4e8;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f0f2f5}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.small{font-size:12px;color:#555}td.text{white-space:pre-wrap;max-width:360px;word-break:break-word}
tbody tr:nth-child(even){background:#fafbfc}
.tables{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
.badge{display:inline-block;padding:0 6px;border-radius:8px;font-size:12px;color:#fff;background:#7f7f7f}
.badge.warn{background:#e69500}.badge.stop{background:#d62728}
.legend-events{font-size:13px;color:#555}ul.notes{font-size:13px;color:#555;margin:0 0 10px}
details{margin:8px 0}summary{cursor:pointer;font-weight:600}pre{background:#fff;border:1px solid #e1e4e8;padding:10px;
font-size:12px;overflow-x:auto}.empty{color:#777;font-style:italic}
"""


def reward_diagnostics_html(diagnostics: dict) -> str:
    """The held-out diagnostics of a reward model (`alignkit rm`, `score` of pairs): its warnings, then the
    table the console prints."""
    # Imported here: the module needs numpy and torch, which a report without a reward model never loads.
    from alignkit.evaluation.reward_diagnostics import table_rows

    warnings = "".join(
        f'<p style="color:#b35900"><b>Warning:</b> {_esc(w)}</p>' for w in diagnostics.get("warnings", [])
    )
    return warnings + _table(table_rows(diagnostics), ("measure", "value"))


def render_report(
    run_dir: Path,
    eval_path: Path | None = None,
    title: str | None = None,
    max_samples: int = 20,
    with_runs: list[Path] = (),
) -> tuple[str, dict]:
    """The HTML page for ``run_dir``, and what went in it ({"groups": [...], "events": n, ...}). ``with_runs``:
    other online runs whose gold evaluations join this run's on the over-optimisation plot and table."""
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir / "metrics.jsonl")
    summary_path, config_path = run_dir / "summary.json", run_dir / "config.yaml"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else None
    config_text = config_path.read_text(encoding="utf-8") if config_path.is_file() else None
    eval_result = (
        json.loads(eval_path.read_text(encoding="utf-8")) if eval_path and eval_path.is_file() else None
    )

    data = series(metrics.rows)
    groups = group_keys(list(data))
    event_marks = [
        (i, float(s), str(e.get("action", "")))
        for i, e in enumerate(metrics.events, start=1)
        if (s := _number(e.get("step"))) is not None and math.isfinite(s)
    ]
    stage = (summary or {}).get("stage") or _config_value(config_text, "loss") or ""
    title = title or f"alignkit report: {run_dir.name}"
    steps = max((s for pts in data.values() for s, _ in pts), default=None)

    parts = header_html(title, run_dir, stage, steps, metrics)
    parts.append("<h2>Training curves</h2>")
    parts += curves_html(groups, data, event_marks)
    gold_curves, gold_runs = gold_evaluations([(run_dir, metrics.rows)] + [
        (Path(d), read_metrics(Path(d) / "metrics.jsonl").rows) for d in with_runs
    ])
    if gold_curves:
        parts.append("<h2>Over-optimisation</h2>")
        parts.append(overoptimisation_html(gold_curves))
        if gold_runs:
            parts.append(gold_change_html(gold_runs))
    parts.append("<h2>Monitor events</h2>")
    parts.append(events_html(metrics.events) if metrics.events else '<p class="empty">No monitor fired.</p>')

    if eval_result is not None:
        parts.append(f"<h2>Evaluation <span class='meta'>({_esc(eval_path.name)})</span></h2>")
        parts.append(eval_html(eval_result, max_samples))

    diagnostics = (summary or {}).get("diagnostics")
    if isinstance(diagnostics, dict):
        parts.append("<h2>Reward model diagnostics</h2>")
        parts.append(reward_diagnostics_html(diagnostics))
        summary = {k: v for k, v in summary.items() if k != "diagnostics"}  # shown above, not as raw JSON

    parts.append("<h2>Summary</h2>")
    parts.append(
        summary_html(summary)
        if summary
        else '<p class="empty">No summary.json (the run has not finished).</p>'
    )

    parts.append("<h2>Configuration</h2>")
    if config_text is not None:
        parts.append(f"<details><summary>config.yaml</summary><pre>{_esc(config_text)}</pre></details>")
    else:
        parts.append('<p class="empty">No config.yaml.</p>')
    parts.append("</main></body></html>")
    info = {
        "groups": [g.title for g in groups],
        "events": len(metrics.events),
        "overoptimisation": bool(gold_curves),
        "gold_change": {name: gold["last"] for name, gold, _ in gold_runs},
        "eval": str(eval_path) if eval_result is not None else None,
    }
    return "\n".join(parts) + "\n", info


def header_html(title: str, run_dir: Path, stage: str, steps: float | None, metrics: Metrics) -> list[str]:
    """The page's head and the lines under its title: run folder, stage, steps, events, unreadable lines."""
    facts = (
        f"stage <b>{_esc(stage)}</b>" if stage else "",
        f"{int(steps)} steps logged" if steps is not None else "",
        f"{len(metrics.events)} monitor event(s)",
        f"generated {time.strftime('%Y-%m-%d %H:%M')}",
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)}</title><style>{CSS}</style></head><body><main>",
        f"<h1>{_esc(title)}</h1>",
        f'<p class="meta">run folder <code>{_esc(run_dir.resolve())}</code></p>',
        '<p class="meta">' + " · ".join(x for x in facts if x) + "</p>",
    ]
    if metrics.unreadable_lines:
        parts.append(
            f'<p class="meta">metrics.jsonl: {len(metrics.unreadable_lines)} unreadable line(s) skipped '
            f"(line {', '.join(map(str, metrics.unreadable_lines[:10]))})</p>"
        )
    return parts


def curves_html(
    groups: list[Group], data: dict[str, list[tuple[float, float]]], event_marks: list[tuple[int, float, str]]
) -> list[str]:
    """The training curves: one figure per group of metrics, monitor events marked on each."""
    parts = []
    if event_marks:
        parts.append(
            '<p class="legend-events">Dashed lines mark monitor events, numbered as in the events table: '
            '<span style="color:#e69500">■ warn</span> <span style="color:#d62728">■ stop</span> '
            '<span style="color:#7f7f7f">■ other</span>.</p>'
        )
    if not groups:
        return parts + ['<p class="empty">metrics.jsonl holds no logged metrics.</p>']
    parts.append('<div class="plots">')
    for group in groups:
        uri = svg_data_uri(group_svg(group, data, event_marks))
        alt = f"{group.title}: " + ", ".join(k for panel in group.panels for k in panel)
        # One-panel figures sit two to a row; wider figures take the row.
        width = "half" if len(group.panels) == 1 else "full"
        parts.append(
            f'<figure id="plot-{_slug(group.title)}" class="{width}">'
            f'<figcaption>{_esc(group.title)}</figcaption><img src="{uri}" alt="{_esc(alt)}"></figure>'
        )
    return parts + ["</div>"]


def _config_value(config_text: str | None, key: str) -> str | None:
    if not config_text:
        return None
    m = re.search(rf"^{re.escape(key)}:\s*(\S+)", config_text, re.MULTILINE)
    return m.group(1) if m else None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# ---------------------------------------------------------------------------------------------
# Looking at it
# ---------------------------------------------------------------------------------------------

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    return next((p for name in CHROMIUM_NAMES if (p := shutil.which(name))), None)


def screenshot(html_path: str | Path, png_path: str | Path, width: int = 1280, height: int = 2400) -> bool:
    """Render ``html_path`` with headless Chromium into ``png_path``; False when there is no Chromium.

    A fresh profile directory and no background networking, so the page is rendered as a reader's browser
    would, offline, and the check proves the file needs nothing outside itself.
    """
    chromium = find_chromium()
    if chromium is None:
        return False
    png_path = Path(png_path)
    png_path.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        cmd = [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--screenshot={png_path}",
            f"--window-size={width},{height}",
            Path(html_path).resolve().as_uri(),
        ]
        subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    return png_path.is_file() and png_path.stat().st_size > 0
