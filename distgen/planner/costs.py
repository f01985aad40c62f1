"""Strategy cost models: per step, what each rank computes, what it sends on which link, what of it
is hidden behind compute, and what it holds in memory.

One :class:`Layout` is one point of the plan space (degrees on the axes and the modes). For a
diffusion model, :func:`diffusion_cost` walks the denoiser's ops (:mod:`distgen.planner.models`)
and gives each its share on a rank under the layout (ALGORITHMS.md for what each strategy
does); for an LLM, :func:`text_cost` does the same per decoder layer for prefill and decode.

Time of a communication: ``calls x alpha + bytes sent / (line rate x eta)`` (alpha, eta: fitted
per link kind and implementation). It is *blocking* (waited where issued), *async* (waited at the
next step: hidden behind up to ``overlap`` x the step's compute) or *windowed* (each call hidden
behind one piece of compute: a ring-attention block, Ladder's next sub-block, a PipeFusion patch).

Compute: ``FLOPs / (peak x compute.<family> x hw.<accelerator>) + ops x op.<family>``; for LLM
decode the larger of that and ``bytes / (memory bandwidth x mem)``, plus ``layer.llm`` per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from distgen.planner.factors import Factors
from distgen.planner.hardware import PCIE_GPUS_PER_SOCKET, Accelerator, Link
from distgen.planner.models import DiffusionDesc, LLMDesc, Op

FRAMEWORK_RESERVE_GB = 1.0  # CUDA context and allocator slack per GPU (an assumption, not fitted)
GN_STAT_BYTES = 4  # GroupNorm statistics travel in fp32


@dataclass(frozen=True)
class Layout:
    """Degrees and modes of one plan. Diffusion: cfg x one of patch / sp / clip / pipefusion / dit_tp.
    Text: dp x pp x tp, with ep sharing the dp x tp ranks (ARCHITECTURE.md)."""

    cfg: int = 1
    patch: int = 1
    patch_mode: str = "displaced"
    pcpp_fraction: float = 0.3
    warmup_steps: int = 4
    sp: int = 1
    sp_mode: str = "ulysses"  # ulysses | ring | usp (ulysses x ring, xDiT's hybrid)
    ulysses: int = 0  # usp: the ulysses part of sp
    pipefusion: int = 1  # distgen.parallel.pipefusion (DiTs)
    pipefusion_patches: int = 0  # 0: as many patches as stages
    dit_tp: int = 1  # Megatron tensor parallelism of a DiT (xDiT's): not in distgen's runtime
    clip: int = 1
    clip_mode: str = "dual-scope"
    stale_context: bool = False
    local_frames: int = 8
    global_frames: int = 16
    tp: int = 1
    ladder: bool = False
    pp: int = 1
    micro_batches: int = 0  # 0: pp micro-batches when the batch allows
    ep: int = 1
    dp: int = 1
    impl: str = "nccl"  # the collectives' implementation (nccl | custom)
    no_comm: bool = False  # every tp collective skipped: the published "no-comm upper bound" (not a plan)

    @property
    def spatial(self) -> tuple[str, int]:
        for axis in ("patch", "sp", "clip", "pipefusion", "dit_tp"):
            if getattr(self, axis) > 1:
                return axis, getattr(self, axis)
        return "", 1

    @property
    def world(self) -> int:
        text = self.dp * self.pp * self.tp * (self.ep // (self.tp * self.dp) if self.ep > 1 and
                                              self.ep % (self.tp * self.dp) == 0 else 1)
        image = self.cfg * self.patch * self.sp * self.clip * self.pipefusion * self.dit_tp
        return text * image

    @property
    def in_runtime(self) -> bool:
        """Whether distgen's runtime can run this layout (DiT tensor parallelism, USP and PipeFusion x sp not yet)."""
        return self.dit_tp == 1 and self.sp_mode != "usp" and not (self.pipefusion > 1 and self.sp > 1)

    def parallel(self) -> str:
        """The string ``--parallel`` takes."""
        items = [("dp", self.dp), ("pp", self.pp), ("cfg", self.cfg), ("patch", self.patch), ("sp", self.sp),
                 ("clip", self.clip), ("pipefusion", self.pipefusion), ("tp", max(self.tp, self.dit_tp)),
                 ("ep", self.ep)]
        return ",".join(f"{a}={d}" for a, d in items if d > 1)

    def options(self) -> dict[str, str]:
        """The other flags of the command that runs this layout."""
        out: dict[str, str] = {}
        if self.patch > 1:
            out["--patch-mode"] = self.patch_mode
            if self.patch_mode == "partial":
                out["--pcpp-fraction"] = f"{self.pcpp_fraction:g}"
        if self.sp > 1:
            out["--sp-mode"] = self.sp_mode if self.sp_mode != "usp" else f"usp(ulysses={self.ulysses})"
        if self.pipefusion > 1 and self.pipefusion_patches:
            out["--pipefusion-patches"] = str(self.pipefusion_patches)
        if self.clip > 1:
            out["--clip-mode"] = self.clip_mode
            if self.stale_context:
                out["--stale-context"] = ""
        if self.ladder:
            out["--ladder-layers"] = "all"
        if self.pp > 1 and self.micro_batches:
            out["--micro-batches"] = str(self.micro_batches)
        return out

    def label(self) -> str:
        opts = " ".join(f"{k} {v}".strip() for k, v in self.options().items())
        return (self.parallel() or "1 rank") + (f" {opts}" if opts else "")


