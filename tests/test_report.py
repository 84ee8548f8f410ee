"""`alignkit report` on a synthetic run folder: one self-contained HTML page with a figure per metric group
present (and none for absent ones), events as lines and a table, summary, eval table and config."""

from __future__ import annotations

import base64
import json
import re
import struct
import xml.etree.ElementTree as ET

import pytest

from alignkit import cli
from alignkit.config import load_config
from alignkit.reporting.html import (
    _panels,
    find_chromium,
    group_keys,
    nice_ticks,
    overoptimisation_curves,
    screenshot,
    series,
)
from alignkit.stages.report import ReportConfig, run

SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture
def run_dir(tmp_path):
    """A DPO-like run: loss/rewards/grad_norm/lr every step, eval/loss at 5 and 10, two monitor events
    (logged out of step order), and a last line cut off mid-write."""
    d = tmp_path / "dpo-run"
    d.mkdir()
    rows = []
    for step in range(1, 11):
        rows.append(
            {
                "step": step,
                "epoch": step / 10,
                "lr": 1e-5,
                "loss": 0.7 - 0.05 * step,
                "rewards/chosen": 0.1 * step,
                "rewards/rejected": -0.1 * step,
                "rewards/margin": 0.2 * step,
                "grad_norm": 1.0,
                "nonfinite_skipped": 0,
                "elapsed_s": step * 1.5,
            }
        )
        if step in (5, 10):
            rows.append({"step": step, "eval/loss": 0.7 - 0.04 * step})
    rows.append(
        {
            "event": "mode_collapse",
            "step": 8,
            "action": "warn",
            "message": "distinct_2 fell",
            "values": {"value": 0.4},
        }
    )
    rows.append(
        {
            "event": "kl_explosion",
            "step": 3,
            "action": "stop",
            "message": "kl 11 above 10",
            "values": {"kl": 11.0},
        }
    )
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 11, "lo'
    (d / "metrics.jsonl").write_text(text)
    (d / "summary.json").write_text(json.dumps({"stage": "dpo", "steps": 10, "final_metrics": {"loss": 0.2}}))
    (d / "config.yaml").write_text("loss: dpo\nbeta: 0.1\nlearning_rate: 1.0e-05\n")
    return d


def _images(page: str) -> list[ET.Element]:
    uris = re.findall(r'<img src="([^"]+)"', page)
    prefix = "data:image/svg+xml;base64,"
    assert all(u.startswith(prefix) for u in uris)
    return [ET.fromstring(base64.b64decode(u[len(prefix) :])) for u in uris]


def test_report_page(run_dir):
    summary = run(load_config(ReportConfig, None, [f"run_dir={run_dir}"]))
    page = (run_dir / "report.html").read_text()
    assert summary["report"] == str(run_dir / "report.html")
    # eval/loss is drawn with the training loss; nonfinite_skipped stays 0 so it gets no figure
    assert summary["groups"] == ["Loss", "Rewards and margins", "Gradient norm", "Learning rate"]
    assert summary["events"] == 2 and summary["eval"] is None

    # self-contained: every image inline, nothing fetched
    assert "http://" not in page and "https://" not in page
    assert re.findall(r'src="(?!data:)', page) == [] and "<link" not in page and "<script" not in page

    # one <img> per group present, none for absent groups
    svgs = _images(page)
    assert len(svgs) == 4
    for absent in ("KL to the reference", "Response length", "Diversity", "Evaluation", "Other"):
        assert absent not in page
    # Rewards: chosen and rejected on one axes, the margin on another -> 3 curves; Loss: train + eval
    lines = [len(svg.findall(f".//{SVG}polyline")) for svg in svgs]
    assert lines == [2, 3, 1, 1]
    # every axes marks both events; the rewards figure has 2 axes
    dashed = [len([e for e in svg.iter(f"{SVG}line") if e.get("stroke-dasharray")]) for svg in svgs]
    assert dashed == [2, 4, 2, 2]

    # the events table is numbered in step order: the step-3 stop first
    table = page[page.index('<table class="events"') :]
    assert table.index("kl_explosion") < table.index("mode_collapse")
    assert "kl 11 above 10" in table and "kl=11" in table and '<span class="badge stop">' in table
    assert "1 unreadable line(s) skipped (line 15)" in page
    assert "<details><summary>config.yaml</summary><pre>loss: dpo\nbeta: 0.1" in page
    assert "<td>final_metrics</td>" not in page and "<h4>final_metrics</h4>" in page  # nested -> own table
    assert "stage <b>dpo</b> · 10 steps logged · 2 monitor event(s)" in page


