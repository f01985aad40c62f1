"""Exchange engine (ALGORITHMS.md §1).

Strategies never call ``torch.distributed`` for activations themselves; they go through an
:class:`ExchangeEngine` bound to the process group of their mesh axis, so that every byte
sent and every second spent waiting is accounted in one :class:`CommStats`.

Three kinds of traffic:

* **blocking collectives** (``all_gather``, ``all_reduce``) for values needed right now
  (gathering output bands, CFG halves, synchronous steps), and ``all_reduce_async`` for sums
  needed one sub-block later (tensor parallelism, Ladder Residual);
* **stale slots** (``gather_now`` / ``stale`` / ``enqueue``): DistriFusion's displaced
  exchange. A slot is registered the first time a layer gathers it (shape, dtype); at the
  first ``enqueue`` the registered slots are laid out in execution order into static flat
  buffers, cut into buckets of ``bucket_bytes``. A layer reads its stale copy (which waits the
  bucket's handle lazily), consumes it, then enqueues its fresh value; when the last slot of a
  bucket is filled, the bucket goes out as one async all_gather, waited at the next step;
* **halos** (``post_halo`` / ``halo``): neighbour-only point-to-point exchange with ranks
  i-1 and i+1 (conv halos, PCPP's partial K/V rows).

Buffers handed out by ``stale`` and ``halo`` are reused by the next exchange of the same
slot: consume (copy / cat) them before enqueueing or posting the fresh value.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from distgen.comm import shm


@dataclass
class StepStats:
    bytes_sent: int = 0
    bytes_recv: int = 0
    wait_s: float = 0.0
    collectives: int = 0
    # bytes this rank sent to each peer (global rank) by point-to-point / all-to-all traffic
    sent_to: dict[int, int] = field(default_factory=dict)


@dataclass
class CommStats:
    """Per-step accounting shared by every engine of one worker."""

    steps: list[StepStats] = field(default_factory=list)
    current: StepStats = field(default_factory=StepStats)

    def begin_step(self) -> None:
        self.current = StepStats()

    def end_step(self) -> None:
        self.steps.append(self.current)
        self.current = StepStats()

    def reset(self) -> None:
        self.steps.clear()
        self.current = StepStats()


class _Bucket:
    def __init__(self, slots: list["_Slot"], world: int, dtype: torch.dtype, device: torch.device):
        self.slots = slots
        numel = sum(s.numel for s in slots)
        self.send = torch.empty(numel, dtype=dtype, device=device)
        self.recv = [torch.empty(numel, dtype=dtype, device=device) for _ in range(world)]
        self.filled = 0
        self.handle = None


class _Slot:
    def __init__(self, name: str, shape: torch.Size, dtype: torch.dtype, world: int, device: torch.device):
        self.name = name
        self.shape = shape
        self.dtype = dtype
        self.numel = shape.numel()
        # Before buckets exist each slot owns its buffers; afterwards these become views.
        self.send = torch.empty(shape, dtype=dtype, device=device)
        self.recv = [torch.empty(shape, dtype=dtype, device=device) for _ in range(world)]
        self.bucket: _Bucket | None = None


class _Halo:
    def __init__(self, index: int):
        self.index = index
        self.from_prev: torch.Tensor | None = None
        self.from_next: torch.Tensor | None = None
        self.works: list = []
        self.keepalive: list[torch.Tensor] = []
        # Same-host transport: a shared-memory region (False: gloo), posts made and read.
        self.region = None
        self.posted = 0
        self.read = 0


class Pending:
    """An async exchange in flight; ``wait()`` returns its result and accounts the wait.

    Holds the buffers it sends from and receives into until waited: never write to them
    before, and keep this object referenced (ALGORITHMS.md §6).
    """

    def __init__(self, stats: CommStats, works: list, result, keepalive: tuple = ()):
        self._stats = stats
        self._works = works
        self._result = result
        self._keepalive = keepalive

    @property
    def done(self) -> bool:
        return not self._works

    def wait(self):
        if self._works:
            t0 = time.perf_counter()
            for work in self._works:
                work.wait()
            self._stats.current.wait_s += time.perf_counter() - t0
            self._works, self._keepalive = [], ()
        return self._result


class ExchangeEngine:
    """Communication for one process group (one mesh axis) of one worker."""

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        stats: CommStats,
        device: torch.device,
        bucket_bytes: int = 4 << 20,
        timeout_s: float = 300.0,
        shared_memory: bool | None = None,
    ):
        self.group = group
        self.stats = stats
        self.device = device
        self.bucket_bytes = bucket_bytes
        self.rank = dist.get_rank(group) if group is not None else 0
        self.world = dist.get_world_size(group) if group is not None else 1
        self._slots: dict[str, _Slot] = {}
        self._slot_order: list[_Slot] = []
        self._buckets: list[_Bucket] | None = None
        self._halos: dict[str, _Halo] = {}
        self.timeout_s = timeout_s
        # Small CPU all-gathers, all-reduces and all-to-alls between ranks of one host go through shared
        # memory (see distgen.comm.shm); opened at the first such collective, which every rank makes.
        # ``shared_memory``: None follows DISTGEN_SHM (default on where supported).
        wanted = shm.enabled() if shared_memory is None else shared_memory and shm.supported()
        self._shm = "unopened" if wanted and device.type == "cpu" and self.world > 1 else None

    # ------------------------------------------------------------------ helpers
    def _global(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group, group_rank)

    def _wait(self, work) -> None:
        t0 = time.perf_counter()
        work.wait()
        self.stats.current.wait_s += time.perf_counter() - t0

    def _channel(self) -> "shm.ShmChannel | None":
        """The same-host shared-memory channel, opened (collectively) on first use."""
        if self._shm == "unopened":
            self._shm = shm.ShmChannel.open(self.group, self.timeout_s)
        return self._shm

    def _account_gather(self, nbytes: int) -> None:
        # Logical traffic of an all_gather: my piece to every peer, every peer's piece to me.
        self.stats.current.bytes_sent += nbytes * (self.world - 1)
        self.stats.current.bytes_recv += nbytes * (self.world - 1)
        self.stats.current.collectives += 1

    # --------------------------------------------------------- blocking collectives
    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's tensor, in group-rank order (blocking, timed)."""
        if self.world == 1:
            return [tensor]
        nbytes = tensor.numel() * tensor.element_size()
        self._account_gather(nbytes)
        if tensor.device.type == "cpu" and self._channel() is not None:
            t0 = time.perf_counter()
            out = self._shm.all_gather(tensor)  # copies a strided tensor straight into shared memory
            if out is not None:
                self.stats.current.wait_s += time.perf_counter() - t0
                return out
        tensor = tensor.contiguous()
        out = [torch.empty_like(tensor) for _ in range(self.world)]
        self._wait(dist.all_gather(out, tensor, group=self.group, async_op=True))
        return out

    def _account_reduce(self, nbytes: int) -> None:
        # Ring all-reduce moves about 2 (n-1)/n of the buffer each way (counted alike on both transports).
        moved = 2 * nbytes * (self.world - 1) // self.world
        self.stats.current.bytes_sent += moved
        self.stats.current.bytes_recv += moved
        self.stats.current.collectives += 1

    def _shm_reduce(self, tensor: torch.Tensor, out: torch.Tensor) -> "shm.ShmReduce | None":
        """Publish ``tensor`` for a same-host all-reduce into ``out``; None: use gloo (on every rank)."""
        if tensor.device.type != "cpu" or self._channel() is None:
            return None
        t0 = time.perf_counter()
        work = self._shm.all_reduce_start(tensor, out)  # may wait for a peer to read an old slot
        self.stats.current.wait_s += time.perf_counter() - t0
        return work

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the group (blocking, timed); returns a new tensor."""
        if self.world == 1:
            return tensor
        self._account_reduce(tensor.numel() * tensor.element_size())
        out = torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device)
        work = self._shm_reduce(tensor, out)  # same bits as gloo's ring (shm.ring_sum)
        if work is None:
            out.copy_(tensor)
            work = dist.all_reduce(out, group=self.group, async_op=True)
        self._wait(work)
        return out

    def gather(self, tensor: torch.Tensor, dst: int = 0) -> list[torch.Tensor] | None:
        """Every rank's tensor (equal shapes), in group-rank order, at group rank ``dst`` only.

        Blocking, timed; other ranks get None. For results one rank writes (a video's
        frames): unlike ``all_gather``, the other ranks never hold the whole.
        """
        if self.world == 1:
            return [tensor]
        tensor = tensor.contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        current = self.stats.current
        current.collectives += 1
        if self.rank == dst:
            out = [torch.empty_like(tensor) for _ in range(self.world)]
            current.bytes_recv += nbytes * (self.world - 1)
        else:
            out = None
            current.bytes_sent += nbytes
            g = self._global(dst)
            current.sent_to[g] = current.sent_to.get(g, 0) + nbytes
        self._wait(dist.gather(tensor, out, dst=self._global(dst), group=self.group, async_op=True))
        return out

    def all_reduce_async(self, tensor: torch.Tensor) -> Pending:
        """Sum over the group in place, asynchronously; ``wait()`` returns ``tensor``.

        Used where the result is needed one sub-block later (Ladder Residual): the caller
        must not touch ``tensor`` until waited.
        """
        if self.world == 1:
            return Pending(self.stats, [], tensor)
        if not tensor.is_contiguous():
            raise ValueError("all_reduce_async needs a contiguous tensor (it reduces in place)")
        self._account_reduce(tensor.numel() * tensor.element_size())
        # Same host: this rank's part is copied out now; wait() reads the others' and sums
        # into ``tensor`` (so the call costs a copy, the sum happens where it is needed).
        work = self._shm_reduce(tensor, tensor)
        if work is None:
            work = dist.all_reduce(tensor, group=self.group, async_op=True)
        return Pending(self.stats, [work], tensor)

    def all_to_all(
        self,
        tensor: torch.Tensor,
        send_counts: list[int] | None = None,
        recv_counts: list[int] | None = None,
        async_op: bool = False,
    ):
        """Rows of ``tensor`` (dim 0) scattered to the group, block ``i`` to group rank ``i``.

        Even split when the counts are omitted (Ulysses); uneven with per-rank row counts
        (expert parallelism, where a rank may send or receive nothing). Returns the received
        rows in group-rank order, or a :class:`Pending` of them with ``async_op``.
        """
        tensor = tensor.contiguous()
        rows = tensor.shape[0]
        if send_counts is None:
            if rows % self.world:
                raise ValueError(f"all_to_all: {rows} rows do not split evenly over {self.world} ranks")
            send_counts = [rows // self.world] * self.world
        if recv_counts is None:
            recv_counts = list(send_counts)
        if len(send_counts) != self.world or len(recv_counts) != self.world or sum(send_counts) != rows:
            raise ValueError(f"all_to_all: counts {send_counts}/{recv_counts} do not match {rows} rows, {self.world} ranks")
        out = tensor.new_empty((sum(recv_counts), *tensor.shape[1:]))
        if self.world == 1:
            out.copy_(tensor)
            return Pending(self.stats, [], out) if async_op else out
        row_bytes = torch.Size(tensor.shape[1:]).numel() * tensor.element_size()
        current = self.stats.current
        for peer, count in enumerate(send_counts):
            if peer != self.rank:
                current.bytes_sent += count * row_bytes
                g = self._global(peer)
                current.sent_to[g] = current.sent_to.get(g, 0) + count * row_bytes
        current.bytes_recv += sum(c for i, c in enumerate(recv_counts) if i != self.rank) * row_bytes
        current.collectives += 1
        work = None
        if tensor.device.type == "cpu" and self._channel() is not None:  # same host: rows move through /dev/shm
            t0 = time.perf_counter()
            work = self._shm.all_to_all_start(tensor, send_counts, recv_counts, out, self.group)
            current.wait_s += time.perf_counter() - t0
        if work is None:
            work = dist.all_to_all_single(
                out, tensor, output_split_sizes=list(recv_counts), input_split_sizes=list(send_counts),
                group=self.group, async_op=True,
            )
        pending = Pending(self.stats, [work], out, keepalive=(tensor,))
        return pending if async_op else pending.wait()

    def exchange(
        self,
        sends: dict[int, torch.Tensor],
        recvs: dict[int, torch.Tensor],
        tag: int = 0,
    ) -> Pending:
        """Point-to-point: send ``sends[peer]`` and receive into ``recvs[peer]`` (group ranks).

        All posted as one ``batch_isend_irecv`` (separately issued NCCL P2P ops between the
        same two ranks can deadlock). Pipeline stages and ring attention use this; receives
        can be posted ahead of the sends that will match them on the peer.
        """
        if self.world == 1 or (not sends and not recvs):
            return Pending(self.stats, [], recvs)
        ops = []
        current = self.stats.current
        keep = []
        for peer, buf in recvs.items():
            ops.append(dist.P2POp(dist.irecv, buf, self._global(peer), self.group, tag))
            current.bytes_recv += buf.numel() * buf.element_size()
        for peer, t in sends.items():
            t = t.contiguous()
            keep.append(t)
            g = self._global(peer)
            ops.append(dist.P2POp(dist.isend, t, g, self.group, tag))
            nbytes = t.numel() * t.element_size()
            current.bytes_sent += nbytes
            current.sent_to[g] = current.sent_to.get(g, 0) + nbytes
        current.collectives += 1
        return Pending(self.stats, dist.batch_isend_irecv(ops), recvs, keepalive=tuple(keep))

    def shift(self, tensor: torch.Tensor, offset: int = 1) -> Pending:
        """Send ``tensor`` to rank ``i+offset`` and receive rank ``i-offset``'s (ring); async."""
        if self.world == 1:
            return Pending(self.stats, [], tensor)
        dst = (self.rank + offset) % self.world
        src = (self.rank - offset) % self.world
        buf = torch.empty_like(tensor)
        pending = self.exchange({dst: tensor}, {src: buf})
        pending._result = buf
        return pending

    # ------------------------------------------------------------------ stale slots
    def _slot(self, name: str, like: torch.Tensor) -> _Slot:
        slot = self._slots.get(name)
        if slot is None:
            if self._buckets is not None:
                raise RuntimeError(
                    f"exchange slot {name!r} registered after the buffers were laid out; every exchanged "
                    "tensor must appear in the first (synchronous) step"
                )
            slot = _Slot(name, like.shape, like.dtype, self.world, self.device)
            self._slots[name] = slot
            self._slot_order.append(slot)
        elif slot.shape != like.shape or slot.dtype != like.dtype:
            raise RuntimeError(
                f"exchange slot {name!r} was registered as {tuple(slot.shape)} {slot.dtype}, now used with "
                f"{tuple(like.shape)} {like.dtype}; reset the engine between requests of different shapes"
            )
        return slot

    def gather_now(self, name: str, fresh: torch.Tensor) -> list[torch.Tensor]:
        """Blocking all_gather of a slot; the result also serves as the next step's stale copy."""
        slot = self._slot(name, fresh)
        if slot.bucket is not None and slot.bucket.handle is not None:
            self._wait(slot.bucket.handle)
            slot.bucket.handle = None
        if self.world == 1:
            slot.recv[0].copy_(fresh)
            return slot.recv
        slot.send.copy_(fresh)
        self._account_gather(slot.numel * fresh.element_size())
        # Bucket views are contiguous slices, so the gather lands straight in the static buffers.
        work = dist.all_gather(slot.recv, slot.send, group=self.group, async_op=True)
        self._wait(work)
        return slot.recv

    def stale(self, name: str) -> list[torch.Tensor]:
        """Every rank's value of this slot from the previous step (waits lazily)."""
        slot = self._slots.get(name)
        if slot is None:
            raise RuntimeError(f"exchange slot {name!r} has no previous value; run a synchronous step first")
        bucket = slot.bucket
        if bucket is not None and bucket.handle is not None:
            self._wait(bucket.handle)
            bucket.handle = None
        return slot.recv

    def enqueue(self, name: str, fresh: torch.Tensor) -> None:
        """Queue this step's value for the next step; buckets go out when full (async)."""
        if self._buckets is None:
            self._layout_buckets()
        slot = self._slot(name, fresh)
        bucket = slot.bucket
        assert bucket is not None
        if bucket.handle is not None:  # never overwrite a buffer with a collective in flight
            self._wait(bucket.handle)
            bucket.handle = None
        slot.send.copy_(fresh)
        bucket.filled += 1
        if bucket.filled == len(bucket.slots):
            bucket.filled = 0
            if self.world == 1:
                bucket.recv[0].copy_(bucket.send)
                return
            self._account_gather(bucket.send.numel() * bucket.send.element_size())
            bucket.handle = dist.all_gather(bucket.recv, bucket.send, group=self.group, async_op=True)

    def _layout_buckets(self) -> None:
        buckets: list[_Bucket] = []
        current: list[_Slot] = []
        current_bytes = 0
        for slot in self._slot_order:
            nbytes = slot.numel * slot.send.element_size()
            if current and (current_bytes + nbytes > self.bucket_bytes or slot.dtype != current[0].dtype):
                buckets.append(self._make_bucket(current))
                current, current_bytes = [], 0
            current.append(slot)
            current_bytes += nbytes
        if current:
            buckets.append(self._make_bucket(current))
        self._buckets = buckets

    def _make_bucket(self, slots: list[_Slot]) -> _Bucket:
        bucket = _Bucket(slots, self.world, slots[0].dtype, self.device)
        offset = 0
        for slot in slots:
            send_view = bucket.send[offset : offset + slot.numel].view(slot.shape)
            recv_views = [r[offset : offset + slot.numel].view(slot.shape) for r in bucket.recv]
            for dst, src in zip(recv_views, slot.recv):  # keep the last synchronous values
                dst.copy_(src)
            slot.send, slot.recv, slot.bucket = send_view, recv_views, bucket
            offset += slot.numel
        return bucket

    @property
    def registered_bytes(self) -> int:
        return sum(s.numel * s.send.element_size() for s in self._slot_order)

    # ------------------------------------------------------------------------ halos
    def post_halo(
        self,
        name: str,
        to_prev: torch.Tensor | None,
        to_next: torch.Tensor | None,
        from_prev_shape: torch.Size | None = None,
        from_next_shape: torch.Size | None = None,
    ) -> None:
        """Send rows to ranks i-1 / i+1 and post the matching receives (async).

        Receive shapes default to the mirror image (equal bands): what rank i-1 sends down
        has the shape of what this rank sends down.
        """
        halo = self._halos.get(name)
        if halo is None:
            halo = self._halos[name] = _Halo(len(self._halos))
        if halo.works:
            self._finish_halo(halo)
        if self.world == 1:
            return
        if halo.region is None:  # first post of this name: every rank decides the transport together
            halo.region = False
            if to_prev is not None and to_next is not None and to_prev.device.type == "cpu" \
                    and self._channel() is not None:
                halo.region = self._shm.region([_nbytes(to_prev), _nbytes(to_next)]) or False
        if halo.region and halo.posted > halo.read:
            self._read_shm_halo(halo)  # a peer may overwrite our last post's parity only after we read theirs
        has_prev, has_next = self.rank > 0, self.rank < self.world - 1
        # Receive buffers (reused while the shape holds) and accounting, the same for both transports.
        if has_prev:
            halo.from_prev = self._receive_buffer(halo.from_prev, from_prev_shape or to_next.shape, to_prev)  # type: ignore[union-attr]
        if has_next:
            halo.from_next = self._receive_buffer(halo.from_next, from_next_shape or to_prev.shape, to_next)  # type: ignore[union-attr]
        self.stats.current.collectives += 1
        if halo.region:
            halo.region.write([to_prev if has_prev else None, to_next if has_next else None])
            halo.posted += 1
            return
        tag_down, tag_up = 2 * halo.index + 1, 2 * halo.index + 2
        ops, keep = [], []
        if has_prev:
            send = to_prev.contiguous()
            keep.append(send)
            prev = self._global(self.rank - 1)
            ops.append(dist.P2POp(dist.irecv, halo.from_prev, prev, self.group, tag_down))
            ops.append(dist.P2POp(dist.isend, send, prev, self.group, tag_up))
        if has_next:
            send = to_next.contiguous()
            keep.append(send)
            nxt = self._global(self.rank + 1)
            ops.append(dist.P2POp(dist.irecv, halo.from_next, nxt, self.group, tag_up))
            ops.append(dist.P2POp(dist.isend, send, nxt, self.group, tag_down))
        # One batch: on NCCL, separately issued sends/receives between two ranks can deadlock.
        halo.works, halo.keepalive = dist.batch_isend_irecv(ops), keep

    def _receive_buffer(self, buffer: torch.Tensor | None, shape: torch.Size, send: torch.Tensor) -> torch.Tensor:
        """The buffer for what comes back for ``send`` (kept while its shape holds); accounts both."""
        if buffer is None or buffer.shape != shape:
            buffer = torch.empty(shape, dtype=send.dtype, device=self.device)
        self.stats.current.bytes_sent += _nbytes(send)
        self.stats.current.bytes_recv += _nbytes(buffer)
        return buffer

    def _read_shm_halo(self, halo: _Halo) -> None:
        t0 = time.perf_counter()
        n, region = halo.posted, halo.region
        neighbours = [r for r in (self.rank - 1, self.rank + 1) if 0 <= r < self.world]
        region.wait(neighbours, n)
        if self.rank > 0:  # rank i-1's part 1 (what it sends down)
            halo.from_prev.copy_(region.read(self.rank - 1, n, 1, halo.from_prev.dtype, halo.from_prev.shape))
        if self.rank < self.world - 1:  # rank i+1's part 0 (what it sends up)
            halo.from_next.copy_(region.read(self.rank + 1, n, 0, halo.from_next.dtype, halo.from_next.shape))
        halo.read = n
        self.stats.current.wait_s += time.perf_counter() - t0

    def _finish_halo(self, halo: _Halo) -> None:
        t0 = time.perf_counter()
        for work in halo.works:
            work.wait()
        self.stats.current.wait_s += time.perf_counter() - t0
        halo.works, halo.keepalive = [], []

    def halo(self, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(rows from rank i-1, rows from rank i+1) of the last post; None at the image border."""
        halo = self._halos.get(name)
        if halo is None:
            raise RuntimeError(f"halo {name!r} was never posted; run a synchronous step first")
        if halo.works:
            self._finish_halo(halo)
        if halo.region and halo.posted > halo.read:
            self._read_shm_halo(halo)
        return (halo.from_prev if self.rank > 0 else None, halo.from_next if self.rank < self.world - 1 else None)

    # ---------------------------------------------------------------------- lifecycle
    def drain(self) -> None:
        """Wait every outstanding exchange (end of a request)."""
        for bucket in self._buckets or []:
            if bucket.handle is not None:
                self._wait(bucket.handle)
                bucket.handle = None
            bucket.filled = 0
        for halo in self._halos.values():
            if halo.works:
                self._finish_halo(halo)
            if halo.region and halo.posted > halo.read:
                self._read_shm_halo(halo)

    def reset(self) -> None:
        """Forget registered slots and halos (a new request may have other shapes)."""
        self.drain()
        self._slots.clear()
        self._slot_order.clear()
        self._buckets = None
        for halo in self._halos.values():
            if halo.region:
                self._shm.release(halo.region)
        self._halos.clear()


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
