"""Token-level checks of prompt rendering, encoding, truncation (alignkit.data.tokenize) and of the padded
batches and masks built from them (alignkit.data.collate), on the tiny BPE tokenizer of conftest."""

from __future__ import annotations

import pytest
import torch

from alignkit.data.collate import collate_pairs, collate_sft, collate_unpaired
from alignkit.data.tokenize import (
    Encoded,
    EncodedPair,
    EncodedUnpaired,
    encode,
    encode_pair,
    encode_prompt,
    encode_unpaired,
    render_prompt,
)

from conftest import build_tiny_tokenizer

EOS = 2  # <|im_end|> in the tiny tokenizer (special tokens: 0 <|endoftext|>, 1 <|im_start|>, 2 <|im_end|>)
DIGITS = "0 1 2 3 4 5 6 7 8 9"  # the tiny BPE has one token per digit: '0', 'Ġ1', ..., 'Ġ9'


@pytest.fixture(scope="module")
def plain_tokenizer():
    """The tiny tokenizer without a chat template: prompts are used as plain text."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = None
    return tokenizer


def ids(tokenizer, tokens: list[str]) -> list[int]:
    return tokenizer.convert_tokens_to_ids(tokens)


def plain_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------
# render_prompt / encode
# ---------------------------------------------------------------------------------------------


def test_render_prompt_with_and_without_template(tiny_tokenizer, plain_tokenizer):
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]
    assert render_prompt(tiny_tokenizer, "hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert render_prompt(tiny_tokenizer, chat) == (
        "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_prompt(plain_tokenizer, "hi") == "hi"
    assert render_prompt(plain_tokenizer, chat) == "System: s\nUser: hi\nAssistant:"


def test_encode_with_chat_template(tiny_tokenizer):
    """Prompt ids are the rendered template tokenized without added specials: they start with <|im_start|>
    (id 1) written by the template and end with the generation prompt 'assistant' + newline; the completion
    ids are the completion's own tokens plus EOS."""
    encoded = encode(tiny_tokenizer, "hi", "the quick brown fox", max_length=64)
    rendered = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert encoded.prompt_ids == plain_ids(tiny_tokenizer, rendered)
    assert encoded.prompt_ids[0] == 1 and encoded.prompt_ids.count(1) == 2  # no extra BOS added
    assert tiny_tokenizer.convert_ids_to_tokens(encoded.prompt_ids[-5:]) == ["a", "ss", "istan", "t", "Ċ"]
    assert encoded.completion_ids == ids(tiny_tokenizer, ["the", "Ġquick", "Ġbrow", "n", "Ġfox"]) + [EOS]
    assert encoded.truncated is False
    assert encode_prompt(tiny_tokenizer, "hi") == encoded.prompt_ids


def test_boundary_never_merges_tokens(plain_tokenizer):
    """ "the quick bro" + "wn fox" joined is "the quick brown fox", which BPE tokenizes with the merged token
    'Ġbrow' spanning the boundary; the prompt alone ends in 'Ġb', 'r', 'o'. Tokenizing the joined text would
    change the prompt's last tokens and leave no token boundary where the completion starts; encode keeps
    both token lists as they are."""
    joined = plain_ids(plain_tokenizer, "the quick brown fox")
    assert plain_tokenizer.convert_ids_to_tokens(joined) == ["the", "Ġquick", "Ġbrow", "n", "Ġfox"]

    encoded = encode(plain_tokenizer, "the quick bro", "wn fox", max_length=64)
    assert encoded.prompt_ids == ids(plain_tokenizer, ["the", "Ġquick", "Ġb", "r", "o"])
    assert encoded.completion_ids == ids(plain_tokenizer, ["w", "n", "Ġfox"]) + [EOS]
    assert joined[: len(encoded.prompt_ids)] != encoded.prompt_ids
    assert (
        plain_tokenizer.decode(encoded.prompt_ids + encoded.completion_ids) == "the quick brown fox<|im_end|>"
    )