@dataclass
class Env:
    """The machine: accelerator, links inside a node and between nodes, fitted factors."""

    hw: Accelerator
    intra: Link
    factors: Factors
    inter: Link | None = None
    gpus_per_node: int = 0  # 0: every rank on one node

    @property
    def dtype_bytes(self) -> int:
        return self.hw.bytes_per_param

    def link(self, span: int) -> Link:
        """The link a group spanning ``span`` consecutive ranks crosses (its slowest)."""
        if self.inter is not None and self.gpus_per_node and span > self.gpus_per_node:
            return self.inter
        return self.intra


@dataclass
class Comm:
    what: str
    op: str  # all_gather | all_reduce | all_to_all | p2p
    sent_bytes: float  # per rank per step, all calls together
    calls: int
    link: Link
    mode: str  # blocking | async | window
    window_s: float = 0.0  # window: compute seconds each call can hide behind
    impl: str = "nccl"
    group: int = 2  # ranks in the collective

    def seconds(self, factors: Factors) -> float:
        if self.calls == 0 and self.sent_bytes == 0:
            return 0.0
        cross_socket = self.link.kind == "pcie" and self.group > PCIE_GPUS_PER_SOCKET
        eta_impl = "a2a" if self.op == "all_to_all" and cross_socket else self.impl
        return self.calls * factors.alpha(self.link.kind, self.impl) + \
            self.sent_bytes / (self.link.bw * factors.eta(self.link.kind, eta_impl))


