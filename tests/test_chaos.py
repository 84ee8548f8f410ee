"""Chaos: `alignkit dpo` on a tiny model is killed again and again, at seeded random points (SIGKILL and SIGTERM,
inside a checkpoint write included), and resumed each time with resume_from=latest. The final weights must equal
an uninterrupted run's bit for bit, and metrics.jsonl must hold every step exactly once.

The kills inside a write use the test hook of ``alignkit.training.checkpoint`` (ALIGNKIT_TEST_SAVE_HOOK): the
victim kills or signals itself, or waits, after writing the weights of a checkpoint and before its manifest and
COMPLETE marker. Every run gets the same settings, so nothing but the interruptions differs from the reference.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_stage_dpo import PAIRS

from alignkit.training.checkpoint import checkpoint_problem, latest_checkpoint

MAX_STEPS = 16  # two epochs of 8 steps (16 pairs, batches of 2): the resumes cross the epoch boundary too
SEED = int(os.environ.get("CHAOS_SEED", "15"))
EXIT_INTERRUPTED = 130

# The interruptions, in a seeded order:
#   kill-in-write  SIGKILL of itself inside the write of a seeded step's checkpoint (weights written, no marker)
#   term-twice     a SIGTERM inside a seeded step's write (finish, save, stop), then a second one inside the next
#                  write, which stops the run at once
#   sigkill        SIGKILL from outside, a seeded number of steps and a random delay into the run
#   sigterm        SIGTERM from outside, likewise: the run saves and stops with exit code 130
# (Each step of the last two waits 0.1 s inside its checkpoint write, so many of those kills land inside one.)
KINDS = ["kill-in-write", "term-twice", "sigkill", "sigterm"]


def _command(model: Path, data: Path, out: Path, resume: bool) -> list[str]:
    return [
        sys.executable,
        "-m",
        "alignkit",
        "dpo",
        f"model={model}",
        f"train_data={data}",
        f"output_dir={out}",
        "batch_size=2",
        f"max_steps={MAX_STEPS}",
        "learning_rate=5e-3",
        "save_every=1",
        "keep_checkpoints=2",
        "progress=false",
        "tensorboard=false",
        "num_threads=1",
        *(["resume_from=latest"] if resume else []),
    ]


def _start(model: Path, data: Path, out: Path, resume: bool, hook: str | None = None, at: int | None = None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGNKIT_TEST_SAVE_HOOK")}
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    if hook:
        env["ALIGNKIT_TEST_SAVE_HOOK"] = hook
    if at:
        env["ALIGNKIT_TEST_SAVE_HOOK_FROM"] = str(at)  # the first step whose checkpoint write it acts on
    return subprocess.Popen(
        _command(model, data, out, resume), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _steps_logged(out: Path) -> int:
    metrics = out / "metrics.jsonl"
    if not metrics.exists():
        return 0
    return sum(1 for line in metrics.read_text().splitlines() if line.endswith("}") and '"loss"' in line)


def _saved_step(out: Path) -> int:
    latest = latest_checkpoint(out / "checkpoints")
    return int(latest.name.split("-")[1]) if latest else 0


def _interrupt(kind: str, rng: random.Random, model: Path, data: Path, out: Path, first: bool) -> str:
    """Start a (resumed) run, interrupt it as ``kind`` says, and return its stdout + stderr."""
    start = _saved_step(out)
    if kind == "kill-in-write":
        proc = _start(model, data, out, not first, "kill", start + rng.randint(2, 3))
        expected = -signal.SIGKILL
    elif kind == "term-twice":
        proc = _start(model, data, out, not first, "term", start + rng.randint(1, 2))
        expected = EXIT_INTERRUPTED
    else:
        # Each step waits a little inside its checkpoint write, so the run is still going when the signal comes.
        proc = _start(model, data, out, not first, "sleep:0.1")
        logged_before, wait_for = _steps_logged(out), rng.randint(1, 2)
        deadline = time.monotonic() + 60
        while proc.poll() is None and _steps_logged(out) < logged_before + wait_for:
            assert time.monotonic() < deadline, "the victim logged no steps"
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.15))
        proc.send_signal(signal.SIGTERM if kind == "sigterm" else signal.SIGKILL)
        expected = EXIT_INTERRUPTED if kind == "sigterm" else -signal.SIGKILL
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == expected, f"{kind}: exit {proc.returncode}\n{stderr}"
    return stdout + stderr


@pytest.fixture
def pair_data(tmp_path) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    return path


def test_killed_and_resumed_again_and_again_equals_an_uninterrupted_run(tiny_model_dir, pair_data, tmp_path):
    """Four interruptions, one of each kind, in a seeded order, each resumed with resume_from=latest, then a
    run to the end: the final model equals the uninterrupted reference exactly (CPU, one thread, the same
    settings: every kernel is deterministic, so no tolerance is needed), each step is logged once with the
    reference's loss, every resume command printed names an intact checkpoint, and no checkpoint left on disk
    fails its manifest."""
    rng = random.Random(SEED)
    kinds = rng.sample(KINDS, len(KINDS))
    reference_out, out = tmp_path / "reference", tmp_path / "chaos"
    reference = _start(tiny_model_dir, pair_data, reference_out, resume=False)  # alongside the first victim

    for i, kind in enumerate(kinds):
        output = _interrupt(kind, rng, tiny_model_dir, pair_data, out, first=i == 0)
        if kind == "term-twice":
            assert "training stopped at once by a second SIGTERM" in output, output
        named_checkpoints = re.findall(r"^resume with: alignkit .* resume_from=(\S+)$", output, flags=re.MULTILINE)
        assert len(named_checkpoints) == (kind in ("term-twice", "sigterm")), output
        for named in named_checkpoints:
            assert checkpoint_problem(Path(named)) is None and (Path(named) / "COMPLETE").exists()
            assert Path(named) == latest_checkpoint(out / "checkpoints")
    assert 0 < _saved_step(out) < MAX_STEPS, "the interruptions should leave work to do"

    final = _start(tiny_model_dir, pair_data, out, resume=True)
    for proc in (final, reference):
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr

    expected = load_file(str(reference_out / "final" / "model.safetensors"))
    actual = load_file(str(out / "final" / "model.safetensors"))
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "event" not in r] == list(range(1, MAX_STEPS + 1))
    reference_rows = [json.loads(line) for line in (reference_out / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows if "event" not in r] == [r["loss"] for r in reference_rows]
    for checkpoint in (out / "checkpoints").glob("step-*"):
        if (checkpoint / "COMPLETE").exists():
            assert checkpoint_problem(checkpoint) is None, checkpoint
