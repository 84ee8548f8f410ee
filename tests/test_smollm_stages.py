"""Stages on the embedded SmolLM2-135M (marked `smollm`: slower, still in the default test command)."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.resources import files

import pytest

from alignkit.cli import main

pytestmark = pytest.mark.smollm
DEMO = str(files("alignkit") / "assets" / "demo_sft.jsonl")


def test_sft_on_smollm_lowers_held_in_loss_and_final_model_generates(tmp_path):
    """Three full fine-tuning steps on 24 of our demonstrations lower the loss on those 24, and final/ loads in
    a fresh process with plain transformers and answers in the house style's language."""
    out = tmp_path / "sft"
    args = [
        "sft",
        f"train_data={DEMO}",
        "train_rows=[0,24]",
        f"output_dir={out}",
        "batch_size=8",
        "micro_batch_size=8",
        "learning_rate=3e-5",
        "lr_scheduler=constant",
        "epochs=1",
        "progress=false",
        "tensorboard=false",
    ]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3
    assert summary["train_loss_after"] < summary["train_loss_before"] - 0.1

    code = (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"p = {str(out / 'final')!r}\n"
        "m = AutoModelForCausalLM.from_pretrained(p); t = AutoTokenizer.from_pretrained(p)\n"
        "ids = t.apply_chat_template([{'role': 'user', 'content': 'What is the capital of France?'}],"
        " add_generation_prompt=True, return_tensors='pt', return_dict=True)['input_ids']\n"
        "out = m.generate(ids, max_new_tokens=20, do_sample=False)\n"
        "print(t.decode(out[0, ids.shape[1]:], skip_special_tokens=True))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_quickstart_main_job_shortened(tmp_path, capsys):
    """The README's main job on SmolLM2 with fewer samples and shorter responses: prints its table with the
    independent evaluators, writes the report."""
    out = tmp_path / "qs"
    args = [
        "quickstart",
        f"output_dir={out}",
        "n_samples=2",
        "max_new_tokens=24",
        "dpo_epochs=1",
        "eval_samples=2",
        "progress=false",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "VADER sentiment (independent)" in printed and "report:" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs"] > 0 and summary["dpo"]["steps"] >= 1
    assert (out / "dpo" / "report.html").stat().st_size > 10_000
