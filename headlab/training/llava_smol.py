"""Training recipe of ``llava-smol`` (``headlab zoo train llava-smol``).

Stage 0 (vision only, no language-model pass): each projected image token is regressed onto the frozen
LM's input embedding of the object word drawn in its patch (patches are the 4×4 cells of the icons),
which gives the projector a start in the LM's word space. Stage 1: the LM stays frozen (no gradient
on any of its weights), the vision tower + projector are trained through all 30 layers on the answer
tokens of captions and yes/no questions (AdamW lr 1e-3, batch 8, bf16 autocast, ONE thread: two
threads on a 2-core machine shared with other work made steps 40–70× slower).

A checkpoint (vision tower + projector safetensors, config, training log, command) is written
atomically every ``save_every`` steps, so a run cut short keeps its latest state.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from headlab.training import lvlm_data as D
from headlab.training import lvlm_recipe as recipe
from headlab.training.lvlm_recipe import answer_batch, chat_prompt
from headlab.zoo.llava_smol import FOLDER, IMAGE_TOKEN, WEIGHTS, assemble, llava_config, processor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class LlavaSmolConfig:
    stage0_steps: int = 1000
    stage0_batch: int = 16
    stage0_lr: float = 3e-4  # 3e-3 stayed at chance patch-word accuracy (0.03-0.07 after 200 steps)
    steps: int = 900  # sized to ~70 min at the ~4.4 s/step measured on the shared 2-core machine
    batch_size: int = 8
    lr: float = 1e-3
    warmup: int = 30
    final_lr_ratio: float = 0.1
    question_rate: float = 0.4
    seed: int = 0
    threads: int = 1
    save_every: int = 100
    eval_every: int = 100
    max_minutes: float | None = None  # stop (and save) after this much wall time


def pixels(images: list) -> torch.Tensor:
    """``[batch, 3, 64, 64]`` CLIP-normalised pixels (what CLIPImageProcessor gives for 64×64 RGB inputs)."""
    arr = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])  # [b, h, w, 3]
    arr = (arr - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def image_features(model, pix: torch.Tensor) -> torch.Tensor:
    """``[batch, 16, 576]`` projected image tokens (feature layer −2, CLS dropped)."""
    out = model.model.vision_tower(pix, output_hidden_states=True)
    feats = out.hidden_states[model.config.vision_feature_layer][:, 1:]
    return model.model.multi_modal_projector(feats)


def word_ids(tokenizer) -> list[int]:
    ids = []
    for word in D.OBJECTS:
        toks = tokenizer(" " + word, add_special_tokens=False).input_ids
        assert len(toks) == 1, (word, toks)  # every object is one SmolLM2 token (checked in the tests)
        ids.append(toks[0])
    return ids


def stage0(model, tokenizer, cfg: LlavaSmolConfig, log: Callable[[dict], None]) -> None:
    """Regress each object patch's projected token onto the LM embedding of its word."""
    emb = model.get_input_embeddings().weight.detach().float()
    ids = torch.tensor(word_ids(tokenizer))
    targets = emb[ids]  # [16 objects, 576]
    index = {w: i for i, w in enumerate(D.OBJECTS)}
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.stage0_lr, weight_decay=0.0)
    rng = random.Random(cfg.seed + 1)
    scale = targets.pow(2).mean()
    for step in range(1, cfg.stage0_steps + 1):
        scenes = [D.random_scene(rng, weak=rng.random() < 0.1) for _ in range(cfg.stage0_batch)]
        pix = pixels([D.render(s) for s in scenes])
        cells = torch.tensor([[index[w] if w else -1 for w in s.cell_words()] for s in scenes])  # [b, 16]
        feats = image_features(model, pix).float()  # [b, 16, 576]
        mask = cells >= 0
        pred, tgt = feats[mask], targets[cells[mask]]
        loss = (pred - tgt).pow(2).mean() / scale
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == 1:
            with torch.no_grad():
                sim = torch.nn.functional.normalize(pred, dim=-1) @ torch.nn.functional.normalize(targets, dim=-1).T
                acc = (sim.argmax(-1) == cells[mask]).float().mean().item()
            log({"stage": 0, "step": step, "loss": round(loss.item(), 4), "patch_word_acc": round(acc, 3)})


def batch_of(samples: list[D.Sample], proc, header: list[int]) -> dict[str, torch.Tensor]:
    """Tokenised batch (right padding) with labels on the answer tokens and the closing ``<|im_end|>``."""
    texts = [chat_prompt(proc, s.prompt) + s.answer + "<|im_end|>" for s in samples]
    texts = [t.replace(IMAGE_TOKEN, IMAGE_TOKEN * 16) for t in texts]  # the processor's expansion, done here
    return {**answer_batch(texts, proc.tokenizer, header), "pixel_values": pixels([D.render(s.scene) for s in samples])}


def prefix_cache(model, proc) -> tuple[torch.Tensor, object]:
    """The KV cache of the text before the image (system prompt + user header), identical in every sample
    and upstream of everything trained: computed once, it saves ~a third of each step's LM work."""
    return recipe.prefix_cache(model, proc, IMAGE_TOKEN)


