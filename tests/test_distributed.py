"""Data parallel training: 2 CPU processes (torchrun, gloo) against 1 process on the same global batch.

Each launched test runs a real `alignkit <stage>` in 2 processes and the same command in this process, on a
tiny model, and compares the final weights. Tolerance: atol 1e-6 after one step, 1e-5 after three (KTO), rtol
0. A step moves the weights by ~learning_rate (1e-3 to 5e-3: Adam's first steps are nearly lr * sign(g)), so
the tolerance is >= 100x smaller than a step; what remains is float32 summation order (gradients summed over
ranks, batches padded to other widths), measured at 4e-9 (SFT) and 9e-9 (DPO) after one step, 2.4e-8 after
the 3-step resume and 1.5e-6 after three KTO steps at lr 5e-3. The data give uneven shares (batch_size 5
over 2 ranks with micro-batches of 2: one rank gets 3 examples and a stand-in, the other 2), so normalising
per rank (a mean of per-rank means) would give other gradients.

PPO (its own loop) is checked the same way over 2 iterations of 2 PPO epochs (8 optimizer steps at lr 3e-3,
which move the weights by 2.3e-2 (full fine-tuning) and 8.8e-2 (LoRA, merged)): the samples are identical and
the weights agree to atol 1e-5, measured 4.5e-8 (LoRA) and 1.8e-7 (full; 1e-2 would leave 4.4e-6, Adam
magnifying the rounding of near-zero gradients). Its minibatches of 3 rows over 2 ranks give shares of 2 and 1
rows (the second micro-step of rank 1 is a stand-in), so a mean of per-rank token means weights rank 1's row
twice: that (DDP's plain averaging of per-rank losses) lands 3e-2 away and changes iteration 2's samples.

Online DPO (its own loop too) is checked over 2 rounds of 2 DPO epochs at lr 3e-3 (up to 6 optimizer steps, which
move the weights by 7.2e-2 (LoRA, merged) and 2.4e-2 (full fine-tuning)): the samples are identical and the
weights agree to atol 1e-5, measured 9.7e-8 (LoRA) and 1.2e-7 (full, resumed in 1 process). Its minibatches of 3
pairs over 2 ranks give shares of 2 and 1 pairs (the second micro-step of rank 1 is a stand-in); a mean of
per-rank pair means lands 5.3e-2 away and changes round 2's samples. Rounds with 1 pair and with none agree
exactly (the one pair runs on rank 0, as in one process).

FSDP (`accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2`, alignkit sharding with
torch's FSDP2 on gloo) is checked the same way. A sharded model computes its log-probs from full logits (the
chunked head would read a sharded weight), one process through the chunked head: the two agree to ~1e-7 in a
log-prob, and after one step to 7.8e-8 (SFT) and 4.9e-6 (DPO). DPO's 4.9e-6 sits in the tied embedding/LM
head, on vocabulary rows whose gradients are ~1e-9, the size of Adam's eps, where Adam turns a tiny change of
the gradient into a visible change of the step; every other tensor agrees within 6e-8, and one process forced
onto the full-logits path gave the 2-process FSDP weights bit for bit (measured while writing this). Hence
atol 1e-5 for that step's weights and 1e-6 for all but the embedding.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import alignkit
from alignkit.cli import main
from alignkit.config import ConfigError, load_config
from alignkit.models.generation import (
    SamplingConfig,
    check_generation_backend,
    generate,
    generate_share,
)
from alignkit.models.loading import load_model
from alignkit.models.reward import build_reward_model
from alignkit.stages import build_prefs, cai_revise, online_dpo, ppo
from alignkit.stages import eval as eval_stage
from alignkit.training import distributed
from alignkit.training.distributed import rank_microbatches, rank_share
from alignkit.training.online import iteration_prompts, note_idle_processes

SRC = Path(alignkit.__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent  # for the launched processes: rewards in _ppo_rewards
# One SFT step on a global batch of 5 in micro-batches of 2 (uneven shares over 2 ranks).
SFT_STEP_ARGS = [
    "batch_size=5",
    "micro_batch_size=2",
    "max_steps=1",
    "learning_rate=1e-3",
    "measure_train_loss=false",
]
FSDP_CONFIG = SRC.parent / "configs" / "accelerate" / "fsdp.yaml"

SFT_ROWS = [  # completions of very different lengths, so the token normaliser matters
    {"prompt": "what is the capital of france?", "completion": "paris."},
    {
        "prompt": "please write a short poem",
        "completion": "the sea and the sky and the quick brown fox jumps.",
    },
    {"prompt": "the quick brown fox", "completion": "jumps."},
    {"prompt": "i need help", "completion": "here is a helpful and harmless answer to your question"},
    {"prompt": "hello", "completion": "i am sorry, but i cannot help with that request."},
    {"prompt": "user", "completion": "0 1 2 3 4 5 6 7 8 9"},
    {"prompt": "assistant system human", "completion": "?"},
]
PAIRS = [
    {"prompt": "what is the capital of france?", "chosen": "paris.", "rejected": "i cannot help."},
    {"prompt": "please write a short poem", "chosen": "the sea and the sky.", "rejected": "no."},
    {"prompt": "the quick brown fox", "chosen": "jumps over the lazy dog.", "rejected": "0 1 2 3"},
    {"prompt": "i need help", "chosen": "here is a helpful answer.", "rejected": "i am sorry."},
    {"prompt": "hello", "chosen": "the capital of france is paris.", "rejected": "!"},
    {"prompt": "user", "chosen": "here is a short poem about the sea", "rejected": "0"},
]
PROMPTS = [
    {"prompt": "what is the capital of france?"},
    {"prompt": "please write a short poem"},
    {"prompt": "the quick brown fox"},
    {"prompt": "i need help"},
    {"prompt": "hello"},
]
UNPAIRED = [
    {"prompt": "what is the capital of france?", "completion": "paris.", "label": True},
    {"prompt": "please write a short poem", "completion": "the sea and the sky.", "label": True},
    {"prompt": "the quick brown fox", "completion": "jumps over the lazy dog.", "label": True},
    {"prompt": "i need help", "completion": "here is a helpful answer.", "label": True},
    {"prompt": "i need help", "completion": "i cannot help.", "label": False},
    {"prompt": "the quick brown fox", "completion": "0 1 2 3", "label": False},
    {"prompt": "hello", "completion": "i am sorry, but i cannot help with that request.", "label": False},
    {"prompt": "please write a short poem", "completion": "no.", "label": False},
]


def _write(tmp_path: Path, name: str, rows: list[dict]) -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(stage: str, args: list[str], nproc: int = 2, fsdp: bool = False) -> str:
    """`alignkit <stage> args` in ``nproc`` CPU processes under torchrun (gloo), one torch thread each; with
    ``fsdp``, under `accelerate launch` with configs/accelerate/fsdp.yaml, as a user would run it. Returns what
    they printed (stdout and stderr)."""
    return _launch_program(["-m", "alignkit", stage, *args, "num_threads=1"], nproc, fsdp)


def _launch_program(program: list[str], nproc: int = 2, fsdp: bool = False) -> str:
    """``program`` (``-m module args`` or ``script args``) in ``nproc`` CPU processes, as ``_launch``."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(SRC), str(TESTS), os.environ.get("PYTHONPATH")) if p),
    }
    if fsdp:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG)]
        command += ["--num_processes", str(nproc), "--main_process_port", str(_free_port())]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
        command += ["--master_port", str(_free_port())]
    command += program
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers
        output, _ = proc.communicate()
        pytest.fail(f"{nproc}-process {' '.join(program)} timed out:\n{output[-4000:]}")
    assert proc.returncode == 0, output[-4000:]
    return output


