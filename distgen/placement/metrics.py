"""Predicted quality of a placement on a routing trace: balance and cross-rank traffic.

``slots[rank]`` lists the logical experts in a rank's physical slots; an expert held by n
slots (replicas) gets 1/n of its tokens on each (the runtime spreads a replicated expert's
tokens evenly over its replicas).
"""

from __future__ import annotations

import numpy as np

from distgen.placement.routing import RoutingTrace


def replica_share(slots: list[list[int]], num_experts: int, ranks_per_group: int = 1) -> np.ndarray:
    """(E, groups) share of each expert's tokens served by each rank (or group of
    ``ranks_per_group`` consecutive ranks, e.g. a node): replicas count evenly."""
    groups = len(slots) // ranks_per_group
    share = np.zeros((num_experts, groups))
    for rank, experts in enumerate(slots):
        for expert in experts:
            share[expert, rank // ranks_per_group] += 1.0
    held = share.sum(axis=1, keepdims=True)
    if np.any(held == 0):
        missing = [int(e) for e in np.flatnonzero(held[:, 0] == 0)]
        raise ValueError(f"placement holds no replica of experts {missing}")
    return share / held


def rank_loads(slots: list[list[int]], loads: np.ndarray) -> np.ndarray:
    """(ranks,) tokens each rank computes: an expert's load split evenly over its replicas."""
    loads = np.asarray(loads, dtype=np.float64)
    return replica_share(slots, loads.shape[0]).T @ loads


def balancedness(placement_layers: dict[int, list[list[int]]], trace: RoutingTrace) -> dict:
    """Balancedness = mean rank load / max rank load (1.0 = perfect), per MoE layer.

    Returns ``{"overall": float, "per_layer": {layer: float}, "max_rank_load": {layer: float}}``;
    ``overall`` is the mean over layers of the per-layer figure (each layer's all-to-all
    waits for its slowest rank, so per-layer balance is what counts, not the sum over layers).
    A layer with no tokens counts as balanced (1.0).
    """
    per_layer, peak = {}, {}
    for i, layer in enumerate(trace.layers):
        load = rank_loads(placement_layers[layer], trace.loads[i])
        peak[layer] = float(load.max())
        per_layer[layer] = float(load.mean() / load.max()) if load.max() > 0 else 1.0
    return {"overall": float(np.mean(list(per_layer.values()))), "per_layer": per_layer, "max_rank_load": peak}


def cross_rank_fraction(placement_layers: dict[int, list[list[int]]], trace: RoutingTrace,
                        ranks_per_group: int = 1) -> float:
    """MoETuner's metric: the share of cross-layer pairs (weights ``trace.cross``) whose
    layer-l expert and layer-(l+1) expert sit on different ranks. With replicas, the
    probability that they differ when each expert's tokens spread evenly over its replicas.
    ``ranks_per_group`` > 1 measures crossings between groups of ranks (nodes) instead.
    0.0 when the trace has fewer than two MoE layers or no pairs.
    """
    total = trace.cross.sum()
    if len(trace.layers) < 2 or total <= 0:
        return 0.0
    same = 0.0
    shares = [replica_share(placement_layers[layer], trace.num_experts, ranks_per_group) for layer in trace.layers]
    for i in range(len(trace.layers) - 1):
        # P(same rank | expert a in l, expert b in l+1) = sum_r share_l[a, r] * share_{l+1}[b, r]
        same += float((trace.cross[i] * (shares[i] @ shares[i + 1].T)).sum())
    return float(1.0 - same / total)


def cross_rank_floor(trace: RoutingTrace, slots_per_rank: int) -> float:
    """A lower bound on :func:`cross_rank_fraction` over *every* placement with
    ``slots_per_rank`` slots per rank, replicas included: how much any co-location policy can
    possibly gain on this trace.

    Expert i of layer l shares a rank with at most ``slots_per_rank`` experts of layer l+1, and
    each pair (i, j) is on-rank with probability <= 1, so at most the ``slots_per_rank``
    largest entries of row i of ``cross[l]`` stay on-rank (the same holds by columns). Nearly
    layer-independent routing has flat rows, and then no placement keeps much on-rank.
    """
    total = trace.cross.sum()
    if len(trace.layers) < 2 or total <= 0:
        return 0.0
    k = min(slots_per_rank, trace.num_experts)
    by_rows = sum(float(np.sort(c, axis=1)[:, -k:].sum()) for c in trace.cross)
    by_cols = sum(float(np.sort(c, axis=0)[-k:, :].sum()) for c in trace.cross)
    return float(max(0.0, 1.0 - min(by_rows, by_cols) / total))


def consecutive_mutual_information(trace: RoutingTrace) -> list[float]:
    """Per pair of consecutive MoE layers, the mutual information (bits) between the expert a token
    picks in layer l and the one it picks in layer l+1, from the trace's choice-pair counts (each of a
    token's k x k pairs counts once). 0: layer l+1's choice says nothing about layer l's (nothing for
    co-location to exploit); at most log2(E)."""
    out = []
    for cross in trace.cross:
        total = cross.sum()
        if total <= 0:
            out.append(0.0)
            continue
        joint = cross / total
        outer = joint.sum(axis=1, keepdims=True) @ joint.sum(axis=0, keepdims=True)
        nonzero = joint > 0
        out.append(float((joint[nonzero] * np.log2(joint[nonzero] / outer[nonzero])).sum()))
    return out


def summary(placement, trace: RoutingTrace) -> dict:
    """What ``distgen place`` prints for one placement."""
    balance = balancedness(placement.layers, trace)
    out = {
        "balancedness": round(balance["overall"], 4),
        "balancedness_per_layer": {str(k): round(v, 4) for k, v in balance["per_layer"].items()},
        "min_layer_balancedness": round(min(balance["per_layer"].values()), 4),
        "cross_rank_fraction": round(cross_rank_fraction(placement.layers, trace), 4),
        "slots_per_rank": len(next(iter(placement.layers.values()))[0]) if placement.layers else 0,
        "solver_seconds": round(placement.solver_seconds, 3),
        "note": placement.note,
    }
    if placement.nodes > 1:
        out["cross_node_fraction"] = round(
            cross_rank_fraction(placement.layers, trace, ranks_per_group=placement.ranks // placement.nodes), 4)
    return out
