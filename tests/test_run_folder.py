"""The run folder keeps what it holds: a stage writes only into a new or empty folder or a run folder of its
own stage (marked by .alignkit-run.json), one run at a time holds it (.alignkit-lock), a resume is checked
before anything is written, and quickstart's fresh=true empties only a folder quickstart made."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import alignkit
from alignkit.cli import main
from alignkit.config import ConfigError, load_config, save_config
from alignkit.pipelines import quickstart
from alignkit.stages.online_dpo import OnlineDPOConfig
from alignkit.stages.ppo import PPOConfig
from alignkit.stages.sft import SFTConfig
from alignkit.training.run import (
    LOCK_NAME,
    MARKER_NAME,
    RESUME_MAY_CHANGE,
    RunDir,
    RunFolderLock,
    read_marker,
    resume_changes,
)

ROWS = [
    {"prompt": "what is the capital of france?", "completion": "paris."},
    {"prompt": "please write a short poem", "completion": "the sea and the sky."},
] * 4


@pytest.fixture
def sft_data(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def _sft(out: Path, model: Path, data: Path, *extra: str) -> int:
    """A 2-step tiny SFT run through the command line, a checkpoint after each step."""
    args = [f"model={model}", f"train_data={data}", f"output_dir={out}", "batch_size=4", "micro_batch_size=2"]
    args += ["max_steps=2", "save_every=1", "learning_rate=1e-3", "progress=false", "tensorboard=false"]
    return main(["sft", *args, *extra])


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` with its bytes (None for a folder)."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


def _user_folder(path: Path) -> Path:
    """A folder of the user's own, holding names alignkit also writes (config.yaml, summary.json, final/)."""
    (path / "final").mkdir(parents=True)
    (path / "final" / "model.bin").write_bytes(b"\x00\x01 precious weights")
    (path / "config.yaml").write_text("my: own config\n")
    (path / "summary.json").write_text('{"mine": true}\n')
    (path / "notes.txt").write_text("thesis draft\n")
    return path


def _refused(capsys, code: int) -> str:
    """The one-line error of a refused command (exit code 2, no traceback)."""
    err = capsys.readouterr().err
    assert code == 2, err
    assert "error: " in err and "Traceback" not in err
    return err


# --- the marker and the foreign folder ----------------------------------------------------------------


def test_run_is_marked_locked_while_it_runs_and_released(tiny_model_dir, sft_data, tmp_path):
    """A fresh run into an existing empty folder marks it as an sft run folder and leaves the lock file empty
    (released); a second run in the same process (a resume) can then take it."""
    out = tmp_path / "run"
    out.mkdir()
    assert _sft(out, tiny_model_dir, sft_data) == 0
    marker = read_marker(out)
    assert marker["stage"] == "sft" and marker["config_class"] == "SFTConfig"
    assert marker["alignkit_version"] == alignkit.__version__
    assert (out / LOCK_NAME).read_text() == ""
    assert _sft(out, tiny_model_dir, sft_data, "resume_from=latest") == 0


TRAINING_STAGES = {
    "sft": [],
    "rm": [],
    "dpo": [],
    "ipo": [],
    "orpo": [],
    "kto": [],
    "ppo": ["reward=_ppo_rewards:length"],
    "online-dpo": ["reward=_ppo_rewards:length"],
}


@pytest.mark.parametrize("stage", list(TRAINING_STAGES))
def test_every_stage_refuses_a_foreign_folder_and_leaves_it_as_it_was(
    stage, tiny_model_dir, tmp_path, capsys
):
    out = _user_folder(tmp_path / "mine")
    before = _snapshot(out)
    args = [f"model={tiny_model_dir}", f"train_data={tmp_path / 'data.jsonl'}", f"output_dir={out}"]
    err = _refused(capsys, main([stage, *args, *TRAINING_STAGES[stage]]))
    assert f"is not an alignkit {stage} run folder" in err
    assert "config.yaml, final/, notes.txt, summary.json" in err  # what is there, named
    assert _snapshot(out) == before


