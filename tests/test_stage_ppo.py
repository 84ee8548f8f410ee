"""`alignkit ppo` on a tiny model: the logged health signals, exact resume after SIGINT, monitors wired to the
loop, one PPO step against a computation by hand, and the shipped reward functions."""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
import torch
from _fake_vllm import FakeVLLMSampler
from _signal_monitor import SignalAt
from safetensors.torch import load_file

from alignkit import cli
from alignkit.config import ConfigError, load_config
from alignkit.errors import TrainingInterrupted
from alignkit.evaluation.monitors import Event, MonitorSet
from alignkit.losses.ppo import policy_loss, value_loss
from alignkit.models.generation import Generation
from alignkit.models.loading import load_model
from alignkit.models.value import ValueModel
from alignkit.scoring import prompt_text
from alignkit.scoring.rewards import brevity, length, politeness
from alignkit.stages import ppo
from alignkit.training import online, online_engine
from alignkit.training import rollout as rollouts
from alignkit.training.loop import MAX_CONSECUTIVE_NONFINITE
from alignkit.training.online import iteration_prompts
from alignkit.training.online_engine import make_scorer
from alignkit.training.reference import Reference

PROMPTS = [
    "what is the capital of france?",
    "please write a short poem",
    "the quick brown fox",
    "i need help",
]
LOGGED = {
    "step", "lr", "score/mean", "score/std", "reward/mean", "rlhf_reward/mean", "kl", "kl/per_token", "beta",
    "entropy", "clip_frac", "approx_kl", "policy_loss", "value_loss", "value_clip_frac", "explained_variance",
    "len/mean", "len/std", "eos_frac", "distinct_2", "reward_length_corr", "nonfinite_skipped", "grad_norm",
}  # fmt: skip


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


def _args(model_dir, prompt_file, out, *extra: str) -> list[str]:
    return [
        f"model={model_dir}",
        f"train_data={prompt_file}",
        "reward=_ppo_rewards:length",
        f"output_dir={out}",
        "iterations=2",
        "prompts_per_iteration=4",
        "minibatch_size=2",
        "micro_batch_size=1",
        "max_new_tokens=6",
        "learning_rate=1e-2",
        "progress=false",
        "tensorboard=false",
        *extra,
    ]


def _rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_ppo_end_to_end_logs_health_signals(tiny_model_dir, prompt_file, tmp_path, monkeypatch):
    """Two iterations through the CLI. Before any update the policy is the reference, so the KL of iteration 1
    is exactly 0; the value head starts at 0, so its explained variance is 1 - Var[R]/Var[R] = 0. Beta then
    moves by the clipped error: 0.05 * (1 + (-0.2) * 4 responses / 10000) = 0.049996."""
    monkeypatch.setitem(cli.STAGES, "ppo", ("alignkit.stages.ppo", "RLHF with PPO"))
    out = tmp_path / "run"
    assert cli.main(["ppo", *_args(tiny_model_dir, prompt_file, out, "kl_target=6", "kl_horizon=10000")]) == 0
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert LOGGED <= set(row), LOGGED - set(row)
        assert all(isinstance(v, (int, float)) for v in row.values())
    first, second = rows
    assert first["kl"] == pytest.approx(0.0, abs=1e-6) and first["kl/per_token"] == pytest.approx(
        0.0, abs=1e-7
    )
    assert first["explained_variance"] == pytest.approx(0.0, abs=1e-6)
    assert first["beta"] == 0.05 and second["beta"] == pytest.approx(0.05 * (1 - 0.2 * 4 / 10000), rel=1e-9)
    assert second["kl"] != 0.0  # the policy moved off the reference
    assert first["len/mean"] == 6.0 and first["eos_frac"] == 0.0  # a random tiny model never says EOS
    # the logged score is the mean of the scores written next to each sample
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and {s["prompt"] for s in samples} == set(PROMPTS)
    scores = [s["score"] for s in samples if s["step"] == 1]
    assert first["score/mean"] == pytest.approx(sum(scores) / 4, abs=1e-6)
    assert scores == pytest.approx([len(s["response"]) / 10 for s in samples if s["step"] == 1], abs=1e-6)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 2 and summary["reference"] == "frozen copy"
    assert summary["score_by_iteration"] == [first["score/mean"], second["score/mean"]]
    change = summary["score_change"]  # 2 iterations: the first against the last, one each
    assert change["iterations_per_group"] == 1
    assert change["change"] == pytest.approx(second["score/mean"] - first["score/mean"], abs=1e-6)
    low, high = change["change_ci95"]
    assert low <= change["change"] <= high
    final = load_model(str(out / "final"), "float32")  # as trained (fp32 weights), on any CPU
    assert type(final).__name__ == "LlamaForCausalLM"
    # the final policy is the checkpointed policy, not the value model's copy
    ckpt = load_file(str(out / "checkpoints" / "step-000002" / "weights.safetensors"))
    w = final.model.layers[0].mlp.up_proj.weight
    torch.testing.assert_close(w, ckpt["policy.model.layers.0.mlp.up_proj.weight"], rtol=0, atol=0)
    assert not torch.equal(w, ckpt["value.backbone.model.layers.0.mlp.up_proj.weight"])


