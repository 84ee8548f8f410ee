"""Schema and originality checks for alignkit's built-in assets (src/alignkit/assets).

The assets are read the way users get them, through importlib.resources; the originality check
guards against third-party text creeping in by looking for shared 8-word sequences.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from importlib import resources
from itertools import islice

import pytest
import yaml

from conftest import CAI_DIR, HH_RLHF

NGRAM = 8
HH_ROWS = 500


def _asset_text(name: str) -> str:
    return (resources.files("alignkit") / "assets" / name).read_text(encoding="utf-8")


def _jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in _asset_text(name).splitlines() if line.strip()]


def _constitution() -> dict:
    return yaml.safe_load(_asset_text("constitution.yaml"))


def _strings(obj: object) -> Iterator[str]:
    """Every string inside nested dicts/lists (keys excluded), depth first."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _strings(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _strings(value)


def _words(text: str) -> list[str]:
    # Lower-cased words; curly apostrophes folded so "can’t" and "can't" match.
    return re.findall(r"[a-z0-9]+(?:'[a-z0-9]+)*", text.lower().replace("\u2019", "'"))


def _ngrams(text: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    words = _words(text)
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def _is_nonempty_str(value: object) -> bool:
    return isinstance(value, str) and value.strip() == value and len(value) > 0


# --- demo_sft.jsonl ---------------------------------------------------------------------------


def test_demo_sft_schema_and_count():
    rows = _jsonl("demo_sft.jsonl")
    assert len(rows) == 48
    for row in rows:
        assert set(row) == {"prompt", "completion"}, row
        assert _is_nonempty_str(row["prompt"]) and _is_nonempty_str(row["completion"]), row
    prompts = [row["prompt"] for row in rows]
    assert len(set(prompts)) == 48, "duplicate demo prompts"


def test_demo_sft_completions_are_short():
    """House style: 1-3 sentences, under ~60 words each (we allow at most 60)."""
    for row in _jsonl("demo_sft.jsonl"):
        n_words = len(row["completion"].split())
        assert 3 <= n_words <= 60, (n_words, row["prompt"])


# --- prompts.jsonl ----------------------------------------------------------------------------


def test_prompts_schema_count_and_unique():
    rows = _jsonl("prompts.jsonl")
    assert len(rows) == 128
    for row in rows:
        assert set(row) == {"prompt"}, row
        assert _is_nonempty_str(row["prompt"]), row
        assert len(row["prompt"].split()) <= 25, row  # one short sentence
    prompts = [row["prompt"] for row in rows]
    assert len(set(prompts)) == 128, "duplicate prompts"


def test_prompts_do_not_overlap_demo_sft():
    """Compared after lower-casing and stripping punctuation, so near-identical copies also count."""
    demo = {" ".join(_words(row["prompt"])) for row in _jsonl("demo_sft.jsonl")}
    sampled = {" ".join(_words(row["prompt"])) for row in _jsonl("prompts.jsonl")}
    assert demo & sampled == set()


def test_short_prompts_schema_and_disjoint_from_the_others():
    """64 prompts asking for one-line answers (PPO's rollouts): unique, short, none also in prompts.jsonl."""
    rows = _jsonl("short_prompts.jsonl")
    assert len(rows) == 64
    assert all(set(row) == {"prompt"} and _is_nonempty_str(row["prompt"]) for row in rows)
    assert all(len(row["prompt"].split()) <= 20 for row in rows)
    short = {" ".join(_words(row["prompt"])) for row in rows}
    assert len(short) == 64, "duplicate prompts"
    assert short & {" ".join(_words(row["prompt"])) for row in _jsonl("prompts.jsonl")} == set()


# --- constitution.yaml ------------------------------------------------------------------------


def test_constitution_top_level():
    cons = _constitution()
    assert set(cons) == {"name", "description", "conflict_rule", "principles"}
    for key in ("name", "description", "conflict_rule"):
        assert _is_nonempty_str(cons[key]), key
    rule = cons["conflict_rule"].lower()
    assert "highest priority" in rule and "averaged" in rule


def test_constitution_principles_schema():
    principles = _constitution()["principles"]
    assert len(principles) == 11
    required = {"id", "priority", "critique_request", "revision_request", "comparison"}
    for p in principles:
        assert required <= set(p) <= required | {"checkable"}, p
        assert re.fullmatch(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*", p["id"]), p["id"]
        # bool is a subclass of int: exclude it so `priority: yes` is caught.
        assert isinstance(p["priority"], int) and not isinstance(p["priority"], bool), p["id"]
        for key in ("critique_request", "revision_request", "comparison"):
            assert _is_nonempty_str(p[key]), (p["id"], key)
        assert p["comparison"].startswith("Which response"), p["id"]
        assert "options:" not in p["comparison"].lower(), p["id"]  # the judge appends the options
        if "checkable" in p:
            assert _is_nonempty_str(p["checkable"]), p["id"]
    ids = [p["id"] for p in principles]
    assert len(set(ids)) == 11, "duplicate principle ids"


def test_constitution_harm_avoidance_outranks_helpfulness():
    """Helpfulness (5) must lose to every harm-avoidance principle (9-10) and beat tone/length."""
    prio = {p["id"]: p["priority"] for p in _constitution()["principles"]}
    for harm_id in ("avoid_harm", "no_illegal_help", "protect_minors", "no_insults_or_toxicity"):
        assert prio[harm_id] > prio["helpfulness"], harm_id
    assert prio["helpfulness"] > prio["concision"]
    assert max(prio.values()) == prio["avoid_harm"]


# --- originality ------------------------------------------------------------------------------


def _asset_ngrams() -> dict[tuple[str, ...], str]:
    """Every 8-gram of every asset's text, mapped to the file it came from (per string, so no
    n-gram spans two records)."""
    texts: list[tuple[str, str]] = []
    for name in ("demo_sft.jsonl", "prompts.jsonl", "short_prompts.jsonl"):
        texts += [(name, s) for row in _jsonl(name) for s in _strings(row)]
    texts += [("constitution.yaml", s) for s in _strings(_constitution())]
    texts.append(("README.md", _asset_text("README.md")))
    out: dict[tuple[str, ...], str] = {}
    for name, text in texts:
        for gram in _ngrams(text):
            out[gram] = name
    return out


def test_asset_ngram_helper_finds_a_shared_sequence():
    """The check below must be able to fail: a sentence shares exactly the 8-grams it should.

    "a b c d e f g h i" has 2 eight-grams; "x a b c d e f g h" shares one of them ("a".."h").
    """
    assert len(_ngrams("a b c d e f g h i")) == 2
    assert _ngrams("a b c d e f g h i") & _ngrams("X, a b c d e f g h!") == {tuple("abcdefgh")}


@pytest.mark.skipif(not CAI_DIR.is_dir(), reason="constitutional-ai reference data not present")
def test_assets_share_no_8gram_with_cai_lists():
    ours = _asset_ngrams()
    theirs: set[tuple[str, ...]] = set()
    for path in sorted(CAI_DIR.glob("*.json")):
        for s in _strings(json.loads(path.read_text(encoding="utf-8"))):
            theirs |= _ngrams(s)
    assert theirs, "no reference text read"
    shared = {" ".join(g): ours[g] for g in ours.keys() & theirs}
    assert shared == {}


@pytest.mark.skipif(not HH_RLHF.is_file(), reason="HH-RLHF reference data not present")
def test_assets_share_no_8gram_with_hh_rlhf_head():
    ours = _asset_ngrams()
    theirs: set[tuple[str, ...]] = set()
    with gzip.open(HH_RLHF, "rt", encoding="utf-8") as f:
        for line in islice(f, HH_ROWS):
            row = json.loads(line)
            theirs |= _ngrams(row["chosen"]) | _ngrams(row["rejected"])
    assert theirs, "no reference text read"
    shared = {" ".join(g): ours[g] for g in ours.keys() & theirs}
    assert shared == {}
