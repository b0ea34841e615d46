"""Files bundled in ``headlab/data`` (installed as package data), by name, for every floor to find."""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
# headlab's CHAIR synonym list (COCO's 80 categories in the reference format), read by the metrics and
# extended by the synthetic icon set.
COCO_SYNONYMS = "coco_synonyms.txt"