def test_a_run_folder_of_another_stage_is_refused(tiny_model_dir, sft_data, tmp_path, capsys):
    out = tmp_path / "run"
    RunDir.create(str(out), "dpo", None).release()
    before = _snapshot(out)
    err = _refused(capsys, _sft(out, tiny_model_dir, sft_data))
    assert "is the run folder of an alignkit dpo run, not of sft" in err
    assert _snapshot(out) == before


def test_a_folder_from_before_markers_is_accepted_by_its_config_header(tmp_path):
    """No marker, but config.yaml's first line says alignkit wrote it for SFTConfig: an sft run folder (it is
    marked now); the same folder is foreign to a stage with another config class."""
    out = tmp_path / "old"
    cfg = load_config(SFTConfig, None, [], train_data="d.jsonl", output_dir=str(out))
    save_config(cfg, out / "config.yaml")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    with pytest.raises(ConfigError, match="not an alignkit ppo run folder"):
        RunDir.create(str(out), "ppo", "latest", cfg=PPOConfig(reward="x:y", output_dir=str(out)))
    with RunDir.create(str(out), "sft", "latest", cfg=cfg) as run:
        assert run.path == out
    assert read_marker(out)["stage"] == "sft"


def test_output_dir_that_is_a_file_or_cannot_be_made(tiny_model_dir, sft_data, tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("not a folder\n")
    err = _refused(capsys, _sft(a_file, tiny_model_dir, sft_data))
    assert f"output_dir: {a_file} is a file, not a folder" in err
    err = _refused(capsys, _sft(a_file / "run", tiny_model_dir, sft_data))
    assert f"cannot make the folder {a_file / 'run'}" in err
    assert a_file.read_text() == "not a folder\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any folder")
def test_output_dir_that_cannot_be_written(tiny_model_dir, sft_data, tmp_path, capsys):
    locked = tmp_path / "read-only"
    locked.mkdir(mode=0o555)
    err = _refused(capsys, _sft(locked, tiny_model_dir, sft_data))
    assert f"cannot write in {locked}" in err


# --- the lock -------------------------------------------------------------------------------------------

HOLDER = """\
import sys, time
from pathlib import Path
from alignkit.training.run import RunFolderLock
RunFolderLock.acquire(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(120)
"""