def _common(model: Path, data: Path, out: Path) -> list[str]:
    return [
        f"model={model}",
        f"train_data={data}",
        f"output_dir={out}",
        "lr_scheduler=constant",
        "progress=false",
        "tensorboard=false",
        "dtype=float32",  # the comparisons are made at fp32 resolution, on any CPU (bf16: tests/test_precision.py)
        # One thread in every process: the launched ranks and the one-process run then sum in the same order
        # (torchrun gives each rank one thread, pytest's process has every core; on a loaded machine the
        # online-dpo comparison drifted past 1e-6 that way).
        "num_threads=1",
    ]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_weights(two: Path, one: Path, start_dir: Path, atol: float = 1e-6) -> None:
    a, b = _weights(two), _weights(one)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)
    # The comparison means something: training moved the weights by far more than the tolerance.
    start = load_file(str(start_dir / "model.safetensors"))
    assert max((b[k] - start[k]).abs().max().item() for k in b) > 100 * atol


def _assert_same_run(run: Path, reference: Path, model_dir: Path, logged: tuple[str, ...]) -> list[dict]:
    """``run`` (a ppo or online-dpo run folder) sampled, logged and trained as ``reference``: the same
    samples.jsonl, steps and ``logged`` numbers (rel 1e-4) and final weights (atol 1e-5). Returns its rows."""
    assert _samples(run) == _samples(reference)
    _assert_same_weights(run, reference, model_dir, atol=1e-5)
    rows, reference_rows = _rows(run), _rows(reference)
    assert [r["step"] for r in rows] == [r["step"] for r in reference_rows]
    for key in logged:
        assert [r[key] for r in rows] == pytest.approx(
            [r[key] for r in reference_rows], rel=1e-4, abs=1e-6
        ), key
    return rows


def _assert_same_checkpoint(run: Path, reference: Path, step: int) -> dict[str, torch.Tensor]:
    """PPO checkpoint ``step`` of ``run`` holds ``reference``'s tensors (atol 1e-5), the value head among them."""
    checkpoint = Path("checkpoints", f"step-{step:06d}", "weights.safetensors")
    a, b = load_file(str(run / checkpoint)), load_file(str(reference / checkpoint))
    assert a.keys() == b.keys() and "value.head.weight" in a
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=0, msg=name)
    return a


def _without_last_checkpoint(run: Path, tmp_path: Path) -> Path:
    """A copy of the finished 2-checkpoint ``run`` as if stopped after its first checkpoint (step 2 and final/
    gone), to resume."""
    copy = tmp_path / f"{run.name}-stopped"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / "step-000002")
    shutil.rmtree(copy / "final")
    return copy


# --- launched: 2 processes against 1 ----------------------------------------------------------------------


def test_sft_step_in_two_processes_equals_one(tiny_model_dir, tmp_path):
    """One SFT step on a global batch of 5 (micro-batches of 2): the completion-token NLL summed by both
    ranks, divided by the whole batch's completion tokens, gives one process's weights, loss and gradient
    norm; the main process alone writes the run folder (each step once in metrics.jsonl)."""
    data = _write(tmp_path, "sft.jsonl", SFT_ROWS)
    args = SFT_STEP_ARGS
    _launch("sft", [*_common(tiny_model_dir, data, tmp_path / "two"), *args])
    assert main(["sft", *_common(tiny_model_dir, data, tmp_path / "one"), *args]) == 0

    _assert_same_weights(tmp_path / "two", tmp_path / "one", tiny_model_dir)
    (two,), (one,) = _rows(tmp_path / "two"), _rows(tmp_path / "one")
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["steps"] == 1


def test_dpo_step_in_two_processes_equals_one(tiny_model_dir, tmp_path):
    """One DPO step (reference log-probs precomputed by each rank) on a global batch of 5 pairs: the same
    weights as one process. The loss is ln 2 in both (policy = reference before the update)."""
    data = _write(tmp_path, "pairs.jsonl", PAIRS)
    args = ["batch_size=5", "micro_batch_size=2", "max_steps=1", "learning_rate=1e-3"]
    _launch("dpo", [*_common(tiny_model_dir, data, tmp_path / "two"), *args])
    assert main(["dpo", *_common(tiny_model_dir, data, tmp_path / "one"), *args]) == 0

    _assert_same_weights(tmp_path / "two", tmp_path / "one", tiny_model_dir)
    (two,), (one,) = _rows(tmp_path / "two"), _rows(tmp_path / "one")
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert two["rewards/accuracy"] == one["rewards/accuracy"]


def test_kto_reference_point_is_gathered_across_processes(tiny_model_dir, tmp_path):
    """KTO's z0 is a mean over a micro-step's mismatched pairs. With 2 ranks of micro-batches of 2 each
    micro-step holds 4 examples, the micro-batch of 4 of one process: summing the KL log-ratios and their count
    over the ranks gives that process's z0, hence its weights, losses and kl over 3 steps (8 examples per
    step), to 1.5e-6. Each rank's own z0 (one process with micro-batches of 2) lands 4e-3 away. z0 leaves 0
    after the first update, so the gathered path is used."""
    data = _write(tmp_path, "unpaired.jsonl", UNPAIRED)
    args = ["batch_size=8", "max_steps=3", "learning_rate=5e-3"]
    _launch("kto", [*_common(tiny_model_dir, data, tmp_path / "two"), *args, "micro_batch_size=2"])
    assert main(["kto", *_common(tiny_model_dir, data, tmp_path / "one"), *args, "micro_batch_size=4"]) == 0

    _assert_same_weights(tmp_path / "two", tmp_path / "one", tiny_model_dir, atol=1e-5)
    two, one = _rows(tmp_path / "two"), _rows(tmp_path / "one")
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-5)
    assert [r["kl"] for r in two] == pytest.approx([r["kl"] for r in one], rel=1e-4, abs=1e-7)
    assert max(r["kl"] for r in one) > 1e-4


