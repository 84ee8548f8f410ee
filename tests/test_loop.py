"""Tests of the shared training loop: accumulation equals one big batch, exact resume (in process, after
SIGKILL, after SIGTERM), the LR schedule, non-finite step skipping, signals and checkpoint files."""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _loop_worker import EXIT_INTERRUPTED, make_examples, make_model, toy_collate, toy_config, toy_step
from safetensors.torch import load_file

from alignkit.config import ConfigError
from alignkit.errors import TrainingInterrupted
from alignkit.training import loop
from alignkit.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from alignkit.training.loop import StepOutput, train
from alignkit.training.run import RunDir
from alignkit.training.schedule import build_scheduler, lr_multiplier

WORKER = Path(__file__).resolve().parent / "_loop_worker.py"


def _train(tmp_path: Path, name: str, model=None, collate=toy_collate, step_fn=toy_step, **overrides):
    cfg = toy_config(str(tmp_path / name), **overrides)
    model = model if model is not None else make_model()
    run = RunDir.create(cfg.output_dir, "toy", cfg.resume_from)
    result = train(cfg, model, make_examples(), collate, step_fn, run)
    return model, run, result


def _rows(run: RunDir) -> list[dict]:
    return [json.loads(line) for line in run.metrics_path.read_text().splitlines()]


def _max_abs_diff(a, b) -> float:
    return max((pa - pb).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters()))


# --- accumulation -----------------------------------------------------------------------------------


def test_micro_batches_accumulate_to_one_big_batch(tmp_path):
    """batch_size=4 as 4 micro-batches of 1 equals one pass of 4, because each summed micro-batch loss is
    divided by the n_items (completion tokens) of the whole batch: sum_i nll_i / sum_i n_i.

    The completion lengths are uneven (1, 7, 2, 5, ...), so a mean of micro-batch means,
    (1/4) sum_i (nll_i / n_i), is a different loss; run through the same loop (n_items=1 per micro-batch and
    a per-micro-batch mean as its "sum") it lands ~2e-3 away (> 1e-4), so the 1e-6 tolerance can tell them apart.
    """
    # lr 1e-3: Adam's first steps are nearly lr * sign(g), which turns float rounding in gradients near 0
    # into weight differences of up to ~lr * 1e-4; this keeps those well under the tolerance.
    settings = dict(max_steps=2, learning_rate=1e-3)
    one_pass, _, _ = _train(tmp_path, "big", micro_batch_size=4, **settings)
    accumulated, _, _ = _train(tmp_path, "acc", micro_batch_size=1, **settings)
    assert _max_abs_diff(one_pass, accumulated) < 1e-6

    def mean_collate(examples):
        return {**toy_collate(examples), "n_items": len(examples)}

    def mean_step(model, batch):
        out = toy_step(model, batch)
        return StepOutput(out.loss_sum / batch["loss_mask"][:, 1:].sum(), {})

    mean_of_means, _, _ = _train(
        tmp_path, "mom", collate=mean_collate, step_fn=mean_step, micro_batch_size=1, **settings
    )
    assert _max_abs_diff(one_pass, mean_of_means) > 1e-4


# --- exact resume in process --------------------------------------------------------------------------