def test_lock_refuses_a_second_run_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    RunDir.create(str(out), "toy", None).release()
    script = tmp_path / "hold_run_folder.py"
    script.write_text(HOLDER)
    env = {**os.environ, "PYTHONPATH": str(Path(alignkit.__file__).parents[1])}
    holder = subprocess.Popen(
        [sys.executable, str(script), str(out)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError) as refused:
            RunDir.create(str(out), "toy", "latest")
        assert f"{out} is in use by another run (pid {holder.pid}, since " in str(refused.value)
        assert "hold_run_folder.py" in str(refused.value)  # its command line
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the file still names the dead holder
        holder.wait()
    capsys.readouterr()
    with RunDir.create(str(out), "toy", "latest") as run:
        assert json.loads((run.path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert f"stale lock from dead pid {holder.pid} (" in capsys.readouterr().err


def test_a_resume_of_a_live_run_is_refused_and_writes_nothing(tiny_model_dir, sft_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert _sft(out, tiny_model_dir, sft_data) == 0
    before = _snapshot(out)
    live = RunFolderLock.acquire(out)  # the run still going, from another open file
    try:
        err = _refused(capsys, _sft(out, tiny_model_dir, sft_data, "resume_from=latest"))
    finally:
        live.release()
    assert f"{out} is in use by another run (this process" in err
    assert {k: v for k, v in _snapshot(out).items() if k != LOCK_NAME} == {
        k: v for k, v in before.items() if k != LOCK_NAME
    }


def test_the_lock_is_released_when_a_run_fails(tiny_model_dir, tmp_path, capsys):
    """A stage that raises (here: its data file is missing) gives the folder back."""
    out = tmp_path / "run"
    assert (
        main(["sft", f"model={tiny_model_dir}", "train_data=/no/such/file.jsonl", f"output_dir={out}"]) == 2
    )
    assert (out / LOCK_NAME).read_text() == ""
    RunFolderLock.acquire(out).release()


# --- resume: checked before anything is written -----------------------------------------------------------


def test_a_missing_or_incomplete_resume_from_creates_nothing(tiny_model_dir, sft_data, tmp_path, capsys):
    missing = tmp_path / "gone" / "checkpoints" / "step-000003"
    err = _refused(capsys, _sft(tmp_path / "new", tiny_model_dir, sft_data, f"resume_from={missing}"))
    assert f"resume_from: {missing} does not exist" in err
    assert not (tmp_path / "gone").exists() and not (tmp_path / "new").exists()

    out = tmp_path / "run"
    assert _sft(out, tiny_model_dir, sft_data) == 0
    half = out / "checkpoints" / "step-000009"
    half.mkdir()  # a checkpoint whose writing never finished: no COMPLETE marker
    before = _snapshot(out)
    err = _refused(capsys, _sft(tmp_path / "other", tiny_model_dir, sft_data, f"resume_from={half}"))
    assert f"resume_from: {half} is not a complete checkpoint" in err
    assert _snapshot(out) == before


def test_a_refused_resume_names_the_fields_and_leaves_config_yaml_as_it_was(
    tiny_model_dir, sft_data, tmp_path, capsys
):
    out = tmp_path / "run"
    assert _sft(out, tiny_model_dir, sft_data, "max_steps=1") == 0
    before = _snapshot(out)
    code = _sft(
        out, tiny_model_dir, sft_data, "max_steps=1", "resume_from=latest", "learning_rate=0.5", "seed=3"
    )
    err = _refused(capsys, code)
    assert "learning_rate: 0.001 -> 0.5; seed: 0 -> 3" in err
    assert f"{out / 'checkpoints' / 'step-000001'} belongs to a run with other settings" in err
    assert _snapshot(out) == before  # config.yaml, metrics, lock: byte for byte


def test_an_honoured_change_is_recorded_and_config_yaml_keeps_the_original(
    tiny_model_dir, sft_data, tmp_path, capsys
):
    """max_steps 2 -> 3 and log_every 1 -> 2 extend the run; the record says at which step they changed."""
    out = tmp_path / "run"
    assert _sft(out, tiny_model_dir, sft_data) == 0
    config_before = (out / "config.yaml").read_bytes()
    assert _sft(out, tiny_model_dir, sft_data, "resume_from=latest", "max_steps=3", "log_every=2") == 0
    assert "resuming with max_steps 2 -> 3, log_every 1 -> 2" in capsys.readouterr().err
    assert (out / "config.yaml").read_bytes() == config_before
    record = {"step": 2, "checkpoint": str(out / "checkpoints" / "step-000002")}
    record["changed"] = {"max_steps": [2, 3], "log_every": [1, 2]}
    assert [json.loads(line) for line in (out / "resumes.jsonl").read_text().splitlines()] == [record]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["resumes"] == [record]
    # Resuming again with the same settings changes nothing more: they are the run's settings now.
    assert _sft(out, tiny_model_dir, sft_data, "resume_from=latest", "max_steps=3", "log_every=2") == 0
    assert len((out / "resumes.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize(
    ("cls", "extend", "refuse"),
    [
        (PPOConfig, ("iterations", 20, 40), ("init_kl_coef", 0.05, 0.2)),
        (OnlineDPOConfig, ("rounds", 10, 30), ("beta", 0.1, 0.5)),
    ],
)
def test_ppo_and_online_dpo_follow_the_same_rule(cls, extend, refuse, tmp_path):
    """Their own loops resume through the same RunDir.create: a longer run is honoured, a changed loss
    setting is refused (checked against config.yaml and a complete checkpoint, no model needed)."""
    out = tmp_path / "run"
    stage = "ppo" if cls is PPOConfig else "online-dpo"
    cfg = load_config(cls, None, [], reward="x:y", output_dir=str(out))
    RunDir.create(str(out), stage, None, cfg=cfg).release()
    (out / "checkpoints" / "step-000005").mkdir(parents=True)
    (out / "checkpoints" / "step-000005" / "COMPLETE").write_text("")
    config_before = (out / "config.yaml").read_bytes()

    name, old, new = refuse
    changed = load_config(
        cls, None, [], reward="x:y", output_dir=str(out), resume_from="latest", **{name: new}
    )
    with pytest.raises(ConfigError, match=f"{name}: {old!r} -> {new!r}"):
        RunDir.create(str(out), stage, "latest", cfg=changed)
    assert not (out / "resumes.jsonl").exists()

    name, old, new = extend
    longer = load_config(
        cls, None, [], reward="x:y", output_dir=str(out), resume_from="latest", **{name: new}
    )
    RunDir.create(str(out), stage, "latest", cfg=longer).release()
    assert json.loads((out / "resumes.jsonl").read_text())["changed"] == {name: [old, new]}
    assert (out / "config.yaml").read_bytes() == config_before


def test_resume_changes_splits_honoured_from_refused():
    saved = {"max_steps": 4, "learning_rate": 1e-5, "lora_r": 8, "progress": True, "gone": 1}
    current = {"max_steps": 8, "learning_rate": 1e-5, "lora_r": 16, "progress": False, "new_field": 2}
    assert resume_changes(saved, current) == (
        {"max_steps": [4, 8], "progress": [True, False]},
        {"lora_r": [8, 16]},
    )
    assert {"learning_rate", "batch_size", "seed", "model", "beta", "lora_r"}.isdisjoint(RESUME_MAY_CHANGE)


# --- quickstart fresh=true --------------------------------------------------------------------------------


@pytest.fixture
def fake_steps(monkeypatch):
    """quickstart with its heavy steps replaced by one that writes pairs.jsonl (and notes what it found)."""
    seen: list[list[str]] = []

    def steps(cfg, root, model_path, started):
        seen.append(sorted(p.name for p in root.iterdir()))
        (root / "pairs.jsonl").write_text('{"prompt": "p"}\n')
        return {}

    monkeypatch.setattr(quickstart, "_run", steps)
    return seen


def _quickstart(model, out, *extra: str) -> int:
    return main(["quickstart", f"model={model}", f"output_dir={out}", "progress=false", *extra])


def test_fresh_keeps_every_file_of_a_folder_quickstart_did_not_make(
    tiny_model_dir, tmp_path, capsys, fake_steps
):
    out = _user_folder(tmp_path / "mine")
    before = _snapshot(out)
    err = _refused(capsys, _quickstart(tiny_model_dir, out, "fresh=true"))
    assert "not an alignkit quickstart run folder" in err and "notes.txt" in err
    assert _snapshot(out) == before
    # A quickstart config.yaml from before markers: resumable, but fresh=true does not remove it either.
    legacy = tmp_path / "legacy"
    save_config(quickstart.QuickstartConfig(output_dir=str(legacy)), legacy / "config.yaml")
    (legacy / "pairs.jsonl").write_text("old pairs\n")
    before = _snapshot(legacy)
    err = _refused(capsys, _quickstart(tiny_model_dir, legacy, "fresh=true"))
    assert f"fresh=true removes only a folder alignkit quickstart made (marked by its {MARKER_NAME})" in err
    assert _snapshot(legacy) == before
    assert fake_steps == []


def test_fresh_empties_a_quickstart_folder_and_says_what_it_removes(
    tiny_model_dir, tmp_path, capsys, fake_steps
):
    out = tmp_path / "qs"
    assert _quickstart(tiny_model_dir, out) == 0
    assert read_marker(out)["stage"] == "quickstart"
    (out / "dpo").mkdir()
    (out / "dpo" / "metrics.jsonl").write_text("{}\n")
    capsys.readouterr()
    assert _quickstart(tiny_model_dir, out, "fresh=true") == 0
    err = capsys.readouterr().err
    assert (
        f"fresh=true: removing from {out}" in err
        and ".alignkit-run.json, config.yaml, dpo/, pairs.jsonl" in err
    )
    assert fake_steps[-1] == [LOCK_NAME, MARKER_NAME, "config.yaml"]  # what the steps found: a fresh folder


def test_fresh_checks_the_config_and_the_model_before_removing_anything(
    tiny_model_dir, tmp_path, capsys, fake_steps
):
    out = tmp_path / "qs"
    assert _quickstart(tiny_model_dir, out) == 0
    before = _snapshot(out)
    missing_model = dict(model=str(tmp_path / "no-such-model"), output_dir=str(out), fresh=True)
    with pytest.raises(ValueError, match="does not exist"):
        quickstart.run(load_config(quickstart.QuickstartConfig, None, [], **missing_model))
    err = _refused(capsys, _quickstart(tiny_model_dir, out, "fresh=true", "skip=[smaple]"))
    assert "unknown steps ['smaple']" in err
    assert _snapshot(out) == before


def test_fresh_never_empties_a_folder_a_live_quickstart_holds(tiny_model_dir, tmp_path, capsys, fake_steps):
    out = tmp_path / "qs"
    assert _quickstart(tiny_model_dir, out) == 0
    live = RunFolderLock.acquire(out)
    try:
        err = _refused(capsys, _quickstart(tiny_model_dir, out, "fresh=true"))
    finally:
        live.release()
    assert "is in use by another run" in err
    assert (out / "pairs.jsonl").exists()


def test_an_older_runs_config_yaml_with_old_names_resumes_and_compares_under_the_new_names(
    tmp_path, capsys, monkeypatch
):
    """A ppo run written before the renames: config.yaml says max_train_rows and holds the TrainConfig keys ppo
    no longer has (at their defaults). It still loads, and a resume compares max_train_rows as train_max_rows."""
    from alignkit import config

    monkeypatch.setattr(config, "_WARNED_RENAMES", set())
    out = tmp_path / "run"
    cfg = load_config(PPOConfig, None, [], reward="x:y", output_dir=str(out), train_max_rows=4)
    RunDir.create(str(out), "ppo", None, cfg=cfg).release()
    (out / "checkpoints" / "step-000005").mkdir(parents=True)
    (out / "checkpoints" / "step-000005" / "COMPLETE").write_text("")
    saved = out / "config.yaml"
    saved.write_text(
        saved.read_text().replace("train_max_rows:", "max_train_rows:") + "batch_size: 8\nepochs: 1\n"
    )

    again = load_config(PPOConfig, saved, ["resume_from=latest"])
    err = capsys.readouterr().err
    assert again.train_max_rows == 4
    assert f"config key 'max_train_rows' (from {saved}) is deprecated; write 'train_max_rows'" in err
    assert "config key 'epochs' is not used by ppo; set iterations and ppo_epochs instead; ignored" in err
    RunDir.create(str(out), "ppo", "latest", cfg=again).release()  # the same settings: no refusal

    more = load_config(PPOConfig, saved, ["resume_from=latest", "train_max_rows=5"])
    with pytest.raises(ConfigError, match="train_max_rows: 4 -> 5"):
        RunDir.create(str(out), "ppo", "latest", cfg=more)


def test_summary_json_is_strict_json_at_any_depth(tmp_path):
    """NaN and infinities are written as strings wherever they sit (an rm run's diagnostics nest them), so a
    strict JSON reader (jq, JavaScript) can read summary.json."""
    with RunDir.create(str(tmp_path / "run"), "toy", None) as run:
        run.write_summary({"loss": float("nan"), "diagnostics": {"bins": [{"n": 0, "acc": float("inf")}]}})
        text = run.summary_path.read_text()

    def refuse(constant: str):
        raise AssertionError(f"{constant} in summary.json")

    summary = json.loads(text, parse_constant=refuse)
    assert summary["loss"] == "nan" and summary["diagnostics"] == {"bins": [{"n": 0, "acc": "inf"}]}
