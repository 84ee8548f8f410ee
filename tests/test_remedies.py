"""Monitors that act (issue 19, section 3), each remedy tested on its provoked failure: a length penalty on the
reward, the "adjust" action raising the KL coefficient (reward hacking, mode collapse), RPO's NLL term against
DPO's likelihood displacement, keeping the best-gold weights when the proxy-vs-gold check stops a run, and the
constitution's written guidelines for edge cases (judge prompt and program checks)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from alignkit.cai import judge
from alignkit.cai.checks import ChecksRanker, politeness
from alignkit.cai.constitution import load_constitution
from alignkit.cai.guidelines import GuidedChecksRanker, politeness_quoting_allowed
from alignkit.cai.judge import JudgeResult
from alignkit.cli import main
from alignkit.config import ConfigError, load_config
from alignkit.data.collate import collate_pairs
from alignkit.data.tokenize import encode_pair
from alignkit.evaluation.monitors import ModeCollapseMonitor, MonitorSet, RewardHackingMonitor
from alignkit.losses.ppo import AdaptiveKLController
from alignkit.models.generation import Generation
from alignkit.models.loading import load_model
from alignkit.stages import build_prefs, online_dpo, ppo
from alignkit.training import online_engine
from alignkit.training.preference import pair_logprobs, pair_outputs
from alignkit.training.reference import Reference
from alignkit.training.remedies import length_penalised, raise_kl_coef

PROMPTS = ["what is the capital of france?", "please write a short poem", "the quick brown fox", "i need help"]
HELD_OUT = ["tell me a story", "hello there", "what is two plus two?", "name a colour"]


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _synthetic_stats(monkeypatch, by_unit):
    """Replace keys of each unit's logged sample stats by ``by_unit(unit)`` (units from 1): the monitors then see
    a failure the tiny model could not show in a few iterations, while the method runs for real."""
    real, units = online_engine.sample_stats, iter(range(1, 1000))
    monkeypatch.setattr(online_engine, "sample_stats", lambda samples: real(samples) | by_unit(next(units)))


# --- 1. reward hacking by length --------------------------------------------------------------------------------


def test_length_penalty_by_hand():
    """coef 0.05: 1.0 - 0.05 x 10 = 0.5 and 1.5 - 0.05 x 30 = 0.0: the longer reply loses its lead."""
    assert length_penalised([1.0, 1.5], [10, 30], 0.05) == pytest.approx([0.5, 0.0], abs=1e-12)
    assert length_penalised([1.0, 1.5], [10, 30], 0.0) == [1.0, 1.5]


def test_adjust_raises_the_adaptive_kl_coefficient_and_the_event_holds_old_and_new():
    """Reward and length rising together (correlation 1) fill the reward-hacking window of 5 at step 4: the
    adjust action doubles beta (0.05 -> 0.1) and halves the adaptive target (6 -> 3); nothing changes before."""
    controller = AdaptiveKLController(0.05, 6.0, 10000)
    monitors = MonitorSet([RewardHackingMonitor(window=5, action="adjust")], cooldown=100)
    monitors.adjuster = lambda event: raise_kl_coef(controller, 2.0)
    for step in range(4):
        monitors.on_log(step, {"reward/mean": 0.1 * step, "len/mean": 10.0 + step})
        assert (controller.beta, controller.target) == (0.05, 6.0)
    assert monitors.on_log(4, {"reward/mean": 0.4, "len/mean": 14.0}) is None  # adjust goes on; no stop
    assert (controller.beta, controller.target) == pytest.approx((0.1, 3.0))
    row = monitors.last_events[0].to_row()
    assert row["event"] == "reward_hacking" and row["action"] == "adjust" and row["step"] == 4
    assert row["values"]["beta_old"] == 0.05 and row["values"]["beta_new"] == pytest.approx(0.1)
    assert row["values"]["kl_target_old"] == 6.0 and row["values"]["kl_target_new"] == pytest.approx(3.0)


def test_mode_collapse_can_adjust_or_stop():
    """distinct-2 from 0.8 to 0.3 (< 0.5 x 0.8) fires at its second row: adjust calls the run's remedy and goes
    on; stop asks the loop to stop."""
    calls = []
    adjusting = MonitorSet([ModeCollapseMonitor(keys=("distinct_2",), action="adjust")])
    adjusting.adjuster = lambda event: calls.append(event.monitor) or {"beta_old": 1.0, "beta_new": 2.0}
    assert [adjusting.on_log(s, {"distinct_2": d}) for s, d in enumerate([0.8, 0.3])] == [None, None]
    assert calls == ["mode_collapse"] and adjusting.events[0].values["beta_new"] == 2.0
    stopping = MonitorSet([ModeCollapseMonitor(keys=("distinct_2",), action="stop")])
    assert [stopping.on_log(s, {"distinct_2": d}) for s, d in enumerate([0.8, 0.3])] == [None, "stop"]


def _ppo_args(model_dir, prompt_file, out, *extra: str) -> list[str]:
    return [
        f"model={model_dir}", f"train_data={prompt_file}", "reward=_ppo_rewards:length", f"output_dir={out}",
        "prompts_per_iteration=4", "minibatch_size=2", "micro_batch_size=1", "max_new_tokens=6",
        "learning_rate=1e-2", "progress=false", "tensorboard=false", *extra,
    ]  # fmt: skip


def test_ppo_reward_hacking_adjust_raises_beta_in_the_running_method(
    tiny_model_dir, prompt_file, tmp_path, monkeypatch
):
    """Logged reward and length rising together from iteration 1 (correlation 1 in every row): the reward-hacking
    monitor (window 5) fires at iteration 5, its event row holds beta 0.05 -> 0.1, and iteration 6's rollout is
    penalised with the new beta (fixed KL control, so beta moves only by the action). The length penalty is the
    score less 0.1 x 6 tokens (a random tiny model never ends before max_new_tokens)."""
    _synthetic_stats(monkeypatch, lambda u: {"reward/mean": 0.1 * u, "len/mean": 5.0 + u, "reward_length_corr": 0.9})
    out = tmp_path / "run"
    extra = ("iterations=6", "kl_target=null", "reward_hacking_action=adjust", "length_penalty=0.1")
    summary = ppo.run(load_config(ppo.PPOConfig, None, _ppo_args(tiny_model_dir, prompt_file, out, *extra)))
    rows = _lines(out / "metrics.jsonl")
    metrics, events = [r for r in rows if "event" not in r], [r for r in rows if "event" in r]
    assert [r["beta"] for r in metrics] == [0.05] * 5 + [pytest.approx(0.1)]
    assert [(e["event"], e["step"], e["action"]) for e in events] == [("reward_hacking", 5, "adjust")]
    assert events[0]["values"]["beta_old"] == 0.05 and events[0]["values"]["beta_new"] == pytest.approx(0.1)
    assert summary["stopped_by"] is None and summary["iterations"] == 6
    samples = _lines(out / "samples.jsonl")
    assert all(s["score"] == pytest.approx(s["raw_score"] - 0.6, abs=1e-9) for s in samples)
    first = [s["raw_score"] for s in samples if s["step"] == 1]
    assert metrics[0]["score/unpenalised"] == pytest.approx(sum(first) / 4, abs=1e-9)


def test_online_dpo_mode_collapse_adjust_raises_its_beta(tiny_model_dir, prompt_file, tmp_path, monkeypatch):
    """The samples' distinct-2 halving (0.8 -> 0.3) at round 2 fires the mode-collapse monitor with action adjust:
    the DPO beta that round 3's loss uses is 0.1 x 2 = 0.2, logged in its row and in the event."""
    _synthetic_stats(monkeypatch, lambda u: {"distinct_2": 0.8 if u == 1 else 0.3})
    out = tmp_path / "run"
    args = [
        f"model={tiny_model_dir}", f"train_data={prompt_file}", "reward=_ppo_rewards:length", f"output_dir={out}",
        "rounds=3", "prompts_per_round=2", "samples_per_prompt=2", "minibatch_size=2", "micro_batch_size=2",
        "max_new_tokens=6", "learning_rate=1e-2", "progress=false", "tensorboard=false",
        "mode_collapse_action=adjust",
    ]  # fmt: skip
    online_dpo.run(load_config(online_dpo.OnlineDPOConfig, None, args))
    rows = _lines(out / "metrics.jsonl")
    assert [r["beta"] for r in rows if "event" not in r] == [0.1, 0.1, pytest.approx(0.2)]
    (event,) = [r for r in rows if "event" in r]
    assert (event["event"], event["step"], event["action"]) == ("mode_collapse", 2, "adjust")
    assert event["values"]["beta_old"] == 0.1 and event["values"]["beta_new"] == pytest.approx(0.2)


