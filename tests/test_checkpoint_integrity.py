"""The last good checkpoint is good: a non-finite state is never written, every checkpoint carries a
manifest of sizes and sha256 checked on resume (a corrupt latest falls back to the newest intact one, a corrupt
named one is an error), pruning never drops the checkpoint just written, and a second signal names the newest
intact checkpoint on disk."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from _loop_worker import make_examples, make_model, toy_collate, toy_config, toy_step
from _signal_monitor import SignalAt
from test_stage_dpo import PAIRS

from alignkit.cli import main
from alignkit.config import load_config
from alignkit.errors import TrainingInterrupted
from alignkit.evaluation.monitors import MonitorSet
from alignkit.stages import online_dpo, ppo
from alignkit.training import checkpoint as checkpoint_module
from alignkit.training.checkpoint import (
    COMPLETE_MARKER,
    MANIFEST,
    CheckpointError,
    NonFiniteState,
    checkpoint_problem,
    prune_checkpoints,
    save_checkpoint,
)
from alignkit.training.loop import train
from alignkit.training.run import RunDir
from alignkit.training.schedule import build_scheduler


def _train(run_dir: Path, on_log=None, **overrides):
    cfg = toy_config(str(run_dir), **overrides)
    model = make_model()
    run = RunDir.create(cfg.output_dir, "toy", cfg.resume_from)
    train(cfg, model, make_examples(), toy_collate, toy_step, run, on_log=on_log)
    return model


def _step_dirs(checkpoints: Path) -> list[str]:
    return sorted(p.name for p in checkpoints.iterdir())


def _truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def four_checkpoints(tmp_path_factory) -> tuple[Path, dict]:
    """A 4-step toy run checkpointed at every step (all four kept), and its final weights."""
    run_dir = tmp_path_factory.mktemp("integrity") / "run"
    model = _train(run_dir, max_steps=4, save_every=1, keep_checkpoints=4)
    return run_dir, {name: p.detach().clone() for name, p in model.named_parameters()}


def _copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


# --- non-finite state ---------------------------------------------------------------------------------


def test_nonfinite_weights_write_no_checkpoint_and_the_interrupt_names_the_last_good_one(tmp_path, capsys):
    """Step 1 is checkpointed; after step 2 a weight turns NaN and a SIGTERM arrives: the step-2 checkpoint is
    not written (no directory, no tmp leftovers), a warning and a checkpoint_skipped event name step 2 and the
    tensor, and TrainingInterrupted names step-1, the last good checkpoint."""
    run_dir = tmp_path / "nan"
    model = make_model()
    q_proj = model.model.layers[0].self_attn.q_proj.weight

    def poison_then_term(step, row):
        if step == 2:
            with torch.no_grad():
                q_proj[0, 0] = float("nan")
            os.kill(os.getpid(), signal.SIGTERM)

    cfg = toy_config(str(run_dir), max_steps=6, save_every=1)
    run = RunDir.create(cfg.output_dir, "toy", None)
    with pytest.raises(TrainingInterrupted) as info:
        train(cfg, model, make_examples(), toy_collate, toy_step, run, on_log=poison_then_term)
    step1 = str(run_dir / "checkpoints" / "step-000001")
    assert info.value.checkpoint == step1
    assert _step_dirs(run_dir / "checkpoints") == ["step-000001"]
    err = capsys.readouterr().err
    assert "no checkpoint written at step 2: model.layers.0.self_attn.q_proj.weight holds a non-finite" in err
    assert f"the last good checkpoint is {step1}" in err
    events = [json.loads(line) for line in run.metrics_path.read_text().splitlines()]
    skipped = [e for e in events if e.get("event") == "checkpoint_skipped"]
    assert [(e["step"], e["last_checkpoint"]) for e in skipped] == [(2, step1)]


def test_nonfinite_optimizer_state_is_refused_before_anything_is_written(tmp_path):
    """An infinity in AdamW's second moment (finite weights) is named; the checkpoint path stays absent."""
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters())
    model(input_ids=torch.tensor([[3, 4, 5]])).logits.sum().backward()
    optimizer.step()
    optimizer.state[next(iter(model.parameters()))]["exp_avg_sq"][0] = float("inf")
    scheduler = build_scheduler(optimizer, "constant", 0, 1)
    with pytest.raises(NonFiniteState, match=r"optimizer state 0\.exp_avg_sq"):
        save_checkpoint(tmp_path / "step-000001", model, optimizer, scheduler, {"step": 1})
    assert list(tmp_path.iterdir()) == []


