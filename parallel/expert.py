"""Expert parallelism over an ``ep`` axis (ALGORITHMS.md §8).

:func:`apply` replaces every :class:`~distgen.models.moe.MoEBlock` of a meta-device model by an
:class:`ExpertParallelBlock` holding only this rank's physical expert slots (their weight
sources point at those experts, so a rank reads only them from the checkpoint). A placement
is, per MoE layer, ``slots[rank] = [logical expert per slot]``: every rank the same number of
slots, every expert at least once, heavy experts possibly on several ranks (replicas).

The ep group spans the ``tp`` ranks and ``ep / tp`` replicas of them (``expert_group``):
attention stays tensor-parallel (or replicated), so every rank of the group holds the same
token rows when the MoE block starts. Per MoE layer:

1. the router (replicated) runs on all rows, so every rank knows every row's experts (and a
   routing recorder on any rank sees the whole batch);
2. each (row, choice) pair picks one replica of its expert: the pairs of an expert, in row
   order, take its replicas in turn, so a replicated expert's tokens are spread evenly;
3. each row has one dispatching rank (:class:`Dispatch`): even slices in the first MoE layer,
   afterwards the rank that served the row's first choice in the previous MoE layer, so
   rows whose consecutive experts share a rank (tuner placement) do not move; per-(rank,
   slot) counts need no message (every rank computes them for the whole group from the
   routing), the rows (grouped by destination rank and slot) go out by an uneven all-to-all;
4. each rank runs its slots on what it received, results return by the reverse all-to-all
   and are summed with their routing weights; the shared expert (Qwen2-MoE) runs on the
   dispatching rank;
5. every rank's combined rows go to every rank (an uneven all-to-all), so all hold the whole
   block output again.

A rank with no rows (decoding one sequence on two ranks) still takes part in every
collective with zero rows, so nobody hangs. :meth:`ExpertParallelBlock.migrate` moves to a
new placement between steps: every rank computes the same plan from the same loads, and the
expert weights a rank lacks arrive by point-to-point from the lowest rank that holds them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from distgen.comm import ExchangeEngine
from distgen.config import ConfigError
from distgen.models.moe import Expert, MoEBlock, set_block_sources

__all__ = ["ExpertParallelBlock", "apply", "blocks", "check_job", "check_layers", "expert_group", "moe_layers",
           "round_robin", "set_observer", "validate"]


def round_robin(num_experts: int, ep: int) -> list[list[int]]:
    """slots[rank]: expert e on rank e % ep (baseline placement, no replicas)."""
    return [[e for e in range(num_experts) if e % ep == rank] for rank in range(ep)]


def validate(num_slots: int, ep: int) -> None:
    if ep > 1 and num_slots % ep:
        raise ConfigError(f"--parallel ep={ep}: ep must divide the number of expert slots ({num_slots}); "
                          f"valid ep degrees: {', '.join(str(d) for d in range(1, num_slots + 1) if num_slots % d == 0)}")


def moe_layers(config) -> tuple[int, ...]:
    """Indices of the model's MoE layers (empty for a dense model)."""
    if config.moe is None:
        return ()
    return tuple(i for i, sparse in enumerate(config.moe.sparse_layers) if sparse)


def check_layers(layers: dict[int, list[list[int]]], num_experts: int, moe: tuple[int, ...], ranks: int,
                 source: str) -> None:
    """A placement fits this model and ep degree (ConfigError naming what differs)."""
    got = tuple(sorted(int(k) for k in layers))
    if got != tuple(moe):
        raise ConfigError(f"{source}: placement covers {len(got)} MoE layers {list(got)[:8]}..., the model has "
                          f"{len(moe)} MoE layers {list(moe)[:8]}...")
    for index, slots in layers.items():
        if len(slots) != ranks:
            raise ConfigError(f"{source}: layer {index} is placed on {len(slots)} ranks, but --parallel ep={ranks}")
        if len({len(s) for s in slots}) != 1 or not slots[0]:
            raise ConfigError(f"{source}: layer {index}: every rank needs the same number (>= 1) of expert slots, "
                              f"got {[len(s) for s in slots]}")
        held = {e for s in slots for e in s}
        if any(not 0 <= e < num_experts for e in held):
            raise ConfigError(f"{source}: layer {index} names experts outside 0..{num_experts - 1} "
                              f"(the model has {num_experts} experts per layer)")
        if len(held) != num_experts:
            missing = sorted(set(range(num_experts)) - held)
            raise ConfigError(f"{source}: layer {index} leaves experts {missing[:8]} without a slot "
                              f"(the model has {num_experts} experts per layer)")