def test_checkpoint_of_two_processes_resumes_in_one(tiny_model_dir, tmp_path):
    """2 processes train SFT for 2 steps (one epoch of 5 examples in batches of 3; the end-of-run checkpoint
    at step 2); one process resumes that folder to step 3. The result equals 3 uninterrupted steps in one
    process, and every step is logged once. The checkpoint holds nothing per process: weights, AdamW state,
    schedule, RNG and the global step."""
    data = _write(tmp_path, "sft.jsonl", SFT_ROWS[:5])
    args = ["batch_size=3", "micro_batch_size=1", "learning_rate=1e-3", "measure_train_loss=false"]
    _launch("sft", [*_common(tiny_model_dir, data, tmp_path / "resumed"), *args, "max_steps=2"])
    assert (tmp_path / "resumed" / "checkpoints" / "step-000002" / "COMPLETE").is_file()
    resumed = [
        *_common(tiny_model_dir, data, tmp_path / "resumed"),
        *args,
        "max_steps=3",
        "resume_from=latest",
    ]
    assert main(["sft", *resumed]) == 0
    assert main(["sft", *_common(tiny_model_dir, data, tmp_path / "straight"), *args, "max_steps=3"]) == 0

    _assert_same_weights(tmp_path / "resumed", tmp_path / "straight", tiny_model_dir)
    resumed_rows, straight_rows = _rows(tmp_path / "resumed"), _rows(tmp_path / "straight")
    assert [r["step"] for r in resumed_rows] == [1, 2, 3]
    assert [r["loss"] for r in resumed_rows] == pytest.approx([r["loss"] for r in straight_rows], rel=1e-5)


# --- launched: FSDP in 2 processes against 1 ----------------------------------------------------------------


def test_fsdp_sft_step_in_two_processes_equals_one(tiny_model_dir, tmp_path):
    """One SFT step as in the data-parallel test, sharded by FSDP2 over 2 processes: one process's weights
    (atol 1e-6, measured 7.8e-8), loss and gradient norm. The loop logs params/rank_share, the largest share of
    the parameters' elements a rank holds while training: half (each rank keeps its half of every weight, the
    tied embedding/LM head once), where data parallel holds all of them. The sharded run also recomputes its
    layers in the backward (gradient_checkpointing=true: FSDP gathers each layer's shards again for it)."""
    data = _write(tmp_path, "sft.jsonl", SFT_ROWS)
    args = SFT_STEP_ARGS
    sharded = [*_common(tiny_model_dir, data, tmp_path / "two"), *args, "gradient_checkpointing=true"]
    _launch("sft", sharded, fsdp=True)
    assert main(["sft", *_common(tiny_model_dir, data, tmp_path / "one"), *args]) == 0

    _assert_same_weights(tmp_path / "two", tmp_path / "one", tiny_model_dir)
    (two,), (one,) = _rows(tmp_path / "two"), _rows(tmp_path / "one")
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
    assert two["params/rank_share"] == pytest.approx(0.5, abs=0.01)
    assert "params/rank_share" not in one
    # The model state the summary reports is the main process's shard: about half of one process's.
    shard, whole = (json.loads((tmp_path / d / "summary.json").read_text())["model_state_bytes"] for d in ("two", "one"))
    assert 0.4 < shard / whole < 0.6


def test_fsdp_dpo_step_in_two_processes_equals_one(tiny_model_dir, tmp_path):
    """One DPO step sharded by FSDP2 over 2 processes, its reference log-probs precomputed on the shards (every
    rank runs every batch, so their forwards, each a collective, stay paired): one process's weights, within
    1e-6 for every tensor but the tied embedding, 1e-5 for that (measured 4.9e-6; see the module docstring).
    The loss is ln 2 in both (policy = reference before the update)."""
    data = _write(tmp_path, "pairs.jsonl", PAIRS)
    args = ["batch_size=5", "micro_batch_size=2", "max_steps=1", "learning_rate=1e-3"]
    _launch("dpo", [*_common(tiny_model_dir, data, tmp_path / "two"), *args], fsdp=True)
    assert main(["dpo", *_common(tiny_model_dir, data, tmp_path / "one"), *args]) == 0

    _assert_same_weights(tmp_path / "two", tmp_path / "one", tiny_model_dir, atol=1e-5)
    a, b = _weights(tmp_path / "two"), _weights(tmp_path / "one")
    for name in a.keys() - {"model.embed_tokens.weight"}:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0, msg=name)
    (two,), (one,) = _rows(tmp_path / "two"), _rows(tmp_path / "one")
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert two["params/rank_share"] == pytest.approx(0.5, abs=0.01)


def test_fsdp_reward_model_steps_in_two_processes_equal_one(tiny_model_dir, tiny_tokenizer, tmp_path):
    """Two RM steps and the evaluation after them, sharded by FSDP2 over 2 processes: the reward pass runs the
    sharded model's whole forward and takes the score head's output at every position from the way through
    (the head's weight is a shard outside it). One process's weights (atol 1e-6, measured 1.2e-8) and
    evaluation. The model starts from a saved head: the one transformers initialises at load differs from
    run to run."""
    start = tmp_path / "start"
    torch.manual_seed(0)
    build_reward_model(str(tiny_model_dir), tiny_tokenizer.pad_token_id, "float32").save_pretrained(start)
    tiny_tokenizer.save_pretrained(start)
    data = _write(tmp_path, "pairs.jsonl", PAIRS)
    args = ["batch_size=5", "micro_batch_size=2", "max_steps=2", "learning_rate=1e-3", f"eval_data={data}"]
    _launch("rm", [*_common(start, data, tmp_path / "two"), *args], fsdp=True)
    assert main(["rm", *_common(start, data, tmp_path / "one"), *args]) == 0

    _assert_same_weights(tmp_path / "two", tmp_path / "one", start)
    two, one = _rows(tmp_path / "two"), _rows(tmp_path / "one")
    assert [r["loss"] for r in two if "loss" in r] == pytest.approx([r["loss"] for r in one if "loss" in r])
    assert two[-1]["eval/loss"] == pytest.approx(one[-1]["eval/loss"], rel=1e-6)


