"""`alignkit report`: turn a run folder into one self-contained HTML page (``<run>/report.html``).

Curves of every logged metric group with the monitors' events marked, the events table, summary.json,
the eval table when `alignkit eval` wrote an eval.json for the run, and config.yaml.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from alignkit.config import ConfigError, doc_field, required
from alignkit.reporting.html import render_report
from alignkit.stages import Stage


@dataclass
class ReportConfig:
    """Write <run_dir>/report.html from what the run folder holds."""

    run_dir: str = required("Run folder to report on (holds metrics.jsonl, summary.json, config.yaml).")
    output: str | None = doc_field(None, "HTML file to write; default <run_dir>/report.html.")
    eval_json: str | None = doc_field(
        None, "eval.json to include; default <run_dir>/eval.json, else <run_dir>/final/eval.json, if present."
    )
    title: str | None = doc_field(None, "Page title; default 'alignkit report: <run folder name>'.")
    max_samples: int = doc_field(20, "Eval samples shown in the page (all stay in eval.json).", ge=0)
    with_runs: list[str] | None = doc_field(
        None,
        "Other online runs with gold evaluations (gold_reward=...) drawn with this run's on the over-optimisation "
        "plot and listed in its gold table, e.g. online DPO beside PPO against the same proxy; each curve is the "
        "change from its own run's first evaluation.",
    )


def find_eval_json(run_dir: Path) -> Path | None:
    """Where `alignkit eval` puts its JSON for a run: next to the metrics, or inside final/."""
    return next((p for p in (run_dir / "eval.json", run_dir / "final" / "eval.json") if p.is_file()), None)


def run(cfg: ReportConfig) -> dict:
    run_dir = Path(cfg.run_dir).expanduser()
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder not found: {run_dir}")
    if not any((run_dir / name).is_file() for name in ("metrics.jsonl", "summary.json", "config.yaml")):
        raise ConfigError(f"run_dir: {run_dir} holds none of metrics.jsonl, summary.json, config.yaml")
    eval_path = Path(cfg.eval_json).expanduser() if cfg.eval_json else find_eval_json(run_dir)
    if cfg.eval_json and not eval_path.is_file():
        raise FileNotFoundError(f"eval_json not found: {eval_path}")

    with_runs = [Path(d).expanduser() for d in cfg.with_runs or []]
    for other in with_runs:
        if not (other / "metrics.jsonl").is_file():
            raise ConfigError(f"with_runs: {other} holds no metrics.jsonl (is it a run folder?)")
    page, info = render_report(run_dir, eval_path, cfg.title, cfg.max_samples, with_runs)

    output = Path(cfg.output).expanduser() if cfg.output else run_dir / "report.html"
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f"{output.name}.tmp-{os.getpid()}")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, output)
    print(f"wrote {output} ({len(page) / 1024:.0f} KiB); open it in a browser", file=sys.stderr)
    return {"report": str(output), **info}


STAGE = Stage("report", ReportConfig, run, positional="run_dir")  # `alignkit report <run_dir>`