def check_job(job, config) -> None:
    """The MoE parts of a text job against the model (before launch)."""
    ep, pp = job.parallel.degree("ep"), job.parallel.degree("pp")
    flags = [name for name, on in (("--parallel ep", ep > 1),
                                   ("--placement", job.placement is not None or bool(job.placements)),
                                   ("--redundant-experts", job.redundant_experts != 0),
                                   ("--rebalance-interval", job.rebalance_interval is not None),
                                   ("--record-routing", job.record_routing is not None)) if on]
    if config.moe is None:
        if flags:
            raise ConfigError(f"{flags[0]}: {job.model} is a dense model ({config.architecture}); expert parallelism, "
                              f"placement and routing records need an MoE checkpoint (Mixtral, Qwen2-MoE, Qwen3-MoE)")
        return
    experts = config.moe.num_experts
    if job.redundant_experts < 0:
        raise ConfigError(f"--redundant-experts must be >= 0, got {job.redundant_experts}")
    if ep > 1:
        from distgen.placement.policies import redundant_problem

        problem = redundant_problem(job.redundant_experts, experts, ep, f"--parallel ep={ep}")
        if problem:
            raise ConfigError(problem)
    slots = experts + job.redundant_experts
    if slots < ep:
        raise ConfigError(f"--redundant-experts {job.redundant_experts}: {experts} experts + {job.redundant_experts} "
                          f"spare slots leave a rank of ep={ep} without a slot; use at least {ep - experts}")
    validate(slots, ep)
    if job.redundant_experts and ep == 1:
        raise ConfigError("--redundant-experts: replicas need expert parallelism (--parallel ep=N with N > 1)")
    if job.nodes < 1 or ep % job.nodes:
        raise ConfigError(f"--nodes {job.nodes}: must divide the ep degree {ep}")
    if job.rebalance_interval is not None:
        if job.rebalance_interval < 1:
            raise ConfigError(f"--rebalance-interval must be a positive number of decoding steps, got {job.rebalance_interval}")
        if ep == 1:
            raise ConfigError("--rebalance-interval: online rebalancing needs expert parallelism (--parallel ep=N, N > 1)")
    if (job.rebalance_interval is not None or job.record_routing or job.placements) and pp > 1:
        raise ConfigError("--rebalance-interval / --record-routing: not with pipeline parallelism (pp=1 only)")
    if job.rebalance_window < 1:
        raise ConfigError(f"--rebalance-window must be >= 1, got {job.rebalance_window}")
    for name, layers in ((job.placement_policy, job.placement),) + tuple(job.placements):
        if layers is not None:
            check_layers(layers, experts, moe_layers(config), ep, f"placement {name}")


def expert_group(ctx, parallel) -> dist.ProcessGroup | None:
    """The ranks that share one expert pool: every dp x ep-replica x tp rank of this pipeline
    stage, ordered dp-major (so the ranks holding the same rows are consecutive)."""
    ep = parallel.degree("ep")
    if ep == 1:
        return None
    mesh = ctx.mesh
    names = tuple(mesh.mesh_dim_names)
    ranks = mesh.mesh
    if "pp" in names:
        ranks = ranks.movedim(names.index("pp"), 0)
    rows = ranks.reshape(parallel.degree("pp"), -1).tolist()
    if len(rows[0]) != ep:
        raise RuntimeError(f"expert group: {len(rows[0])} ranks per stage for ep={ep} (mesh {names})")
    mine = None
    for row in rows:  # every rank creates every group, in the same order
        group = dist.new_group(row)
        if dist.get_rank() in row:
            mine = group
    return mine


