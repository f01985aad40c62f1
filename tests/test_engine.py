"""The exchange engine on a real 2-rank gloo group: stale slots, buckets, halos, accounting."""

import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distgen.comm import CommStats, ExchangeEngine
from distgen.launch.local import free_port


def _engine_worker(rank, world, port, errors):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        stats = CommStats()
        # 64-byte buckets: the three 32-byte slots below land in two buckets.
        engine = ExchangeEngine(dist.group.WORLD, stats, torch.device("cpu"), bucket_bytes=64)
        names = ["a", "b", "c"]

        def value(step, name):
            return torch.full((2, 4), float(100 * step + 10 * rank + names.index(name)))

        stats.begin_step()
        for name in names:  # step 0: synchronous, registers the slots
            gathered = engine.gather_now(name, value(0, name))
            assert [g[0, 0].item() for g in gathered] == [10 * r + names.index(name) for r in range(world)]
        stats.end_step()
        assert stats.steps[0].bytes_sent == 3 * 32 * (world - 1)
        for step in range(1, 4):  # displaced steps: read step-1 values, send this step's
            stats.begin_step()
            for name in names:
                stale = [t.clone() for t in engine.stale(name)]
                assert [s[0, 0].item() for s in stale] == [100 * (step - 1) + 10 * r + names.index(name) for r in range(world)]
                engine.enqueue(name, value(step, name))
            stats.end_step()
            # Two buckets (64 B + 32 B) went out as two async all_gathers.
            assert stats.steps[-1].collectives == 2
            assert stats.steps[-1].bytes_sent == 3 * 32 * (world - 1)
        # Halos: rank r sends its first row up and its last row down.
        rows = torch.arange(4.0).reshape(4, 1) + 10 * rank
        engine.post_halo("h", rows[:1], rows[-1:])
        from_prev, from_next = engine.halo("h")
        if rank > 0:
            assert from_prev.item() == 10 * (rank - 1) + 3
        else:
            assert from_prev is None
        if rank < world - 1:
            assert from_next.item() == 10 * (rank + 1)
        else:
            assert from_next is None
        engine.drain()

        # Async all-reduce: in place, result after wait(), bytes accounted as a ring all-reduce.
        stats.begin_step()
        partial = torch.full((3,), float(rank + 1))
        pending = engine.all_reduce_async(partial)
        total = pending.wait()
        assert total is partial and total.tolist() == [world * (world + 1) / 2] * 3
        assert stats.current.bytes_sent == 2 * 12 * (world - 1) // world

        # Uneven all-to-all (rank r sends r+p rows to peer p, some ranks send nothing to 0).
        send_counts = [rank + p for p in range(world)]
        recv_counts = [q + rank for q in range(world)]
        rows = torch.cat([torch.full((c, 2), float(100 * rank + p)) for p, c in enumerate(send_counts)])
        got = engine.all_to_all(rows, send_counts, recv_counts)
        expected = torch.cat([torch.full((c, 2), float(100 * q + rank)) for q, c in enumerate(recv_counts)])
        assert torch.equal(got, expected)
        sent_to = stats.current.sent_to
        assert sent_to == {p: (rank + p) * 8 for p in range(world) if p != rank and rank + p > 0}

        # Ring shift and point-to-point exchange.
        received = engine.shift(torch.tensor([float(rank)])).wait()
        assert received.item() == (rank - 1) % world
        if world >= 2:
            peer = rank ^ 1
            if peer < world:
                buf = torch.empty(2)
                got = engine.exchange({peer: torch.tensor([rank, rank + 0.5])}, {peer: buf}).wait()
                assert got[peer].tolist() == [peer, peer + 0.5]
        stats.end_step()
        dist.destroy_process_group()
    except BaseException:
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 3])
def test_engine_stale_exchange_and_halos(world):
    _run_ranks(_engine_worker, world)


def _run_ranks(worker, world: int) -> None:
    """Spawn ``world`` ranks of ``worker(rank, world, port, errors)``; fail with their tracebacks."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    context = mp.start_processes(worker, args=(world, free_port(), errors), nprocs=world, join=False, start_method="spawn")
    try:
        while not context.join(timeout=90):
            pass
    except Exception:
        messages = []
        while not errors.empty():
            messages.append(errors.get())
        pytest.fail("\n".join(messages) or f"{worker.__name__} failed")


def _shm_worker(rank, world, port, errors):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        via_shm = ExchangeEngine(dist.group.WORLD, CommStats(), torch.device("cpu"), timeout_s=2.0, shared_memory=True)
        via_gloo = ExchangeEngine(dist.group.WORLD, CommStats(), torch.device("cpu"), shared_memory=False)
        assert via_shm._channel() is not None and via_gloo._channel() is None
        for step in range(5):  # alternating parities: each gather sees this step's values, not older ones
            for numel in (7, 40_000, 700_000):  # one small region, two larger power-of-two ones
                x = torch.arange(numel, dtype=torch.float32) * (step + 1) + rank
                a, b = via_shm.all_gather(x), via_gloo.all_gather(x)
                assert len(a) == world and all(torch.equal(p, q) for p, q in zip(a, b))
        regions = via_shm._channel()._regions
        assert len(regions) == 3 and not any(os.path.exists(r.path) for r in regions)  # unlinked once mapped
        # Halos: synchronous (post, read) and displaced (read last step's, post this step's) use.
        for step in range(4):
            rows = torch.arange(6.0).reshape(3, 2) + 100 * step + 10 * rank
            got = []
            for engine in (via_shm, via_gloo):
                if step < 2:
                    engine.post_halo("h", rows[:1], rows[-1:])
                    got.append([None if t is None else t.clone() for t in engine.halo("h")])
                else:
                    got.append([None if t is None else t.clone() for t in engine.halo("h")])
                    engine.post_halo("h", rows[:1], rows[-1:])
            (p1, n1), (p2, n2) = got
            expect_step = step if step < 2 else step - 1
            if rank > 0:
                assert torch.equal(p1, p2) and p1[0, 0].item() == 100 * expect_step + 10 * (rank - 1) + 4
            else:
                assert p1 is None and p2 is None
            if rank < world - 1:
                assert torch.equal(n1, n2) and n1[0, 0].item() == 100 * expect_step + 10 * (rank + 1)
        via_shm.drain()
        via_gloo.drain()
        s, g = via_shm.stats.current, via_gloo.stats.current
        assert (s.bytes_sent, s.bytes_recv, s.collectives) == (g.bytes_sent, g.bytes_recv, g.collectives)
        via_shm.reset()
        # A rank that never arrives: the others fail with the missing rank named, not hang.
        if rank == 0:
            with pytest.raises(TimeoutError, match=r"ranks \[1, 2\] did not arrive"):
                via_shm.all_gather(torch.ones(3))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise


@pytest.mark.timeout(120)
@pytest.mark.skipif(not __import__("distgen.comm.shm", fromlist=["supported"]).supported(),
                    reason="the shared-memory channel needs x86-64 and /dev/shm")
def test_shared_memory_transport_matches_gloo():
    _run_ranks(_shm_worker, 3)
