"""The Bigram-Backcopy task (Guo et al., 2024, "Active-Dormant Attention Heads"): data, tokenizer, model config.

A sequence starts with ``<bos>`` (unless the task is built without it), then follows a fixed, sparse
random bigram chain over ``n_ordinary`` ordinary tokens ``a0 … a63``. With probability
``p_trigger`` the chain emits a trigger token ``t0 … t2`` instead; the token after a trigger copies
the token before it, and the chain goes on from there. Small transformers trained on this task
develop heads that are active at triggers and dormant elsewhere, and the dormant heads park their
attention on the first token: a real, causal attention sink.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, PreTrainedTokenizerFast

BOS, PAD, UNK = "<bos>", "<pad>", "<unk>"
TASK_FILE = "backcopy_task.json"


@dataclass(frozen=True)
class BackcopyTask:
    """Everything that defines the data distribution; the bigram table is derived from ``task_seed``."""

    n_ordinary: int = 64
    n_triggers: int = 3
    n_successors: int = 4  # each ordinary token has this many possible successors (sparse chain)
    p_trigger: float = 0.15  # chance that the token after an ordinary token is a trigger
    seq_len: int = 64  # tokens per sequence, BOS included
    use_bos: bool = True
    task_seed: int = 1234

    @property
    def ordinary_tokens(self) -> list[str]:
        return [f"a{i}" for i in range(self.n_ordinary)]

    @property
    def trigger_tokens(self) -> list[str]:
        return [f"t{i}" for i in range(self.n_triggers)]

    @property
    def vocab(self) -> dict[str, int]:
        """Ordinary tokens first (id = index), then triggers, then ``<bos>``, ``<pad>``, ``<unk>``."""
        names = self.ordinary_tokens + self.trigger_tokens + [BOS, PAD, UNK]
        return {name: i for i, name in enumerate(names)}

    @property
    def bos_id(self) -> int:
        return self.vocab[BOS]

    @property
    def pad_id(self) -> int:
        return self.vocab[PAD]

    def is_trigger(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= self.n_ordinary) & (ids < self.n_ordinary + self.n_triggers)

    def bigram(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The sparse chain: ``successors [n_ordinary, n_successors]`` token ids and their probabilities."""
        gen = torch.Generator().manual_seed(self.task_seed)
        successors = torch.stack([torch.randperm(self.n_ordinary, generator=gen)[: self.n_successors]
                                  for _ in range(self.n_ordinary)])
        # Normalised exponentials are Dirichlet(1) weights, drawn from the seeded generator.
        weights = -torch.log(torch.rand(self.n_ordinary, self.n_successors, generator=gen))
        return successors, weights / weights.sum(-1, keepdim=True)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``[n, seq_len]`` token ids drawn from the task."""
        successors, probs = self.bigram()
        cumulative = probs.cumsum(-1)
        cumulative[:, -1] = 1.0  # no rounding gap above the last successor
        length = self.seq_len - 1 if self.use_bos else self.seq_len
        # All random numbers at once: one draw per position for the chain, the trigger coin and its choice.
        u_chain = torch.rand(n, length, generator=generator)
        u_trigger = torch.rand(n, length, generator=generator)
        which = self.n_ordinary + torch.randint(self.n_triggers, (n, length), generator=generator)
        ids = torch.empty(n, length, dtype=torch.long)
        ids[:, 0] = torch.randint(self.n_ordinary, (n,), generator=generator)
        for pos in range(1, length):
            prev = ids[:, pos - 1]
            after_trigger = self.is_trigger(prev)
            row = prev.clamp(max=self.n_ordinary - 1)
            slot = torch.searchsorted(cumulative[row], u_chain[:, pos : pos + 1].contiguous())[:, 0]
            nxt = successors[row, slot.clamp(max=self.n_successors - 1)]
            # A trigger is always followed by its copy, never by another trigger.
            nxt = torch.where((u_trigger[:, pos] < self.p_trigger) & ~after_trigger, which[:, pos], nxt)
            if pos >= 2:  # position 1 can never follow a trigger: position 0 is ordinary
                nxt = torch.where(after_trigger, ids[:, pos - 2], nxt)
            ids[:, pos] = nxt
        if self.use_bos:
            ids = torch.cat([torch.full((n, 1), self.bos_id, dtype=torch.long), ids], dim=1)
        return ids

    def copy_targets(self, ids: torch.Tensor) -> torch.Tensor:
        """``[n, seq_len]`` True where the token is determined by a backcopy (the position after a trigger)."""
        out = torch.zeros_like(ids, dtype=torch.bool)
        out[:, 1:] = self.is_trigger(ids[:, :-1])
        return out

    def save(self, folder: Path) -> None:
        (folder / TASK_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> BackcopyTask:
        return cls(**json.loads((folder / TASK_FILE).read_text()))


def word_tokenizer(vocab: dict[str, int], add_bos: bool, max_length: int) -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer over ``vocab`` (which holds ``<bos>``, ``<pad>``, ``<unk>``)."""
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, pad_token=PAD, unk_token=UNK)
    fast.model_max_length = max_length
    return fast


def backcopy_tokenizer(task: BackcopyTask) -> PreTrainedTokenizerFast:
    """The task's tokens; prepends ``<bos>`` when the task uses it."""
    return word_tokenizer(task.vocab, task.use_bos, task.seq_len)


def backcopy_config(task: BackcopyTask, n_layers: int = 4, n_heads: int = 4, d_model: int = 128,
                    d_mlp: int = 344) -> LlamaConfig:
    """Llama-style decoder: 4 layers x 4 heads, d = 128, SwiGLU width 344 (~0.8M parameters)."""
    return LlamaConfig(
        vocab_size=len(task.vocab), hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_heads, head_dim=d_model // n_heads,
        max_position_embeddings=task.seq_len, bos_token_id=task.bos_id if task.use_bos else None,
        pad_token_id=task.pad_id, eos_token_id=None, tie_word_embeddings=False,
    )


def as_text(task: BackcopyTask, ids: torch.Tensor) -> list[str]:
    """Sequences as whitespace-separated token strings, without ``<bos>`` (the tokenizer adds it)."""
    names = {i: name for name, i in task.vocab.items()}
    return [" ".join(names[int(i)] for i in row if int(i) != task.bos_id) for row in ids]
