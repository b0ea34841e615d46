"""``Result``: what every analysis returns: tables, tensors, figures, key numbers and a report."""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
import torch
from safetensors.torch import load_file, save_file

from headlab.runs import check_part_name, default_run_name, read_manifest, write_run


@dataclass
class Result:
    analysis: str
    model: str
    config: dict
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    figures: dict[str, go.Figure] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    report: str = ""
    revision: str | None = None
    input_hash: str = ""
    path: Path | None = None
    # Reproducibility: the prompts (recorded in the manifest, or prompts.json when long) and how the model ran
    # (provenance.model_settings; the CLI adds where the prompts came from). Versions and git are added on save.
    prompts: list[str] | None = None
    provenance: dict = field(default_factory=dict)
    # Folders a run carries besides its tables and tensors (an exported checkpoint): name -> a function that
    # writes the folder at the path it is given, inside the temporary run, so they are published atomically too.
    attachments: dict[str, Callable[[Path], object]] = field(default_factory=dict)

    def save(self, runs_dir: Path, name: str | None = None) -> Path:
        """Write the run atomically under ``runs_dir``; returns its directory."""
        from headlab import __version__
        from headlab.provenance import environment, prompts_record

        created = dt.datetime.now(dt.timezone.utc)
        name = name or default_run_name(self.analysis, self.model, created)
        provenance = {**self.provenance, **environment()}
        prompts_file = None
        if self.prompts is not None:
            provenance["prompts"], prompts_file = prompts_record(self.prompts, self.provenance.get("prompt_source"))
            provenance.pop("prompt_source", None)

        def write(tmp: Path) -> dict:
            (tmp / "tables").mkdir()
            (tmp / "figures").mkdir()
            for key, table in self.tables.items():
                table.to_parquet(tmp / "tables" / f"{key}.parquet", index=False)
            if self.tensors:
                save_file({k: v.detach().cpu().contiguous() for k, v in self.tensors.items()},
                          str(tmp / "tensors.safetensors"))
            for key, fig in self.figures.items():
                # plotly.js once beside the figures: pages open offline, no CDN.
                fig.write_html(tmp / "figures" / f"{key}.html", include_plotlyjs="directory")
                (tmp / "figures" / f"{key}.json").write_text(pio.to_json(fig), encoding="utf-8")
            (tmp / "report.md").write_text(self.report, encoding="utf-8")
            if prompts_file is not None:
                (tmp / provenance["prompts"]["file"]).write_text(json.dumps(prompts_file, ensure_ascii=False),
                                                                 encoding="utf-8")
            for key, write_folder in self.attachments.items():
                write_folder(tmp / check_part_name(key, "attachment"))
            if self.tensors:
                # safetensors creates its file with mode 0600; give it the mode of the run's other files.
                os.chmod(tmp / "tensors.safetensors", stat.S_IMODE((tmp / "report.md").stat().st_mode))
            return {
                "headlab_version": __version__,
                "analysis": self.analysis,
                "model": self.model,
                "revision": self.revision,
                "config": self.config,
                "input_hash": self.input_hash,
                "created": created.isoformat(),
                "summary": self.summary,
                "provenance": provenance,
                "tables": sorted(self.tables),
                "figures": sorted(self.figures),
                **({"attachments": sorted(self.attachments)} if self.attachments else {}),
            }

        self.path = write_run(runs_dir, name, write)
        return self.path

    @classmethod
    def load(cls, path: str | Path) -> Result:
        """Read back a complete run (an incomplete or corrupt one raises ``RunStoreError``)."""
        path = Path(path)
        manifest = read_manifest(path)
        for key in (*manifest["tables"], *manifest["figures"]):
            check_part_name(key, "table or figure")
        tensors_file = path / "tensors.safetensors"
        return cls(
            analysis=manifest["analysis"],
            model=manifest["model"],
            config=manifest["config"],
            tables={k: pd.read_parquet(path / "tables" / f"{k}.parquet") for k in manifest["tables"]},
            tensors=load_file(str(tensors_file)) if tensors_file.exists() else {},
            figures={k: pio.from_json((path / "figures" / f"{k}.json").read_text(encoding="utf-8"))
                     for k in manifest["figures"]},
            summary=manifest["summary"],
            report=(path / "report.md").read_text(encoding="utf-8"),
            revision=manifest.get("revision"),
            input_hash=manifest["input_hash"],
            path=path,
            prompts=_saved_prompts(path, manifest.get("provenance") or {}),
            provenance=manifest.get("provenance") or {},
        )

    def head_metrics(self) -> list[str]:
        """Names ``top_heads`` accepts: ``[layer, head]`` tensors, then per-head table columns."""
        return list(dict.fromkeys([*_head_tensors(self), *_head_columns(self)]))

    def top_heads(self, metric: str, k: int = 10, *, largest: bool = True) -> pd.DataFrame:
        """The ``k`` heads with the largest (``largest=False``: smallest) ``metric``, best first.

        ``metric``: a ``[layer, head]`` tensor of the run (``entropy``, ``first_mass``) or a column of a
        table with one row per (layer, head) (``alpha_first`` of ``sink_heads``); see ``head_metrics()``.
        Returns a table with columns ``layer``, ``head``, ``<metric>``; NaN values are left out."""
        from headlab.errors import InputError

        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise InputError(f"top_heads needs a positive number of heads k, got {k!r}")
        tensors, columns = _head_tensors(self), _head_columns(self)
        if metric in tensors:
            grid = self.tensors[metric].detach().float().cpu().numpy()
            layer, head = np.meshgrid(np.arange(grid.shape[0]), np.arange(grid.shape[1]), indexing="ij")
            table = pd.DataFrame({"layer": layer.ravel(), "head": head.ravel(), metric: grid.ravel()})
        elif metric in columns:
            table = self.tables[columns[metric]][["layer", "head", metric]]
        else:
            known = ", ".join(self.head_metrics()) or "none (this run has no per-head numbers)"
            raise InputError(f"{self.analysis} run has no per-head metric {metric!r}; it has: {known}")
        table = table.dropna(subset=[metric]).sort_values(metric, ascending=not largest, kind="stable")
        return table.head(k).reset_index(drop=True).astype({"layer": int, "head": int})

    def __repr__(self) -> str:
        def listing(names: list[str], limit: int = 8) -> str:
            more = f", … ({len(names) - limit} more)" if len(names) > limit else ""
            return ", ".join(names[:limit]) + more if names else "none"

        scalars = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.summary.items()
                   if isinstance(v, (int, float, str)) and not isinstance(v, bool) and len(str(v)) <= 40]
        lines = [
            f"Result(analysis={self.analysis!r}, model={self.model!r}"
            + (f", path='{self.path}'" if self.path is not None else "") + ")",
            f"  tables:  {listing([f'{n} ({len(t)} rows)' for n, t in self.tables.items()])}",
            f"  tensors: {listing([f'{n} {list(t.shape)}' for n, t in self.tensors.items()])}",
            f"  figures: {listing(list(self.figures))}",
            f"  summary: {listing(scalars, 6)}",
        ]
        return "\n".join(lines)


