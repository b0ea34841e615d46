"""The real models under one protocol: the table of docs/models.md, recomputed.

Protocol (Gu et al.): the 18 bundled prompts, T = 64, eps = 0.3, for the sinks and massive activations; the
position-bias statistics over the same prompts at T = 512 (no rollout, no retrieval task) for the attention
share of the first token and of the last third against uniform attention under the same mask; the 24 IOI prompts
of headlab/data/ioi.tsv for logit(IO) - logit(S) (causal LMs only). Each model row is one ``(name, --bos)`` pair.

    python scripts/real_models.py            # prints the Markdown table, writes benchmarks/results/real_models.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import headlab
from headlab.analyses import SinksConfig, analyze_sinks
from headlab.analyses.configs import PositionBiasConfig
from headlab.analyses.position_bias import analyze_position_bias
from headlab.batching import encode
from headlab.prompts import bundled_prompts
from headlab.tasks import ioi_prompts

ROWS = [("smollm2-135m", "auto"), ("gemma3-270m", "auto"), ("gemma3-270m", "none"), ("minilm", "auto")]
RESULT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "real_models.json"


def ioi_logit_difference(loaded) -> dict:
    """Mean and standard error of logit(IO) - logit(S) at the last position, one prompt at a time (no padding)."""
    tok = loaded.text_tokenizer
    diffs = []
    for example in ioi_prompts():
        ids = torch.tensor([encode(loaded, example.prompt, 10_000)])
        with torch.no_grad():
            logits = loaded.model(input_ids=ids).logits[0, -1]
        right, wrong = (tok(name, add_special_tokens=False).input_ids for name in (example.correct, example.wrong))
        assert len(right) == len(wrong) == 1, (example.correct, example.wrong)
        diffs.append(float(logits[right[0]] - logits[wrong[0]]))
    values = torch.tensor(diffs)
    return {"mean": float(values.mean()), "se": float(values.std() / math.sqrt(len(values))),
            "positive": int((values > 0).sum()), "n": len(values)}


def measure(name: str, bos: str) -> dict:
    started = time.perf_counter()
    loaded = headlab.load(name, dtype="float32", device="cpu", bos=bos)
    prompts = bundled_prompts()
    sinks = analyze_sinks(loaded, prompts, SinksConfig(max_tokens=64, eps=0.3), progress=False)
    summary = sinks.summary
    massive = sinks.tables["massive_activations"]
    peaks = {int(d): float(massive[massive["dim"] == d]["value"].abs().max()) for d in summary["massive_dims"]}
    bias = analyze_position_bias(loaded, prompts, PositionBiasConfig(max_tokens=512, rollout_tokens=0,
                                                                     retrieval_trials=0), progress=False)
    row = {
        "model": name, "bos": bos, "layers": loaded.arch.n_layers, "heads": loaded.arch.n_heads,
        "sink_1_pct": summary["sink_1_pct"], "sink_heads": summary["n_sink_heads"],
        "massive_dims": peaks, "first_massive_layer": summary["first_massive_layer"],
        "secondary": {key: summary.get(key) for key in ("n_scanned_tokens", "official_flag_share", "official_saturated",
                                                         "n_official_secondary", "n_official_primary_like",
                                                         "n_both_secondary", "n_secondary", "secondary_counts_note")},
        "sink_categories": {key: summary.get(key) for key in ("dominant_sink_category", "sink_category_heads",
                                                              "sink_category_sentence")},
        "category_shares": sinks.tables["sink_categories"].to_dict("records"),
        "segment_ratio_to_uniform": bias.summary["segment_ratio_to_uniform"],
        "ioi": ioi_logit_difference(loaded) if loaded.generates else None,
        "seconds": round(time.perf_counter() - started, 1),
    }
    return json.loads(json.dumps(row, default=float))


def markdown(rows: list[dict]) -> str:
    lines = ["| model | --bos | Sink_1 | sink heads | massive dims (peak \\|x\\|) | secondary: official (cos) / "
             "both | dominant sink (heads) | first token / uniform | last third / uniform | IOI logit(IO) - logit(S) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dims = ", ".join(f"{d} ({v:,.0f})" for d, v in r["massive_dims"].items()) or "none"
        seg = r["segment_ratio_to_uniform"]
        ioi = f"{r['ioi']['mean']:.2f} ± {r['ioi']['se']:.2f} ({r['ioi']['positive']}/{r['ioi']['n']} > 0)" \
            if r["ioi"] else "n/a (encoder)"
        sec, cat = r["secondary"], r["sink_categories"]
        share = sec["official_flag_share"]
        secondary = (f"{sec['n_official_secondary']} ({share:.0%} of tokens flagged) / {sec['n_both_secondary']}"
                     if sec["n_official_secondary"] is not None else "n/a")
        heads = (cat["sink_category_heads"] or {}).get(cat["dominant_sink_category"])
        dominant = f"{cat['dominant_sink_category']} ({heads})" if cat["dominant_sink_category"] else "none"
        lines.append(f"| {r['model']} | {r['bos']} | {r['sink_1_pct']:.1f}% | {r['sink_heads']} of "
                     f"{r['layers'] * r['heads']} | {dims} | {secondary} | {dominant} | {seg['first token']:.3g} | "
                     f"{seg['last third']:.3g} | {ioi} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(name, bos) for name, bos in ROWS]
    RESULT.write_text(json.dumps({"protocol": __doc__.split("\n\n")[1], "threads": args.threads, "rows": rows},
                                 indent=1) + "\n")
    print(markdown(rows))
    print(f"written to {RESULT}")


if __name__ == "__main__":
    main()
