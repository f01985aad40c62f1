"""Fit the efficiency factors on the fitting split of the published measurements, and validate the
model on the rest.

Fitting runs in stages, each on rows of its own (all from the fitting sources of
:data:`distgen.planner.published.FIT_SOURCES`) and each using what earlier stages fitted:

==================  =====================================================  =====================================
stage               factors                                                rows
==================  =====================================================  =====================================
collective-nccl     alpha/eta.nvlink.nccl                                  Megatron-LM PR #5596, NCCL ring
collective-custom   alpha/eta.nvlink.custom                                SGLang PR #2904 (custom all-reduce),
                                                                           Megatron-LM PR #5596 (symmetric memory)
network             alpha/eta.network.nccl                                 DeepEP V1 low-latency kernels
llm-decode          mem, layer.llm                                         gpt-fast README tensor-parallel table
image-unet          compute.unet, op.unet, overlap                         DistriFusion teaser + quality charts
image-dit-compute   compute.dit, op.dit, hw.l40                            xDiT PixArt charts: 1 GPU and cfg=2 rows
image-dit-parallel  alpha/eta.pcie.nccl, eta.pcie.a2a, ring.step,          xDiT PixArt charts: the other rows
                    pipefusion.patch
llm-prefill         compute.llm, hw.t4, hw.a30                             vLLM PR #2192
==================  =====================================================  =====================================

Each stage minimises the squared log error of its rows (coordinate descent, golden-section search in
log space within physical bounds). Validation rows are never looked at while fitting.
"""

from __future__ import annotations

import math
import pprint
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from distgen.planner.factors import PRIORS, Factors
from distgen.planner.published import FIT_SOURCES, REPORT_DOMAINS, Case, load_cases

Select = Callable[[Case], bool]


def _src(*keys: str) -> Select:
    return lambda c: any(k in c.source for k in keys)


@dataclass(frozen=True)
class Stage:
    name: str
    params: tuple[tuple[str, float, float], ...]  # (factor, low, high)
    select: Select

    def rows(self, cases: list[Case]) -> list[Case]:
        return [c for c in cases if c.split == "fit" and c.predict is not None and self.select(c)]


def _impl(impl: str) -> Select:
    return lambda c: f" {impl} " in f" {c.config} "


STAGES: tuple[Stage, ...] = (
    Stage("collective-nccl", (("alpha.nvlink.nccl", 1e-6, 2e-4), ("eta.nvlink.nccl", 0.05, 1.0)),
          lambda c: c.domain == "collective" and _impl("nccl")(c)),
    Stage("collective-custom", (("alpha.nvlink.custom", 1e-6, 2e-4), ("eta.nvlink.custom", 0.05, 1.0)),
          lambda c: c.domain == "collective" and _impl("custom")(c)),
    Stage("network", (("alpha.network.nccl", 1e-6, 5e-4), ("eta.network.nccl", 0.05, 2.0)),
          lambda c: c.domain == "moe" and "DeepEP" in c.source),
    Stage("llm-decode", (("mem", 0.1, 1.0), ("layer.llm", 1e-7, 1e-3)), _src("gpt-fast README 'Tensor Parallelism'")),
    Stage("image-unet", (("compute.unet", 0.05, 1.0), ("op.unet", 1e-7, 5e-4)), lambda c: c.domain == "image-unet"),
    Stage("image-dit-compute", (("compute.dit", 0.05, 1.0), ("hw.l40", 0.2, 5.0)),
          lambda c: c.domain == "image-dit" and _single_or_cfg(c)),
    Stage("image-dit-parallel", (("op.dit", 1e-7, 5e-4), ("alpha.pcie.nccl", 1e-6, 5e-3), ("eta.pcie.nccl", 0.02, 1.0),
                                 ("eta.pcie.a2a", 0.002, 1.0), ("overlap", 0.05, 1.0), ("ring.step", 1e-7, 5e-3),
                                 ("pipefusion.patch", 1e-7, 5e-3)),
          lambda c: c.domain == "image-dit" and not _single_or_cfg(c)),
    Stage("llm-prefill", (("compute.llm", 0.05, 1.0), ("hw.t4", 0.1, 5.0), ("hw.a30", 0.1, 5.0)),
          _src("vllm-project/vllm PR #2192")),
)


def _single_or_cfg(c: Case) -> bool:
    return c.config in ("1 rank", "cfg=2")


# ---------------------------------------------------------------------------- objective, search
PENALTY = math.log(10.0) ** 2  # a measured row predicted infeasible


