"""A resident worker group: load the model once, then run request after request.

Every rank runs :func:`serve_group`. Rank 0 leads: it takes commands (submit, cancel, stop) from
the controller over a *channel*, decides what runs next (:class:`Scheduler`), and broadcasts
that plan to every rank on a gloo control group, so that every rank runs the same plan (or the
collectives inside it would hang). While a plan runs, the leader streams events back through the
channel: ``started``, ``progress`` (denoising steps), ``tokens`` (text), ``result``, ``error``,
``cancelled``. When nothing is waiting it broadcasts a heartbeat about once a second, so the
controller knows every rank still answers.

Cancellation reaches a running plan within one step: after every denoiser call (diffusion) or
decoding step (text) the leader reads pending commands and broadcasts the set of cancelled
requests; every rank then leaves at the same point (a plan whose requests are all cancelled
stops; a request cancelled out of a batch is answered at once and its rows are dropped).

The channel is whatever the launcher gives rank 0 (multiprocessing queues for local processes,
an actor-local queue under Ray, a thread queue under torchrun); it needs ``get(timeout)`` ->
command or None and ``put(event)``.
"""

from __future__ import annotations

import datetime
import os
import queue
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.distributed as dist

HEARTBEAT_S = 1.0


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class WorkItem:
    """One unit of work the controller submits: ``kind`` is image, video or text; ``request``
    the workload's request dataclass (already validated); ``options`` small per-request extras
    (e.g. ``out`` for video)."""

    id: str
    kind: str
    request: Any
    options: dict = field(default_factory=dict)

    def batch_key(self):
        """Items with the same key may run as one batch (image: size, steps, guidance, negative prompt)."""
        if self.kind == "image":
            r = self.request
            return ("image", r.height, r.width, r.steps, r.guidance_scale, r.negative_prompt)
        return None


@dataclass(frozen=True)
class Plan:
    """What every rank runs next. ``action``: run, heartbeat, stop."""

    action: str
    items: tuple[WorkItem, ...] = ()


@dataclass(frozen=True)
class ResidentJob:
    """A resident group: the workload's one-shot job (model, plan, modes) kept for every request."""

    entry: ClassVar[str] = "distgen.runtime.resident:serve_group"

    workload: str  # image | video | text
    base: Any  # ImageJob / VideoJob / TextJob: model, parallel, dtype and modes
    max_batch_size: int = 8
    # text: iteration-level batching on a slot cache (distgen.runtime.continuous); None: request-level
    continuous: Any = None

    @property
    def parallel(self):
        return self.base.parallel

    @property
    def comm_timeout_s(self) -> float:
        return self.base.comm_timeout_s

    @property
    def threads_per_rank(self):
        return getattr(self.base, "threads_per_rank", None)


class Cancelled(Exception):
    """Raised on every rank at the same step when all requests of a running plan are cancelled."""


# --------------------------------------------------------------------------- scheduling (leader)


class Scheduler:
    """Leader-side queue: FIFO, with waiting image requests of the same shape run as one batch.

    Admission (the bound on queued requests) is the controller's; this only orders what arrived.
    The iteration-level text scheduler replaces :meth:`next_plan` for text (it will plan one
    decoding step at a time over slots); the broadcast and the step hook stay as they are.
    """

    def __init__(self, max_batch_size: int):
        self.max_batch_size = max(1, max_batch_size)
        self.waiting: deque[WorkItem] = deque()
        self.cancelled: set[str] = set()

    def add(self, item: WorkItem) -> None:
        self.waiting.append(item)

    def cancel(self, request_id: str) -> bool:
        """Drop a waiting request; True if it was waiting (else it may be running)."""
        for item in list(self.waiting):
            if item.id == request_id:
                self.waiting.remove(item)
                return True
        return False

    def next_plan(self) -> Plan | None:
        if not self.waiting:
            return None
        first = self.waiting.popleft()
        items = [first]
        key = first.batch_key()
        if key is not None:
            for item in list(self.waiting):
                if len(items) >= self.max_batch_size:
                    break
                if item.batch_key() == key:
                    self.waiting.remove(item)
                    items.append(item)
        return Plan("run", tuple(items))


# --------------------------------------------------------------------------- the loop (every rank)


