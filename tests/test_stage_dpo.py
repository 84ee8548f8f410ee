"""`alignkit dpo | ipo | orpo` end to end on a tiny model, and the reference paths agreeing with each other."""

from __future__ import annotations

import json
import math

import pytest

from alignkit.cli import main
from alignkit.models import reference_cache
from alignkit.models.embedded import cache_dir

PAIRS = [
    {"prompt": "what is the capital of france?", "chosen": "paris.", "rejected": "i cannot help."},
    {"prompt": "please write a short poem", "chosen": "the sea and the sky.", "rejected": "no."},
    {"prompt": "the quick brown fox", "chosen": "jumps over the lazy dog.", "rejected": "0 1 2 3"},
    {
        "chosen": "\n\nHuman: i need help\n\nAssistant: here is a helpful answer.",
        "rejected": "\n\nHuman: i need help\n\nAssistant: i am sorry.",
    },
] * 4


@pytest.fixture
def pair_data(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    return path


def _run(stage: str, tmp_path, name: str, model, data, *extra: str) -> tuple[dict, list[dict]]:
    out = tmp_path / name
    args = [
        stage,
        f"model={model}",
        f"train_data={data}",
        f"eval_data={data}",
        "eval_rows=[0,8]",
        f"output_dir={out}",
        "batch_size=4",
        "micro_batch_size=2",
        "max_steps=4",
        "learning_rate=5e-3",
        "lr_scheduler=constant",
        "progress=false",
        "tensorboard=false",
        *extra,
    ]
    assert main(args) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return json.loads((out / "summary.json").read_text()), [r for r in rows if "loss" in r]


def test_dpo_first_step_is_log2_and_reference_paths_agree(tiny_model_dir, pair_data, tmp_path):
    """Before any update the policy equals the reference, so h = 0 and the DPO loss is -log sigmoid(0) = ln 2.
    A precomputed reference and a frozen copy are the same maths: identical per-step losses."""
    pre, pre_rows = _run("dpo", tmp_path, "pre", tiny_model_dir, pair_data, "reference=precomputed")
    cpy, cpy_rows = _run("dpo", tmp_path, "copy", tiny_model_dir, pair_data, "reference=copy")
    assert pre_rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert [r["loss"] for r in pre_rows] == pytest.approx([r["loss"] for r in cpy_rows], abs=1e-5)
    # training on these pairs raises the margin and the accuracy on them
    # (before training every implicit reward is exactly 0, so the margin starts at 0)
    assert pre["eval_after"]["rewards/margin"] > 0.05
    assert pre["eval_accuracy"] >= 0.75
    low, high = pre["eval_accuracy_ci95"]
    assert low <= pre["eval_accuracy"] <= high
    assert pre["reference"] == "precomputed" and cpy["reference"] == "copy"


def test_dpo_lora_adapter_reference_matches_precomputed(tiny_model_dir, pair_data, tmp_path):
    """With LoRA (B initialised to 0) the adapter-disabled base is exactly the initial model, so the
    adapter reference and a precomputed reference give the same losses."""
    common = ("lora=true", "lora_r=4", "learning_rate=5e-2")
    _, ada = _run("dpo", tmp_path, "ada", tiny_model_dir, pair_data, "reference=adapter", *common)
    _, pre = _run("dpo", tmp_path, "pre", tiny_model_dir, pair_data, "reference=precomputed", *common)
    assert ada[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert [r["loss"] for r in ada] == pytest.approx([r["loss"] for r in pre], abs=1e-5)


def test_ipo_first_step_is_target_squared(tiny_model_dir, pair_data, tmp_path):
    """IPO: (h - 1/(2 beta))^2 with h = 0 at the start; beta = 0.5 gives (0 - 1)^2 = 1."""
    _, rows = _run("ipo", tmp_path, "ipo", tiny_model_dir, pair_data, "beta=0.5")
    assert rows[0]["loss"] == pytest.approx(1.0, abs=1e-6)
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_orpo_needs_no_reference_and_learns(tiny_model_dir, pair_data, tmp_path):
    summary, rows = _run("orpo", tmp_path, "orpo", tiny_model_dir, pair_data, "orpo_lambda=0.5")
    assert summary["reference"] == "none"
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_reference_logprobs_are_cached_and_reused(tiny_model_dir, pair_data, tmp_path, capsys):
    """A second run on the same model and tokens takes the reference log-probs from the on-disk cache (no
    second precompute) and trains identically; IPO on the same pairs shares the same entries. (Its own
    pairs file, so earlier tests in the session have not filled the cache for it.)"""
    pair_data = tmp_path / "own-pairs.jsonl"
    pair_data.write_text(
        "".join(json.dumps({**r, "prompt": "own " + r.get("prompt", "")}) + "\n" for r in PAIRS[:3] * 4)
    )
    _, first = _run("dpo", tmp_path, "a", tiny_model_dir, pair_data)
    assert "from the cache" not in capsys.readouterr().err
    _, second = _run("dpo", tmp_path, "b", tiny_model_dir, pair_data)
    assert "from the cache" in capsys.readouterr().err
    assert [r["loss"] for r in first] == [r["loss"] for r in second]
    _run("ipo", tmp_path, "c", tiny_model_dir, pair_data)
    assert "from the cache" in capsys.readouterr().err


def test_reference_cache_is_keyed_on_the_prepared_data_and_a_changed_setting_misses(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    """Pairs read from the prepared-data cache name their reference log-probs by its fingerprint: no pass that
    hashes every pair's ids. The same inputs hit; another max_length (other ids) misses and computes again."""

    def no_hashing(sequences):
        raise AssertionError("the token ids were hashed for pairs from the prepared cache")

    monkeypatch.setattr(reference_cache, "tokens_fingerprint", no_hashing)
    data = tmp_path / "keyed-pairs.jsonl"
    data.write_text(
        "".join(json.dumps({**r, "prompt": "keyed " + r.get("prompt", "")}) + "\n" for r in PAIRS[:3] * 4)
    )
    hits = ["reference log-probs: 12 rows from the cache", "reference log-probs: 8 rows from the cache"]

    def entries() -> int:
        return len(list((cache_dir() / "reference-logps").glob("*.safetensors")))

    _run("dpo", tmp_path, "a", tiny_model_dir, data)
    assert "rows from the cache" not in capsys.readouterr().err
    n_entries = entries()
    _run("dpo", tmp_path, "b", tiny_model_dir, data)
    err = capsys.readouterr().err
    assert all(hit in err for hit in hits) and entries() == n_entries, err
    _run("dpo", tmp_path, "c", tiny_model_dir, data, "max_length=12")
    assert "rows from the cache" not in capsys.readouterr().err
    assert entries() == n_entries + 2  # computed again, train and eval, under new keys
