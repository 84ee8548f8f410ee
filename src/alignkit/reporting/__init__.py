"""Reporting: a run folder (metrics.jsonl, summary.json, config.yaml, eval.json) as one self-contained
HTML page with its curves, monitor events and tables (``html``)."""

from __future__ import annotations

from alignkit.reporting.html import (
    Group,
    Metrics,
    group_keys,
    read_metrics,
    render_report,
    screenshot,
    series,
)

__all__ = ["Group", "Metrics", "group_keys", "read_metrics", "render_report", "screenshot", "series"]
