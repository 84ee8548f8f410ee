"""`alignkit grpo` on a tiny model: each advantage end to end (the logged advantages recomputed from the logged
scores), beta = 0 loading no reference, dynamic sampling dropping equal-reward groups, num_iterations keeping the
sampler's log-probs (ratio exactly 1 on the first step), and every registered monitor fed."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _fake_vllm import FakeVLLMSampler
from safetensors.torch import load_file

from alignkit import cli
from alignkit.config import ConfigError, load_config
from alignkit.evaluation import monitors as monitors_module
from alignkit.losses import grpo as losses
from alignkit.models.forward import response_token_logprobs
from alignkit.models.generation import Generation
from alignkit.models.loading import load_model
from alignkit.stages import grpo
from alignkit.training import online_engine
from alignkit.training import rollout as rollouts
from alignkit.training.rollout import policy_outputs

PROMPTS = ["hello there", "hello again", "bye now", "bye then"]


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


def _config(model_dir, prompt_file, out, *extra: str) -> grpo.GRPOConfig:
    args = [
        f"model={model_dir}", f"train_data={prompt_file}", "reward=_ppo_rewards:length", f"output_dir={out}",
        "iterations=2", "prompts_per_iteration=2", "num_generations=2", "minibatch_size=4", "micro_batch_size=2",
        "max_new_tokens=5", "learning_rate=1e-2", "progress=false", "tensorboard=false", *extra,
    ]  # fmt: skip
    return load_config(grpo.GRPOConfig, None, args)


def _rows(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "lr" in r and "event" not in r]


def _samples(run_dir) -> dict[int, list[dict]]:
    by_step: dict[int, list[dict]] = {}
    for line in (run_dir / "samples.jsonl").read_text().splitlines():
        row = json.loads(line)
        by_step.setdefault(row["step"], []).append(row)
    return by_step


@pytest.mark.parametrize("advantage", ["grpo", "dr_grpo", "rloo", "reinforce_pp"])
def test_each_advantage_end_to_end(advantage, tiny_model_dir, prompt_file, tmp_path):
    """Two iterations of 2 prompts x 2 responses. Each sample's logged advantage is the pure function's of the
    logged scores (groups consecutive), zero_std_frac the share of equal-score groups; beta = 0 logs no KL."""
    out = tmp_path / "run"
    summary = grpo.run(_config(tiny_model_dir, prompt_file, out, f"advantage={advantage}"))
    rows, samples = _rows(out), _samples(out)
    assert [r["step"] for r in rows] == [1, 2] and summary["iterations"] == 2
    for row in rows:
        step = samples[row["step"]]
        scores = torch.tensor([s["score"] for s in step], dtype=torch.float32)
        expected = losses.ADVANTAGES[advantage](scores, 2)
        assert [s["advantage"] for s in step] == pytest.approx(expected.tolist(), abs=1e-6)
        assert row["zero_std_frac"] == float(losses.zero_spread_groups(scores.double(), 2).float().mean())
        for key in ("entropy", "clip_frac/low", "clip_frac/high", "reward/mean", "reward/std", "len/mean",
                    "truncated_frac", "ratio/mean", "loss", "grad_norm"):  # fmt: skip
            assert isinstance(row[key], float), key
        assert row["truncated_frac"] == pytest.approx(1 - row["eos_frac"])
        assert "kl" not in row
    # minibatch = the 4 samples, num_iterations 1: one on-policy step, whose ratio is exactly 1.
    assert rows[0]["ratio/mean"] == 1.0 and rows[0]["clip_frac/high"] == 0.0
    assert summary["reference"] == "none (not loaded)" and summary["advantage"] == advantage


def test_beta_zero_loads_no_reference(tiny_model_dir, prompt_file, tmp_path, monkeypatch):
    """beta = 0: one model loaded (the policy), reference mode "none"; beta > 0: two, and the KL logged (0 at
    the first iteration: the policy is still the reference)."""
    loads: list[int] = []
    real = online_engine.load_model
    monkeypatch.setattr(online_engine, "load_model", lambda *a, **k: loads.append(1) or real(*a, **k))
    grpo.run(_config(tiny_model_dir, prompt_file, tmp_path / "a", "iterations=1"))
    assert len(loads) == 1
    summary = grpo.run(_config(tiny_model_dir, prompt_file, tmp_path / "b", "iterations=1", "beta=0.1"))
    assert len(loads) == 3 and summary["reference"] == "frozen copy"
    (row,) = _rows(tmp_path / "b")
    assert row["kl"] == pytest.approx(0.0, abs=1e-6) and row["kl/k3_per_token"] == pytest.approx(0.0, abs=1e-6)


def _group_samples(scores: list[float], prompt: str) -> online_engine.Samples:
    gens = [Generation([1], [2], f"r{i}", True) for i in range(len(scores))]
    return online_engine.Samples([prompt] * len(scores), gens, scores)


def test_dynamic_sampling_drops_equal_groups_and_refills():
    """k = 2, 2 groups wanted. First draw: [1, 1] (equal, dropped) and [0, 2] (kept). Draw 1: [3, 3], [5, 5]
    (both dropped). Draw 2: [4, 6], [7, 8]: the first fills the batch, the second is left out. No group kept in
    any of max_refills draws: the first draw as it was."""
    draws = {1: _group_samples([3, 3, 5, 5], "d1"), 2: _group_samples([4, 6, 7, 8], "d2")}
    kept, stats = grpo.dynamic_sampling(_group_samples([1, 1, 0, 2], "d0"), draws.__getitem__, 2, 2, 3)
    assert kept.scores == [0, 2, 4, 6] and kept.prompts == ["d0", "d0", "d2", "d2"]
    assert stats == {"dynamic_sampling/draws": 3, "dynamic_sampling/groups": 2, "zero_std_frac": 0.5}
    flat = _group_samples([1, 1, 2, 2], "d0")
    kept, stats = grpo.dynamic_sampling(flat, lambda attempt: _group_samples([3, 3], "x"), 2, 2, 2)
    assert kept is flat and stats["dynamic_sampling/draws"] == 3 and stats["zero_std_frac"] == 1.0


def test_dynamic_sampling_end_to_end(tiny_model_dir, prompt_file, tmp_path):
    """Prompts "bye ..." score 1.0 whatever the response (no spread): with dynamic_sampling only the "hello"
    groups are trained on, drawn again until 2 are kept or 3 further draws were made."""
    out = tmp_path / "run"
    cfg = _config(tiny_model_dir, prompt_file, out, "reward=_grpo_rewards:hello_only", "dynamic_sampling=true")
    grpo.run(cfg)
    rows, samples = _rows(out), _samples(out)
    for row in rows:
        step = samples[row["step"]]
        assert all(s["prompt"].startswith("hello") for s in step), [s["prompt"] for s in step]
        assert len(step) == 2 * row["dynamic_sampling/groups"] and row["zero_std_frac"] in (0.0, 0.5, 1.0)
        if row["zero_std_frac"] == 0:  # every group of the first draw had a spread: no further draw
            assert row["dynamic_sampling/draws"] == 1
    assert any(r["zero_std_frac"] > 0 and r["dynamic_sampling/draws"] > 1 for r in rows)


def test_num_iterations_keep_the_sampler_logprobs(tiny_model_dir, prompt_file, tmp_path, monkeypatch):
    """num_iterations = 3, one minibatch of all 4 samples: 3 steps. Step 1 is on policy: old = its own log-probs
    (ratio exactly 1). Steps 2 and 3 take the same old log-probs (those of the sampling policy's no-grad pass,
    within 1e-5 of step 1's), while their current log-probs have moved."""
    calls = []
    real = losses.policy_loss

    def spy(logps, old_logps, *args, **kwargs):
        out = real(logps, old_logps, *args, **kwargs)
        calls.append((logps.detach().clone(), old_logps.clone(), out.ratio.detach().clone()))
        return out

    monkeypatch.setattr(losses, "policy_loss", spy)
    extra = ("iterations=1", "num_iterations=3", "micro_batch_size=4")
    cfg = _config(tiny_model_dir, prompt_file, tmp_path / "run", *extra)
    grpo.run(cfg)
    assert len(calls) == 3
    (logps1, old1, ratio1), (logps2, old2, _), (logps3, old3, _) = calls
    assert torch.equal(old1, logps1) and torch.equal(ratio1, torch.ones_like(ratio1))
    # Each epoch draws its own row order: rows are matched by their values.
    assert _row_set(old2) == _row_set(old3)
    assert all(_distance_to_rows(row, logps1) < 1e-5 for row in old2)
    assert not torch.allclose(logps3, old3, atol=1e-4)


def _row_set(x: torch.Tensor) -> list:
    return sorted(tuple(row.tolist()) for row in x)


def _distance_to_rows(row: torch.Tensor, rows: torch.Tensor) -> float:
    """The smallest max-abs difference between ``row`` and a row of ``rows`` (padding columns included)."""
    return float((rows - row).abs().max(1).values.min())


@pytest.mark.parametrize(("beta", "names"), [
    ("0.0", ["nonfinite", "reward_hacking", "mode_collapse"]),
    ("0.1", ["nonfinite", "kl_explosion", "reward_hacking", "mode_collapse"]),
])  # fmt: skip
def test_every_registered_monitor_is_fed(beta, names, tiny_model_dir, prompt_file, tmp_path, monkeypatch):
    """Each key of each registered monitor is in the first logged row, with a number; no KL monitor without a
    reference."""
    built = []

    def spy(*args, **kwargs):
        built.append(monitors_module.default_monitors(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(grpo, "default_monitors", spy)
    grpo.run(_config(tiny_model_dir, prompt_file, tmp_path / "run", f"beta={beta}"))
    (registered,) = built
    assert [m.name for m in registered.monitors] == names
    rows = _rows(tmp_path / "run")
    for monitor in registered.monitors:
        for key in monitor.keys:
            assert isinstance(rows[0].get(key), float | int), (monitor.name, key)


def test_config_refusals_and_cli(tiny_model_dir, prompt_file, tmp_path, capsys):
    """Out-of-range settings are ConfigErrors naming the key; an adjust action needs a KL coefficient; the CLI
    runs the stage."""
    with pytest.raises(ConfigError, match="'epsilon_low' must be in \\(0, 1\\)"):
        _config(tiny_model_dir, prompt_file, tmp_path / "x", "epsilon_low=1")
    with pytest.raises(ConfigError, match="'num_generations' must be >= 2"):
        _config(tiny_model_dir, prompt_file, tmp_path / "x", "num_generations=1")
    with pytest.raises(ConfigError, match="no KL coefficient to adjust"):
        grpo.run(_config(tiny_model_dir, prompt_file, tmp_path / "y", "reward_hacking_action=adjust"))
    args = [f"model={tiny_model_dir}", f"train_data={prompt_file}", "reward=_ppo_rewards:length", "iterations=1"]
    args += [f"output_dir={tmp_path / 'cli'}", "prompts_per_iteration=1", "max_new_tokens=3", "progress=false"]
    assert cli.main(["grpo", *args, "tensorboard=false", "minibatch_size=2", "micro_batch_size=2"]) == 0
    assert (tmp_path / "cli" / "final").is_dir()


class _LogprobSampler(FakeVLLMSampler):
    """A vLLM stand-in that returns log-probs, as VLLMSampler does: the engine model's own log-prob of each
    sampled token less 0.1 (an engine whose numbers drift from the trainer's by a known amount)."""

    def __call__(self, prompt_ids, sampling):
        generations = super().__call__(prompt_ids, sampling)
        logps = response_token_logprobs(self.llm.model, generations, len(generations), 64)
        for g, lp in zip(generations, logps):
            g.sampling_logps = (lp - 0.1).tolist()
        return generations


def test_vllm_logprob_mismatch_is_logged(tiny_model_dir, prompt_file, tmp_path, monkeypatch):
    """generation_backend=vllm with a sampler returning its log-probs 0.1 below the engine model's, which holds
    the policy's weights at every iteration (the first: both the starting model): every iteration logs
    |trainer - sampler| mean and max of 0.1 and a ratio exp(0.1) = 1.1051709 everywhere (to the float rounding
    of two forward passes); generation_backend=hf logs none of these keys."""
    monkeypatch.setattr(online_engine, "check_generation_backend", lambda backend: None)  # vllm is not here
    monkeypatch.setattr(online_engine, "vllm_sampler", _LogprobSampler)
    monkeypatch.setattr(FakeVLLMSampler, "built", [])
    out = tmp_path / "vllm"
    # float32: the expected values are to 1e-4, finer than bf16 (what dtype=auto picks on an AMX CPU)
    grpo.run(_config(tiny_model_dir, prompt_file, out, "generation_backend=vllm", "dtype=float32"))
    rows = _rows(out)
    assert len(rows) == 2
    for row in rows:
        assert row["sampling/sampling_logp_difference/mean"] == pytest.approx(0.1, abs=1e-4)
        assert row["sampling/sampling_logp_difference/max"] == pytest.approx(0.1, abs=1e-4)
        for key in ("min", "mean", "max"):
            assert row[f"sampling/importance_sampling_ratio/{key}"] == pytest.approx(math.exp(0.1), abs=1e-4)
    grpo.run(_config(tiny_model_dir, prompt_file, tmp_path / "hf"))
    assert not any(key.startswith("sampling/") for row in _rows(tmp_path / "hf") for key in row)


def test_lora_trains_only_the_adapters_against_the_adapter_disabled_base(
    tiny_model_dir, prompt_file, tmp_path, monkeypatch
):
    """lora=true, beta > 0: the reference is the policy's base with the adapters off, no second model. At
    iteration 1 the fresh adapter (B = 0) is the base, so the KL is exactly 0; at iteration 2 the reference
    log-probs are the plain base model's on the same batch (to 1e-5) while the policy's have moved. The
    checkpoint holds only the adapters, and the final (merged) model differs from the base."""
    seen = []
    real = grpo.make_rollout

    def spy(cfg, batch, passes, scores):
        seen.append(({k: v.clone() for k, v in batch.items()}, {k: v.clone() for k, v in passes.items()}))
        return real(cfg, batch, passes, scores)

    monkeypatch.setattr(grpo, "make_rollout", spy)
    out = tmp_path / "run"
    # Two minibatches of 2: the second step is off policy, so the no-grad policy and reference passes are made.
    lora = ("lora=true", "lora_r=4", "lora_alpha=8", "beta=0.04", "learning_rate=5e-2", "minibatch_size=2")
    lora = (*lora, "dtype=float32")  # compared with a float32 base to 1e-5, finer than bf16
    summary = grpo.run(_config(tiny_model_dir, prompt_file, out, *lora))
    assert summary["reference"] == "policy base with adapters disabled"
    base = load_model(str(tiny_model_dir), "float32", device="cpu").eval()
    assert summary["total_parameters"] < 1.2 * sum(p.numel() for p in base.parameters())

    rows = _rows(out)
    assert rows[0]["kl"] == 0.0 and abs(rows[1]["kl"]) > 1e-4
    batch, passes = seen[1]
    with torch.no_grad():
        base_logps, _ = policy_outputs(base, batch, 64)
    mask = batch["mask"].bool()
    torch.testing.assert_close(passes["ref_logps"][mask], base_logps[mask], atol=1e-5, rtol=0)
    assert (passes["logps"][mask] - base_logps[mask]).abs().max() > 1e-3

    weights = load_file(str(out / "checkpoints" / "step-000002" / "weights.safetensors"))
    assert weights and all("lora_" in name for name in weights)
    final = load_file(str(out / "final" / "model.safetensors"))
    start = base.state_dict()
    assert max((final[k] - start[k]).abs().max().item() for k in final if k in start) > 1e-4


def test_on_policy_update_skips_the_policy_pass_and_trains_the_same(tiny_model_dir, prompt_file, tmp_path, monkeypatch):
    """num_iterations = 1 with one minibatch of all 4 responses: the update's one step is on policy (ratio 1),
    so no no-grad policy pass is made and the entropy and KL are logged from the update's pass. Against the same
    run made with the pass (trains_on_policy_only forced off): the same samples, the same final weights (atol
    1e-6) and the same loss, entropy, KL and advantages (rel 1e-5; abs 1e-6 for the KL of step 0, which is
    float noise around 0: policy = reference)."""
    made = []
    real = rollouts.shared_rollout_passes  # what rollout_inputs runs

    def spy(*args):
        made.append(args[-1])  # policy_pass
        return real(*args)

    monkeypatch.setattr(rollouts, "shared_rollout_passes", spy)
    extra = ("beta=0.04", "num_iterations=1", "minibatch_size=4")
    grpo.run(_config(tiny_model_dir, prompt_file, tmp_path / "skip", *extra))
    assert made == [False, False]
    monkeypatch.setattr(grpo, "trains_on_policy_only", lambda cfg, n_rows: False)
    grpo.run(_config(tiny_model_dir, prompt_file, tmp_path / "pass", *extra))
    assert made[2:] == [True, True]

    assert _samples(tmp_path / "skip") == _samples(tmp_path / "pass")
    skip, with_pass = _rows(tmp_path / "skip"), _rows(tmp_path / "pass")
    for key in ("loss", "entropy", "kl", "kl/per_token", "kl/k3_per_token", "advantage/abs_mean", "grad_norm"):
        assert [r[key] for r in skip] == pytest.approx([r[key] for r in with_pass], rel=1e-5, abs=1e-6), key
    assert skip[1]["kl"] != 0.0 and skip[0]["entropy"] > 0
    a = load_file(str(tmp_path / "skip" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "pass" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
