"""What each analysis command prints when its run is written: a table and a few key numbers."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from headlab.cli.output import console, say


def print_sinks_summary(summary: dict, path: Path, max_tokens: int | None = None) -> None:
    from headlab.figures import model_title  # plotly: imported once a run has been computed, never for --help

    table = Table(title=f"Top sink heads: {model_title(summary['model'])} (alpha of the first token)")
    table.add_column("layer", justify="right")
    table.add_column("head", justify="right")
    table.add_column("alpha", justify="right")
    for row in summary["top_sink_heads"]:
        table.add_row(str(row["layer"]), str(row["head"]), f"{row['alpha_first']:.3f}")
    console.print(table)
    mean = summary["n_tokens"] / max(summary["n_prompts"], 1)
    length = f"T <= {max_tokens}" if max_tokens is not None else "T"
    length += f", mean {mean:.1f} tokens per prompt"
    console.print(f"Sink_1 (eps = {summary['eps']}, {length}): [bold]{summary['sink_1_pct']:.1f}%[/] of "
                  f"(sample, layer, head); sink heads: {summary['n_sink_heads']} of "
                  f"{summary['n_layers'] * summary['n_heads']}")
    if max_tokens is not None and mean < max_tokens / 2:
        console.print(f"note: prompts average {mean:.1f} tokens, far below --max-tokens {max_tokens}: Sink_1 depends "
                      "on the token count, so compare it only between runs with the same prompts and T",
                      highlight=False, soft_wrap=True)
    dims = summary["massive_dims"]
    console.print(f"massive activations: dims {dims} from layer {summary['first_massive_layer']}" if dims
                  else "massive activations: none", f"({summary['massive_criterion']})")
    if "sink_category_sentence" in summary:
        console.print(f"sink categories: {summary['sink_category_sentence']}", highlight=False, soft_wrap=True)
    if "n_sink_tokens" in summary:
        levels = f"; sink levels: {summary['n_sink_levels']}" if "n_sink_levels" in summary else ""
        low = f", {summary['n_low_attention']} low attention" if summary.get("n_low_attention") else ""
        criterion = f", criterion {summary['secondary_criterion']}" if "secondary_criterion" in summary else ""
        console.print(f"secondary-sink scan: {summary['n_secondary']} secondary, {summary['n_primary_like']} "
                      f"primary-like, {summary['n_noise']} noise{low} (lifetime bounds {summary['lifetime_bounds']}"
                      f"{criterion}){levels}")
        if summary.get("secondary_counts_note"):
            console.print(summary["secondary_counts_note"], highlight=False, soft_wrap=True)
        if summary.get("secondary_saturation_note"):
            console.print(f"[bold yellow]warning:[/] {summary['secondary_saturation_note']}", highlight=False,
                          soft_wrap=True)


def print_position_summary(summary: dict, path: Path) -> None:
    from headlab.analyses.position_bias import absent_sentence, rollout_sentence
    from headlab.figures import model_title

    table = Table(title=f"Position bias: {model_title(summary['model'])}")
    for column in ("segment", "received / uniform"):
        table.add_column(column, justify="right")
    for segment, ratio in summary["segment_ratio_to_uniform"].items():
        table.add_row(segment, f"{ratio:.3g}")
    console.print(table)

    k = summary["trend_k_mean"]
    console.print(f"tokens per prompt: T <= {summary.get('max_tokens')} (mean {summary['mean_prompt_tokens']:.1f})",
                  highlight=False)
    console.print(f"first third / middle: [bold]{summary['first_vs_middle']:.3g}[/], last third / middle: "
                  f"[bold]{summary['last_vs_middle']:.3g}[/]: {summary['position_shape']}; trend k (mean over "
                  "layers): " + (f"{k:.3g}" if k is not None else "no fit"), highlight=False, soft_wrap=True)
    if "rollout_separation" in summary:
        console.print(rollout_sentence(summary), highlight=False, soft_wrap=True)
    if "retrieval_accuracy" in summary:
        accuracy = ", ".join(f"{p} {a:.2f}" for p, a in summary["retrieval_accuracy"].items())
        console.print(f"retrieval accuracy: {accuracy} (chance {summary['retrieval_chance']:.3f})")
    if "retrieval_absent_pick" in summary:
        console.print(absent_sentence(summary), highlight=False, soft_wrap=True)
    for note in summary["notes"]:
        console.print(f"note: {note}", highlight=False, soft_wrap=True)


def print_circuits_summary(result, graphs: list[Path]) -> None:
    from headlab.analyses.circuits import summary_lines

    for line in summary_lines(result):
        say(line)
    for graph in graphs:
        say(f"graph written to {graph}")