def test_resume_equals_uninterrupted_run(tmp_path):
    """6 steps straight vs. 3 steps (checkpoint at 3), a crash after step 4 was logged, and resume to 6:
    every parameter torch.equal, the same loss at every step, each step exactly once in metrics.jsonl.
    8 examples in batches of 4 make 2 steps per epoch, so the resume lands mid-epoch (step 3 = epoch 1,
    batch 1); attention dropout makes the result depend on the restored torch RNG."""
    common = dict(max_steps=6, save_every=3, keep_checkpoints=1)
    straight, straight_run, _ = _train(tmp_path, "straight", model=make_model(0.1), **common)

    def crash_after_step_4(step, row):
        if step == 4:
            raise RuntimeError("simulated crash")

    cfg = toy_config(str(tmp_path / "resumed"), report_to=["tensorboard"], **common)
    run = RunDir.create(cfg.output_dir, "toy", None, cfg=cfg)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, make_model(0.1), make_examples(), toy_collate, toy_step, run, on_log=crash_after_step_4)
    assert [r["step"] for r in _rows(run)] == [1, 2, 3, 4]  # step 4 was logged, not checkpointed
    run.release()  # the crashed run's lock on the folder, as its process would at exit

    cfg = toy_config(str(tmp_path / "resumed"), report_to=["tensorboard"], resume_from="latest", **common)
    run = RunDir.create(cfg.output_dir, "toy", cfg.resume_from, cfg=cfg)
    resumed = make_model(0.1)
    result = train(cfg, resumed, make_examples(), toy_collate, toy_step, run)

    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    assert result.steps == 6 and result.last_checkpoint == str(run.checkpoints_dir / "step-000006")
    assert [r["step"] for r in _rows(run)] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in _rows(run)] == [r["loss"] for r in _rows(straight_run)]
    assert [p.name for p in run.checkpoints_dir.iterdir()] == ["step-000006"]  # keep_checkpoints=1
    assert list((tmp_path / "resumed" / "tensorboard").glob("events.out.tfevents.*"))
    # The dropout really draws random numbers: two forward passes in train mode differ.
    ids = toy_collate(make_examples()[:2])["input_ids"]
    assert not torch.equal(resumed(input_ids=ids).logits, resumed(input_ids=ids).logits)


def test_evaluation_does_not_change_training(tmp_path):
    """eval_fn runs on forked RNG streams, so evaluating every step (and drawing random numbers while at it)
    leaves a dropout run bit-identical to one without evaluation; eval rows carry the same step."""

    def noisy_eval(model):
        assert not model.training and not torch.is_grad_enabled()
        return {"noise": torch.rand(()).item() + random.random() + np.random.rand()}

    plain, _, _ = _train(tmp_path, "plain", model=make_model(0.1), max_steps=2)
    cfg = toy_config(str(tmp_path / "evaluated"), max_steps=2, eval_every=1)
    run = RunDir.create(cfg.output_dir, "toy", None)
    evaluated = make_model(0.1)
    result = train(cfg, evaluated, make_examples(), toy_collate, toy_step, run, eval_fn=noisy_eval)
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), evaluated.parameters()))
    assert evaluated.training
    eval_steps = [r["step"] for r in _rows(run) if "eval/noise" in r]
    assert eval_steps == [1, 2]  # every step, the last one being the final evaluation
    assert "eval/noise" in result.metrics and result.metrics["step"] == 2


def test_run_dir_create_and_resume_locations(tmp_path):
    """{stage} and {time} are filled in; resuming from <run>/checkpoints/step-N reuses <run>; "latest" with a
    {time} template picks the newest run folder that has a complete checkpoint; a fresh run refuses a folder
    that already holds metrics; summary.json is written whole."""
    template = str(tmp_path / "{stage}-{time}")
    run = RunDir.create(template, "toy", None)
    assert re.fullmatch(r"toy-\d{8}-\d{6}", run.path.name) and run.path.is_dir()
    older, newer, unfinished = (tmp_path / f"toy-2024010{i}-000000" for i in (1, 2, 3))
    for path in (older, newer, unfinished):
        RunDir.create(str(path), "toy", None).release()  # marked as toy run folders
    for path in (older, newer):
        (path / "checkpoints" / "step-000004").mkdir(parents=True)
        (path / "checkpoints" / "step-000004" / "COMPLETE").write_text("")
    (unfinished / "checkpoints" / "step-000009").mkdir(parents=True)  # no COMPLETE marker
    with RunDir.create(template, "toy", "latest") as latest:
        assert latest.path == newer
    with RunDir.create(template, "toy", str(older / "checkpoints" / "step-000004")) as named:
        assert named.path == older
    RunDir(newer).log_metrics({"step": 1, "loss": 2.5})
    with pytest.raises(ConfigError, match="already holds a run"):
        RunDir.create(str(newer), "toy", None)
    run.write_summary({"steps": 3, "loss": math.inf})
    assert json.loads(run.summary_path.read_text()) == {"steps": 3, "loss": "inf"}
    # The tmp file was renamed away (beside the folder's marker and lock).
    assert sorted(p.name for p in run.path.iterdir()) == [".alignkit-lock", ".alignkit-run.json", "summary.json"]


# --- LR schedule --------------------------------------------------------------------------------------


