"""Same-host transport for the exchange engine: small-latency exchanges through /dev/shm.

gloo moves every message through TCP and a background thread: on a loaded CPU host a small
blocking collective costs about a millisecond, mostly thread wake-ups. Clip parallelism makes
~90 such exchanges per denoiser call (chained GroupNorm statistics, per-stage halos), so that
latency, not the bytes, is what it pays. vLLM's and DeepSpeed's CPU inference paths bypass gloo
with shared memory for the same reason; this is ours, used by ``ExchangeEngine`` for blocking
all-gathers and for halos when every rank of the group is on this host.

A region is a file in /dev/shm, unlinked as soon as every rank has mapped it (nothing is left
behind even if a process dies): one 64-byte line per rank holding the number of its last
write, then two parities x ranks slots of fixed parts. Write n goes to the writer's slot of
parity n % 2 and is published by storing n; readers copy once the writers' counters reach n.
Two parities suffice when a rank reads a peer's write n before making its own write n + 2,
which all-gathers (read inside the call) and halos (post, read, post, ...) guarantee.
Publishing relies on stores becoming visible in program order (x86-64's total store order),
so the transport is used only there; waits spin (yielding) up to 20 ms, then nap, and give up with
the missing ranks named after the job's communication timeout.
"""

from __future__ import annotations

import mmap
import os
import platform
import socket
import time
import uuid

import numpy as np
import torch
import torch.distributed as dist

SLOT_BYTES = 64 << 10  # the smallest all-gather region per rank
GATHER_LIMIT = 64 << 20  # larger all-gathers stay on gloo
_LINE = 64
_SPIN_S = 20e-3  # spin this long, then nap (a nap lasts ~0.1 ms idle, longer under load)
_NAP_S = 20e-6


def supported() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64") and os.path.isdir("/dev/shm")


