"""Readable tokens (``headlab.tokens``) on real tokenizers: smollm2-135m's byte-level BPE, minilm's WordPiece,
and the tiny models' one-byte-per-token tokenizer (every non-ASCII character split into byte pieces)."""

from __future__ import annotations

import pytest

from headlab.tokens import display_tokens, raw_tokens, token_label

MIXED = "The old man said 你好世界 and Γειά σου κόσμε, café! 🙂\nnext"


@pytest.fixture(scope="module")
def smollm(load_model):
    return load_model("smollm2-135m").text_tokenizer


@pytest.mark.slow
def test_byte_level_bpe_tokens_read_as_text(smollm):
    ids = smollm("The old man").input_ids
    assert raw_tokens(smollm, ids) == ["The", "Ġold", "Ġman"]
    assert display_tokens(smollm, ids) == ["The", " old", " man"]


@pytest.mark.slow
def test_byte_pieces_of_chinese_and_greek_merge_into_characters(smollm):
    ids = smollm(MIXED).input_ids
    shown = display_tokens(smollm, ids)
    raw = raw_tokens(smollm, ids)
    assert len(shown) == len(ids)
    # Concatenated, the readable tokens are the decoded text: nothing lost, nothing doubled.
    assert "".join(shown) == smollm.decode(ids) == MIXED
    # SmolLM2 splits each Chinese character into two byte pieces: the character sits on the piece that
    # completes it, the leading piece adds nothing yet (its raw form stays in token_raw).
    start = raw.index("ä½")
    assert raw[start:start + 4] == ["ä½", "ł", "å¥", "½"]
    assert shown[start:start + 4] == ["", "你", "", "好"]
    # 'ĠÎ' is a space plus the first byte of Γ: the space shows at once, Γ with its second byte.
    gamma = raw.index("ĠÎ")
    assert shown[gamma:gamma + 2] == [" ", "Γ"]
    assert shown[raw.index("ĠcafÃ©")] == " café"
    assert "\ufffd" not in "".join(shown)
    assert all(t in MIXED for t in shown)  # each piece of text is a piece of the prompt


@pytest.mark.slow
def test_special_tokens_stay_literal_and_a_cut_character_is_shown_as_is(smollm):
    ids = smollm("<|im_start|>user\n你").input_ids
    shown = display_tokens(smollm, ids)
    assert shown[0] == "<|im_start|>" and "".join(shown) == "<|im_start|>user\n你"
    # The ids end between the two pieces of 你: the lone piece is shown (as a replacement character).
    assert display_tokens(smollm, ids[:-1])[-1] == "\ufffd"
    assert display_tokens(smollm, []) == []


def test_one_byte_per_token_tokenizer_merges_up_to_four_bytes(load_model):
    tok = load_model("tiny-llama").text_tokenizer  # every UTF-8 byte is a token
    ids = tok("a🙂é").input_ids
    shown = display_tokens(tok, ids)
    assert shown == ["<|bos|>", "a", "", "", "", "🙂", "", "é"]
    assert "".join(shown) == tok.decode(ids)


def test_processor_wrapper_and_labels(load_model):
    tok = load_model("tiny-qwen3").text_tokenizer

    class Processor:  # a multimodal processor holds its tokenizer as .tokenizer
        tokenizer = tok

    ids = tok("hi there").input_ids
    assert display_tokens(Processor(), ids) == display_tokens(tok, ids) == list("hi there")
    assert token_label(3, " old") == "3 ␣old" and token_label(0, "") == "0 ·" and token_label(5, "\n") == "5 ↵"


@pytest.mark.slow
def test_wordpiece_tokens_of_minilm(load_model):
    tok = load_model("minilm").text_tokenizer
    ids = tok("The old man walked γεια").input_ids
    raw = raw_tokens(tok, ids)
    shown = display_tokens(tok, ids)
    assert raw[:4] == ["[CLS]", "the", "old", "man"] and raw[-1] == "[SEP]"
    # Word-initial pieces carry their space, '##' continuations join the word, specials stay.
    assert shown[:4] == ["[CLS]", " the", " old", " man"] and shown[-1] == " [SEP]"
    for r, s in zip(raw, shown, strict=True):
        if r.startswith("##"):
            assert s == r[2:]
    assert "".join(shown) == tok.decode(ids, clean_up_tokenization_spaces=False)
