"""Mixture-of-Experts members of the Llama family: Mixtral, Qwen2-MoE, Qwen3-MoE (issue 6).

The MoE sub-block replaces a decoder layer's ``mlp`` (:class:`MoEBlock`). Routing is computed
exactly as transformers 5 does it (softmax in fp32 over the router logits, ``torch.topk``
— same tie order —, then the family's normalisation):

* Mixtral: top-k weights always renormalised to sum 1, kept in fp32 when scaling outputs;
* Qwen2-MoE / Qwen3-MoE: renormalised only with ``norm_topk_prob``, cast back to the
  activation dtype; Qwen2-MoE adds a shared expert scaled by ``sigmoid(shared_expert_gate(x))``.

Experts live in *physical slots*: ``slot_experts[s]`` is the logical expert whose weights fill
local slot ``s`` (a plain model holds every expert once, slot e = expert e). Expert parallelism
(``distgen.parallel.expert``) rebuilds the block with only a rank's slots, and the weight
sources point each slot at its expert's checkpoint tensors, so a rank reads only those.

On disk (transformers 5.23 ``save_pretrained``) experts are per-expert tensors:
Mixtral ``model.layers.L.block_sparse_moe.experts.E.w1|w3|w2.weight`` (gate, up, down) and
Qwen ``model.layers.L.mlp.experts.E.gate_proj|up_proj|down_proj.weight``. A checkpoint with
the fused in-memory layout (``experts.gate_up_proj`` (E, 2I, H), ``experts.down_proj``
(E, H, I)) is read too: :func:`fused_source` maps a per-expert source to its slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

MOE_ARCHITECTURES = {
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}


@dataclass(frozen=True)
class MoESpec:
    num_experts: int
    top_k: int
    expert_intermediate_size: int
    norm_topk_prob: bool
    # "mixtral": always renormalise, fp32 weights; "qwen": optional renormalisation, cast back
    routing: str
    shared_intermediate_size: int = 0  # Qwen2-MoE shared expert (0: none)
    sparse_layers: tuple[bool, ...] = ()  # per layer: MoE (True) or dense MLP
    # checkpoint naming
    block_name: str = "mlp"  # Mixtral: "block_sparse_moe"
    proj_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")


def spec_from_hf(hf: dict, family: str, layers: int) -> MoESpec:
    if family == "mixtral":
        experts = int(hf.get("num_local_experts") or hf.get("num_experts"))
        return MoESpec(num_experts=experts, top_k=int(hf["num_experts_per_tok"]),
                       expert_intermediate_size=int(hf["intermediate_size"]), norm_topk_prob=True,
                       routing="mixtral", sparse_layers=(True,) * layers, block_name="block_sparse_moe",
                       proj_names=("w1", "w3", "w2"))
    experts = int(hf.get("num_experts") or hf.get("num_local_experts"))
    step = int(hf.get("decoder_sparse_step", 1) or 1)
    dense = set(hf.get("mlp_only_layers") or [])
    sparse = tuple(experts > 0 and i not in dense and (i + 1) % step == 0 for i in range(layers))
    shared = int(hf.get("shared_expert_intermediate_size", 0) or 0) if family == "qwen2_moe" else 0
    return MoESpec(num_experts=experts, top_k=int(hf["num_experts_per_tok"]),
                   expert_intermediate_size=int(hf["moe_intermediate_size"]),
                   norm_topk_prob=bool(hf.get("norm_topk_prob", False)), routing="qwen",
                   shared_intermediate_size=shared, sparse_layers=sparse)


def route(logits: torch.Tensor, spec: MoESpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, E) router logits -> (weights, experts), each (tokens, top_k), as transformers."""
    probs = F.softmax(logits.float(), dim=-1)
    weights, experts = torch.topk(probs, spec.top_k, dim=-1)
    if spec.routing == "mixtral" or spec.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if spec.routing == "qwen":
        weights = weights.to(logits.dtype)
    return weights, experts


