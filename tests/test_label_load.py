"""`alignkit label serve` under load on loopback (benchmarks/label_load.py with smaller numbers): 20 concurrent
labelers, every acknowledged submit in the database once; then the server SIGKILLed mid-load and restarted on
the same database, and still none lost or duplicated while the labelers carry on."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "label_load.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("label_load", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules["label_load"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


label_load = load_benchmark()


def test_twenty_labelers_every_acknowledged_submit_stored_once(tmp_path):
    result = label_load.run_load(tmp_path, labelers=20, submits=400)
    print(result.line())
    assert (result.submits, result.lost, result.duplicated, result.restarts) == (400, 0, 0, 0)
    # No kill, so nothing can be committed without its answer arriving.
    assert result.stored_unacknowledged == 0
    assert 0 < result.p95_ms < 10_000


def test_sigkill_mid_load_loses_no_acknowledged_submit(tmp_path):
    result = label_load.run_load(tmp_path, labelers=20, submits=300, kill_after=120)
    print(result.line())
    # The labelers carried on through the restart to all 300 acknowledged submits, every one of them stored.
    assert (result.submits, result.lost, result.duplicated, result.restarts) == (300, 0, 0, 1)
    # A submit committed just before the kill may have lost its answer: at most one per labeler in flight.
    assert result.stored_unacknowledged <= 20