@dataclass
class StepCost:
    compute_s: float
    comms: list[Comm]
    exposed_s: float = 0.0  # communication time the step waits for
    hidden_s: float = 0.0  # communication time hidden behind compute
    step_s: float = 0.0

    def bytes_per_link(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for c in self.comms:
            out[c.link.name] = out.get(c.link.name, 0.0) + c.sent_bytes
        return out


def settle(compute_s: float, comms: list[Comm], factors: Factors, fixed_s: float = 0.0) -> StepCost:
    """Blocking time adds up; async exchanges hide behind the step's compute (up to ``overlap`` of it);
    windowed ones behind their own window."""
    h = factors["overlap"]
    exposed = hidden = 0.0
    async_total = 0.0
    for c in comms:
        t = c.seconds(factors)
        if c.mode == "blocking":
            exposed += t
        elif c.mode == "window":
            per_call = t / max(1, c.calls)
            e = max(0.0, per_call - h * c.window_s) * max(1, c.calls)
            exposed += e
            hidden += t - e
        else:
            async_total += t
    async_hidden = min(async_total, h * compute_s)
    exposed += async_total - async_hidden
    hidden += async_hidden
    return StepCost(compute_s, comms, exposed, hidden, compute_s + exposed + fixed_s)


@dataclass
class PlanCost:
    layout: Layout
    feasible: bool
    reason: str = ""
    latency_s: float = math.inf  # end to end for the request
    step_s: float = 0.0  # steady-state denoiser call / decode step
    warmup_step_s: float = 0.0
    ttft_s: float | None = None
    decode_step_s: float | None = None
    memory_gb: float = 0.0
    memory: dict[str, float] = field(default_factory=dict)
    bytes_per_step: dict[str, float] = field(default_factory=dict)
    hidden_share: float = 0.0
    compute_s: float = 0.0
    exposed_s: float = 0.0
    exact: bool = True
    staleness: str = ""
    notes: list[str] = field(default_factory=list)
    in_runtime: bool = True  # distgen can run it today


def compute_seconds(flops: float, ops: float, family: str, env: Env) -> float:
    f = env.factors
    return flops / (env.hw.flops * f[f"compute.{family}"] * f[f"hw.{env.hw.name}"]) + ops * f[f"op.{family}"]


# ================================================================================= diffusion
def _family(desc: DiffusionDesc) -> str:
    return "dit" if desc.is_dit else "unet"


def diffusion_check(desc: DiffusionDesc, layout: Layout, guidance: bool) -> str:
    """Why a layout cannot run this denoiser at this size ('' when it can)."""
    axis, n = layout.spatial
    if sum(getattr(layout, a) > 1 for a in ("patch", "sp", "clip", "pipefusion", "dit_tp")) > 1:
        return "patch, sp, clip, pipefusion and tp each split the same tokens: use one of them"
    if layout.cfg > 2:
        return f"cfg={layout.cfg}: the guidance batch has two halves"
    if layout.cfg == 2 and not (guidance and desc.guidance_batch):
        why = "guidance is off" if desc.guidance_batch else f"{desc.denoiser_class} has no guidance batch to split"
        return f"cfg=2: {why}"
    frames, rows, cols = desc.latent
    if axis == "patch":
        if desc.is_video:
            return f"patch={n}: patch parallelism is for images; {desc.denoiser_class} is a video model"
        bands = rows // desc.row_multiple
        if bands < n:
            return f"patch={n}: {rows} latent rows make only {bands} bands of {desc.row_multiple}; more ranks than bands"
        if rows % (desc.row_multiple * n):
            return (f"patch={n}: {rows} latent rows are not a multiple of {desc.row_multiple} x {n} "
                    f"(--height must be a multiple of {desc.height // rows * desc.row_multiple * n} px)")
    if axis == "sp":
        if not desc.is_dit:
            return f"sp={n}: sequence parallelism needs a DiT; {desc.denoiser_class} is a UNet"
        tokens = desc.tokens * (frames if desc.family == "wan" else 1)
        if tokens < n:
            return f"sp={n}: {tokens} tokens, fewer than the ranks"
        u = layout.ulysses if layout.sp_mode == "usp" else (n if layout.sp_mode == "ulysses" else 1)
        if u > 1 and desc.heads % u:
            valid = ", ".join(str(d) for d in range(2, desc.heads + 1) if desc.heads % d == 0)
            return f"sp={n} ulysses: {desc.heads} heads are not divisible by {u} (valid: {valid}; ring takes any degree)"
    if axis == "clip":
        if desc.family not in ("video-unet", "motion-unet"):
            return f"clip={n}: clip parallelism needs a video UNet (UNet3D / UNetMotion); {desc.denoiser_class} is not"
        if frames < n:
            return f"clip={n}: {frames} frames, fewer than the clip ranks"
    if axis in ("pipefusion", "dit_tp"):
        if not desc.is_dit:
            return f"{axis}={n}: needs a DiT; {desc.denoiser_class} is a UNet"
        layers = int(desc.config.get("num_layers", 28))
        if layers < n:
            return f"{axis}={n}: more stages than the {layers} layers"
        if axis == "dit_tp" and desc.heads % n:
            return f"tp={n}: {desc.heads} heads are not divisible by {n}"
    return ""


def _out_elems(desc: DiffusionDesc) -> float:
    frames, rows, cols = desc.latent
    return float(frames * rows * cols * int(desc.config.get("out_channels") or desc.config.get("in_channels", 4)))


_GROUPS: dict[int, tuple[DiffusionDesc, list[tuple[Op, int]]]] = {}


def op_groups(desc: DiffusionDesc) -> list[tuple[Op, int]]:
    """The denoiser's ops with identical ones merged: (op, how many)."""
    # keyed by id, so the entry keeps its desc: an id is reused once a desc is freed, and another
    # model's ops must never come back for it
    entry = _GROUPS.get(id(desc))
    if entry is None or entry[0] is not desc:
        counts: dict[Op, int] = {}
        for op in desc.ops:
            counts[op] = counts.get(op, 0) + 1
        entry = _GROUPS[id(desc)] = (desc, list(counts.items()))
    return entry[1]


class _Comms:
    """Comms of one step, merged by kind (what, op, link, mode, window, impl)."""

    def __init__(self, group: int = 2) -> None:
        self.items: dict[tuple, Comm] = {}
        self.group = group

    def add(self, what: str, op: str, sent: float, calls: float, link: Link, mode: str, window_s: float = 0.0,
            impl: str = "nccl", group: int = 0) -> None:
        group = group or self.group
        key = (what, op, link.name, mode, round(window_s, 12), impl, group)
        if key in self.items:
            c = self.items[key]
            c.sent_bytes += sent
            c.calls += calls
        else:
            self.items[key] = Comm(what, op, sent, calls, link, mode, window_s, impl, group)

    def list(self) -> list[Comm]:
        return list(self.items.values())


def diffusion_step(desc: DiffusionDesc, layout: Layout, env: Env, guidance: bool, synchronous: bool) -> StepCost:
    """One denoiser call on the slowest rank. ``synchronous``: a warmup step (stale modes exchange fresh
    context and wait for it)."""
    axis, n = layout.spatial
    dt = env.dtype_bytes
    b = (2 if guidance and desc.guidance_batch else 1) / layout.cfg  # samples per rank
    family = _family(desc)
    link = env.link(n)
    flops = 0.0
    op_count = 0.0
    comms = _Comms(n)
    p = layout.pcpp_fraction
    frames = desc.latent[0]
    stale_ok = not synchronous
    sides = min(2, n - 1)  # neighbours of the slowest rank: an interior one from 3 ranks on
    extra_s = 0.0
    for op, k in op_groups(desc):
        f = op.flops * b * k
        count = 1.0
        cols = op.tokens // op.rows if op.rows else 0
        if axis == "patch":
            mode = layout.patch_mode
            if op.kind == "attn":
                share = {"naive": 1.0 / n, "partial": min(1.0, (1 + 2 * p) / n)}.get(mode, 1.0)
                flops += f / n * share
            elif op.kind == "text_linear":
                flops += 0.0 if op.name == "cross.kv" else f  # cross K/V cached per request; joint text replicated
            else:
                flops += f / n
            async_mode = "async" if mode in ("displaced", "partial") and stale_ok else "blocking"
            if mode != "naive":
                band_tokens = op.tokens / n
                if op.kind == "attn":
                    if mode == "partial" and stale_ok:
                        rows_used = math.ceil(p * op.rows / n)
                        comms.add("partial K/V rows", "p2p", k * sides * rows_used * cols * 2 * op.dim * dt * b,
                                  sides * k, link, async_mode)
                    else:
                        comms.add("self-attention K/V", "all_gather", k * (n - 1) * 2 * band_tokens * op.dim * dt * b,
                                  k, link, async_mode)
                elif op.kind == "conv" and op.kernel > 1:
                    comms.add("conv halo rows", "p2p", k * sides * (op.kernel // 2) * cols * op.dim * dt * b, sides * k,
                              link, async_mode)
                elif op.kind == "norm":
                    comms.add("GroupNorm statistics", "all_gather", k * (n - 1) * 2 * op.dim * GN_STAT_BYTES * b, k,
                              link, async_mode)
        elif axis == "sp":
            u = {"ulysses": n, "ring": 1}.get(layout.sp_mode, layout.ulysses)
            r = n // u
            if op.kind == "text_linear" and op.name != "text.attn":
                flops += f
            else:
                flops += f / n
            if op.kind == "attn":
                shard = op.tokens * op.frames / n * op.dim * dt * b  # this rank's queries (keys, values)
                if u > 1:
                    comms.add("ulysses all-to-all (Q, K, V, out)", "all_to_all", k * 4 * (u - 1) / u * shard, 2 * k,
                              env.link(u), "blocking", impl=layout.impl, group=u)
                    if op.kv_tokens > op.tokens:  # joint attention: the text's output over heads
                        text = op.kv_tokens - op.tokens
                        comms.add("text output all_gather", "all_gather", k * (u - 1) * text * op.dim / u * dt * b, k,
                                  env.link(u), "blocking", group=u)
                if r > 1:
                    window = compute_seconds(op.flops * b / n / r, 0, family, env)
                    comms.add("ring K/V blocks", "p2p",
                              k * (r - 1) * 2 * (op.tokens * op.frames / r) * op.dim / u * dt * b,
                              k * (r - 1), env.link(n), "window", window)
                    count = r  # one attention call per block
                    extra_s += k * (r - 1) * env.factors["ring.step"]
        elif axis == "pipefusion":
            flops += f / n
            m = layout.pipefusion_patches or n
            count = m / n  # each stage runs its layers once per patch
        elif axis == "dit_tp":
            flops += f if op.kind == "norm" else f / n
            if op.kind == "linear" and op.name in ("self.out", "cross.out", "ff.out"):
                size = op.tokens * op.frames * op.dim * dt * b
                comms.add("tensor-parallel all-reduce", "all_reduce", k * 2 * (n - 1) / n * size, k, link, "blocking",
                          impl=layout.impl)
        elif axis == "clip":
            mode = layout.clip_mode
            clip_frames = math.ceil(frames / n)
            # the runtime's windows: +-min(local, smallest clip) frames, min(global, a quarter of the video) global
            local = min(layout.local_frames, frames // n)
            g = min(layout.global_frames, max(1, frames // 4))
            cmode = "async" if layout.stale_context and stale_ok else "blocking"
            if op.kind == "tconv":
                halo = 0 if mode == "naive" else 4 * sides  # four stacked k=3 convs: 4 frames a side
                flops += f * min(frames, clip_frames + halo) / frames
                if op.name == "tconv0" and mode != "naive":
                    comms.add("temporal conv halo frames", "p2p", k * sides * 4 * op.tokens * op.dim * dt * b, sides * k,
                              link, cmode)
            elif op.kind == "tattn":
                keys = {"exact": frames, "naive": clip_frames}.get(mode, min(frames, clip_frames + sides * local + g))
                flops += f / n * keys / frames
                if mode == "exact":
                    comms.add("temporal K/V all_gather", "all_gather",
                              k * (n - 1) * 2 * clip_frames * op.tokens * op.dim * dt * b, k, link, cmode)
                elif mode == "dual-scope":
                    comms.add("local window K/V", "p2p", k * sides * local * op.tokens * 2 * op.dim * dt * b, sides * k,
                              link, cmode)
                    comms.add("global frames K/V", "all_gather",
                              k * (n - 1) * 2 * math.ceil(g / n) * op.tokens * op.dim * dt * b, k, link, cmode)
            else:
                flops += f / n
                if op.kind == "norm" and mode != "naive":
                    comms.add("GroupNorm statistics", "all_reduce", k * 2 * (n - 1) / n * 2 * op.dim * GN_STAT_BYTES * b,
                              2 * k, link, cmode)
        else:
            flops += f
        op_count += count * k
    if n > 1:  # every rank needs the whole output for the scheduler
        comms.add(f"{axis} output all_gather", "all_gather", (n - 1) * _out_elems(desc) / n * dt * b, 1, link,
                  "blocking")
    if layout.cfg > 1:
        comms.add("cfg output all_gather", "all_gather", _out_elems(desc) * dt * b, 1, env.link(layout.cfg * n),
                  "blocking", group=layout.cfg)
    compute_s = compute_seconds(flops, op_count, family, env) + extra_s
    if axis == "pipefusion":
        m = layout.pipefusion_patches or n
        width = int(desc.heads * desc.config.get("attention_head_dim", 72))
        act = desc.tokens * desc.latent[0] * width * dt * b
        comms.add("pipeline patch activations", "p2p", act, m, link, "window", compute_s / m)
        compute_s += m * env.factors["pipefusion.patch"]
    return settle(compute_s, comms.list(), env.factors)


def diffusion_cost(desc: DiffusionDesc, layout: Layout, env: Env, steps: int, guidance: bool = True) -> PlanCost:
    reason = diffusion_check(desc, layout, guidance)
    if reason:
        return PlanCost(layout, False, reason)
    axis, n = layout.spatial
    family = _family(desc)
    f = env.factors
    dt = env.dtype_bytes
    b = (2 if guidance and desc.guidance_batch else 1) / layout.cfg
    steady = diffusion_step(desc, layout, env, guidance, synchronous=False)
    warm = diffusion_step(desc, layout, env, guidance, synchronous=True)
    exact = True
    staleness = ""
    if axis == "patch" and layout.patch_mode in ("displaced", "partial"):
        warmup = min(steps, layout.warmup_steps)
        exact = False
        staleness = (f"self-attention K/V, conv halos and GroupNorm statistics one step stale after {warmup} "
                     "synchronous steps" + (f"; attention sees {layout.pcpp_fraction:g} of each neighbour band"
                                             if layout.patch_mode == "partial" else ""))
    elif axis == "patch" and layout.patch_mode == "naive":
        warmup, exact, staleness = 0, False, "no context across bands (seams)"
    elif axis == "clip" and layout.stale_context:
        warmup, exact = min(steps, 2), False
        staleness = "clip context one step stale after 2 synchronous calls"
    elif axis == "pipefusion":
        warmup, exact = min(steps, 1), False
        staleness = "K/V of patches not yet computed in this step come from the previous step"
    else:
        warmup = 0
    if axis == "clip" and layout.clip_mode != "exact":
        exact = False
        staleness = (staleness + "; " if staleness else "") + (
            "temporal attention over a local window and sampled global frames" if layout.clip_mode == "dual-scope"
            else "no context across clips")
    if axis == "pipefusion":
        # warmup: the whole image passes the stages one after another (no patch pipelining)
        m = layout.pipefusion_patches or n
        warm_s = warm.compute_s * n + warm.exposed_s
        bubble_s = (n - 1) / m * steady.compute_s
        denoise_s = warmup * warm_s + (steps - warmup) * steady.step_s + bubble_s
    else:
        warm_s = warm.step_s
        denoise_s = warmup * warm.step_s + (steps - warmup) * steady.step_s
    text_s = compute_seconds(2.0 * desc.text_encoder_params * desc.text_tokens * (2 if guidance else 1), 0, "dit", env)
    vae_s = compute_seconds(desc.vae_decode_flops, 0, "unet", env)
    latency = text_s + denoise_s + vae_s
    memory = diffusion_memory(desc, layout, env, b)
    total = sum(memory.values())
    comm_total = steady.exposed_s + steady.hidden_s
    plan = PlanCost(layout, True, latency_s=latency, step_s=steady.step_s, warmup_step_s=warm_s,
                    memory_gb=total, memory=memory, bytes_per_step=steady.bytes_per_link(),
                    hidden_share=steady.hidden_s / comm_total if comm_total > 0 else 0.0, compute_s=steady.compute_s,
                    exposed_s=steady.exposed_s, exact=exact, staleness=staleness, notes=list(desc.notes))
    if total > env.hw.mem_gb:
        plan.feasible = False
        parts = ", ".join(f"{k} {v:.1f}" for k, v in memory.items() if v >= 0.05)
        plan.reason = f"memory: {total:.1f} GB per GPU > {env.hw.mem_gb:g} GB ({parts})"
    plan.in_runtime = layout.in_runtime and desc.in_runtime
    if not layout.in_runtime:
        plan.notes.append("not in distgen's runtime yet (predicted for comparison)")
    return plan


def diffusion_memory(desc: DiffusionDesc, layout: Layout, env: Env, b: float) -> dict[str, float]:
    """GB per GPU: weights (denoiser, text encoders, VAE), the largest activation, exchange buffers."""
    axis, n = layout.spatial
    dt = env.dtype_bytes
    gb = 1e-9
    split_weights = n if axis in ("pipefusion", "dit_tp") else 1
    kv_full = sum(2 * op.tokens * op.frames * op.dim for op in desc.ops if op.kind == "attn") * dt * b
    buffers = 0.0
    if axis == "patch" and layout.patch_mode in ("displaced", "sync"):
        # stale K/V of every attention layer (all bands) plus the in-flight gather into the same layout
        buffers = kv_full * (2 if layout.patch_mode == "displaced" else 1.0 / max(1, len(desc.attention_layers)))
    elif axis == "patch" and layout.patch_mode == "partial":
        buffers = kv_full / n * 2 * layout.pcpp_fraction * 2
    elif axis == "pipefusion":
        buffers = kv_full / n
    elif axis == "sp":
        buffers = max((2 * op.tokens * op.frames * op.dim * dt * b for op in desc.ops if op.kind == "attn"), default=0) / n * 2
    split = n if axis in ("patch", "sp", "clip", "dit_tp") else 1
    act = max((op.tokens * op.frames * op.dim * dt * b for op in desc.ops if op.kind in ("linear", "conv", "tconv")),
              default=0.0) / split * 4
    vae_act = desc.vae_channels * desc.height * desc.width * dt * 3  # one frame decoded at a time
    return {
        "weights": desc.params * dt / split_weights * gb,
        "text_encoders": desc.text_encoder_params * dt * gb,
        "vae": desc.vae_params * dt * gb,
        "activations": max(act, vae_act) * gb,
        "exchange_buffers": buffers * gb,
        "framework": FRAMEWORK_RESERVE_GB if env.hw.name != "cpu" else 0.3,
    }


# ================================================================================= text
def text_check(desc: LLMDesc, layout: Layout, batch: int) -> str:
    tp, pp, ep, dp = layout.tp, layout.pp, layout.ep, layout.dp
    if tp > 1:
        bad = [f"{what} {v}" for what, v in (("attention heads", desc.heads), ("KV heads", desc.kv_heads),
                                            ("intermediate size", desc.intermediate)) if v % tp]
        if bad:
            return f"tp={tp}: must divide the {' and the '.join(bad)}"
    if pp > desc.layers:
        return f"pp={pp}: more stages than the {desc.layers} layers"
    if ep > 1:
        if desc.moe is None:
            return f"ep={ep}: {desc.architecture} is a dense model"
        if ep % (tp * dp):
            return f"ep={ep}: must be a multiple of dp x tp = {dp * tp}"
        if desc.moe.experts % ep:
            return f"ep={ep}: {desc.moe.experts} experts do not split evenly"
    if dp > batch:
        return f"dp={dp}: more data-parallel ranks than the {batch} sequences"
    if dp > 1 and pp > 1:
        return "dp does not combine with pp in distgen yet"
    if layout.ladder and tp == 1:
        return "ladder needs tp > 1"
    return ""


def _stage_params(desc: LLMDesc, layers: range, layout: Layout, tokens_routed: float) -> tuple[float, float]:
    """(weights read, FLOP-weights) per rank for a stage's layers at one step: attention and dense MLPs
    split by tp; routed experts split by ep (only the experts some token picks are read)."""
    tp, ep = layout.tp, layout.ep
    read = flop_w = 0.0
    for i in layers:
        read += desc.attn_params / tp
        flop_w += desc.attn_params / tp
        expert = desc.expert_params(i)
        dense = desc.mlp_params(i) - expert
        read += dense / tp
        flop_w += (desc.active_mlp_params(i) - (desc.moe.top_k * expert / desc.moe.experts if expert else 0)) / tp
        if expert:
            m = desc.moe
            touched = m.experts * (1 - (1 - m.top_k / m.experts) ** tokens_routed)
            split = ep if ep > 1 else tp
            read += touched * expert / m.experts / split
            flop_w += m.top_k * expert / m.experts / (ep if ep > 1 else tp)
    return read, flop_w


def text_cost(desc: LLMDesc, layout: Layout, env: Env, batch: int = 1, prompt: int = 128, gen: int = 128,
              ladder_checkpoint: bool = True) -> PlanCost:
    """Prefill of ``batch`` sequences of ``prompt`` tokens, then ``gen`` decode steps. ``ladder_checkpoint``:
    the checkpoint is ladder-trained (otherwise Ladder plans are infeasible: they compute another function)."""
    reason = text_check(desc, layout, batch)
    if not reason and layout.ladder and not ladder_checkpoint:
        reason = ("Ladder Residual computes a different function: needs a ladder-trained checkpoint "
                  "(--ladder-checkpoint)")
    if reason:
        return PlanCost(layout, False, reason)
    f = env.factors
    dt = env.dtype_bytes
    tp, pp, ep, dp = layout.tp, layout.pp, layout.ep, layout.dp
    local = math.ceil(batch / dp)
    per_stage = math.ceil(desc.layers / pp)
    stage = range(per_stage)
    micro = layout.micro_batches or (min(pp, local) if pp > 1 else 1)
    tp_link = env.link(tp)
    ep_link = env.link(ep)
    pp_link = env.link(tp * pp)
    head = desc.vocab * desc.hidden / tp  # lm_head (last stage)
    impl = layout.impl

    def stage_time(b: float, tokens: float, context: float, prefill: bool) -> StepCost:
        group_tokens = b * tokens * (dp if ep > 1 else 1)
        read, flop_w = _stage_params(desc, stage, layout, group_tokens)
        read += head / pp  # spread the head's cost over stages
        kv = b * context * 2 * desc.kv_heads / tp * desc.head_dim * per_stage * dt
        attn_flops = (2 if prefill else 4) * b * tokens * context * desc.heads / tp * desc.head_dim * per_stage
        flops = 2 * b * tokens * (flop_w + head / pp) + attn_flops
        t_mem = (read * dt + kv) / (env.hw.mem_bw * f["mem"])
        t_flops = flops / (env.hw.flops * f["compute.llm"] * f[f"hw.{env.hw.name}"])
        compute = max(t_mem, t_flops) + per_stage * f["layer.llm"]
        comms: list[Comm] = []
        act = b * tokens * desc.hidden * dt
        if tp > 1 and not layout.no_comm:
            mode = "window" if layout.ladder else "blocking"
            window = compute / (2 * per_stage)
            comms.append(Comm("tp all-reduce (attention, MLP)", "all_reduce", 2 * per_stage * 2 * (tp - 1) / tp * act,
                              2 * per_stage, tp_link, mode, window, impl=impl, group=tp))
            comms.append(Comm("embedding all-reduce, logits all_gather", "all_reduce",
                              2 * (tp - 1) / tp * act + (tp - 1) * b * desc.vocab / tp * dt / pp, 2, tp_link, "blocking",
                              impl=impl, group=tp))
        if ep > 1 and desc.moe is not None:
            moe_layers = sum(1 for i in stage if desc.moe.sparse_layers[i])
            routed = act * desc.moe.top_k * (dp if dp > 1 else 1) / (tp if dp == 1 else 1)
            comms.append(Comm("ep all-to-all (rows out, results back, combined rows)", "all_to_all",
                              moe_layers * (2 * routed + act) * (ep - 1) / ep, 3 * moe_layers, ep_link, "blocking",
                              group=ep))
        return settle(compute, comms, f)

    # prefill: micro-batched through the stages
    pre = stage_time(local / micro, prompt, prompt, True)
    pp_comm = Comm("pp activations", "p2p", local / micro * prompt * desc.hidden * dt, 1, pp_link, "blocking") if pp > 1 else None
    pre_stage_s = pre.step_s + (pp_comm.seconds(f) if pp_comm else 0.0)
    ttft = (micro + pp - 1) * pre_stage_s if pp > 1 else pre.step_s
    context = prompt + gen / 2
    dec = stage_time(local / micro, 1, context, False)
    dec_p2p = Comm("pp activations", "p2p", local / micro * desc.hidden * dt, 1, pp_link, "blocking") if pp > 1 else None
    dec_stage_s = dec.step_s + (dec_p2p.seconds(f) if dec_p2p else 0.0)
    decode_s = max(micro, pp) * dec_stage_s if pp > 1 else dec.step_s
    latency = ttft + max(0, gen - 1) * decode_s
    kv_gb = local * (prompt + gen) * desc.kv_bytes_per_token(dt) / tp / pp * 1e-9
    read, _ = _stage_params(desc, range(desc.layers), layout, 1e9)  # every expert a rank holds
    memory = {"weights": (read / pp + (desc.embed_params / tp) / (1 if pp == 1 else 2)) * dt * 1e-9,
              "kv_cache": kv_gb,
              "activations": local * prompt * max(desc.hidden, desc.intermediate // tp) * dt * 4 * 1e-9,
              "framework": FRAMEWORK_RESERVE_GB if env.hw.name != "cpu" else 0.3}
    total = sum(memory.values())
    bytes_step: dict[str, float] = dec.bytes_per_link()
    if dec_p2p:
        bytes_step[pp_link.name] = bytes_step.get(pp_link.name, 0.0) + dec_p2p.sent_bytes * max(micro, pp)
    comm_total = dec.exposed_s + dec.hidden_s
    plan = PlanCost(layout, True, latency_s=latency, step_s=decode_s, ttft_s=ttft, decode_step_s=decode_s,
                    memory_gb=total, memory=memory, bytes_per_step=bytes_step,
                    hidden_share=dec.hidden_s / comm_total if comm_total > 0 else 0.0, compute_s=dec.compute_s,
                    exposed_s=dec.exposed_s, exact=True)
    if layout.ladder:
        plan.staleness = "Ladder Residual: a different function; needs a ladder-trained checkpoint"
        plan.exact = False
    if total > env.hw.mem_gb:
        plan.feasible = False
        plan.reason = f"memory: {total:.1f} GB per GPU > {env.hw.mem_gb:g} GB " + \
            "(" + ", ".join(f"{k} {v:.1f}" for k, v in memory.items() if v >= 0.05) + ")"
    return plan


def with_impl(layout: Layout, impl: str) -> Layout:
    return replace(layout, impl=impl)