def _expert_vector(expert: Expert) -> torch.Tensor:
    return torch.cat([expert.gate_proj.weight.flatten(), expert.up_proj.weight.flatten(),
                      expert.down_proj.weight.flatten()])


def _expert_from_vector(vector: torch.Tensor, hidden: int, intermediate: int) -> Expert:
    expert = Expert(hidden, intermediate).to(device=vector.device, dtype=vector.dtype)
    n = hidden * intermediate
    with torch.no_grad():
        expert.gate_proj.weight.copy_(vector[:n].view(intermediate, hidden))
        expert.up_proj.weight.copy_(vector[n:2 * n].view(intermediate, hidden))
        expert.down_proj.weight.copy_(vector[2 * n:].view(hidden, intermediate))
    return expert


class Dispatch:
    """Which rank dispatches (and combines) each row, shared by the MoE blocks of one model.

    The first MoE layer of a forward pass slices the rows evenly; every later layer gives a
    row to the rank whose replica served its first choice in the previous MoE layer. Routing
    is known on every rank, so all agree without a message, and when consecutive layers'
    co-routed experts share a rank (the tuner placement) the row stays there: fewer rows
    cross ranks.
    """

    def __init__(self, first_layer: int, siblings: range):
        self.first_layer = first_layer
        # the ep-group ranks that hold the same rows as this one (all of them without dp)
        self.siblings = siblings
        self.owner: torch.Tensor | None = None

    def owners(self, layer: int, rows: int) -> torch.Tensor:
        first, count = self.siblings.start, len(self.siblings)
        sliced = first + (torch.arange(rows) * count) // max(rows, 1)  # even slices, lowest rank first
        if layer == self.first_layer or self.owner is None or self.owner.numel() != rows:
            return sliced
        keep = (self.owner >= first) & (self.owner < first + count)  # only a sibling holds the row
        return torch.where(keep, self.owner, sliced)