class ShmChannel:
    """Same-host exchanges among the ranks of one group through /dev/shm regions.

    Build with :meth:`open`, a collective on the group that gives None where the ranks cannot
    share memory (other hosts, another /dev/shm namespace, not x86-64). Regions are allocated
    collectively too (:meth:`region`); :meth:`all_gather` keeps one per power-of-two size.
    """

    @classmethod
    def open(cls, group, timeout_s: float) -> "ShmChannel | None":
        world = dist.get_world_size(group)
        here = [None] * world
        dist.all_gather_object(here, (supported(), _host_id()), group=group)
        if not all(ok for ok, _ in here) or len({host for _, host in here}) != 1:
            return None
        return cls(group, timeout_s)

    def __init__(self, group, timeout_s: float):
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.timeout_s = timeout_s
        self._gathers: dict[int, ShmRegion | bool] = {}
        self._regions: list[ShmRegion] = []

    def region(self, part_bytes: list[int]) -> "ShmRegion | None":
        """Collective: a region whose per-rank slot holds parts of the largest size any rank
        asked for (same number of parts on every rank); None (on every rank) when /dev/shm
        cannot hold it."""
        path = f"/dev/shm/distgen-{uuid.uuid4().hex}"
        asks = [None] * self.world
        dist.all_gather_object(asks, (list(part_bytes), path, _free_bytes()), group=self.group)
        sizes = [max(ask[0][i] for ask in asks) for i in range(len(part_bytes))]
        sizes = [-(-size // _LINE) * _LINE for size in sizes]  # cache-line aligned parts
        size = _LINE * self.world + 2 * self.world * sum(sizes)
        if any(free < 2 * size for _, _, free in asks):  # leave room: a full tmpfs kills the writer
            return None
        path = asks[0][1]
        fd, mapped = None, None
        try:
            if self.rank == 0:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
                os.ftruncate(fd, size)
        except OSError:
            fd = None
        dist.barrier(group=self.group)
        try:
            if self.rank != 0:
                fd = os.open(path, os.O_RDWR)
            if fd is not None:
                mapped = mmap.mmap(fd, size)
        except OSError:
            mapped = None
        finally:
            if fd is not None:
                os.close(fd)
        everyone = [None] * self.world
        dist.all_gather_object(everyone, mapped is not None, group=self.group)  # all have opened it by now
        if self.rank == 0 and os.path.exists(path):
            os.unlink(path)  # the mappings stay; nothing is left in /dev/shm
        if not all(everyone):
            if mapped is not None:
                mapped.close()
            return None
        region = ShmRegion(mapped, self.rank, self.world, sizes, self.timeout_s)
        region.path = path
        self._regions.append(region)
        return region

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's ``tensor`` (same shape and dtype on all), in rank order, as fresh
        tensors; None (on every rank) when it is too large or /dev/shm has no room."""
        nbytes = tensor.numel() * tensor.element_size()
        size = max(SLOT_BYTES, 1 << (max(nbytes, 1) - 1).bit_length())  # one region per power of two
        if size > GATHER_LIMIT:
            return None
        region = self._gathers.get(size)
        if region is None:  # every rank gathers the same sizes in the same order: allocated together
            region = self._gathers[size] = self.region([size]) or False
        if not region:
            return None
        n = region.write([tensor])
        region.wait(range(self.world), n)
        return [region.read(r, n, 0, tensor.dtype, tensor.shape).clone() for r in range(self.world)]

    def release(self, region: "ShmRegion") -> None:
        if region in self._regions:
            self._regions.remove(region)
        region.close()


class ShmRegion:
    """One rank's slots: two parities of [part 0 | part 1 | ...]; publish by counter.

    Write n (this rank's n-th write) goes to parity n % 2 and is readable once the writer's
    counter reaches n. Safe as long as a rank reads a peer's write n before making its own
    write n + 2 (both all-gathers and post/read halos do).
    """

    def __init__(self, mapped: mmap.mmap, rank: int, world: int, sizes: list[int], timeout_s: float):
        self.rank, self.world, self.sizes, self.timeout_s = rank, world, sizes, timeout_s
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self._map = mapped
        self._published = np.ndarray((world,), dtype=np.int64, buffer=mapped, strides=(_LINE,))
        slot = sum(sizes)
        self._data = torch.frombuffer(mapped, dtype=torch.uint8, offset=_LINE * world,
                                      count=2 * world * slot).view(2, world, slot)
        self.count = 0
        self.path = ""  # the /dev/shm name it had (unlinked once every rank mapped it)

    def write(self, parts: list[torch.Tensor | None]) -> int:
        """Copy the parts (None: leave that part) into this rank's next slot and publish it."""
        self.count += 1
        slot = self._data[self.count % 2, self.rank]
        for i, part in enumerate(parts):
            if part is None:
                continue
            nbytes = part.numel() * part.element_size()
            if nbytes > self.sizes[i]:
                raise ValueError(f"shm region: part {i} of {nbytes} bytes exceeds its {self.sizes[i]} bytes")
            # One (strided) copy straight into the slot, also for a non-contiguous part.
            slot[self.offsets[i]:self.offsets[i] + nbytes].view(part.dtype).view(part.shape).copy_(part)
        self._published[self.rank] = self.count  # after the data: stores stay in order on x86-64
        return self.count

    def wait(self, ranks, n: int) -> None:
        """Until every rank in ``ranks`` has published its write ``n``."""
        published, ranks = self._published, list(ranks)
        if all(int(published[r]) >= n for r in ranks):
            return
        start = time.perf_counter()
        while True:
            if all(int(published[r]) >= n for r in ranks):
                return
            waited = time.perf_counter() - start
            if waited > self.timeout_s:
                missing = [r for r in ranks if int(published[r]) < n]
                raise TimeoutError(f"shared-memory exchange #{n}: ranks {missing} did not arrive within "
                                   f"{self.timeout_s:.0f} s")
            if waited < _SPIN_S:
                # Spin, yielding to this core's other threads: a napping thread gives its core
                # away and, with every core busy, waits for a time slice to get it back (on
                # the 2-core machine, 2-rank clip parallelism ran 10-20 % slower napping).
                os.sched_yield()
            else:
                time.sleep(_NAP_S)  # a long wait (a peer a whole step behind): free the core

    def read(self, rank: int, n: int, part: int, dtype: torch.dtype, shape) -> torch.Tensor:
        """A view of part ``part`` of ``rank``'s write ``n`` (valid until its write n + 2)."""
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        start = self.offsets[part]
        return self._data[n % 2, rank, start:start + nbytes].view(dtype).view(shape)

    def close(self) -> None:
        self._data = None
        self._published = None
        try:
            self._map.close()
        except BufferError:  # a view still alive: the mapping goes with it
            pass


def _free_bytes() -> int:
    try:
        stat = os.statvfs("/dev/shm")
        return stat.f_bavail * stat.f_frsize
    except OSError:
        return 0


def _host_id() -> str:
    """This machine: host name and kernel boot id (containers on one host share the boot id)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def enabled() -> bool:
    """Off with ``DISTGEN_SHM=0`` (to compare with plain gloo); otherwise where supported."""
    return os.environ.get("DISTGEN_SHM", "1") != "0" and supported()