def test_lora_resume_after_sigint_is_exact(tiny_model_dir, prompt_file, tmp_path):
    """LoRA: policy adapter, value adapter + head on one frozen base. SIGINT during iteration 1 -> checkpoint ->
    TrainingInterrupted; resuming from it gives bit-identical weights and logs to an uninterrupted run, because
    sampling and minibatch order are seeded per iteration and the checkpoint holds both adapters, the value head,
    AdamW, the schedule and the KL controller."""
    lora = ("lora=true", "lora_r=4", "kl_target=0.01", "kl_horizon=4")  # a beta that really moves
    whole = tmp_path / "whole"
    summary = ppo.run(load_config(ppo.PPOConfig, None, _args(tiny_model_dir, prompt_file, whole, *lora)))

    cut = tmp_path / "cut"
    cfg = load_config(ppo.PPOConfig, None, _args(tiny_model_dir, prompt_file, cut, *lora))
    with pytest.raises(TrainingInterrupted) as info:
        ppo.run(cfg, monitors=MonitorSet([SignalAt(1)]))
    assert info.value.checkpoint.endswith("step-000001")
    assert [r["step"] for r in _rows(cut)] == [1]
    resume = (*lora, f"resume_from={info.value.checkpoint}")
    ppo.run(load_config(ppo.PPOConfig, None, _args(tiny_model_dir, prompt_file, cut, *resume)))

    timing = {"rollout_s", "update_s", "elapsed_s"}
    strip = [{k: v for k, v in r.items() if k not in timing} for r in _rows(whole)]
    assert [{k: v for k, v in r.items() if k not in timing} for r in _rows(cut)] == strip
    assert strip[1]["beta"] != strip[0]["beta"]
    a = load_file(str(whole / "checkpoints" / "step-000002" / "weights.safetensors"))
    b = load_file(str(cut / "checkpoints" / "step-000002" / "weights.safetensors"))
    assert a.keys() == b.keys()
    assert any(".value." in k for k in a) and "value.head.weight" in a  # the value adapter and head are saved
    assert all(torch.equal(a[k], b[k]) for k in a)
    fa, fb = (
        load_file(str(whole / "final" / "model.safetensors")),
        load_file(str(cut / "final" / "model.safetensors")),
    )
    assert all(torch.equal(fa[k], fb[k]) for k in fa)
    assert not any("lora" in k for k in fa)  # merged into a plain model, the value adapter left out

    # one base for three networks: base + two small adapters + head, far below 2 x base
    base = sum(p.numel() for p in load_model(str(tiny_model_dir)).parameters())
    assert base < summary["total_parameters"] < 1.5 * base
    assert summary["reference"] == "policy base with adapters disabled"