def test_ppo_mode_collapse_raise_entropy_raises_ent_coef_and_a_resume_keeps_it(
    tiny_model_dir, prompt_file, tmp_path, monkeypatch
):
    """The samples' distinct-2 halving (0.8 -> 0.3) at iteration 2 fires the mode-collapse monitor with action
    raise_entropy: ent_coef goes 0 -> 0 + ent_adjust_step = 0.05 from iteration 3's update on (its row logs it,
    and the loss then holds the bonus: update_entropy is logged), the event holds old and new, and beta is left
    alone. Resumed from the checkpoint of iteration 2 (written after the event), iterations 3-4 train with 0.05
    again: the same rows and final weights as the uninterrupted run."""
    extra = ("iterations=4", "kl_target=null", "mode_collapse_action=raise_entropy", "ent_adjust_step=0.05")
    extra += ("save_every=1", "keep_checkpoints=4")
    _synthetic_stats(monkeypatch, lambda u: {"distinct_2": 0.8 if u == 1 else 0.3})
    out = tmp_path / "run"
    ppo.run(load_config(ppo.PPOConfig, None, _ppo_args(tiny_model_dir, prompt_file, out, *extra)))
    rows = _lines(out / "metrics.jsonl")
    metrics, events = [r for r in rows if "event" not in r], [r for r in rows if "event" in r]
    assert [r["ent_coef"] for r in metrics] == [0.0, 0.0, 0.05, 0.05]
    assert ["update_entropy" in r for r in metrics] == [False, False, True, True]
    assert [r["beta"] for r in metrics] == [0.05] * 4
    assert [(e["event"], e["step"], e["action"]) for e in events] == [("mode_collapse", 2, "adjust")]
    values = events[0]["values"]
    assert (values["ent_coef_old"], values["ent_coef_new"]) == (0.0, 0.05) and "beta_new" not in values

    # Resume a copy stopped after its checkpoint of iteration 2 (the replayed monitor's cooldown holds it quiet).
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    for name in ("checkpoints/step-000003", "checkpoints/step-000004", "final"):
        shutil.rmtree(resumed / name)
    _synthetic_stats(monkeypatch, lambda u: {"distinct_2": 0.3})
    args = _ppo_args(tiny_model_dir, prompt_file, resumed, *extra, "resume_from=latest")
    ppo.run(load_config(ppo.PPOConfig, None, args))
    resumed_rows = [r for r in _lines(resumed / "metrics.jsonl") if "event" not in r]
    assert [r["ent_coef"] for r in resumed_rows] == [0.0, 0.0, 0.05, 0.05]
    assert [r["update_entropy"] for r in resumed_rows[2:]] == pytest.approx(
        [r["update_entropy"] for r in metrics[2:]], rel=1e-5
    )
    a, b = load_file(str(resumed / "final" / "model.safetensors")), load_file(str(out / "final" / "model.safetensors"))
    for name in b:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("stage", ["online-dpo", "grpo"])
