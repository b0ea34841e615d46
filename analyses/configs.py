"""The configuration of every analysis, and the checks of its values: plain dataclasses, no torch.

They live apart from the analyses so that the command line checks every value that needs no model (a batch
size of 0, an eps of 5, swapped lifetime bounds) in about a second, before torch is imported and the model
loads; the analyses run the same ``check`` again, so the Python API refuses the same values. Each analysis
module re-exports its config under the name it always had.

A message names the command-line flag of a field (``--batch-size`` for ``batch_size``): the flags are the
fields' names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from headlab.checks import at_least, check_positive_tokens
from headlab.errors import InputError

MASSIVE_MEDIANS = ("layer", "token")
BOS_POSITIONS = ("auto", "first", "max_norm")
SECONDARY_CRITERIA = ("official", "both")  # which test labels a secondary sink: cos alone, or cos and attention
REMOVE_MODES = ("drop", "blank")  # how an image is taken away: tokens dropped, or a grey image
OBJECTIVES = ("sft", "dpo")
ROLLOUT_LIMIT = 1024  # the rollout holds [layer, head, T, T] of one prompt: 40 x 40 x 1024² fp32 is 6.7 GB


def check_objective(objective: str) -> str:
    if objective not in OBJECTIVES:
        raise InputError(f"--objective must be sft or dpo, got {objective!r}")
    return objective


@dataclass
class SecondarySinksConfig:
    enabled: bool = True
    levels: bool = True  # sink levels: 2-D histogram + clustering
    formation: bool = True  # MLP formation table and scatter
    cos_threshold: float = 0.9
    bos_position: str = "auto"  # first | max_norm | auto (max_norm with a chat template, else first)
    bos_candidates: int = 3
    lifetime_bounds: tuple[int, int] | None = None  # None: the rule in secondary_sinks.lifetime_bounds()
    paper_bounds_min_layers: int = 24
    level_eps: float = 1.5  # DBSCAN radius on the (creation, lifetime) grid: 8-neighbours join
    level_min_fraction: float = 0.02  # a level holds at least this share of the clustered tokens ...
    level_min_tokens: int = 3  # ... and at least this many
    level_labels: tuple[str, ...] = ("secondary", "primary_like")  # which sinks are clustered into levels
    # A later occurrence of the BOS-position token has (nearly) its residual, so it passes the cos test
    # trivially; the official code keeps it (default), True drops it (matters without a BOS token).
    skip_bos_repeats: bool = False
    # headlab's attention criterion (docs/sinks.md): a cos-flagged token is a sink only if its sink score is at
    # least attention_ratio x BOS's score from the same queries over the same layers, and at least
    # attention_min_queries queries see it (a quarter of the prompt if fewer; with fewer queries its score is
    # mostly its own row's self-attention: gemma3-270m's last token gets 0.4x BOS's attention that way).
    # 0.2: on gemma3-270m with BOS, where the cos test flags every token, the testable tokens reach at most
    # 0.17 of BOS (99th percentile 0.13); the hand-built sinks of training/constructed.py get 0.49-0.72.
    criterion: str = "both"  # official: the cos test's label alone; both: a secondary sink also passes attention
    attention_ratio: float = 0.2
    attention_min_queries: int = 16
    # The cos test "saturates" when it flags more than this share of the scanned (non-BOS) tokens: then it no
    # longer singles out sinks (gemma3-270m: every token's residual is within |cos| > 0.9 of BOS's in 7-15).
    saturation_share: float = 0.5

    def check(self) -> None:
        if not 0 < self.cos_threshold < 1:
            raise InputError(f"--cos-threshold must lie between 0 and 1, got {self.cos_threshold}")
        if self.criterion not in SECONDARY_CRITERIA:
            raise InputError(f"--secondary-criterion must be official or both, not {self.criterion!r}")
        if not (self.attention_ratio >= 0 and math.isfinite(self.attention_ratio)):
            raise InputError(f"--attention-ratio must be 0 or more, got {self.attention_ratio}")
        at_least(self.attention_min_queries, 1, "attention_min_queries")
        if not 0 < self.saturation_share <= 1:
            raise InputError(f"saturation_share is a share of tokens in (0, 1], got {self.saturation_share}")
        if self.bos_position not in BOS_POSITIONS:
            raise InputError(f"--bos-position must be auto, first or max_norm, not {self.bos_position!r}")
        if self.lifetime_bounds is not None:
            lo, hi = self.lifetime_bounds
            if not 0 <= lo < hi:
                raise InputError(f"--lifetime-low and --lifetime-high need 0 <= low < high, got {lo} and {hi}")


@dataclass
class SinksConfig:
    eps: float = 0.3  # Gu et al.'s threshold
    max_tokens: int = 64  # Gu et al. use T = 64
    n_keys: int = 8  # key positions reported (0 = first token)
    batch_size: int = 8
    massive_abs: float = 100.0  # Sun et al.: |x| > 100 ...
    massive_ratio: float = 1000.0  # ... and >= ~1000x the median |x| of the hidden state
    # Which median: "layer" = the layer's whole hidden state for the input (Sun et al.'s code), "token" = the
    # token's own vector (stricter: a sink token's few huge dims make its own median large).
    massive_median: str = "layer"
    top_heads: int = 10
    token_view_prompts: int = 32  # prompts whose per-token attention received is kept (dashboard token view)
    # Full patterns [query, key] of the top sink heads on the first few prompts, for the dashboard's head view:
    # a separate eager pass after the statistics, capped at pattern_prompts x pattern_heads x T^2 (T <= 64).
    pattern_prompts: int = 3
    pattern_heads: int = 8
    pattern_tokens: int = 64
    backend: str | None = None  # attention backend; None = HEADLAB_ATTN_BACKEND or auto
    chat_template: bool = False  # prompts were wrapped in the chat template (BOS choice of Wong et al.)
    generate: int = 0  # greedy new tokens per prompt analysed with it (token_ids come from analyses.generation)
    secondary: SecondarySinksConfig = field(default_factory=SecondarySinksConfig)
    # Sink categories (BOS / first text token / non-initial): a position > 0 is a non-initial sink if alpha > eps
    # in some head of some layer while at least category_min_queries queries see it (a quarter of the prompt if
    # fewer), so that the last positions, whose alpha is a few rows' self-attention, do not count.
    categories: bool = True
    category_min_queries: int = 16

    def check(self) -> None:
        if not 0 < self.eps < 1:
            raise InputError(f"--eps must lie between 0 and 1, got {self.eps}")
        if self.massive_median not in MASSIVE_MEDIANS:
            raise InputError(f"massive_median must be one of {', '.join(MASSIVE_MEDIANS)}, got "
                             f"{self.massive_median!r}")
        check_positive_tokens(self.max_tokens)
        at_least(self.batch_size, 1, "--batch-size")
        at_least(self.n_keys, 1, "n_keys")
        at_least(self.generate, 0, "--generate")
        at_least(self.category_min_queries, 1, "category_min_queries")
        self.secondary.check()


@dataclass
class RetrievalConfig:
    n_trials: int = 12
    n_pairs: int = 8
    seed: int = 0
    batch_size: int = 8

    def check(self) -> None:
        if self.n_trials < 1:
            raise InputError(f"--retrieval-trials must be positive (0 turns the task off), got {self.n_trials}")
        if not 2 <= self.n_pairs <= 200:
            raise InputError(f"--retrieval-pairs must lie between 2 and 200, got {self.n_pairs}")
        at_least(self.batch_size, 1, "--batch-size")


@dataclass
class PositionBiasConfig:
    max_tokens: int = 512
    batch_size: int = 8
    n_relative: int = 10  # bins of relative key position for the lost-in-the-middle curve
    fit_skip_first: int = 1  # key positions left out of the trend fit: the first token is a sink
    rollout_tokens: int = 128  # rollout on each prompt's first N tokens (0: no rollout)
    rollout_prompts: int = 8
    retrieval_trials: int = 12  # 0: no retrieval task
    retrieval_pairs: int = 8
    seed: int = 0
    backend: str | None = None

    def check(self) -> None:
        check_positive_tokens(self.max_tokens)
        at_least(self.batch_size, 1, "--batch-size")
        at_least(self.n_relative, 3, "--n-relative", " (first, middle, last)")
        if not 0 <= self.rollout_tokens <= ROLLOUT_LIMIT:
            raise InputError(f"--rollout-tokens must lie between 0 (off) and {ROLLOUT_LIMIT}: the rollout "
                             f"materialises T x T attention per layer; got {self.rollout_tokens}")
        at_least(self.rollout_prompts, 1, "--rollout-prompts")
        at_least(self.fit_skip_first, 0, "fit_skip_first")
        if self.retrieval_trials < 0:
            raise InputError(f"--retrieval-trials must be >= 0 (0 turns the task off), got {self.retrieval_trials}")
        if self.retrieval_trials:
            RetrievalConfig(self.retrieval_trials, self.retrieval_pairs, self.seed, self.batch_size).check()


@dataclass
class VhdConfig:
    max_new_tokens: int = 24
    remove: str = "drop"
    k: int = 8
    batch_size: int = 8
    filter_outliers: bool = True

    def check(self) -> None:
        if self.remove not in REMOVE_MODES:
            raise InputError(f"--remove {self.remove!r}: use one of {', '.join(REMOVE_MODES)}")
        for flag, value in (("--max-new-tokens", self.max_new_tokens), ("--k", self.k),
                            ("--batch-size", self.batch_size)):
            at_least(value, 1, flag)


@dataclass
class LofitConfig:
    """Hyperparameters of one LoFiT step (paper defaults: batch 8, 5 epochs, AdamW, seed 42;
    select lr 5e-3, λ 5e-4; train lr 1e-2, λ 0). ``weight_decay`` 0 as in Hugging Face's Trainer defaults."""

    objective: str = "sft"
    lr: float = 5e-3
    lambda_l1: float = 5e-4
    epochs: int = 5
    batch_size: int = 8
    seed: int = 42
    beta: float = 0.5
    init_std: float = 1e-3
    weight_decay: float = 0.0
    max_tokens: int = 512

    def check(self) -> None:
        check_objective(self.objective)
        at_least(self.epochs, 1, "--epochs")
        at_least(self.batch_size, 1, "--batch-size")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise InputError(f"--lr must be positive, got {self.lr}")
        if not self.lambda_l1 >= 0:
            raise InputError(f"--lambda-l1 must be 0 or more, got {self.lambda_l1}")
        if not self.beta > 0:
            raise InputError(f"--beta must be positive, got {self.beta}")
        at_least(self.max_tokens, 2, "--max-tokens")


