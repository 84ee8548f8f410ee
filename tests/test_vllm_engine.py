"""VLLMSampler.update_weights without vllm: what reaches the engine's ``load_weights`` (through
``collective_rpc`` and ``WeightLoader``) for a full model and for a LoRA policy with PPO's value adapter."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from _fake_vllm import FakeLLM

from alignkit.config import ConfigError, TrainConfig
from alignkit.models.loading import apply_lora, load_model
from alignkit.models.value import VALUE_ADAPTER, add_value_adapter
from alignkit.models.vllm_engine import VLLMSampler
from alignkit.stages import online_dpo, ppo
from alignkit.training import online_engine


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("lora", [False, True])
def test_update_weights_gives_the_engine_the_policy(lora, tiny_model_dir):
    """The engine, a plain model on the base directory, receives in one load_policy_weights call every name of
    the plain model, on the CPU: the full model's state dict, or the LoRA policy's adapter merged
    (merge_and_unload of a copy without the value adapter, to 1e-6; measured 0), the value adapter left out.
    It then computes the policy's logits (measured max difference 2.4e-7 from the LoRA policy's forward, whose
    adapter path rounds differently; 0 from its merge_and_unload), and the policy is unchanged."""
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    policy = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    if lora:
        policy = apply_lora(policy, TrainConfig(lora=True, lora_r=4, lora_alpha=8))
        add_value_adapter(policy)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # move every trained weight (both adapters' B under LoRA) off its starting value
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    before = {k: v.clone() for k, v in policy.state_dict().items()}

    sampler = object.__new__(VLLMSampler)  # no engine built: vllm is not needed
    engine = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    sampler.llm = FakeLLM(engine)
    sampler.update_weights(policy)

    [(method, (weights,))] = sampler.llm.calls
    assert method == "load_policy_weights"
    names = [name for name, _ in weights]
    assert names == list(engine.state_dict())
    assert all(t.device.type == "cpu" and not t.requires_grad for _, t in weights)
    if lora:
        policy_only = copy.deepcopy(policy)
        policy_only.delete_adapter(VALUE_ADAPTER)
        expected = policy_only.merge_and_unload().state_dict()
    else:
        expected = policy.state_dict()
    for name, tensor in weights:
        torch.testing.assert_close(tensor, expected[name], atol=1e-6, rtol=0)
    torch.testing.assert_close(_logits(engine, ids), _logits(policy, ids), atol=1e-5, rtol=0)
    after = policy.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("stage", [ppo, online_dpo], ids=["ppo", "online-dpo"])
def test_vllm_with_lora_is_refused_only_where_vllm_cannot_run(stage, monkeypatch):
    """lora=true with generation_backend=vllm passes check_config where vllm can run (here faked); where it
    is not installed, the backend check still refuses it, naming the field."""
    cfg = stage.STAGE.config(reward="_ppo_rewards:length", lora=True, generation_backend="vllm")
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ConfigError, match="generation_backend=vllm needs the vllm package"):
            stage.check_config(cfg)
    monkeypatch.setattr(online_engine, "check_generation_backend", lambda backend: None)
    stage.check_config(cfg)
