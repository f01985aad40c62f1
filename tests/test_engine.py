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
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    context = mp.start_processes(_engine_worker, args=(world, free_port(), errors), nprocs=world, join=False, start_method="spawn")
    try:
        while not context.join(timeout=90):
            pass
    except Exception:
        messages = []
        while not errors.empty():
            messages.append(errors.get())
        pytest.fail("\n".join(messages) or "engine worker failed")