def forward_with_prefix(model, batch: dict[str, torch.Tensor], prefix: tuple[torch.Tensor, object]):
    """``model(**batch)`` computed from the cached prefix (same loss to 1e-4 in bf16; measured 2.26087 vs 2.26072)."""
    import copy

    ids, cache = prefix
    n = len(ids)
    assert bool((batch["input_ids"][:, :n] == ids).all()), "every sample must start with the cached prefix"
    cache = copy.deepcopy(cache)
    cache.batch_repeat_interleave(batch["input_ids"].shape[0])
    return model(input_ids=batch["input_ids"][:, n:], attention_mask=batch["attention_mask"],
                 pixel_values=batch["pixel_values"], cache=cache, labels=batch["labels"][:, n:])


def lr_at(step: int, cfg: LlavaSmolConfig) -> float:
    return recipe.cosine_lr(step, cfg.lr, cfg.warmup, cfg.steps, cfg.final_lr_ratio)


@torch.no_grad()
def evaluate(model, proc, header: list[int], seed: int = 999, n: int = 32) -> dict:
    """Teacher-forced answer-token accuracy and loss on a fixed held-out batch (cheap: one forward)."""
    rng = random.Random(seed)
    samples = [D.make_sample(rng) for _ in range(n)]
    out: dict[str, float] = {}
    for kind in ("caption", "question"):
        part = [s for s in samples if s.kind == kind]
        batch = batch_of(part, proc, header)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        labels = batch["labels"][:, 1:]
        pred = logits[:, :-1].argmax(-1)
        mask = labels != -100
        out[f"{kind}_token_acc"] = round((pred[mask] == labels[mask]).float().mean().item(), 3)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1][mask], labels[mask])
        out[f"{kind}_loss"] = round(loss.item(), 4)
    return out


def save(model, folder: Path, cfg: LlavaSmolConfig, history: list[dict], command: str) -> None:
    """Vision tower + projector + config + log, written to a temporary folder and renamed."""
    from headlab.zoo.llava_smol import vision_state

    recipe.publish_checkpoint(folder, WEIGHTS, vision_state(model), llava_config(model.config.text_config).to_dict(),
                              {"command": command, "recipe": asdict(cfg), "language_model": "smollm2-135m (frozen)",
                               "log": history})


def train_llava_smol(cfg: LlavaSmolConfig, folder: Path = FOLDER, log: Callable[[str], None] = print,
                     command: str | None = None) -> None:
    from headlab.loading import load

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    command = command or " ".join(sys.argv)
    history: list[dict] = []
    t0 = time.time()

    def record(entry: dict) -> None:
        entry["minutes"] = round((time.time() - t0) / 60, 2)
        history.append(entry)
        log(json.dumps(entry))

    smol = load("smollm2-135m", dtype="float32", device="cpu")
    model = assemble(smol.model, seed=cfg.seed)
    for p in model.model.language_model.parameters():
        p.requires_grad_(False)
    model.lm_head.requires_grad_(False)
    proc = processor(smol.tokenizer)
    header = smol.tokenizer("<|im_start|>assistant\n", add_special_tokens=False).input_ids

    model.train()
    stage0(model, smol.tokenizer, cfg, record)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    stream = D.sample_stream(cfg.seed, question_rate=cfg.question_rate)
    prefix = prefix_cache(model, proc)
    running = []
    for step in range(1, cfg.steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        batch = batch_of([next(stream) for _ in range(cfg.batch_size)], proc, header)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = forward_with_prefix(model, batch, prefix).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        running.append(loss.item())
        if step % cfg.eval_every == 0 or step == cfg.steps:
            model.eval()
            record({"stage": 1, "step": step, "train_loss": round(sum(running) / len(running), 4),
                    "lr": lr_at(step, cfg), **evaluate(model, proc, header)})
            model.train()
            running = []
        elif step % 10 == 0:
            log(json.dumps({"stage": 1, "step": step, "loss": round(loss.item(), 4),
                            "s_per_step": round((time.time() - t0) / step, 2)}))
        out_of_time = cfg.max_minutes is not None and time.time() - t0 > cfg.max_minutes * 60
        if step % cfg.save_every == 0 or step == cfg.steps or out_of_time:
            save(model, folder, cfg, history + [{"saved_at_step": step}], command)
        if out_of_time:
            record({"stopped": f"max_minutes={cfg.max_minutes} reached at step {step}"})
            save(model, folder, cfg, history, command)
            break
    model.eval()


def train_llava_smol_cli(out: Path | None, seed: int, fail: Callable[[str], None],
                         log: Callable[[str], None] = lambda line: print(line, flush=True)) -> None:
    """``headlab zoo train llava-smol``: the recipe's defaults, written to the bundled folder by default."""
    from headlab.errors import HeadlabError

    folder = out or FOLDER
    try:
        command = f"headlab zoo train llava-smol --seed {seed}" + (f" --checkpoint {out}" if out else "")
        train_llava_smol(LlavaSmolConfig(seed=seed), folder, log=log, command=command)
    except HeadlabError as err:
        fail(str(err))
    print(f"checkpoint written to {folder}", flush=True)
