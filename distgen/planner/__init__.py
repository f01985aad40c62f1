"""``distgen plan``: pick the parallel plan from a cost model fitted on published measurements.

- :mod:`distgen.planner.models`: model descriptions from configs (ops, FLOPs, bytes, heads, tokens).
- :mod:`distgen.planner.hardware`: accelerators and links, peak numbers from the spec sheets.
- :mod:`distgen.planner.costs`: one cost model per strategy (compute per rank, bytes per link,
  hidden vs blocking, memory per GPU, feasibility).
- :mod:`distgen.planner.factors` / :mod:`distgen.planner.fitted`: the efficiency factors, fitted by
  :mod:`distgen.planner.fit` on the fitting split of :mod:`distgen.planner.published`.
- :mod:`distgen.planner.search`: every layout over N GPUs, ranked.

:func:`plan` is what the CLI calls; it returns the JSON object ``distgen plan --json`` prints.
"""

from __future__ import annotations

from dataclasses import dataclass

from distgen.config import ConfigError

JSON_VERSION = 1


@dataclass
class Request:
    """What to plan for. Image / video: size, steps (frames for video); text: batch, prompt, new tokens."""

    workload: str  # image | video | text
    height: int | None = None
    width: int | None = None
    steps: int = 20
    frames: int | None = None
    guidance: bool = True
    batch: int = 1
    prompt_len: int = 128
    gen_len: int = 128
    ladder_checkpoint: bool = False  # text: the checkpoint is ladder-trained (Ladder plans become feasible)
    exact_only: bool = False  # rank exact plans only


