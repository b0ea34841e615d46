"""The live page's edits in words: each chosen edit as a person reads it ("zero-ablate (scale 0): every head
of layer 2", not "HeadScale"), and a note when two chosen edits change the same head (they stack silently in one
``intervene`` block, so the generation "with edits" is their combination)."""

from __future__ import annotations

from headlab.interventions import HeadScale, head_list

# Edits as the page names them (HeadScale is named by its factor, see ``describe_edit``).
EDIT_ACTIONS = {"HeadMeanAblate": "mean-ablate", "AttentionOverride": "attention override",
                "KeyKnockout": "key knockout"}
MAX_NAMED_HEADS = 6  # heads named one by one in a label or a conflict note; more are counted


def describe_edit(edit) -> str:
    """The edit as a person reads it: ``"zero-ablate (scale 0): every head of layer 2"``, ``"scale ×6: L1H0,
    L1H3"``, ``"PAI on layers 2, 3"`` (an LVLM fix: its layers); an edit the page does not know by its class."""
    heads = getattr(edit, "heads", None)
    if heads is None:
        return f"{type(edit).__name__}{_on_layers(edit.layers())}"
    rows = getattr(edit, "rows", "all")
    where = describe_heads(heads) + (", last row only" if rows == "last" else "")
    return f"{_action(edit)}: {where}"


def _action(edit) -> str:
    name = type(edit).__name__
    if isinstance(edit, HeadScale):
        alpha = edit.alpha
        if isinstance(alpha, (int, float)):
            return "zero-ablate (scale 0)" if alpha == 0 else f"scale ×{alpha:g}"
        return "scale (a factor per head)"
    return EDIT_ACTIONS.get(name, name)


def describe_heads(heads) -> str:
    """``[(2, None), (3, 1), (3, 2)]`` -> ``"every head of layer 2, L3H1, L3H2"`` (at most MAX_NAMED_HEADS named)."""
    pairs = [heads] if isinstance(heads, tuple) and len(heads) == 2 and isinstance(heads[0], int) else list(heads)
    whole = sorted({layer for layer, head in pairs if head is None})
    single = sorted({(layer, head) for layer, head in pairs if head is not None and layer not in whole})
    parts = [f"every head of{_on_layers(whole, prefix='')}"] if whole else []
    named = [f"L{layer}H{head}" for layer, head in single]
    if len(named) > MAX_NAMED_HEADS:
        named = [*named[:MAX_NAMED_HEADS], f"{len(named) - MAX_NAMED_HEADS} more heads"]
    return ", ".join(parts + named)


def _on_layers(layers, prefix: str = " on") -> str:
    """``" on layers 0-3, 7"``: consecutive layers (three or more) as a range; "" for no layer."""
    layers = sorted(set(layers))
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    spans = ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in runs)
    return f"{prefix} layer{'s' if len(layers) > 1 else ''} {spans}" if layers else ""


def head_conflicts(labelled: list[tuple[str, object]], arch) -> dict[tuple[int, int], list[str]]:
    """Heads that two or more chosen edits both change: ``{(layer, head): [the edits' form labels]}``.

    Such edits do not fail: they stack in one ``intervene`` block (a knockout inside an override, a scale of an
    ablated head), so the "with edits" text is their combination and neither edit's effect alone. The LVLM fixes
    pick their heads while generating and are left out."""
    by_head: dict[tuple[int, int], list[str]] = {}
    for label, edit in labelled:
        heads = getattr(edit, "heads", None)
        if heads is None:
            continue
        for pair in head_list(heads, arch):
            by_head.setdefault(pair, []).append(label)
    return {pair: names for pair, names in by_head.items() if len(names) > 1}


def conflict_note(conflicts: dict[tuple[int, int], list[str]]) -> str | None:
    """One warning for all heads edited twice, grouped by the edits that meet on them."""
    if not conflicts:
        return None
    groups: dict[tuple[str, ...], list[tuple[int, int]]] = {}
    for pair, names in sorted(conflicts.items()):
        groups.setdefault(tuple(names), []).append(pair)
    lines = []
    for names, pairs in groups.items():
        shown = ", ".join(f"L{layer}H{head}" for layer, head in pairs[:MAX_NAMED_HEADS])
        more = f" and {len(pairs) - MAX_NAMED_HEADS} more" if len(pairs) > MAX_NAMED_HEADS else ""
        lines.append(f"- {shown}{more}: " + " and ".join(names))
    return ("Conflict: two of the chosen edits change the same head. Both apply, one on top of the other, so "
            "the text \"with edits\" shows their combination, not either edit alone; remove one, or give them "
            "different heads, to see each.\n" + "\n".join(lines))