def test_fsdp_kto_steps_in_two_processes_equal_one(tiny_model_dir, tmp_path):
    """Three KTO steps sharded by FSDP2 over 2 processes, as in the data-parallel KTO test (z0 gathered over the
    ranks; 2 ranks of micro-batches of 2 against 1 process of micro-batches of 4). Each step runs the sharded
    model twice, with and without gradients, so FSDP sees a forward with no backward inside every step. One
    process's weights (atol 1e-5, measured 4.5e-6) and losses."""
    data = _write(tmp_path, "unpaired.jsonl", UNPAIRED)
    args = ["batch_size=8", "max_steps=3", "learning_rate=5e-3"]
    _launch("kto", [*_common(tiny_model_dir, data, tmp_path / "two"), *args, "micro_batch_size=2"], fsdp=True)
    assert main(["kto", *_common(tiny_model_dir, data, tmp_path / "one"), *args, "micro_batch_size=4"]) == 0

    _assert_same_weights(tmp_path / "two", tmp_path / "one", tiny_model_dir, atol=1e-5)
    two, one = _rows(tmp_path / "two"), _rows(tmp_path / "one")
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-5)
    assert [r["params/rank_share"] for r in two] == pytest.approx([0.5] * 3, abs=0.01)


def test_fsdp_load_reads_the_weights_in_the_main_process_only_and_generation_gathers_them(
    tiny_model_dir, tmp_path
):
    """Under FSDP the main process reads the model into CPU memory and the other rank builds it without weights
    (meta device); after sharding, every rank's model is the model on disk: each weight gathered whole, every
    buffer (the rotary tables are in no state dict) and the logits of a forward pass. Inside whole_weights each
    rank generates as many tokens as it likes, as the whole model would, and the shards work again after."""
    worker = Path(__file__).resolve().parent / "_fsdp_load_worker.py"
    _launch_program([str(worker), str(tiny_model_dir), str(tmp_path)], fsdp=True)
    main_rank, other = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (main_rank["load_on"], other["load_on"]) == ("cpu", "meta")
    assert main_rank["weight_bytes_before_shard"] > 0 and main_rank["meta_parameters_before_shard"] == 0
    assert other["weight_bytes_before_shard"] == 0
    assert other["meta_parameters_before_shard"] == other["parameters"] > 0
    for rank in (main_rank, other):
        assert rank["max_weight_difference"] == 0.0
        assert rank["n_buffers"] > 0 and rank["max_buffer_difference"] == 0.0
        assert rank["logits_difference"] < 1e-5
        assert rank["rank_share"] == pytest.approx(0.5, abs=0.01)
        assert rank["generated_as_whole_model"]
        assert rank["logits_difference_after_generation"] < 1e-5
    assert (main_rank["new_tokens"], other["new_tokens"]) == (3, 7)  # no rank waited for the other's forwards


def test_fsdp_checkpoint_resumes_in_another_number_of_processes(tiny_model_dir, tmp_path):
    """FSDP checkpoints hold the gathered, unsharded state in one process's layout. 2 FSDP processes train SFT
    for 2 steps, 1 process resumes to step 3; 1 process trains 2 steps, 2 FSDP processes resume to step 3. Both
    end with the weights (atol 1e-6; measured 1.9e-7 and 3.7e-9) and losses of 3 uninterrupted steps in one
    process. Without the AdamW state (moments and step counts) the third step would move ~lr = 1e-3 apart."""
    data = _write(tmp_path, "sft.jsonl", SFT_ROWS[:5])
    args = ["batch_size=3", "micro_batch_size=1", "learning_rate=1e-3", "measure_train_loss=false"]

    def run(out: str, *extra: str) -> list[str]:
        return [*_common(tiny_model_dir, data, tmp_path / out), *args, *extra]

    _launch("sft", run("two_then_one", "max_steps=2"), fsdp=True)
    assert (tmp_path / "two_then_one" / "checkpoints" / "step-000002" / "COMPLETE").is_file()
    assert main(["sft", *run("two_then_one", "max_steps=3", "resume_from=latest")]) == 0
    assert main(["sft", *run("one_then_two", "max_steps=2")]) == 0
    _launch("sft", run("one_then_two", "max_steps=3", "resume_from=latest"), fsdp=True)
    assert main(["sft", *run("straight", "max_steps=3")]) == 0

    straight_losses = [r["loss"] for r in _rows(tmp_path / "straight")]
    for resumed in ("two_then_one", "one_then_two"):
        _assert_same_weights(tmp_path / resumed, tmp_path / "straight", tiny_model_dir)
        rows = _rows(tmp_path / resumed)
        assert [r["step"] for r in rows] == [1, 2, 3]
        assert [r["loss"] for r in rows] == pytest.approx(straight_losses, rel=1e-5)


def _ppo_args(model: Path, prompts: Path, out: Path, *extra: str) -> list[str]:
    """5 prompts per iteration, generated in batches of 2 (rank 0 samples batches 0 and 2, rank 1 batch 1),
    minibatches of 3 and 2 rows in micro-batches of 1; whitened rewards and a beta that moves, so every global
    statistic is used."""
    return [
        *_common(model, prompts, out),
        "reward=alignkit.scoring.rewards:length",
        "prompts_per_iteration=5",
        "generation_batch_size=2",
        "minibatch_size=3",
        "micro_batch_size=1",
        "max_new_tokens=6",
        "learning_rate=3e-3",
        "whiten_rewards=true",
        "kl_target=0.01",
        "kl_horizon=4",
        *extra,
    ]


def _samples(run: Path) -> str:
    return (run / "samples.jsonl").read_text()


PPO_LOGGED = ("score/mean", "kl", "beta", "policy_loss", "value_loss", "explained_variance", "grad_norm")


def test_ppo_in_two_processes_equals_one(tiny_model_dir, tmp_path):
    """Two PPO iterations with LoRA (policy and value adapters on one base, both trained through one DDP
    module) in 2 processes and in 1: the same samples (each generation batch is sampled by one rank from its own
    seed), the same whitened advantages and beta (every rank holds the gathered batch) and, with each rank's
    loss divided by the whole minibatch's tokens, the same policy, value adapter and head (atol 1e-5; see the
    module docstring) and logged numbers. The main process alone writes: each iteration once."""
    data = _write(tmp_path, "prompts.jsonl", PROMPTS)
    args = ["iterations=2", "lora=true", "lora_r=4"]
    _launch("ppo", _ppo_args(tiny_model_dir, data, tmp_path / "two", *args))
    assert main(["ppo", *_ppo_args(tiny_model_dir, data, tmp_path / "one", *args)]) == 0

    two = _assert_same_run(tmp_path / "two", tmp_path / "one", tiny_model_dir, PPO_LOGGED)
    weights = _assert_same_checkpoint(tmp_path / "two", tmp_path / "one", 2)
    assert any(".value." in k for k in weights)  # the value adapter, trained and checkpointed
    assert [r["step"] for r in two] == [1, 2]
    assert two[1]["beta"] != two[0]["beta"] and two[1]["kl"] > 1e-3


GRPO_LOGGED = ("score/mean", "kl", "zero_std_frac", "loss", "clip_frac/low", "clip_frac/high", "entropy", "grad_norm")


