"""Every layout of a model over N GPUs, costed and ranked (feasible first, by predicted latency)."""

from __future__ import annotations

from dataclasses import dataclass, field

from distgen.config import ConfigError
from distgen.planner.costs import Env, Layout, PlanCost, diffusion_cost, text_cost
from distgen.planner.models import DiffusionDesc, LLMDesc

PATCH_MODES = ("displaced", "sync", "partial", "naive")
SP_MODES = ("ulysses", "ring")
CLIP_MODES = ("dual-scope", "exact", "naive")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def diffusion_layouts(desc: DiffusionDesc, gpus: int, unimplemented: bool = False) -> list[Layout]:
    out: list[Layout] = []
    for cfg in (1, 2):
        if gpus % cfg:
            continue
        rest = gpus // cfg
        if rest == 1:
            out.append(Layout(cfg=cfg))
            continue
        if not desc.is_video:
            out += [Layout(cfg=cfg, patch=rest, patch_mode=m) for m in PATCH_MODES]
        if desc.is_dit:
            out += [Layout(cfg=cfg, sp=rest, sp_mode=m) for m in SP_MODES]
        if desc.family in ("video-unet", "motion-unet"):
            for m in CLIP_MODES:
                out.append(Layout(cfg=cfg, clip=rest, clip_mode=m))
                if m != "naive":
                    out.append(Layout(cfg=cfg, clip=rest, clip_mode=m, stale_context=True))
        if unimplemented and desc.is_dit:
            out.append(Layout(cfg=cfg, pipefusion=rest))
            out.append(Layout(cfg=cfg, dit_tp=rest))
            out += [Layout(cfg=cfg, sp=rest, sp_mode="usp", ulysses=u) for u in _divisors(rest) if 1 < u < rest]
    return out


def text_layouts(desc: LLMDesc, gpus: int) -> list[Layout]:
    out: list[Layout] = []
    moe = desc.moe is not None
    for dp in _divisors(gpus):
        for pp in _divisors(gpus // dp):
            for tp in _divisors(gpus // dp // pp):
                extra = gpus // dp // pp // tp  # ranks left: only ep can add them (replicas of the experts)
                eps = [tp * dp * extra] if extra > 1 else ([1, tp * dp] if tp * dp > 1 else [1])
                if extra > 1 and not moe:
                    continue
                for ep in eps:
                    if ep > 1 and not moe:
                        continue
                    for ladder in ((False, True) if tp > 1 else (False,)):
                        out.append(Layout(dp=dp, pp=pp, tp=tp, ep=ep, ladder=ladder))
    return [lay for lay in out if lay.world == gpus]


@dataclass
class Ranked:
    plans: list[PlanCost]
    notes: list[str] = field(default_factory=list)


def rank(plans: list[PlanCost], exact_only: bool = False) -> list[PlanCost]:
    """Feasible plans first, fastest first; with ``exact_only`` approximate plans count as infeasible."""
    if exact_only:
        for p in plans:
            if p.feasible and not p.exact:
                p.feasible, p.reason = False, f"approximate ({p.staleness}); --exact asks for exact plans only"
    return sorted(plans, key=lambda p: (not p.feasible, p.latency_s if p.feasible else 0.0, p.layout.label()))


def _require_feasible(plans: list[PlanCost], gpus: int) -> None:
    if not any(p.feasible for p in plans):
        reasons = list(dict.fromkeys(p.reason for p in plans))
        raise ConfigError(f"--gpus {gpus}: no plan can run this model on {gpus} GPUs: " + "; ".join(reasons[:4]))


def plan_diffusion(desc: DiffusionDesc, gpus: int, env: Env, steps: int, guidance: bool = True,
                   unimplemented: bool = False, exact_only: bool = False) -> list[PlanCost]:
    plans = [diffusion_cost(desc, lay, env, steps, guidance) for lay in diffusion_layouts(desc, gpus, unimplemented)]
    _require_feasible(plans, gpus)
    return rank(plans, exact_only)


def plan_text(desc: LLMDesc, gpus: int, env: Env, batch: int, prompt: int, gen: int,
              ladder_checkpoint: bool = False, exact_only: bool = False) -> list[PlanCost]:
    plans = [text_cost(desc, lay, env, batch, prompt, gen, ladder_checkpoint) for lay in text_layouts(desc, gpus)]
    _require_feasible(plans, gpus)
    return rank(plans, exact_only)