def test_raise_entropy_is_refused_where_there_is_no_entropy_bonus(stage, prompt_file, capsys):
    """online-dpo and grpo have no ent_coef: mode_collapse_action=raise_entropy is a config error naming the key,
    before any model loads (the model path does not exist)."""
    args = [stage, "model=/nonexistent", f"train_data={prompt_file}", "reward=_ppo_rewards:length"]
    assert main([*args, "mode_collapse_action=raise_entropy"]) == 2
    err = capsys.readouterr().err
    assert "mode_collapse_action" in err and "only ppo" in err and "Traceback" not in err


def test_build_prefs_ranks_by_the_length_penalised_score(tiny_model_dir, prompt_file, tmp_path):
    """reward=_ppo_rewards:length (characters / 10) less 0.1 x 6 response tokens: each pair's scores are the
    penalised ones, and the penalty is a recorded setting of the output."""
    out = tmp_path / "pairs.jsonl"
    args = [
        f"model={tiny_model_dir}", f"prompts={prompt_file}", f"output={out}", "n_samples=3", "max_new_tokens=6",
        "seed=3", "progress=false", "dtype=float32", "ranker=reward", "reward=_ppo_rewards:length",
        "length_penalty=0.1",
    ]  # fmt: skip
    summary = build_prefs.run(load_config(build_prefs.BuildPrefsConfig, None, args))
    pairs = _lines(out)
    assert pairs and summary["settings"]["length_penalty"] == 0.1
    for pair in pairs:
        assert pair["chosen_score"] == pytest.approx(len(pair["chosen"]) / 10 - 0.6, abs=1e-9)
        assert pair["rejected_score"] == pytest.approx(len(pair["rejected"]) / 10 - 0.6, abs=1e-9)


