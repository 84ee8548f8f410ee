"""`alignkit eval` on tiny models: a model against itself (KL exactly 0, all ties, equal lengths), against
a differently initialised model (KL > 0, the win rate recomputed from the written scores), the batched
scoring paths against a plain per-sample forward, and where eval.json goes."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil

import pytest
import torch

from alignkit import cli
from alignkit.config import load_config
from alignkit.data.tokenize import encode_prompt
from alignkit.evaluation.metrics import entropy_from_logits
from alignkit.models.generation import SamplingConfig, generate
from alignkit.models.loading import ADAPTER_RECORD, load_model
from alignkit.scoring import FunctionScorer
from alignkit.stages import eval as eval_stage
from alignkit.stages.eval import EvalConfig, default_output

from conftest import build_tiny_model

PROMPTS = [
    {"prompt": "what is the capital of france?"},
    {"prompt": "please write a short poem"},
    {"prompt": [{"role": "user", "content": "the quick brown fox"}]},
    {"prompt": "i need help"},
    {"prompt": "0 1 2 3"},
]


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    return path


@pytest.fixture(scope="module")
def copy_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model's files under another path: the same weights, loaded as a separate model."""
    dest = tmp_path_factory.mktemp("copy") / "model"
    shutil.copytree(tiny_model_dir, dest)
    return dest


@pytest.fixture(scope="module")
def other_dir(tiny_tokenizer, tmp_path_factory):
    """A tiny model with the same tokenizer but weights from another seed."""
    path = tmp_path_factory.mktemp("other")
    build_tiny_model(len(tiny_tokenizer), seed=1).save_pretrained(path, safe_serialization=True)
    tiny_tokenizer.save_pretrained(path)
    return path


def _eval(tmp_path, model, reference, *extra: str) -> dict:
    out = tmp_path / "eval.json"
    args = [
        f"model={model}",
        f"reference={reference}",
        f"output={out}",
        "max_new_tokens=10",
        "temperature=1.0",
        "batch_size=2",
        "progress=false",
        *extra,
    ]
    summary = eval_stage.run(load_config(EvalConfig, None, args))
    assert summary["output"] == str(out)
    return json.loads(out.read_text())


def test_model_against_itself_kl_zero_all_ties(tiny_model_dir, copy_dir, tmp_path, capsys):
    """Same weights loaded twice, same seed: identical samples and identical log-probs, so every per-token
    log-ratio is 0.0 exactly (k1 = k3 = 0), every score comparison is a tie (win rate 0.5, and so is
    every bootstrap resample), and the length statistics are equal. Built-in prompts, first 4."""
    result = _eval(tmp_path, tiny_model_dir, copy_dir, "reward=_scorers:length_score", "prompts_max_rows=4")
    assert result["n_prompts"] == 4 and result["prompts"].startswith("built-in")
    assert result["samples"][0]["prompt"] == "How do I make a simple tomato sauce for pasta?"
    assert result["kl"]["k1_per_token"] == 0.0
    assert result["kl"]["k3_per_token"] == 0.0
    assert result["kl"]["k1_per_sequence"] == 0.0
    assert result["win_rate"] == {"value": 0.5, "low": 0.5, "high": 0.5, "n_prompts": 4}
    pol, ref = result["policy"], result["reference_stats"]
    assert pol["length_tokens"] == ref["length_tokens"] and pol["length_words"] == ref["length_words"]
    assert pol["distinct_2"] == ref["distinct_2"] and pol["score"] == ref["score"]
    assert pol["entropy"] == pytest.approx(ref["entropy"], abs=1e-6)
    # a random 400-token model: near-uniform next-token distributions, entropy a little under ln 400
    assert 0.9 * math.log(400) < pol["entropy"] <= math.log(400)
    for s in result["samples"]:
        assert s["policy"] == s["reference"] and s["policy_score"] == s["reference_score"] == len(s["policy"])
    assert pol["length_tokens"]["mean"] == pytest.approx(
        sum(s["policy_tokens"] for s in result["samples"]) / 4
    )
    # the KL counts every sampled token, the EOS that ended a response included
    assert result["kl"]["n_tokens"] >= sum(s["policy_tokens"] for s in result["samples"])
    err = capsys.readouterr().err
    header = next(line for line in err.splitlines() if line.split()[:2] == ["policy", "reference"])
    table = err[err.index(header) :]
    assert "win rate vs reference [95% CI]  0.500 [0.500, 0.500]" in table
    assert "KL k1, nats/token" in table


