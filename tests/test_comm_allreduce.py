"""Same-host all-reduce (and all-to-all) through shared memory: the same bits as gloo, on real 2-
and 3-rank groups.

gloo sums in ring order (each chunk of the buffer starts at a different rank), so with three
ranks a plain x0 + x1 + x2 would differ from gloo in the last bit of some elements; the
"needle" inputs below make that visible in every chunk (1 + 2^-24 + 2^-24 is 1 or 1 + 2^-23
depending on which pair is added first). One spawned group per world size runs every case.
"""

import os
import re
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distgen.comm import CommStats, ExchangeEngine, shm
from distgen.launch.local import free_port

pytestmark = pytest.mark.skipif(not shm.supported(), reason="the shared-memory channel needs x86-64 and /dev/shm")

TIMEOUT_S = 2.0
# Element counts: odd and tiny ones (empty chunks at 3 ranks), decode sizes (4 KiB .. 64 KiB of
# fp32), chunk borders, 1 MiB, and the largest size shared memory takes.
SIZES = [1, 2, 5, 7, 1000, 1024, 4097, 16384, 16385, 100_003, 262_144]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


def _inputs(rank: int, world: int, numel: int, dtype: torch.dtype, case: int) -> torch.Tensor:
    """Random values of mixed magnitude, or (odd cases) needles: one rank holds 1, the others half
    an ulp of 1, rotating which rank holds 1 along the buffer."""
    g = torch.Generator().manual_seed(1000 * case + 17 * rank + numel)
    if case % 2 == 0:
        x = torch.randn(numel, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-3, 4, (numel,), generator=g)
        return x.to(dtype)
    half_ulp = 2.0 ** -24 if dtype == torch.float32 else 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    holder = (torch.arange(numel) // max(1, numel // (3 * world)) + case) % world
    return torch.where(holder == rank, 1.0, half_ulp).to(dtype)


def _check_everyone_same(t: torch.Tensor, world: int) -> None:
    gathered = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(gathered, t.contiguous())
    assert all(_same_bits(g, gathered[0]) for g in gathered), "ranks got different bits"


def _allreduce_worker(rank, world, port, errors):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        via_shm = ExchangeEngine(dist.group.WORLD, CommStats(), torch.device("cpu"), timeout_s=TIMEOUT_S,
                                 shared_memory=True)
        via_gloo = ExchangeEngine(dist.group.WORLD, CommStats(), torch.device("cpu"), shared_memory=False)
        assert via_shm._channel() is not None and via_gloo._channel() is None

        # Blocking: every size and dtype, random and needle inputs, a fresh result tensor.
        case = 0
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64):
            sizes = SIZES if dtype in (torch.float32, torch.bfloat16) else SIZES[::3]
            for numel in sizes:
                for variant in (0, 1) if dtype.is_floating_point else (0,):
                    case += 1
                    x = _inputs(rank, world, numel, dtype, 2 * case + variant) if dtype.is_floating_point \
                        else torch.randint(-1000, 1000, (numel,), dtype=dtype)
                    x_before = x.clone()
                    a, b = via_shm.all_reduce(x), via_gloo.all_reduce(x)
                    assert _same_bits(a, b), f"blocking {dtype} x{numel} variant {variant}: shm != gloo"
                    assert _same_bits(x, x_before) and a.data_ptr() != x.data_ptr()
                    _check_everyone_same(a, world)
        # A shaped, non-contiguous input; and the largest size taken, at the limit.
        x = _inputs(rank, world, 6 * 40, torch.float32, 3).view(6, 40).t()
        assert _same_bits(via_shm.all_reduce(x), via_gloo.all_reduce(x))
        at_limit = shm.REDUCE_LIMIT // 4
        x = _inputs(rank, world, at_limit, torch.float32, 5)
        assert _same_bits(via_shm.all_reduce(x), via_gloo.all_reduce(x))
        reduces = via_shm._channel()._reduces
        assert reduces and all(reduces.values()), "the shared-memory path was not taken"
        assert max(reduces) == shm.REDUCE_LIMIT
        # Over the limit: gloo (no new region), same result.
        x = _inputs(rank, world, at_limit + 1, torch.float32, 7)
        assert _same_bits(via_shm.all_reduce(x), via_gloo.all_reduce(x))
        assert max(reduces) == shm.REDUCE_LIMIT

        # Async, as Ladder Residual uses it: two in flight, each waited one sub-block later, in
        # place (wait() returns the tensor it was given), several rounds past the region's depth.
        for dtype in (torch.float32, torch.bfloat16):
            for numel in (1024, 8192, 16385):
                results = {}
                for engine in (via_shm, via_gloo):
                    got, attn, mlp = [], None, None
                    for layer in range(3 * shm.REDUCE_DEPTH):
                        if attn is not None:
                            got.append(attn[1].wait())
                            assert got[-1] is attn[0]
                        a_new = _inputs(rank, world, numel, dtype, 100 + 2 * layer + layer % 2)
                        attn = (a_new, engine.all_reduce_async(a_new))
                        if mlp is not None:
                            got.append(mlp[1].wait())
                        m = _inputs(rank, world, numel, dtype, 200 + 2 * layer + (layer + 1) % 2)
                        mlp = (m, engine.all_reduce_async(m))
                    got += [attn[1].wait(), mlp[1].wait()]
                    results[engine is via_shm] = got
                assert all(_same_bits(p, q) for p, q in zip(results[True], results[False])), \
                    f"async {dtype} x{numel}: shm != gloo"
                _check_everyone_same(torch.cat(results[True]), world)
        # More in flight than the depth, waited newest first; mixed with blocking calls on the same region.
        parts = [_inputs(rank, world, 3000, torch.float32, 300 + i) for i in range(2 * shm.REDUCE_DEPTH + 1)]
        expect = [via_gloo.all_reduce(p) for p in parts]
        pendings = [via_shm.all_reduce_async(p.clone()) for p in parts[:-1]]
        last = via_shm.all_reduce(parts[-1])
        got = [p.wait() for p in reversed(pendings)][::-1] + [last]
        assert all(_same_bits(p, q) for p, q in zip(got, expect))
        assert via_shm.all_reduce_async(torch.ones(4)).done is False  # really in flight until waited
        via_gloo.all_reduce_async(torch.ones(4)).wait()

        # All-to-all (expert parallelism, Ulysses): even and uneven splits, empty blocks, async,
        # and one rank over the shared-memory limit (that exchange then goes through gloo everywhere).
        def counts_for(step):  # send_counts[src][dst], the same table on every rank
            return [[(3 * src + 5 * dst + step) % 4 * (src != dst or step % 2) for dst in range(world)]
                    for src in range(world)]

        for step in range(2 * shm.REDUCE_DEPTH + 2):
            table = counts_for(step)
            send, recv = table[rank], [table[src][rank] for src in range(world)]
            for dtype, row in ((torch.float32, (8,)), (torch.bfloat16, (3, 5)), (torch.int64, ())):
                x = (torch.arange(sum(send) * max(1, torch.Size(row).numel())) + 1000 * rank + step).to(dtype)
                x = x.view(sum(send), *row)
                a = via_shm.all_to_all(x, send, recv, async_op=step % 2 == 1)
                a = a.wait() if step % 2 else a
                assert _same_bits(a, via_gloo.all_to_all(x, send, recv)), f"all_to_all step {step} {dtype}"
        x = torch.arange(6 * world, dtype=torch.float32).view(world * 6, 1) + rank  # even split
        assert _same_bits(via_shm.all_to_all(x), via_gloo.all_to_all(x))
        big = shm.A2A_LIMIT // 4 + world if rank == world - 1 else world  # only the last rank is over the limit
        x = torch.arange(big, dtype=torch.float32) + rank
        send = [big // world] * (world - 1) + [big - (world - 1) * (big // world)]
        recv = [(shm.A2A_LIMIT // 4 + world) // world if src == world - 1 else 1 for src in range(world)]
        recv[-1] = recv[-1] if rank < world - 1 else (shm.A2A_LIMIT // 4 + world) - (world - 1) * recv[-1]
        assert _same_bits(via_shm.all_to_all(x.view(-1, 1), send, recv), via_gloo.all_to_all(x.view(-1, 1), send, recv))
        assert via_shm._channel()._a2a, "the all-to-all did not go through shared memory"

        # Same accounting as gloo: bytes and collective counts match.
        s, g = via_shm.stats.current, via_gloo.stats.current
        assert (s.bytes_sent, s.bytes_recv, s.collectives) == (g.bytes_sent, g.bytes_recv, g.collectives)
        assert s.wait_s > 0

        # A rank that never arrives: the others fail after the timeout, naming it.
        dist.barrier()
        missing = list(range(1, world))
        if rank == 0:
            for start_op in (lambda: via_shm.all_reduce(torch.ones(5)),
                             lambda: via_shm.all_reduce_async(torch.ones(5)).wait()):
                t0 = time.perf_counter()
                with pytest.raises(TimeoutError, match=re.escape(f"ranks {missing} did not arrive within 2 s")):
                    start_op()
                assert TIMEOUT_S <= time.perf_counter() - t0 < TIMEOUT_S + 5
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise


def _run_ranks(worker, world: int) -> None:
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    context = mp.start_processes(worker, args=(world, free_port(), errors), nprocs=world, join=False,
                                 start_method="spawn")
    try:
        while not context.join(timeout=150):
            pass
    except Exception:
        messages = []
        while not errors.empty():
            messages.append(errors.get())
        pytest.fail("\n".join(messages) or f"{worker.__name__} failed")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [2, 3])
def test_shm_all_reduce_matches_gloo_bit_for_bit(world):
    _run_ranks(_allreduce_worker, world)
