"""`alignkit online-dpo` on a tiny model: an end-to-end run through the CLI and what it writes, the per-round
best-vs-worst pairing on hand-made scores, one update against a step computed by hand with the DPO loss of
losses/preference.py, exact resume after SIGINT, and configuration errors that name the field."""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import math

import pytest
import torch
from _fake_vllm import FakeVLLMSampler
from _signal_monitor import SignalAt
from safetensors.torch import load_file

from alignkit import cli
from alignkit.config import ConfigError, load_config
from alignkit.data.tokenize import EncodedPair
from alignkit.errors import TrainingInterrupted
from alignkit.evaluation.monitors import MonitorSet
from alignkit.losses.preference import dpo_loss
from alignkit.models.forward import sequence_logprobs
from alignkit.models.loading import load_model
from alignkit.stages import online_dpo
from alignkit.training import distributed, online_engine
from alignkit.training.distributed import StepModule
from alignkit.training.preference import PairExample, PairLogprobs

from conftest import build_tiny_model

PROMPTS = [
    "what is the capital of france?",
    "please write a short poem",
    "the quick brown fox",
    "i need help",
]
LOGGED = {
    "step", "score/mean", "score/std", "reward/mean", "reward_length_corr", "pairs", "ties", "left_out", "lr",
    "kl", "kl/per_token", "len/mean", "len/std", "eos_frac", "distinct_2", "nonfinite_skipped",
}  # fmt: skip
UPDATE_LOGGED = {
    "pairs/score_margin", "loss", "rewards/accuracy", "rewards/margin", "rewards/chosen", "rewards/rejected",
    "logps/chosen", "logps/rejected", "grad_norm",
}  # fmt: skip
TIMING = {"rollout_s", "update_s", "elapsed_s"}


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
        "rounds=2",
        "prompts_per_round=4",
        "samples_per_prompt=3",
        "minibatch_size=4",
        "micro_batch_size=2",
        "max_new_tokens=6",
        "learning_rate=1e-2",
        "progress=false",
        "tensorboard=false",
        *extra,
    ]


