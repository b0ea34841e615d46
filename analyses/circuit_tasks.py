"""Circuit tasks: prompts with a clean answer and a counterfactual prompt with its own answer.

A task is a list of ``CircuitExample(prompt, answer, cf_prompt, cf_answer)``; answers are one token
each (with their leading space). The logit difference LD = logit(answer) - logit(cf_answer) is read
at the final position of both prompts: on the clean prompt it is positive when the model is right,
on the counterfactual prompt negative. Built-in tasks (deterministic with a seed):

- ``ioi``: Wang et al.-style templates, "When Mary and John went to the store, John gave a drink to"
  -> " Mary"; the counterfactual flips S2 to the indirect object ("..., Mary gave a drink to" ->
  " John"), so the wrong answer of the clean prompt is the subject;
- ``colored-objects``: Merullo et al.'s format ("Q: On the table, I see a silver pencil, a red jug,
  and a green necklace. What color is the pencil?\\nA: Silver\\nQ: ...?\\nA:" -> " Red"), ``shots``
  solved examples first (at most ``MAX_SHOTS`` from a spec); the counterfactual asks about another object of
  the same list;
- ``name-induction``: "The guests were Grace Turner and Claire Jones. I talked to Grace" -> " Turner";
  the counterfactual names the other guest (-> " Jones"): the answer is copied from the context after
  a repeated name (induction, duplicate-token and mover heads, as in IOI).

``tokenize_task`` turns a task into token batches for one model and refuses, before any compute,
a clean and counterfactual prompt of different token lengths or an answer that is not one token.
A user's task: a list of ``CircuitExample`` or a JSONL file of
``{"prompt", "answer", "cf_prompt", "cf_answer"}`` objects (``read_jsonl``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from headlab.analyses.configs import TASK_NAMES, parse_task_spec
from headlab.batching import encode
from headlab.bundled import DATA_DIR
from headlab.errors import InputError

IOI_TEMPLATES = [
    "When {A} and {B} went to the {place}, {C} gave a {object} to",
    "When {A} and {B} got a {object} at the {place}, {C} decided to give it to",
    "Then, {A} and {B} went to the {place}. {C} gave a {object} to",
    "After {A} and {B} went to the {place}, {C} handed a {object} to",
    "While {A} and {B} were working at the {place}, {C} gave a {object} to",
    "Friends {A} and {B} found a {object} at the {place}. {C} gave it to",
]
SURFACES = ["table", "desk", "floor"]


@dataclass(frozen=True)
class CircuitExample:
    """A clean prompt and answer, and a counterfactual prompt (same token length) with its answer."""

    prompt: str
    answer: str
    cf_prompt: str
    cf_answer: str


@dataclass
class CircuitTask:
    name: str
    examples: list[CircuitExample]

    def __len__(self) -> int:
        return len(self.examples)


@dataclass
class TaskBatch:
    """A task tokenized for one model, left-padded so that the final position is column -1.

    ``clean_ids`` / ``cf_ids`` / ``attention_mask``: ``[batch, pos]`` (one mask: each clean prompt and its
    counterfactual have the same length); ``answer_ids`` / ``cf_answer_ids``: ``[batch]``.
    """

    name: str
    clean_ids: torch.Tensor
    cf_ids: torch.Tensor
    attention_mask: torch.Tensor
    answer_ids: torch.Tensor
    cf_answer_ids: torch.Tensor

    def __len__(self) -> int:
        return self.clean_ids.shape[0]

    def slice(self, start: int, stop: int) -> TaskBatch:
        """Rows ``start:stop``, trimmed of the columns that are padding in every kept row."""
        mask = self.attention_mask[start:stop]
        first = int((mask.sum(0) > 0).nonzero()[0])
        return TaskBatch(self.name, self.clean_ids[start:stop, first:], self.cf_ids[start:stop, first:],
                         mask[:, first:], self.answer_ids[start:stop], self.cf_answer_ids[start:stop])

    def chunks(self, size: int) -> list[TaskBatch]:
        return [self.slice(i, min(i + size, len(self))) for i in range(0, len(self), size)]


def read_words(filename: str, section: str | None = None) -> list[str]:
    """Words of a bundled ``headlab/data/circuits_*.txt`` list (``#`` comments; ``[section]`` headers)."""
    words, current = [], None
    for line in (DATA_DIR / filename).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            continue
        if section is None or current == section:
            words.append(line)
    return words


def single_token_words(tokenizer, words: list[str], capitalize: bool = False) -> list[str]:
    """The words that are one token with a leading space (``" Mary"``) for ``tokenizer``."""
    kept = []
    for word in words:
        text = " " + (word.capitalize() if capitalize else word)
        if len(tokenizer(text, add_special_tokens=False).input_ids) == 1:
            kept.append(word)
    return kept


def _token_length(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def ioi_task(n: int = 200, seed: int = 0, names: list[str] | None = None, tokenizer=None) -> CircuitTask:
    """``n`` IOI prompts over the templates, half ABBA and half BABA order, deterministic in ``seed``.

    ``names``: the name list (default: headlab's, kept to one-token names when ``tokenizer`` is given).
    """
    if n < 1:
        raise InputError(f"ioi: n must be at least 1, got {n}")
    names = names or read_words("circuits_names.txt")
    if tokenizer is not None:
        names = single_token_words(tokenizer, names)
    if len(names) < 2:
        raise InputError("ioi: fewer than two one-token names for this tokenizer; give names=[...] that are")
    places, objects = read_words("circuits_places.txt"), read_words("circuits_objects.txt")
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        template = IOI_TEMPLATES[i % len(IOI_TEMPLATES)]
        io, s = rng.sample(names, 2)
        first, second = (io, s) if i % 2 == 0 else (s, io)  # ABBA / BABA
        fill = {"A": first, "B": second, "place": rng.choice(places), "object": rng.choice(objects)}
        prompt = template.format(C=s, **fill)
        cf_prompt = template.format(C=io, **fill)  # S2 flipped to IO: now S is the indirect object
        examples.append(CircuitExample(prompt, " " + io, cf_prompt, " " + s))
    return CircuitTask("ioi", examples)


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def _colored_question(items: list[tuple[str, str, str]], asked: str) -> str:
    """items: (colour, object, surface) of one scene, all on the same surface."""
    surface = items[0][2]
    listed = [f"{_article(color)} {color} {obj}" for color, obj, _ in items]
    return f"Q: On the {surface}, I see {', '.join(listed[:-1])}, and {listed[-1]}. What color is the {asked}?\nA:"


def colored_objects_task(n: int = 200, seed: int = 0, shots: int = 1, tokenizer=None) -> CircuitTask:
    """``n`` Colored Objects prompts (3 of 17 objects, 8 colours, surfaces table/desk/floor), ``shots``
    solved examples first; the counterfactual asks about another object of the same list.

    With ``tokenizer`` the counterfactual object is one whose name has as many tokens as the asked
    one's (so the two prompts align), and the colours are those whose capitalised form is one token.
    """
    if n < 1 or shots < 0:
        raise InputError(f"colored-objects: n must be at least 1 and shots at least 0, got n={n}, shots={shots}")
    objects = read_words("circuits_colored_objects.txt", "objects")
    colors = read_words("circuits_colored_objects.txt", "colors")
    if tokenizer is not None:
        colors = single_token_words(tokenizer, colors, capitalize=True)
    if len(colors) < 3:
        raise InputError("colored-objects: fewer than 3 colours are one token for this tokenizer")
    rng = random.Random(seed)

    def scene() -> list[tuple[str, str, str]]:
        surface = rng.choice(SURFACES)
        return [(c, o, surface) for c, o in zip(rng.sample(colors, 3), rng.sample(objects, 3), strict=True)]

    examples = []
    while len(examples) < n:
        context = ""
        for _ in range(shots):
            items = scene()
            color, obj, _ = rng.choice(items)
            context += _colored_question(items, obj) + f" {color.capitalize()}\n"
        items = scene()
        asked = rng.randrange(3)
        others = [i for i in range(3) if i != asked]
        if tokenizer is not None:
            length = _token_length(tokenizer, " " + items[asked][1])
            others = [i for i in others if _token_length(tokenizer, " " + items[i][1]) == length]
            if not others:
                continue  # no other object of this scene aligns: draw another scene
        other = rng.choice(others)
        examples.append(CircuitExample(
            context + _colored_question(items, items[asked][1]), " " + items[asked][0].capitalize(),
            context + _colored_question(items, items[other][1]), " " + items[other][0].capitalize()))
    return CircuitTask(f"colored-objects-{shots}shot" if shots != 1 else "colored-objects", examples)


def name_induction_task(n: int = 200, seed: int = 0, names: list[str] | None = None,
                        surnames: list[str] | None = None, tokenizer=None) -> CircuitTask:
    """``n`` prompts "The guests were Grace Turner and Claire Jones. I talked to Grace" -> " Turner";
    the counterfactual names the other guest (-> " Jones"). Names and surnames are one token for
    ``tokenizer`` when given. The answer is copied from the context after a repeated name: induction."""
    if n < 1:
        raise InputError(f"name-induction: n must be at least 1, got {n}")
    names = names or read_words("circuits_names.txt")
    surnames = surnames or read_words("circuits_surnames.txt")
    if tokenizer is not None:
        names, surnames = single_token_words(tokenizer, names), single_token_words(tokenizer, surnames)
    if len(names) < 2 or len(surnames) < 2:
        raise InputError("name-induction: fewer than two one-token names or surnames for this tokenizer")
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        a, b = rng.sample(names, 2)
        x, y = rng.sample(surnames, 2)
        context = f"The guests were {a} {x} and {b} {y}. I talked to "
        examples.append(CircuitExample(context + a, " " + x, context + b, " " + y))
    return CircuitTask("name-induction", examples)


def read_jsonl(path: str | Path, name: str | None = None) -> CircuitTask:
    """A task from a JSONL file of ``{"prompt", "answer", "cf_prompt", "cf_answer"}`` objects."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"task file {path} does not exist; give a JSONL file of prompt/answer/cf_prompt/cf_answer")
    examples = []
    fields = ("prompt", "answer", "cf_prompt", "cf_answer")
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"{path.name} line {number}: not JSON ({error.msg})") from None
        missing = [f for f in fields if not isinstance(row.get(f), str)] if isinstance(row, dict) else list(fields)
        if missing:
            raise InputError(f"{path.name} line {number}: missing string field(s) {', '.join(missing)}; each line "
                             "is {\"prompt\", \"answer\", \"cf_prompt\", \"cf_answer\"}")
        examples.append(CircuitExample(*(row[f] for f in fields)))
    if not examples:
        raise InputError(f"{path.name}: no examples")
    return CircuitTask(name or path.stem, examples)


def write_jsonl(task: CircuitTask, path: str | Path) -> None:
    Path(path).write_text("".join(json.dumps(asdict(e)) + "\n" for e in task.examples), encoding="utf-8")


TASKS: dict[str, Callable[..., CircuitTask]] = {
    "ioi": ioi_task,
    "colored-objects": colored_objects_task,
    "name-induction": name_induction_task,
}
assert tuple(TASKS) == TASK_NAMES, "analyses.configs.TASK_NAMES names the built-in tasks (checked without torch)"


def make_task(spec: str, n: int, seed: int = 0, tokenizer=None) -> CircuitTask:
    """A task by name (``ioi``, ``colored-objects``, ``colored-objects:3`` for 3 shots, ``name-induction``)
    or a path to a ``.jsonl`` file (its first ``n`` examples)."""
    if spec.endswith(".jsonl"):
        task = read_jsonl(spec)
        return CircuitTask(task.name, task.examples[:n])
    name, kwargs = parse_task_spec(spec)
    return TASKS[name](n=n, seed=seed, tokenizer=tokenizer, **kwargs)


def tokenize_task(loaded, task: CircuitTask | list[CircuitExample], name: str | None = None) -> TaskBatch:
    """Token ids of every clean and counterfactual prompt (BOS policy of the model), left-padded.

    Raises ``InputError`` naming the first example whose two prompts differ in token length, or whose
    answer is not one token: patching compares the two runs position by position.
    """
    examples = task.examples if isinstance(task, CircuitTask) else list(task)
    name = name or (task.name if isinstance(task, CircuitTask) else "task")
    if not examples:
        raise InputError(f"task {name} has no examples")
    tok = loaded.text_tokenizer
    clean, cf, answers, cf_answers = [], [], [], []
    for i, ex in enumerate(examples):
        a, b = encode(loaded, ex.prompt, 10**9), encode(loaded, ex.cf_prompt, 10**9)
        if len(a) != len(b):
            raise InputError(f"task {name} example {i}: the clean prompt has {len(a)} tokens and the counterfactual "
                             f"{len(b)} for {loaded.name}'s tokenizer ({ex.prompt!r} vs {ex.cf_prompt!r}); patching "
                             "needs prompts of equal length: use words of the same token count")
        ids = []
        for answer in (ex.answer, ex.cf_answer):
            got = tok(answer, add_special_tokens=False).input_ids
            if len(got) != 1:
                raise InputError(f"task {name} example {i}: the answer {answer!r} is {len(got)} tokens for "
                                 f"{loaded.name}'s tokenizer; answers must be one token (mind the leading space)")
            ids.append(got[0])
        if ids[0] == ids[1]:
            raise InputError(f"task {name} example {i}: answer and counterfactual answer are the same token {ids[0]}")
        clean.append(a)
        cf.append(b)
        answers.append(ids[0])
        cf_answers.append(ids[1])
    width = max(map(len, clean))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def left(rows: list[list[int]]) -> torch.Tensor:
        return torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)

    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in clean], dtype=torch.long)
    return TaskBatch(name, left(clean), left(cf), mask, torch.tensor(answers), torch.tensor(cf_answers))
