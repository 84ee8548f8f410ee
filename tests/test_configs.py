"""Every shipped example config names the command that runs it on its first line, and loads into that
stage's config class (so a renamed or removed field cannot leave a stale example behind). The Accelerate
configs (configs/accelerate/) load with Accelerate's own reader, and their command's alignkit part loads too."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig

from alignkit.config import load_config
from alignkit.stages import STAGES, load_stage

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))


def test_there_are_example_configs():
    assert len(CONFIGS) >= 5


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_config_loads_for_its_stage(path):
    first = path.read_text().splitlines()[0]
    words = first.split()
    assert words[:2] == ["#", "alignkit"] and words[3] == f"configs/{path.name}", first
    stage = words[2]
    assert stage in STAGES
    config_cls = load_stage(stage).config
    cfg = load_config(config_cls, str(path))
    assert cfg.model == "smollm2-135m-instruct"


def test_there_are_accelerate_configs():
    assert {p.name for p in ACCELERATE_CONFIGS} == {
        "fsdp.yaml",
        "multi_gpu.yaml",
        "multi_node.yaml",
        "zero3.yaml",
    }


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_names_its_command_and_loads(path):
    """First line: `# accelerate launch --config_file configs/accelerate/<name> [options] -m alignkit <stage>
    <alignkit config> [key=value ...]`. Accelerate reads the file (unknown keys are errors there), and the
    alignkit config with the overrides loads for the stage."""
    words = path.read_text().splitlines()[0].split()
    assert words[:5] == ["#", "accelerate", "launch", "--config_file", f"configs/accelerate/{path.name}"], (
        words
    )
    m = words.index("-m")
    assert words[m + 1] == "alignkit" and words[m + 2] in STAGES
    config_cls = load_stage(words[m + 2]).config
    load_config(config_cls, str(ROOT / words[m + 3]), words[m + 4 :])
    cluster = ClusterConfig.from_yaml_file(str(path))
    assert cluster.num_processes > 1 and cluster.mixed_precision in ("no", "bf16")
