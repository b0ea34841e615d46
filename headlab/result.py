"""``Result``: what every analysis returns: tables, tensors, figures, key numbers and a report."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
import torch
from safetensors.torch import load_file, save_file

from .runs import read_manifest, write_run


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

    def save(self, runs_dir: Path, name: str | None = None) -> Path:
        """Write the run atomically under ``runs_dir``; returns its directory."""
        from . import __version__

        created = dt.datetime.now(dt.timezone.utc)
        name = name or f"{self.analysis}-{_slug(self.model)}-{created:%Y%m%d-%H%M%S}"

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
            return {
                "headlab_version": __version__,
                "analysis": self.analysis,
                "model": self.model,
                "revision": self.revision,
                "config": self.config,
                "input_hash": self.input_hash,
                "created": created.isoformat(),
                "summary": self.summary,
                "tables": sorted(self.tables),
                "figures": sorted(self.figures),
            }

        self.path = write_run(runs_dir, name, write)
        return self.path

    @classmethod
    def load(cls, path: str | Path) -> Result:
        """Read back a complete run (an incomplete or corrupt one raises ``RunStoreError``)."""
        path = Path(path)
        manifest = read_manifest(path)
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
        )


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in text.split("/")[-1]).strip("-") or "model"


def to_json_safe(value):
    """Numbers from numpy/torch into plain JSON types (for manifests)."""
    return json.loads(json.dumps(value, default=float))
