"""Turning user options into validated jobs, one module per workload (image, text, video).

The CLI, the benchmarks and the HTTP server all prepare their work here, so every entry point
checks the same things with the same messages, before any worker starts.
"""

from __future__ import annotations

import os
import sys

from distgen.config import ConfigError, ParallelConfig


def resolve_nproc(args, parallel: ParallelConfig) -> int:
    """--nproc, else torchrun's WORLD_SIZE, else the product of the --parallel degrees."""
    from distgen.launch.local import in_torchrun

    if getattr(args, "nproc", None) is not None:
        nproc = args.nproc
    elif in_torchrun():
        nproc = int(os.environ["WORLD_SIZE"])
    else:
        nproc = parallel.world_size
    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}")
    note = cores_note(nproc, getattr(args, "launcher", "auto"), getattr(args, "threads_per_rank", None))
    if note and note not in _NOTED:  # once per process (a benchmark prepares several jobs)
        _NOTED.add(note)
        print(f"distgen: note: {note}", file=sys.stderr)
    return nproc


_NOTED: set[str] = set()


def cores_note(nproc: int, launcher: str, threads_per_rank: int | None = None) -> str | None:
    """Why a local launch of ``nproc`` CPU ranks will be slower than one rank, when it starts more
    ranks (or ranks x threads) than this machine has cores; None when it does not."""
    from distgen.launch.local import in_torchrun

    if nproc < 2 or launcher not in ("auto", "spawn") or in_torchrun():
        return None
    import torch

    if torch.cuda.is_available():  # one GPU per rank: the cores only feed the GPUs
        return None
    cores = os.cpu_count() or 1
    threads = threads_per_rank or max(1, cores // nproc)  # what each rank sets (distgen.runtime.dist)
    if nproc * threads <= cores:
        return None
    why = ("the ranks take turns on the cores, and every collective waits for the slowest rank, which waits for a "
           "core, so expect this run to be slower than one rank; it shows the layout works, not its speed")
    if nproc > cores:
        return f"{nproc} ranks on {cores} CPU cores: {why} (for speed here: at most {cores} ranks)"
    return (f"{nproc} ranks x {threads} threads = {nproc * threads} threads on {cores} CPU cores: {why} (for speed "
            f"here: --threads-per-rank {max(1, cores // nproc)})")


def detect_hardware() -> str:
    """The planner's name for this machine's accelerator (``DISTGEN_PLAN_HARDWARE`` overrides)."""
    chosen = os.environ.get("DISTGEN_PLAN_HARDWARE")
    if chosen:
        return chosen
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    from distgen.planner.hardware import ACCELERATORS

    name = torch.cuda.get_device_name(0).lower().replace(" ", "")
    memory_gb = torch.cuda.get_device_properties(0).total_memory / 2**30
    for key in sorted(ACCELERATORS, key=len, reverse=True):  # longest first: h100-pcie before h100
        base = key.split("-")[0]
        if base != "cpu" and base in name and ("pcie" in key) == ("pcie" in name):
            if base == "a100":
                return "a100-80gb" if memory_gb > 60 else "a100-40gb"
            return key
    raise ConfigError(f"--parallel auto: the planner has no entry for {torch.cuda.get_device_name(0)!r}; set "
                      f"DISTGEN_PLAN_HARDWARE to the closest of: {', '.join(ACCELERATORS)}")


def resolve_auto_parallel(args, workload: str, model: str, **request) -> None:
    """``--parallel auto``: the planner's best feasible plan for these ranks, written into ``args``
    (``parallel`` and the mode options it comes with), and printed with its predicted figures.
    Baseline modes (naive patches / clips, which drop the exchange and its fidelity) are not picked."""
    if getattr(args, "parallel", "") != "auto":
        return
    from distgen.launch.local import in_torchrun
    from distgen.planner import Request, plan

    nproc = getattr(args, "nproc", None)
    if nproc is None:
        if in_torchrun():
            nproc = int(os.environ["WORLD_SIZE"])
        else:
            import torch

            nproc = torch.cuda.device_count() if torch.cuda.is_available() else (os.cpu_count() or 1)
    hardware = detect_hardware()
    try:
        result = plan(model, None, nproc, hardware, None, Request(workload=workload, **request))
    except ConfigError as exc:
        raise ConfigError(f"--parallel auto: {exc}") from None
    candidates = [p for p in result["plans"] if p["feasible"] and p["in_runtime"]
                  and "naive" not in p["options"].values()]
    if not candidates:
        reasons = sorted({p["reason"] for p in result["plans"] if p["reason"]})[:3]
        raise ConfigError(f"--parallel auto: no feasible plan for {model} on {nproc} rank(s) of {hardware}"
                          + (f" ({'; '.join(reasons)})" if reasons else ""))
    best = candidates[0]
    args.parallel = best["parallel"] if best["parallel"] != "none" else ""
    if getattr(args, "nproc", None) is None and not in_torchrun():
        args.nproc = nproc
    applied = []
    for flag, value in best["options"].items():
        name = flag.lstrip("-").replace("-", "_")
        if not hasattr(args, name):
            continue
        current = getattr(args, name)
        if value == "all" and name == "ladder_layers":
            value = result["model"]["layers"]
        elif isinstance(current, bool):
            value = value in (True, "true", "1", "on")
        elif isinstance(current, float):
            value = float(value)
        elif isinstance(current, int) or name.endswith(("_layers", "_steps", "_frames")):
            value = int(value)
        setattr(args, name, value)
        applied.append(f"{flag} {value}")
    figures = [f"{best['predicted_latency_s']:.3g} s predicted"]
    if best.get("step_s"):
        figures.append(f"{best['step_s'] * 1000:.3g} ms per step")
    if best.get("decode_step_s"):
        figures.append(f"{best['decode_step_s'] * 1000:.3g} ms per decoding step")
    runner_up = candidates[1]["parallel"] + "".join(f" {k} {v}" for k, v in candidates[1]["options"].items()) \
        if len(candidates) > 1 else None
    print(f"distgen: --parallel auto on {nproc} rank(s) of {hardware}: {args.parallel or 'one rank'}"
          + (f" ({', '.join(applied)})" if applied else "") + f", {', '.join(figures)}"
          + (f"; next best: {runner_up}" if runner_up else "") + " (distgen plan shows every plan)", file=sys.stderr)
