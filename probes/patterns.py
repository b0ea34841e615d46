"""``headlab.attention``: the full attention pattern of one layer's heads on one short prompt, for pictures.

This is the one place headlab materialises ``[head, query, key]`` on purpose: it reads
``blocks.{layer}.attn.hook_pattern`` through ``headlab.trace`` (the eager backend, with any active
``headlab.intervene`` edits applied) and refuses prompts above a token limit before the model runs.
Everything else stays on the statistics path (O(H·T) per layer).

    pattern = headlab.attention(loaded, "When Mary and John went to the store,", layer=3)
    pattern               # renders as a heatmap in a notebook, with a head selector
    pattern.numpy()       # [head, query, key] float32
    pattern.tokens        # readable tokens (" Mary"), pattern.raw_tokens the vocabulary's ("ĠMary")
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
import torch

from headlab.batching import encode
from headlab.errors import InputError
from headlab.tokens import display_tokens, raw_tokens, token_label

DEFAULT_MAX_TOKENS = 512


@dataclass(repr=False)
class AttentionPattern:
    """Attention probabilities ``pattern [head, query, key]`` of ``heads`` of ``layer`` on one prompt.

    ``tokens`` are readable (``headlab.tokens.display_tokens``), ``raw_tokens`` the vocabulary strings;
    ``causal``: whether a query sees only the keys up to itself (decoders) or every key (encoders).
    """

    pattern: torch.Tensor  # [head, query, key], float32 on the CPU
    layer: int
    heads: list[int]
    tokens: list[str]
    raw_tokens: list[str]
    token_ids: list[int]
    model: str
    causal: bool = True

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.pattern.shape)

    def numpy(self) -> np.ndarray:
        """``[head, query, key]`` float32 (a copy: editing it leaves the pattern as it was)."""
        return self.pattern.numpy().copy()

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self.pattern.numpy()
        return array.astype(dtype) if dtype is not None else array.copy()

    def head(self, head: int) -> np.ndarray:
        """``[query, key]`` of model head ``head`` (its index in the model, not in ``heads``)."""
        return self.numpy()[self._index(head)]

    def received(self) -> np.ndarray:
        """``[head, key]``: mean attention each key receives from the queries that see it.

        Causal models divide column sums by the number of queries at or after the key (T - k), the
        normaliser of the sink metric (alpha, Gu et al.); encoders by T."""
        t = self.pattern.shape[-1]
        seen_by = torch.arange(t, 0, -1, dtype=torch.float32) if self.causal else torch.full((t,), float(t))
        return (self.pattern.sum(1) / seen_by).numpy()

    def entropy(self) -> np.ndarray:
        """``[head, query]``: entropy (nats) of each query's attention distribution."""
        p = self.pattern
        return -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(-1).numpy()

    def figure(self, head: int | None = None) -> go.Figure:
        """A heatmap (query on y from the top, key on x) of ``head``; with several heads and ``head=None``, a
        dropdown picks the head (one trace per head, one visible)."""
        chosen = self.heads if head is None else [self.heads[self._index(head)]]
        labels = [token_label(i, t) for i, t in enumerate(self.tokens)]
        fig = go.Figure()
        for n, h in enumerate(chosen):
            fig.add_trace(go.Heatmap(
                z=self.pattern[self._index(h)].numpy(), x=labels, y=labels, colorscale="Viridis", zmin=0.0,
                zmax=1.0, visible=n == 0, name=f"head {h}", colorbar={"title": "attention"},
                hovertemplate=f"head {h}<br>query %{{y}}<br>key %{{x}}<br>p = %{{z:.4g}}<extra></extra>"))
        title = f"{_model_title(self.model)}: layer {self.layer}, head {{}} attention pattern"
        fig.update_layout(title=title.format(chosen[0]), xaxis={"title": "key", "tickangle": -60},
                          yaxis={"title": "query", "autorange": "reversed"},
                          height=min(900, 260 + 14 * len(labels)))
        if len(chosen) > 1:
            fig.update_layout(updatemenus=[{
                "type": "dropdown", "x": 1.0, "xanchor": "right", "y": 1.12, "yanchor": "bottom",
                "buttons": [{"label": f"head {h}", "method": "update",
                             "args": [{"visible": [m == n for m in range(len(chosen))]},
                                      {"title": title.format(h)}]} for n, h in enumerate(chosen)]}])
        return fig

    def _repr_html_(self) -> str:
        # Offline: the first output of the session carries plotly.js itself (no CDN), later ones reuse it.
        return self.figure().to_html(full_html=False, include_plotlyjs=_plotlyjs_once())

    def __repr__(self) -> str:
        heads = _span(self.heads)
        return (f"AttentionPattern(model={self.model!r}, layer={self.layer}, heads={heads}, "
                f"tokens={len(self.tokens)}, shape={list(self.shape)})")

    def _index(self, head: int) -> int:
        if head not in self.heads:
            raise InputError(f"head {head} is not in this pattern; it holds heads {_span(self.heads)}")
        return self.heads.index(head)


