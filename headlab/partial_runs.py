"""Partial runs: what one ``--shard i/n`` job writes, and the checks ``headlab runs merge`` makes before joining.

A partial run is a run folder (written atomically like any run) whose manifest says ``"partial": true`` and
records the command that made it (``argv``, without the shard, runs folder and name), its fingerprint (command,
model, settings, input hash), the shard, the headlab version and the pass whose accumulator states it holds
(``states.json`` + ``*.states.safetensors``: no pickle). The dashboard lists it as a part to merge, not a run.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path

from headlab.errors import RunStoreError
from headlab.runs import MANIFEST, write_run

PROMPTS_FILE = "prompts.json"


@dataclass
class Part:
    path: Path
    manifest: dict
    index: int
    count: int


def write_partial(runs_dir: Path, name: str, *, pass_name: str, states: dict, record: dict,
                  prompts: list[str] | None) -> Path:
    """Write one shard's partial run; ``record`` holds command, argv, model, fingerprint and shard."""
    from headlab import __version__
    from headlab.tally import save_states

    def write(tmp: Path) -> dict:
        save_states(tmp, {pass_name: states}, {"pass": pass_name})
        if prompts is not None:
            (tmp / PROMPTS_FILE).write_text(json.dumps(prompts, ensure_ascii=False), encoding="utf-8")
        return {"headlab_version": __version__, "partial": True, "pass": pass_name,
                "created": dt.datetime.now(dt.timezone.utc).isoformat(),
                "prompts_file": PROMPTS_FILE if prompts is not None else None, **record}

    return write_run(runs_dir, name, write)


def read_part(path: Path) -> Part:
    """One partial run's manifest (refusing complete runs and anything else)."""
    from headlab.runs import read_manifest
    from headlab.shards import Shard

    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise RunStoreError(f"{path} is not a headlab run (no {MANIFEST}): give the partial runs that --shard wrote")
    manifest = read_manifest(path)
    if not manifest.get("partial"):
        raise RunStoreError(f"{path} is a complete run, not a part written with --shard: give only the parts")
    shard = Shard.parse(str(manifest.get("shard", "")), "the part's shard")
    return Part(path, manifest, shard.index, shard.count)


def check_parts(parts: list[Part]) -> list[Part]:
    """The parts in shard order, after checking they are the n shards of one run (same command, model, settings,
    inputs and headlab version; each shard once, none missing)."""
    if not parts:
        raise RunStoreError("no parts given: list the partial runs of every shard")
    first = parts[0]
    for part in parts[1:]:
        for key, what in (("command", "command"), ("model", "model"), ("headlab_version", "headlab version"),
                          ("pass", "pass")):
            if part.manifest.get(key) != first.manifest.get(key):
                raise RunStoreError(f"{part.path} and {first.path} differ in {what} ({part.manifest.get(key)!r} vs "
                                    f"{first.manifest.get(key)!r}): they are not parts of one run")
        ours = {k: v for k, v in part.manifest["fingerprint"].items() if k != "shard"}
        theirs = {k: v for k, v in first.manifest["fingerprint"].items() if k != "shard"}
        for key in sorted(set(ours) | set(theirs)):
            if ours.get(key) != theirs.get(key):
                what = "prompts" if key == "input_hash" else "settings" if key == "config" else key
                raise RunStoreError(f"{part.path} and {first.path} differ in their {what}: they are not parts of "
                                    "one run")
    counts = {p.count for p in parts}
    if len(counts) > 1:
        raise RunStoreError(f"the parts were split into different numbers of shards ({sorted(counts)}): give the "
                            "parts of one --shard i/n series")
    count = counts.pop()
    seen: dict[int, Part] = {}
    for part in parts:
        if part.index in seen:
            raise RunStoreError(f"shard {part.index}/{count} is given twice ({seen[part.index].path}, {part.path})")
        seen[part.index] = part
    missing = [str(i) for i in range(count) if i not in seen]
    if missing:
        raise RunStoreError(f"shard(s) {', '.join(f'{i}/{count}' for i in missing)} missing: give all {count} parts")
    return [seen[i] for i in range(count)]


def part_states(part: Part) -> dict:
    from headlab.tally import load_states

    states, _ = load_states(part.path)
    return states[part.manifest["pass"]]


def part_prompts(part: Part) -> list[str] | None:
    name = part.manifest.get("prompts_file")
    if name != PROMPTS_FILE:
        return None
    return json.loads((part.path / PROMPTS_FILE).read_text(encoding="utf-8"))