def test_lr_schedule_values_by_hand():
    """W=2 warmup steps, T=6 steps. Warmup: step s uses (s+1)/(W+1) -> 1/3, 2/3. Then p = (s-2)/4:
    s=2,3,4,5 -> p=0, 1/4, 1/2, 3/4.  linear 1-p: 1, .75, .5, .25;  cosine (1+cos(pi p))/2:
    1, (1+0.70711)/2=0.85355, 0.5, (1-0.70711)/2=0.14645;  constant: 1 after warmup."""
    expected = {
        "constant": [1 / 3, 2 / 3, 1, 1, 1, 1],
        "linear": [1 / 3, 2 / 3, 1, 0.75, 0.5, 0.25],
        "cosine": [1 / 3, 2 / 3, 1, 0.853553, 0.5, 0.146447],
    }
    for kind, factors in expected.items():
        multiplier = lr_multiplier(kind, warmup_steps=2, total_steps=6)
        assert [multiplier(s) for s in range(6)] == pytest.approx(factors, abs=1e-6)
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        scheduler = build_scheduler(optimizer, kind, 2, 6)
        lrs = []
        for _ in range(6):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        assert lrs == pytest.approx([0.1 * f for f in factors], abs=1e-7)


def test_loop_logs_the_lr_each_step_used(tmp_path):
    """The cosine schedule above with peak 1e-2: the row of step k shows the LR of step k (s = k-1)."""
    _, run, _ = _train(tmp_path, "lr", max_steps=6)
    assert [r["lr"] for r in _rows(run)] == pytest.approx(
        [1e-2 * f for f in (1 / 3, 2 / 3, 1, 0.853553, 0.5, 0.146447)], abs=1e-8
    )


# --- non-finite steps -----------------------------------------------------------------------------------


def _poisoned_step(bad_calls: dict[int, str], snapshots: list):
    """toy_step, except call k in bad_calls returns a NaN loss ("loss") or a finite loss whose gradient is
    NaN ("grad": 0 * sqrt(x - x) is 0, its derivative 0 * inf = NaN). One micro-batch per step, so call k
    is step k; the weights at the start of each call are recorded."""
    calls = [0]

    def step_fn(model, batch):
        calls[0] += 1
        snapshots.append([p.detach().clone() for p in model.parameters()])
        out = toy_step(model, batch)
        weight = model.model.norm.weight
        if bad_calls.get(calls[0]) == "loss":
            return StepOutput(out.loss_sum * math.nan, out.metrics)
        if bad_calls.get(calls[0]) == "grad":
            return StepOutput(out.loss_sum + 0 * torch.sqrt(weight - weight).sum(), out.metrics)
        return out

    return step_fn


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    """Step 2 has a NaN loss and step 3 a NaN gradient: both leave the weights exactly as step 1 left them,
    are counted, and are logged as events; steps 1 and 4 train normally."""
    snapshots: list = []
    model, run, result = _train(
        tmp_path,
        "nan",
        step_fn=_poisoned_step({2: "loss", 3: "grad"}, snapshots),
        micro_batch_size=4,
        max_steps=4,
    )
    after_step = {k: snapshots[k] for k in range(1, 4)}  # snapshot at call k+1 = weights after step k
    assert all(torch.equal(a, b) for a, b in zip(after_step[1], after_step[2]))
    assert all(torch.equal(a, b) for a, b in zip(after_step[1], after_step[3]))
    assert not all(torch.equal(a, b) for a, b in zip(after_step[3], model.parameters()))  # step 4 trained
    assert result.n_nonfinite_skipped == 2 and result.steps == 4
    rows = _rows(run)
    events = [(r["step"], r["consecutive"]) for r in rows if r.get("event") == "nonfinite"]
    assert events == [(2, 1), (3, 2)]
    assert [r["step"] for r in rows if "event" not in r] == [1, 4]
    assert [r["loss"] for r in rows if r.get("event")][0] == "nan"  # strict JSON: NaN written as a string


