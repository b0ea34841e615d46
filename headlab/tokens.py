"""Tokens for people: ``display_tokens(tokenizer, ids)`` turns token ids into the text each one adds.

Raw vocabulary strings are unreadable for byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM2): ``Ġold`` is
`` old`` and ``ä½`` + ``ł`` are the two byte pieces of ``你``. Every table, token view and pattern label
shows the readable form and keeps the raw token beside it (``token`` / ``token_raw``).

The readable form of token i is the text it adds to the decoded prompt, so that
``"".join(display_tokens(tok, ids)) == tok.decode(ids)``:
- a word-initial token carries its space (`` old``; WordPiece's ``##ing`` adds ``ing``);
- a character split over several byte pieces is shown on the piece that completes it; the earlier
  pieces add nothing yet and read ``""`` (their raw form tells them apart);
- special tokens (``<|im_start|>``, ``[CLS]``) are shown as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

# A multi-byte character that is still incomplete after this many pieces is not one (a genuine U+FFFD
# in the text, or invalid bytes): the pieces are shown as decoded then, replacement characters included.
MAX_PENDING_PIECES = 4


def display_tokens(tokenizer, ids: Sequence[int]) -> list[str]:
    """The readable text of each token of ``ids`` (one string per id, ``""`` for a leading byte piece).

    ``tokenizer``: a Hugging Face tokenizer, or a processor holding one (``.tokenizer``).
    """
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    ids = [int(i) for i in ids]
    if not ids:
        return []
    byte_map = _byte_level_map(tokenizer)
    if byte_map is not None:
        return _byte_level(tokenizer, ids, byte_map)
    return _incremental(tokenizer, ids)


def raw_tokens(tokenizer, ids: Sequence[int]) -> list[str]:
    """The vocabulary strings of ``ids`` (``Ġold``, ``##ing``, ``<0xE4>``), as the tokenizer stores them."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    return [str(t) for t in tokenizer.convert_ids_to_tokens([int(i) for i in ids])]


def token_label(position: int, text: str) -> str:
    """A short unique axis label for a token: ``"3 ␣old"``; whitespace made visible, empty pieces ``·``."""
    visible = text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥") if text else "·"
    return f"{position} {visible}"


def _byte_level(tokenizer, ids: list[int], byte_map: dict[str, int]) -> list[str]:
    """GPT-2 byte-level BPE: tokens are byte strings; emit the longest complete UTF-8 prefix after each."""
    special = set(getattr(tokenizer, "all_special_ids", []) or []) | set(_added_ids(tokenizer))
    raw = tokenizer.convert_ids_to_tokens(ids)
    out: list[str] = []
    pending = b""
    n_pending = 0
    for token_id, token in zip(ids, raw, strict=True):
        token = "" if token is None else str(token)
        if token_id in special or any(ch not in byte_map for ch in token):
            # Added/special tokens are literal text, not byte strings.
            text = pending.decode("utf-8", errors="replace") + token
            pending, n_pending = b"", 0
            out.append(text)
            continue
        pending += bytes(byte_map[ch] for ch in token)
        n_pending += 1
        complete = _complete_prefix(pending)
        if n_pending > MAX_PENDING_PIECES:
            complete = len(pending)
        out.append(pending[:complete].decode("utf-8", errors="replace"))
        if complete:  # what is left is the start of a character in this token's last bytes
            n_pending = 1 if complete < len(pending) else 0
        pending = pending[complete:]
    if pending:  # the ids end inside a character: show what is there
        out[-1] += pending.decode("utf-8", errors="replace")
    return out


def _complete_prefix(data: bytes) -> int:
    """Length of the longest prefix of ``data`` that does not end inside a multi-byte UTF-8 character."""
    # Look back at most 3 bytes for the start of a character that is still missing continuation bytes.
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0b1100_0000 == 0b1000_0000:  # a continuation byte: keep looking for its lead byte
            continue
        need = 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4 if byte >> 3 == 0b11110 else 1
        return len(data) - back if need > back else len(data)
    return len(data)  # continuation bytes with no lead byte: invalid, shown as they are


def _incremental(tokenizer, ids: list[int]) -> list[str]:
    """Any other tokenizer (WordPiece, SentencePiece, word-level): the text each token adds to the decode.

    As streaming detokenizers do: decode a window from the last emitted token, with one token of context
    so that word-initial spaces survive, and hold back text that ends in an incomplete character (U+FFFD).
    """
    out: list[str] = []
    prefix, read = 0, 0  # window start (context) and first token not yet shown

    def decode(part: list[int]) -> str:
        return tokenizer.decode(part, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    for i in range(len(ids)):
        before = decode(ids[prefix:read])
        after = decode(ids[prefix:i + 1])
        waiting = after.endswith("\ufffd") and i + 1 - read <= MAX_PENDING_PIECES
        if waiting or not after.startswith(before):
            if not waiting:  # a decoder that rewrites earlier text: fall back to the token alone
                out.append(decode([ids[i]]))
                prefix, read = i, i + 1
            else:
                out.append("")
            continue
        out.append(after[len(before):])
        prefix, read = read, i + 1
    return out


def _added_ids(tokenizer) -> list[int]:
    try:
        return list(tokenizer.get_added_vocab().values())
    except (AttributeError, NotImplementedError):
        return []


def _byte_level_map(tokenizer) -> dict[str, int] | None:
    """GPT-2's unicode -> byte table when the tokenizer decodes with a ByteLevel decoder, else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None or type(decoder).__name__ != "ByteLevel":
        return None
    return _gpt2_byte_decoder()


@lru_cache(maxsize=1)
def _gpt2_byte_decoder() -> dict[str, int]:
    # GPT-2's bytes_to_unicode: printable bytes stand for themselves, the others for chr(256 + n).
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}