class _Leader:
    """Rank 0's side: the channel, the scheduler, the cancel set of the running plan."""

    def __init__(self, channel, scheduler: Scheduler):
        self.channel, self.scheduler = channel, scheduler
        self.stopping = False
        self.running: set[str] = set()
        self.cancel_now: set[str] = set()

    def emit(self, *event) -> None:
        self.channel.put(event)

    def _handle(self, command) -> None:
        kind = command[0]
        if kind == "submit":
            self.scheduler.add(command[1])
        elif kind == "cancel":
            rid = command[1]
            if rid in self.running:
                self.cancel_now.add(rid)
            elif self.scheduler.cancel(rid):
                self.emit("cancelled", rid)
        elif kind == "stop":
            self.stopping = True

    def poll(self, timeout: float) -> None:
        """Read every pending command; wait up to ``timeout`` for the first one."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = max(0.0, deadline - time.monotonic())
            command = self.channel.get(remaining)
            if command is None:
                return
            self._handle(command)
            deadline = time.monotonic()  # got one: take the rest without waiting

    def next_plan(self) -> Plan:
        if self.stopping:
            return Plan("stop")
        plan = self.scheduler.next_plan()
        if plan is None:
            self.poll(HEARTBEAT_S)
            if self.stopping:
                return Plan("stop")
            plan = self.scheduler.next_plan() or Plan("heartbeat")
        return plan


class _Control:
    """Broadcasts from the leader on a gloo group (every rank; NCCL cannot carry Python objects)."""

    def __init__(self, ctx, timeout_s: float):
        self.rank = ctx.rank
        self.world = ctx.world_size
        self.group = None
        if self.world > 1:
            self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))

    def broadcast(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


def serve_group(job: ResidentJob, ctx, channel=None) -> None:
    """Every rank: build the workload's runner once, then run the leader's plans until stop."""
    control = _Control(ctx, job.comm_timeout_s)
    try:
        runner = _build_runner(job, ctx)
    except BaseException as exc:
        if ctx.rank == 0:
            channel.put(("fatal", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        raise
    if job.workload == "text" and job.continuous is not None:
        from distgen.runtime.continuous import serve_continuous

        return serve_continuous(job, ctx, channel, control, runner.generator)
    leader = _Leader(channel, Scheduler(job.max_batch_size)) if ctx.rank == 0 else None
    if leader is not None:
        leader.emit("ready", {"pid": os.getpid(), "world_size": ctx.world_size})
    while True:
        plan = control.broadcast(leader.next_plan() if leader is not None else None)
        if leader is not None and plan.action != "stop":
            leader.emit("heartbeat", time.time())
        if plan.action == "stop":
            break
        if plan.action == "heartbeat":
            continue
        _run_plan(runner, plan, ctx, control, leader)
    if leader is not None:
        leader.emit("stopped")


def _run_plan(runner, plan: Plan, ctx, control: _Control, leader: _Leader | None) -> None:
    ids = [item.id for item in plan.items]
    if leader is not None:
        leader.running = set(ids)
        leader.cancel_now = set()
        for rid in ids:
            leader.emit("started", rid)
    live = set(ids)

    def step_hook(step: int, total: int, payload=None) -> set[str]:
        """After each step, on every rank: progress out, cancellations in (the same set everywhere).
        Returns the requests still live; a runner stops when none of its requests is."""
        cancelled = None
        if leader is not None:
            leader.poll(0.0)
            for rid in live:
                leader.emit("progress", rid, step, total, payload.get(rid) if payload else None)
            cancelled = set(leader.cancel_now) & live
        cancelled = control.broadcast(cancelled)
        if cancelled:
            live.difference_update(cancelled)
            if leader is not None:
                for rid in cancelled:
                    leader.emit("cancelled", rid)
        return live

    # Any other exception ends this rank (the launcher reports it, the controller rebuilds the
    # group): ranks that went on would wait forever in collectives the failed rank never joins.
    try:
        outputs = runner.run(plan.items, step_hook)
    except Cancelled:
        runner.reset_after_error()
        outputs = {}
    finally:
        if leader is not None:
            leader.running = set()
    if leader is not None:
        for rid, output in outputs.items():
            if rid in live:
                leader.emit("result", rid, output)


# --------------------------------------------------------------------------- workload runners


def _build_runner(job: ResidentJob, ctx):
    if job.workload == "image":
        return _ImageRunner(job, ctx)
    if job.workload == "video":
        return _VideoRunner(job, ctx)
    if job.workload == "text":
        return _TextRunner(job, ctx)
    raise ValueError(f"unknown workload {job.workload!r}")


class _DenoiserSteps:
    """Calls the step hook after every denoiser call (one diffusion step; Wan: one half)."""

    def __init__(self, denoiser: torch.nn.Module):
        self.hook = None
        self.calls = 0
        self.total = 0
        denoiser.register_forward_hook(self._after)

    def _after(self, module, args, output):
        if self.hook is not None:
            self.calls += 1
            self.hook(self.calls, self.total)

    def arm(self, hook, total: int) -> None:
        self.hook, self.calls, self.total = hook, 0, total


class _ImageRunner:
    def __init__(self, job: ResidentJob, ctx):
        from distgen.runtime.diffusion import DiffusionRunner
        from distgen.runtime.worker import resolve_model_dir

        base = job.base.replace(progress=False)
        self.runner = DiffusionRunner(base, ctx, resolve_model_dir(base.model))
        self.ctx = ctx
        self.steps = _DenoiserSteps(self.runner.denoiser)

    def run(self, items, step_hook) -> dict:
        # One batch: rows in item order, each its own generator (its own initial noise).
        requests = [item.request for item in items]
        def after_step(k: int, n: int) -> None:
            if not step_hook(k, n):
                raise Cancelled()  # on every rank at the same call: the pipeline unwinds

        self.steps.arm(after_step, requests[0].steps)
        try:
            result = self.runner.generate_batch(requests, decode=False)
        finally:
            self.steps.arm(None, 0)
            self.runner.drain()
        images, _ = self.runner.decode(result.latents)  # every rank with --vae-parallel, else rank 0
        if self.ctx.rank != 0:
            return {}
        steps = result.step_seconds
        return {item.id: {"image": image, "step_seconds": steps, "bytes_sent": result.bytes_sent,
                          "wait_seconds": result.wait_seconds} for item, image in zip(items, images)}

    def reset_after_error(self) -> None:
        self.runner.drain()


class _VideoRunner:
    def __init__(self, job: ResidentJob, ctx):
        from distgen.models import presets
        from distgen.runtime.video import VideoRunner

        base = job.base.replace(progress=False)
        model_dir = base.model if base.model is not None else presets.resolve("video", None, presets.default("video")).directory
        self.runner = VideoRunner(base, ctx, model_dir)
        self.ctx = ctx
        self.steps = _DenoiserSteps(self.runner.denoiser)

    def run(self, items, step_hook) -> dict:
        from distgen.models import video as adapter

        outputs = {}
        for item in items:  # videos run one at a time
            request = item.request
            calls = request.steps * (2 if self.runner.info.family == "wan" and request.guidance_enabled else 1)
            def after_step(k: int, n: int, rid=item.id) -> None:
                if rid not in step_hook(k, n):
                    raise Cancelled()

            self.steps.arm(after_step, calls)
            try:
                result = self.runner.generate(request, decode=True, gather_latents=False)
            finally:
                self.steps.arm(None, 0)
                if self.runner.clip_engine is not None:
                    self.runner.clip_engine.drain()
            if self.ctx.rank == 0:
                out = item.options["out"]
                adapter.write_video(result.frames.numpy(), out, request.fps)
                outputs[item.id] = {"out": out, "frames": int(result.frames.shape[0]),
                                    "step_seconds": result.step_seconds}
        return outputs

    def reset_after_error(self) -> None:
        if self.runner.clip_engine is not None:
            self.runner.clip_engine.drain()


class _TextRunner:
    def __init__(self, job: ResidentJob, ctx):
        from distgen.runtime.text import TextGenerator

        self.generator = TextGenerator(job.base, ctx)
        self.ctx = ctx

    def run(self, items, step_hook) -> dict:
        outputs = {}
        for item in items:  # request-level: one request (its prompts are one batch) at a time
            request = item.request
            sent = [0] * request.batch_size

            def on_step(step: int, generated: list[list[int]]) -> bool:
                new = {}
                if self.ctx.rank == 0:
                    new = {item.id: [list(g[s:]) for g, s in zip(generated, sent)]}
                    for row, g in enumerate(generated):
                        sent[row] = len(g)
                return item.id not in step_hook(step, request.max_new_tokens, new)

            result = self.generator.generate(request, step_hook=on_step)
            if self.ctx.rank == 0:
                fields = ("tokens", "prefill_seconds", "decode_seconds", "step_tokens", "ep_bytes", "ep_wait_seconds",
                          "rebalances", "tp_wait_seconds")
                outputs[item.id] = {name: getattr(result, name) for name in fields} | {
                    "new": [list(g[s:]) for g, s in zip(result.tokens, sent)],
                    "ladder_layers": self.generator.config.ladder_layers,
                    "num_layers": self.generator.config.num_layers}
        return outputs

    def reset_after_error(self) -> None:
        self.generator.schedule.drain()


class QueueChannel:
    """A channel over two queues (``queue.Queue`` or ``multiprocessing`` queues)."""

    def __init__(self, commands, events):
        self.commands, self.events = commands, events

    def get(self, timeout: float):
        try:
            if timeout <= 0:
                return self.commands.get_nowait()
            return self.commands.get(timeout=timeout)
        except queue.Empty:
            return None

    def put(self, event) -> None:
        self.events.put(event)