TASK_NAMES = ("ioi", "colored-objects", "name-induction")  # the built-in circuit tasks
METHODS = ("attribution", "path")  # how circuits scores heads

# Each shot adds ~33 tokens to every prompt (smollm2-135m: 1 shot 66 tokens, 3 shots 131, 10 shots 366, 99 shots
# 3285), and every phase grows with the prompt (the role tags keep full T x T patterns: quadratic). Merullo et al.
# use a few shots (docs/circuits.md measures 1 and 3); 10 keeps prompts to a few hundred tokens, where 99 shots ran
# 14+ minutes at up to 8 GB on smollm2-135m with --n 4.
MAX_SHOTS = 10


def parse_task_spec(spec: str) -> tuple[str, dict[str, int]]:
    """``"colored-objects:3"`` -> ``("colored-objects", {"shots": 3})``; a built-in task's name and arguments.

    Pure Python (no model, no torch), so a bad spec is refused before the model loads. Raises ``InputError``
    for an unknown task, an argument the task does not take, or more than ``MAX_SHOTS`` shots."""
    name, colon, arg = spec.partition(":")
    if name not in TASK_NAMES:
        raise InputError(f"unknown task {spec!r}; use one of {', '.join(TASK_NAMES)} (colored-objects:K for K shots) "
                         "or a .jsonl file")
    if colon and name != "colored-objects":
        raise InputError(f"task {name} takes no ':{arg}' argument")
    if not colon:
        return name, {}
    if not arg.isdigit():
        raise InputError(f"colored-objects:K takes a number of shots, got {arg!r}")
    shots = int(arg)
    if shots > MAX_SHOTS:
        raise InputError(f"colored-objects:{shots}: at most {MAX_SHOTS} shots; each shot adds ~33 tokens to every "
                         f"prompt (here ~{33 * (shots + 1)} on smollm2-135m) and the run's time and memory grow "
                         f"with the prompt; use colored-objects:K with K <= {MAX_SHOTS}, or a .jsonl task")
    return name, {"shots": shots}


@dataclass
class CircuitsConfig:
    tasks: tuple[str, ...] = ("ioi", "name-induction")
    n: int = 200
    top: float = 0.02
    method: str = "attribution"
    seed: int = 0
    batch_size: int = 32
    senders_per_pass: int = 9
    draws: int = 20  # random head sets in the ablation test (0: no ablation test)
    roles: bool = True  # role tags of the circuit's heads (and the most negative ones) from attention

    def check(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not 0 < self.top <= 1:
            raise InputError(f"--top is a share of heads in (0, 1], got {self.top}")
        if self.n < 2:
            raise InputError(f"--n must be at least 2 prompts, got {self.n}")
        if not self.tasks:
            raise InputError("--tasks needs at least one task")
        for spec in self.tasks:  # a bad or too costly task spec is refused here, before the model loads
            if not spec.endswith(".jsonl"):
                parse_task_spec(spec)
        if self.draws < 0 or self.batch_size < 1 or self.senders_per_pass < 1:
            raise InputError("--draws must be >= 0, batch size and senders per pass >= 1")