def test_grpo_in_two_processes_equals_one(tiny_model_dir, tmp_path):
    """Two GRPO iterations (3 prompts x 2 samples, generated in batches of 2: rank 0 samples batches 0 and 2,
    rank 1 batch 1), beta > 0 (a frozen reference), two passes over minibatches of 4 and 2 responses in
    micro-batches of 1: each rank's loss divided by the whole minibatch's tokens, so the 2-process run samples,
    logs and trains as the 1-process run (atol 1e-5)."""
    data = _write(tmp_path, "prompts.jsonl", PROMPTS)
    args = ["reward=alignkit.scoring.rewards:length", "iterations=2", "prompts_per_iteration=3"]
    args += ["num_generations=2", "generation_batch_size=2", "minibatch_size=4", "micro_batch_size=1"]
    args += ["max_new_tokens=6", "learning_rate=3e-3", "beta=0.04", "num_iterations=2", "epsilon_high=0.28"]
    _launch("grpo", [*_common(tiny_model_dir, data, tmp_path / "two"), *args])
    assert main(["grpo", *_common(tiny_model_dir, data, tmp_path / "one"), *args]) == 0
    rows = _assert_same_run(tmp_path / "two", tmp_path / "one", tiny_model_dir, GRPO_LOGGED)
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["kl"] > 1e-4


def test_fsdp_grpo_in_two_processes_equals_one(tiny_model_dir, tmp_path):
    """GRPO with full fine-tuning under FSDP in 2 processes, as the 2-process DDP test above: policy and
    reference each sharded (half of every weight per rank), generation on the policy's weights gathered whole,
    the no-grad passes on the shards (rank 0: 4 of the 6 rows in micro-batches of 1, rank 1: 2 and stand-ins),
    two passes over minibatches of 4 and 2 responses. It samples, logs and trains as one plain process
    (atol 1e-5)."""
    data = _write(tmp_path, "prompts.jsonl", PROMPTS)
    args = ["reward=alignkit.scoring.rewards:length", "iterations=2", "prompts_per_iteration=3"]
    args += ["num_generations=2", "generation_batch_size=2", "minibatch_size=4", "micro_batch_size=1"]
    args += ["max_new_tokens=6", "learning_rate=3e-3", "beta=0.04", "num_iterations=2", "epsilon_high=0.28"]
    output = _launch("grpo", [*_common(tiny_model_dir, data, tmp_path / "fsdp"), *args], fsdp=True)
    assert output.count('"stage": "grpo"') == 1  # the summary, printed by the main process alone
    assert main(["grpo", *_common(tiny_model_dir, data, tmp_path / "one"), *args]) == 0
    rows = _assert_same_run(tmp_path / "fsdp", tmp_path / "one", tiny_model_dir, GRPO_LOGGED)
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["kl"] > 1e-4
    summary = json.loads((tmp_path / "fsdp" / "summary.json").read_text())
    assert summary["params_rank_share"] == pytest.approx(0.5, abs=0.01)  # sharded, not data parallel
    assert summary["reference"] == "frozen copy"


def test_ppo_checkpoint_of_two_processes_resumes_in_one(tiny_model_dir, tmp_path):
    """Full fine-tuning (separate reference and value copies): 2 processes run iteration 1 and checkpoint;
    1 process resumes the folder for iteration 2. Samples, weights (atol 1e-5) and logs equal 2 uninterrupted
    iterations in 1 process: the checkpoint (policy, value model, AdamW, schedule, KL controller, iteration)
    holds nothing per process."""
    data = _write(tmp_path, "prompts.jsonl", PROMPTS)
    _launch("ppo", _ppo_args(tiny_model_dir, data, tmp_path / "resumed", "iterations=1"))
    assert (tmp_path / "resumed" / "checkpoints" / "step-000001" / "COMPLETE").is_file()
    resumed = _ppo_args(tiny_model_dir, data, tmp_path / "resumed", "iterations=2", "resume_from=latest")
    assert main(["ppo", *resumed]) == 0
    assert main(["ppo", *_ppo_args(tiny_model_dir, data, tmp_path / "straight", "iterations=2")]) == 0

    rows = _assert_same_run(tmp_path / "resumed", tmp_path / "straight", tiny_model_dir, PPO_LOGGED)
    assert [r["step"] for r in rows] == [1, 2]


def test_fsdp_ppo_in_two_processes_equals_one_and_resumes_in_one(tiny_model_dir, tmp_path):
    """PPO with full fine-tuning under FSDP in 2 processes: policy, reference and value model each sharded
    (half of every weight per rank), generation on the policy's weights gathered whole, the rollout's forward
    passes on the shards with stand-ins where a rank has fewer micro-batches. Two iterations give one plain
    process's samples, logged numbers and weights (atol 1e-5); its checkpoint of iteration 1, gathered whole,
    resumes in 1 process to the same iteration 2."""
    data = _write(tmp_path, "prompts.jsonl", PROMPTS)
    args = ("iterations=2", "save_every=1", "keep_checkpoints=2")
    output = _launch("ppo", _ppo_args(tiny_model_dir, data, tmp_path / "fsdp", *args), fsdp=True)
    assert output.count('"stage": "ppo"') == 1  # the summary, printed by the main process alone
    assert main(["ppo", *_ppo_args(tiny_model_dir, data, tmp_path / "one", *args)]) == 0

    fsdp = _assert_same_run(tmp_path / "fsdp", tmp_path / "one", tiny_model_dir, PPO_LOGGED)
    _assert_same_checkpoint(tmp_path / "fsdp", tmp_path / "one", 2)
    assert fsdp[1]["beta"] != fsdp[0]["beta"] and abs(fsdp[1]["kl"]) > 1e-3  # k1 may be < 0 in a batch
    summary = json.loads((tmp_path / "fsdp" / "summary.json").read_text())
    assert summary["params_rank_share"] == pytest.approx(0.5, abs=0.01)  # sharded, not data parallel

    # Resume iteration 2 in one process from the 2-process FSDP checkpoint of iteration 1.
    resumed = _without_last_checkpoint(tmp_path / "fsdp", tmp_path)
    assert main(["ppo", *_ppo_args(tiny_model_dir, data, resumed, *args, "resume_from=latest")]) == 0
    _assert_same_run(resumed, tmp_path / "one", tiny_model_dir, PPO_LOGGED)


GOLD_PROMPTS = [{"prompt": "tell me a story"}, {"prompt": "hello there"}, {"prompt": "what is two plus two?"}]
GOLD_LOGGED = ("gold_reward/mean", "gold_proxy/mean", "gold_kl", "gold_kl/per_response")