# --- 2. DPO likelihood displacement -------------------------------------------------------------------------------


def test_rpo_term_is_the_chosen_completions_token_mean_nll(tiny_model_dir, tiny_tokenizer):
    """On the tiny model: the DPO loss with rpo_alpha = 0.5 minus without is 0.5 x the chosen completion's summed
    log-prob over its own tokens (the prompt masked) divided by their number, negated."""
    enc = encode_pair(tiny_tokenizer, "the quick brown fox", "jumps over the lazy dog.", "no.", max_length=64)
    batch = collate_pairs([enc], tiny_tokenizer.pad_token_id)
    model = load_model(str(tiny_model_dir), "float32")
    cfg = load_config(online_dpo.OnlineDPOConfig, None, ["reward=_ppo_rewards:length"])
    with torch.no_grad():
        lp = pair_logprobs(model, batch, cfg.logprob_chunk_size, cfg.share_prompt)
        batch["ref"] = lp  # policy = reference: the DPO loss is ln 2
        plain = pair_outputs(cfg, model, Reference("precomputed"), batch)
        rpo_cfg = load_config(online_dpo.OnlineDPOConfig, None, ["reward=_ppo_rewards:length", "rpo_alpha=0.5"])
        rpo = pair_outputs(rpo_cfg, model, Reference("precomputed"), batch)
    n_chosen = len(enc.chosen_ids)
    assert plain.losses.item() == pytest.approx(math.log(2), abs=1e-6)
    assert (rpo.losses - plain.losses).item() == pytest.approx(-0.5 * lp.chosen_sum.item() / n_chosen, rel=1e-5)
    assert rpo.metrics["nll/chosen"] == pytest.approx(-lp.chosen_sum.item() / n_chosen, rel=1e-5)
    assert "nll/chosen" not in plain.metrics


# Chosen and rejected share all but one or two tokens: pushing the rejected reply down drags the chosen with it.
NEAR_PAIRS = [
    ("what is the capital of france?", "the capital of france is paris.", "the capital of france is the sea."),
    ("please write a short poem", "the sea and the sky are blue.", "the sea and the sky are lazy."),
    ("the quick brown fox", "jumps over the lazy dog.", "jumps over the lazy fox."),
    ("i need help", "here is a helpful answer to your question.", "here is a harmless answer to your question."),
]


