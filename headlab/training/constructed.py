"""A hand-built Llama-style model with a known primary sink and known secondary sinks (the detector's oracle).

Residual-stream layout (``d_model`` dims):
- dim 0: the sink direction; BOS's embedding has ``bos_sink`` there, and the MLP of layer 1 adds
  ``bos_boost`` more (the BOS norm jumps between layers 0 and 1, so the scan window starts at 1);
  the MLP of the last layer takes ``bos_boost / 2`` away again (the window ends before the last layer).
- dim 1: a constant 1 in every token's embedding, read by every query.
- dims 2 + id: a one-hot of the token id, read by the MLP neurons that recognise a token.

Attention: layer 0 is uniform (zero queries); from layer 1 on every head's query reads dim 1 and its
key reads dim 0, so every query attends to the keys with a large sink component: BOS, and any token
an MLP has made BOS-aligned. All value and output projections are zero, so attention never changes a
residual and each token's residual depends only on its id. Query and key use the last rotary pair of
each head with ``rope_theta`` = 1e6, so the rotation over 64 positions is below 1e-4 rad.

A secondary sink ``SinkSpec(token, creation, lifetime, norm)``: the MLP at layer ``creation`` writes a
vector of L2 norm ``norm`` along dim 0 into every occurrence of ``token`` (cos with h(BOS) > 0.9 from
then on), and the MLP at layer ``creation + lifetime`` writes a large vector along the token's one-hot
dim, which ends its life. Each neuron's output scale is calibrated by running the real modules, so
the written norms are exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from headlab.arch import Arch
from headlab.loading import LoadedModel
from headlab.training.backcopy import BOS, PAD, UNK, word_tokenizer

N_WORDS = 40


@dataclass(frozen=True)
class SinkSpec:
    token: int  # id of the word made a sink (0 .. N_WORDS - 1)
    creation: int  # layer whose MLP writes the BOS-aligned vector
    lifetime: int  # layers during which the token stays BOS-aligned
    norm: float = 6.0  # L2 norm of the written vector


@dataclass
class ConstructedSpec:
    sinks: list[SinkSpec] = field(default_factory=lambda: [SinkSpec(7, 5, 6)])
    n_layers: int = 24
    n_heads: int = 2
    d_model: int = 64
    d_mlp: int = 16
    bos_sink: float = 4.0
    bos_boost: float = 40.0
    query_gain: float = 1.0
    end_gain: float = 10.0  # the vector ending a sink's life is end_gain x (norm + 1) long

    def vocab(self) -> dict[str, int]:
        names = [f"w{i}" for i in range(N_WORDS)] + [BOS, PAD, UNK]
        return {name: i for i, name in enumerate(names)}


def build_constructed(spec: ConstructedSpec | None = None) -> LoadedModel:
    """The hand-set model as a ``LoadedModel`` (name ``constructed``) with a word tokenizer that adds BOS."""
    spec = spec or ConstructedSpec()
    vocab = spec.vocab()
    bos = vocab[BOS]
    _check(spec, len(vocab))
    head_dim = spec.d_model // spec.n_heads
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=spec.d_model, intermediate_size=spec.d_mlp,
        num_hidden_layers=spec.n_layers, num_attention_heads=spec.n_heads, num_key_value_heads=spec.n_heads,
        head_dim=head_dim, max_position_embeddings=64, bos_token_id=bos, pad_token_id=vocab[PAD],
        eos_token_id=None, tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
        embed = model.model.embed_tokens.weight
        embed[:, 1] = 1.0
        embed[torch.arange(len(vocab)), 2 + torch.arange(len(vocab))] = 1.0
        embed[bos, 0] = spec.bos_sink
        rotary = head_dim // 2 - 1  # the slowest rotary pair: (rotary, rotary + head_dim / 2)
        for layer in model.model.layers[1:]:
            for h in range(spec.n_heads):
                layer.self_attn.q_proj.weight[h * head_dim + rotary, 1] = spec.query_gain
                layer.self_attn.k_proj.weight[h * head_dim + rotary, 0] = 1.0
        writes: dict[int, list[tuple[int, torch.Tensor]]] = {}  # layer -> [(token, vector to write)]
        sink_dir = torch.zeros(spec.d_model)
        sink_dir[0] = 1.0
        writes.setdefault(1, []).append((bos, spec.bos_boost * sink_dir))
        writes.setdefault(spec.n_layers - 1, []).append((bos, -0.5 * spec.bos_boost * sink_dir))
        for sink in spec.sinks:
            writes.setdefault(sink.creation, []).append((sink.token, sink.norm * sink_dir))
            end = sink.creation + sink.lifetime
            if end < spec.n_layers:
                own = torch.zeros(spec.d_model)
                own[2 + sink.token] = spec.end_gain * (sink.norm + 1)
                writes.setdefault(end, []).append((sink.token, own))
        _set_neurons(model, writes, spec)
    tokenizer = word_tokenizer(vocab, add_bos=True, max_length=64)
    model.name_or_path = "constructed"
    return LoadedModel("constructed", model, tokenizer, Arch.from_model(model, tokenizer), "constructed")


def _set_neurons(model: LlamaForCausalLM, writes: dict[int, list[tuple[int, torch.Tensor]]],
                 spec: ConstructedSpec) -> None:
    """One SwiGLU neuron per (layer, token) write, calibrated layer by layer on each token's own residual.

    The neuron's gate and up rows read the token's one-hot dim, so it is exactly zero for every other
    token (silu(0) = 0); its down column is the written vector divided by the neuron's activation.
    """
    embed = model.model.embed_tokens.weight
    residual = {t: embed[t].clone() for t in range(embed.shape[0])}  # attention writes nothing
    for index, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        for slot, (token, vector) in enumerate(writes.get(index, [])):
            mlp.gate_proj.weight[slot, 2 + token] = 4.0
            mlp.up_proj.weight[slot, 2 + token] = 1.0
            x = layer.post_attention_layernorm(residual[token])
            activation = torch.nn.functional.silu(mlp.gate_proj.weight[slot] @ x) * (mlp.up_proj.weight[slot] @ x)
            mlp.down_proj.weight[:, slot] = vector / activation
        for token in residual:
            residual[token] = residual[token] + mlp(layer.post_attention_layernorm(residual[token]))


def _check(spec: ConstructedSpec, vocab_size: int) -> None:
    if spec.d_model < 2 + vocab_size:
        raise ValueError(f"d_model must be at least {2 + vocab_size} (sink, constant and one-hot dims)")
    per_layer: dict[int, int] = {1: 1, spec.n_layers - 1: 1}
    for sink in spec.sinks:
        if not 0 <= sink.token < N_WORDS:
            raise ValueError(f"sink token must be a word id in 0..{N_WORDS - 1}, got {sink.token}")
        if not 1 <= sink.creation < sink.creation + sink.lifetime <= spec.n_layers - 1:
            raise ValueError(f"sink {sink} must live within layers 1 .. {spec.n_layers - 2} (the scan window)")
        for layer in (sink.creation, sink.creation + sink.lifetime):
            per_layer[layer] = per_layer.get(layer, 0) + 1
    if max(per_layer.values()) > spec.d_mlp:
        raise ValueError(f"more neurons needed in one layer than d_mlp = {spec.d_mlp}")