def test_report_includes_eval_json_and_cli(run_dir, monkeypatch, tmp_path):
    """An eval.json in final/ is found and shown as the policy-vs-reference table; run via the CLI."""
    (run_dir / "final").mkdir()
    eval_result = {
        "model": "m",
        "reference": "r",
        "n_prompts": 2,
        "prompts": "p.jsonl",
        "sampling": {"temperature": 0.7},
        "scorer": "_scorers:length_score",
        "policy": {
            "score": {"mean": 3.0, "std": 1.0},
            "length_tokens": {"mean": 5.0, "std": 0.0},
            "distinct_1": 0.5,
        },
        "reference_stats": {"score": {"mean": 2.0, "std": 1.0}, "length_tokens": {"mean": 4.0, "std": 0.0}},
        "win_rate": {"value": 0.75, "low": 0.5, "high": 1.0, "n_prompts": 2},
        "kl": {"k1_per_token": 0.01, "k3_per_token": 0.02, "k1_per_sequence": 0.05, "n_tokens": 10},
        "samples": [
            {
                "prompt": "hi <b>",
                "policy": "hello",
                "reference": "yo",
                "policy_score": 5,
                "reference_score": 2,
            }
        ],
    }
    (run_dir / "final" / "eval.json").write_text(json.dumps(eval_result))
    monkeypatch.setitem(cli.STAGES, "report", ("alignkit.stages.report", "Report"))
    out = tmp_path / "elsewhere" / "r.html"
    assert cli.main(["report", f"run_dir={run_dir}", f"output={out}", "title=My run"]) == 0
    page = out.read_text()
    assert "<title>My run</title>" in page
    assert "<td>win rate vs reference [95% CI]</td><td class='num'>0.750 [0.500, 1.000]</td>" in page
    assert "<td>score (mean ± std)</td><td class='num'>3 ± 1</td><td class='num'>2 ± 1</td>" in page
    assert "<td class='text'>hi &lt;b&gt;</td>" in page  # sample text is escaped
    assert cli.main(["report", f"run_dir={tmp_path / 'missing'}"]) == 2


# An online run with a gold scorer: the starting policy's gold row (step 0), training rows, gold rows at 2 and 4.
GOLD_ROWS = [
    {"step": 0, "gold_reward/mean": 1.0, "gold_proxy/mean": 0.5, "gold_kl": 0.0, "gold_kl/per_response": 0.0},
    *({"step": s, "lr": 1e-4, "reward/mean": 0.5 + 0.3 * s, "kl": 4.0 * s} for s in range(1, 5)),
    {"step": 2, "gold_reward/mean": 1.5, "gold_proxy/mean": 0.9, "gold_kl": 0.5, "gold_kl/per_response": 4.0},
    {"step": 4, "gold_reward/mean": 0.8, "gold_proxy/mean": 1.7, "gold_kl": 2.0, "gold_kl/per_response": 16.0},
]


def test_overoptimisation_curves_by_hand():
    """sqrt(KL per response) 0, 2, 4; gold 1.0 -> 1.5 -> 0.8 is a change of 0, +0.5, -0.2; the proxy 0.5 -> 0.9 ->
    1.7 one of 0, +0.4, +1.2. A negative KL estimate is drawn at 0; no gold row gives no curves."""
    curves = {k: [x for point in points for x in point] for k, points in overoptimisation_curves(GOLD_ROWS).items()}
    assert curves["gold"] == pytest.approx([0.0, 0.0, 2.0, 0.5, 4.0, -0.2], abs=1e-12)
    assert curves["proxy"] == pytest.approx([0.0, 0.0, 2.0, 0.4, 4.0, 1.2], abs=1e-12)
    negative = [{**GOLD_ROWS[0], "gold_kl/per_response": -0.3}]
    assert overoptimisation_curves(negative) == {"gold": [(0.0, 0.0)], "proxy": [(0.0, 0.0)]}
    assert overoptimisation_curves([r for r in GOLD_ROWS if "gold_reward/mean" not in r]) is None


def test_report_has_the_overoptimisation_plot_only_with_gold_rows(run_dir, tmp_path):
    """A run folder with gold rows gets the figure (gold and proxy, two lines, against sqrt(KL)); the DPO-like
    run without them does not."""
    gold_run = tmp_path / "ppo-gold"
    gold_run.mkdir()
    (gold_run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GOLD_ROWS))
    info = run(load_config(ReportConfig, None, [f"run_dir={gold_run}"]))
    page = (gold_run / "report.html").read_text()
    assert info["overoptimisation"] is True
    figure = page[page.index('id="plot-over-optimisation"') :]
    (svg,) = _images(figure[: figure.index("</figure>")])
    assert len(svg.findall(f".//{SVG}polyline")) == 2
    texts = {t.text for t in svg.iter(f"{SVG}text")}
    assert {"gold", "proxy", "sqrt(KL to the reference, nats per response)"} <= texts
    # the gold keys are also curves of their groups, beside the training rows' reward and KL
    assert "gold_proxy/mean" in page and "gold_kl/per_response" in page and "Other" not in page

    info = run(load_config(ReportConfig, None, [f"run_dir={run_dir}"]))
    page = (run_dir / "report.html").read_text()
    assert info["overoptimisation"] is False
    assert "plot-over-optimisation" not in page and "Over-optimisation" not in page