def test_rpo_alpha_stops_the_chosen_log_prob_falling_under_dpo(tiny_model_dir, tmp_path):
    """The provoked case: DPO at lr 3e-2 on near-identical pairs, every pair in every step, 20 steps. Plain DPO
    widens the margin by lowering both replies: the chosen replies' log-prob falls (about -69 -> -110 nats) and the
    likelihood-displacement monitor fires. With rpo_alpha = 1 the chosen log-prob rises instead (to about -13)
    while the margin still grows, and the monitor stays quiet."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in NEAR_PAIRS * 2))

    def run(name: str, *extra: str):
        out = tmp_path / name
        args = [
            "dpo", f"model={tiny_model_dir}", f"train_data={data}", f"output_dir={out}", "batch_size=8",
            "micro_batch_size=8", "max_steps=20", "learning_rate=3e-2", "lr_scheduler=constant", "beta=0.1",
            "progress=false", "tensorboard=false", *extra,
        ]  # fmt: skip
        assert main(args) == 0
        rows = _lines(out / "metrics.jsonl")
        return [r for r in rows if "loss" in r], [r["event"] for r in rows if "event" in r]

    dpo_rows, dpo_events = run("dpo")
    rpo_rows, rpo_events = run("rpo", "rpo_alpha=1.0")
    start = dpo_rows[0]["logps/chosen"]
    assert rpo_rows[0]["logps/chosen"] == pytest.approx(start, abs=1e-4)  # same model, same first batch
    assert dpo_rows[-1]["logps/chosen"] < start - 20 and dpo_rows[-1]["rewards/margin"] > 5
    assert "likelihood_displacement" in dpo_events
    assert rpo_rows[-1]["logps/chosen"] > start + 20 and rpo_rows[-1]["rewards/margin"] > 1
    assert "likelihood_displacement" not in rpo_events


# --- 4. proxy-vs-gold divergence ----------------------------------------------------------------------------------


def test_gold_divergence_stop_keeps_the_best_gold_weights(tiny_model_dir, prompt_file, tmp_path, monkeypatch):
    """A stub gold score per iteration, 0.1 0.6 0.4 0.2 0.0, while the proxy rises 0.1 per iteration: over the gold
    window of 5, x = -2..2, sum x*y = -0.2 - 0.6 + 0.2 = -0.6, slope -0.06, fitted drop 0.24 >= 0.1, so the check
    fires at iteration 5 and stops the run; final/ holds iteration 2's policy (the best gold), said in the summary."""
    gold = {1: 0.1, 2: 0.6, 3: 0.4, 4: 0.2, 5: 0.0, 6: 0.0}
    _synthetic_stats(
        monkeypatch,
        lambda u: {"reward/mean": 0.1 * u, "gold_reward/mean": gold[u], "reward_length_corr": 0.0},
    )
    out = tmp_path / "run"
    extra = ("iterations=6", "gold_divergence_action=stop", "save_every=1", "keep_checkpoints=10")
    summary = ppo.run(load_config(ppo.PPOConfig, None, _ppo_args(tiny_model_dir, prompt_file, out, *extra)))
    assert summary["stopped_by"] == "reward_hacking" and summary["iterations"] == 5
    (event,) = summary["events"]
    assert event["action"] == "stop" and event["values"]["gold_drop"] == pytest.approx(0.24, abs=1e-9)
    assert summary["final_model_from"].startswith("iteration 2, the best gold_reward/mean (0.6)")
    final = load_model(str(out / "final"), "float32")
    w = final.model.layers[0].mlp.up_proj.weight
    best = load_file(str(out / "checkpoints" / "step-000002" / "weights.safetensors"))
    last = load_file(str(out / "checkpoints" / "step-000005" / "weights.safetensors"))
    torch.testing.assert_close(w, best["policy.model.layers.0.mlp.up_proj.weight"], rtol=0, atol=0)
    assert not torch.equal(w, last["policy.model.layers.0.mlp.up_proj.weight"])


