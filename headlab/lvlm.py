"""LVLM inputs: images from files, the processor and chat template, and each sample's key groups.

``build_inputs(loaded, samples)`` turns ``[(image paths or PIL images, prompt), ...]`` into the model's
tensors plus, per sample, the spans the analyses and interventions use, found from the token ids
(never from constants such as 576 image tokens):

- ``image_spans``: runs of the processor's image token id (several images, dynamic grids: one run each);
- ``system_span``: the system turn (role header, text, end marker) when the template has one;
- ``text_after``: the first position after the last image token (the query rows of VAR/VHR at prefill).

Positions are counted from each sequence's first real token (headlab.interventions' convention), so
they hold with left or right padding. Samples without images are text-only inputs (VHD needs them).

Supported: LLaVA-1.5 / LLaVA-NeXT / Qwen2-VL / Qwen2.5-VL checkpoints (their own processors),
``llava-smol``, and the tiny twins ``tiny-llava`` and ``tiny-qwen2-vl`` (processors built here around
the byte tokenizer: CLIP preprocessing at 32×32 → 16 tokens; Qwen2-VL patches of 8 merged 2×2).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from headlab.errors import InputError

ImageLike = "str | Path | PIL.Image.Image"

TINY_SYSTEM = "You are a helpful assistant."
# Minimal chat templates for the tiny twins (the byte tokenizer has none). Qwen2-VL wraps each image in
# vision start/end tokens (BOS/EOS in the tiny config): its rope index finds images by the start token.
_TINY_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '__IMAGE__' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)


def load_image(path: str | Path):
    """An RGB PIL image from ``path``; a missing, unreadable, non-image or oversized file is one ``InputError``."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"image {path} does not exist: check the path")
    if not path.is_file():
        raise InputError(f"image {path} is not a file: pass image files (PNG, JPEG, …)")
    return decode_image(path.read_bytes(), str(path))


def decode_image(data: bytes, name: str):
    """An RGB PIL image from an image file's bytes (``name`` says which file in messages); not an image, corrupt,
    or over Pillow's pixel limit is one ``InputError``. The size is read from the header before anything is
    decoded: a few hundred kB of PNG can claim 20000 × 20000 pixels (a decompression bomb)."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # Pillow only warns between its limit and twice it; headlab refuses from the limit on (below).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
        with image:
            _check_pixels(name, image.size)
            image.load()  # decode now: a truncated file fails here, not inside the processor
            return image.convert("RGB")
    except UnidentifiedImageError as err:
        raise InputError(f"{name} is not an image PIL can read: use a PNG, JPEG, WebP, BMP or GIF file") from err
    except Image.DecompressionBombError as err:  # over twice the limit: Pillow refuses inside Image.open
        _check_pixels(name, _header_size(data))
        raise InputError(f"{name} is too large to decode ({err}); resize it") from err
    except (OSError, ValueError, SyntaxError) as err:
        raise InputError(f"image {name} is corrupt or truncated ({err}): export it again, or remove it") from err


def _check_pixels(name: str, size: tuple[int, int] | None) -> None:
    """Refuse an image over Pillow's ``MAX_IMAGE_PIXELS`` (its decompression-bomb guard): decoding it costs
    gigabytes, and an LVLM's processor shrinks every image to a few hundred pixels a side anyway."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS  # read per call: a user who raises (or clears) Pillow's limit gets theirs
    if size is None or limit is None or size[0] * size[1] <= limit:
        return
    raise InputError(f"{name} is {size[0]}×{size[1]} pixels, over the {limit:,}-pixel limit for images "
                     "(Pillow's decompression-bomb guard; an LVLM sees a few hundred pixels a side anyway): "
                     "resize it, e.g. to 1024 pixels on the long side")


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the image's header through the format plugins, which Pillow's ``Image.open`` does
    not return once the size is over twice its limit; None when no plugin reads the header."""
    from PIL import Image

    Image.init()
    prefix = data[:16]
    for plugin in Image.ID:
        factory, accept = Image.OPEN[plugin]
        accepted = accept is None or accept(prefix)
        if isinstance(accepted, str) or not accepted:  # a str is Pillow's "maybe" warning: not this one
            continue
        try:
            return tuple(factory(io.BytesIO(data), plugin).size)  # the plugin parses the header, decodes nothing
        except Exception:  # noqa: BLE001 - any failure of a plugin means "not this format"
            continue
    return None


def image_files(folder: str | Path) -> list[Path]:
    """Image files of ``folder`` (sorted by name): .png .jpg .jpeg .webp .bmp .gif."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"--images {folder}: not a folder; pass a folder of image files")
    suffixes = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in suffixes)
    if not files:
        raise InputError(f"--images {folder}: no image files there (.png, .jpg, .jpeg, .webp, .bmp, .gif)")
    return files