def _gold_run(path, rows, golds: dict[int, list[float]]):
    """A run folder with metrics ``rows`` and gold_samples.jsonl holding ``golds`` (step -> gold per prompt)."""
    path.mkdir()
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = [
        {"step": step, "prompt": f"p{i}", "response": "r", "gold": g, "proxy": 0.0}
        for step, values in golds.items()
        for i, g in enumerate(values)
    ]
    (path / "gold_samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    return path


def test_report_with_runs_draws_every_runs_gold_and_tabulates_the_changes(tmp_path):
    """`with_runs=[...]`: the PPO-like run and an online-DPO-like one on one plot, four curves named by run
    folder, and the gold table: per evaluation, the KL logged at that step, the change from step 0 paired per
    prompt (here +0.5 = mean of +1, 0, +1, 0) and the win rate (ties half: 0.75). A run without gold rows is
    refused by name."""
    ppo_run = _gold_run(tmp_path / "ppo", GOLD_ROWS, {0: [1, 1, 1, 1], 2: [2, 1, 2, 1], 4: [1, 1, 1, 1]})
    dpo_rows = [{**r, "gold_reward/mean": r["gold_reward/mean"] + 0.1} for r in GOLD_ROWS if "gold_kl" in r]
    dpo_run = _gold_run(tmp_path / "odpo", dpo_rows, {0: [0, 0, 0, 0], 2: [0, 0, 0, 1]})
    info = run(load_config(ReportConfig, None, [f"run_dir={ppo_run}", f"with_runs=[{dpo_run}]"]))
    page = (ppo_run / "report.html").read_text()
    figure = page[page.index('id="plot-over-optimisation"') :]
    (svg,) = _images(figure[: figure.index("</figure>")])
    assert len(svg.findall(f".//{SVG}polyline")) == 4
    assert {"ppo gold", "ppo proxy", "odpo gold", "odpo proxy"} <= {t.text for t in svg.iter(f"{SVG}text")}
    assert '<td>ppo</td><td class="num">2</td><td class="num">4</td><td class="num">1.5</td>' in page
    assert "<td>+0.500 [" in page and "<td>0.750 [" in page and "length-adjusted change [95% CI]" in page
    assert "proxy change vs step 0 [95% CI]" in page
    # ppo's best gold is step 2 (1.5); step 4 falls back by (-1, 0, -1, 0): -0.5, the proxy unchanged.
    assert "ppo: step 2 (its best gold) to step 4: gold -0.500 [" in page and "proxy +0.000 [+0.000, +0.000]" in page
    assert info["gold_change"]["ppo"]["step"] == 4 and info["gold_change"]["ppo"]["change"] == 0
    assert info["gold_change"]["odpo"]["win_rate"] == pytest.approx(0.625)

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    assert cli.main(["report", f"run_dir={ppo_run}", f"with_runs=[{plain}]"]) == 2
    assert cli.main(["report", f"run_dir={ppo_run}", f"with_runs=[{tmp_path / 'nowhere'}]"]) == 2


def test_empty_groups_are_left_out_and_pairs_share_axes():
    assert group_keys([]) == []
    groups = group_keys(["len/mean", "kl", "distinct_2", "eval/rewards/chosen", "eval/rewards/rejected", "x"])
    assert [(g.title, g.panels) for g in groups] == [
        ("KL to the reference", [["kl"]]),
        ("Response length", [["len/mean"]]),
        ("Diversity and entropy", [["distinct_2"]]),
        ("Evaluation", [["eval/rewards/chosen", "eval/rewards/rejected"]]),
        ("Other", [["x"]]),
    ]
    assert _panels(["len/policy", "len/reference", "loss", "eval/loss"]) == [
        ["len/policy", "len/reference"],
        ["loss", "eval/loss"],
    ]


def test_series_reads_nan_strings_and_skips_rows_without_step():
    data = series([{"step": 2, "loss": "nan", "note": "x"}, {"step": 1, "loss": 1.0}, {"loss": 5.0}])
    assert list(data) == ["loss"]
    assert (
        data["loss"][0] == (1.0, 1.0)
        and data["loss"][1][0] == 2.0
        and data["loss"][1][1] != data["loss"][1][1]
    )


def test_nice_ticks():
    """Steps of 1, 2 or 5 x 10^k, at least (hi - lo) / 5: range 1 -> 0.2; 44 -> 10; 9.5e-6 -> 2e-6."""
    assert nice_ticks(0, 1) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(3, 47) == [10.0, 20.0, 30.0, 40.0]
    assert nice_ticks(1e-6, 1.05e-5) == [2e-6, 4e-6, 6e-6, 8e-6, 1e-5]
    assert nice_ticks(-1.3, 2.2) == [-1.0, 0.0, 1.0, 2.0]


@pytest.mark.skipif(find_chromium() is None, reason="no chromium to render with")
def test_screenshot_renders_the_page(run_dir, tmp_path):
    run(load_config(ReportConfig, None, [f"run_dir={run_dir}"]))
    png = tmp_path / "shot.png"
    assert screenshot(run_dir / "report.html", png, width=1000, height=1400)
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", head[16:24]) == (1000, 1400)
    # a blank page compresses to a few KiB; curves, text and tables take far more
    assert png.stat().st_size > 30_000
