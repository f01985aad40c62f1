"""Ray controller: ``--launcher ray``, and ``distgen ...`` run under ``ray job submit``.

One actor per rank, each pinned to its own bundle of a placement group (one GPU per rank when
the cluster has enough GPUs, else one CPU). Rank 0's actor reports its node's IP and a free
port; every actor sets the torchrun-style environment for that rendezvous and calls
:func:`distgen.runtime.worker.run_worker`, exactly as under torchrun or the local spawn
launcher. The first rank that fails stops every rank and its message is raised here as a
:class:`~distgen.launch.local.WorkerError`, so nothing hangs on a collective.

Which cluster:

* ``address`` (``--ray-address``), or ``RAY_ADDRESS`` in the environment (set by
  ``ray job submit``): join that cluster; it is left running.
* otherwise: start a private local Ray bound to 127.0.0.1 and shut it down afterwards.
* a Ray already initialised in this process is reused as it is (and left running).

Token authentication (Ray >= 2.5x): set ``RAY_AUTH_MODE=token`` and give the token with
``RAY_AUTH_TOKEN`` (the token itself), ``RAY_AUTH_TOKEN_PATH`` (a file holding it) or the
default file ``~/.ray/auth_token`` (``ray get-auth-token --generate`` writes it). Ray reads
these itself; the actors inherit them from the raylet. A local Ray started here with
``RAY_AUTH_MODE`` unset gets Ray's default: token auth on, with a token generated into
``~/.ray/auth_token`` if none exists. Joining a cluster by explicit address (argument or
``RAY_ADDRESS``) never turns token mode on by itself: set ``RAY_AUTH_MODE=token`` for that.
Inside ``ray job submit`` the job inherits these variables from ``ray start``.

Loopback: Ray normally replaces 127.0.0.1 by the machine's network address. The local Ray
started here is kept on 127.0.0.1 (see :func:`_loopback_only`); another driver joins such a
loopback-only Ray (or one from ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ray start --head
--node-ip-address 127.0.0.1``) only with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` set as well.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from typing import Any, Iterator

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from distgen.launch.local import WorkerError, free_port, rank_environment

__all__ = ["RankActor", "connect", "run_on_ray"]

LOOPBACK = "127.0.0.1"
# Ray's own switch for "this machine may be part of a multi-node cluster" (read once, when
# ray._private.ray_constants is imported). See _loopback_only().
_CLUSTER_SWITCH_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

_ANSI = re.compile(r"\x1b\[[0-9;]*m")

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """Keep a Ray started in this block on 127.0.0.1.

    ``ray.init(_node_ip_address="127.0.0.1")`` alone is not enough on Linux: Ray replaces a
    loopback node address by the machine's routable IP (``services.resolve_ip_for_localhost``)
    and its GCS, raylet and agents then listen on every interface. It keeps 127.0.0.1 (and
    binds its servers there) only when multi-node clusters are switched off, which is what
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` does. That variable is read when Ray is imported,
    so here it is set for the processes Ray starts and the already-imported constant is
    switched off for the duration of ``ray.init``.
    """
    from ray._private import ray_constants

    saved_env = os.environ.get(_CLUSTER_SWITCH_ENV)
    saved_flag = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    os.environ[_CLUSTER_SWITCH_ENV] = "0"
    if saved_flag is not None:
        ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if saved_flag is not None:
            ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(_CLUSTER_SWITCH_ENV, None)
        else:
            os.environ[_CLUSTER_SWITCH_ENV] = saved_env


def _refresh_auth_mode() -> None:
    """Make Ray see an RAY_AUTH_MODE set in os.environ after ``import ray``.

    Ray reads its config (auth mode included) when it is imported and refreshes it only when it
    turns token auth on by itself; without this, RAY_AUTH_MODE=token set later in this process
    would start a token-protected GCS that the driver then cannot talk to (or join a protected
    cluster without a token). Ray's own ``_enable_token_auth`` refreshes it the same way.
    """
    wanted = os.environ.get("RAY_AUTH_MODE")
    if wanted is None:
        return
    try:
        from ray._private.authentication.authentication_utils import get_authentication_mode_name
        from ray._raylet import AuthenticationTokenLoader, Config, get_authentication_mode
    except ImportError:  # a Ray without token authentication
        return
    if get_authentication_mode_name(get_authentication_mode()) != wanted.lower():
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Make sure this process is connected to Ray; returns True if it started a local Ray.

    Reuses a Ray already initialised in this process; joins ``address`` or ``RAY_ADDRESS``
    when either is given (use ``"auto"`` to join a cluster started by ``ray start`` on this
    machine); otherwise starts a local Ray on 127.0.0.1 with ``num_cpus`` CPUs (default: the
    machine's), no dashboard. The caller shuts down what this call started.
    """
    if ray.is_initialized():
        if address:
            logger.info("Ray is already initialised in this process; using it, not %s", address)
        return False
    _refresh_auth_mode()
    quiet = dict(logging_level=logging.WARNING, configure_logging=True, log_to_driver=True)
    if address or os.environ.get("RAY_ADDRESS"):
        # address=None lets Ray take RAY_ADDRESS itself (the case inside `ray job submit`).
        try:
            ray.init(address=address or None, **quiet)
        except ConnectionError as exc:
            raise ConnectionError(f"{exc}{_connect_hint(address or os.environ['RAY_ADDRESS'])}") from exc
        return False
    with _loopback_only():
        # "local" always starts a new Ray: None would join any cluster `ray start` left here.
        ray.init(
            address="local",
            _node_ip_address=LOOPBACK,
            include_dashboard=False,
            num_cpus=num_cpus or os.cpu_count() or 1,
            **quiet,
        )
    node_ip = ray.util.get_node_ip_address()
    if node_ip != LOOPBACK:
        logger.warning("the local Ray started on %s, not on %s", node_ip, LOOPBACK)
    return True


def _connect_hint(address: str) -> str:
    """What usually stops a driver from joining a cluster (Ray only logs the reason)."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        hint = ("; if the cluster uses token authentication, set RAY_AUTH_MODE=token and give its token "
                "in RAY_AUTH_TOKEN, in a file named by RAY_AUTH_TOKEN_PATH, or in ~/.ray/auth_token")
    else:
        hint = ("; token authentication is on: check that RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or "
                "~/.ray/auth_token holds this cluster's token")
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    if host in ("127.0.0.1", "localhost", "::1") and os.environ.get(_CLUSTER_SWITCH_ENV) != "0":
        hint += (f"; Ray rewrites {host} to this machine's network address, so a cluster bound to "
                 f"loopback only is joined with {_CLUSTER_SWITCH_ENV}=0 set (as it was started)")
    return hint


class RankActor:
    """One rank of the job, in its own Ray worker process (``ray.remote`` in run_on_ray)."""

    def __init__(self, env: dict[str, str] | None = None):
        if not ray.get_gpu_ids():
            # No GPU was reserved for this rank: do not touch the node's GPUs (since Ray 2.4x
            # a zero-GPU actor sees every GPU), or torch would pick CUDA on a shared device.
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        if env:
            os.environ.update({k: str(v) for k, v in env.items()})

    def describe(self, with_port: bool = False) -> dict:
        """Where this actor runs; rank 0's also carries a free port for the rendezvous."""
        ip = ray.util.get_node_ip_address()
        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "ip": ip,
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "port": free_port(ip) if with_port else None,
            "pid": os.getpid(),
        }

    def run(self, job: Any, rank: int, world_size: int, master_addr: str, master_port: int,
            local_rank: int | None = None, local_world_size: int | None = None) -> Any:
        gpu_ids = ray.get_gpu_ids()
        if len(gpu_ids) == 1:
            # Ray set CUDA_VISIBLE_DEVICES to this actor's one GPU: it is device 0 here.
            local_rank = 0
        os.environ.update(rank_environment(rank, world_size, master_addr, master_port, local_rank, local_world_size))
        threads = getattr(job, "threads_per_rank", None)
        if threads:
            os.environ["OMP_NUM_THREADS"] = str(threads)
            import torch

            torch.set_num_threads(int(threads))
        from distgen.runtime.worker import run_worker

        return run_worker(job)


def _unwrap(exc: BaseException) -> tuple[str, str]:
    """(``Type: message`` of the original error, its remote traceback or '')."""
    if isinstance(exc, ray.exceptions.RayTaskError):
        # What ray.get raises is a RayTaskError(Cause) subclass whose str() is the remote
        # traceback (attributes it lacks are looked up on the cause, so read .cause only).
        trace = _ANSI.sub("", str(exc))
        cause = exc.__dict__.get("cause")
        if isinstance(cause, BaseException):
            return f"{type(cause).__name__}: {cause}", trace
        return trace.strip().splitlines()[-1] if trace.strip() else type(exc).__name__, trace
    if isinstance(exc, ray.exceptions.RayActorError):
        return f"its Ray actor died: {exc}", ""
    return f"{type(exc).__name__}: {exc}", ""


def _gather(refs: list, deadline: float | None, what: str, timeout_s: float | None) -> list:
    """Results of ``refs`` (one per rank) in rank order; the first failure raises WorkerError."""
    rank_of = {ref: rank for rank, ref in enumerate(refs)}
    results: list = [None] * len(refs)
    pending = list(refs)
    while pending:
        wait_s = 1.0 if deadline is None else min(1.0, max(0.0, deadline - time.monotonic()))
        ready, pending = ray.wait(pending, num_returns=1, timeout=wait_s)
        if ready:
            # Everything else that is already done, so that simultaneous failures are seen
            # together; the first one back leads (the others are often its consequences).
            more, pending = ray.wait(pending, num_returns=len(pending), timeout=0) if pending else ([], [])
            failures = []
            for ref in ready + sorted(more, key=rank_of.__getitem__):
                try:
                    results[rank_of[ref]] = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - every failure is reported as the rank's
                    failures.append((rank_of[ref], *_unwrap(exc)))
            if failures:
                rank, text, trace = failures[0]
                message = f"rank {rank} failed: {text}"
                if trace:
                    message += f"\n--- traceback of rank {rank} ---\n{trace}"
                for other, other_text, _ in failures[1:]:
                    message += f"\n(rank {other} also failed: {other_text})"
                raise WorkerError(message)
        elif deadline is not None and time.monotonic() >= deadline:
            waiting = sorted(rank_of[r] for r in pending)
            raise WorkerError(
                f"the job did not finish within {timeout_s:.0f} s ({what}; ranks still running: "
                f"{', '.join(map(str, waiting))}); all ranks were stopped"
            )
    return results


def _reserve(nproc: int, deadline: float | None, placement_timeout_s: float):
    """A PACK placement group of one GPU (or CPU) bundle per rank; returns (pg, use_gpu)."""
    total = ray.cluster_resources()
    use_gpu = total.get("GPU", 0) >= nproc
    kind = "GPU" if use_gpu else "CPU"
    if 0 < total.get("GPU", 0) < nproc:
        logger.warning("the Ray cluster has %g GPUs for %d ranks: running every rank on CPU", total["GPU"], nproc)
    pg = placement_group([{kind: 1} for _ in range(nproc)], strategy="PACK")
    wait_s = placement_timeout_s
    if deadline is not None:
        wait_s = max(0.0, min(wait_s, deadline - time.monotonic()))
    if not pg.wait(timeout_seconds=wait_s):
        available = ray.available_resources()
        remove_placement_group(pg)
        raise WorkerError(
            f"could not place {nproc} ranks within {wait_s:.0f} s: the job needs {nproc} {kind}s "
            f"(one per rank), the Ray cluster has {available.get(kind, 0):g} {kind}s available of "
            f"{total.get(kind, 0):g} in total ({total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs)"
        )
    return pg, use_gpu


def _local_ranks(where: list[dict]) -> tuple[list[int], dict[str, int]]:
    """Each rank's index among the ranks on its node, and the ranks per node (LOCAL_RANK / LOCAL_WORLD_SIZE)."""
    node_size: dict[str, int] = {}
    local_ranks = []
    for info in where:
        local_ranks.append(node_size.get(info["node_id"], 0))
        node_size[info["node_id"]] = local_ranks[-1] + 1
    return local_ranks, node_size


def run_on_ray(job: Any, nproc: int, address: str | None = None, timeout_s: float | None = None,
               env: dict[str, str] | None = None, placement_timeout_s: float = 60.0) -> Any:
    """Run ``job`` on ``nproc`` Ray actors (one per rank); return rank 0's result.

    ``address``: Ray cluster to join (default ``RAY_ADDRESS``, else a private local Ray on
    127.0.0.1). ``timeout_s``: the whole job, from placement to the last rank's result.
    ``env``: extra environment variables for every rank. ``placement_timeout_s``: how long to
    wait for the cluster to free one GPU/CPU per rank.
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    out = getattr(job, "out", None)
    if out and not os.path.isabs(out) and hasattr(job, "replace"):
        # Rank 0 writes it from its actor, whose working directory is the raylet's when the
        # cluster was joined by address: keep "relative to where distgen was started".
        job = job.replace(out=os.path.abspath(out))
    started = connect(address, num_cpus=max(nproc, os.cpu_count() or 1))
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    pg, actors = None, []
    try:
        pg, use_gpu = _reserve(nproc, deadline, placement_timeout_s)
        remote_actor = ray.remote(RankActor)
        for rank in range(nproc):
            options = dict(
                num_cpus=0 if use_gpu else 1,
                num_gpus=1 if use_gpu else 0,
                max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=rank
                ),
            )
            actors.append(remote_actor.options(**options).remote(env))
        where = _gather([a.describe.remote(rank == 0) for rank, a in enumerate(actors)], deadline,
                        "starting the actors", timeout_s)
        master_addr, master_port = where[0]["ip"], where[0]["port"]
        local_ranks, node_size = _local_ranks(where)
        refs = [
            actor.run.remote(job, rank, nproc, master_addr, master_port, local_ranks[rank],
                             node_size[where[rank]["node_id"]])
            for rank, actor in enumerate(actors)
        ]
        return _gather(refs, deadline, "running", timeout_s)[0]
    finally:
        for actor in actors:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        if pg is not None:
            with contextlib.suppress(Exception):
                remove_placement_group(pg)
        if started:
            ray.shutdown()


# --------------------------------------------------------------------------- resident groups


class ResidentRankActor(RankActor):
    """One rank of a resident group. ``serve`` runs the rank's loop for the group's life (on the
    actor's default thread); rank 0's channel is a pair of actor-local queues that the controller
    fills and drains with ``push`` and ``pull``, each in its own concurrency group so that they
    never wait behind the loop or each other, and commands keep their order."""

    def __init__(self, env: dict[str, str] | None = None):
        import queue as _queue

        super().__init__(env)
        self._commands: _queue.Queue = _queue.Queue()
        self._events: _queue.Queue = _queue.Queue()

    def serve(self, job: Any, rank: int, world_size: int, master_addr: str, master_port: int,
              local_rank: int | None = None, local_world_size: int | None = None) -> None:
        from distgen.runtime.resident import QueueChannel

        self._channel = QueueChannel(self._commands, self._events) if rank == 0 else None
        gpu_ids = ray.get_gpu_ids()
        if len(gpu_ids) == 1:
            local_rank = 0
        os.environ.update(rank_environment(rank, world_size, master_addr, master_port, local_rank, local_world_size))
        from distgen.runtime.worker import run_worker

        run_worker(job, self._channel)

    @ray.method(concurrency_group="push")
    def push(self, command) -> None:
        self._commands.put(command)

    @ray.method(concurrency_group="pull")
    def pull(self, timeout: float) -> list:
        import queue as _queue

        events = []
        try:
            events.append(self._events.get(timeout=timeout))
            while True:
                events.append(self._events.get_nowait())
        except _queue.Empty:
            pass
        return events


def placement_bundles(parallel, nproc: int) -> list[tuple[str, int]]:
    """Placement groups for a plan, as (strategy, bundles), in rank order: each ``tp`` group (adjacent
    ranks: tp is the innermost mesh axis) packed onto one node, since its all-reduces sit on every
    layer's critical path; everything else (pp stages, cfg / dp replicas, patch ranks) may spread
    over nodes by PACK."""
    tp = parallel.degree("tp") if parallel is not None else 1
    if tp > 1 and nproc % tp == 0:
        return [("STRICT_PACK", tp)] * (nproc // tp)
    return [("PACK", nproc)]


class RayGroup:
    """A resident group on Ray actors: the engine's interface (see :mod:`distgen.launch.groups`)."""

    def __init__(self, job: Any, nproc: int, address: str | None = None, placement_timeout_s: float = 60.0,
                 env: dict[str, str] | None = None):
        self.started_ray = connect(address, num_cpus=max(nproc, os.cpu_count() or 1))
        self.nproc = nproc
        self.pgs, self.actors, self.refs = [], [], []
        self._buffer: list = []
        self._pull = None
        self.where: list[dict] = []
        try:
            self._start(job, nproc, placement_timeout_s, env)
        except BaseException:
            self.kill()
            raise

    def _start(self, job, nproc, placement_timeout_s, env) -> None:
        total = ray.cluster_resources()
        use_gpu = total.get("GPU", 0) >= nproc
        kind = "GPU" if use_gpu else "CPU"
        slots = []  # (placement group, bundle index) per rank
        for strategy, size in placement_bundles(getattr(job, "parallel", None), nproc):
            pg = placement_group([{kind: 1} for _ in range(size)], strategy=strategy)
            self.pgs.append(pg)
            slots.extend((pg, i) for i in range(size))
        for pg in self.pgs:
            if not pg.wait(timeout_seconds=placement_timeout_s):
                available = ray.available_resources()
                raise WorkerError(
                    f"could not place {nproc} ranks within {placement_timeout_s:.0f} s as "
                    f"{placement_bundles(getattr(job, 'parallel', None), nproc)} (strategy, ranks) groups: the "
                    f"cluster has {available.get(kind, 0):g} {kind}s available of {total.get(kind, 0):g}")
        remote = ray.remote(concurrency_groups={"push": 1, "pull": 1})(ResidentRankActor)
        for pg, index in slots:
            self.actors.append(remote.options(
                num_cpus=0 if use_gpu else 1, num_gpus=1 if use_gpu else 0, max_restarts=0, max_concurrency=1,
                scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg,
                                                                     placement_group_bundle_index=index),
            ).remote(env))
        where = _gather([a.describe.remote(rank == 0) for rank, a in enumerate(self.actors)], None,
                        "starting the actors", None)
        self.where = where
        master_addr, master_port = where[0]["ip"], where[0]["port"]
        local_ranks, node_size = _local_ranks(where)
        self.refs = [actor.serve.remote(job, rank, nproc, master_addr, master_port, local_ranks[rank],
                                        node_size[where[rank]["node_id"]])
                     for rank, actor in enumerate(self.actors)]

    @property
    def pids(self) -> list:
        return [info["pid"] for info in self.where]

    def send(self, command) -> None:
        self.actors[0].push.remote(command)

    def recv(self, timeout: float):
        if self._buffer:
            return self._buffer.pop(0)
        if self._pull is None:
            self._pull = self.actors[0].pull.remote(0.5)
        ready, _ = ray.wait([self._pull], timeout=timeout)
        if not ready:
            return None
        ref, self._pull = self._pull, None
        try:
            self._buffer.extend(ray.get(ref))
        except Exception:  # noqa: BLE001 - rank 0's actor died: dead() says so
            return None
        return self._buffer.pop(0) if self._buffer else None

    def dead(self) -> list[tuple[int, str]]:
        if not self.refs:
            return []
        ready, _ = ray.wait(self.refs, num_returns=len(self.refs), timeout=0)
        out = []
        for ref in ready:
            rank = self.refs.index(ref)
            try:
                ray.get(ref)
                out.append((rank, "stopped"))
            except Exception as exc:  # noqa: BLE001
                text, _ = _unwrap(exc)
                out.append((rank, text if text.startswith("its Ray actor died") else f"failed: {text}"))
        # an actor that died makes its peers' collectives fail: it is the cause, so it comes first
        return sorted(out, key=lambda item: (not item[1].startswith("its Ray actor died"), item[0]))

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.actors:
            with contextlib.suppress(Exception):
                self.send(("stop",))
                ray.wait(self.refs, num_returns=len(self.refs), timeout=timeout_s)
        self.kill()
        if self.started_ray:
            with contextlib.suppress(Exception):
                ray.shutdown()
            self.started_ray = False

    def kill(self) -> None:
        """Remove the actors and placement groups; a Ray this group started stays up (a rebuilt
        group reuses it) until :meth:`stop`."""
        for actor in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        for pg in self.pgs:
            with contextlib.suppress(Exception):
                remove_placement_group(pg)
        self.actors, self.pgs, self.refs = [], [], []