def test_resume_with_another_kl_control_is_a_config_error(tiny_model_dir, prompt_file, tmp_path):
    """A checkpoint of adaptive KL control resumed with kl_target=null (a fixed beta, which its KL controller's
    state cannot take): one error naming resume_from, the checkpoint and the changed setting, before any step."""
    out = tmp_path / "run"
    cfg = load_config(ppo.PPOConfig, None, _args(tiny_model_dir, prompt_file, out, "kl_target=0.01"))
    with pytest.raises(TrainingInterrupted) as info:
        ppo.run(cfg, monitors=MonitorSet([SignalAt(1)]))
    fixed = ("kl_target=null", f"resume_from={info.value.checkpoint}")
    with pytest.raises(ConfigError, match=r"resume_from: .*step-000001 .*kl_target: 0.01 -> None"):
        ppo.run(load_config(ppo.PPOConfig, None, _args(tiny_model_dir, prompt_file, out, *fixed)))
    assert [r["step"] for r in _rows(out)] == [1]  # nothing trained or logged after the refusal


def test_vllm_backend_with_lora_samples_what_hf_samples(tiny_model_dir, prompt_file, tmp_path, monkeypatch):
    """lora=true, generation_backend=vllm, the engine faked (tests/_fake_vllm.py: a plain model built from the
    model directory, as vLLM builds it, taking the policy's weights through the real update_weights: adapter
    merged, value adapter left out). Interrupted after iteration 1 and resumed, it logs and samples what
    generation_backend=hf does, to the bit, and saves the same final model: the engine held the policy's
    weights at every iteration. The first engine takes none (the fresh adapter is the base it was built on);
    the resumed run's engine, on the base again, takes the checkpoint's policy before its first iteration and
    the updated one before the next."""
    lora = ("lora=true", "lora_r=4", "iterations=3")
    hf = tmp_path / "hf"
    ppo.run(load_config(ppo.PPOConfig, None, _args(tiny_model_dir, prompt_file, hf, *lora)))

    monkeypatch.setattr(online_engine, "check_generation_backend", lambda backend: None)  # vllm is not installed here
    monkeypatch.setattr(online_engine, "vllm_sampler", FakeVLLMSampler)
    monkeypatch.setattr(FakeVLLMSampler, "built", [])
    vllm = tmp_path / "vllm"
    args = _args(tiny_model_dir, prompt_file, vllm, *lora, "generation_backend=vllm")
    with pytest.raises(TrainingInterrupted) as info:
        ppo.run(load_config(ppo.PPOConfig, None, args), monitors=MonitorSet([SignalAt(1)]))
    ppo.run(load_config(ppo.PPOConfig, None, [*args, f"resume_from={info.value.checkpoint}"]))

    assert [len(engine.llm.calls) for engine in FakeVLLMSampler.built] == [0, 2]
    timing = {"rollout_s", "update_s", "elapsed_s"}
    strip = [{k: v for k, v in r.items() if k not in timing} for r in _rows(hf)]
    assert [{k: v for k, v in r.items() if k not in timing} for r in _rows(vllm)] == strip
    assert len(strip) == 3 and strip[2]["kl"] != 0.0
    assert (vllm / "samples.jsonl").read_text() == (hf / "samples.jsonl").read_text()
    a, b = (
        load_file(str(hf / "final" / "model.safetensors")),
        load_file(str(vllm / "final" / "model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _Recorder:
    """Records every row it is given and fires (warn) on each."""

    name, action = "recorder", "warn"
    keys = ("kl",)

    def __init__(self):
        self.rows = []

    def update(self, step: int, row: dict):
        self.rows.append(dict(row))
        return Event(step, self.name, "always", self.action, {"kl": row["kl"]})


class _StopAt:
    name, action = "stopper", "stop"
    keys = ()

    def update(self, step: int, row: dict):
        return Event(step, self.name, "stop here", self.action, {}) if step == 1 else None


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gradient_checkpointing_gives_the_same_run(tiny_model_dir, prompt_file, tmp_path, mlp_calls, lora):
    """gradient_checkpointing=true recomputes the policy's and the value model's layers in the update's backward
    (counted) and changes no number: the same samples and checkpointed policy and value model (atol 1e-6) as a
    run without it. With LoRA the value model's layers are recomputed with the value adapter they ran with
    (``recompute_with_active_adapter``); without that, the policy's adapter ran in their recomputation and the
    adapters came out different."""
    calls = mlp_calls
    extra = ("lora=true", "lora_r=4") if lora else ()
    runs, n_calls = {}, {}
    for checkpointing in ("false", "true"):
        out = tmp_path / checkpointing
        args = _args(tiny_model_dir, prompt_file, out, *extra, f"gradient_checkpointing={checkpointing}")
        calls["n"] = 0
        ppo.run(load_config(ppo.PPOConfig, None, args))
        runs[checkpointing], n_calls[checkpointing] = out, calls["n"]
    # Each update micro-batch runs 2 networks x 2 layers, recomputed once: 2 iterations x 2 epochs x 4 rows.
    assert n_calls["true"] - n_calls["false"] == 2 * 2 * 4 * 2 * 2
    plain, checkpointed = runs["false"], runs["true"]
    assert (checkpointed / "samples.jsonl").read_text() == (plain / "samples.jsonl").read_text()
    a = load_file(str(plain / "checkpoints" / "step-000002" / "weights.safetensors"))
    b = load_file(str(checkpointed / "checkpoints" / "step-000002" / "weights.safetensors"))
    assert a.keys() == b.keys() and (not lora or any(".value." in k for k in a))
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=0, msg=name)


def test_monitors_see_each_row_and_their_events_are_logged(tiny_model_dir, prompt_file, tmp_path):
    """The stage hands each logged row to the MonitorSet, writes every event as a row of metrics.jsonl, and a
    'stop' event ends the run after that iteration with a checkpoint and the final model."""
    recorder = _Recorder()
    out = tmp_path / "run"
    cfg = load_config(ppo.PPOConfig, None, _args(tiny_model_dir, prompt_file, out, "iterations=3"))
    summary = ppo.run(cfg, monitors=MonitorSet([recorder, _StopAt()], cooldown=0))
    rows = _rows(out)
    metrics = [r for r in rows if "event" not in r]
    events = [r for r in rows if "event" in r]
    assert [r["step"] for r in metrics] == [1] and recorder.rows == metrics
    assert [(e["event"], e["step"], e["action"]) for e in events] == [
        ("recorder", 1, "warn"),
        ("stopper", 1, "stop"),
    ]
    assert events[0]["values"] == {"kl": metrics[0]["kl"]}
    assert summary["stopped_by"] == "stopper" and summary["iterations"] == 1
    assert summary["events"] == events
    assert (out / "checkpoints" / "step-000001" / "COMPLETE").is_file() and (out / "final").is_dir()


def test_one_ppo_step_equals_the_losses_by_hand(tiny_model_dir):
    """A hand-made rollout of three responses (lengths 3, 1, 2). By hand: log pi from full logits ->
    log_softmax -> gather at the response positions; V from the last hidden state through the head. Then
    loss = policy_loss + vf_coef * value_loss from alignkit.losses.ppo, with old log-probs and old values set
    so both clips bind somewhere. With SGD at lr 1 and no grad clipping, PPO's step (two micro-batches of 2 and
    1 rows) must move every parameter by exactly -d loss / d theta."""
    torch.manual_seed(0)
    policy = load_model(str(tiny_model_dir), "float32")  # compared at fp32 resolution on any CPU
    value_model = ValueModel(load_model(str(tiny_model_dir), "float32"))
    torch.nn.init.normal_(value_model.head.weight, std=0.3)
    gens = [
        Generation([1, 10, 11, 12], [20, 21, 2], "", True),
        Generation([1, 13], [22], "", False),
        Generation([1, 10, 14], [23, 24], "", False),
    ]
    batch = rollouts.collate_samples(gens, pad_id=0, device=torch.device("cpu"))
    cfg = ppo.PPOConfig(
        reward="_ppo_rewards:length", vf_coef=0.5, micro_batch_size=2, max_grad_norm=None, dtype="float32"
    )  # float32: ppo_loss runs under the run's precision, which dtype=auto makes bf16 on an AMX CPU
    starts, lengths = [4, 2, 3], [3, 1, 2]
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]])

    def by_hand():
        ids, attn = batch["input_ids"], batch["attention_mask"]
        logp = torch.log_softmax(policy(input_ids=ids, attention_mask=attn).logits.float(), -1)
        hidden = value_model.backbone(input_ids=ids, attention_mask=attn, output_hidden_states=True)
        v_all = (hidden.hidden_states[-1] @ value_model.head.weight.T + value_model.head.bias).squeeze(-1)
        logps, values = torch.zeros(3, 3), torch.zeros(3, 3)
        for i, (s, n) in enumerate(zip(starts, lengths)):
            for j in range(n):
                logps[i, j] = logp[i, s + j - 1, ids[i, s + j]]
                values[i, j] = v_all[i, s + j - 1]
        return logps, values

    with torch.no_grad():
        logps0, values0 = by_hand()
    old_logps = logps0 + torch.tensor([[-0.5, 0.3, 0.0], [0.4, 0, 0], [0.1, -0.6, 0]])  # ratios e^{0.5} ...
    old_values = values0 + torch.tensor([[0.5, -0.05, 0.0], [-0.4, 0, 0], [0.0, 0.3, 0]])
    advantages = torch.tensor([[1.0, -0.5, 0.2], [-1.2, 0, 0], [0.7, 0.9, 0]])
    # token (0, 0): old value v + 0.5, return v - 1: the clipped value v + 0.3 is farther, so it is used
    returns = values0 + torch.tensor([[-1.0, 0.5, 0.3], [1.2, 0, 0], [-0.4, 0.6, 0]])
    rollout = rollouts.Rollout(
        batch["input_ids"], batch["attention_mask"], batch["loss_mask"], batch["mask"],
        old_logps, old_values, advantages, returns,
    )  # fmt: skip
    assert torch.equal(batch["mask"], mask)

    logps, values = by_hand()
    pg = policy_loss(logps, old_logps, advantages, mask, clip_eps=0.2)
    vf = value_loss(values, old_values, returns, mask, clip_eps=0.2)
    assert pg.clip_frac > 0 and vf.clip_frac > 0  # both clips are exercised
    loss = pg.loss + 0.5 * vf.loss
    params = [p for m in (policy, value_model) for p in m.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)

    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    loss_fn = functools.partial(ppo.ppo_loss, cfg, policy, value_model)
    stats = rollouts.rollout_step(cfg, loss_fn, rollout, (optimizer, scheduler, params), token_weighted=True)
    assert stats["loss"] == pytest.approx(loss.item(), abs=1e-6)
    assert stats["policy_loss"] == pytest.approx(pg.loss.item(), abs=1e-6)
    assert stats["value_loss"] == pytest.approx(vf.loss.item(), abs=1e-6)
    assert stats["clip_frac"] == pytest.approx(pg.clip_frac.item(), abs=1e-6)
    for p, p0, g in zip(params, before, grads):
        expected = p0 - (g if g is not None else torch.zeros_like(p0))
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=2e-6)


