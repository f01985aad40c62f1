"""Iteration-level (continuous) batching of text requests on a slot KV cache (SERVING.md §3).

Orca / Flover schedule one *step* at a time instead of one request at a time: every step, each
running sequence decodes one token, waiting requests join as soon as a cache slot is free, and a
sequence that finished (a stop token, ``max_tokens``, a cancel) leaves at once. Prompts are
prefilled in chunks that fill what the step's token budget leaves (Sarathi-Serve's chunked
prefill), so a long prompt never stalls the others' decoding.

The leader (rank 0) decides each step's :class:`StepPlan` (who joins which slot, which slots a
cancel frees, how many tokens of which slot run, split into micro-batches of disjoint slots for
pipeline stages) and broadcasts it on the control group; every rank then runs the identical
plan. Everything else is derived the same on every rank: the input tokens (the prompt's next
chunk, or the slot's last sampled token), which rows sample (only a row whose prompt is fully in
the cache), the sampled tokens (one seeded generator per sequence, as one-shot generation seeds
it; with pipeline stages the last stage sends them back), and which sequences finish. So the
plan is small and the tokens equal those of one-shot generation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from distgen.config import ConfigError
from distgen.runtime.resident import HEARTBEAT_S, Scheduler, _Leader

BATCHING_MODES = ("continuous", "request-level")


@dataclass(frozen=True)
class ContinuousConfig:
    """The scheduler's limits (``distgen serve --max-num-seqs ...``)."""

    max_num_seqs: int = 16  # cache slots: sequences decoding at once
    max_num_batched_tokens: int = 512  # tokens per step: decodes first, prefill chunks fill the rest
    max_model_len: int | None = None  # positions per slot (prompt + new tokens); None: min(context, 2048)

    def validate(self, context: int) -> "ContinuousConfig":
        """Checked at the edge; returns the config with ``max_model_len`` resolved."""
        if self.max_num_seqs < 1:
            raise ConfigError(f"--max-num-seqs must be a positive integer, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ConfigError(f"--max-num-batched-tokens {self.max_num_batched_tokens}: must be at least "
                              f"--max-num-seqs ({self.max_num_seqs}), so every running sequence decodes every step")
        length = self.max_model_len if self.max_model_len is not None else min(context, 2048)
        if not 2 <= length <= context:
            raise ConfigError(f"--max-model-len {length}: must be between 2 and the model's context of {context} tokens")
        return ContinuousConfig(self.max_num_seqs, self.max_num_batched_tokens, length)


@dataclass(frozen=True)
class StepPlan:
    """One step, the same on every rank. ``admit``: (item, a slot per prompt row); ``release``:
    slots freed by a cancel before the step; ``batches``: per micro-batch, (slot, tokens) pairs."""

    action: str  # step | heartbeat | stop
    admit: tuple = ()
    release: tuple[int, ...] = ()
    batches: tuple[tuple[tuple[int, int], ...], ...] = ()


@dataclass
class _Sequence:
    """One prompt row of a request, in its slot (the same on every rank)."""

    request_id: str
    row: int
    prompt: tuple[int, ...]
    max_new: int
    eos: frozenset
    temperature: float
    top_p: float
    generator: torch.Generator
    admitted_at: float
    cached: int = 0  # tokens of this sequence in the cache
    generated: list[int] = field(default_factory=list)
    finished: bool = False
    first_token_at: float | None = None

    @property
    def prefilled(self) -> bool:
        return self.cached >= len(self.prompt)

    def inputs(self, n: int) -> list[int]:
        if not self.prefilled:
            return list(self.prompt[self.cached:self.cached + n])
        return [self.generated[-1]]  # the last sampled token, not yet in the cache

    def emits(self, n: int) -> bool:
        """Does running ``n`` tokens end with a sampled token (the prompt complete in the cache)?"""
        return self.cached + n >= len(self.prompt)