def test_against_other_model_kl_positive_and_win_rate_from_scores(
    tiny_model_dir, other_dir, prompt_file, tmp_path
):
    """Other weights: k3 = E[(r - 1) - log r] > 0 unless the models agree on every sampled token. The win
    rate equals the per-prompt outcomes (1 / 0.5 / 0) recomputed from the scores written in eval.json,
    with 2 samples per prompt compared through their mean."""
    result = _eval(
        tmp_path,
        tiny_model_dir,
        other_dir,
        f"prompts={prompt_file}",
        "reward=_scorers:length_score",
        "samples_per_prompt=2",
        "temperature=1.0",
    )
    kl = result["kl"]
    assert kl["k3_per_token"] > 1e-4
    n_samples = len(result["samples"])
    assert n_samples == 2 * len(PROMPTS)
    # per-sequence mean = (sum over all tokens) / sequences = per-token mean * tokens / sequences
    assert kl["k1_per_sequence"] == pytest.approx(kl["k1_per_token"] * kl["n_tokens"] / n_samples, rel=1e-5)
    outcomes = []
    for i in range(0, n_samples, 2):
        pair = result["samples"][i : i + 2]
        p = sum(s["policy_score"] for s in pair) / 2
        r = sum(s["reference_score"] for s in pair) / 2
        outcomes.append(1.0 if p > r else 0.5 if p == r else 0.0)
    win = result["win_rate"]
    assert win["value"] == pytest.approx(sum(outcomes) / len(outcomes))
    assert win["low"] <= win["value"] <= win["high"] and win["n_prompts"] == len(PROMPTS)
    assert result["samples"][2]["prompt"] == PROMPTS[1]["prompt"]  # prompts repeated in place, in order


def test_no_reference_and_cli(tiny_model_dir, prompt_file, tmp_path, monkeypatch):
    """reference=none: policy statistics only; run through the CLI with the stage registered."""
    monkeypatch.setitem(cli.STAGES, "eval", ("alignkit.stages.eval", "Evaluate"))
    out = tmp_path / "e.json"
    code = cli.main(
        ["eval", f"model={tiny_model_dir}", "reference=none", f"prompts={prompt_file}", f"output={out}",
         "max_new_tokens=6", "progress=false"]
    )  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    assert result["reference"] is None and result["kl"] is None and result["win_rate"] is None
    assert result["reference_stats"] is None and "reference" not in result["samples"][0]
    assert result["scorer"] is None and "score" not in result["policy"]
    assert result["sampling"] == {
        "temperature": 0.7,
        "top_p": 1.0,
        "max_new_tokens": 6,
        "seed": 0,
        "generation_backend": "hf",
    }
    assert all(s["policy_tokens"] <= 6 for s in result["samples"])


def test_batched_scoring_matches_per_sample_forward(tiny_model_dir, other_dir, tiny_tokenizer):
    """Log-probs and entropies from the padded, length-sorted batches equal a plain full-logits forward of
    each sample on its own (no padding), token by token."""
    policy, reference = load_model(str(tiny_model_dir), "float32"), load_model(str(other_dir), "float32")
    ids = [encode_prompt(tiny_tokenizer, p["prompt"]) for p in PROMPTS]
    samples = generate(
        policy, tiny_tokenizer, ids, SamplingConfig(8, 1.0, 1.0, 3), batch_size=2, progress=False
    )
    logps = eval_stage.response_token_logprobs(reference, samples, batch_size=3, chunk=5)
    ents = eval_stage.response_token_entropies(policy, samples, batch_size=3, chunk=5)
    for s, lp, ent in zip(samples, logps, ents):
        seq = torch.tensor([s.prompt_ids + s.response_ids])
        n_p = len(s.prompt_ids)
        with torch.no_grad():
            ref_logits = reference(input_ids=seq).logits[0, n_p - 1 : -1]  # (T_resp, V)
            pol_logits = policy(input_ids=seq).logits[0, n_p - 1 : -1]
        expected = torch.log_softmax(ref_logits, -1).gather(1, torch.tensor(s.response_ids)[:, None])[:, 0]
        assert lp.shape == (len(s.response_ids),)
        torch.testing.assert_close(lp, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(ent, entropy_from_logits(pol_logits), atol=1e-5, rtol=0)


def test_reward_model_scorer(tiny_model_dir, tiny_tokenizer, prompt_file, tmp_path):
    """reward=<dir saved like `alignkit rm` saves>: the scores in eval.json are the reward model's
    own scores of those (prompt, response) pairs, and the win rate follows from them."""
    from alignkit.models.reward import build_reward_model, load_reward_model, save_reward_model

    rm_dir = tmp_path / "rm"
    rm = build_reward_model(str(tiny_model_dir), tiny_tokenizer.pad_token_id, "float32", device="cpu")
    save_reward_model(rm, tiny_tokenizer, rm_dir, max_length=256, max_prompt_length=None)
    args = [f"prompts={prompt_file}", f"reward={rm_dir}", "dtype=float32"]  # compared in fp32, on any CPU
    result = _eval(tmp_path, tiny_model_dir, "none", *args)
    assert result["scorer"] == f"reward model {rm_dir}"
    prompts = [s["prompt"] for s in result["samples"]]
    expected = load_reward_model(rm_dir, "float32", "cpu").score(
        prompts, [s["policy"] for s in result["samples"]]
    )
    assert [s["policy_score"] for s in result["samples"]] == pytest.approx(expected, abs=1e-5)
    assert len(set(expected)) > 1  # a random head still tells the responses apart


def test_function_scorer_and_errors():
    scorer = FunctionScorer("_scorers:length_score", "reward_fn")
    assert scorer.score(["hi", [{"role": "user", "content": "x"}]], ["abc", ""]) == [3.0, 0.0]
    with pytest.raises(ValueError, match="module:function"):
        FunctionScorer("_scorers.length_score", "reward_fn")
    with pytest.raises(ValueError, match="reward_fn: module '_scorers' has no function 'not_a_function'"):
        FunctionScorer("_scorers:not_a_function", "reward_fn")


def test_default_output(tmp_path):
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "config.yaml").write_text("model: x\n")
    assert default_output(str(run / "final")) == run / "eval.json"  # where `alignkit report` looks
    (tmp_path / "plain").mkdir()
    assert default_output(str(tmp_path / "plain")) == tmp_path / "plain" / "eval.json"
    assert (
        str(default_output("HuggingFaceTB/SmolLM2-135M-Instruct"))
        == "eval-HuggingFaceTB_SmolLM2-135M-Instruct.json"
    )


