"""Every shipped example config names the command that runs it on its first line, and loads into that
stage's config class (so a renamed or removed field cannot leave a stale example behind)."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignkit.cli import STAGES, _load_stage
from alignkit.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_example_configs():
    assert len(CONFIGS) >= 5


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_config_loads_for_its_stage(path):
    first = path.read_text().splitlines()[0]
    words = first.split()
    assert words[:2] == ["#", "alignkit"] and words[3] == f"configs/{path.name}", first
    stage = words[2]
    assert stage in STAGES
    _, config_cls = _load_stage(stage)
    cfg = load_config(config_cls, str(path))
    assert cfg.model == "smollm2-135m-instruct"