def test_a_streak_of_nonfinite_steps_stops_at_the_last_good_checkpoint(tmp_path, monkeypatch):
    """With at most 1 consecutive non-finite step allowed, steps 2 and 3 both NaN stop the run after step 3,
    pointing at the step-1 checkpoint, and no checkpoint of the bad steps is written."""
    monkeypatch.setattr(loop, "MAX_CONSECUTIVE_NONFINITE", 1)
    with pytest.raises(TrainingInterrupted) as info:
        _train(
            tmp_path,
            "streak",
            step_fn=_poisoned_step({2: "loss", 3: "loss"}, []),
            micro_batch_size=4,
            max_steps=6,
            save_every=1,
        )
    checkpoints = tmp_path / "streak" / "checkpoints"
    assert info.value.checkpoint == str(checkpoints / "step-000001")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000001"]


# --- signals and checkpoints --------------------------------------------------------------------------


def test_sigint_checkpoints_then_raises_and_restores_handlers(tmp_path):
    """A SIGINT during step 2 finishes the step, writes checkpoint step-2 (save_every is off) and raises;
    the handlers installed by train() are gone afterwards."""
    previous = signal.getsignal(signal.SIGINT)

    def interrupt_at_2(step, row):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    cfg = toy_config(str(tmp_path / "sigint"), max_steps=6)
    run = RunDir.create(cfg.output_dir, "toy", None)
    with pytest.raises(TrainingInterrupted) as info:
        train(cfg, make_model(), make_examples(), toy_collate, toy_step, run, on_log=interrupt_at_2)
    assert info.value.checkpoint == str(run.checkpoints_dir / "step-000002")
    assert json.loads((run.checkpoints_dir / "step-000002" / "state.json").read_text())["step"] == 2
    assert signal.getsignal(signal.SIGINT) is previous


def test_checkpoint_keeps_tied_weights_tied_and_saves_only_trainable(tmp_path):
    """The tiny Llama ties lm_head to embed_tokens: saved once, and after loading into a model with other
    values both names are still one tensor holding the saved values. Frozen weights are not saved."""
    model = make_model()
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = build_scheduler(optimizer, "constant", 0, 1)
    path = save_checkpoint(tmp_path / "step-000001", model, optimizer, scheduler, {"step": 1})
    names = set(load_file(str(path / "weights.safetensors")))
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert "model.layers.0.mlp.up_proj.weight" not in names

    saved_embedding = model.model.embed_tokens.weight.detach().clone()
    other = make_model()
    other.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    with torch.no_grad():
        other.model.embed_tokens.weight.add_(1.0)
    other_optimizer = torch.optim.AdamW([p for p in other.parameters() if p.requires_grad])
    state = load_checkpoint(path, other, other_optimizer, build_scheduler(other_optimizer, "constant", 0, 1))
    assert state == {"step": 1}
    assert other.lm_head.weight is other.model.embed_tokens.weight
    assert torch.equal(other.lm_head.weight, saved_embedding)


# --- other processes: SIGKILL and SIGTERM -------------------------------------------------------------

MAX_STEPS = 8


def _worker(run_dir: Path, out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(run_dir), str(out), "--max-steps", str(MAX_STEPS), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_ok(proc: subprocess.Popen) -> str:
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    return stdout


def _checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[1])


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """Three 8-step worker processes started together (they mostly sleep, so this costs one start-up):
    an uninterrupted reference with save_every=2; a victim with save_every=2 SIGKILLed once checkpoint
    step-2 exists; and a victim without periodic checkpoints sent SIGTERM once 3 steps were logged.
    Each victim sleeps 0.3 s per step, so the signal lands mid-run."""
    tmp = tmp_path_factory.mktemp("processes")
    reference = _worker(tmp / "reference", tmp / "reference.pt", "--save-every", "2")
    killed = _worker(tmp / "killed", tmp / "unused.pt", "--save-every", "2", "--sleep", "0.3")
    terminated = _worker(tmp / "terminated", tmp / "unused.pt", "--sleep", "0.3")
    procs = [reference, killed, terminated]
    try:
        metrics = tmp / "terminated" / "metrics.jsonl"
        deadline = time.monotonic() + 120
        term_sent = False
        # Poll without blocking on either victim: waiting for one to exit could let the other run to its end.
        while killed.poll() is None or terminated.poll() is None:
            assert time.monotonic() < deadline, "timed out waiting for the workers"
            if killed.poll() is None and (tmp / "killed/checkpoints/step-000002/COMPLETE").exists():
                killed.kill()
            if not term_sent and metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                terminated.send_signal(signal.SIGTERM)
                term_sent = True
            time.sleep(0.01)
        killed.communicate()
        term_stdout, term_stderr = terminated.communicate()
        _wait_ok(reference)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    yield {
        "tmp": tmp,
        "reference": torch.load(tmp / "reference.pt", weights_only=True),
        "killed_rc": killed.returncode,
        "terminated_rc": terminated.returncode,
        "terminated_output": term_stdout + term_stderr,
    }