class Expert(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEBlock(nn.Module):
    """Router + this module's expert slots (+ shared expert). On one rank: every expert."""

    def __init__(self, hidden: int, spec: MoESpec, slot_experts: list[int] | None = None):
        super().__init__()
        self.spec = spec
        self.slot_experts = list(range(spec.num_experts)) if slot_experts is None else list(slot_experts)
        self.gate = nn.Linear(hidden, spec.num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(hidden, spec.expert_intermediate_size) for _ in self.slot_experts)
        if spec.shared_intermediate_size:
            self.shared_expert = Expert(hidden, spec.shared_intermediate_size)
            self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)
        else:
            self.shared_expert = self.shared_expert_gate = None
        # set by a routing recorder (distgen.placement): called with (layer, experts (tokens, k))
        self.observer = None
        self.layer = -1

    def routing(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, experts = route(self.gate(x), self.spec)
        if self.observer is not None:
            self.observer(self.layer, experts)
        return weights, experts

    def local_experts(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                      slot_of: dict[int, int] | None = None) -> torch.Tensor:
        """Sum over (token, choice) pairs whose expert has a slot here, as transformers adds them
        (experts in ascending order, each scaled by its routing weight, index_add in fp32-or-dtype)."""
        out = torch.zeros_like(x)
        slot_of = slot_of if slot_of is not None else {e: s for s, e in enumerate(self.slot_experts)}
        for expert in sorted(set(experts.unique().tolist()) & set(slot_of)):
            token, choice = torch.where(experts == expert)
            y = self.experts[slot_of[expert]](x[token]) * weights[token, choice, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    def shared(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.shared_expert is None:
            return None
        return torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, experts = self.routing(x)
        out = self.local_experts(x, weights, experts)
        shared = self.shared(x)
        if shared is not None:
            out = out + shared
        return out.reshape(shape)


def expert_key(spec: MoESpec, layer: int, expert: int, proj: str) -> str:
    """Checkpoint key of one expert's projection (``proj`` in gate_proj / up_proj / down_proj)."""
    name = spec.proj_names[("gate_proj", "up_proj", "down_proj").index(proj)]
    return f"model.layers.{layer}.{spec.block_name}.experts.{expert}.{name}.weight"


def block_sources(spec: MoESpec, layer: int, block: MoEBlock, prefix: str) -> dict:
    """weight_sources entries for a block at parameter prefix ``prefix`` (``model.layers.L.mlp``)."""
    from distgen.models.llama import TensorSlice

    base = f"model.layers.{layer}.{spec.block_name}"
    sources = {f"{prefix}.gate.weight": TensorSlice(f"{base}.gate.weight")}
    for slot, expert in enumerate(block.slot_experts):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            sources[f"{prefix}.experts.{slot}.{proj}.weight"] = TensorSlice(expert_key(spec, layer, expert, proj))
    if block.shared_expert is not None:
        for proj in ("gate_proj", "up_proj", "down_proj"):
            sources[f"{prefix}.shared_expert.{proj}.weight"] = TensorSlice(f"{base}.shared_expert.{proj}.weight")
        sources[f"{prefix}.shared_expert_gate.weight"] = TensorSlice(f"{base}.shared_expert_gate.weight")
    return sources


def set_block_sources(model, index: int) -> None:
    """Point the sources of layer ``index``'s MoE block at the checkpoint's per-expert tensors."""
    prefix = f"model.layers.{index}.mlp"
    for name in [n for n in model.weight_sources if n.startswith(prefix + ".")]:
        del model.weight_sources[name]
    block = model.model.layers[str(index)].mlp
    model.weight_sources.update(block_sources(model.config.moe, index, block, prefix))


def fused_source(source, shapes: dict, intermediate: int):
    """A per-expert source rewritten onto a fused ``experts.gate_up_proj`` / ``experts.down_proj``
    tensor when the checkpoint has that layout instead (None: not an expert key / not fused).
    Returns (TensorSlice, squeeze) where the leading expert dimension of size 1 is dropped."""
    from distgen.models.llama import TensorSlice

    parts = source.key.split(".")
    if "experts" not in parts or not parts[-1] == "weight":
        return None
    i = parts.index("experts")
    if i + 3 >= len(parts) or not parts[i + 1].isdigit():
        return None
    expert, proj = int(parts[i + 1]), parts[i + 2]
    base = ".".join(parts[: i + 1])
    if proj in ("gate_proj", "w1", "up_proj", "w3"):
        key = f"{base}.gate_up_proj"
        if key not in shapes:
            return None
        start = 0 if proj in ("gate_proj", "w1") else intermediate
        return TensorSlice(key, ((expert, expert + 1), (start, start + intermediate)))
    if proj in ("down_proj", "w2"):
        key = f"{base}.down_proj"
        if key not in shapes:
            return None
        return TensorSlice(key, ((expert, expert + 1),))
    return None