def _assert_same_gold_run(run: Path, reference: Path, model_dir: Path) -> None:
    """``run`` trained as ``reference`` (``_assert_same_run`` on the training rows), logged its gold rows (the
    starting policy's step 0, then every iteration: gold_every=1) with its numbers (rel 1e-4) and wrote the same
    gold samples, each once."""
    _assert_same_run(run, reference, model_dir, ())  # samples, steps, weights
    training = [r[key] for r in _rows(run) if "lr" in r for key in PPO_LOGGED]
    reference_training = [r[key] for r in _rows(reference) if "lr" in r for key in PPO_LOGGED]
    assert len(training) == 2 * len(PPO_LOGGED)
    assert training == pytest.approx(reference_training, rel=1e-4, abs=1e-6)
    rows = [r for r in _rows(run) if "gold_reward/mean" in r]
    reference_rows = [r for r in _rows(reference) if "gold_reward/mean" in r]
    assert [r["step"] for r in rows] == [r["step"] for r in reference_rows] == [0, 1, 2]
    for key in GOLD_LOGGED:
        assert [r[key] for r in rows] == pytest.approx([r[key] for r in reference_rows], rel=1e-4, abs=1e-6), key
    assert abs(rows[-1]["gold_kl"]) > 1e-4  # the policy moved: the KL comparison is not of zeros
    samples = (run / "gold_samples.jsonl").read_text()
    assert samples == (reference / "gold_samples.jsonl").read_text()
    assert len(samples.splitlines()) == 3 * len(GOLD_PROMPTS)  # the main process alone writes


def _gold_ppo_args(model: Path, tmp_path: Path, name: str, *extra: str) -> list[str]:
    """``_ppo_args`` with a gold scorer every iteration on 3 held-out prompts (generated in batches of 2: rank 0
    samples batch 0, rank 1 batch 1, so every process scores and runs KL passes for its own share)."""
    prompts, gold = _write(tmp_path, "prompts.jsonl", PROMPTS), _write(tmp_path, "gold.jsonl", GOLD_PROMPTS)
    gold_args = ["gold_reward=_ppo_rewards:shortness", f"gold_prompts={gold}", "gold_every=1"]
    return _ppo_args(model, prompts, tmp_path / name, "iterations=2", *gold_args, *extra)


def test_ppo_gold_in_two_processes_equals_one(tiny_model_dir, tmp_path):
    """PPO with LoRA and a gold scorer (gold_every=1) in 2 DDP processes and in 1: the same gold rows (steps 0,
    1, 2: gold and proxy means, KL per token and per response) and gold samples, and the same training run."""
    args = ("lora=true", "lora_r=4")
    _launch("ppo", _gold_ppo_args(tiny_model_dir, tmp_path, "two", *args))
    assert main(["ppo", *_gold_ppo_args(tiny_model_dir, tmp_path, "one", *args)]) == 0
    _assert_same_gold_run(tmp_path / "two", tmp_path / "one", tiny_model_dir)


def test_fsdp_ppo_gold_in_two_processes_equals_one(tiny_model_dir, tmp_path):
    """PPO with full fine-tuning under FSDP and a gold scorer (gold_every=1) in 2 processes: gold samples drawn
    on the policy's weights gathered whole, the KL passes of policy and reference on the shards (rank 1 runs a
    stand-in where it has fewer micro-batches); the same gold rows and samples as one plain process."""
    output = _launch("ppo", _gold_ppo_args(tiny_model_dir, tmp_path, "fsdp"), fsdp=True)
    assert output.count('"stage": "ppo"') == 1
    assert main(["ppo", *_gold_ppo_args(tiny_model_dir, tmp_path, "one")]) == 0
    _assert_same_gold_run(tmp_path / "fsdp", tmp_path / "one", tiny_model_dir)


def _online_dpo_args(model: Path, prompts: Path, out: Path, *extra: str) -> list[str]:
    """5 prompts a round, 3 samples each: 15 samples in generation batches of 4 (rank 0 samples batches 0 and
    2, rank 1 batches 1 and 3, so a prompt's samples may come from both ranks) and log-prob batches of 4 (each
    rank its 8 or 7 samples); 2 epochs of minibatches of 3 pairs in micro-batches of 1, so a minibatch of 3
    has a second micro-step of 1 pair and a stand-in."""
    return [
        *_common(model, prompts, out),
        "reward=alignkit.scoring.rewards:length",
        "prompts_per_round=5",
        "samples_per_prompt=3",
        "generation_batch_size=4",
        "forward_batch_size=4",
        "dpo_epochs=2",
        "minibatch_size=3",
        "micro_batch_size=1",
        "max_new_tokens=6",
        "learning_rate=3e-3",
        *extra,
    ]


ONLINE_DPO_LOGGED = ("score/mean", "pairs", "kl", "kl/per_token", "loss", "rewards/margin", "grad_norm")


def test_online_dpo_in_two_processes_equals_one(tiny_model_dir, tmp_path):
    """Two rounds of online DPO with LoRA (the reference is the base with the adapters off) in 2 processes and
    in 1: the same samples and pairs (each generation batch sampled by one rank from its own seed, every rank
    pairing the gathered round), and, with each rank's loss divided by the whole minibatch's pairs, the same
    adapters (atol 1e-5) and logged numbers. The main process alone writes: each round once."""
    data = _write(tmp_path, "prompts.jsonl", PROMPTS)
    args = ["rounds=2", "lora=true", "lora_r=4"]
    _launch("online-dpo", _online_dpo_args(tiny_model_dir, data, tmp_path / "two", *args))
    assert main(["online-dpo", *_online_dpo_args(tiny_model_dir, data, tmp_path / "one", *args)]) == 0

    two = _assert_same_run(tmp_path / "two", tmp_path / "one", tiny_model_dir, ONLINE_DPO_LOGGED)
    one = _rows(tmp_path / "one")
    assert [r["step"] for r in two] == [1, 2]
    # Each round has a minibatch of 3 pairs: micro-steps of 2 pairs and 1, where rank 1 runs a stand-in.
    assert min(r["pairs"] for r in one) >= 3
    assert one[1]["kl"] > 1e-3