class ContinuousTextRunner:
    """Every rank: the slot cache and the slot table, stepped by the leader's plans."""

    def __init__(self, generator, config: ContinuousConfig):
        from distgen.runtime.text import _sample_row

        self._sample_row = _sample_row
        self.generator = generator  # a TextGenerator: the sharded model, its pipeline schedule, stats
        self.config = config
        model = generator.model
        self.cache = model.allocate_slot_cache(config.max_num_seqs, config.max_model_len, generator.dtype,
                                               generator.device)
        self.slots: list[_Sequence | None] = [None] * config.max_num_seqs
        self.steps = 0

    # ------------------------------------------------------------------ state (every rank)
    def free_slots(self) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s is None]

    def running(self) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s is not None]

    def admit(self, item, slots: tuple[int, ...]) -> None:
        request = item.request
        now = time.perf_counter()
        for row, (slot, prompt) in enumerate(zip(slots, request.prompt_ids)):
            # the seed one-shot generation gives this row (TextGenerator.generate, row_offset 0)
            generator = torch.Generator(device="cpu").manual_seed(request.seed * 1_000_003 + row)
            self.slots[slot] = _Sequence(item.id, row, tuple(prompt), request.max_new_tokens,
                                         frozenset(request.eos_token_ids), request.temperature, request.top_p,
                                         generator, now)

    def release(self, slot: int) -> None:
        self.slots[slot] = None

    # ------------------------------------------------------------------ one step (every rank)
    @torch.inference_mode()
    def step(self, batches) -> list[_Sequence]:
        """Run one plan's micro-batches; returns the sequences that advanced (their new tokens appended)."""
        from distgen.models.llama import Segment, SlotContext

        gen = self.generator
        model, schedule, device = gen.model, gen.schedule, gen.device
        prepared = []
        for m, entries in enumerate(batches):
            # one-token segments first (they attend together), then prefill chunks
            entries = sorted(entries, key=lambda e: e[1] != 1)
            sequences = [self.slots[slot] for slot, _ in entries]
            segments = [Segment(slot, seq.cached, n) for (slot, n), seq in zip(entries, sequences)]
            ids = [t for (slot, n), seq in zip(entries, sequences) for t in seq.inputs(n)]
            tokens = torch.tensor([ids], dtype=torch.long, device=device)
            ctx = SlotContext.build(model, segments, self.cache, gen.dtype)
            emits = [seq.emits(n) for (slot, n), seq in zip(entries, sequences)]
            prepared.append((entries, sequences, tokens, ctx, emits))
            schedule.expect(m, 1, tokens.shape[1])

        def sample(m: int, logits: torch.Tensor) -> torch.Tensor:
            _, sequences, _, _, emits = prepared[m]
            rows = logits.float().cpu()
            chosen = [self._sample_row(rows[i], seq.temperature, seq.top_p, seq.generator) if emit else -1
                      for i, (seq, emit) in enumerate(zip(sequences, emits))]
            return torch.tensor(chosen, dtype=torch.long, device=device)

        for m, (_, _, tokens, ctx, _) in enumerate(prepared):
            schedule.run(m, tokens, ctx, sample)
        advanced = []
        now = time.perf_counter()
        for m, (entries, sequences, _, _, emits) in enumerate(prepared):
            chosen = schedule.next_tokens(m).cpu().tolist()
            for (slot, n), seq, emit, token in zip(entries, sequences, emits, chosen):
                seq.cached += n
                if not emit:
                    continue
                seq.generated.append(int(token))
                if seq.first_token_at is None:
                    seq.first_token_at = now
                seq.finished = int(token) in seq.eos or len(seq.generated) >= seq.max_new
                advanced.append(seq)
        self.steps += 1
        return advanced

    def reset_after_error(self) -> None:
        self.generator.schedule.drain()


class ContinuousScheduler(Scheduler):
    """The leader's side: waiting requests in arrival order, and each step's plan.

    Every step: all running sequences whose prompt is in the cache decode one token; what is left
    of ``max_num_batched_tokens`` goes to prefill chunks, first of sequences already admitted, then
    of waiting requests admitted in order while there are free slots for all their rows (a request
    whose rows do not fit waits: a full cache queues, it never fails a request). With ``stages``
    pipeline stages the step is split into that many micro-batches of disjoint slots, balanced by
    tokens, so the stages work on different ones at once.
    """

    def __init__(self, runner: ContinuousTextRunner, stages: int = 1):
        super().__init__(runner.config.max_num_seqs)  # the waiting queue, add() and cancel() of waiting requests
        self.runner = runner
        self.config = runner.config
        self.stages = max(1, stages)
        self.order: list[int] = []  # slots in admission order (prefill continues oldest first)

    def slots_of(self, request_id: str) -> list[int]:
        return [i for i, s in enumerate(self.runner.slots) if s is not None and s.request_id == request_id]

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or bool(self.runner.running())

    def plan(self, cancelled: set[str]) -> StepPlan:
        slots = self.runner.slots
        release = tuple(i for i, s in enumerate(slots) if s is not None and s.request_id in cancelled)
        self.order = [i for i in self.order if slots[i] is not None and i not in release]
        budget = self.config.max_num_batched_tokens
        entries: list[tuple[int, int]] = []
        for slot in self.order:
            if slots[slot].prefilled and not slots[slot].finished:  # a row done before its siblings waits
                entries.append((slot, 1))
        budget -= len(entries)
        for slot in self.order:
            seq = slots[slot]
            if not seq.prefilled and budget > 0:
                n = min(len(seq.prompt) - seq.cached, budget)
                entries.append((slot, n))
                budget -= n
        free = [i for i, s in enumerate(slots) if s is None or i in release]
        admit = []
        while self.waiting and len(self.waiting[0].request.prompt_ids) <= len(free):
            item = self.waiting.popleft()
            mine = tuple(free[:len(item.request.prompt_ids)])
            free = free[len(mine):]
            admit.append((item, mine))
            self.order.extend(mine)
            for slot, prompt in zip(mine, item.request.prompt_ids):
                if budget > 0:
                    n = min(len(prompt), budget)
                    entries.append((slot, n))
                    budget -= n
        if not entries and not admit and not release:
            return StepPlan("heartbeat")
        return StepPlan("step", tuple(admit), release, self._split(entries))

    def _split(self, entries: list[tuple[int, int]]) -> tuple:
        if not entries:
            return ()
        groups = min(self.stages, len(entries))
        if groups == 1:
            return (tuple(entries),)
        # greedy by tokens, largest first, into the lightest micro-batch
        buckets: list[list[tuple[int, int]]] = [[] for _ in range(groups)]
        loads = [0] * groups
        for entry in sorted(entries, key=lambda e: -e[1]):
            k = loads.index(min(loads))
            buckets[k].append(entry)
            loads[k] += entry[1]
        return tuple(tuple(b) for b in buckets if b)


