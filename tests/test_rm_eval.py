"""`alignkit rm-eval` on a tiny Hugging Face sequence classifier: one table per preference file, the numbers
checked against scoring the pairs directly, and the errors a user can cause."""

from __future__ import annotations

import json

import pytest
import torch

from alignkit import cli
from alignkit.data.tokenize import encode_pair
from alignkit.evaluation.reward_diagnostics import pair_outcomes
from alignkit.models.reward import load_reward_model

PAIRS_A = [
    {"prompt": "what is the capital of france?", "chosen": "paris.", "rejected": "i cannot help with that."},
    {"prompt": "please write a short poem", "chosen": "the sea and the sky are blue.", "rejected": "no."},
    {"prompt": "help me", "chosen": "here is a helpful answer", "rejected": "0 1 2 3 4 5 6 7 8 9"},
    {"prompt": "the quick brown fox", "chosen": "jumps over the lazy dog", "rejected": "?"},
]
PAIRS_B = [
    {"prompt": "help me", "chosen": "i am sorry.", "rejected": "here is a helpful and harmless answer"},
    {"prompt": "what is the capital?", "chosen": "the capital of france is paris.", "rejected": "."},
    {"prompt": "please write a short poem", "chosen": "the sky", "rejected": "the sea"},
]


@pytest.fixture(scope="module")
def hf_reward_dir(tmp_path_factory, tiny_tokenizer):
    """A plain transformers LlamaForSequenceClassification (num_labels=1), no ALIGNKIT_REWARD.json."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(1)
    cfg = LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=0,
    )
    path = tmp_path_factory.mktemp("hf-rm")
    LlamaForSequenceClassification(cfg).save_pretrained(path, safe_serialization=True)
    tiny_tokenizer.save_pretrained(path)
    return path


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_rm_eval_one_table_per_file_with_the_numbers_of_direct_scoring(
    hf_reward_dir, tiny_model_dir, tiny_tokenizer, tmp_path, capsys
):
    a, b = _write(tmp_path / "a.jsonl", PAIRS_A), _write(tmp_path / "b.jsonl", PAIRS_B)
    out = tmp_path / "out"
    code = cli.main(
        ["rm-eval", f"reward={hf_reward_dir}", f"data=[{a},{b}]", f"output_dir={out}",
         f"base_model={tiny_model_dir}", "dtype=float32", "progress=false"]
    )
    assert code == 0
    report = json.loads((out / "rm_eval.json").read_text(), parse_constant=pytest.fail)  # strict JSON
    assert list(report["files"]) == [a, b] and report["base_model"] == str(tiny_model_dir)
    rm = load_reward_model(hf_reward_dir, dtype="float32")
    for source, rows in ((a, PAIRS_A), (b, PAIRS_B)):
        found = report["files"][source]
        chosen, rejected = rm.score_pairs(
            [r["prompt"] for r in rows], [r["chosen"] for r in rows], [r["rejected"] for r in rows]
        )
        assert found["n_pairs"] == len(rows)
        assert found["accuracy"]["value"] == pytest.approx(pair_outcomes(chosen, rejected).mean())
        enc = [encode_pair(tiny_tokenizer, r["prompt"], r["chosen"], r["rejected"], 1024) for r in rows]
        c_len, r_len = [len(e.chosen_ids) for e in enc], [len(e.rejected_ids) for e in enc]
        shorter = pair_outcomes([-x for x in c_len], [-x for x in r_len]).mean()
        assert found["baselines"]["prefer_shorter"]["value"] == pytest.approx(shorter)
        assert "base_logprob" in found["baselines"]
    md = (out / "rm_eval.md").read_text()
    assert md.count("### ") == 2 and f"### {a} (4 pairs)" in md and "| accuracy |" in md
    err = capsys.readouterr().err
    assert f"{b} (3 pairs)" in err and "prefer shorter" in err


def test_rm_eval_without_a_recorded_base_model_has_no_log_prob_baseline(hf_reward_dir, tmp_path):
    a = _write(tmp_path / "a.jsonl", PAIRS_A)
    assert cli.main(["rm-eval", f"reward={hf_reward_dir}", f"data={a}", f"output_dir={tmp_path / 'o'}",
                     "dtype=float32", "progress=false"]) == 0
    found = json.loads((tmp_path / "o" / "rm_eval.json").read_text())["files"][a]
    assert set(found["baselines"]) == {"prefer_shorter", "prefer_longer"}
    # Its own folder (marked rm-eval) takes a rerun, which replaces the files.
    assert cli.main(["rm-eval", f"reward={hf_reward_dir}", f"data={a}", f"output_dir={tmp_path / 'o'}",
                     "dtype=float32", "progress=false", "logprob_baseline=false"]) == 0
    assert json.loads((tmp_path / "o" / "rm_eval.json").read_text())["files"][a] == found


def test_rm_eval_user_errors_are_one_line(hf_reward_dir, tiny_model_dir, tmp_path, capsys):
    a = _write(tmp_path / "a.jsonl", PAIRS_A)
    out = tmp_path / "o"
    # A causal LM is not a reward model.
    assert cli.main(["rm-eval", f"reward={tiny_model_dir}", f"data={a}", f"output_dir={out}"]) == 2
    assert "is not a reward model" in capsys.readouterr().err
    # A base model that is a reward model cannot give log-probs.
    args = ["rm-eval", f"reward={hf_reward_dir}", f"data={a}", f"output_dir={out}"]
    assert cli.main([*args, f"base_model={hf_reward_dir}"]) == 2
    assert "is not a causal LM" in capsys.readouterr().err
    # A file with no usable pair.
    empty = _write(tmp_path / "bad.jsonl", [{"prompt": "x", "chosen": "", "rejected": "y"}])
    assert cli.main([*args[:2], f"data={empty}", f"output_dir={out}"]) == 2
    assert "error:" in capsys.readouterr().err
    assert not out.exists()
    # A folder alignkit did not make (here the one holding the data) is refused before any work, untouched.
    before = sorted(p.name for p in tmp_path.iterdir())
    assert cli.main([*args[:3], f"output_dir={tmp_path}"]) == 2
    assert "is not empty and is not an alignkit rm-eval run folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_score_of_pairs_reports_the_same_diagnostics(hf_reward_dir, tiny_model_dir, tmp_path):
    """`alignkit score` of a pairs file gives the diagnostics rm-eval gives for that file."""
    from alignkit.config import load_config
    from alignkit.stages import score

    a = _write(tmp_path / "a.jsonl", PAIRS_A)
    common = [f"reward={hf_reward_dir}", f"base_model={tiny_model_dir}", "dtype=float32"]
    common.append("progress=false")
    args = [*common, f"input={a}", f"output={tmp_path / 's.jsonl'}"]
    summary = score.run(load_config(score.ScoreConfig, None, args))
    assert cli.main(["rm-eval", *common, f"data={a}", f"output_dir={tmp_path / 'e'}"]) == 0
    evaluated = json.loads((tmp_path / "e" / "rm_eval.json").read_text())["files"][a]
    d = summary["diagnostics"]
    assert d["n_pairs"] == 4 and set(d["baselines"]) == {"prefer_shorter", "prefer_longer", "base_logprob"}
    for key in ("accuracy", "baselines", "buckets", "agreement_with_length_rule", "length_correlation"):
        assert d[key] == evaluated[key], key
    assert d["ece"] == pytest.approx(evaluated["ece"]) and summary["warnings"] == d["warnings"]


def test_rm_eval_of_an_alignkit_reward_model_uses_its_recorded_base_model(
    tiny_model_dir, tiny_tokenizer, tmp_path
):
    from alignkit.models.reward import build_reward_model, save_reward_model

    model = build_reward_model(str(tiny_model_dir), tiny_tokenizer.pad_token_id, "float32", device="cpu")
    final = save_reward_model(model, tiny_tokenizer, tmp_path / "final", 128, None, base_model=str(tiny_model_dir))
    a = _write(tmp_path / "a.jsonl", PAIRS_A)
    args = ["rm-eval", f"reward={final}", f"data={a}", f"output_dir={tmp_path / 'o'}", "dtype=float32"]
    assert cli.main(args) == 0
    report = json.loads((tmp_path / "o" / "rm_eval.json").read_text())
    assert report["base_model"] == str(tiny_model_dir)
    assert "base_logprob" in report["files"][a]["baselines"]
    assert cli.main([*args, "logprob_baseline=false"]) == 0
    report = json.loads((tmp_path / "o" / "rm_eval.json").read_text())
    assert report["base_model"] is None and "base_logprob" not in report["files"][a]["baselines"]


def test_reply_mean_logprobs_match_a_plain_forward(tiny_model_dir, tiny_tokenizer):
    """The log-prob baseline's number for a reply: the mean over its tokens t of log softmax(logits[t-1])[t],
    from one plain forward of prompt + reply, the same whichever pair shares the batch."""
    from transformers import AutoModelForCausalLM

    from alignkit.evaluation.reward_eval import reply_mean_logprobs

    pairs = [encode_pair(tiny_tokenizer, r["prompt"], r["chosen"], r["rejected"], 512) for r in PAIRS_A]
    chosen, rejected = reply_mean_logprobs(str(tiny_model_dir), pairs, tiny_tokenizer.pad_token_id, "float32")
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for k, pair in enumerate(pairs):
        for reply, got in ((pair.chosen_ids, chosen[k]), (pair.rejected_ids, rejected[k])):
            ids = torch.tensor([pair.prompt_ids + reply])
            with torch.no_grad():
                logp = torch.log_softmax(lm(ids).logits[0].float(), -1)  # (T, V)
            n = len(pair.prompt_ids)
            want = sum(logp[n + i - 1, tok].item() for i, tok in enumerate(reply)) / len(reply)
            assert got == pytest.approx(want, abs=1e-4)