def test_online_dpo_checkpoint_of_two_processes_resumes_in_one(tiny_model_dir, tmp_path):
    """Full fine-tuning (a frozen copy as the reference): 2 processes run round 1 and checkpoint; 1 process
    resumes the folder for round 2. Samples, weights (atol 1e-5) and logs equal 2 uninterrupted rounds in 1
    process: the checkpoint (policy, AdamW, schedule, RNG, round) holds nothing per process."""
    data = _write(tmp_path, "prompts.jsonl", PROMPTS)
    _launch("online-dpo", _online_dpo_args(tiny_model_dir, data, tmp_path / "resumed", "rounds=1"))
    assert (tmp_path / "resumed" / "checkpoints" / "step-000001" / "COMPLETE").is_file()
    resumed = _online_dpo_args(tiny_model_dir, data, tmp_path / "resumed", "rounds=2", "resume_from=latest")
    assert main(["online-dpo", *resumed]) == 0
    straight = _online_dpo_args(tiny_model_dir, data, tmp_path / "straight", "rounds=2")
    assert main(["online-dpo", *straight]) == 0

    rows = _assert_same_run(tmp_path / "resumed", tmp_path / "straight", tiny_model_dir, ONLINE_DPO_LOGGED)
    assert [r["step"] for r in rows] == [1, 2]


def test_fsdp_online_dpo_in_two_processes_equals_one_and_resumes_in_one(tiny_model_dir, tmp_path):
    """Online DPO with full fine-tuning under FSDP in 2 processes: policy and reference sharded; generation on
    the shards (fsdp_generation=shards: the processes step together, and rank 1, with 1 of the 3 generation
    batches of 5, samples a stand-in batch while rank 0 samples its second); log-probs on the shards in forward
    batches of 7 (rank 0 runs 2 for its 8 samples, rank 1 one for its 7 and a stand-in). Two rounds give one
    plain process's samples, logs and weights (atol 1e-5); the checkpoint of round 1, gathered whole, resumes
    in 1 process to the same round 2. (PPO's FSDP test samples on the weights gathered whole.)"""
    data = _write(tmp_path, "prompts.jsonl", PROMPTS)
    args = (
        "rounds=2",
        "save_every=1",
        "keep_checkpoints=2",
        "forward_batch_size=7",
        "generation_batch_size=5",
    )
    sharded = _online_dpo_args(tiny_model_dir, data, tmp_path / "fsdp", *args, "fsdp_generation=shards")
    _launch("online-dpo", sharded, fsdp=True)
    assert main(["online-dpo", *_online_dpo_args(tiny_model_dir, data, tmp_path / "one", *args)]) == 0

    fsdp = _assert_same_run(tmp_path / "fsdp", tmp_path / "one", tiny_model_dir, ONLINE_DPO_LOGGED)
    assert [r["step"] for r in fsdp] == [1, 2] and all(r["pairs"] > 0 for r in fsdp)
    summary = json.loads((tmp_path / "fsdp" / "summary.json").read_text())
    assert summary["params_rank_share"] == pytest.approx(0.5, abs=0.01)  # sharded, not data parallel

    resumed = _without_last_checkpoint(tmp_path / "fsdp", tmp_path)
    resume_args = _online_dpo_args(tiny_model_dir, data, resumed, *args, "resume_from=latest")
    assert main(["online-dpo", *resume_args]) == 0
    _assert_same_run(resumed, tmp_path / "one", tiny_model_dir, ONLINE_DPO_LOGGED)


def test_online_dpo_rounds_with_one_pair_and_none_in_two_processes_equal_one(tiny_model_dir, tmp_path):
    """A reward that only the prompt "hello" can make a pair with (_ppo_rewards:length_of_hello), placed in the
    data so that round 1 holds it and round 2 does not (2 of the 5 prompts a round): round 1 makes 1 pair, so
    rank 1 has no pair in the round and runs a stand-in; round 2 makes none, so no process steps (the schedule
    advances all the same). Samples, logs and weights (atol 1e-6) equal one process's."""
    seed = load_config(online_dpo.OnlineDPOConfig, None, ["reward=x"]).seed
    prompts = [r for r in PROMPTS if r["prompt"] != "hello"]
    prompts.insert(iteration_prompts(len(PROMPTS), 2, 0, seed)[0], {"prompt": "hello"})
    data = _write(tmp_path, "prompts.jsonl", prompts)
    args = ["rounds=2", "prompts_per_round=2", "reward=_ppo_rewards:length_of_hello", "lr_scheduler=linear"]
    _launch("online-dpo", _online_dpo_args(tiny_model_dir, data, tmp_path / "two", *args))
    assert main(["online-dpo", *_online_dpo_args(tiny_model_dir, data, tmp_path / "one", *args)]) == 0

    assert _samples(tmp_path / "two") == _samples(tmp_path / "one")
    _assert_same_weights(tmp_path / "two", tmp_path / "one", tiny_model_dir)
    two, one = _rows(tmp_path / "two"), _rows(tmp_path / "one")
    assert [r["pairs"] for r in two] == [r["pairs"] for r in one] == [1, 0]
    assert "loss" in two[0] and "loss" not in two[1]
    assert [r["lr"] for r in two] == [r["lr"] for r in one]
    for key in ("score/mean", "kl", "loss", "grad_norm"):
        assert two[0][key] == pytest.approx(one[0][key], rel=1e-5, abs=1e-7), key


# --- in process ---------------------------------------------------------------------------------------


def test_rank_microbatches_split_each_micro_step_across_ranks():
    """7 examples, micro-batches of 2, 2 ranks: micro-steps of 4 then 3 examples, each split in contiguous
    shares (the first rank takes the odd one). 3 ranks, micro-batches of 1, 5 examples: the last micro-step
    has 2 examples for 3 ranks, so the third rank's share is empty (the loop runs a stand-in). Every example
    is in exactly one share, every rank has as many micro-steps, and 1 rank gets the plain micro-batches."""
    indices = [10, 11, 12, 13, 14, 15, 16]
    assert rank_microbatches(indices, 2, rank=0, world_size=2) == [[10, 11], [14, 15]]
    assert rank_microbatches(indices, 2, rank=1, world_size=2) == [[12, 13], [16]]
    assert [rank_microbatches(indices[:5], 1, r, 3) for r in range(3)] == [
        [[10], [13]],
        [[11], [14]],
        [[12], []],
    ]
    assert rank_microbatches(indices, 2, rank=0, world_size=1) == [[10, 11], [12, 13], [14, 15], [16]]
    for world in (1, 2, 3, 4):
        shares = [rank_microbatches(indices, 3, r, world) for r in range(world)]
        assert len({len(s) for s in shares}) == 1
        assert sorted(i for s in shares for mb in s for i in mb) == indices