def serve_continuous(job, ctx, channel, control, generator) -> None:
    """The resident loop for continuous text batching (every rank); rank 0 leads."""
    runner = ContinuousTextRunner(generator, job.continuous)
    leader = _ContinuousLeader(channel, ContinuousScheduler(runner, generator.pp)) if ctx.rank == 0 else None
    if leader is not None:
        leader.emit("ready", {"pid": __import__("os").getpid(), "world_size": ctx.world_size,
                              "kv_cache_bytes": runner.cache.nbytes()})
    beat = 0.0
    while True:
        plan = control.broadcast(leader.next_plan(HEARTBEAT_S) if leader is not None else None)
        if plan.action == "stop":
            break
        if leader is not None and time.monotonic() - beat > HEARTBEAT_S / 2:
            beat = time.monotonic()
            leader.emit("heartbeat", time.time())
        if plan.action == "heartbeat":
            continue
        for slot in plan.release:
            runner.release(slot)
        for item, slots in plan.admit:
            runner.admit(item, slots)
            if leader is not None:
                leader.emit("started", item.id)
        advanced = runner.step(plan.batches) if plan.batches else []
        finished = {}
        for seq in advanced:
            if seq.finished:
                finished.setdefault(seq.request_id, None)
        if leader is not None:
            leader.report(runner, advanced)
        # a request is done when all its rows are: free their slots (every rank, same decision)
        for rid in finished:
            rows = [s for s in runner.slots if s is not None and s.request_id == rid]
            if all(s.finished for s in rows):
                for i, s in enumerate(runner.slots):
                    if s is not None and s.request_id == rid:
                        runner.release(i)
    if leader is not None:
        leader.emit("stopped")


class _ContinuousLeader(_Leader):
    """Rank 0's side: commands in (as the request-level leader), each step's plan out, tokens streamed."""

    def __init__(self, channel, scheduler: ContinuousScheduler):
        super().__init__(channel, scheduler)
        self.cancelled: set[str] = set()
        self.sent: dict[tuple[str, int], int] = {}  # (request, row) -> tokens already streamed

    def _handle(self, command) -> None:
        if command[0] != "cancel":
            return super()._handle(command)  # submit -> scheduler.add, stop
        rid = command[1]
        if self.scheduler.cancel(rid):
            self.emit("cancelled", rid)
        elif self.scheduler.slots_of(rid):
            self.cancelled.add(rid)

    def next_plan(self, idle_wait_s: float) -> StepPlan:
        self.poll(0.0 if self.scheduler.busy else idle_wait_s)
        if self.stopping:
            return StepPlan("stop")
        cancelled, self.cancelled = self.cancelled, set()
        plan = self.scheduler.plan(cancelled)
        for rid in cancelled:
            self.emit("cancelled", rid)
            for key in [k for k in self.sent if k[0] == rid]:
                del self.sent[key]
        return plan

    def report(self, runner: ContinuousTextRunner, advanced: list[_Sequence]) -> None:
        """Stream each advanced request's new tokens; answer the requests whose rows all finished."""
        touched = {}
        for seq in advanced:
            touched.setdefault(seq.request_id, None)
        for rid in touched:
            rows = sorted((s for s in runner.slots if s is not None and s.request_id == rid), key=lambda s: s.row)
            new = []
            for s in rows:
                done = self.sent.get((rid, s.row), 0)
                new.append(list(s.generated[done:]))
                self.sent[(rid, s.row)] = len(s.generated)
            progress = max(len(s.generated) for s in rows)
            self.emit("progress", rid, progress, rows[0].max_new, new)
            if all(s.finished for s in rows):
                first = min(s.first_token_at for s in rows)
                admitted = min(s.admitted_at for s in rows)
                self.emit("result", rid, {
                    "tokens": [list(s.generated) for s in rows], "new": [[] for _ in rows],
                    "prefill_seconds": first - admitted, "decode_seconds": time.perf_counter() - first,
                    "step_tokens": [], "batching": "continuous"})
                for s in rows:
                    self.sent.pop((rid, s.row), None)
