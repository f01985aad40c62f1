"""Engine: controller-side view of one resident worker group (see the package docstring)."""

from __future__ import annotations

import asyncio
from collections import deque
import logging
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from distgen.runtime.resident import ResidentJob, WorkItem

logger = logging.getLogger("distgen.engine")

TERMINAL = ("result", "error", "cancelled")


class EngineUnavailable(RuntimeError):
    """The group is starting, rebuilding, draining or down (HTTP 503)."""


class QueueFull(RuntimeError):
    """``max_queued`` requests are already waiting or running (HTTP 429)."""

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class EngineConfig:
    job: ResidentJob
    nproc: int
    launcher: str = "spawn"  # spawn | ray | torchrun
    ray_address: str | None = None
    max_queued: int = 64  # waiting + running requests admitted at once
    max_restarts: int = 3  # group rebuilds before the engine gives up
    start_timeout_s: float = 900.0  # model load included
    threads_per_rank: int | None = None
    # A group that has been silent this long while it should be answering counts as hung: no
    # heartbeat when idle, no progress while running (a step of one request at most this long).
    silence_timeout_s: float = 600.0


class Handle:
    """One request's events, in order; terminal: result, error (with an HTTP status), cancelled.

    Created in an asyncio loop, events are also delivered to that loop (await
    :meth:`next_event`); otherwise read them with :meth:`events` from any thread.
    """

    def __init__(self, item: WorkItem, engine: "Engine", loop: asyncio.AbstractEventLoop | None):
        self.item = item
        self.id = item.id
        self.engine = engine
        self.created = time.monotonic()
        self.started_at: float | None = None
        self.first_progress_at: float | None = None
        self.finished_at: float | None = None
        self.outcome: tuple | None = None
        self.progress: tuple[int, int] = (0, 0)
        self._events: queue.Queue = queue.Queue()
        self._loop = loop
        self._aqueue: asyncio.Queue | None = asyncio.Queue() if loop is not None else None

    @property
    def done(self) -> bool:
        return self.outcome is not None

    def _deliver(self, event: tuple) -> None:
        now = time.monotonic()
        kind = event[0]
        if kind == "started":
            self.started_at = now
        elif kind == "progress":
            self.progress = (event[1], event[2])
            if self.first_progress_at is None:
                self.first_progress_at = now
        elif kind in TERMINAL:
            if self.outcome is not None:
                return  # already answered (e.g. failed by the controller, then a late result)
            self.outcome = event
            self.finished_at = now
            self.engine._answered(self)
        self._events.put(event)
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._aqueue.put_nowait, event)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

    def events(self, timeout: float | None = None):
        """Yield events until a terminal one (raises queue.Empty after ``timeout`` of silence)."""
        while True:
            event = self._events.get(timeout=timeout)
            yield event
            if event[0] in TERMINAL:
                return

    async def next_event(self, timeout: float | None = None) -> tuple | None:
        """The next event, or None after ``timeout`` seconds (safe to call again: nothing is lost)."""
        try:
            return await asyncio.wait_for(self._aqueue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    def wait(self, timeout: float | None = None) -> tuple:
        """Block until the terminal event; returns it."""
        for event in self.events(timeout):
            if event[0] in TERMINAL:
                return event
        raise AssertionError("unreachable")

    def cancel(self) -> None:
        self.engine.cancel(self.id)


@dataclass
class _Stats:
    restarts: int = 0
    last_heartbeat: float = 0.0
    last_failure: str | None = None
    started_groups: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0


class Engine:
    """Start one resident group, run requests on it, rebuild it when a rank dies."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.state = "stopped"  # starting | ready | rebuilding | draining | stopped | failed
        self.group = None
        self.stats = _Stats()
        self._handles: dict[str, Handle] = {}  # admitted and not yet answered
        self._recent_seconds: deque[float] = deque(maxlen=16)  # admission to answer, for Retry-After
        self._lock = threading.RLock()
        self._monitor: threading.Thread | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.ranks_pids: list[int] = []

    # ------------------------------------------------------------------ lifecycle

    def start(self, wait: bool = True) -> "Engine":
        self.state = "starting"
        try:
            self._start_group()
        except Exception as exc:
            self.state = "failed"
            self.stats.last_failure = f"the worker group could not be started: {type(exc).__name__}: {exc}"
            self._ready.set()
            if wait:
                raise EngineUnavailable(self.stats.last_failure) from exc
            return self
        self._monitor = threading.Thread(target=self._watch, name="distgen-engine", daemon=True)
        self._monitor.start()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float | None = None) -> None:
        timeout = self.config.start_timeout_s if timeout is None else timeout
        if not self._ready.wait(timeout):
            raise EngineUnavailable(f"the worker group did not become ready within {timeout:.0f} s")
        if self.state == "failed":
            raise EngineUnavailable(self.stats.last_failure or "the worker group failed")

    def _start_group(self) -> None:
        from distgen.launch.groups import start_group

        self._ready.clear()
        self._started_at = time.monotonic()
        self.group = start_group(self.config.job, self.config.nproc, self.config.launcher,
                                 ray_address=self.config.ray_address, threads_per_rank=self.config.threads_per_rank)
        self.stats.started_groups += 1

    def stop(self, drain_timeout_s: float = 30.0) -> bool:
        """Stop admitting, let running and waiting requests finish (up to ``drain_timeout_s``), then
        stop the group. Returns True when everything admitted got its answer."""
        with self._lock:
            if self.state in ("ready", "starting", "rebuilding"):
                self.state = "draining"
        deadline = time.monotonic() + drain_timeout_s
        while time.monotonic() < deadline and self.pending():
            time.sleep(0.05)
        clean = not self.pending()
        for handle in list(self._handles.values()):
            if not handle.done:
                self.cancel(handle.id)
                handle._deliver(("error", 503, "the server is shutting down; the request was not finished"))
        self._stop.set()
        if self._monitor is not None:
            self._monitor.join(timeout=10)
        if self.group is not None:
            self.group.stop()
            self.group = None
        self.state = "stopped" if self.state != "failed" else "failed"
        self._ready.set()
        return clean and self.state != "failed"

    # ------------------------------------------------------------------ requests

    def pending(self) -> int:
        with self._lock:
            return sum(1 for h in self._handles.values() if not h.done)

    def running(self) -> int:
        with self._lock:
            return sum(1 for h in self._handles.values() if not h.done and h.started_at is not None)

    def waiting(self) -> int:
        with self._lock:
            return sum(1 for h in self._handles.values() if not h.done and h.started_at is None)

    def submit(self, kind: str, request: Any, options: dict | None = None, request_id: str | None = None) -> Handle:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        item = WorkItem(id=request_id or f"{kind}-{uuid.uuid4().hex[:12]}", kind=kind, request=request,
                        options=dict(options or {}))
        with self._lock:
            if self.state != "ready":
                raise EngineUnavailable(self._unavailable_reason())
            if self.pending() >= self.config.max_queued:
                raise QueueFull(f"the server is full: {self.config.max_queued} requests are already waiting or "
                                f"running (--max-queued); retry later", retry_after_s=self._retry_after())
            handle = Handle(item, self, loop)
            self._handles[item.id] = handle
            self.group.send(("submit", item))
        handle._deliver(("queued",))
        return handle

    def cancel(self, request_id: str) -> bool:
        with self._lock:
            handle = self._handles.get(request_id)
            if handle is None or handle.done:
                return False
            if self.group is not None:
                try:
                    self.group.send(("cancel", request_id))
                except Exception:  # noqa: BLE001 - a dead group: the failure path answers it
                    pass
        return True

    def _answered(self, handle: Handle) -> None:
        with self._lock:
            self._handles.pop(handle.id, None)
            self._recent_seconds.append(handle.finished_at - handle.created)

    def _retry_after(self) -> int:
        """Seconds until a slot is likely free: the mean admission-to-answer time of recent requests."""
        if not self._recent_seconds:
            return 1
        return max(1, round(sum(self._recent_seconds) / len(self._recent_seconds)))

    def _unavailable_reason(self) -> str:
        if self.state == "starting":
            return "the worker group is starting (loading the model); retry shortly"
        if self.state == "rebuilding":
            return f"the worker group is being rebuilt after a failure ({self.stats.last_failure}); retry shortly"
        if self.state == "draining":
            return "the server is shutting down and takes no new requests"
        if self.state == "failed":
            return f"the worker group is down: {self.stats.last_failure}"
        return "the engine is not running"

    # ------------------------------------------------------------------ health

    def health(self) -> dict:
        group = self.group
        dead = group.dead() if group is not None else []
        silent = time.monotonic() - self.stats.last_heartbeat if self.stats.last_heartbeat else None
        # Idle, the leader broadcasts a heartbeat every second; running, a step may take longer.
        fresh = silent is not None and (silent < 10.0 or (self.running() > 0 and silent < self.config.silence_timeout_s))
        healthy = self.state == "ready" and not dead and fresh
        return {
            "status": "ok" if healthy else self.state if self.state != "ready" else "unresponsive",
            "state": self.state,
            "ranks": self.config.nproc,
            "dead_ranks": [rank for rank, _ in dead],
            "pids": list(self.ranks_pids),  # per rank (same host only; Ray actors: their worker processes)
            "seconds_since_heartbeat": None if silent is None else round(silent, 3),
            "restarts": self.stats.restarts,
            "running": self.running(),
            "waiting": self.waiting(),
            "last_failure": self.stats.last_failure,
        }

    # ------------------------------------------------------------------ the watcher thread

    def _watch(self) -> None:
        while not self._stop.is_set():
            group = self.group
            if group is None:
                time.sleep(0.1)
                continue
            try:
                event = group.recv(0.1)
            except (EOFError, OSError):
                event = None
            if event is not None:
                self._dispatch(event)
                continue
            if self.state in ("failed", "stopped"):
                continue
            dead = group.dead()
            if dead and not self._stop.is_set():
                # a rank that raised reports why just before it exits: prefer its message
                deadline = time.monotonic() + 1.0
                while time.monotonic() < deadline and self.group is group:
                    late = group.recv(0.1)
                    if late is not None:
                        self._dispatch(late)
                if self.group is group:
                    rank, how = dead[0]
                    self._fail_group(f"rank {rank} {how}")
                continue
            now = time.monotonic()
            if self.state in ("starting", "rebuilding") and now - self._started_at > self.config.start_timeout_s:
                self._fail_group(f"the worker group did not load the model within {self.config.start_timeout_s:.0f} s")
            elif (self.state in ("ready", "draining") and self.stats.last_heartbeat
                  and now - self.stats.last_heartbeat > self.config.silence_timeout_s):
                self._fail_group(f"the worker group has not answered for {self.config.silence_timeout_s:.0f} s "
                                 "(hung collective?)")

    def _dispatch(self, event: tuple) -> None:
        kind = event[0]
        self.stats.last_heartbeat = time.monotonic()
        if kind == "ready":
            self.ranks_pids = list(getattr(self.group, "pids", []))
            with self._lock:
                resubmit = [h for h in self._handles.values() if not h.done and h.started_at is None]
                for handle in resubmit:  # waited through a rebuild: the new group runs them
                    self.group.send(("submit", handle.item))
                if self.state in ("starting", "rebuilding"):
                    self.state = "ready"
            self._ready.set()
            return
        if kind == "heartbeat" or kind == "stopped":
            return
        if kind in ("rank_error", "fatal"):
            if kind == "fatal":
                message, trace = event[1], event[2]
                where = "loading the model"
                text = f"rank 0 failed while {where}: {message}"
            else:
                rank, message, trace = event[1], event[2], event[3]
                text = f"rank {rank} failed: {message}"
                # a rank killed under a collective makes its peers fail first ("connection reset"):
                # name the rank that died, if one did
                deadline = time.monotonic() + 1.0
                while time.monotonic() < deadline and self.group is not None:
                    others = [(r, how) for r, how in self.group.dead() if r != rank]
                    if others:
                        text = f"rank {others[0][0]} {others[0][1]} (then rank {rank} failed: {message})"
                        break
                    time.sleep(0.05)
            logger.error("%s\n%s", text, trace)
            if not self._stop.is_set():
                self._fail_group(text, fatal=kind == "fatal")
            return
        handle = self._handles.get(event[1])
        if handle is None:
            return
        if kind == "started":
            handle._deliver(("started",))
        elif kind == "progress":
            handle._deliver(("progress", event[2], event[3], event[4]))
        elif kind == "result":
            handle._deliver(("result", event[2]))
            self.stats.completed += 1
        elif kind == "error":
            handle._deliver(("error", 500, event[2]))
            self.stats.failed += 1
        elif kind == "cancelled":
            handle._deliver(("cancelled",))
            self.stats.cancelled += 1

    def _fail_group(self, reason: str, fatal: bool = False) -> None:
        """A rank died or hung: answer the requests it was running, tear the group down, rebuild."""
        with self._lock:
            self.stats.last_failure = reason
            if self.state != "draining":
                self.state = "rebuilding"  # before anyone hears of the failure: /health must not say ok
            for handle in list(self._handles.values()):
                if not handle.done and handle.started_at is not None:
                    handle._deliver(("error", 503, f"the worker group failed while running this request: {reason}"))
                    self.stats.failed += 1
            old, self.group = self.group, None
        logger.error("worker group failed: %s", reason)
        if old is not None:
            old.kill()
        self.stats.restarts += 1
        if fatal or self.stats.restarts > self.config.max_restarts or self.state == "draining":
            with self._lock:
                self.state = "failed"
                for handle in list(self._handles.values()):
                    if not handle.done:
                        handle._deliver(("error", 503, f"the worker group is down: {reason}"))
            self._ready.set()
            return
        with self._lock:
            self.state = "rebuilding"
        try:
            self._start_group()
        except Exception as exc:  # noqa: BLE001 - e.g. Ray cannot place the group any more
            with self._lock:
                self.state = "failed"
                self.stats.last_failure = f"{reason}; rebuilding failed: {exc}"
                for handle in list(self._handles.values()):
                    if not handle.done:
                        handle._deliver(("error", 503, f"the worker group is down: {self.stats.last_failure}"))
            self._ready.set()


def run_once(job: ResidentJob, nproc: int, launcher: str, kind: str, request: Any, options: dict | None = None,
             ray_address: str | None = None, timeout_s: float | None = None, on_event=None) -> dict | None:
    """One-shot generation through the same engine as the server: start the group, submit one
    request, stop. Returns the request's result at the controller (None on torchrun ranks other
    than 0, which follow the leader until it stops). ``on_event(event)`` sees every event
    (progress bars). A failure raises :class:`distgen.launch.local.WorkerError` with the rank's
    message; an unfinished request after ``timeout_s`` is cancelled and raises as well."""
    from distgen.launch.local import WorkerError, in_torchrun

    if launcher == "auto":
        launcher = "torchrun" if in_torchrun() else "spawn"
    if launcher == "torchrun" and os.environ.get("RANK", "0") != "0":
        from distgen.launch.groups import follow

        follow(job)
        return None
    engine = Engine(EngineConfig(job=job, nproc=nproc, launcher=launcher, ray_address=ray_address, max_queued=1,
                                 max_restarts=0, start_timeout_s=timeout_s or 900.0))
    try:
        try:
            engine.start(wait=True)
        except EngineUnavailable as exc:
            raise WorkerError(str(exc).replace("the worker group is down: ", "")) from None
        handle = engine.submit(kind, request, options)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            try:
                event = next(handle.events(timeout=1.0))
            except queue.Empty:
                if deadline is not None and time.monotonic() > deadline:
                    handle.cancel()
                    raise WorkerError(f"the job did not finish within {timeout_s:.0f} s; all ranks were stopped")
                continue
            if on_event is not None:
                on_event(event)
            if event[0] == "result":
                return event[1]
            if event[0] == "error":
                raise WorkerError(event[2].replace("the worker group failed while running this request: ", "")
                                  .replace("the worker group is down: ", ""))
            if event[0] == "cancelled":
                raise WorkerError("the request was cancelled")
    finally:
        engine.stop(drain_timeout_s=0)
