"""`alignkit recommend`: each rule of the seed article's selection guide gives its documented answer, and the
memory estimate is the documented formula, checked by hand on one case."""

from __future__ import annotations

import pytest

from alignkit.cli import main
from alignkit.config import ConfigError, load_config
from alignkit.pipelines.recommend import RecommendConfig, memory_gb, recommend


def _ranking(**settings) -> list[str]:
    return [c.method for c in recommend(load_config(RecommendConfig, None, [], **settings))]


@pytest.mark.parametrize(
    ("settings", "first"),
    [
        ({"data": "demonstrations"}, "sft"),  # only demonstrations: imitate them
        ({"data": "pairs", "model_size": 7}, "dpo"),  # "7B and below, DPO"
        ({"data": "pairs", "model_size": 13, "tuning": "high"}, "dpo"),  # between: still DPO
        ({"data": "pairs", "model_size": 70, "tuning": "high", "memory_gb": 1000}, "ppo"),  # "70B+, consider RLHF"
        ({"data": "pairs", "model_size": 70, "tuning": "low", "memory_gb": 1000}, "dpo"),  # ... if PPO is tunable
        ({"data": "binary"}, "kto"),  # unpaired good/bad feedback
        ({"data": "prompts+reward", "tuning": "high", "memory_gb": 80}, "ppo"),  # team can tune PPO
        ({"data": "prompts+reward", "tuning": "low", "memory_gb": 80}, "grpo"),  # no value model to tune
    ],
)
def test_each_rule_of_the_guide_gives_its_answer(settings, first):
    assert _ranking(**settings)[0] == first


def test_a_method_that_does_not_fit_goes_last_with_its_reason():
    """7B, bf16, 29 GB, reward model: PPO with LoRA needs 7 x 2 x 2 (base + reward model) + 7 x 0.01 x 2 x 12
    (adapters of policy and value) = 29.68 GB > 29, so it goes last despite the high budget; GRPO needs
    28 + 7 x 0.01 x 12 = 28.84 GB and fits."""
    choices = recommend(load_config(RecommendConfig, None, [], data="prompts+reward", tuning="high", memory_gb=29))
    assert [(c.method, c.fits) for c in choices] == [("grpo", "lora"), ("online_dpo", "lora"), ("ppo", "no")]
    assert choices[-1].memory_lora_gb == pytest.approx(29.68)
    assert choices[0].memory_lora_gb == pytest.approx(28.84)
    assert "does not fit 29 GB even with LoRA" in choices[-1].reasons[-1]
    dpo = recommend(load_config(RecommendConfig, None, [], data="pairs"))[0]  # 7 x 2 + 7 x 0.01 x 12
    assert (dpo.method, dpo.fits, dpo.memory_lora_gb) == ("dpo", "lora", pytest.approx(14.84))


def test_memory_estimate_by_hand():
    """DPO, 1B parameters, full fine-tuning in bf16 (b = 2): the policy's weights, gradients and Adam moments,
    1e9 x (2 + 2 + 8) = 12 GB, plus the frozen reference's weights 1e9 x 2 = 2 GB: 14 GB. In fp32: 1e9 x
    (4 + 4 + 8) + 1e9 x 4 = 20 GB. PPO full with a reward model: policy and value trained (2 x 12) + reference
    and reward model frozen (2 x 2) = 28 GB; with LoRA the base once and the reward model (2 x 2) plus adapters
    for two trained models (0.01 x 2 x 12 = 0.24): 4.24 GB."""
    assert memory_gb("dpo", 1.0, 2, lora=False, reward_is_model=False) == pytest.approx(14.0)
    assert memory_gb("dpo", 1.0, 4, lora=False, reward_is_model=False) == pytest.approx(20.0)
    assert memory_gb("ppo", 1.0, 2, lora=False, reward_is_model=True) == pytest.approx(28.0)
    assert memory_gb("ppo", 1.0, 2, lora=True, reward_is_model=True) == pytest.approx(4.24)
    assert memory_gb("orpo", 1.0, 2, lora=False, reward_is_model=True) == pytest.approx(12.0)  # no reference


def test_cli_prints_the_ranking_and_the_caveat(capsys):
    assert main(["recommend", "data=pairs", "model_size=7", "memory_gb=24", "tuning=low"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[2].split()[:2] == ["1", "dpo"]
    assert "7B and below: DPO" in out and "may not carry over" in out


def test_unknown_data_format_is_a_config_error():
    with pytest.raises(ConfigError, match="data"):
        load_config(RecommendConfig, None, ["data=images"])