def loss(rows: list[Case], factors: Factors) -> float:
    total = 0.0
    n = 0
    for c in rows:
        if c.measured is None:
            continue
        p = c.predict(factors)
        total += PENALTY if p is None or p <= 0 else math.log(p / c.measured) ** 2
        n += 1
    return total / max(1, n)


def _golden(fn: Callable[[float], float], lo: float, hi: float, iters: int = 28) -> float:
    """Minimise fn over [lo, hi] in log space."""
    a, b = math.log(lo), math.log(hi)
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = fn(math.exp(c)), fn(math.exp(d))
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = fn(math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = fn(math.exp(d))
    return math.exp((a + b) / 2)


def fit_stage(stage: Stage, cases: list[Case], factors: Factors, sweeps: int = 6) -> tuple[Factors, float]:
    rows = stage.rows(cases)
    if not rows:
        return factors, float("nan")
    current = factors.copy()
    best = loss(rows, current)
    for _ in range(sweeps):
        before = best
        for key, lo, hi in stage.params:
            def trial(v: float, key=key) -> float:
                current.values[key] = v
                return loss(rows, current)

            old = current[key]
            value = _golden(trial, lo, hi)
            current.values[key] = value
            new = loss(rows, current)
            if new > best:  # the search may end worse than where it started: keep the old value
                current.values[key] = old
            else:
                best = new
        if before - best < 1e-7:
            break
    unidentified = []
    for key, lo, hi in stage.params:
        if not identified(rows, current, key, lo, hi, best):
            current.values[key] = PRIORS.get(key, 1.0)
            unidentified.append(key)
            continue
        current.fitted_on[key] = sorted({c.source for c in rows})
    if unidentified:
        best = loss(rows, current)
    current.unidentified = getattr(factors, "unidentified", []) + unidentified
    return current, best


def identified(rows: list[Case], factors: Factors, key: str, lo: float, hi: float, best: float) -> bool:
    """Whether the rows constrain a factor: halving or doubling it (within its bounds) moves the loss by
    more than 2 % (and more than 1e-4). A factor they do not constrain keeps its prior."""
    value = factors[key]
    worst = 0.0
    for v in (max(lo, value / 2), min(hi, value * 2)):
        trial = factors.copy()
        trial.values[key] = v
        worst = max(worst, loss(rows, trial) - best)
    return worst > max(0.02 * best, 1e-4)


def fit(cases: list[Case] | None = None) -> tuple[Factors, list[dict]]:
    cases = cases if cases is not None else load_cases()
    factors = Factors()
    log = []
    for stage in STAGES:
        factors, value = fit_stage(stage, cases, factors)
        rows = stage.rows(cases)
        log.append({"stage": stage.name, "rows": len(rows), "rms_log_error": round(math.sqrt(value), 4)
                    if value == value else None,
                    "factors": {k: _round(factors[k]) for k, _, _ in stage.params if k in factors.fitted_on},
                    "not_identified": [k for k, _, _ in stage.params if k not in factors.fitted_on]})
    return factors, log


def _round(v: float) -> float:
    return float(f"{v:.4g}")


# ---------------------------------------------------------------------------- validation report
def _ape(pred: float, meas: float) -> float:
    return abs(pred - meas) / meas * 100


def _tables(cases: list[Case], factors: Factors) -> list[dict]:
    groups: dict[str, list[Case]] = {}
    for c in cases:
        if c.table and c.predict is not None and c.split != "skip":
            groups.setdefault(c.table, []).append(c)
    out = []
    for key, members in groups.items():
        configs = {c.config for c in members}
        if len(configs) < 2:
            continue
        better = (lambda a, b: a > b) if members[0].higher_is_better else (lambda a, b: a < b)
        measured = [c for c in members if c.measured is not None]
        if not measured:
            continue
        best = measured[0]
        for c in measured[1:]:
            if better(c.measured, best.measured):
                best = c
        predicted = [(c, c.predict(factors)) for c in members]
        feasible = [(c, p) for c, p in predicted if p is not None]
        if not feasible:
            continue
        pick, _ = feasible[0]
        pick_value = feasible[0][1]
        for c, p in feasible[1:]:
            if better(p, pick_value):
                pick, pick_value = c, p
        if pick.measured is None:
            hit, gap = False, None
        else:
            gap = abs(pick.measured - best.measured) / best.measured * 100
            hit = pick is best or gap <= 10.0
        out.append({"table": key, "domain": members[0].domain, "split": members[0].split, "rows": len(members),
                    "published_best": best.config, "predicted_best": pick.config, "hit": hit,
                    "gap_pct": None if gap is None else round(gap, 1)})
    return out


def evaluate(cases: list[Case], factors: Factors) -> dict:
    per_domain: dict[str, dict] = {}
    rows_out = []
    for c in cases:
        if c.split == "skip" or c.predict is None:
            continue
        p = c.predict(factors)
        entry = {"line": c.line, "domain": c.domain, "split": c.split, "config": c.config,
                 "workload": c.row["workload"], "hardware": c.row["hardware"], "n_gpus": c.row["n_gpus"],
                 "measured": c.measured if c.measured is not None else "OOM",
                 "predicted": None if p is None else float(f"{p:.4g}"), "unit": c.row["unit"]}
        if c.measured is not None and p is not None:
            entry["ape_pct"] = round(_ape(p, c.measured), 1)
        rows_out.append(entry)
    tables = _tables(cases, factors)
    for domain in REPORT_DOMAINS:
        out = {}
        for split in ("validate", "fit"):
            mine = [r for r in rows_out if r["domain"] == domain and r["split"] == split]
            apes = [r["ape_pct"] for r in mine if "ape_pct" in r]
            ooms = [r for r in mine if r["measured"] == "OOM"]
            infeasible = [r for r in mine if r["measured"] != "OOM" and r["predicted"] is None]
            t = [x for x in tables if x["domain"] == domain and x["split"] == split]
            out[split] = {
                "rows": len(mine), "median_ape_pct": round(statistics.median(apes), 1) if apes else None,
                "within_20pct": f"{sum(a <= 20 for a in apes)}/{len(apes)}",
                "published_oom_predicted_infeasible": f"{sum(r['predicted'] is None for r in ooms)}/{len(ooms)}",
                "measured_rows_predicted_infeasible": len(infeasible),
                "tables": len(t), "best_config_hits": sum(x["hit"] for x in t),
                "best_config_hit_rate": round(sum(x["hit"] for x in t) / len(t), 2) if t else None,
            }
        out["sources"] = {split: sorted({c.source for c in cases if c.domain == domain and c.split == split})
                          for split in ("fit", "validate")}
        per_domain[domain] = out
    skipped: dict[str, int] = {}
    for c in cases:
        if c.split == "skip":
            skipped[c.reason] = skipped.get(c.reason, 0) + 1
    val = [r["ape_pct"] for r in rows_out if r["split"] == "validate" and "ape_pct" in r]
    vt = [x for x in tables if x["split"] == "validate"]
    return {
        "validation": {"rows": len(val), "median_ape_pct": round(statistics.median(val), 1) if val else None,
                       "tables": len(vt), "best_config_hit_rate": round(sum(x["hit"] for x in vt) / len(vt), 2)
                       if vt else None},
        "domains": per_domain,
        "tables": tables,
        "skipped": skipped,
        "fit_sources": FIT_SOURCES,
        "factors": {k: _round(factors[k]) for k in sorted(factors.values)},
        "fitted_on": factors.fitted_on,
        "not_fitted": sorted(k for k in PRIORS if k not in factors.fitted_on),
        "hardware_without_fitted_factor": sorted({h for h in (_hw(c) for c in cases if c.split == "validate")
                                                  if h and f"hw.{h}" not in factors.fitted_on and h != "a100-80gb"}),
        "rows": rows_out,
    }


def _hw(c: Case) -> str | None:
    from distgen.planner.published import _hardware

    return _hardware(c.row["hardware"])


# ---------------------------------------------------------------------------- fitted.py
FITTED_PATH = Path(__file__).with_name("fitted.py")


def render_fitted(factors: Factors, log: list[dict]) -> str:
    values = {k: _round(factors[k]) for k in sorted(factors.fitted_on)}
    body = {"values": values, "fitted_on": {k: factors.fitted_on[k] for k in sorted(factors.fitted_on)},
            "stages": log}
    return ('"""Efficiency factors fitted on the fitting split of the published measurements.\n\n'
            "Generated by ``distgen plan --fit`` (distgen.planner.fit); do not edit by hand: rerun it.\n"
            '"""\n\n# fmt: off\nFITTED = ' + pprint.pformat(body, width=116, sort_dicts=False) + "\n")


def write_fitted(factors: Factors, log: list[dict], path: Path = FITTED_PATH) -> Path:
    path.write_text(render_fitted(factors, log))
    return path
