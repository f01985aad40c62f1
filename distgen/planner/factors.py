"""Efficiency factors: what real programs reach of the spec sheets' peaks.

Every factor has a *prior* here, used only as the starting point of a fit and, where no published
row constrains a factor, as its value (the report of ``distgen plan --validate`` lists those as
not fitted). The fitted values are in :mod:`distgen.planner.fitted`, written by
``distgen plan --fit`` from the fitting split of the published measurements
(:mod:`distgen.planner.fit` says which sources fit which factor).

Keys:

- ``compute.<family>``: fraction of the dense tensor peak a family's kernels reach (unet: convs
  and attention of a UNet, also used for VAE decoders; dit: transformer denoisers; llm: prefill).
- ``hw.<accelerator>``: a per-accelerator multiplier of the compute fraction, fitted only where the
  fitting rows include that accelerator (1 elsewhere: the spec sheet's ratio is all we know).
- ``op.<family>``: fixed seconds per op (a kernel group: launch, tails, elementwise satellites).
- ``mem``: fraction of memory bandwidth a decode step reaches; ``layer.llm``: fixed seconds per
  decoder layer per decode step.
- ``alpha.<link kind>.<impl>`` / ``eta.<link kind>.<impl>``: a collective's fixed cost per call and
  the fraction of the link's line rate it reaches; impl ``nccl`` (ring algorithms) or ``custom``
  (one-shot / two-shot all-reduce through peer memory: vLLM / SGLang custom all-reduce, PyTorch's
  intra-node symmetric memory); ``eta.<kind>.a2a``: all-to-all traffic, where every rank sends to
  every other at once (on PCIe it crosses the host bridges together; defaults to the ring value).
- ``overlap``: the share of an asynchronous exchange hidden per unit of the compute it runs behind
  (1: fully, if the compute is long enough).
- ``ring.step``: fixed seconds per step of ring attention (a kernel pair and a merge).
- ``pipefusion.patch``: fixed seconds per patch and stage of PipeFusion.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PRIORS: dict[str, float] = {
    "compute.unet": 0.5, "compute.dit": 0.5, "compute.llm": 0.5,
    "op.unet": 10e-6, "op.dit": 10e-6,
    "mem": 0.7, "layer.llm": 5e-6,
    "alpha.nvlink.nccl": 20e-6, "eta.nvlink.nccl": 0.8,
    "alpha.nvlink.custom": 8e-6, "eta.nvlink.custom": 0.5,
    "alpha.pcie.nccl": 30e-6, "eta.pcie.nccl": 0.7, "eta.pcie.a2a": 0.7,
    "alpha.host.nccl": 40e-6, "eta.host.nccl": 0.6,
    "alpha.network.nccl": 30e-6, "eta.network.nccl": 0.8,
    # CPU ranks on one host, measured on this machine (ALGORITHMS.md §10): gloo ~1 ms per call, 0.75 GB/s;
    # the shared-memory transport is an estimate until `--calibrate` measures it.
    "alpha.loopback.nccl": 1.0e-3, "eta.loopback.nccl": 1.0,
    "alpha.shm.nccl": 50e-6, "eta.shm.nccl": 0.5,
    "overlap": 0.8, "ring.step": 30e-6, "pipefusion.patch": 30e-6,
}


@dataclass
class Factors:
    values: dict[str, float] = field(default_factory=lambda: dict(PRIORS))
    fitted_on: dict[str, list[str]] = field(default_factory=dict)  # factor -> the sources that fitted it
    unidentified: list[str] = field(default_factory=list)  # factors the fitting rows did not constrain

    def __getitem__(self, key: str) -> float:
        if key in self.values:
            return self.values[key]
        if key.startswith("hw."):
            return 1.0
        if key.startswith(("alpha.", "eta.")) and key.endswith((".custom", ".a2a")):
            return self[key.rsplit(".", 1)[0] + ".nccl"]
        return PRIORS[key]

    def alpha(self, kind: str, impl: str = "nccl") -> float:
        return self[f"alpha.{kind}.{impl}"]

    def eta(self, kind: str, impl: str = "nccl") -> float:
        return self[f"eta.{kind}.{impl}"]

    def with_values(self, **changes: float) -> "Factors":
        values = dict(self.values)
        values.update({k.replace("__", "."): v for k, v in changes.items()})
        return Factors(values, dict(self.fitted_on))

    def copy(self) -> "Factors":
        return Factors(dict(self.values), {k: list(v) for k, v in self.fitted_on.items()}, list(self.unidentified))


def load() -> Factors:
    """The priors, overridden by the fitted values written by ``distgen plan --fit``."""
    try:
        from distgen.planner.fitted import FITTED
    except ImportError:  # not fitted yet
        return Factors()
    values = dict(PRIORS)
    values.update(FITTED["values"])
    return Factors(values, {k: list(v) for k, v in FITTED["fitted_on"].items()})
