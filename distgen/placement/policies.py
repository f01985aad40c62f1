"""Expert placement policies: which logical experts each expert-parallel rank holds.

A placement maps every MoE layer to ``slots[rank]`` = the logical experts in that rank's
physical slots. Every rank has the same number of slots, (E + redundant) / ranks; an expert
may fill several slots (replicas; the runtime spreads its tokens evenly over them) and every
expert fills at least one. Ranks ``n * R/nodes ... (n+1) * R/nodes - 1`` form node n.

Policies (:data:`POLICIES`):

* ``round-robin`` — expert e on rank e mod R (vLLM's default map); spare slots hold copies
  of experts 0, 1, ... (load-blind). Needs no routing; the baseline.
* ``linear`` — contiguous blocks of physical slots per rank.
* ``eplb`` — DeepSeek's Expert Parallelism Load Balancer from per-expert loads: replicate the
  heaviest experts into the redundant slots, pack replicas onto ranks with equal slot counts,
  hierarchical (expert groups to nodes first) when nodes > 1. See :func:`eplb`.
* ``tuner`` — MoETuner-style (arXiv 2502.06643) placement from loads *and* cross-layer
  co-routing, solved with OR-Tools CP-SAT under a time limit. See :func:`tuner`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import numpy as np

from distgen.config import ConfigError
from distgen.placement.routing import RoutingTrace, _layer_span

POLICIES = ("round-robin", "linear", "eplb", "tuner")
_PLACEMENT_KEYS = ("policy", "ranks", "nodes", "num_experts", "layers")


@dataclass
class Placement:
    policy: str
    ranks: int
    nodes: int
    num_experts: int
    layers: dict[int, list[list[int]]]  # MoE layer -> slots[rank] = logical experts held
    note: str = ""
    solver_seconds: float = 0.0

    @property
    def slots_per_rank(self) -> int:
        return len(next(iter(self.layers.values()))[0]) if self.layers else 0

    def save(self, path: str) -> None:
        head = {"policy": self.policy, "ranks": self.ranks, "nodes": self.nodes, "num_experts": self.num_experts,
                "slots_per_rank": self.slots_per_rank, "note": self.note, "solver_seconds": self.solver_seconds}
        lines = [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()]
        # one line per MoE layer: slots[rank] lists, readable and diffable
        layers = [f"    {json.dumps(str(layer))}: {json.dumps(slots)}" for layer, slots in sorted(self.layers.items())]
        with open(path, "w") as f:
            f.write("{\n" + "\n".join(lines) + '\n  "layers": {\n' + ",\n".join(layers) + "\n  }\n}\n")

    @classmethod
    def load(cls, path: str) -> "Placement":
        if not os.path.isfile(path):
            raise ConfigError(f"--placement: no such file {path!r} (expected a policy name "
                              f"({', '.join(POLICIES)}) or a JSON file written by `distgen place --out`)")
        try:
            with open(path) as f:
                obj = json.load(f)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--placement: cannot read {path}: {exc}") from None
        missing = [k for k in _PLACEMENT_KEYS if not isinstance(obj, dict) or k not in obj]
        if missing:
            raise ConfigError(f"--placement: {path} is not a placement file: missing {', '.join(missing)}")
        try:
            layers = {int(layer): [[int(e) for e in rank] for rank in slots] for layer, slots in obj["layers"].items()}
            return cls(policy=str(obj["policy"]), ranks=int(obj["ranks"]), nodes=int(obj["nodes"]),
                       num_experts=int(obj["num_experts"]), layers=dict(sorted(layers.items())),
                       note=str(obj.get("note", "")), solver_seconds=float(obj.get("solver_seconds", 0.0)))
        except (TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"--placement: {path} has a malformed entry: {exc}") from None

    def check_for(self, num_experts: int, moe_layers: tuple[int, ...], ranks: int, source: str) -> None:
        """Raise ConfigError naming what differs between this placement and the model / run."""
        if self.num_experts != num_experts:
            raise ConfigError(f"placement file {source} is for {self.num_experts} experts per layer, "
                              f"the model has {num_experts}")
        if tuple(self.layers) != tuple(moe_layers):
            raise ConfigError(f"placement file {source} places {len(self.layers)} MoE layers "
                              f"{_layer_span(tuple(self.layers))}, the model's are {len(moe_layers)} layers "
                              f"{_layer_span(tuple(moe_layers))}")
        if self.ranks != ranks:
            raise ConfigError(f"placement file {source} is for {self.ranks} expert-parallel ranks, "
                              f"this run has ep={ranks}")
        for layer, slots in self.layers.items():
            problem = slot_problem(slots, num_experts, ranks)
            if problem:
                raise ConfigError(f"placement file {source}, layer {layer}: {problem}")


def slot_problem(slots: list[list[int]], num_experts: int, ranks: int) -> str:
    """'' when slots is a valid placement of one layer, else what is wrong."""
    if len(slots) != ranks:
        return f"lists {len(slots)} ranks, expected {ranks}"
    counts = [len(s) for s in slots]
    if len(set(counts)) != 1 or counts[0] == 0:
        return f"unequal or empty slot counts per rank {counts} (every rank needs the same number >= 1)"
    held = {e for s in slots for e in s}
    bad = sorted(e for e in held if not 0 <= e < num_experts)
    if bad:
        return f"expert ids {bad} out of range 0..{num_experts - 1}"
    missing = sorted(set(range(num_experts)) - held)
    if missing:
        return f"no rank holds expert(s) {missing}"
    return ""


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# ---------------------------------------------------------------- static maps
def round_robin(num_experts: int, ranks: int, redundant: int = 0) -> list[list[int]]:
    """Expert e on rank e mod R. Redundant slots (naive, load-blind): the copy in spare slot j
    is of expert j mod E, on the first rank after its original's (cyclically) that has a free
    slot and no copy of it yet (any rank with a free slot if none)."""
    per = (num_experts + redundant) // ranks
    slots = [[] for _ in range(ranks)]
    for e in range(num_experts):
        slots[e % ranks].append(e)
    for j in range(redundant):
        e = j % num_experts
        order = [(e % ranks + step) % ranks for step in range(1, ranks + 1)]
        free = [r for r in order if len(slots[r]) < per]
        slots[next((r for r in free if e not in slots[r]), free[0])].append(e)
    return [sorted(r) for r in slots]


def linear(num_experts: int, ranks: int, redundant: int = 0) -> list[list[int]]:
    """Contiguous blocks: rank r holds physical slots r*n .. r*n+n-1 (slot s = expert s mod E)."""
    per = (num_experts + redundant) // ranks
    return [sorted(s % num_experts for s in range(r * per, (r + 1) * per)) for r in range(ranks)]


# ---------------------------------------------------------------- EPLB
def _replicate(loads: np.ndarray, slots: int) -> np.ndarray:
    """Replica count per expert: each spare slot goes to the highest load per replica
    (ties: lowest expert index)."""
    count = np.ones(loads.shape[0], dtype=np.int64)
    if loads.sum() <= 0:  # nothing recorded: treat the experts alike
        loads = np.ones(loads.shape[0])
    for _ in range(slots - loads.shape[0]):
        count[int(np.argmax(loads / count))] += 1
    return count


def _pack(items: list[tuple[float, int]], bins: int, capacity: int) -> list[list[int]]:
    """Greedy balanced packing with equal counts: items (weight, id), heaviest first (ties:
    lower id), each into the lightest bin with room, preferring bins that do not hold that id
    yet (replicas of one expert on one rank would not spread its load); ties: lower bin."""
    order = sorted(range(len(items)), key=lambda i: (-items[i][0], items[i][1], i))
    weight = [0.0] * bins
    held: list[list[int]] = [[] for _ in range(bins)]
    for i in order:
        w, ident = items[i]
        open_bins = [b for b in range(bins) if len(held[b]) < capacity]
        fresh = [b for b in open_bins if ident not in held[b]] or open_bins
        b = min(fresh, key=lambda b: (weight[b], b))
        held[b].append(ident)
        weight[b] += w
    per_id = {ident: w for w, ident in items}
    _separate_copies([[] for _ in range(bins)], held, per_id.__getitem__)
    return held


def _separate_copies(fixed: list[list[int]], movable: list[list[int]], weight_of) -> None:
    """Swap movable copies between bins (in place) so that no bin holds an id twice where a swap
    allows: greedy packing can leave an expert's last replica only bins that already hold it.
    Of the possible swaps, the one between the closest weights (least change in balance)."""
    def holds(b):
        return fixed[b] + movable[b]

    for _ in range(3):
        swapped = False
        for b in range(len(movable)):
            for k, x in enumerate(movable[b]):
                if holds(b).count(x) < 2:
                    continue
                best = None
                for b2 in range(len(movable)):
                    if b2 == b or x in holds(b2):
                        continue
                    for k2, y in enumerate(movable[b2]):
                        if y != x and y not in holds(b):
                            cost = abs(weight_of(x) - weight_of(y))
                            if best is None or cost < best[0]:
                                best = (cost, b2, k2)
                if best is not None:
                    _, b2, k2 = best
                    movable[b][k], movable[b2][k2] = movable[b2][k2], x
                    swapped = True
        if not swapped:
            break


def _replicate_and_pack(loads: np.ndarray, experts: list[int], ranks: int, per_rank: int) -> list[list[int]]:
    """EPLB on a subset of experts (one node's, or all): replicate into ranks*per_rank slots, pack."""
    sub = np.asarray([loads[e] for e in experts], dtype=np.float64)
    count = _replicate(sub, ranks * per_rank)
    items = [(float(sub[i] / count[i]), experts[i]) for i in range(len(experts)) for _ in range(int(count[i]))]
    return [sorted(r) for r in _pack(items, ranks, per_rank)]


def eplb(loads: np.ndarray, ranks: int, redundant: int, nodes: int = 1, groups: int | None = None) -> list[list[int]]:
    """DeepSeek's EPLB for one layer: ``slots[rank]`` with (E + redundant) / ranks slots each.

    Global (nodes == 1): replicate — each of the ``redundant`` spare slots goes to the expert
    with the highest load per replica; pack — replicas sorted by load per replica (heaviest
    first) each go to the lightest rank with room, preferring ranks that do not hold that
    expert already (DeepSeek's packing allows two replicas of an expert on one rank, which
    balances nothing; we avoid it when a rank with room allows).

    Hierarchical (nodes > 1): the experts form ``groups`` contiguous groups (default: E groups,
    one expert each — models without group-limited routing); groups are packed onto nodes,
    equal group count per node, balancing group load; then each node replicates its experts
    into its share of the spare slots (redundant / nodes) and packs the replicas onto its own
    ranks. Tokens of an expert group then stay inside one node. Falls back to the global
    policy where the layout does not allow it (E not divisible by groups, groups not by
    nodes), as DeepSeek's code does. Deterministic: ties go to the lower index.
    """
    loads = np.asarray(loads, dtype=np.float64)
    experts = loads.shape[0]
    if loads.sum() <= 0:  # nothing recorded yet: treat the experts alike
        loads = np.ones(experts)
    per_rank = (experts + redundant) // ranks
    groups = experts if groups is None else groups
    hierarchical = nodes > 1 and groups >= 1 and experts % groups == 0 and groups % nodes == 0 \
        and redundant % nodes == 0 and ranks % nodes == 0
    if not hierarchical:
        return _replicate_and_pack(loads, list(range(experts)), ranks, per_rank)
    size = experts // groups
    group_load = loads.reshape(groups, size).sum(axis=1)
    node_groups = _pack([(float(group_load[g]), g) for g in range(groups)], nodes, groups // nodes)
    ranks_per_node = ranks // nodes
    slots: list[list[int]] = []
    for node in range(nodes):
        members = sorted(e for g in node_groups[node] for e in range(g * size, (g + 1) * size))
        slots.extend(_replicate_and_pack(loads, members, ranks_per_node, per_rank))
    return slots


# ---------------------------------------------------------------- MoETuner
def _scaled_int(values: np.ndarray, total: float = 1e6) -> np.ndarray:
    """Non-negative floats -> integers summing to about ``total`` (CP-SAT wants integers)."""
    values = np.maximum(np.asarray(values, dtype=np.float64), 0.0)
    s = values.sum()
    return np.zeros(values.shape, dtype=np.int64) if s <= 0 else np.rint(values * (total / s)).astype(np.int64)


def _solver(seconds: float, workers: int):
    from ortools.sat.python import cp_model

    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(seconds, 0.01)
    solver.parameters.num_workers = workers
    solver.parameters.random_seed = 0
    return solver


def _balanced_clusters(weights: np.ndarray, ranks: int, seconds: float, workers: int,
                       hint: list[int]) -> tuple[list[int] | None, int, int]:
    """ILP 1: experts -> ranks, E/ranks each, minimising the max rank load.
    Returns (rank of each expert or None, max load found, proven lower bound on the optimum)."""
    from ortools.sat.python import cp_model

    e, per = weights.shape[0], weights.shape[0] // ranks
    model = cp_model.CpModel()
    x = [[model.new_bool_var(f"x{i}_{r}") for r in range(ranks)] for i in range(e)]
    peak = model.new_int_var(int(-(-weights.sum() // ranks)), int(weights.sum()), "peak")
    # the heaviest expert's rank also holds E/ranks - 1 others, each at least the lightest
    model.add(peak >= int(weights.max() + np.sort(weights)[: per - 1].sum()))
    loads = []
    for r in range(ranks):
        model.add(sum(x[i][r] for i in range(e)) == per)
        load = model.new_int_var(0, int(weights.sum()), f"load{r}")
        model.add(load == sum(int(weights[i]) * x[i][r] for i in range(e)))
        model.add(load <= peak)
        loads.append(load)
    for i in range(e):
        model.add_exactly_one(x[i])
    # ranks are interchangeable: only rank-load-sorted solutions (hint sorted the same way)
    for r in range(ranks - 1):
        model.add(loads[r] >= loads[r + 1])
    hint_load = [int(sum(weights[i] for i in range(e) if hint[i] == r)) for r in range(ranks)]
    relabel = {old: new for new, old in enumerate(sorted(range(ranks), key=lambda r: (-hint_load[r], r)))}
    for i in range(e):  # a complete hint: CP-SAT starts from a feasible solution
        for r in range(ranks):
            model.add_hint(x[i][r], relabel[hint[i]] == r)
    for old, new in relabel.items():
        model.add_hint(loads[new], hint_load[old])
    model.add_hint(peak, max(hint_load))
    model.minimize(peak)
    solver = _solver(seconds, workers)
    solver.parameters.relative_gap_limit = 0.02  # near-optimal is enough: it only sets the load cap
    status = solver.solve(model)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None, 0, 0
    ranks_of = [next(r for r in range(ranks) if solver.value(x[i][r])) for i in range(e)]
    return ranks_of, int(solver.value(peak)), int(np.ceil(solver.best_objective_bound))


def _colocate(weights: np.ndarray, affinity: np.ndarray, cap: int, ranks: int, seconds: float, workers: int,
              hint: list[int]) -> list[int] | None:
    """Experts -> ranks, E/ranks each, every rank load <= cap, maximising sum affinity[e, rank(e)]."""
    from ortools.sat.python import cp_model

    e, per = weights.shape[0], weights.shape[0] // ranks
    model = cp_model.CpModel()
    x = [[model.new_bool_var(f"x{i}_{r}") for r in range(ranks)] for i in range(e)]
    for i in range(e):
        model.add_exactly_one(x[i])
        for r in range(ranks):
            model.add_hint(x[i][r], hint[i] == r)
    for r in range(ranks):
        model.add(sum(x[i][r] for i in range(e)) == per)
        model.add(sum(int(weights[i]) * x[i][r] for i in range(e)) <= cap)
    model.maximize(sum(int(affinity[i, r]) * x[i][r] for i in range(e) for r in range(ranks) if affinity[i, r]))
    solver = _solver(seconds, workers)
    solver.parameters.relative_gap_limit = 1e-3
    status = solver.solve(model)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None
    return [next(r for r in range(ranks) if solver.value(x[i][r])) for i in range(e)]


def _match_clusters(prev_ranks: list[int], clusters: list[int], cross: np.ndarray, ranks: int) -> list[int]:
    """ILP 2 for one pair of consecutive layers: relabel this layer's clusters onto ranks so
    that the co-routed weight W[a, b] between rank a of the previous layer and cluster b is
    maximal on matched pairs (a linear assignment; exact)."""
    from ortools.graph.python import linear_sum_assignment

    w = np.zeros((ranks, ranks))
    np.add.at(w, (np.asarray(prev_ranks)[:, None], np.asarray(clusters)[None, :]), cross)
    w = _scaled_int(w)
    solver = linear_sum_assignment.SimpleLinearSumAssignment()
    for a in range(ranks):
        for b in range(ranks):
            solver.add_arc_with_cost(b, a, -int(w[a, b]))  # cluster b -> rank a
    if solver.solve() != solver.OPTIMAL:
        return list(clusters)
    to_rank = {b: solver.right_mate(b) for b in range(ranks)}
    return [to_rank[c] for c in clusters]


def _affinity(layer: int, placed: list[list[int] | None], cross: np.ndarray, ranks: int) -> np.ndarray:
    """(E, ranks) co-routed pairs expert e of ``layer`` would keep on-rank at each rank, given
    the placements of the neighbouring layers (None: not placed yet)."""
    e = cross.shape[-1]
    aff = np.zeros((e, ranks))
    if layer > 0 and placed[layer - 1] is not None:
        # pairs (i in layer-1 on rank r, j in layer): cross[layer-1][i, j]
        np.add.at(aff.T, np.asarray(placed[layer - 1]), cross[layer - 1])
    if layer + 1 < len(placed) and placed[layer + 1] is not None:
        np.add.at(aff.T, np.asarray(placed[layer + 1]), cross[layer].T)
    return aff


def _add_replicas(ranks_of: list[int], loads: np.ndarray, ranks: int, redundant: int) -> list[list[int]]:
    """Spare slots after the tuner: EPLB replication, each replica (heaviest load per replica
    first) onto the least-loaded rank with a spare slot that does not hold the expert yet."""
    e = loads.shape[0]
    if loads.sum() <= 0:
        loads = np.ones(e)
    slots = [[] for _ in range(ranks)]
    extra = [[] for _ in range(ranks)]
    for i, r in enumerate(ranks_of):
        slots[r].append(i)
    count = _replicate(loads, e + redundant)
    spare = [redundant // ranks] * ranks
    replicas = sorted(((loads[i] / count[i], i) for i in range(e) for _ in range(int(count[i]) - 1)),
                      key=lambda t: (-t[0], t[1]))

    def rank_load(r):
        return sum(loads[i] / count[i] for i in slots[r] + extra[r])

    for _, i in replicas:
        open_ranks = [r for r in range(ranks) if spare[r] > 0]
        fresh = [r for r in open_ranks if i not in slots[r] + extra[r]] or open_ranks
        r = min(fresh, key=lambda r: (rank_load(r), r))
        extra[r].append(i)
        spare[r] -= 1
    _separate_copies(slots, extra, lambda i: loads[i] / count[i])
    return [sorted(s + x) for s, x in zip(slots, extra)]


def tuner(trace: RoutingTrace, ranks: int, time_limit_s: float = 10.0, balance_tolerance: float = 0.05,
          redundant: int = 0, refine: bool = True,
          workers: int | None = None) -> tuple[dict[int, list[list[int]]], str]:
    """MoETuner-style placement from loads and cross-layer co-routing (CP-SAT, time-limited).

    As in MoETuner (arXiv 2502.06643):

    1. ILP 1, per MoE layer: put E/ranks experts in each of ``ranks`` clusters minimising the
       largest cluster load (the optimum M_l; solved to a 1 % gap, rank-load ordering breaks
       the symmetry, EPLB's packing is the starting hint).
    2. ILP 2: assign clusters to ranks so that heavily co-routed clusters of consecutive layers
       share a rank, W_l[a, b] = co-routed pairs between cluster a of layer l and cluster b of
       layer l+1 (from ``trace.cross``). On a chain of layers each consecutive pair is an
       independent linear assignment once the previous layer is placed, solved exactly.

    Our improvement (``refine=True``, the default): ILP 1 picks clusters for balance alone, so
    the experts a cluster's tokens go to next are spread over many clusters and ILP 2 can
    keep few of them on-rank. We keep ILP 1 only for the load cap and re-solve each layer's
    expert-to-rank assignment directly: equal expert counts, every rank load
    <= (1 + ``balance_tolerance``) × M_l (M_l: ILP 1's proven lower bound, or its answer if
    larger), maximising the co-routed pairs that stay on-rank
    with the neighbouring layers' placements (linear once the neighbours are fixed). One
    forward sweep (previous layer fixed, starting from ILP 1's clusters matched by ILP 2), kept
    only if it beats the plain ILP 1 + 2 answer on the whole chain, then refinement sweeps (both
    neighbours fixed, starting from the current placement) while they gain and time remains,
    so the result keeps at least as many pairs on-rank as MoETuner's ILP 1 + 2.
    Balancedness stays within ``balance_tolerance`` of ILP 1's optimum, which is at least as
    balanced as any equal-count placement (round-robin included).

    ``redundant`` > 0 (needs E divisible by ranks): after the tuner places E/ranks experts per
    rank, the ``redundant / ranks`` spare slots of each rank take EPLB replicas (heaviest load
    per replica first, least-loaded rank that does not hold the expert).

    Time: ``time_limit_s`` bounds all solves together. If ILP 1 finds no solution for a layer
    in its share of time (or is infeasible), the whole placement falls back to ``eplb`` (with
    the same ``redundant`` slots; none by default) and the note says so; a refinement solve that finds nothing keeps the
    ILP 1 + 2 answer for that layer. Returns ({layer: slots}, note).
    """
    start = time.monotonic()
    deadline = start + time_limit_s
    e, n = trace.num_experts, len(trace.layers)
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    weights = [_scaled_int(trace.loads[i]) for i in range(n)]
    notes = []

    def share(fraction_left: float, solves_left: int) -> float:
        return max(0.0, deadline - time.monotonic()) * fraction_left / max(solves_left, 1)

    # ILP 1 (clusters per layer) with EPLB's packing as the starting point
    clusters: list[list[int]] = []
    caps: list[int] = []
    for i in range(n):
        greedy = eplb(trace.loads[i], ranks, 0)
        hint = [0] * e
        for r, experts in enumerate(greedy):
            for x in experts:
                hint[x] = r
        seconds = share(0.4, n - i)
        ranks_of, peak, bound = (_balanced_clusters(weights[i], ranks, seconds, workers, hint) if seconds > 0.01
                                 else (None, 0, 0))
        if ranks_of is None:
            note = (f"tuner: no balanced clustering of layer {trace.layers[i]} within the {time_limit_s:g} s "
                    "limit; fell back to eplb")
            layers = {layer: eplb(trace.loads[j], ranks, redundant) for j, layer in enumerate(trace.layers)}
            return layers, note
        clusters.append(ranks_of)
        # the cap from the proven bound, so a 1 % gap does not loosen it (never below ILP 1's answer)
        caps.append(max(peak, int(np.floor(bound * (1.0 + balance_tolerance)))))

    # ILP 2: clusters of layer l+1 onto the ranks of layer l's clusters
    placed: list[list[int] | None] = [clusters[0]]
    for i in range(1, n):
        placed.append(_match_clusters(placed[i - 1], clusters[i], trace.cross[i - 1], ranks))

    if refine and n > 1:
        cross = np.stack([_scaled_int(trace.cross[i]) for i in range(n - 1)])
        missed = set()

        def solve(i: int, neighbours: list, hint: list[int], seconds: float) -> list[int] | None:
            """This layer against its placed neighbours; None when the solver found nothing."""
            aff = _affinity(i, neighbours, cross, ranks)
            result = _colocate(weights[i], aff, caps[i], ranks, seconds, workers, hint) if seconds > 0.01 else None
            if result is None:
                return None
            score = lambda p: aff[np.arange(e), p].sum()  # noqa: E731
            return result if score(result) >= score(hint) else hint

        # forward sweep: each layer against the previous one (the next is not placed yet), from
        # ILP 1's clusters matched to the previous layer as ILP 2 would
        forward: list[list[int] | None] = [placed[0]] + [None] * (n - 1)
        for i in range(1, n):
            hint = _match_clusters(forward[i - 1], clusters[i], trace.cross[i - 1], ranks)
            forward[i] = solve(i, forward, hint, share(0.5, n - i))
            if forward[i] is None:
                missed.add(trace.layers[i])
                forward[i] = hint
        if _kept_pairs(forward, trace.cross) >= _kept_pairs(placed, trace.cross):
            placed = forward
        # refinement sweeps: each layer against both neighbours, from its current placement, while
        # it still gains and time remains (each step can only keep more pairs on-rank)
        for _ in range(3):
            before = _kept_pairs(placed, trace.cross)
            for i in range(n):
                placed[i] = solve(i, placed, placed[i], share(1.0, n - i)) or placed[i]
            if _kept_pairs(placed, trace.cross) <= before or time.monotonic() >= deadline:
                break
        if missed:
            notes.append(f"tuner: co-location solve found nothing in time for layers {sorted(missed)}; "
                         "kept MoETuner's cluster assignment there")
    layers = {}
    for i, layer in enumerate(trace.layers):
        if redundant:
            layers[layer] = _add_replicas(placed[i], trace.loads[i], ranks, redundant)
        else:
            slots = [[] for _ in range(ranks)]
            for x, r in enumerate(placed[i]):
                slots[r].append(x)
            layers[layer] = [sorted(s) for s in slots]
    return layers, "; ".join(notes)


def _kept_pairs(placed: list[list[int]], cross: np.ndarray) -> float:
    kept = 0.0
    for i in range(len(placed) - 1):
        same = np.asarray(placed[i])[:, None] == np.asarray(placed[i + 1])[None, :]
        kept += float(cross[i][same].sum())
    return kept


# ---------------------------------------------------------------- entry point
def redundant_problem(redundant: int, num_experts: int, ranks: int, flag: str) -> str:
    """'' when ``redundant`` spare slots can all be useful, else why not. The bound is
    E x (ranks - 1): with that many spare slots every rank can hold a copy of every expert (full
    replication); one more slot would hold a second copy of an expert on a rank that has it
    already, which balances nothing (that rank computes both copies' tokens) and costs memory."""
    bound = num_experts * (ranks - 1)
    if redundant <= bound:
        return ""
    if ranks == 1:
        return (f"--redundant-experts {redundant}: spare slots need more than one expert-parallel rank ({flag}); "
                f"with one rank every expert has its one slot already")
    return (f"--redundant-experts {redundant}: at most {bound} for {num_experts} experts on {flag} (experts x "
            f"(ranks - 1) = {num_experts} x {ranks - 1}): that many spare slots already give every rank a copy of "
            f"every expert; a further copy would sit on a rank that holds its expert already, which balances "
            f"nothing and costs memory")


def validate(policy: str, num_experts: int, moe_layers, ranks: int, nodes: int = 1, redundant: int = 0,
             has_trace: bool = True, time_limit_s: float = 10.0, groups: int | None = None,
             ranks_flag: str | None = None) -> None:
    """Every ConfigError :func:`compute` can raise, before any work. ``ranks_flag``: how the user
    gave the rank count, for the messages (default ``--parallel ep=N``; ``distgen place``: ``--ranks N``)."""
    flag = ranks_flag or f"--parallel ep={ranks}"
    valid = "ep degrees" if ranks_flag is None else "rank counts"
    if policy not in POLICIES:
        raise ConfigError(f"--policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if not moe_layers:
        raise ConfigError("placement needs at least one MoE layer; the model has none")
    if num_experts < 1:
        raise ConfigError(f"the number of experts must be >= 1, got {num_experts}")
    if ranks < 1:
        raise ConfigError(f"{flag}: the number of expert-parallel ranks must be >= 1")
    if redundant < 0:
        raise ConfigError(f"--redundant-experts must be >= 0, got {redundant}")
    problem = redundant_problem(redundant, num_experts, ranks, flag)
    if problem:
        raise ConfigError(problem)
    slots = num_experts + redundant
    if slots < ranks:
        need = ranks - num_experts
        raise ConfigError(f"--redundant-experts {redundant} leaves rank {slots} without a slot: {num_experts} experts "
                          f"+ {redundant} redundant = {slots} expert slots for {ranks} ranks "
                          f"({flag}); use --redundant-experts >= {need} or fewer ranks")
    if slots % ranks:
        fix = next(r for r in range(redundant, redundant + ranks) if (num_experts + r) % ranks == 0)
        raise ConfigError(f"{flag} must divide the number of expert slots "
                          f"(E + redundant = {num_experts} + {redundant} = {slots}); valid {valid}: "
                          f"{', '.join(map(str, _divisors(slots)))}; or --redundant-experts {fix} for {flag}")
    if nodes < 1 or ranks % nodes:
        raise ConfigError(f"--nodes {nodes} must divide the {ranks} ranks (equal ranks per node); valid: "
                          f"{', '.join(map(str, _divisors(ranks)))}")
    if policy == "tuner" and not has_trace:
        raise ConfigError("--policy tuner needs a routing trace: --routing FILE.npz (from --record-routing) "
                          "or a synthetic trace")
    if policy == "tuner" and num_experts % ranks:
        raise ConfigError(f"--policy tuner places E/ranks experts per rank before adding replicas: the "
                          f"{num_experts} experts must divide over the {ranks} ranks; valid ranks for tuner: "
                          f"{', '.join(str(d) for d in _divisors(num_experts))} (or use --policy eplb)")
    if time_limit_s <= 0:
        raise ConfigError(f"--time-limit must be > 0 seconds, got {time_limit_s}")
    if groups is not None and (groups < 1 or num_experts % groups or groups % nodes):
        valid = [g for g in _divisors(num_experts) if g % nodes == 0]
        raise ConfigError(f"--groups {groups} must divide the {num_experts} experts into equal groups and be a "
                          f"multiple of --nodes {nodes}; valid: {', '.join(map(str, valid)) or 'none'}")


def compute(policy: str, trace: RoutingTrace | None, num_experts: int, moe_layers, ranks: int, nodes: int = 1,
            redundant: int = 0, time_limit_s: float = 10.0, source: str = "routing trace",
            groups: int | None = None, ranks_flag: str | None = None) -> Placement:
    """One placement for every MoE layer. ``round-robin`` / ``linear`` need no trace; ``eplb``
    without a trace uses uniform loads; ``tuner`` needs one. Validates first (ConfigError)."""
    moe_layers = tuple(int(x) for x in moe_layers)
    validate(policy, num_experts, moe_layers, ranks, nodes, redundant, trace is not None, time_limit_s, groups,
             ranks_flag)
    if trace is not None:
        trace.check_for(num_experts, moe_layers, source)
    start = time.monotonic()
    note = ""
    if policy == "round-robin":
        layers = {layer: round_robin(num_experts, ranks, redundant) for layer in moe_layers}
    elif policy == "linear":
        layers = {layer: linear(num_experts, ranks, redundant) for layer in moe_layers}
    elif policy == "eplb":
        loads = trace.loads if trace is not None else np.ones((len(moe_layers), num_experts))
        layers = {layer: eplb(loads[i], ranks, redundant, nodes, groups) for i, layer in enumerate(moe_layers)}
        if trace is None:
            note = "eplb: no routing trace, uniform loads assumed"
    else:
        layers, note = tuner(trace, ranks, time_limit_s, redundant=redundant)
    seconds = time.monotonic() - start
    for layer, slots in layers.items():
        problem = slot_problem(slots, num_experts, ranks)
        assert not problem, f"{policy} produced a bad placement for layer {layer}: {problem}"
    return Placement(policy=policy, ranks=ranks, nodes=nodes, num_experts=num_experts, layers=layers, note=note,
                     solver_seconds=seconds)
