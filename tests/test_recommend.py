"""`alignkit recommend`: each rule of the seed article's selection guide gives its documented answer, and the
memory estimate is the documented formula, checked by hand on one case."""

from __future__ import annotations

import io
import json

import pytest

from alignkit.cli import main
from alignkit.config import ConfigError, load_config
from alignkit.pipelines.methods import METHODS
from alignkit.pipelines.recommend import RecommendConfig, evidence_lines, memory_gb, recommend


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
    """7B, bf16, 30 GB, reward model: PPO with LoRA needs 7 x 2 x 2 (base + reward model) + 7 x 0.01 x 2 x 16
    (fp32 adapters of policy and value: weight 4 + gradient 4 + Adam 8) = 30.24 GB > 30, so it goes last despite
    the high budget; GRPO needs 28 + 7 x 0.01 x 16 = 29.12 GB and fits."""
    choices = recommend(load_config(RecommendConfig, None, [], data="prompts+reward", tuning="high", memory_gb=30))
    assert [(c.method, c.fits) for c in choices] == [("grpo", "lora"), ("online_dpo", "lora"), ("ppo", "no")]
    assert choices[-1].memory_lora_gb == pytest.approx(30.24)
    assert choices[0].memory_lora_gb == pytest.approx(29.12)
    assert "does not fit 30 GB even with LoRA" in choices[-1].reasons[-1]
    dpo = recommend(load_config(RecommendConfig, None, [], data="pairs"))[0]  # 7 x 2 + 7 x 0.01 x 16
    assert (dpo.method, dpo.fits, dpo.memory_lora_gb) == ("dpo", "lora", pytest.approx(15.12))


def test_memory_estimate_by_hand():
    """DPO, 1B parameters, full fine-tuning in bf16 (b = 2): the policy's weights, gradients and Adam moments,
    1e9 x (2 + 2 + 8) = 12 GB; its reference log-probs are precomputed by default, so no reference is held
    (before: + 2 GB for one). With reference=copy the frozen copy's weights 1e9 x 2 = 2 GB: 14 GB. In fp32:
    1e9 x (4 + 4 + 8) = 16 GB, and 20 GB with a copy. LoRA: the base 1e9 x 2 shared by the reference (adapters
    off, or precomputed) + adapters 0.01 x 16 = 2.16 GB; a copy adds its 2 GB: 4.16 GB. KTO and IPO as DPO.
    PPO full with a reward model: policy and value trained (2 x 12) + its frozen reference copy and the reward
    model (2 x 2) = 28 GB; with LoRA the base once and the reward model (2 x 2) plus adapters for two trained
    models, fp32 whatever b is (0.01 x 2 x 16 = 0.32): 4.32 GB. Online DPO full, reward a function: 12 + its
    reference copy 2 = 14 GB."""
    assert memory_gb("dpo", 1.0, 2, lora=False, reward_is_model=False) == pytest.approx(12.0)
    assert memory_gb("dpo", 1.0, 2, lora=False, reward_is_model=False, reference="copy") == pytest.approx(14.0)
    assert memory_gb("dpo", 1.0, 4, lora=False, reward_is_model=False) == pytest.approx(16.0)
    assert memory_gb("dpo", 1.0, 4, lora=False, reward_is_model=False, reference="copy") == pytest.approx(20.0)
    assert memory_gb("dpo", 1.0, 2, lora=True, reward_is_model=False) == pytest.approx(2.16)
    assert memory_gb("dpo", 1.0, 2, lora=True, reward_is_model=False, reference="copy") == pytest.approx(4.16)
    for offline in ("ipo", "kto"):
        assert memory_gb(offline, 1.0, 2, lora=False, reward_is_model=True) == pytest.approx(12.0)
    assert memory_gb("online_dpo", 1.0, 2, lora=False, reward_is_model=False) == pytest.approx(14.0)
    assert memory_gb("ppo", 1.0, 2, lora=False, reward_is_model=True) == pytest.approx(28.0)
    assert memory_gb("ppo", 1.0, 2, lora=True, reward_is_model=True) == pytest.approx(4.32)
    assert memory_gb("orpo", 1.0, 2, lora=False, reward_is_model=True) == pytest.approx(12.0)  # no reference