def test_rollout_passes_in_trimmed_microbatches_equal_one_padded_pass(tiny_model_dir):
    """rollout_passes runs micro-batches of rows of similar length, each cut to its longest row. On responses
    of lengths 1 to 5 in 2-row micro-batches, its log-probs (policy and reference), entropies and values
    must equal those of the whole right-padded batch in one pass, and be 0 past each response's end."""
    torch.manual_seed(0)
    policy = load_model(str(tiny_model_dir), "float32")  # compared at fp32 resolution on any CPU
    reference = Reference("copy", load_model(str(tiny_model_dir), "float32"))
    value_model = ValueModel(load_model(str(tiny_model_dir), "float32"))
    torch.nn.init.normal_(value_model.head.weight, std=0.3)
    with torch.no_grad():
        for p in reference.copy.parameters():
            p.add_(0.01 * torch.randn_like(p))  # a reference that differs from the policy
    gens = [
        Generation([1, 10, 11], [20, 21, 22, 23, 24], "", False),
        Generation([1, 13], [22], "", True),
        Generation([1, 10, 14, 15], [23, 24], "", False),
        Generation([1], [25, 26, 27], "", False),
        Generation([1, 12], [28, 29, 30, 31], "", False),
    ]
    batch = rollouts.collate_samples(gens, pad_id=0, device=torch.device("cpu"))
    one_pass = rollouts._rollout_passes(ppo.PPOConfig(reward="x:y"), policy, reference, value_model, batch)
    cfg = ppo.PPOConfig(reward="x:y", micro_batch_size=2)
    passes = rollouts.rollout_passes(cfg, policy, reference, value_model, batch)
    assert set(passes) == {"logps", "ref_logps", "entropy", "values"}
    for key, value in passes.items():
        assert value.shape == (5, 5)
        torch.testing.assert_close(value, one_pass[key] * batch["mask"], rtol=0, atol=1e-5)
        assert torch.all(value[batch["mask"] == 0] == 0)
    assert not torch.allclose(passes["logps"], passes["ref_logps"])


