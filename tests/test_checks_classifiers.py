"""Program checks of the checkable principles, the priority rule of the checks ranker, and the independent
classifiers (VADER, alt-profanity-check) on hand-made text."""

from __future__ import annotations

import pytest

from alignkit.cai.checks import (
    LABEL_WORDS,
    ChecksRanker,
    concision,
    no_insults,
    politeness,
    sentence_count,
    warmth,
)
from alignkit.scoring.classifiers import offensive, sentiment

PRIOS = {"no_insults_or_toxicity": 9, "politeness": 3, "concision": 2}


def test_checks_by_hand():
    """'You are a stupid, lazy idiot.' has 3 insults -> -3. 'Thanks, glad to help! Please ask.' has 3 polite
    markers, capped at 2 -> 2; one profane word costs 3: 'thanks, damn' -> 1 - 3 = -2.
    61 words in one sentence -> concision -1; 4 short sentences -> -10; 3 -> 0."""
    assert no_insults("", "You are a stupid, lazy idiot.") == -3.0
    assert politeness("", "Thanks, glad to help! Please ask.") == 2.0
    assert politeness("", "thanks, damn") == -2.0
    assert concision("", " ".join(["word"] * 61) + ".") == -1.0
    assert sentence_count("One. Two! Three? Four.") == 4
    assert concision("", "One. Two! Three? Four.") == -10.0
    assert concision("", "One. Two! Three?") == 0.0


def test_ranker_priority_rule():
    """The higher-priority principle decides; lower ones only break its ties:
    a: polite but insulting (insults -1)  -> loses to every clean response;
    b: clean, rude-free, long (4 sentences) -> beats a, loses to c (same insult/politeness, more concise);
    c: clean, short; d: clean, short and polite -> d beats c on politeness (priority 3 > concision 2)."""
    ranker = ChecksRanker(PRIOS)
    a = "Thank you! You are an idiot."
    b = "Sure. Here it is. Step one. Step two."
    c = "Sure, here it is."
    d = "Sure, here it is, thanks for asking."
    s = ranker.score("q", [a, b, c, d])
    assert s[0] < s[1] < s[2] < s[3]
    assert ranker.score("q", [c, c]) == [0.0, 0.0]  # ties stay ties


def test_ranker_from_constitution_uses_only_checkable_principles():
    from alignkit.cai.constitution import load_constitution

    shipped = load_constitution()  # the default constitution marks four principles checkable
    ranker = ChecksRanker.from_constitution(shipped.principles)
    assert ranker.priorities == {"no_insults_or_toxicity": 9, "politeness": 3, "warmth": 2, "concision": 1}
    with pytest.raises(ValueError, match="checkable"):
        ChecksRanker.from_constitution(shipped.select(["avoid_harm"]).principles)


def test_warmth_counts_warm_minus_cold_words():
    """'glad' and 'great' are warm, 'sad' is cold, each occurrence counts; a refusal's 'harmful' and
    'illegal' are on neither list; words are matched whole ('goodness' is not 'good')."""
    assert warmth("", "Glad to help, great question! Sad but true.") == 1.0
    assert warmth("", "Great, great.") == 2.0
    assert warmth("", "That would be harmful and illegal.") == 0.0
    assert warmth("", "My goodness.") == 0.0
    assert {"glad", "sad", "idiot", "damn", "thanks"} <= LABEL_WORDS


def test_ranker_with_warmth_between_politeness_and_concision():
    """Priorities 3 > 2 > 1: a warm reply beats a cold one of the same courtesy even when longer; courtesy
    beats warmth."""
    ranker = ChecksRanker({"politeness": 3, "warmth": 2, "concision": 1})
    cold = "That is a hard problem."
    warm_long = "Good question. Here is a lovely idea. Try it. Enjoy it."  # 4 sentences: concision -10
    polite_cold = "Thanks. That is a hard problem."
    s = ranker.score("q", [cold, warm_long, polite_cold])
    assert s[0] < s[1] < s[2]


def test_independent_classifiers_separate_obvious_cases():
    """VADER's compound for a warm reply is positive and for an insult negative; the offensive-language
    model puts an insult near 1 and a courteous reply near 0 (values seen: 1.0 and 0.002)."""
    warm, rude = "Thank you, I am happy to help!", "You are a stupid idiot."
    assert sentiment("", warm) > 0.5 > -0.5 > sentiment("", rude)
    assert offensive("", rude) > 0.9 and offensive("", warm) < 0.1