def _assert_same_weights(expected: dict, path: Path) -> None:
    actual = torch.load(path, weights_only=True)
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


def test_sigkill_then_resume_equals_uninterrupted(interrupted, tmp_path):
    """After SIGKILL (mid-run: its latest checkpoint is before step 8), a half-written tmp checkpoint and an
    unmarked step dir are ignored by "latest"; the resumed run ends with exactly the reference weights and
    every step once in metrics.jsonl (rows logged after the checkpoint by the killed run are dropped)."""
    run_dir = interrupted["tmp"] / "killed"
    assert interrupted["killed_rc"] == -signal.SIGKILL
    latest = latest_checkpoint(run_dir / "checkpoints")
    assert latest is not None and 2 <= _checkpoint_step(latest) < MAX_STEPS

    # Leftovers of a kill during a save: neither may be taken for a checkpoint.
    half_written = run_dir / "checkpoints" / "step-000099.tmp-999999"
    half_written.mkdir()
    (half_written / "weights.safetensors").write_bytes(b"\x00" * 10)
    unmarked = run_dir / "checkpoints" / "step-000098"
    unmarked.mkdir()
    (unmarked / "state.json").write_text("{}")
    assert RunDir(run_dir).latest_checkpoint() == latest

    _wait_ok(_worker(run_dir, tmp_path / "resumed.pt", "--save-every", "2", "--resume"))
    _assert_same_weights(interrupted["reference"], tmp_path / "resumed.pt")
    steps = [r["step"] for r in _rows(RunDir(run_dir)) if "event" not in r]
    assert steps == list(range(1, MAX_STEPS + 1))


def test_sigterm_checkpoints_and_resume_equals_uninterrupted(interrupted, tmp_path):
    """SIGTERM after step 3 was logged: the worker finishes its step, writes the only checkpoint (save_every
    is off) and exits with TrainingInterrupted; resuming from it reaches exactly the reference weights."""
    run_dir = interrupted["tmp"] / "terminated"
    output = interrupted["terminated_output"]
    assert interrupted["terminated_rc"] == EXIT_INTERRUPTED, output
    checkpoint = Path(output.split("INTERRUPTED ", 1)[1].split()[0])
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == [checkpoint.name]
    assert 3 <= _checkpoint_step(checkpoint) < MAX_STEPS

    _wait_ok(_worker(run_dir, tmp_path / "resumed.pt", "--resume"))
    _assert_same_weights(interrupted["reference"], tmp_path / "resumed.pt")
    steps = [r["step"] for r in _rows(RunDir(run_dir)) if "event" not in r]
    assert steps == list(range(1, MAX_STEPS + 1))


# --- failure monitors ---------------------------------------------------------------------------------


def test_monitors_see_each_row_log_events_and_can_stop(tmp_path):
    """A monitor that fires "stop" when the logged step reaches 2 ends a 6-step run after step 2, its event
    lands in metrics.jsonl after that step's row, and every row carries nonfinite_skipped = 0."""
    from alignkit.evaluation.monitors import Event, MonitorSet

    class StopAtTwo:
        name, action = "stop_at_two", "stop"
        keys = ()

        def update(self, step, row):
            return Event(step, self.name, "test", self.action, {}) if step >= 2 else None

    monitors = MonitorSet([StopAtTwo()], cooldown=1)
    cfg = toy_config(str(tmp_path / "mon"), max_steps=6)
    run = RunDir.create(cfg.output_dir, "toy", None)
    result = train(cfg, make_model(), make_examples(), toy_collate, toy_step, run, monitors=monitors)
    rows = _rows(run)
    assert result.steps == 2
    assert [r.get("event") for r in rows] == [None, None, "stop_at_two"]
    assert [r["nonfinite_skipped"] for r in rows if "loss" in r] == [0, 0]
    assert len(monitors.events) == 1
