"""What the live page computes on a loaded model, without Streamlit: the names it may load, one prompt's inputs
(with an uploaded image for LVLMs), the layer x head statistics of the prompt from headlab's statistics probe,
one head's full pattern, and greedy generations with and without interventions.

The page reads no file the user did not name: models come from the catalog (the tiny zoo, the bundled and
embedded models, aliases found in the local Hugging Face cache, never downloaded) or from a local folder or
``.gguf`` file whose path the user typed; images come from the upload widget, as bytes.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from headlab.errors import InputError
from headlab.zoo.catalog import ALIASES, BUNDLED_MODELS, EMBEDDED, TINY_DESCRIPTIONS

MAX_PROMPT_TOKENS = 512  # prompt (image tokens included); full patterns are O(T^2) per head
MAX_NEW_TOKENS = 64  # per generation; the page generates twice (without and with the edits)
DEFAULT_NEW_TOKENS = 16
MAX_IMAGE_BYTES = 20 * 2**20
IMAGE_TYPES = ("png", "jpg", "jpeg", "webp", "bmp", "gif")

# Column -> label of the per-head statistics (the heatmap's choices). ``image_mass`` only for image inputs.
STATISTICS = {
    "entropy": "entropy (nats), mean over query rows",
    "first_token_mass": "mass on the first token (BOS), mean over query rows",
    "previous_token_mass": "mass on the previous token, mean over rows that have one",
    "image_mass": "mass on the image tokens, mean over the rows after the image",
}


def live_model_names() -> list[str]:
    """Catalog names the page offers: the real decoders first (smollm2-135m, llava-smol), the bundled models, the
    encoder, the tiny random test models, and last the aliases (loaded only if already in the local cache)."""
    decoders = [name for name in EMBEDDED if name != "minilm"]
    encoders = [name for name in EMBEDDED if name == "minilm"]
    return [*decoders, *BUNDLED_MODELS, *encoders, *TINY_DESCRIPTIONS, *ALIASES]


def check_model_source(text: str) -> str:
    """The name to load for what the user picked or typed: a catalog name, or an existing local folder or
    ``.gguf`` file (its resolved path). Anything else is one ``InputError`` saying what the page accepts."""
    text = (text or "").strip()
    if not text:
        raise InputError("no model given: pick one from the list, or type the path of a local model folder")
    if text in live_model_names():
        return text
    path = Path(text).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix == ".gguf"):
        return str(path.resolve())
    if path.exists():
        raise InputError(f"{text} is a file but not a .gguf file: type a Hugging Face model folder (config.json, "
                         "*.safetensors, tokenizer files) or a .gguf file")
    raise InputError(f"unknown model {text!r}: not a name from the list and no local folder or .gguf file at that "
                     "path. The live page loads catalog names and local paths only; it never downloads a hub id "
                     "(download it with `hf download` first, then type its folder)")


@dataclass
class LiveModel:
    """A loaded model shared by the page's sessions; ``lock`` serialises their forward passes (interventions
    install hooks on the shared model, so two sessions must not run on it at once)."""

    loaded: object  # headlab.LoadedModel
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def name(self) -> str:
        return self.loaded.name


def load_live_model(source: str) -> LiveModel:
    """``headlab.load`` with the page's safe defaults: local files only (no hub download), no remote code."""
    import headlab

    name = check_model_source(source)
    return LiveModel(headlab.load(name, dtype="auto", device="auto", local_files_only=True))


@dataclass
class LiveInput:
    """One prompt ready for the model: ``tensors`` (``input_ids [1, pos]``, ``attention_mask``, for LVLMs
    ``pixel_values``), its ``ids``, readable and raw tokens, and the image tokens' spans (positions from the
    first token; empty without an image)."""

    tensors: dict[str, torch.Tensor]
    ids: list[int]
    tokens: list[str]
    raw_tokens: list[str]
    image_spans: list[tuple[int, int]] = field(default_factory=list)
    text_after: int = 0  # first position after the last image token (0 without an image)
    pixels_digest: str | None = None  # sha256 of pixel_values (None without an image)
    sample: object | None = None  # LVLMs: the headlab.lvlm.LvlmSample the tensors came from (the LVLM fixes use it)

    @property
    def n_tokens(self) -> int:
        return len(self.ids)

    def cache_key(self) -> tuple:
        """What identifies this input in memos: the token ids and the pixels."""
        return tuple(self.ids), self.pixels_digest

    def token_labels(self) -> list[str]:
        from headlab.tokens import token_label

        return [token_label(i, t) for i, t in enumerate(self.tokens)]