def _env(hardware: str, interconnect: str | None, nodes: int, inter_node: str | None, gpus: int):
    from distgen.planner import factors, hardware as hw_table
    from distgen.planner.costs import Env

    hw = hw_table.accelerator(hardware)
    if interconnect is None:
        interconnect = "nvlink" if hw.nvlink else "pcie"
    intra = hw_table.link(interconnect, hw)
    if nodes < 1:
        raise ConfigError(f"--nodes must be >= 1, got {nodes}")
    if gpus % nodes:
        raise ConfigError(f"--gpus {gpus}: not divisible by --nodes {nodes} (the same number of GPUs on every node)")
    inter = None
    if nodes > 1:
        if inter_node is None:
            raise ConfigError(f"--nodes {nodes}: give --inter-node (one of ib-ndr, ib-hdr, ethernet-100g, ...)")
        inter = hw_table.link(inter_node, hw, "--inter-node")
    return Env(hw, intra, factors.load(), inter, gpus // nodes if nodes > 1 else 0)


def describe(model: str | None, model_config: str | None, request: Request):
    """(kind, description) of --model / --model-config for the request."""
    from distgen.planner import models

    if (model is None) == (model_config is None):
        raise ConfigError("give one of --model DIR|NAME and --model-config FILE")
    option = "--model" if model is not None else "--model-config"
    path = model if model is not None else model_config
    preset_size = None
    if model is not None:
        import os

        if not os.path.exists(model):
            path, preset_size = _embedded(model, request.workload)
    kind, config, pipe = models.model_kind(path, option)
    if request.workload == "text" and kind != "llm":
        raise ConfigError(f"--workload text: {path} is a {config.get('_class_name')} denoiser, not an LLM")
    if request.workload in ("image", "video") and kind == "llm":
        raise ConfigError(f"--workload {request.workload}: {path} is an LLM ({config.get('architectures')}), "
                          "not a denoiser; use --workload text")
    if kind == "llm":
        return "llm", models.describe_llm(config, option)
    video = config.get("_class_name") in ("UNet3DConditionModel", "UNetMotionModel", "WanTransformer3DModel",
                                          "LatteTransformer3DModel")
    if request.workload == "image" and video:
        raise ConfigError(f"--workload image: {config['_class_name']} is a video denoiser; use --workload video")
    vae = pipe.vae if pipe else None
    scale = 2 ** (len((vae or {}).get("block_out_channels", (1, 1, 1, 1))) - 1)
    sample = config.get("sample_size") or 64
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    if isinstance(preset_size, int):  # an embedded model's own default size
        sample, scale = preset_size, 1
    elif isinstance(preset_size, tuple):
        sample, scale = preset_size[1], 1
    height = request.height or int(sample) * scale
    width = request.width or (preset_size[2] if isinstance(preset_size, tuple) and not request.height else height)
    default_frames = preset_size[0] if isinstance(preset_size, tuple) else int(config.get("video_length", 16) or 16)
    frames = (request.frames or default_frames) if video else 1
    desc = models.describe_denoiser(config, height, width, frames, vae, pipe.text_encoder_params if pipe else None,
                                    option=option)
    return "diffusion", desc


def _embedded(name: str, workload: str):
    """(directory, default size) of an embedded model (distgen.models.presets), trying the workloads in turn."""
    from distgen.models import presets

    order = [workload] if workload in presets.WORKLOADS else list(presets.WORKLOADS)
    for w in order:
        if name in presets.names(w):
            resolved = presets.resolve(w, name, name)
            return resolved.directory, resolved.size
    known = ", ".join(n for w in order for n in presets.names(w))
    raise ConfigError(f"--model {name}: does not exist, and is not the name of an embedded model; give a pipeline or "
                      f"checkpoint directory, --model-config FILE, or one of: {known}")


def _plan_json(p, gpus: int) -> dict:
    out = {
        "parallel": p.layout.parallel(),
        "options": p.layout.options(),
        "feasible": p.feasible,
        "reason": p.reason or None,
        "in_runtime": p.in_runtime,
        "exact": p.exact,
        "staleness": p.staleness or None,
        "predicted_latency_s": _num(p.latency_s) if p.feasible or p.latency_s != float("inf") else None,
        "step_s": _num(p.step_s) if p.step_s else None,
        "memory_per_gpu_gb": _num(p.memory_gb) if p.memory_gb else None,
        "memory_gb": {k: _num(v) for k, v in p.memory.items()},
        "bytes_per_step_per_link": {k: _num(v) for k, v in p.bytes_per_step.items()},
        "communication_hidden_share": _num(p.hidden_share),
        "compute_s_per_step": _num(p.compute_s) if p.compute_s else None,
        "exposed_communication_s_per_step": _num(p.exposed_s),
        "notes": p.notes,
    }
    if p.ttft_s is not None or p.decode_step_s is not None:
        out["ttft_s"] = _num(p.ttft_s) if p.ttft_s is not None else None
        out["decode_step_s"] = _num(p.decode_step_s) if p.decode_step_s is not None else None
    if not p.feasible:
        out["predicted_latency_s"] = None
    return out


def _num(v: float | None) -> float | None:
    return None if v is None else float(f"{v:.4g}")


def plan(model: str | None, model_config: str | None, gpus: int, hardware: str, interconnect: str | None,
         request: Request, nodes: int = 1, inter_node: str | None = None, unimplemented: bool = False) -> dict:
    from distgen.planner import search

    if gpus < 1:
        raise ConfigError(f"--gpus must be a positive number of GPUs, got {gpus}")
    for name in ("steps", "batch", "prompt_len", "gen_len"):
        if getattr(request, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(request, name)}")
    env = _env(hardware, interconnect, nodes, inter_node, gpus)
    if env.hw.name == "cpu" and gpus > 64:
        raise ConfigError(f"--gpus {gpus}: the cpu entry is one core per rank; this machine class has far fewer cores")
    kind, desc = describe(model, model_config, request)
    if kind == "llm":
        plans = search.plan_text(desc, gpus, env, request.batch, request.prompt_len, request.gen_len,
                                 request.ladder_checkpoint, request.exact_only)
        model_json = {"kind": "llm", "architecture": desc.architecture, "layers": desc.layers, "hidden": desc.hidden,
                      "heads": desc.heads, "kv_heads": desc.kv_heads, "params_b": _num(desc.params / 1e9),
                      "active_params_b": _num(desc.active_params / 1e9),
                      "experts": desc.moe.experts if desc.moe else None}
        workload = {"workload": "text", "batch": request.batch, "prompt_len": request.prompt_len,
                    "gen_len": request.gen_len}
    else:
        plans = search.plan_diffusion(desc, gpus, env, request.steps, request.guidance, unimplemented,
                                      request.exact_only)
        model_json = {"kind": "diffusion", "denoiser": desc.denoiser_class, "family": desc.family,
                      "params_b": _num(desc.params / 1e9), "heads": desc.heads, "latent": list(desc.latent),
                      "tokens_per_frame": desc.tokens, "tflops_per_step": _num(desc.flops / 1e12)}
        workload = {"workload": "video" if desc.is_video else "image", "height": desc.height, "width": desc.width,
                    "frames": desc.frames if desc.is_video else None, "steps": request.steps,
                    "guidance": request.guidance}
    return {
        "version": JSON_VERSION,
        "model": model_json,
        "hardware": env.hw.name, "interconnect": env.intra.name,
        "inter_node": env.inter.name if env.inter else None, "nodes": nodes, "gpus": gpus,
        "request": workload,
        "factors": "fitted on published measurements (distgen plan --validate shows the errors)"
        if env.factors.fitted_on else "priors (not fitted)",
        "plans": [_plan_json(p, gpus) for p in plans],
    }


def format_table(result: dict) -> str:
    """The human-readable table of ``distgen plan``."""
    r = result["request"]
    what = (f"{r['height']}x{r['width']}" + (f"x{r['frames']} frames" if r.get("frames") else "") +
            f", {r['steps']} steps") if r["workload"] != "text" else \
        f"batch {r['batch']}, prompt {r['prompt_len']}, {r['gen_len']} new tokens"
    m = result["model"]
    name = m.get("denoiser") or m.get("architecture")
    lines = [f"{name} ({m['params_b']} B params), {what}, {result['gpus']} x {result['hardware']} over "
             f"{result['interconnect']}" + (f", {result['nodes']} nodes over {result['inter_node']}"
                                           if result["nodes"] > 1 else "")]
    text = r["workload"] == "text"
    head = f"{'#':>3}  {'--parallel':<22} {'options':<40} {'latency s':>10} " + \
        (f"{'ttft s':>8} {'decode s':>9} " if text else f"{'step s':>8} ") + \
        f"{'GB/GPU':>7} {'MB/step':>9} {'hidden':>6}  note"
    lines.append(head)
    for i, p in enumerate(result["plans"], 1):
        opts = " ".join(f"{k} {v}".strip() for k, v in p["options"].items())
        mb = sum(p["bytes_per_step_per_link"].values()) / 1e6
        note = p["reason"] if not p["feasible"] else ("" if p["exact"] else "approximate") + \
            ("" if p["in_runtime"] else " (not in runtime)")
        lat = f"{p['predicted_latency_s']:.3g}" if p["predicted_latency_s"] is not None else "-"
        mem = f"{p['memory_per_gpu_gb']:.1f}" if p["memory_per_gpu_gb"] is not None else "-"
        mid = (f"{_fmt(p.get('ttft_s')):>8} {_fmt(p.get('decode_step_s')):>9} " if text else
               f"{_fmt(p.get('step_s')):>8} ")
        lines.append(f"{i:>3}  {(p['parallel'] or '(1 rank)'):<22} {opts:<40} {lat:>10} {mid}{mem:>7} {mb:>9.3g} "
                     f"{p['communication_hidden_share'] * 100:>5.0f}%  {note.strip()}")
    return "\n".join(lines)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3g}"