def test_hf_backend_samples_as_generate_did(other_dir, tiny_model_dir, tiny_tokenizer, prompt_file, tmp_path):
    """generation_backend=hf (the default) samples as eval did before it took the backend: generate() on each
    model with the run's seed, batch_size prompts per batch, each prompt repeated samples_per_prompt times;
    the policy and the reference draw with the same seed (their samples differ because their weights do)."""
    result = _eval(
        tmp_path, other_dir, tiny_model_dir, f"prompts={prompt_file}", "seed=3", "samples_per_prompt=2"
    )
    ids = [encode_prompt(tiny_tokenizer, row["prompt"], None) for row in PROMPTS for _ in range(2)]
    sampling = SamplingConfig(max_new_tokens=10, temperature=1.0, top_p=1.0, seed=3)
    for model_dir, side in ((other_dir, "policy"), (tiny_model_dir, "reference")):
        expected = generate(load_model(str(model_dir)), tiny_tokenizer, ids, sampling, 2, progress=False)
        assert [s[side] for s in result["samples"]] == [g.text for g in expected]
    assert [s["policy"] for s in result["samples"]] != [s["reference"] for s in result["samples"]]


def test_vllm_backend_errors_name_the_field(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """generation_backend=vllm where vllm is not installed (or no GPU): an error naming the field, before any
    model loads. Where it could run, a LoRA adapter saved alone is refused, naming the field that holds it."""
    args = ["eval", f"model={tiny_model_dir}", "generation_backend=vllm", f"output={tmp_path / 'e.json'}"]
    if importlib.util.find_spec("vllm") is None or not torch.cuda.is_available():
        assert cli.main(args) == 2
        err = capsys.readouterr().err
        assert "generation_backend=vllm needs" in err and "generation_backend=hf" in err
        assert not (tmp_path / "e.json").exists()
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / ADAPTER_RECORD).write_text("{}")
    monkeypatch.setattr(eval_stage, "check_generation_backend", lambda backend: None)
    assert cli.main([*args[:-1], f"reference={adapter}", f"output={tmp_path / 'e.json'}"]) == 2
    err = capsys.readouterr().err
    assert f"reference={adapter} is a LoRA adapter" in err and "generation_backend=hf" in err


def test_reference_cache_reuses_the_reference_side_and_only_for_the_same_setup(
    tiny_model_dir, other_dir, prompt_file, tmp_path, monkeypatch
):
    """reference_cache: the first evaluation samples the reference and writes its side; a second one of
    another policy against the same reference, prompts, sampling and reward reads it (the reference is not
    sampled again, and its side equals the first's); another seed is another key, so the reference is
    sampled again and the cache rewritten."""
    cache = tmp_path / "ref.json"
    args = (f"prompts={prompt_file}", "reward=_scorers:length_score", f"reference_cache={cache}")
    first = _eval(tmp_path / "a", tiny_model_dir, other_dir, *args)
    assert first["reference_from_cache"] is False and cache.is_file()

    calls = []
    real = eval_stage.reference_sampler
    monkeypatch.setattr(
        eval_stage, "reference_sampler", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    second = _eval(tmp_path / "b", other_dir, other_dir, *args)
    assert second["reference_from_cache"] is True and calls == []
    assert second["reference_stats"] == first["reference_stats"]
    assert [s["reference"] for s in second["samples"]] == [s["reference"] for s in first["samples"]]
    assert [s["reference_score"] for s in second["samples"]] == [s["reference_score"] for s in first["samples"]]
    # The policy is the reference's weights here: its fresh samples are the cached ones, and the KL (computed
    # afresh) is 0.
    assert [s["policy"] for s in second["samples"]] == [s["reference"] for s in second["samples"]]
    assert second["kl"]["k1_per_token"] == 0.0

    third = _eval(tmp_path / "c", tiny_model_dir, other_dir, *args, "seed=1")
    assert third["reference_from_cache"] is False and calls == [1]
    assert json.loads(cache.read_text())["key"]["sampling"][3] == 1