def _rows(run_dir) -> list[dict]:
    """The per-round rows of metrics.jsonl (monitor events, also rows there, left out)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "event" not in r]


def test_end_to_end_writes_metrics_samples_and_final_model(tiny_model_dir, prompt_file, tmp_path):
    """Two rounds through the CLI (full fine-tuning, frozen copy as reference). Round 1 samples the policy
    before any update, so its KL to the reference is 0 and, with one optimizer step on all of its pairs, its
    DPO loss is ln 2 (every log-ratio 0: -log sigmoid(0)). The samples file marks each pair: per prompt the
    chosen sample has the highest score of its 3 and the rejected the lowest, and the logged counts and
    margins are those of the file."""
    out = tmp_path / "run"
    assert cli.main(["online-dpo", *_args(tiny_model_dir, prompt_file, out)]) == 0
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    first, second = rows
    for row in rows:
        assert LOGGED <= set(row), LOGGED - set(row)
        assert all(isinstance(v, (int, float)) for v in row.values())
    assert first["pairs"] > 0 and UPDATE_LOGGED <= set(first), UPDATE_LOGGED - set(first)
    assert first["kl"] == pytest.approx(0.0, abs=1e-6) and first["kl/per_token"] == pytest.approx(
        0.0, abs=1e-7
    )
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["rewards/margin"] == pytest.approx(0.0, abs=1e-5)
    assert second["kl"] != 0.0  # the policy moved off the reference

    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 4 * 3 and {s["prompt"] for s in samples} == set(PROMPTS)
    for step, row in ((1, first), (2, second)):
        mine = [s for s in samples if s["step"] == step]
        assert [s["score"] for s in mine] == pytest.approx([len(s["response"]) / 10 for s in mine], abs=1e-6)
        assert row["score/mean"] == pytest.approx(sum(s["score"] for s in mine) / 12, abs=1e-6)
        margins = []
        for j in range(4):
            group = mine[3 * j : 3 * j + 3]
            assert len({s["prompt"] for s in group}) == 1
            roles = [s["pair"] for s in group]
            if "chosen" in roles:
                chosen, rejected = group[roles.index("chosen")], group[roles.index("rejected")]
                assert chosen["score"] == max(s["score"] for s in group) > rejected["score"]
                assert rejected["score"] == min(s["score"] for s in group)
                margins.append(chosen["score"] - rejected["score"])
            else:
                assert roles == [None] * 3
        assert row["pairs"] == len(margins) and row["pairs"] + row["ties"] <= 4
        if margins:
            assert row["pairs/score_margin"] == pytest.approx(sum(margins) / len(margins), abs=1e-6)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["reference"] == "frozen copy"
    assert summary["pairs_by_round"] == [first["pairs"], second["pairs"]]
    final = load_model(str(out / "final"), "float32")  # as trained (fp32 weights), on any CPU
    ckpt = load_file(str(out / "checkpoints" / "step-000002" / "weights.safetensors"))
    w = final.model.layers[0].mlp.up_proj.weight
    torch.testing.assert_close(w, ckpt["model.layers.0.mlp.up_proj.weight"], rtol=0, atol=0)
    assert not torch.equal(w, load_model(str(tiny_model_dir), "float32").model.layers[0].mlp.up_proj.weight)


def test_pairing_is_best_vs_worst_and_skips_ties():
    """Three prompts of three samples each, scores by hand:
    prompt 0: [1, 3, 2]      -> best 1, worst 0: the pair (1, 0)
    prompt 1: [5, 5, 5]      -> best and worst score the same: a tie, no pair
    prompt 2: "g", "h", "g" with [0, 4, 9] -> the second "g" repeats the first and is left out (its 9 is
              never seen), so best 7 ("h", 4), worst 6 ("g", 0): the pair (7, 6)."""
    texts = ["a", "b", "c", "d", "e", "f", "g", "h", "g"]
    scores = [1.0, 3.0, 2.0, 5.0, 5.0, 5.0, 0.0, 4.0, 9.0]
    out = online_dpo.pair_samples(texts, scores, 3)
    assert out.pairs == [(1, 0), (7, 6)] and out.n_ties == 1 and out.n_left_out == 1
    # Equal best scores: the earliest is chosen; equal worst: the earliest is rejected.
    assert online_dpo.pair_samples(["x", "y", "z", "w"], [2.0, 2.0, 0.0, 0.0], 4).pairs == [(0, 2)]


def test_update_is_a_step_on_the_dpo_loss(tiny_tokenizer):
    """One dpo_update (3 pairs, micro-batches of 2, packed prompt) against a step by hand: the summed
    log-probs of each side on the plain path, losses.preference.dpo_loss with the given reference log-probs
    and beta, its mean over the 3 pairs, and one SGD step (SGD, not Adam, so the loss's scale counts)."""
    torch.manual_seed(0)
    model = build_tiny_model(len(tiny_tokenizer))
    by_hand = copy.deepcopy(model)
    pairs = [
        EncodedPair([5, 6, 7], [8, 9, 2], [10, 2], False),
        EncodedPair([11, 12], [13, 14, 15, 2], [16, 17], False),
        EncodedPair([18, 19, 20, 21], [22], [23, 24, 25], False),
    ]
    ref = torch.tensor([[-9.0, -7.0], [-12.0, -8.5], [-3.0, -11.0]])  # (3, 2) reference sums, chosen/rejected
    examples = [
        PairExample(p, PairLogprobs(r[0], r[1], r[0] / len(p.chosen_ids), r[1] / len(p.rejected_ids)))
        for p, r in zip(pairs, ref)
    ]
    cfg = load_config(
        online_dpo.OnlineDPOConfig,
        None,
        # fp32 compute, as the step by hand, on any CPU
        ["reward=_ppo_rewards:length", "beta=0.5", "micro_batch_size=2", "max_grad_norm=null", "dtype=float32"],
    )

    def sgd(m):
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)

    optimizer, scheduler = sgd(model)
    params = [p for p in model.parameters() if p.requires_grad]
    stepper = StepModule(model, functools.partial(online_dpo.pair_losses, cfg))
    stats = online_dpo.dpo_update(cfg, stepper, examples, optimizer, scheduler, params, pad_id=0)

    def side(rows):  # summed log-probs of the completions, one plain right-padded row each
        width = max(len(p) + len(c) for p, c in rows)
        ids, attn, mask = (torch.zeros(len(rows), width, dtype=torch.long) for _ in range(3))
        for b, (p, c) in enumerate(rows):
            ids[b, : len(p + c)] = torch.tensor(p + c)
            attn[b, : len(p + c)] = 1
            mask[b, len(p) : len(p + c)] = 1
        return sequence_logprobs(by_hand, ids, attn, mask).sum

    chosen = side([(p.prompt_ids, p.chosen_ids) for p in pairs])
    rejected = side([(p.prompt_ids, p.rejected_ids) for p in pairs])
    loss = dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], beta=0.5).losses.mean()
    hand_opt, _ = sgd(by_hand)
    loss.backward()
    hand_opt.step()

    assert stats["loss"] == pytest.approx(loss.item(), abs=1e-5)
    assert stats["loss"] != pytest.approx(math.log(2), abs=1e-3)  # the reference log-probs mattered
    for (name, a), b in zip(model.named_parameters(), by_hand.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6, msg=name)
    assert not torch.equal(
        model.model.embed_tokens.weight, build_tiny_model(len(tiny_tokenizer)).model.embed_tokens.weight
    )