def test_bos_is_prepended_only_when_the_tokenizer_adds_one():
    """Without a template, a tokenizer whose post-processor puts BOS (<|im_start|>, id 1) in front of text
    gets it in front of the prompt, once; the completion gets no BOS."""
    from tokenizers.processors import TemplateProcessing

    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = None
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)]
    )
    encoded = encode(tokenizer, "the quick", "fox", max_length=64)
    assert encoded.prompt_ids == [1, *ids(tokenizer, ["the", "Ġquick"])]
    assert encoded.completion_ids == [*plain_ids(tokenizer, "fox"), EOS]
    assert 1 not in encoded.completion_ids


# ---------------------------------------------------------------------------------------------
# Truncation: prompt = "0 1 2 ... 9" (10 tokens), completion = "0 1 2 3" (4 tokens + EOS = 5)
# ---------------------------------------------------------------------------------------------

PROMPT_TOKENS = ["0", "Ġ1", "Ġ2", "Ġ3", "Ġ4", "Ġ5", "Ġ6", "Ġ7", "Ġ8", "Ġ9"]
COMPLETION_TOKENS = ["0", "Ġ1", "Ġ2", "Ġ3"]


@pytest.mark.parametrize(
    ("max_length", "max_prompt_length", "prompt_kept", "completion_kept", "truncated"),
    [
        # 10 + 5 = 15 fits exactly: nothing cut.
        (15, None, PROMPT_TOKENS, COMPLETION_TOKENS + ["EOS"], False),
        # 15 > 12: prompt keeps its last max(12 - 5, 12 // 2) = 7 tokens; the completion fits in 12 - 7 = 5.
        (12, None, PROMPT_TOKENS[3:], COMPLETION_TOKENS + ["EOS"], True),
        # 15 > 8: prompt keeps its last max(8 - 5, 8 // 2) = 4 tokens; completion its first 8 - 4 (EOS cut).
        (8, None, PROMPT_TOKENS[6:], COMPLETION_TOKENS, True),
        # max_prompt_length alone: last 3 prompt tokens, completion whole.
        (64, 3, PROMPT_TOKENS[7:], COMPLETION_TOKENS + ["EOS"], True),
    ],
)
def test_truncation_keeps_prompt_end_and_completion_start(
    plain_tokenizer, max_length, max_prompt_length, prompt_kept, completion_kept, truncated
):
    assert plain_ids(plain_tokenizer, DIGITS) == ids(plain_tokenizer, PROMPT_TOKENS)
    encoded = encode(plain_tokenizer, DIGITS, "0 1 2 3", max_length, max_prompt_length)
    expected_completion = [
        EOS if t == "EOS" else plain_tokenizer.convert_tokens_to_ids(t) for t in completion_kept
    ]
    assert encoded.prompt_ids == ids(plain_tokenizer, prompt_kept)
    assert encoded.completion_ids == expected_completion
    assert encoded.truncated is truncated
    assert len(encoded.prompt_ids) + len(encoded.completion_ids) <= max_length


def test_pair_truncation_shares_the_prompt(plain_tokenizer):
    """chosen "0 1 2 3" = 5 ids with EOS, rejected "0" = 2 ids. max_length 8: the longest (5) sets the
    prompt to its last max(8 - 5, 4) = 4 tokens; each completion gets the first 4: chosen loses its EOS,
    rejected fits."""
    pair = encode_pair(plain_tokenizer, DIGITS, "0 1 2 3", "0", max_length=8)
    assert pair.prompt_ids == ids(plain_tokenizer, PROMPT_TOKENS[6:])
    assert pair.chosen_ids == ids(plain_tokenizer, COMPLETION_TOKENS)
    assert pair.rejected_ids == ids(plain_tokenizer, ["0"]) + [EOS]
    assert pair.truncated is True

    whole = encode_pair(plain_tokenizer, DIGITS, "0 1 2 3", "0", max_length=15)
    assert (len(whole.prompt_ids), whole.truncated) == (10, False)