def test_mean_difference_interval_by_hand():
    """Groups with no spread: every bootstrap resample has the same means, so the interval is the point.
    With spread, the interval holds the point and widens as the groups shrink."""
    from alignkit.evaluation.metrics import mean_difference

    est = mean_difference([1.0, 1.0], [3.0, 3.0, 3.0])
    assert (est.value, est.low, est.high, est.n) == (2.0, 2.0, 2.0, 5)
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.0, 1.0, 400), rng.normal(0.5, 1.0, 400)
    wide, narrow = mean_difference(a[:20], b[:20]), mean_difference(a, b)
    assert narrow.low < narrow.value < narrow.high and narrow.low > 0.3  # 0.5 +- 2 x 0.07
    assert narrow.high - narrow.low < wide.high - wide.low


def test_shipped_rewards_hand_values():
    """politeness: markers counted per occurrence, capped at 3, /3. brevity: exp(-|n - 20| / 20) for n words.
    length: words / 50."""
    assert politeness("", "Sure.") == 0.0
    assert politeness("", "Thanks! Please see below.") == pytest.approx(2 / 3)
    assert politeness("", "please please please please, sorry") == 1.0  # the cap
    assert brevity("", " ".join(["w"] * 20)) == 1.0
    assert brevity("", " ".join(["w"] * 30)) == pytest.approx(math.exp(-0.5))
    assert brevity("", "") == pytest.approx(math.exp(-1))
    assert length("", "one two three four five") == pytest.approx(0.1)


