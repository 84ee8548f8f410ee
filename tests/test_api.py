"""The Python API: every stage is a `Stage` (alignkit.stages) runnable from Python with its config object or
keyword settings, checked exactly as the command line checks them; `import alignkit` stays light."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_stage_dpo import pair_data  # noqa: F401  (the fixture)

import alignkit
from alignkit.config import ConfigError, load_config
from alignkit.stages import STAGES, Stage, load_stage

README = Path(__file__).resolve().parents[1] / "README.md"

# The README's "Python API" example (README.md shows it under that heading; the test runs the README's copy once
# it is there, so the two cannot drift). Names it uses for a user's files are replaced by the test's.
README_EXAMPLE = '''\
import alignkit
from alignkit import dpo  # the `alignkit dpo` stage; torch is imported here, not by `import alignkit`
from alignkit.config import ConfigError

cfg = dpo.config(model="smollm2-135m-instruct", train_data="pairs.jsonl", output_dir="runs/dpo-python")
cfg.max_steps = 4  # dpo.config is DPOConfig: every setting `alignkit dpo --help` lists
summary = dpo.run(cfg)  # checked as on the command line (types, ranges, required fields, rules), then run
print(summary["final_model"], summary["final_metrics"]["loss"])

# The same by name and keywords; a mistake is a ConfigError naming the key, before anything runs.
try:
    alignkit.run("dpo", model="smollm2-135m-instruct", train_data="pairs.jsonl", beta=0)
except ConfigError as e:
    print(e)  # config key 'beta' must be > 0, got 0.0 (from keyword arguments)
'''


def readme_example() -> str:
    """The README's first python block after a "Python API" heading, else the example above."""
    match = re.search(r"^#+ Python API\n.*?```python\n(.*?)```", README.read_text(), re.S | re.M)
    return match.group(1) if match else README_EXAMPLE


def test_the_readme_example_runs_on_the_tiny_model(tiny_model_dir, pair_data, tmp_path, capsys):  # noqa: F811
    """4 DPO steps at the default learning rate (5e-7) hardly move the tiny model off its reference: the loss
    stays at ln 2 (every implicit reward ~0); beta=0 is refused with the command line's message."""
    code = readme_example()
    for name, path in [
        ("smollm2-135m-instruct", tiny_model_dir),
        ("pairs.jsonl", pair_data),
        ("runs/dpo-python", tmp_path / "run"),
    ]:
        code = code.replace(f'"{name}"', repr(str(path)))
    scope: dict = {}
    exec(compile(code, "README example", "exec"), scope)
    summary = scope["summary"]
    assert (summary["stage"], summary["steps"], summary["train_pairs"]) == ("dpo", 4, 16)
    assert summary["final_metrics"]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert Path(summary["final_model"]) == tmp_path / "run" / "final"
    assert "config key 'beta' must be > 0, got 0.0 (from keyword arguments)" in capsys.readouterr().out


def test_import_alignkit_is_light():
    """`import alignkit` (and reading its stage table) imports neither torch nor any stage module."""
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, alignkit; names = dir(alignkit); "
            "print('torch' in sys.modules, any(m.startswith('alignkit.stages.') for m in sys.modules), "
            "'online_dpo' in names)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["False", "False", "True"]


def test_every_registered_stage_declares_itself():
    """Each table entry names a Stage of that name; `alignkit.<name>` (with '_' for '-') is it."""
    for name, (_, doc) in STAGES.items():
        stage = load_stage(name)
        assert isinstance(stage, Stage) and stage.name == name and stage.doc == doc
        assert getattr(alignkit, name.replace("-", "_")) is stage
        if stage.positional:
            assert stage.positional in stage.config.__dataclass_fields__
    assert (alignkit.report.positional, alignkit.eval.positional) == ("run_dir", "model")
    assert [n for n in STAGES if load_stage(n).prints_results] == [
        "quickstart", "compare", "recommend", "label"  # label prints the token once and the export counts
    ]
    assert alignkit.ipo.main is alignkit.dpo.main and alignkit.ipo.config.__name__ == "IPOConfig"
    assert alignkit.orpo.config().loss == "orpo"


def _message(error: pytest.ExceptionInfo) -> str:
    return str(error.value).replace("keyword arguments", "the command line")


@pytest.mark.parametrize(
    "settings",
    [
        {"beta": 0},  # a range
        {"label_smoothing": 0.5},  # the other end of a range
        {"beta": "high"},  # a type
        {"reference": "adapter"},  # a rule across fields (check): adapter needs lora
        {"bta": 0.2},  # an unknown key, with the near match
        {"train_data": None},  # a required field
    ],
)
def test_python_settings_are_checked_as_the_command_line(settings, tmp_path):
    """The same mistake from Python and from the command line: the same ConfigError message (only its
    "from ..." differs), raised before the stage creates anything."""
    base = {"model": "m", "train_data": "d.jsonl", "output_dir": str(tmp_path / "run")}
    given = {**base, **settings}
    with pytest.raises(ConfigError) as cli:
        load_config(alignkit.dpo.config, None, [f"{k}={'null' if v is None else v}" for k, v in given.items()])
    with pytest.raises(ConfigError) as keywords:
        alignkit.run("dpo", **given)
    assert _message(keywords) == _message(cli)
    assert not (tmp_path / "run").exists()


def test_a_config_object_is_checked_as_the_command_line(tmp_path):
    """A config built in code gets the same checks: a range, a missing required field, the wrong stage."""
    dpo, kto = alignkit.dpo, alignkit.kto
    with pytest.raises(ConfigError, match=r"^config key 'beta' must be > 0, got -1.0 \(from keyword"):
        dpo.run(dpo.config(model="m", train_data="d.jsonl", beta=-1.0))
    with pytest.raises(ConfigError, match="missing required config field 'train_data' for DPOConfig"):
        dpo.run(dpo.config(model="m"))
    with pytest.raises(TypeError, match="stage 'dpo' takes a DPOConfig, got KTOConfig"):
        dpo.run(kto.config(model="m", train_data="d.jsonl"))
    # settings override the object's fields; values are coerced as from YAML (an int learning rate is a float)
    cfg = dpo.validated(dpo.config(model="m", train_data="d.jsonl", beta=0.3), learning_rate=1)
    assert (cfg.beta, cfg.learning_rate, type(cfg.learning_rate)) == (0.3, 1.0, float)


def test_an_unknown_stage_suggests_the_nearest():
    with pytest.raises(ConfigError, match="unknown stage 'dp'; did you mean 'dpo'"):
        alignkit.run("dp", model="m")
    with pytest.raises(AttributeError):
        alignkit.not_a_stage  # noqa: B018