def test_gold_divergence_stop_from_a_real_gold_scorer(tiny_model_dir, prompt_file, tmp_path):
    """End to end, nothing stubbed: the proxy pays characters / 10 (_ppo_rewards:length), the gold judge on
    held-out prompts takes the characters off (_ppo_rewards:shortness), evaluated every iteration. PPO lengthens
    the replies, so the gold rows fall while the proxy rises; the check (a fitted fall of at least 0.1 over 5 gold
    rows) stops the run before its 10 iterations (at lr 3e-2 it fired at iteration 5 for each of seeds 0-3), and
    final/ holds the weights of the best gold row logged (the starting policy's at step 0 counts; with seed 3 it
    is a later one), said in the summary."""
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in HELD_OUT))
    out = tmp_path / "run"
    extra = (
        "iterations=10", "learning_rate=3e-2", "seed=3", "gold_reward=_ppo_rewards:shortness",
        f"gold_prompts={held_out}", "gold_every=1", "gold_divergence_action=stop", "save_every=1",
        "keep_checkpoints=10",
    )  # fmt: skip
    summary = ppo.run(load_config(ppo.PPOConfig, None, _ppo_args(tiny_model_dir, prompt_file, out, *extra)))
    rows = _lines(out / "metrics.jsonl")
    (event,) = [r for r in rows if "event" in r]
    gold = {r["step"]: r["gold_reward/mean"] for r in rows if "gold_reward/mean" in r}
    assert summary["stopped_by"] == "reward_hacking" and summary["iterations"] == event["step"] < 10
    assert event["action"] == "stop" and event["values"]["gold_drop"] >= 0.1 and event["values"]["proxy_slope"] > 0
    best = max(gold, key=lambda step: gold[step])  # the first of equals, as BestGold keeps it
    assert summary["final_model_from"].startswith(f"iteration {best}")
    assert f"the best gold_reward/mean ({gold[best]:.4g})" in summary["final_model_from"]
    if best == 0:
        kept = load_model(str(tiny_model_dir), "float32").model.layers[0].mlp.up_proj.weight
    else:
        weights = load_file(str(out / "checkpoints" / f"step-{best:06d}" / "weights.safetensors"))
        kept = weights["policy.model.layers.0.mlp.up_proj.weight"]
    last = load_file(str(out / "checkpoints" / f"step-{event['step']:06d}" / "weights.safetensors"))
    w = load_model(str(out / "final"), "float32").model.layers[0].mlp.up_proj.weight
    torch.testing.assert_close(w, kept, rtol=0, atol=0)
    assert not torch.equal(w, last["policy.model.layers.0.mlp.up_proj.weight"])


def test_without_stop_the_final_model_is_the_last(tiny_model_dir, prompt_file, tmp_path):
    out = tmp_path / "run"
    summary = ppo.run(load_config(ppo.PPOConfig, None, _ppo_args(tiny_model_dir, prompt_file, out, "iterations=1")))
    assert summary["final_model_from"] == "the last iteration"


# --- 5. Constitutional AI: written guidelines for edge cases ------------------------------------------------------

GUIDED_CONSTITUTION = """
name: guided
principles:
  - {id: politeness, priority: 5, critique_request: c, revision_request: r, comparison: "Which response is more polite?"}
  - {id: concision, priority: 3, critique_request: c, revision_request: r, comparison: "Which response is shorter?"}
guidelines:
  - id: quoting
    text: Quoting a word the user asked about is not rudeness
    applies_to: [politeness]
    check: quoting_asked_words
"""


def _guided(tmp_path, text: str = GUIDED_CONSTITUTION):
    path = tmp_path / "constitution.yaml"
    path.write_text(text)
    return load_constitution(path)


def test_guidelines_are_parsed_and_checked(tmp_path):
    constitution = _guided(tmp_path)
    (g,) = constitution.guidelines
    assert (g.id, g.applies_to, g.check) == ("quoting", ("politeness",), "quoting_asked_words")
    assert constitution.guidelines_for("politeness") == [g] and constitution.guidelines_for("concision") == []
    assert load_constitution().guidelines == ()  # the shipped constitution has none
    with pytest.raises(ConfigError, match=r"guideline 1 \('quoting'\): applies_to names \['kindness'\]"):
        _guided(tmp_path, GUIDED_CONSTITUTION.replace("[politeness]", "[kindness]"))
    with pytest.raises(ConfigError, match="field 'text'"):
        _guided(tmp_path, GUIDED_CONSTITUTION.replace("text: Quoting", "txt: Quoting"))