class ExpertParallelBlock(nn.Module):
    def __init__(self, block: MoEBlock, slots: list[list[int]], engine: ExchangeEngine,
                 dispatch: Dispatch | None = None):
        super().__init__()
        self.inner = MoEBlock(block.gate.in_features, block.spec, slot_experts=slots[engine.rank])
        self.inner.layer = block.layer
        self.engine = engine
        self.dispatch = dispatch or Dispatch(block.layer, range(engine.world))
        self.set_slots(slots)

    @property
    def spec(self):
        return self.inner.spec

    @property
    def layer(self) -> int:
        return self.inner.layer

    def set_slots(self, slots: list[list[int]]) -> None:
        world = self.engine.world
        if len(slots) != world or len({len(s) for s in slots}) != 1:
            raise ValueError(f"layer {self.layer}: a placement needs {world} ranks with equal slot counts, got {slots}")
        missing = set(range(self.spec.num_experts)) - {e for s in slots for e in s}
        if missing:
            raise ValueError(f"layer {self.layer}: experts {sorted(missing)} have no slot")
        self.slots = [list(s) for s in slots]
        self.slots_per_rank = len(slots[0])
        replicas: dict[int, list[tuple[int, int]]] = {}
        for rank, experts in enumerate(self.slots):
            for slot, e in enumerate(experts):
                replicas.setdefault(e, []).append((rank, slot))
        width = max(len(r) for r in replicas.values())
        table = torch.zeros(self.spec.num_experts, width, dtype=torch.long)
        for e, reps in replicas.items():
            for i, (rank, slot) in enumerate(reps):
                table[e, i] = rank * self.slots_per_rank + slot  # the replica's global slot
        self._replica_table = table
        self._replica_count = torch.tensor([len(replicas[e]) for e in range(self.spec.num_experts)])

    def _destinations(self, experts: torch.Tensor) -> torch.Tensor:
        """Global slot (rank * slots + slot) of each (row, choice) pair: replicas taken in turn."""
        flat = experts.reshape(-1).cpu()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.spec.num_experts)
        first = torch.cumsum(counts, 0) - counts
        position = torch.empty_like(flat)
        position[order] = torch.arange(flat.numel()) - first[flat[order]]
        pick = position % self._replica_count[flat]
        return self._replica_table[flat, pick].view(experts.shape).to(experts.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, experts = self.inner.routing(x)  # every row, the same on every rank
        engine, world, rank, per_rank = self.engine, self.engine.world, self.engine.rank, self.slots_per_rank
        rows = x.shape[0]
        owner = self.dispatch.owners(self.layer, rows)
        here = (owner == rank).nonzero().flatten().to(x.device)
        destinations = self._destinations(experts)
        self.dispatch.owner = (destinations[:, 0] // per_rank).cpu()  # next layer: where the first choice went
        destination = destinations[here].reshape(-1)
        k = experts.shape[1]
        token = torch.arange(here.numel(), device=x.device).repeat_interleave(k)
        order = torch.argsort(destination, stable=True)
        if len(self.dispatch.siblings) == world:
            # Every rank knows every row's owner and destination, so the counts need no exchange:
            # pairs[src, dst rank, dst slot] for the whole group, computed alike everywhere.
            source = owner.repeat_interleave(k)
            pairs = torch.bincount(source * world * per_rank + destinations.reshape(-1).cpu(),
                                   minlength=world * world * per_rank).view(world, world, per_rank)
            received = pairs[:, rank].to(x.device)  # (world, per_rank): rows each rank sends to my slots
            send_counts = pairs[rank].sum(1).tolist()
        else:  # dp: other ranks hold other rows, so each tells each how many it sends
            counts = torch.bincount(destination, minlength=world * per_rank).view(world, per_rank)
            received = engine.all_to_all(counts.contiguous())
            send_counts = counts.sum(1).tolist()
        recv_counts = received.sum(1).tolist()
        mine = x[here]
        got = engine.all_to_all(mine[token[order]], send_counts, recv_counts)
        got_slot = torch.arange(per_rank, device=x.device).repeat(world).repeat_interleave(received.flatten())
        out_rows = torch.empty_like(got)
        for slot in got_slot.unique().tolist():
            where = (got_slot == slot).nonzero().flatten()
            out_rows[where] = self.inner.experts[slot](got[where])
        back = engine.all_to_all(out_rows, recv_counts, send_counts)
        pair_weight = weights[here].reshape(-1)[order]
        out = torch.zeros_like(mine)
        out.index_add_(0, token[order], (back * pair_weight[:, None]).to(out.dtype))
        shared = self.inner.shared(mine)
        if shared is not None:
            out = out + shared
        return self._gather_rows(out, owner).reshape(shape)

    def _gather_rows(self, out: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        """Every sibling gets every row of theirs: each rank's rows to its siblings (uneven, no padding)."""
        world, siblings = self.engine.world, self.dispatch.siblings
        if world == 1:
            return out
        counts = torch.bincount(owner, minlength=world).tolist()
        sends = [out.shape[0] if peer in siblings else 0 for peer in range(world)]
        parts = self.engine.all_to_all(out.repeat(len(siblings), 1), sends, counts)
        full = out.new_empty((owner.numel(),) + out.shape[1:])
        full[owner.to(out.device).argsort(stable=True)] = parts  # parts: rank 0's rows, then rank 1's, ...
        return full

    @torch.no_grad()
    def migrate(self, slots: list[list[int]]) -> dict:
        """Move to a new placement: experts this rank lacks arrive by P2P from their lowest old holder.

        Every rank must call this with the same ``slots``. Returns what moved here.
        """
        engine, rank = self.engine, self.engine.rank
        old = self.slots
        holder: dict[int, int] = {}
        for r, experts in enumerate(old):
            for e in experts:
                holder.setdefault(e, r)
        local = {e: s for s, e in enumerate(old[rank])}
        hidden, inter = self.inner.gate.in_features, self.spec.expert_intermediate_size
        sends: dict[int, torch.Tensor] = {}
        recvs: dict[int, torch.Tensor] = {}
        incoming: dict[int, list[int]] = {}
        for peer in range(engine.world):
            if peer == rank:
                continue
            # experts the peer needs and lacks, that I send (sorted: both sides agree on the order)
            wanted = sorted({e for e in slots[peer] if e not in old[peer] and holder[e] == rank})
            if wanted:
                sends[peer] = torch.cat([_expert_vector(self.inner.experts[local[e]]) for e in wanted])
            mine = sorted({e for e in slots[rank] if e not in local and holder[e] == peer})
            if mine:
                incoming[peer] = mine
                ref = self.inner.gate.weight
                recvs[peer] = torch.empty(len(mine) * 3 * hidden * inter, dtype=ref.dtype, device=ref.device)
        if sends or recvs:
            engine.exchange(sends, recvs, tag=7).wait()
        arrived: dict[int, Expert] = {}
        size = 3 * hidden * inter
        for peer, experts in incoming.items():
            for i, e in enumerate(experts):
                arrived[e] = _expert_from_vector(recvs[peer][i * size:(i + 1) * size], hidden, inter)
        modules = []
        for e in slots[rank]:
            modules.append(self.inner.experts[local[e]] if e in local else arrived[e])
        self.inner.experts = nn.ModuleList(modules)
        self.inner.slot_experts = list(slots[rank])
        self.set_slots(slots)
        return {"received_experts": sum(len(v) for v in incoming.values()),
                "sent_experts": sum(t.numel() // size for t in sends.values()),
                "moved_experts_all_ranks": sum(len(set(new) - set(was)) for new, was in zip(slots, old))}


def blocks(model) -> list[ExpertParallelBlock | MoEBlock]:
    """This rank's MoE blocks (plain or expert-parallel), in layer order."""
    out = []
    for index in model.layer_indices:
        mlp = model.model.layers[str(index)].mlp
        if isinstance(mlp, (MoEBlock, ExpertParallelBlock)):
            out.append(mlp)
    return out


def set_observer(model, observer) -> None:
    """Call ``observer(layer, experts)`` with every MoE layer's routing (every row)."""
    for block in blocks(model):
        (block.inner if isinstance(block, ExpertParallelBlock) else block).observer = observer


def apply(model, engine: ExchangeEngine, placement: dict[int, list[list[int]]] | None = None,
          siblings: range | None = None) -> None:
    """Replace each MoE block of ``model`` (meta device) by this rank's expert slots.

    ``siblings``: the ep-group ranks holding the same rows as this one (default: all; with dp,
    the ranks of this rank's dp index)."""
    dispatch = None
    for index in model.layer_indices:
        layer = model.model.layers[str(index)]
        if not isinstance(layer.mlp, MoEBlock):
            continue
        slots = (placement or {}).get(index) or round_robin(layer.mlp.spec.num_experts, engine.world)
        validate(sum(len(s) for s in slots), engine.world)
        dispatch = dispatch or Dispatch(index, siblings or range(engine.world))  # first MoE layer: slices
        block = ExpertParallelBlock(layer.mlp, slots, engine, dispatch)
        layer.mlp = block.inner
        # sources for the inner block's slots, then re-prefix them under the wrapper
        set_block_sources(model, index)
        prefix = f"model.layers.{index}.mlp."
        for name in [n for n in model.weight_sources if n.startswith(prefix)]:
            model.weight_sources[prefix + "inner." + name[len(prefix):]] = model.weight_sources.pop(name)
        layer.mlp = block