def _saved_prompts(path: Path, provenance: dict) -> list[str] | None:
    record = provenance.get("prompts") or {}
    if "texts" in record:
        return list(record["texts"])
    if "file" in record:
        return json.loads((path / check_part_name(record["file"], "prompts file")).read_text(encoding="utf-8"))
    return None


def to_json_safe(value):
    """Numbers from numpy/torch into plain JSON types (for manifests)."""
    return json.loads(json.dumps(value, default=float))


def _head_tensors(result: Result) -> list[str]:
    """2-D tensors read as ``[layer, head]`` (the run's grid when its summary gives one)."""
    grid = (result.summary.get("n_layers"), result.summary.get("n_heads"))
    return [name for name, t in result.tensors.items()
            if t.ndim == 2 and (None in grid or tuple(t.shape) == grid)]


def _head_columns(result: Result) -> dict[str, str]:
    """Numeric column -> table, for tables with exactly one row per (layer, head)."""
    columns: dict[str, str] = {}
    for name, table in result.tables.items():
        if not {"layer", "head"} <= set(table.columns) or table.duplicated(["layer", "head"]).any():
            continue
        for column in table.columns:
            if column not in ("layer", "head") and pd.api.types.is_numeric_dtype(table[column]) \
                    and not pd.api.types.is_bool_dtype(table[column]):
                columns.setdefault(column, name)
    return columns