def test_lora_resume_after_sigint_equals_uninterrupted_run(tiny_model_dir, prompt_file, tmp_path):
    """LoRA (the reference is the base with the adapters off), 3 rounds. SIGINT during round 2 -> checkpoint
    -> TrainingInterrupted; resuming from it gives the metrics and bit-identical final weights of a run that
    was never interrupted: sampling and minibatch order are seeded per round, and the checkpoint holds the
    adapters, AdamW, the schedule, the RNG and the round counter."""
    lora = ("lora=true", "lora_r=4", "rounds=3", "dpo_epochs=2", "minibatch_size=2", "lr_scheduler=linear")
    whole = tmp_path / "whole"
    summary = online_dpo.run(
        load_config(online_dpo.OnlineDPOConfig, None, _args(tiny_model_dir, prompt_file, whole, *lora))
    )

    cut = tmp_path / "cut"
    cfg = load_config(online_dpo.OnlineDPOConfig, None, _args(tiny_model_dir, prompt_file, cut, *lora))
    with pytest.raises(TrainingInterrupted) as info:
        online_dpo.run(cfg, monitors=MonitorSet([SignalAt(2)]))
    assert info.value.checkpoint.endswith("step-000002")
    assert [r["step"] for r in _rows(cut)] == [1, 2]
    resume = (*lora, f"resume_from={info.value.checkpoint}")
    online_dpo.run(
        load_config(online_dpo.OnlineDPOConfig, None, _args(tiny_model_dir, prompt_file, cut, *resume))
    )

    strip = [{k: v for k, v in r.items() if k not in TIMING} for r in _rows(whole)]
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in _rows(cut)] == strip
    assert len(strip) == 3 and strip[2]["lr"] < strip[1]["lr"] < strip[0]["lr"]  # the schedule resumed too
    assert (whole / "samples.jsonl").read_text() == (cut / "samples.jsonl").read_text()
    a = load_file(str(whole / "final" / "model.safetensors"))
    b = load_file(str(cut / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and not any("lora" in k for k in a)  # merged into a plain model
    assert all(torch.equal(a[k], b[k]) for k in a)
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    assert not torch.equal(
        a["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"]
    )
    assert summary["reference"] == "policy base with adapters disabled"


def test_gradient_checkpointing_with_lora_gives_the_same_run(tiny_model_dir, prompt_file, tmp_path):
    """gradient_checkpointing=true with LoRA (the reference passes, adapters off, run without gradients, so only
    the policy's adapter is ever recomputed): the same samples, logs and final policy (atol 1e-6)."""
    runs = {}
    for checkpointing in ("false", "true"):
        out = tmp_path / checkpointing
        args = _args(
            tiny_model_dir,
            prompt_file,
            out,
            "lora=true",
            "lora_r=4",
            f"gradient_checkpointing={checkpointing}",
        )
        online_dpo.run(load_config(online_dpo.OnlineDPOConfig, None, args))
        runs[checkpointing] = out
    plain, checkpointed = runs["false"], runs["true"]
    assert (checkpointed / "samples.jsonl").read_text() == (plain / "samples.jsonl").read_text()
    assert [r["loss"] for r in _rows(checkpointed)] == pytest.approx(
        [r["loss"] for r in _rows(plain)], abs=1e-6
    )
    a = load_file(str(plain / "final" / "model.safetensors"))
    b = load_file(str(checkpointed / "final" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=0, msg=name)


def test_vllm_backend_with_lora_samples_what_hf_samples(tiny_model_dir, prompt_file, tmp_path, monkeypatch):
    """lora=true, generation_backend=vllm, the engine faked (tests/_fake_vllm.py: a plain model built from the
    model directory, as vLLM builds it, taking the policy's weights through the real update_weights with the
    adapter merged). Interrupted after round 1 and resumed, it logs and samples what generation_backend=hf
    does, to the bit, and saves the same final model. The first engine takes no weights (the fresh adapter is
    the base it was built on); the resumed run's engine, on the base again, takes the checkpoint's policy
    before its first round and the updated one before the next."""
    lora = ("lora=true", "lora_r=4", "rounds=3")
    hf = tmp_path / "hf"
    online_dpo.run(
        load_config(online_dpo.OnlineDPOConfig, None, _args(tiny_model_dir, prompt_file, hf, *lora))
    )

    monkeypatch.setattr(online_engine, "check_generation_backend", lambda backend: None)  # vllm is not here
    monkeypatch.setattr(online_engine, "vllm_sampler", FakeVLLMSampler)
    monkeypatch.setattr(FakeVLLMSampler, "built", [])
    vllm = tmp_path / "vllm"
    args = _args(tiny_model_dir, prompt_file, vllm, *lora, "generation_backend=vllm")
    with pytest.raises(TrainingInterrupted) as info:
        online_dpo.run(
            load_config(online_dpo.OnlineDPOConfig, None, args), monitors=MonitorSet([SignalAt(1)])
        )
    online_dpo.run(
        load_config(online_dpo.OnlineDPOConfig, None, [*args, f"resume_from={info.value.checkpoint}"])
    )

    assert [len(engine.llm.calls) for engine in FakeVLLMSampler.built] == [0, 2]
    strip = [{k: v for k, v in r.items() if k not in TIMING} for r in _rows(hf)]
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in _rows(vllm)] == strip
    assert len(strip) == 3
    assert (vllm / "samples.jsonl").read_text() == (hf / "samples.jsonl").read_text()
    a, b = (
        load_file(str(hf / "final" / "model.safetensors")),
        load_file(str(vllm / "final" / "model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "extra, field",
    [
        (["samples_per_prompt=1"], "samples_per_prompt"),
        (["epochs=2"], "epochs"),
        (["temperature=0"], "temperature"),
        (["dpo_epochs=0"], "dpo_epochs"),
        (["generation_backend=vllm"], "generation_backend"),
        (["loss=orpo"], "loss"),
    ],
)
def test_config_errors_name_the_field(extra, field, tiny_model_dir, prompt_file, tmp_path, capsys):
    """Each is refused before anything is loaded or written, with a message naming the field."""
    if field == "generation_backend" and importlib.util.find_spec("vllm") and torch.cuda.is_available():
        pytest.skip("vllm can run here")
    out = tmp_path / "run"
    assert cli.main(["online-dpo", *_args(tiny_model_dir, prompt_file, out, *extra)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and field in err
    assert not out.exists()


def test_missing_reward_is_named(tiny_model_dir, capsys):
    assert cli.main(["online-dpo", f"model={tiny_model_dir}"]) == 2
    assert "missing required config field 'reward'" in capsys.readouterr().err


def test_launch_refuses_deepspeed_and_vllm_in_several_processes(monkeypatch):
    """online-dpo runs data parallel (DDP) or under FSDP in several processes (tests/test_distributed.py):
    DeepSpeed is refused, and so is a vLLM engine in several processes, each with a message naming what to do;
    one process passes."""
    cfg = load_config(online_dpo.OnlineDPOConfig, None, ["reward=_ppo_rewards:length"])
    online_dpo.check_launch(cfg)
    monkeypatch.setattr(distributed, "engine", lambda: "fsdp")
    online_dpo.check_launch(cfg)
    monkeypatch.setattr(distributed, "engine", lambda: "deepspeed")
    with pytest.raises(
        ConfigError, match="online-dpo runs data parallel .DDP. or sharded under FSDP, not under DeepSpeed"
    ):
        online_dpo.check_launch(cfg)
    monkeypatch.setattr(distributed, "engine", lambda: "ddp")
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    online_dpo.check_launch(cfg)
    cfg.generation_backend = "vllm"
    with pytest.raises(ConfigError, match="generation_backend=vllm in 2 processes is not supported"):
        online_dpo.check_launch(cfg)