def read_image(data: bytes, name: str = "the upload"):
    """An RGB PIL image from uploaded bytes; too large (bytes or pixels), not an image or corrupt is one
    ``InputError`` (the pixel limit as for every image headlab reads: ``headlab.lvlm.decode_image``)."""
    from headlab.lvlm import decode_image

    if len(data) > MAX_IMAGE_BYTES:
        raise InputError(f"{name} has {len(data) / 2**20:.1f} MB; the live page takes images up to "
                         f"{MAX_IMAGE_BYTES // 2**20} MB: upload a smaller one")
    return decode_image(data, name)


def prompt_limit(loaded) -> int:
    """Longest prompt the page takes: MAX_PROMPT_TOKENS, or less when the model's context is shorter."""
    limit = loaded.arch.max_positions
    return MAX_PROMPT_TOKENS if limit is None else min(MAX_PROMPT_TOKENS, int(limit))


def build_input(loaded, prompt: str, image=None, chat: bool = False) -> LiveInput:
    """Tokenise ``prompt`` as headlab's analyses do: the BOS policy (``chat``: the chat template) for text
    models, the processor's chat template with the image for LVLMs. Refuses an empty or too long prompt."""
    from headlab.batching import check_known_tokens, encode
    from headlab.tokens import display_tokens, raw_tokens

    if not prompt.strip():
        raise InputError("the prompt is empty: type some text")
    device = loaded.device
    tok = loaded.text_tokenizer
    spans: list[tuple[int, int]] = []
    text_after = 0
    sample = None
    if loaded.arch.is_multimodal:
        from headlab.lvlm import LvlmSample, build_inputs

        sample = LvlmSample(prompt, [image] if image is not None else [])
        inputs = build_inputs(loaded, [sample])
        tensors = {k: v.to(device) for k, v in inputs.tensors.items()}
        ids = inputs.input_ids[0].tolist()
        spans, text_after = list(inputs.image_spans[0]), inputs.text_after[0]
    else:
        if image is not None:
            raise InputError(f"{loaded.name} is a text-only model: remove the image, or load an LVLM "
                             "(llava-smol, tiny-llava)")
        if chat:
            from headlab.analyses.generation import chat_ids

            ids = chat_ids(loaded, prompt)
        else:
            ids = encode(loaded, prompt, max_tokens=1 << 30)
        check_known_tokens(loaded, [ids])
        input_ids = torch.tensor([ids], device=device)
        tensors = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    limit = prompt_limit(loaded)
    if len(ids) > limit:
        what = "this prompt with its image" if spans else "this prompt"
        raise InputError(f"{what} has {len(ids)} tokens; the live page takes at most {limit} "
                         f"({'the model context' if limit < MAX_PROMPT_TOKENS else 'its compute limit'}): shorten "
                         "it, or use `analyze` for long inputs (statistics without T x T patterns)")
    pixels = tensors.get("pixel_values")
    digest = None if pixels is None else hashlib.sha256(pixels.float().cpu().numpy().tobytes()).hexdigest()
    return LiveInput(tensors, ids, display_tokens(tok, ids), raw_tokens(tok, ids), spans, text_after, digest,
                     sample)


def prompt_statistics(loaded, inp: LiveInput) -> pd.DataFrame:
    """One row per (layer, head) of the prompt's attention statistics, from ``AttentionProbe`` (the fused
    statistics path, no T x T): entropy, first-token mass, previous-token mass, and for image inputs the mass
    on the image tokens. Columns: layer, head and the ``STATISTICS`` that apply."""
    from headlab.kernels import StatsRequest
    from headlab.probes import AttentionProbe

    arch = loaded.arch
    labels = None
    if inp.image_spans:
        labels = torch.full((1, inp.n_tokens), -1, dtype=torch.long, device=loaded.device)
        for start, stop in inp.image_spans:
            labels[0, start:stop] = 0  # group 0: the image tokens
    request = StatsRequest(distance=True, key_groups=labels, n_groups=1 if labels is not None else None)
    with torch.no_grad(), AttentionProbe(loaded, request=request) as probe:
        loaded.model(**inp.tensors)
    rows = []
    for layer in range(arch.n_layers):
        stats = probe.last[layer]
        counted = stats.row_counted[0].float()  # [query]
        n_rows = counted.sum()
        entropy = (stats.entropy[0].float() * counted).sum(-1) / n_rows  # [head]
        first = (stats.first_mass[0].float() * counted).sum(-1) / n_rows
        # Distance bin 1 holds exactly d = i - j = 1 (keys before the query): the previous token.
        pairs = stats.distance_count[0, 0, 1] if stats.distance_mass.shape[-1] > 1 else torch.tensor(0.0)
        previous = stats.distance_mass[0, :, 0, 1] / pairs if pairs > 0 else torch.full_like(first, float("nan"))
        columns = {"entropy": entropy, "first_token_mass": first, "previous_token_mass": previous}
        if labels is not None:
            after = torch.zeros_like(counted)
            after[inp.text_after:] = 1.0
            after = after * counted
            image = stats.group_mass[0, :, :, 0].float()  # [head, query]
            columns["image_mass"] = (image * after).sum(-1) / after.sum() if after.sum() > 0 \
                else torch.full_like(first, float("nan"))
        for head in range(arch.n_heads):
            rows.append({"layer": layer, "head": head, **{k: float(v[head]) for k, v in columns.items()}})
    return pd.DataFrame(rows)