def test_cli_prints_the_ranking_and_the_caveat(capsys):
    assert main(["recommend", "data=pairs", "model_size=7", "memory_gb=24", "tuning=low"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[2].split()[:2] == ["1", "dpo"]
    assert "7B and below: DPO" in out and "may not carry over" in out


def test_unknown_data_format_is_a_config_error():
    with pytest.raises(ConfigError, match="data"):
        load_config(RecommendConfig, None, ["data=images"])


def test_memory_estimates_match_the_quick_comparisons_measured_model_state(tiny_model_dir, tmp_path, capsys):
    """Every method of the quick comparison (LoRA, float32: b = 4, the gold a function: no reward model): the
    estimate for P = the base's parameters and the run's own adapter share (trainable / (trained models x P);
    rank 4 on a 32-wide model is far from 7B's 1%) against the model state each run measured at the end of
    training (weights, a gradient per trained parameter, Adam's state; summary.json's model_state_bytes),
    within 25%. Peak RSS cannot be the yardstick here: it is the whole process (interpreter, torch, this test
    session), some hundreds of MB around a model state of well under 1 MB."""
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"question {i}?", "chosen": f"a good answer {i}.", "rejected": "no."} for i in range(10)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "cmp"
    methods = list(METHODS)
    args = [
        "compare", f"model={tiny_model_dir}", f"output_dir={out}", f"pairs={pairs}", "gold=_ppo_rewards:length",
        f"methods=[{','.join(methods)}]", "seeds=[0]", "quick=true", "progress=false",
    ]  # fmt: skip
    assert main(args) == 0
    capsys.readouterr()
    runs = json.loads((out / "compare.json").read_text())["runs"]
    assert [r["method"] for r in runs] == methods
    for r in runs:
        base = r["total_parameters"] - r["trainable_parameters"]
        share = r["trainable_parameters"] / (METHODS[r["method"]].trained * base)
        estimate = 1e9 * memory_gb(r["method"], base / 1e9, 4, lora=True, reward_is_model=False, adapter_share=share)
        assert r["model_state_bytes"] == pytest.approx(estimate, rel=0.25), r["method"]


def test_memory_estimates_match_the_shipped_sentiment_comparisons_measured_model_state():
    """The same check on the shipped comparison of the embedded 135M model (LoRA r16, float32, every method x 2
    seeds, alignkit/assets/compare-sentiment.json): each run's measured model state within 25% of the estimate
    (measured: offline methods exact, online ones 3-6% under it)."""
    from importlib.resources import files

    runs = json.loads((files("alignkit") / "assets" / "compare-sentiment.json").read_text())["runs"]
    assert {r["method"] for r in runs} == set(METHODS) and len(runs) == 2 * len(METHODS)
    for r in runs:
        base = r["total_parameters"] - r["trainable_parameters"]
        share = r["trainable_parameters"] / (METHODS[r["method"]].trained * base)
        estimate = 1e9 * memory_gb(r["method"], base / 1e9, 4, lora=True, reward_is_model=False, adapter_share=share)
        assert r["model_state_bytes"] == pytest.approx(estimate, rel=0.25), r["method"]


def test_full_fine_tuning_estimate_holds_no_reference_when_it_is_precomputed(tiny_model_dir, tmp_path, capsys):
    """Full fine-tuning in float32 (b = 4), the gold a function: DPO and KTO precompute their reference's
    log-probs (reference=auto), so the model state they measure is the policy's alone, P x (4 + 4 + 8) = 16P,
    which the estimate matches to 1% (it counted a reference too before: 20P, 25% over). Online DPO holds a
    frozen copy of the base as its reference, P x 4 more: 20P (the online engine measures the copy too; all
    three measure within 0.02% of the estimate)."""
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"question {i}?", "chosen": f"a good answer {i}.", "rejected": "no."} for i in range(10)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "cmp"
    args = [
        "compare", f"model={tiny_model_dir}", f"output_dir={out}", f"pairs={pairs}", "gold=_ppo_rewards:length",
        "methods=[dpo,kto,online_dpo]", "seeds=[0]", "quick=true", "progress=false", "lora=false",
    ]  # fmt: skip
    assert main(args) == 0
    capsys.readouterr()
    runs = {r["method"]: r for r in json.loads((out / "compare.json").read_text())["runs"]}
    for method, per_parameter in [("dpo", 16), ("kto", 16), ("online_dpo", 20)]:
        p = runs[method]["total_parameters"]
        assert runs[method]["trainable_parameters"] == p  # full fine-tuning: every parameter trained
        estimate = 1e9 * memory_gb(method, p / 1e9, 4, lora=False, reward_is_model=False)
        assert estimate == pytest.approx(per_parameter * p)
        assert runs[method]["model_state_bytes"] == pytest.approx(estimate, rel=0.01), method


class FakeTerminal(io.StringIO):
    """A stdin that is a terminal, its lines the user's answers."""

    def isatty(self) -> bool:
        return True