def test_the_judge_reads_the_guideline_with_the_principle_it_applies_to(tmp_path, monkeypatch):
    """Each judge question is the principle's comparison question, plus its guidelines' texts when it has any."""
    asked = []

    def fake_judge_pairs(model, tokenizer, questions, *args):
        asked.extend(q.instruction for q in questions)
        return [JudgeResult(0.5, 0.5, 0.5, 1.0)] * len(questions)

    monkeypatch.setattr(judge, "judge_pairs", fake_judge_pairs)
    constitution = _guided(tmp_path)
    pj = judge.PairwiseJudge(None, None, constitution)
    (comparison,) = pj.compare([("what does damn mean?", "a", "b")], [list(constitution.principles)])
    assert asked == [
        "Which response is more polite? Guidelines for edge cases: Quoting a word the user asked about is not "
        "rudeness.",
        "Which response is shorter?",
    ]
    assert comparison.guided == ("quoting",)


def test_politeness_guideline_by_hand():
    """Asked "what does damn mean?": "damn is a mild curse, thanks for asking." scores 1 (thanks) - 3 (damn) = -2
    under the plain check, 1 under the guideline (the user brought the word up); "hell" the user did not ask
    about still costs 3: 0 - 3 = -3."""
    prompt = "what does damn mean?"
    assert politeness(prompt, "damn is a mild curse, thanks for asking.") == -2.0
    assert politeness_quoting_allowed(prompt, "damn is a mild curse, thanks for asking.") == 1.0
    assert politeness_quoting_allowed(prompt, "what the hell.") == -3.0
    chat = [{"role": "user", "content": "what does damn mean?"}, {"role": "assistant", "content": "hell"}]
    assert politeness_quoting_allowed(chat, "damn, hell.") == -3.0  # only the user's turns count as asked


def test_guided_checks_ranker_resolves_the_conflict_and_counts_it(tmp_path):
    """Plain checks rank the refusal above the answer that quotes the asked word (politeness 0 > -2); with the
    guideline the answer wins (1 > 0): one response's verdict changed, one conflict resolved."""
    prompt, answer, refusal = "what does damn mean?", "damn is a mild curse, thanks for asking.", "i cannot say."
    constitution = _guided(tmp_path)
    plain = ChecksRanker.from_constitution(constitution.principles)
    guided = GuidedChecksRanker.from_guidelines(constitution)
    assert plain.score(prompt, [answer, refusal]) == [0.0, 1.0]
    assert guided.score(prompt, [answer, refusal]) == [1.0, 0.0]
    assert guided.take_resolved() == 1 and guided.take_resolved() == 0
    assert type(GuidedChecksRanker.from_guidelines(load_constitution())) is ChecksRanker  # no guidelines: as before
    with pytest.raises(ConfigError, match="guideline 'quoting' names check 'nope'"):
        GuidedChecksRanker.from_guidelines(_guided(tmp_path, GUIDED_CONSTITUTION.replace("quoting_asked_words", "nope")))


def test_build_prefs_counts_the_conflicts_guidelines_resolved(tiny_model_dir, tmp_path, monkeypatch):
    """reward=checks under a constitution with the quoting guideline; the sampler (stubbed) answers each prompt
    with the reply quoting the asked word and a refusal. Each of the 3 prompts has one response whose politeness
    verdict the guideline changed, so the labelling summary counts 3, and the quoting reply is chosen each time."""
    replies = ["damn is a mild curse, thanks for asking.", "i cannot say."]

    def stub_sampler(cfg, tokenizer, device, **kwargs):
        return lambda prompt_ids, sampling: [
            Generation(ids, [5, 6], replies[i % 2], True) for i, ids in enumerate(prompt_ids)
        ]

    monkeypatch.setattr(build_prefs, "load_sampler", stub_sampler)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"what does damn mean in {w}?"}) + "\n" for w in "abc"))
    (tmp_path / "c.yaml").write_text(GUIDED_CONSTITUTION)
    out = tmp_path / "pairs.jsonl"
    args = [
        f"model={tiny_model_dir}", f"prompts={prompts}", f"output={out}", "n_samples=2", "progress=false",
        "ranker=reward", "reward=checks", f"judge_constitution={tmp_path / 'c.yaml'}",
    ]  # fmt: skip
    summary = build_prefs.run(load_config(build_prefs.BuildPrefsConfig, None, args))
    assert summary["guideline_resolved_conflicts"] == 3 and summary["pairs"] == 3
    assert {p["chosen"] for p in _lines(out)} == {replies[0]}