def test_encode_prompt_and_unpaired(plain_tokenizer):
    assert encode_prompt(plain_tokenizer, DIGITS, max_prompt_length=2) == ids(plain_tokenizer, ["Ġ8", "Ġ9"])
    unpaired = encode_unpaired(plain_tokenizer, "0 1", "2", label=False, max_length=64)
    assert unpaired == EncodedUnpaired(
        ids(plain_tokenizer, ["0", "Ġ1"]), ids(plain_tokenizer, ["2"]) + [EOS], False, False
    )
    with pytest.raises(ValueError, match="max_length must be at least 2"):
        encode(plain_tokenizer, "0", "1", max_length=1)


# ---------------------------------------------------------------------------------------------
# collate
# ---------------------------------------------------------------------------------------------

PAD = 0


def test_collate_sft_masks():
    """Rows (prompt | completion): [5, 6 | 7, 2], [5 | 8, 9, 2], [5, 6, 6 | 2], [3 | 4, 4, 4, 2].
    Lengths 4, 4, 4, 5 -> T = 5, n_tokens = 17; completion tokens 2 + 3 + 1 + 4 = 10 = n_items."""
    batch = [
        Encoded([5, 6], [7, 2], False),
        Encoded([5], [8, 9, 2], False),
        Encoded([5, 6, 6], [2], False),
        Encoded([3], [4, 4, 4, 2], True),
    ]
    out = collate_sft(batch, pad_id=PAD)
    assert out["input_ids"].tolist() == [
        [5, 6, 7, 2, PAD],
        [5, 8, 9, 2, PAD],
        [5, 6, 6, 2, PAD],
        [3, 4, 4, 4, 2],
    ]
    assert out["attention_mask"].tolist() == [
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
    ]
    assert out["loss_mask"].tolist() == [
        [False, False, True, True, False],
        [False, True, True, True, False],
        [False, False, False, True, False],
        [False, True, True, True, True],
    ]
    assert out["input_ids"].dtype == torch.long and out["loss_mask"].dtype == torch.bool
    assert (out["n_items"], out["n_tokens"]) == (10, 17)


def test_collate_pairs_puts_chosen_rows_first():
    """Two pairs -> 4 rows: chosen0, chosen1, rejected0, rejected1. Longest row: prompt [1] + rejected0
    [6, 6, 6, 2] = 5 tokens. n_items counts pairs (2); n_tokens = 3 + 4 + 5 + 4 = 16."""
    batch = [EncodedPair([1], [4, 2], [6, 6, 6, 2], False), EncodedPair([1, 3], [5, 2], [7, 2], False)]
    out = collate_pairs(batch, pad_id=PAD)
    assert out["input_ids"].tolist() == [
        [1, 4, 2, PAD, PAD],
        [1, 3, 5, 2, PAD],
        [1, 6, 6, 6, 2],
        [1, 3, 7, 2, PAD],
    ]
    assert out["loss_mask"].int().tolist() == [
        [0, 1, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 1, 1, 1, 1],
        [0, 0, 1, 1, 0],
    ]
    assert out["attention_mask"].tolist() == [
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 1, 1, 0],
    ]
    assert (out["n_items"], out["n_tokens"]) == (2, 16)


def test_collate_unpaired_labels():
    batch = [EncodedUnpaired([1, 1], [4, 2], True, False), EncodedUnpaired([1], [2], False, False)]
    out = collate_unpaired(batch, pad_id=PAD)
    assert out["input_ids"].tolist() == [[1, 1, 4, 2], [1, 2, PAD, PAD]]
    assert out["loss_mask"].int().tolist() == [[0, 0, 1, 1], [0, 1, 0, 0]]
    assert out["labels"].tolist() == [True, False]
    assert (out["n_items"], out["n_tokens"]) == (2, 6)
    with pytest.raises(ValueError, match="empty batch"):
        collate_sft([], pad_id=PAD)