def test_on_a_terminal_with_no_keys_it_asks_each_question_then_answers(monkeypatch, capsys):
    """Answers: binary data; a bad size (re-asked with the config's refusal), then 70; memory left at its
    default (24); high tuning. KTO is the only candidate for binary feedback: 70B full needs 70 x 12 = 840 GB
    (its reference precomputed); LoRA 70 x 2 + 0.7 x 16 = 151.2 GB; neither fits 24 GB."""
    monkeypatch.setattr("sys.stdin", FakeTerminal("binary\n-3\n70\n\nhigh\n"))
    assert main(["recommend"]) == 0
    captured = capsys.readouterr()
    questions = [q for q in captured.err.split("]: ") if "?" in q]
    assert [q.split("?")[0].strip().splitlines()[-1] for q in questions] == [
        "What data do you have", "Model size, in billions of parameters", "Model size, in billions of parameters",
        "Memory of one accelerator, in GB", "How much hyperparameter tuning can the team afford",
    ]  # fmt: skip
    assert "(demonstrations | pairs | binary | prompts+reward) [pairs]" in captured.err
    refusal = captured.err.split("Model size")[1]  # after the first size question: the refusal of -3
    # Typed at the prompt, so the refusal says so (it said "(from the command line)" before).
    assert refusal.strip().endswith("config key 'model_size' must be > 0, got -3.0 (from your answer)")
    assert "command line" not in captured.err
    assert captured.out.startswith("alignkit recommend: data=binary, 70B parameters, 24 GB, tuning budget high")
    row = captured.out.splitlines()[2].split()
    assert row[:6] == ["1", "kto", "2", "840.0", "151.2", "no"]


def test_without_a_terminal_or_with_a_key_it_asks_nothing(monkeypatch, capsys):
    """Piped stdin and no keys: the defaults (pairs, 7B, 24 GB, low), as before; a terminal with a key given:
    that key and the defaults. Neither reads stdin."""
    monkeypatch.setattr("sys.stdin", io.StringIO("binary\n"))
    assert main(["recommend"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "data=pairs, 7B parameters, 24 GB, tuning budget low" in captured.out
    monkeypatch.setattr("sys.stdin", FakeTerminal("binary\n"))
    assert main(["recommend", "model_size=13"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "data=pairs, 13B parameters" in captured.out


def test_input_ending_before_the_answers_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", FakeTerminal("pairs\n"))
    assert main(["recommend"]) == 2
    assert "error: recommend: no answer to 'Model size, in billions of parameters?'" in capsys.readouterr().err


def test_evidence_cites_both_shipped_comparisons_with_the_figures_of_their_files(capsys):
    """Each shipped comparison (controlled sentiment, HH-RLHF harmlessness) is cited by its file, with the figures
    of that file, read back here."""
    from importlib.resources import files

    assert main(["recommend", "data=pairs"]) == 0
    evidence = capsys.readouterr().out.split("Measured evidence")[1]
    for name, filename in [("controlled sentiment", "compare-sentiment.json"),
                           ("HH-RLHF harmlessness", "compare-hh-harmless.json")]:  # fmt: skip
        shipped = json.loads((files("alignkit") / "assets" / filename).read_text())
        block = evidence.split(name)[1].split("HH-RLHF harmlessness")[0]  # this comparison's lines only
        assert block.startswith(f", measured on smollm2-135m-instruct (a small model: may not carry over), "
                                f"alignkit/assets/{filename}:")  # fmt: skip
        dpo = next(row for row in shipped["methods"] if row["method"] == "dpo")
        assert f"dpo: gold win rate {dpo['win_rate']:.3f} [{dpo['win_rate_ci95'][0]:.3f}" in block


def test_evidence_cites_the_measured_rows_of_a_shipped_comparison(tmp_path):
    """A compare.json in place of the sentiment comparison: the ranked methods it measured are cited with its
    figures and file; a method it did not run (ppo) is not; the other comparison is still unmeasured."""
    row = {"method": "dpo", "win_rate": 0.625, "win_rate_ci95": [0.5, 0.75], "seeds": 3,
           "win_rate_std_over_seeds": 0.05, "kl": 0.0123}  # fmt: skip
    measured = {"model": "smollm2-135m-instruct", "methods": [row, {**row, "method": "sft", "win_rate": 0.5}]}
    (tmp_path / "compare-sentiment.json").write_text(json.dumps(measured))
    assert evidence_lines(["dpo", "ppo", "sft"], tmp_path) == [
        "controlled sentiment, measured on smollm2-135m-instruct (a small model: may not carry over), "
        "alignkit/assets/compare-sentiment.json:",
        "  dpo: gold win rate 0.625 [0.500, 0.750] over 3 seeds (std 0.050), KL/token 0.0123",
        "  sft: gold win rate 0.500 [0.500, 0.750] over 3 seeds (std 0.050), KL/token 0.0123",
        "HH-RLHF harmlessness: none measured yet (would cite alignkit/assets/compare-hh-harmless.json, made by "
        "`alignkit compare configs/compare_hh_harmless.yaml`)",
    ]
