"""The `alignkit` command line: stage help, config resolution, and the errors that become a message and an
exit code (2 for config/data problems, 130 for an interrupted run) instead of a traceback."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

import _fake_stage
import pytest

from alignkit import __version__, cli
from alignkit.errors import AlignkitError, TrainingInterrupted

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent

# Runs `python -m alignkit` for real (runpy, as `-m` does) with the fake stage registered, so the exit code
# and stderr are those a user sees.
RUN_MAIN_WITH_FAKE = (
    "import runpy, sys; import alignkit.cli as c; "
    "c.STAGES['fake'] = ('_fake_stage', 'A stage for tests'); "
    "sys.argv = ['alignkit', *sys.argv[1:]]; "
    "runpy.run_module('alignkit', run_name='__main__', alter_sys=True)"
)


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setitem(cli.STAGES, "fake", ("_fake_stage", "A stage for tests"))
    monkeypatch.setitem(
        cli.STAGES, "fake-other", ("_fake_stage:OTHER", "The same stage, other defaults")
    )
    _fake_stage.LAST_CONFIG.clear()


def python(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=60)


def test_registered_stages():
    assert cli.STAGES["sft"] == ("alignkit.stages.sft", "Supervised fine-tuning on demonstrations")
    assert cli.STAGES["prepare-model"] == (
        "alignkit.stages.prepare_model",
        "Prepare the embedded default model in the cache",
    )
    assert cli.STAGES["quickstart"] == (
        "alignkit.pipelines.quickstart",
        "The main job: a short alignment run on the embedded default model",
    )


def test_main_help_lists_every_stage_with_its_description(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: alignkit <stage> [CONFIG.yaml] [key=value ...]\n")
    width = max(len(name) for name in cli.STAGES)
    for name, (_, doc) in cli.STAGES.items():
        assert f"\n  {name:<{width}}  {doc}\n" in out + "\n"


def test_no_arguments_prints_help_to_stderr_and_exits_2(capsys):
    assert cli.main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("usage: alignkit <stage>")


def test_help_and_version_via_python_m_are_fast_and_do_not_import_torch():
    """`alignkit --help` must not import a stage: no torch in sys.modules afterwards."""
    probe = python(
        "-c", "import sys; from alignkit.cli import main; main(['--help']); print('torch' in sys.modules)"
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.rstrip().endswith("False")
    version = python("-m", "alignkit", "--version")
    assert (version.returncode, version.stdout) == (0, f"alignkit {__version__}\n")


def test_help_into_a_pipe_closed_early_is_no_traceback():
    """`alignkit cai-label --help | head -1`: the reader closes the pipe while help is still being written; the
    CLI stops quietly instead of printing a BrokenPipeError traceback."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "alignkit", "cai-label", "--help"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, bufsize=0,
    )  # fmt: skip
    assert proc.stdout.read(1)  # the help has started; close our end before reading the rest
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) in (0, 1)
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr


def test_console_script_points_at_console():
    # tomllib is 3.11+ and the project supports 3.10: look for the line itself.
    scripts = (REPO / "pyproject.toml").read_text().split("[project.scripts]\n")[1].split("\n[")[0]
    assert 'alignkit = "alignkit.cli:console"' in scripts.splitlines()
    (script,) = entry_points(group="console_scripts", name="alignkit")
    assert script.load() is cli.console


@pytest.mark.parametrize(("world", "code", "exits_hard"), [("2", 0, True), ("2", 2, False), ("1", 0, False)])
def test_console_ends_a_finished_rank_of_a_multi_process_launch_with_os_exit(monkeypatch, world, code, exits_hard):
    """A rank whose multi-process run finished leaves through os._exit (interpreter shutdown is where Gloo's
    threads can abort it); a failed run and a one-process run exit as usual, with main()'s code."""
    class HardExit(BaseException):  # what the patched os._exit raises: nothing after it runs, as in the real one
        pass

    def hard_exit(status: int):
        raise HardExit(status)

    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setattr(cli, "main", lambda: code)
    monkeypatch.setattr(cli.os, "_exit", hard_exit)
    with pytest.raises(HardExit if exits_hard else SystemExit) as exited:
        cli.console()
    assert exited.value.args == (0,) if exits_hard else exited.value.code == code