def processor_of(loaded):
    """The multimodal processor of ``loaded`` (built here for the tiny twins; refused for text-only models)."""
    if not loaded.arch.is_multimodal:
        raise InputError(f"{loaded.name} is a text-only model: image inputs need an LVLM (llava-smol, tiny-llava, "
                         "tiny-qwen2-vl, llava-1.5-7b, qwen2-vl-7b, …)")
    cached = getattr(loaded, "_lvlm_processor", None)
    if cached is not None:
        return cached
    if hasattr(loaded.tokenizer, "image_processor"):
        proc = loaded.tokenizer
    elif loaded.name == "tiny-llava":
        proc = _tiny_llava_processor(loaded)
    elif loaded.name == "tiny-qwen2-vl":
        proc = _tiny_qwen2_vl_processor(loaded)
    else:
        raise InputError(f"{loaded.name} was loaded without an image processor: load the checkpoint folder that "
                         "has preprocessor_config.json (the hub id or its snapshot)")
    loaded._lvlm_processor = proc
    return proc


def clip_image_processor(size: int, mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None):
    """CLIP preprocessing at ``size`` pixels (CLIP's mean and std unless given): the Pillow implementation unless
    torchvision is installed (asking for ``CLIPImageProcessor`` without it prints a fallback warning on every LVLM
    command; the numbers are the same)."""
    import importlib.util

    import transformers

    # Even looking CLIPImageProcessor up prints the warning, so the Pillow class is asked for by name first.
    pil = importlib.util.find_spec("torchvision") is None and hasattr(transformers, "CLIPImageProcessorPil")
    kind = transformers.CLIPImageProcessorPil if pil else transformers.CLIPImageProcessor
    stats = {"image_mean": list(mean), "image_std": list(std)} if mean is not None and std is not None else {}
    return kind(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, **stats)


def _tiny_llava_processor(loaded):
    from transformers import LlavaProcessor

    vision = loaded.model.config.vision_config
    size = vision.image_size
    images = clip_image_processor(size)
    tok = loaded.tokenizer
    # "<image>\n" per image, as LLaVA-1.5 prompts put it (and two images stay two runs).
    return LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=vision.patch_size,
                          vision_feature_select_strategy="default", image_token="<|image|>",
                          num_additional_image_tokens=1,
                          chat_template=_TINY_TEMPLATE.replace("__IMAGE__", "<|image|>\n"))


class _TinyQwen2VLProcessor:
    """Qwen2-VL preprocessing for the tiny twin: transformers' Qwen2VLProcessor insists on a video processor
    (torchvision), so the image part is done here the way it does it: each placeholder becomes
    ``grid_t·grid_h·grid_w / merge²`` image tokens."""

    def __init__(self, image_processor, tokenizer, chat_template: str, image_token: str = "<|image|>"):
        self.image_processor, self.tokenizer, self.chat_template = image_processor, tokenizer, chat_template
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def __call__(self, text: list[str], images=None, **kwargs) -> dict:
        out: dict = {}
        if images:
            pix = self.image_processor(images, return_tensors="pt")
            out.update(pixel_values=pix["pixel_values"], image_grid_thw=pix["image_grid_thw"])
            counts = (pix["image_grid_thw"].prod(-1) // self.image_processor.merge_size ** 2).tolist()
            marker, expanded, k = "\x00img\x00", [], 0
            for t in text:
                t = t.replace(self.image_token, marker)
                while marker in t:
                    t = t.replace(marker, self.image_token * counts[k], 1)
                    k += 1
                expanded.append(t)
            text = expanded
        enc = self.tokenizer(text, return_tensors="pt", padding=kwargs.get("padding", True),
                             padding_side=kwargs.get("padding_side", "left"))
        out.update(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        # M-RoPE reads which tokens are image tokens from this (1 = image, as the real processor returns it).
        out["mm_token_type_ids"] = (enc["input_ids"] == self.image_token_id).long()
        return out


def _tiny_qwen2_vl_processor(loaded):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    vision = loaded.model.config.vision_config
    factor = vision.patch_size * vision.spatial_merge_size
    images = Qwen2VLImageProcessorPil(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                                      temporal_patch_size=vision.temporal_patch_size,
                                      min_pixels=factor * factor, max_pixels=factor * factor * 16)
    template = _TINY_TEMPLATE.replace("__IMAGE__", "<|bos|><|image|><|eos|>")
    return _TinyQwen2VLProcessor(images, loaded.tokenizer, template)


def image_token_id(loaded) -> int:
    proc = processor_of(loaded)
    token_id = getattr(proc, "image_token_id", None)
    if token_id is None:
        token_id = loaded.arch.image_token_id
    if token_id is None:
        raise InputError(f"{loaded.name}: cannot tell which token id marks image positions")
    return int(token_id)


@dataclass
class LvlmSample:
    """One input: ``images`` (paths or PIL images; empty = text-only), the user ``prompt``, optional ``system``."""

    prompt: str
    images: Sequence = ()
    system: str | None = None
    answer: str | None = None  # appended after the generation prompt (teacher forcing), when given


@dataclass
class LvlmInputs:
    """Model inputs and key groups. Masks are ``[batch, pos]`` over the padded sequence; spans are
    (start, stop) in positions from each sequence's first real token."""

    tensors: dict[str, torch.Tensor]
    image_mask: torch.Tensor
    system_mask: torch.Tensor
    after_mask: torch.Tensor
    real_mask: torch.Tensor
    image_spans: list[list[tuple[int, int]]] = field(default_factory=list)
    system_span: list[tuple[int, int] | None] = field(default_factory=list)
    text_after: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    padding_side: str = "left"

    @property
    def input_ids(self) -> torch.Tensor:
        return self.tensors["input_ids"]

    @property
    def first_real(self) -> torch.Tensor:
        """``[batch]`` column of each sequence's first real token."""
        return self.real_mask.int().argmax(dim=1)

    def image_positions(self, sample: int) -> list[tuple[int, int]]:
        """A position spec (for interventions) of the sample's image tokens."""
        return list(self.image_spans[sample])

    def groups(self, sample: int) -> dict[str, list[tuple[int, int]]]:
        """The named key groups of one sample as position specs: image, system, text_after."""
        out: dict[str, list[tuple[int, int]]] = {"image": self.image_positions(sample)}
        if self.system_span[sample] is not None:
            out["system"] = [self.system_span[sample]]
        n = int(self.real_mask[sample].sum())
        out["text_after"] = [(self.text_after[sample], n)] if self.text_after[sample] < n else []
        return out

    def to(self, device) -> LvlmInputs:
        self.tensors = {k: v.to(device) for k, v in self.tensors.items()}
        return self


def _runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """Contiguous True runs of a 1-D bool tensor as (start, stop)."""
    runs, start = [], None
    for i, v in enumerate(mask.tolist()):
        if v and start is None:
            start = i
        elif not v and start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(mask)))
    return runs


