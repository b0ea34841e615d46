"""Post-softmax group reweighting as a recombination of what the kernels already return.

With group partial outputs O_g = sum_{k in g} P_ik V_k and masses m_g (``AttentionStats.group_out``,
``group_mass``), reweighting the keys of each group by w_g and renormalising is

    out' = (sum_g w_g O_g) / (sum_g w_g m_g + w_rest · m_sink)

where the last group, "rest", holds every key outside the edit's groups, and m_sink = exp(s_aux - lse)
is a learned sink logit's mass, which goes with the rest (weight 1 unless an edit says otherwise).
The rest is a labelled group of its own rather than O - sum_g O_g: when an edit removes most of a
row's mass, the subtraction would cancel away the precision of what is left. No second attention
pass, no T x T.
"""

from __future__ import annotations

import torch


def recombine(out: torch.Tensor, group_out: torch.Tensor, group_mass: torch.Tensor, weights: torch.Tensor,
              sink_mass: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reweighted output and what it took.

    - out ``[batch, head, query, dim_v]``: the unedited attention output (kept where nothing changes);
    - group_out ``[batch, head, query, group, dim_v]``, group_mass ``[batch, head, query, group]``: every
      key in exactly one group, the last group being the rest;
    - weights ``[batch, head, query, group]``, the last for the rest (and the sink);
    - sink_mass ``[batch, head, query]`` or None.

    Returns (out' in out's dtype, denominator ``[batch, head, query]`` fp32, edited rows
    ``[batch, head, query]`` bool). Rows whose weights are all 1, or whose new denominator is 0
    (every key they could see weighted 0), keep their output bit for bit.
    """
    dtype = torch.promote_types(out.dtype, torch.float32)  # at least fp32, whatever the model runs in
    w = weights.to(dtype)
    numerator = (w[..., None] * group_out.to(dtype)).sum(dim=-2)
    denominator = (w * group_mass.to(dtype)).sum(dim=-1)
    if sink_mass is not None:
        denominator = denominator + w[..., -1] * sink_mass.to(dtype)
    edited = (weights != 1).any(dim=-1) & (denominator > 0)
    new = numerator / torch.where(edited, denominator, 1.0)[..., None]
    return torch.where(edited[..., None], new, out.to(dtype)).to(out.dtype), denominator, edited


def reweight_probs(probs: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The same edit on materialised probabilities (patterns for one head; the tests' oracle).

    probs ``[batch, head, query, key]``; labels ``[batch, key]`` (group index; -1 or the last index =
    rest); weights ``[batch, head, query, group]``, the last for the rest. Sink mass (1 - row sum)
    goes with the rest.
    """
    rest = weights.shape[-1] - 1
    index = torch.where(labels < 0, rest, labels).long()  # [batch, key]
    per_key = weights.float().gather(-1, index[:, None, None, :].expand(*probs.shape[:3], -1))
    scaled = probs.float() * per_key
    sink = (1.0 - probs.float().sum(dim=-1)).clamp_min(0.0) * weights[..., -1].float()
    denominator = scaled.sum(dim=-1) + sink
    edited = (weights != 1).any(dim=-1) & (denominator > 0)
    new = scaled / torch.where(edited, denominator, 1.0)[..., None]
    return torch.where(edited[..., None], new, probs.float())