def test_stage_help_lists_every_field_with_default_and_doc(fake, capsys):
    assert cli.main(["fake", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: alignkit fake [CONFIG.yaml] [key=value ...]\n\nA stage for tests.\n")
    assert "A stage that only reports its configuration." in out  # the config class docstring
    flat = " ".join(out.split())
    for f in dataclasses.fields(_fake_stage.FakeConfig):
        assert f"\n  {f.name} " in out
        assert " ".join(f.metadata["doc"].split()) in flat
    lines = out.splitlines()
    assert any(line.split() == ["beta", "float", "0.1"] for line in lines)
    assert any(line.split() == ["train_data", "str", "required"] for line in lines)
    assert any(line.split() == ["learning_rate", "float", "5e-06"] for line in lines)


def test_stage_sharing_a_module_uses_the_named_config(fake, capsys):
    """ "_fake_stage:OTHER" runs the same run() with OtherConfig (beta defaults to 0.5, not 0.1)."""
    assert cli.main(["fake-other", "train_data=d"]) == 0
    (cfg,) = _fake_stage.LAST_CONFIG
    assert type(cfg) is _fake_stage.OtherConfig and cfg.beta == 0.5
    assert json.loads(capsys.readouterr().out)["config"]["beta"] == 0.5


def test_run_gets_yaml_then_overrides_and_prints_the_summary(fake, tmp_path, capsys):
    """YAML: lr 3e-4, lora true, batch 4, beta 1. Overrides: lr 1e-5, target modules, eval_data null, beta 2.
    Resolved: lr 1e-5 and beta 2.0 (overrides win), lora True and batch 4 (YAML), train_data from YAML."""
    path = tmp_path / "fake.yaml"
    path.write_text("train_data: a.jsonl\nlearning_rate: 3.0e-4\nlora: true\nbatch_size: 4\nbeta: 1\n")
    argv = [
        "fake",
        str(path),
        "learning_rate=1e-5",
        "lora_target_modules=[q_proj,v_proj]",
        "eval_data=null",
        "beta=2",
    ]
    assert cli.main(argv) == 0
    (cfg,) = _fake_stage.LAST_CONFIG
    assert type(cfg) is _fake_stage.FakeConfig
    assert (cfg.train_data, cfg.learning_rate, cfg.lora, cfg.batch_size) == ("a.jsonl", 1e-5, True, 4)
    assert (cfg.lora_target_modules, cfg.eval_data, cfg.beta) == (["q_proj", "v_proj"], None, 2.0)
    summary = json.loads(capsys.readouterr().out)
    assert summary["stage"] == "fake" and summary["config"]["learning_rate"] == 1e-5


def test_first_argument_is_an_override_when_it_is_not_a_yaml_file():
    assert cli.split_args(["lr=1", "seed=2"]) == (None, ["lr=1", "seed=2"])
    assert cli.split_args(["c.yml", "seed=2"]) == ("c.yml", ["seed=2"])
    assert cli.split_args(["seed", "x"]) == (None, ["seed", "x"])  # load_config reports 'seed' as malformed
    assert cli.split_args([]) == (None, [])


@pytest.mark.parametrize(
    "argv, expected_err",
    [
        (
            ["fake", "train_data=d", "learnig_rate=1"],
            "error: unknown config key 'learnig_rate' for FakeConfig; did you mean 'learning_rate'? "
            "(from the command line)\n(`alignkit fake --help` lists every setting)\n",
        ),
        (
            ["fake", "beta=1"],
            "error: missing required config field 'train_data' for FakeConfig: Training data: a "
            ".jsonl/.json/.parquet/.csv file, a saved dataset dir or a hub id.\n"
            "set it in the YAML file or on the command line, e.g. train_data=...\n"
            "(`alignkit fake --help` lists every setting)\n",
        ),
        (
            ["fake", "train_data=d", "lr"],
            "error: expected an override of the form key=value (e.g. learning_rate=1e-5), got 'lr'\n"
            "(`alignkit fake --help` lists every setting)\n",
        ),
        (
            ["fake", "train_data=d", "mode=config_error"],
            "error: micro_batch_size must divide batch_size\n(`alignkit fake --help` lists every setting)\n",
        ),
        (["fake", "train_data=d.jsonl", "mode=bad_row"], "error: d.jsonl: row 7: field 'chosen': missing\n"),
        (["fake", "train_data=d.xyz", "mode=data_source_error"], "error: d.xyz: unsupported format\n"),
        (["fake", "train_data=d.jsonl", "mode=file_not_found"], "error: data file not found: d.jsonl\n"),
        (
            ["fake", "train_data=d", "mode=alignkit_error"],
            "error: checkpoint runs/x/checkpoints/step-3 is incomplete\n",
        ),
        (
            ["fak", "train_data=d"],
            "error: unknown stage 'fak'; did you mean 'fake'?\nstages: "
            + ", ".join([*(s for s in cli.STAGES), "fake", "fake-other"])
            + " (`alignkit --help` describes each)\n",
        ),
    ],
)
def test_user_errors_print_error_and_exit_2(fake, capsys, argv, expected_err):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err == expected_err
    assert captured.out == ""


def test_unknown_key_through_python_m_exits_2_without_traceback():
    result = python("-c", RUN_MAIN_WITH_FAKE, "fake", "train_data=d", "learnig_rate=1")
    assert result.returncode == 2
    assert result.stderr.startswith(
        "error: unknown config key 'learnig_rate' for FakeConfig; did you mean 'learning_rate'?"
    )
    assert "Traceback" not in result.stderr


def test_missing_required_through_python_m_exits_2_without_traceback():
    result = python("-c", RUN_MAIN_WITH_FAKE, "fake")
    assert result.returncode == 2
    assert result.stderr.startswith("error: missing required config field 'train_data' for FakeConfig")
    assert "Traceback" not in result.stderr


def test_interrupted_run_says_where_the_checkpoint_is_and_how_to_resume(fake, tmp_path, capsys):
    """The resume command repeats the original arguments, drops the old resume_from, adds the checkpoint."""
    path = tmp_path / "fake.yaml"
    path.write_text("train_data: d\n")
    argv = ["fake", str(path), "output_dir=runs/x", "resume_from=latest", "mode=interrupt"]
    assert cli.main(argv) == 130
    checkpoint = os.path.join("runs/x", "checkpoints", "step-3")
    assert capsys.readouterr().err == (
        f"training interrupted; checkpoint saved at {checkpoint}\n"
        f"resume with: alignkit fake {path} output_dir=runs/x mode=interrupt resume_from={checkpoint}\n"
    )


def test_an_interrupted_pipeline_is_resumed_by_its_own_command(monkeypatch, tmp_path, capsys):
    """compare and quickstart have no resume_from: they resume their interrupted stage when rerun as they were."""
    monkeypatch.setitem(cli.STAGES, "fake-pipeline", ("_fake_stage:PIPELINE", "A pipeline for tests"))
    path = tmp_path / "p.yaml"
    path.write_text("output_dir: runs/p\n")
    assert cli.main(["fake-pipeline", str(path), "output_dir=runs/q"]) == 130
    checkpoint = os.path.join("runs/q", "sft-seed0", "checkpoints", "step-3")
    assert capsys.readouterr().err == (
        f"training interrupted; checkpoint saved at {checkpoint}\n"
        f"resume with: alignkit fake-pipeline {path} output_dir=runs/q\n"
    )


def test_stop_without_a_checkpoint_offers_no_resume_command(fake, capsys):
    assert cli.main(["fake", "train_data=d", "mode=diverged"]) == 130
    assert capsys.readouterr().err == (
        "training stopped after 3 consecutive non-finite steps; no checkpoint was written\n"
    )


def test_a_bug_is_not_dressed_up_as_a_user_error(fake, capsys):
    """A plain ValueError from run() is a bug: a hint to report it, then it propagates with its traceback."""
    with pytest.raises(ValueError, match="a bug, not a user error"):
        cli.main(["fake", "train_data=d", "mode=value_error"])
    assert capsys.readouterr().err == f"alignkit: {cli.BUG_HINT}\n"


def test_a_bug_through_python_m_shows_the_hint_and_the_traceback():
    result = python("-c", RUN_MAIN_WITH_FAKE, "fake", "train_data=d", "mode=value_error")
    assert result.returncode == 1
    assert result.stderr.startswith(f"alignkit: {cli.BUG_HINT}\nTraceback (most recent call last):\n")
    assert result.stderr.endswith("ValueError: a bug, not a user error\n")


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback_of_a_user_error_too(fake, capsys, monkeypatch, how):
    argv = ["fake", "train_data=d.jsonl", "mode=bad_row"]
    if how == "flag":
        argv.insert(1, "--debug")
    else:
        monkeypatch.setenv("ALIGNKIT_DEBUG", "1")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):\n")
    assert "alignkit.data.io.BadRowError: d.jsonl: row 7: field 'chosen': missing\n" in err
    assert err.endswith("error: d.jsonl: row 7: field 'chosen': missing\n")


@pytest.mark.parametrize(
    "error, message",
    [
        (PermissionError(13, "Permission denied", "out/run"), "out/run: permission denied"),
        (IsADirectoryError(21, "Is a directory", "data.jsonl"), "data.jsonl: is a directory"),
        (NotADirectoryError(20, "Not a directory", "f/x"), "f/x: not a directory"),
        (FileNotFoundError("data file not found: d.jsonl"), "data file not found: d.jsonl"),
        (AlignkitError("checkpoint x is incomplete"), "checkpoint x is incomplete"),
        (ValueError("a bug"), None),
        (KeyError("a bug"), None),
    ],
)
def test_one_table_maps_user_errors_to_messages(error, message):
    assert cli.user_error_message(error, "sft") == message


def test_training_interrupted_carries_its_checkpoint_through_pickle():
    error = pickle.loads(pickle.dumps(TrainingInterrupted("runs/x/checkpoints/step-3")))
    assert isinstance(error, AlignkitError)
    assert error.checkpoint == "runs/x/checkpoints/step-3"
    assert str(error) == "training interrupted; checkpoint saved at runs/x/checkpoints/step-3"


# ---------------------------------------------------------------------------------------------
# Real stages, run as a user would: a data or model mistake is one line and exit 2, never a traceback
# ---------------------------------------------------------------------------------------------

# Two rows no stage can use: a line that is not JSON, and a row whose prompt is blank (and which has no
# chosen/rejected, no completion, no label, no ranked responses).
UNUSABLE = b'not json\n{"prompt": " ", "response_a": "a", "response_b": "b"}\n'


REWARD = "reward=alignkit.scoring.rewards:brevity"


def stage_argv(stage: str, model: str, data: str, out: Path) -> list[str]:
    """The arguments that make ``stage`` read ``data`` as its main input (with the tiny ``model``)."""
    return {
        "sft": ["sft", f"model={model}", f"train_data={data}", f"output_dir={out}"],
        "rm": ["rm", f"model={model}", f"train_data={data}", f"output_dir={out}"],
        "dpo": ["dpo", f"model={model}", f"train_data={data}", f"output_dir={out}"],
        "kto": ["kto", f"model={model}", f"train_data={data}", "data_format=unpaired", f"output_dir={out}"],
        "score": ["score", f"reward={model}", f"input={data}", f"output={out}.jsonl"],
        "build-prefs": ["build-prefs", "ranker=human", f"human_rankings={data}", f"output={out}.jsonl"],
        "cai-revise": ["cai-revise", f"model={model}", f"prompts={data}", f"output={out}.jsonl"],
        "cai-label": ["cai-label", f"judge_model={model}", f"input={data}", f"output={out}.jsonl"],
        "eval": ["eval", f"model={model}", f"prompts={data}", f"output={out}.json"],
        "ppo": ["ppo", f"model={model}", REWARD, f"train_data={data}", f"output_dir={out}"],
        "online-dpo": ["online-dpo", f"model={model}", REWARD, f"train_data={data}", f"output_dir={out}"],
    }[stage]


SETTING = {"score": "input", "cai-label": "input", "build-prefs": "human_rankings", "cai-revise": "prompts"}
DATA_STAGES = ["sft", "rm", "dpo", "kto", "score", "build-prefs", "cai-revise", "cai-label", "eval"]
DATA_STAGES += ["ppo", "online-dpo"]


@pytest.mark.parametrize("stage", DATA_STAGES)
def test_empty_or_all_skipped_data_is_one_message_in_every_stage(stage, tiny_model_dir, tmp_path, capsys):
    setting = SETTING.get(stage, "prompts" if stage == "eval" else "train_data")
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert cli.main(stage_argv(stage, str(tiny_model_dir), str(empty), tmp_path / "a")) == 2
    err = capsys.readouterr().err
    assert err.endswith(f"error: {setting} {empty}: no usable rows (0 read, 0 skipped)\n")
    assert "Traceback" not in err

    unusable = tmp_path / "unusable.jsonl"
    unusable.write_bytes(UNUSABLE)
    argv = [*stage_argv(stage, str(tiny_model_dir), str(unusable), tmp_path / "b"), "on_bad_row=skip"]
    assert cli.main(argv) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith(
        f"error: {setting} {unusable}: no usable rows (2 read, 2 skipped: first reasons "
        "row 0: line 1 is not valid JSON (Expecting value at column 1); row 1: field '"
    )


def csv_file(path: Path, body: bytes) -> str:
    path.write_bytes(b"prompt,completion\n" + body)
    return str(path)


@pytest.mark.parametrize(
    "name, body, expected",
    [
        ("shifted.csv", b"a,b\nc,d,e\n", "shifted.csv: row 1: line 3: has 3 fields, the header has 2"),
        ("latin1.csv", b"a,caf\xe9\n", "latin1.csv: row 0: line 2: not valid UTF-8"),
        ("quote.csv", b'a,"b\n', "quote.csv: row 0: line 2: not valid CSV (unexpected end of data)"),
        ("csv.parquet", b"a,b\n", "csv.parquet: not a readable Parquet file ("),
    ],
)
def test_broken_data_files_name_file_and_row(name, body, expected, tiny_model_dir, tmp_path, capsys):
    data = csv_file(tmp_path / name, body)
    argv = ["sft", f"model={tiny_model_dir}", f"train_data={data}", f"output_dir={tmp_path / 'out'}"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"\nerror: {tmp_path / expected}" in err
    assert "Traceback" not in err


def test_missing_model_directory_is_named(tmp_path, capsys):
    data = csv_file(tmp_path / "d.csv", b"a,b\n")
    missing = tmp_path / "no-such-model"
    assert cli.main(["sft", f"model={missing}", f"train_data={data}", f"output_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert err.endswith(f"error: model directory '{missing}' does not exist (resolved to {missing})\n")


def test_a_hub_id_with_no_hub_fails_fast_with_a_message(tmp_path):
    """The hub endpoint is a closed local port: transformers would retry for ~50 s, then print a traceback."""
    import socket

    with socket.socket() as sock:  # a port that nothing listens on once this closes
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    data = csv_file(tmp_path / "d.csv", b"a,b\n")
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HUB_CACHE": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("TRANSFORMERS_OFFLINE", None)
    args = ["-m", "alignkit", "sft", "model=nobody/no-such-model", f"train_data={data}"]
    started = time.monotonic()
    argv = [sys.executable, *args, f"output_dir={tmp_path / 'out'}"]
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert time.monotonic() - started < 20
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        f"error: model 'nobody/no-such-model' is neither a local directory nor in the Hugging Face cache "
        f"({tmp_path / 'hf'}), and the hub (http://127.0.0.1:{port}) is unreachable; give the path of a "
        "model directory, or download it where there is a network (e.g. `hf download nobody/no-such-model`)"
    )
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "spec, expected",
    [
        (
            "_ppo_rewards:wrong_signature",
            "error: reward=_ppo_rewards:wrong_signature: the function must accept (prompt: str, "
            "response: str) and return a float; its signature is wrong_signature(response: 'str') -> 'float'",
        ),
        ("no_such_module_xyz:f", "error: reward: no module named 'no_such_module_xyz'"),
        ("alignkit.rewards:no_such_function", "error: reward: module 'alignkit.rewards' has no function"),
    ],
)
def test_a_reward_function_is_checked_before_anything_loads(spec, expected, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["ppo", "model=/no/such/model", f"reward={spec}", f"output_dir={out}"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(expected)
    assert "Traceback" not in err
    assert not out.exists()  # refused before the run folder (and the missing model) were touched