def test_reward_specs_and_config_errors(tmp_path):
    def cfg(**kw):
        return ppo.PPOConfig(**{"reward": "_ppo_rewards:length", **kw})

    cpu = torch.device("cpu")
    scorer = make_scorer(cfg(), cpu)
    chat = [{"role": "user", "content": "hi"}]
    assert scorer.score(["p", chat], ["abcde", "ab"]) == pytest.approx([0.5, 0.2])
    assert prompt_text(chat) == "user: hi"
    with pytest.raises(ConfigError, match="no module named 'no_such_module'"):
        make_scorer(cfg(reward="no_such_module:f"), cpu)
    with pytest.raises(ConfigError, match="has no function 'nope'"):
        make_scorer(cfg(reward="alignkit.rewards:nope"), cpu)
    with pytest.raises(ConfigError, match="neither 'module:function'"):
        make_scorer(cfg(reward=str(tmp_path / "missing")), cpu)
    with pytest.raises(ValueError, match="_ppo_rewards:not_a_number returned"):
        make_scorer(cfg(reward="_ppo_rewards:not_a_number"), cpu).score(["p"], ["r"])
    with pytest.raises(ConfigError, match="'batch_size' is not used by ppo; set prompts_per_iteration"):
        load_config(ppo.PPOConfig, None, ["reward=_ppo_rewards:length", "batch_size=4"])  # no field: a key
    with pytest.raises(ConfigError, match="^config key 'temperature' must be > 0, got 0.0$"):
        ppo.check_config(cfg(temperature=0.0))