def attention(loaded, prompt: str | Sequence[int], layer: int, head: int | Sequence[int] | None = None, *,
              max_tokens: int = DEFAULT_MAX_TOKENS) -> AttentionPattern:
    """The attention pattern ``[head, query, key]`` of ``layer`` on ``prompt`` (text, or token ids).

    ``head``: one head, a list, or ``None`` for all. The prompt is tokenized under the model's BOS policy;
    above ``max_tokens`` tokens it is refused before the model runs (the pattern is O(H·T²); use the
    statistics path for long inputs). Active ``headlab.intervene`` edits show in the pattern.
    """
    from headlab.probes import trace

    arch = loaded.arch
    if not isinstance(layer, (int, np.integer)) or not 0 <= layer < arch.n_layers:
        raise InputError(f"layer {layer!r} does not exist; {loaded.name} has layers 0..{arch.n_layers - 1}")
    heads = list(range(arch.n_heads)) if head is None else [head] if isinstance(head, (int, np.integer)) \
        else list(head)
    bad = [h for h in heads if not isinstance(h, (int, np.integer)) or not 0 <= h < arch.n_heads]
    if bad or not heads:
        raise InputError(f"head {bad[0] if bad else '[]'!r} does not exist; {loaded.name} has heads "
                         f"0..{arch.n_heads - 1} per layer (head=None for all)")
    if max_tokens <= 0:
        raise InputError(f"max_tokens must be a positive number of tokens, got {max_tokens}")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise InputError("the prompt is empty; pass some text (or token ids)")
        ids = encode(loaded, prompt, max_tokens=1 << 30)
    else:
        ids = [int(i) for i in prompt]
        if not ids:
            raise InputError("no token ids given; pass some text or a non-empty list of ids")
    if len(ids) > max_tokens:
        raise InputError(
            f"headlab.attention keeps full [head, query, key] patterns of short prompts only: this prompt has "
            f"{len(ids)} tokens, the limit is {max_tokens}. Shorten it, pass max_tokens={len(ids)} if the "
            f"pattern fits in memory, or use the statistics path (AttentionProbe, `headlab analyze`) for long inputs")
    name = f"blocks.{int(layer)}.attn.hook_pattern"
    input_ids = torch.tensor([ids], device=loaded.device)
    with torch.no_grad(), trace(loaded, [name], stats=False, max_pattern_tokens=max_tokens) as t:
        loaded.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    pattern = t[name][0, heads].float().cpu()  # [head, query, key]
    tokenizer = loaded.text_tokenizer
    return AttentionPattern(pattern=pattern, layer=int(layer), heads=[int(h) for h in heads],
                            tokens=display_tokens(tokenizer, ids), raw_tokens=raw_tokens(tokenizer, ids),
                            token_ids=ids, model=loaded.name, causal=arch.causal)


def _span(heads: list[int]) -> str:
    if len(heads) > 2 and heads == list(range(heads[0], heads[-1] + 1)):
        return f"{heads[0]}..{heads[-1]}"
    return str(heads)


def _model_title(model: str) -> str:
    from headlab.figures import model_title

    return model_title(model)


_PLOTLYJS_SHOWN = False


def _plotlyjs_once() -> bool:
    """True the first time (the library goes into that output), False afterwards."""
    global _PLOTLYJS_SHOWN
    first = not _PLOTLYJS_SHOWN
    _PLOTLYJS_SHOWN = True
    return first