def statistic_grid(table: pd.DataFrame, column: str) -> np.ndarray:
    """``[layer, head]`` of one statistics column."""
    grid = table.pivot(index="layer", columns="head", values=column)
    return grid.sort_index().sort_index(axis=1).to_numpy(dtype=float)


def head_pattern(loaded, inp: LiveInput, layer: int, head: int):
    """``headlab.AttentionPattern`` of one head on the prompt (eager, O(T^2), the prompt is capped).

    Text prompts go through ``headlab.attention``; image prompts through ``headlab.trace`` on the same
    tensors (the pattern needs the pixels)."""
    import headlab
    from headlab.probes.patterns import AttentionPattern

    if not inp.image_spans:
        return headlab.attention(loaded, inp.ids, layer=layer, head=head, max_tokens=max(inp.n_tokens, 1))
    name = f"blocks.{layer}.attn.hook_pattern"
    with torch.no_grad(), headlab.trace(loaded, [name], stats=False, max_pattern_tokens=inp.n_tokens) as t:
        loaded.model(**inp.tensors)
    pattern = t[name][0, [head]].float().cpu()  # [1, query, key]
    return AttentionPattern(pattern=pattern, layer=layer, heads=[head], tokens=inp.tokens, raw_tokens=inp.raw_tokens,
                            token_ids=inp.ids, model=loaded.name, causal=loaded.arch.causal)


def check_new_tokens(loaded, inp: LiveInput, max_new_tokens: int) -> None:
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise InputError(f"new tokens must lie between 1 and {MAX_NEW_TOKENS} (the page's compute limit), "
                         f"got {max_new_tokens}")
    limit = loaded.arch.max_positions
    if limit is not None and inp.n_tokens + max_new_tokens > limit:
        raise InputError(f"{loaded.name} has {limit} positions: a {inp.n_tokens}-token prompt leaves room for "
                         f"{max(limit - inp.n_tokens, 0)} new tokens, not {max_new_tokens}; ask for fewer or "
                         "shorten the prompt")


def greedy(loaded, inp: LiveInput, max_new_tokens: int, edits: Sequence = ()) -> list[int]:
    """The new token ids of a greedy continuation of the prompt, under ``edits`` (``headlab.intervene``) if any.
    Edits that hold an LVLM fix (``live_fixes.LiveFix``) generate through ``generate_fixed`` instead
    (``live_fixes.greedy_fixed``: the prompt's image required, the other edits in the same block).

    The model is left bit-exact: ``intervene`` removes every edit on exit, on error too."""
    if not loaded.generates:
        raise InputError(f"{loaded.name} is an encoder: it does not generate text (statistics and patterns only)")
    check_new_tokens(loaded, inp, max_new_tokens)
    if edits:
        from .live_fixes import fix_of, greedy_fixed  # the fixes' module loads only when edits are asked for

        if any(fix_of(edit) is not None for edit in edits):
            return greedy_fixed(loaded, inp, max_new_tokens, edits)
    from headlab.analyses.generation import greedy as greedy_tokens

    return greedy_tokens(loaded, inp.tensors, max_new_tokens, edits=list(edits) if edits else None)[0].tolist()


def decode(loaded, inp: LiveInput, new_ids: Sequence[int]) -> tuple[str, list[str]]:
    """The text that new token ids add after the prompt, and their readable tokens (``"".join(tokens) == text``).

    Read in context: alone, a word-initial token of a SentencePiece vocabulary would lose its space."""
    from headlab.tokens import display_tokens

    tokens = display_tokens(loaded.text_tokenizer, [*inp.ids, *new_ids])[inp.n_tokens:]
    return "".join(tokens), tokens


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first new token where two continuations differ (None when identical)."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))
