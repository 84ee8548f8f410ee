"""The programmatic gold judges: `on_topic` by hand, `positive_on_topic` as the mean of VADER and it."""

from __future__ import annotations

import pytest

from alignkit.scoring import load_scorer
from alignkit.scoring.classifiers import sentiment
from alignkit.scoring.golds import on_topic, positive_on_topic


def test_on_topic_counts_the_prompts_content_words_the_reply_uses():
    # Content words of the prompt: {bake, bread, oven} ("how", "do", "i", "in", "an" are stopwords).
    prompt = "How do I bake bread in an oven?"
    assert on_topic(prompt, "Bake the BREAD at 220 C in the oven.") == 1.0
    assert on_topic(prompt, "Bread needs flour, water and time.") == pytest.approx(1 / 3)
    assert on_topic(prompt, "I'd be delighted to assist you with your inquiries!") == 0.0
    assert on_topic(prompt, "") == 0.0
    assert on_topic("How do you do?", "Fine, bread.") == 0.0  # a prompt of stopwords asks about nothing
    # Repeating a word does not count twice; "baking" is not "bake" (no stemming).
    assert on_topic(prompt, "bread bread bread baking") == pytest.approx(1 / 3)


def test_on_topic_reads_the_user_turns_of_a_chat_prompt():
    """Scorers pass chat prompts as "role: content" lines; the system turn and the role names are not asked."""
    chat = [
        {"role": "system", "content": "Be a helpful oven."},
        {"role": "user", "content": "How do I bake bread?"},
    ]
    scorer = load_scorer("alignkit.scoring.golds:on_topic", field="gold_reward")
    assert scorer.score([chat], ["Bake it slowly."]) == [pytest.approx(1 / 2)]  # {bake, bread}
    assert scorer.score([chat], ["A helpful oven, user."]) == [0.0]


def test_positive_on_topic_is_the_mean_of_vader_and_on_topic():
    prompt = "How do I bake bread?"
    for reply in (
        "Baking bread is a wonderful, happy hobby!",
        "I'd be delighted to help you!",
        "Bread is awful.",
    ):
        expected = 0.5 * sentiment(prompt, reply) + 0.5 * on_topic(prompt, reply)
        assert positive_on_topic(prompt, reply) == pytest.approx(expected)
    # Off-topic cheer loses to on-topic cheer though VADER likes both.
    assert positive_on_topic(prompt, "Bake bread, it is lovely!") > positive_on_topic(prompt, "It is lovely!")


def test_the_gold_loads_as_a_scorer_by_its_name():
    scorer = load_scorer("alignkit.scoring.golds:positive_on_topic", field="gold_reward")
    prompt = "How do I bake bread?"
    reply = "Bake the bread until golden."
    assert scorer.score([prompt], [reply]) == pytest.approx([positive_on_topic(prompt, reply)])