STAGE_ARGS = {
    "ppo": (ppo, "iteration", ["iterations=3", "prompts_per_iteration=2", "minibatch_size=2"]),
    "online-dpo": (online_dpo, "round", ["rounds=3", "prompts_per_round=2", "samples_per_prompt=2"]),
}


@pytest.mark.parametrize("stage", sorted(STAGE_ARGS))
def test_ppo_and_online_dpo_skip_a_nonfinite_checkpoint_and_verify_on_resume(
    stage, tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """Their own loops: a weight turned NaN as the step-2 checkpoint is written (with a SIGINT during round 2)
    -> no step-2 checkpoint, a warning naming the round/iteration, and TrainingInterrupted naming step-1. With
    step-1's weights then truncated, resume_from=latest is an error naming that file."""
    module, step_name, extra = STAGE_ARGS[stage]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["hello there", "the quick fox"]))
    out = tmp_path / "run"
    args = [
        f"model={tiny_model_dir}",
        f"train_data={prompts}",
        "reward=_ppo_rewards:length",
        f"output_dir={out}",
        "micro_batch_size=1",
        "max_new_tokens=4",
        "save_every=1",
        "progress=false",
        "tensorboard=false",
        *extra,
    ]
    real_save = checkpoint_module.save_checkpoint

    def poisoned_at_step_2(path, model, *rest, **kwargs):
        if Path(path).name == "step-000002":
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).view(-1)[0] = float("nan")
        return real_save(path, model, *rest, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_checkpoint", poisoned_at_step_2)
    with pytest.raises(TrainingInterrupted) as info:
        module.run(load_config(module.STAGE.config, None, args), monitors=MonitorSet([SignalAt(2)]))
    step1 = out / "checkpoints" / "step-000001"
    assert info.value.checkpoint == str(step1)
    assert _step_dirs(out / "checkpoints") == ["step-000001"]
    assert f"no checkpoint written at {step_name} 2: " in capsys.readouterr().err

    _truncate(step1 / "weights.safetensors")
    bad_file = step1 / "weights.safetensors"
    with pytest.raises(CheckpointError, match=f"the newest, {step1}, is corrupt: {bad_file}"):
        module.run(load_config(module.STAGE.config, None, [*args, "resume_from=latest"]))


# --- manifest and verification ------------------------------------------------------------------------


def test_manifest_lists_every_file_with_size_and_sha256(four_checkpoints):
    run_dir, _ = four_checkpoints
    checkpoint = run_dir / "checkpoints" / "step-000004"
    files = json.loads((checkpoint / MANIFEST).read_text())["files"]
    expected = {"weights.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json"}
    assert set(files) == expected
    for name, entry in files.items():
        data = (checkpoint / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert checkpoint_problem(checkpoint) is None


def test_an_altered_byte_of_the_same_size_is_found_by_its_sha256(four_checkpoints, tmp_path):
    run_dir = _copy_run(four_checkpoints[0], tmp_path / "run")
    state = run_dir / "checkpoints" / "step-000004" / "state.json"
    text = state.read_text()
    state.write_text(text.replace('"step": 4', '"step": 5'))  # same length
    assert "state.json does not match its sha256" in checkpoint_problem(state.parent)


def test_truncated_latest_falls_back_to_the_newest_intact_one_and_resumes_exactly(
    four_checkpoints, tmp_path, capsys
):
    """step-4's weights are cut in half: resume_from=latest warns naming step-4's file and step-3, resumes
    from step-3, redoes step 4 (re-writing an intact step-4) and ends with the uninterrupted run's weights."""
    run_dir = _copy_run(four_checkpoints[0], tmp_path / "run")
    checkpoints = run_dir / "checkpoints"
    _truncate(checkpoints / "step-000004" / "weights.safetensors")
    model = _train(run_dir, max_steps=4, save_every=1, keep_checkpoints=4, resume_from="latest")
    err = capsys.readouterr().err
    assert f"warning: checkpoint {checkpoints / 'step-000004'} is corrupt" in err
    assert f"{checkpoints / 'step-000004' / 'weights.safetensors'} has" in err
    assert f"resuming from {checkpoints / 'step-000003'} instead" in err
    for name, p in model.named_parameters():
        assert torch.equal(p, four_checkpoints[1][name]), name
    assert checkpoint_problem(checkpoints / "step-000004") is None


def test_every_checkpoint_corrupt_is_an_error_naming_the_newest_file(four_checkpoints, tmp_path):
    """Nothing intact to resume: a CheckpointError naming step-4's weights file; metrics.jsonl untouched."""
    run_dir = _copy_run(four_checkpoints[0], tmp_path / "run")
    for checkpoint in (run_dir / "checkpoints").iterdir():
        _truncate(checkpoint / "weights.safetensors")
    metrics = (run_dir / "metrics.jsonl").read_text()
    newest = run_dir / "checkpoints" / "step-000004" / "weights.safetensors"
    with pytest.raises(CheckpointError, match="no intact checkpoint") as info:
        _train(run_dir, max_steps=4, save_every=1, resume_from="latest")
    assert str(newest) in str(info.value) and "3 older ones too" in str(info.value)
    assert (run_dir / "metrics.jsonl").read_text() == metrics


def test_a_named_corrupt_checkpoint_is_an_error_not_a_fallback(four_checkpoints, tmp_path):
    run_dir = _copy_run(four_checkpoints[0], tmp_path / "run")
    named = run_dir / "checkpoints" / "step-000002"
    (named / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError) as info:
        _train(run_dir, max_steps=4, resume_from=str(named))
    missing = named / "optimizer.pt"
    assert str(info.value) == f"resume_from: checkpoint {named} is corrupt: {missing} is missing"


def test_a_checkpoint_without_manifest_is_accepted_with_a_note(four_checkpoints, tmp_path, capsys):
    """Written before checksums existed: resumed unverified, and exactly."""
    run_dir = _copy_run(four_checkpoints[0], tmp_path / "run")
    legacy = run_dir / "checkpoints" / "step-000003"
    (legacy / MANIFEST).unlink()
    model = _train(run_dir, max_steps=4, save_every=1, keep_checkpoints=4, resume_from=str(legacy))
    assert f"note: {legacy} was written before checkpoints carried checksums" in capsys.readouterr().err
    for name, p in model.named_parameters():
        assert torch.equal(p, four_checkpoints[1][name]), name


def test_pruning_keeps_the_checkpoint_just_written_over_newer_leftovers(tmp_path):
    """keep=1 after writing step-2 while a (corrupt, say) step-3 lingers from an earlier life of the run:
    step-1 goes, step-2 stays, step-3 is left alone (never counted against the one just written)."""
    for step in (1, 2, 3):
        directory = tmp_path / f"step-00000{step}"
        directory.mkdir()
        (directory / COMPLETE_MARKER).write_text("")
    prune_checkpoints(tmp_path, keep=1, written=tmp_path / "step-000002")
    assert _step_dirs(tmp_path) == ["step-000002", "step-000003"]


# --- two signals --------------------------------------------------------------------------------------


def test_two_sigterms_name_the_newest_intact_checkpoint_and_its_resume_command(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """`alignkit dpo` with save_every=2: the step-2 write gets a SIGTERM (the first: finish, save, stop) and
    the step-3 write it then starts gets a second one, which stops the run at once inside that write. Before,
    the CLI said "no checkpoint was written" with step-2 on disk; now it names step-2 and the resume command,
    and that command completes the run."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    out = tmp_path / "run"
    args = [
        "dpo",
        f"model={tiny_model_dir}",
        f"train_data={data}",
        f"output_dir={out}",
        "batch_size=2",
        "max_steps=5",
        "save_every=2",
        "progress=false",
        "tensorboard=false",
    ]
    monkeypatch.setenv("ALIGNKIT_TEST_SAVE_HOOK", "term")  # a SIGTERM inside every checkpoint write
    assert main(args) == 130
    err = capsys.readouterr().err
    step2 = out / "checkpoints" / "step-000002"
    assert f"training stopped at once by a second SIGTERM; checkpoint saved at {step2}\n" in err
    resume_line = next(line for line in err.splitlines() if line.startswith("resume with: alignkit "))
    assert resume_line.endswith(f"resume_from={step2}")
    assert not (out / "checkpoints" / "step-000003").exists()  # the interrupted write left no checkpoint

    monkeypatch.delenv("ALIGNKIT_TEST_SAVE_HOOK")
    assert main(resume_line.removeprefix("resume with: alignkit ").split()) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