def test_iteration_prompts_use_each_prompt_once_per_pass():
    """5 prompts, 2 per iteration: iterations 0-4 cover 10 slots = two full passes, each a permutation;
    the same (seed, iteration) always gives the same prompts."""
    slots = [i for it in range(5) for i in iteration_prompts(5, 2, it, seed=3)]
    assert sorted(slots[:5]) == list(range(5)) and sorted(slots[5:]) == list(range(5))
    assert iteration_prompts(5, 2, 3, seed=3) == slots[6:8]
    assert slots != [i for it in range(5) for i in iteration_prompts(5, 2, it, seed=4)]


def test_reward_model_directory_scores_the_samples(tiny_model_dir, tiny_tokenizer, prompt_file, tmp_path):
    """reward=<dir of `alignkit rm`>: the logged scores are that reward model's scores of the samples."""
    from alignkit.models.reward import build_reward_model, load_reward_model, save_reward_model

    rm = build_reward_model(str(tiny_model_dir), tiny_tokenizer.pad_token_id, "float32", device="cpu")
    rm_dir = save_reward_model(rm, tiny_tokenizer, tmp_path / "rm", max_length=256, max_prompt_length=None)
    out = tmp_path / "run"
    args = _args(tiny_model_dir, prompt_file, out, "iterations=1", f"reward={rm_dir}", "dtype=float32")
    ppo.run(load_config(ppo.PPOConfig, None, args))
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    expected = load_reward_model(rm_dir, "float32", device="cpu").score(
        [s["prompt"] for s in samples], [s["response"] for s in samples]
    )
    assert [s["score"] for s in samples] == pytest.approx(expected, abs=1e-5)
    assert len(set(expected)) > 1  # the samples really were told apart


def test_a_streak_of_nonfinite_steps_ends_the_run_as_the_offline_loop_does(
    tiny_model_dir, prompt_file, tmp_path, monkeypatch
):
    """The online engine's non-finite policy is the offline loop's (training.loop.NonFiniteSteps): 2 prompts per
    iteration in minibatches of 1 over 2 PPO epochs make 4 optimizer steps an iteration. Steps 1-4 are real;
    from step 5 each loss is made NaN, so each update is skipped and logged as a "nonfinite" event. Iteration 2
    (steps 5-8) is logged with nonfinite_skipped=4 and, inside the streak, writes no periodic checkpoint; step
    10 makes the streak 6 > MAX_CONSECUTIVE_NONFINITE = 5, which ends the run there, naming iteration 1's
    checkpoint. (Before, the two online stages counted such steps and went on to the end.)"""
    real_step, calls = online.optimizer_step, []

    def nan_from_step_5(optimizer, scheduler, params, max_grad_norm, loss):
        calls.append(loss)
        return real_step(optimizer, scheduler, params, max_grad_norm, loss if len(calls) <= 4 else math.nan)

    monkeypatch.setattr(online, "optimizer_step", nan_from_step_5)
    out = tmp_path / "run"
    args = _args(tiny_model_dir, prompt_file, out, "iterations=5", "prompts_per_iteration=2", "save_every=1")
    cfg = load_config(ppo.PPOConfig, None, [*args, "minibatch_size=1", "ppo_epochs=2"])
    with pytest.raises(TrainingInterrupted, match="stopped after 6 consecutive non-finite") as info:
        ppo.run(cfg, monitors=MonitorSet([]))  # the NonFiniteMonitor would stop it before the rule is reached
    assert MAX_CONSECUTIVE_NONFINITE == 5 and len(calls) == 10
    assert info.value.checkpoint == str(out / "checkpoints" / "step-000001")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001"]
    rows = _rows(out)
    assert [(r["step"], r["nonfinite_skipped"]) for r in rows if "event" not in r] == [(1, 0), (2, 4)]
    events = [r for r in rows if r.get("event") == "nonfinite"]
    assert [(e["step"], e["consecutive"]) for e in events] == [(2, 1), (2, 2), (2, 3), (2, 4), (3, 5), (3, 6)]
