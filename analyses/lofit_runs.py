"""LoFiT offsets put to use, each as a run: completions without and with them (``headlab lofit apply``) and the
offsets baked into a plain checkpoint (``headlab lofit export``: the run carries the checkpoint in ``model/``)."""

from __future__ import annotations

import pandas as pd
import torch

from headlab.interventions import HeadOffsets
from headlab.prompts import hash_inputs
from headlab.result import Result

from .generation import greedy
from .lofit_export import export_offsets, o_proj_deltas

EXPORTED_FOLDER = "model"  # where an export run keeps the checkpoint


def apply_result(loaded, offsets: HeadOffsets, prompts: list[str], max_new_tokens: int, source: str) -> Result:
    """Greedy completions of every prompt, without and with ``offsets`` (removed again afterwards)."""
    offsets.validate(loaded.arch)
    tok = loaded.text_tokenizer
    rows = []
    for text in prompts:
        ids = tok(text, return_tensors="pt").input_ids.to(loaded.device)
        tensors = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        before = greedy(loaded, tensors, max_new_tokens)[0]
        after = greedy(loaded, tensors, max_new_tokens, edits=[offsets])[0]
        rows.append({"prompt": text, "without_offsets": tok.decode(before, skip_special_tokens=True),
                     "with_offsets": tok.decode(after, skip_special_tokens=True)})
    table = pd.DataFrame(rows, columns=["prompt", "without_offsets", "with_offsets"])
    changed = int((table["without_offsets"] != table["with_offsets"]).sum())
    report = [f"# LoFiT offsets applied to {loaded.title}", "", f"- offsets: {source} ({len(offsets.pairs)} heads)",
              f"- {len(prompts)} prompts, {max_new_tokens} greedy tokens; the offsets changed {changed} of them", ""]
    for row in rows:
        report += [f"prompt: {row['prompt']!r}", f"  without offsets: {row['without_offsets']!r}",
                   f"  with offsets:    {row['with_offsets']!r}"]
    return Result("lofit-apply", loaded.name, {"offsets": source, "max_new_tokens": max_new_tokens,
                                               "heads": [list(p) for p in offsets.pairs]},
                  tables={"completions": table}, summary={"prompts": len(prompts), "changed": changed},
                  report="\n".join(report), revision=loaded.revision, input_hash=hash_inputs(prompts))


def export_result(loaded, offsets: HeadOffsets, source: str) -> Result:
    """A run whose ``model/`` folder is ``loaded`` with ``offsets`` in o_proj's bias (checked here, before the
    run is written: non-zero scalings or offsets on some rows only cannot be a bias)."""
    deltas = o_proj_deltas(loaded, offsets)  # [d_model] W_O v per edited layer; refuses what no bias can carry
    table = pd.DataFrame([{"layer": layer, "heads": sum(1 for lay, _ in offsets.pairs if lay == layer),
                           "bias_delta_norm": float(delta.norm())} for layer, delta in sorted(deltas.items())])
    report = "\n".join([
        f"# LoFiT offsets exported from {loaded.title}", "", f"- offsets: {source} ({len(offsets.pairs)} heads on "
        f"{len(deltas)} layers)", f"- the checkpoint is in `{EXPORTED_FOLDER}/` "
        "(AutoModelForCausalLM.from_pretrained reads it); o_proj's bias carries W_O·v per layer"])
    return Result("lofit-export", loaded.name, {"offsets": source, "heads": [list(p) for p in offsets.pairs]},
                  tables={"bias_deltas": table}, summary={"heads": len(offsets.pairs), "layers": len(deltas),
                                                          "folder": EXPORTED_FOLDER},
                  report=report, revision=loaded.revision,
                  attachments={EXPORTED_FOLDER: lambda path: export_offsets(loaded, offsets, path)})
