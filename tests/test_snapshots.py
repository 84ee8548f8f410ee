"""snapshot_every: every N steps (online: units) the policy is written as a loadable model to
snapshots/step-NNNNNN/. Checked by loading each snapshot and comparing its logits with the model it must be:
the last snapshot of a run is its final model, an earlier one is not, and PPO's snapshot is the policy (not the
value adapter beside it)."""

from __future__ import annotations

import json

import pytest
import torch

from alignkit.config import load_config
from alignkit.models.loading import load_final
from alignkit.stages import dpo, ppo, sft
from alignkit.training.snapshots import list_snapshots

IDS = torch.tensor([[5, 17, 3, 42, 8, 11, 29, 2]])


def _logits(path) -> torch.Tensor:
    model = load_final(path, "float32", torch.device("cpu")).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _steps(run) -> list[int]:
    return [step for step, _ in list_snapshots(run)]


@pytest.fixture
def pairs(tmp_path):
    rows = [
        {"prompt": "what is the capital of france?", "chosen": "paris.", "rejected": "i do not know, sorry."},
        {"prompt": "please write a short poem", "chosen": "the sea is blue.", "rejected": "no."},
        {"prompt": "i need help", "chosen": "here is a helpful answer.", "rejected": "go away."},
        {"prompt": "the quick brown fox", "chosen": "jumps over the dog.", "rejected": "sleeps."},
    ] * 2
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sft_full_fine_tuning_snapshots_are_the_model_at_their_step(tiny_model_dir, pairs, tmp_path):
    demos = tmp_path / "demos.jsonl"
    demos.write_text(
        "".join(json.dumps({"prompt": r["prompt"], "completion": r["chosen"]}) + "\n" for r in map(json.loads, pairs.read_text().splitlines()))
    )  # fmt: skip
    out = tmp_path / "sft"
    settings = [f"model={tiny_model_dir}", f"train_data={demos}", f"output_dir={out}", "batch_size=4",
                "micro_batch_size=2", "max_steps=4", "learning_rate=2e-2", "snapshot_every=2", "progress=false",
                "report_to=none"]  # fmt: skip
    sft.run(load_config(sft.SFTConfig, None, settings))
    assert _steps(out) == [2, 4]
    last, earlier, final = _logits(out / "snapshots" / "step-000004"), _logits(out / "snapshots" / "step-000002"), _logits(out / "final")
    assert torch.equal(last, final)  # the whole model, as final/ holds it
    assert not torch.allclose(earlier, final, atol=1e-3)  # two steps earlier, at a high learning rate
    assert (out / "snapshots" / "step-000002" / "tokenizer_config.json").is_file()


def test_dpo_lora_snapshot_is_the_adapter_and_loads_on_its_base(tiny_model_dir, pairs, tmp_path):
    out = tmp_path / "dpo"
    settings = [f"model={tiny_model_dir}", f"train_data={pairs}", f"output_dir={out}", "lora=true", "lora_r=4",
                "batch_size=4", "micro_batch_size=2", "max_steps=3", "learning_rate=5e-2", "snapshot_every=2",
                "progress=false", "report_to=none"]  # fmt: skip
    dpo.run(load_config(dpo.DPOConfig, None, settings))
    assert _steps(out) == [2]  # every 2nd of 3 steps
    snap = out / "snapshots" / "step-000002"
    assert (snap / "adapter_model.safetensors").is_file() and not (snap / "model.safetensors").exists()
    base = _logits(tiny_model_dir)
    assert not torch.allclose(_logits(snap), base, atol=1e-4)  # the trained adapter is on
    assert not torch.allclose(_logits(snap), _logits(out / "final"), atol=1e-4)  # one step before the end


def test_ppo_lora_snapshot_is_the_policy_not_the_value_adapter(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["hello there", "i need help", "a poem", "why"]))
    out = tmp_path / "ppo"
    settings = [f"model={tiny_model_dir}", f"train_data={prompts}", "reward=_ppo_rewards:length", f"output_dir={out}",
                "iterations=2", "prompts_per_iteration=4", "minibatch_size=2", "micro_batch_size=1",
                "max_new_tokens=6", "learning_rate=1e-2", "lora=true", "lora_r=4", "snapshot_every=1",
                "progress=false", "report_to=none"]  # fmt: skip
    ppo.run(load_config(ppo.PPOConfig, None, settings))
    assert _steps(out) == [1, 2]
    last = out / "snapshots" / "step-000002"
    assert not (last / "value").exists()  # PEFT writes another adapter in a subfolder: only the policy's here
    torch.testing.assert_close(_logits(last), _logits(out / "final"), atol=1e-5, rtol=1e-5)  # final/ is merged
    assert not torch.allclose(_logits(out / "snapshots" / "step-000001"), _logits(last), atol=1e-4)