def chat_text(proc, sample: LvlmSample, add_generation_prompt: bool = True) -> str:
    content = [{"type": "image"} for _ in sample.images] + [{"type": "text", "text": sample.prompt}]
    messages = ([{"role": "system", "content": sample.system}] if sample.system is not None else [])
    messages.append({"role": "user", "content": content})
    text = proc.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    return text + (sample.answer or "")


def _system_prefix(proc, sample: LvlmSample) -> str | None:
    """The rendered text up to the end of the system turn, if the template starts with one (given or default)."""
    full = chat_text(proc, LvlmSample(sample.prompt, (), sample.system), add_generation_prompt=False)
    marker = "\x00headlab-user\x00"
    probe = chat_text(proc, LvlmSample(marker, (), sample.system), add_generation_prompt=False)
    if marker not in probe:
        return None
    head = probe[: probe.index(marker)]
    # The user turn's own header ends the system turn: search back for where the user role starts.
    for role in ("<|im_start|>user", "[INST]", "USER:", "user:", "<|user|>", "User:"):
        cut = head.rfind(role)
        if cut > 0:
            prefix = head[:cut]
            return prefix if full.startswith(prefix) and prefix.strip() else None
    return None


def build_inputs(loaded, samples: Sequence[LvlmSample | tuple], *, padding_side: str = "left",
                 add_generation_prompt: bool = True) -> LvlmInputs:
    """Tokenised, batched inputs with each sample's key groups. ``samples``: LvlmSample or (images, prompt)."""
    if padding_side not in ("left", "right"):
        raise InputError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    if not samples:
        raise InputError("no samples: pass at least one (images, prompt) pair")
    items = [s if isinstance(s, LvlmSample) else LvlmSample(prompt=s[1], images=s[0]) for s in samples]
    proc = processor_of(loaded)
    images, texts = [], []
    for item in items:
        for image in item.images:
            images.append(image if hasattr(image, "convert") else load_image(image))
        texts.append(chat_text(proc, item, add_generation_prompt))
    tok = proc.tokenizer
    kwargs = dict(text=texts, return_tensors="pt", padding=True, padding_side=padding_side)
    if images:
        kwargs["images"] = images
    tensors = dict(proc(**kwargs))
    tensors = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    ids, attention = tensors["input_ids"], tensors["attention_mask"].bool()
    image_id = image_token_id(loaded)
    image_mask = (ids == image_id) & attention
    first = attention.int().argmax(dim=1)
    image_spans, system_spans, after = [], [], []
    system_mask = torch.zeros_like(attention)
    after_mask = torch.zeros_like(attention)
    for b, item in enumerate(items):
        f = int(first[b])
        n = int(attention[b].sum())
        runs = [(s - f, e - f) for s, e in _runs(image_mask[b])]
        image_spans.append(runs)
        start_after = runs[-1][1] if runs else 0
        after.append(start_after)
        after_mask[b, f + start_after: f + n] = True
        span = None
        prefix = _system_prefix(proc, item)
        if prefix is not None:
            n_sys = len(tok(prefix, add_special_tokens=True).input_ids)
            own = ids[b, f: f + n_sys].tolist()
            if tok(prefix, add_special_tokens=True).input_ids == own:
                span = (0, n_sys)
                system_mask[b, f: f + n_sys] = True
        system_spans.append(span)
    return LvlmInputs(tensors, image_mask, system_mask, after_mask, attention, image_spans, system_spans, after,
                      texts, padding_side)