def test_generation_split_by_batches_is_the_one_process_generation(tiny_model_dir, tiny_tokenizer):
    """7 prompts of different lengths in generation batches of 2: the shares of 1, 2 and 3 processes (every
    world-th batch from the rank-th) together hold exactly generate()'s responses, token for token, each
    prompt in exactly one share."""
    model = load_model(str(tiny_model_dir), "float32")
    prompts = [tiny_tokenizer(r["prompt"])["input_ids"] for r in PAIRS[:6]] + [[5]]
    sampling = SamplingConfig(max_new_tokens=5, temperature=1.0, seed=11)
    expected = generate(model, tiny_tokenizer, prompts, sampling, batch_size=2, progress=False)
    for world in (1, 2, 3):
        shares = [generate_share(model, tiny_tokenizer, prompts, sampling, 2, r, world) for r in range(world)]
        assert sorted(i for share in shares for i in share) == list(range(len(prompts)))
        merged = {i: g for share in shares for i, g in share.items()}
        assert [merged[i].response_ids for i in range(len(prompts))] == [g.response_ids for g in expected]
    assert rank_share(range(5), 0, 2) == range(0, 3) and rank_share(range(5), 1, 2) == range(3, 5)


def test_stages_that_write_once_refuse_several_processes(monkeypatch, tmp_path):
    """The generating stages would write their outputs once per rank: refused, naming the number of
    processes, before anything is loaded."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = load_config(build_prefs.BuildPrefsConfig, None, [f"output={tmp_path / 'p.jsonl'}"])
    with pytest.raises(ConfigError, match="build-prefs runs in one process, but it was launched in 2"):
        build_prefs.run(cfg)


def test_stand_ins_make_every_rank_run_as_many_calls():
    """Shares of 3 and 2 rows in calls of 1: rank 1 adds one stand-in; 8 and 7 samples in calls of 7: rank 1 adds
    one; in calls of 4 both make 2 calls; one process never adds any."""
    assert [distributed.stand_ins_needed(5, 1, r, 2) for r in (0, 1)] == [0, 1]
    assert [distributed.stand_ins_needed(15, 7, r, 2) for r in (0, 1)] == [0, 1]
    assert [distributed.stand_ins_needed(15, 4, r, 2) for r in (0, 1)] == [0, 0]
    assert distributed.stand_ins_needed(15, 4, 0, 1) == 0


def test_a_process_left_without_a_generation_batch_is_named(monkeypatch, capsys):
    """5 samples in generation batches of 4 make 2 batches: in 3 processes one samples nothing, and the main
    process says so once, with the batch size that keeps them all sampling; in 2 processes nothing is said."""
    cfg = load_config(ppo.PPOConfig, None, ["reward=x", "prompts_per_iteration=5", "generation_batch_size=4"])
    monkeypatch.setattr(distributed, "is_main_process", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    note_idle_processes(cfg, 5, "iteration", "prompts_per_iteration")
    assert (
        "3 processes share 2 generation batch(es) per iteration, so 1 sample nothing"
        in capsys.readouterr().err
    )
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    note_idle_processes(cfg, 5, "iteration", "prompts_per_iteration")
    assert capsys.readouterr().err == ""


def test_hf_is_the_default_generation_backend():
    for cls, required in (
        (ppo.PPOConfig, ["reward=alignkit.scoring.rewards:politeness"]),
        (build_prefs.BuildPrefsConfig, ["output=x.jsonl"]),
        (cai_revise.CAIReviseConfig, ["prompts=p.jsonl", "output=x.jsonl"]),
        (online_dpo.OnlineDPOConfig, ["reward=alignkit.scoring.rewards:politeness"]),
        (eval_stage.EvalConfig, ["model=m"]),
    ):
        assert load_config(cls, None, required).generation_backend == "hf"


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_vllm_backend_without_vllm_is_a_config_error_naming_the_field(tmp_path):
    """Asked for where vllm is not installed, generation_backend=vllm stops before any model loads, naming
    the field and the install command; ppo and build-prefs check it first."""
    with pytest.raises(
        ConfigError, match=r"generation_backend=vllm needs the vllm package.*alignkit\[vllm\]"
    ):
        check_generation_backend("vllm")
    check_generation_backend("hf")
    cfg = load_config(ppo.PPOConfig, None, ["reward=alignkit.scoring.rewards:politeness", "generation_backend=vllm"])
    with pytest.raises(ConfigError, match="generation_backend=vllm"):
        ppo.run(cfg)
    cfg = load_config(
        build_prefs.BuildPrefsConfig, None, [f"output={tmp_path / 'p.jsonl'}", "generation_backend=vllm"]
    )
    with pytest.raises(ConfigError, match="generation_backend=vllm"):
        build_prefs.run(cfg)
    assert not (tmp_path / "p.jsonl").exists()


def test_fsdp_settings_alignkit_does_not_run_are_refused_naming_the_field(monkeypatch, tiny_model_dir):
    """Under FSDP, lora=true is refused before anything is sharded, and ppo refuses DeepSpeed. `accelerate launch`
    passes the FSDP config as environment variables: FSDP1, parameter offload and mixed_precision are refused
    naming their field of the accelerate config; the shipped config's values pass."""
    monkeypatch.setattr(distributed, "engine", lambda: "fsdp")
    with pytest.raises(ConfigError, match="lora=true under FSDP"):
        distributed.shard(load_model(str(tiny_model_dir)), lora=True)
    cfg = load_config(ppo.PPOConfig, None, ["reward=alignkit.scoring.rewards:politeness"])
    ppo.check_launch(cfg)  # ppo runs under FSDP (full fine-tuning; its lora=true is refused as above)
    monkeypatch.setattr(distributed, "engine", lambda: "deepspeed")
    with pytest.raises(
        ConfigError, match="ppo runs data parallel .DDP. or sharded under FSDP, not under DeepSpeed"
    ):
        ppo.check_launch(cfg)
    monkeypatch.setattr(distributed, "engine", lambda: "fsdp")

    for name, value in _fsdp_env(FSDP_CONFIG).items():
        monkeypatch.setenv(name, value)
    distributed.check_fsdp_settings("no")
    with pytest.raises(ConfigError, match="mixed_precision: bf16"):
        distributed.check_fsdp_settings("bf16")
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    with pytest.raises(ConfigError, match="fsdp_offload_params: true"):
        distributed.check_fsdp_settings("no")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match="fsdp_version: 1"):
        distributed.check_fsdp_settings("no")


def _fsdp_env(path: Path) -> dict[str, str]:
    """The FSDP environment variables `accelerate launch` sets from the accelerate config at ``path``."""
    fsdp = yaml.safe_load(path.read_text())["fsdp_config"]
    return {
        "ACCELERATE_USE_FSDP": "true",
        **{key.upper(): str(value).lower() for key, value in fsdp.items()},
    }


def test_close_process_group_destroys_a_live_group_and_is_a_no_op_without_one(tmp_path):
    """The CLI closes a finished run's process group itself (a group left to interpreter shutdown can abort a
    rank whose run succeeded, seen under load): a live one-rank gloo group is destroyed; without one, nothing."""
    import torch.distributed as dist

    from alignkit.training.distributed import close_process_group

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()
    close_process_group()
    assert not dist.is_initialized()
    close_process_group()
    assert not dist.is_initialized()
