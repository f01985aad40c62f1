"""Text generation on one rank: the job, the generation loop, sampling.

Every rank builds the model on the meta device, lets the strategies shard it
(``distgen.parallel.pipeline`` keeps this stage's layers, ``distgen.parallel.tensor`` this
rank's heads and columns), loads only its slices of the checkpoint, then runs the same loop:
a batched prefill of the left-padded prompts, then one decoding step per new token, each
split into micro-batches (pipeline parallelism keeps several in flight). Sampling uses one
generator per sequence seeded from the request, so every rank, and every parallel layout,
draws the same tokens from the same logits.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from distgen.comm import CommStats
from distgen.config import DTYPES, ConfigError, ParallelConfig

TEXT_AXES = ("dp", "pp", "ep", "tp")
# Residual wirings a benchmark alternates between in the same processes (TextJob.wirings):
# standard; Ladder on the upper TextJob.ladder_layers layers (all when None); standard with every
# tp all-reduce skipped (wrong output: the speed ceiling).
WIRINGS = ("standard", "ladder", "no-comm")


@dataclass(frozen=True)
class TextRequest:
    """One batch of prompts (already tokenized), decoded together."""

    prompt_ids: tuple[tuple[int, ...], ...]
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    eos_token_ids: tuple[int, ...] = ()  # empty: never stop early
    pad_token_id: int = 0

    def validate(self) -> None:
        if not self.prompt_ids or any(len(p) == 0 for p in self.prompt_ids):
            raise ConfigError("--prompt must not be empty")
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be a positive integer, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}")

    @property
    def batch_size(self) -> int:
        return len(self.prompt_ids)


@dataclass(frozen=True)
class TextJob:
    """Everything a worker needs to run text requests (picklable, sent to every rank)."""

    entry: ClassVar[str] = "distgen.runtime.text:run_text_job"

    requests: tuple[TextRequest, ...]
    parallel: ParallelConfig
    model: str  # checkpoint directory (config.json + safetensors)
    dtype: str = "fp32"
    ladder_layers: int | None = None  # None: the checkpoint's own (config.json "ladder_layers", default 0)
    micro_batches: int | None = None  # None: pp (bounded by the batch) with pipeline parallelism, else 1
    communicate: bool = True  # False: skip every tp all-reduce (benchmark ceiling; wrong output)
    return_logits: bool = False  # tests: prefill logits of every position and each step's logits
    wirings: tuple[str, ...] = ()  # benchmark: run every request once per wiring (WIRINGS), alternating
    # Mixture of experts (distgen.parallel.expert, distgen.placement): per MoE layer, slots[rank] =
    # logical experts per physical slot (None: round-robin); the policy that made it, for reports.
    placement: dict[int, list[list[int]]] | None = None
    placement_policy: str = "round-robin"
    redundant_experts: int = 0  # spare slots per layer (online EPLB keeps the count)
    nodes: int = 1  # hierarchical EPLB when > 1
    rebalance_interval: int | None = None  # online EPLB every N decoding steps (None: static)
    rebalance_window: int = 32  # forward passes of routing the online EPLB looks at
    record_routing: str | None = None  # rank 0 writes the routing trace (.npz) here
    # benchmark: run every request once per placement (name, layers), migrating weights in place
    placements: tuple[tuple[str, dict], ...] = ()
    threads_per_rank: int | None = None
    comm_timeout_s: float = 300.0

    def replace(self, **changes) -> "TextJob":
        return dataclasses.replace(self, **changes)


def check_job(job: TextJob, checkpoint, nproc: int) -> None:
    """Everything about a job that depends on the model; raises ConfigError before launch."""
    from distgen.parallel import expert, pipeline, tensor

    config = checkpoint.config
    name = checkpoint.directory
    job.parallel.validate(nproc, TEXT_AXES)
    if job.parallel.degree("dp") > 1:
        if job.parallel.degree("pp") > 1:
            raise ConfigError("--parallel: dp (each rank its own sequences) does not combine with pp yet; use dp with "
                              "tp and/or ep")
        if job.rebalance_interval is not None or job.record_routing:
            raise ConfigError("--rebalance-interval / --record-routing: not with dp yet (each dp rank routes other "
                              "sequences); use ep with tp, or one rank, to record or rebalance")
    expert.check_job(job, config)
    if job.dtype not in DTYPES:
        raise ConfigError(f"--dtype: unknown dtype {job.dtype!r}; allowed: {', '.join(DTYPES)}")
    tensor.validate(config, job.parallel.degree("tp"), name)
    pipeline.validate(config, job.parallel.degree("pp"))
    if job.ladder_layers is not None and not 0 <= job.ladder_layers <= config.num_layers:
        raise ConfigError(f"--ladder-layers {job.ladder_layers}: must be between 0 and the model's "
                          f"{config.num_layers} layers")
    for wiring in job.wirings:
        if wiring not in WIRINGS:
            raise ConfigError(f"--compare: unknown wiring {wiring!r}; allowed: {', '.join(WIRINGS)}")
    for request in job.requests:
        request.validate()
        longest = max(len(p) for p in request.prompt_ids)
        context = config.max_position_embeddings
        if longest > context:
            raise ConfigError(f"--prompt: {longest} tokens is longer than the model's context of {context} tokens")
        if longest + request.max_new_tokens > context:
            raise ConfigError(f"--max-new-tokens {request.max_new_tokens}: the {longest}-token prompt plus the new "
                              f"tokens exceed the model's context of {context} tokens; at most "
                              f"{context - longest} new tokens fit")
        if job.micro_batches is not None and not 1 <= job.micro_batches <= request.batch_size:
            raise ConfigError(f"--micro-batches {job.micro_batches}: must be between 1 and the batch size "
                              f"{request.batch_size}")
        bad = [t for p in request.prompt_ids for t in p if not 0 <= t < config.vocab_size]
        if bad:
            raise ConfigError(f"prompt token ids {bad[:5]} are outside the vocabulary (size {config.vocab_size})")


# --------------------------------------------------------------------------- sampling


def _sample_row(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    if temperature == 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = sorted_probs.cumsum(0) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        return int(order[torch.multinomial(sorted_probs, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


class _SingleStage:
    """The whole model on this rank (no pipeline): the same interface as PipelineSchedule."""

    def __init__(self, model, keep_logits: bool):
        self.model, self.keep_logits = model, keep_logits
        self._tokens: dict[int, torch.Tensor] = {}
        self._logits: dict[int, torch.Tensor] = {}

    def expect(self, m: int, rows: int, chunk: int) -> None:
        pass

    def run(self, m, tokens, ctx, sample, all_logits: bool = False) -> None:
        logits = self.model(tokens, ctx, all_logits=all_logits)
        self._tokens[m] = sample(m, logits[:, -1])
        if self.keep_logits:
            self._logits[m] = logits.float()

    def sampled_here(self, m: int):
        return self._tokens.get(m)

    def next_tokens(self, m: int) -> torch.Tensor:
        return self._tokens.pop(m)

    def last_logits(self, m: int):
        return self._logits.pop(m, None)

    def drain(self) -> None:
        pass


@dataclass
class TextResult:
    """Rank 0's view of one request. Per-step lists: index 0 is the prefill, then one entry per
    decoding step (bytes this rank sent and seconds it waited, by axis)."""

    tokens: list[list[int]]  # generated ids per prompt, up to and including EOS
    prefill_seconds: float = 0.0  # until every sequence's first new token is known
    decode_seconds: float = 0.0  # from then until the last token is known
    step_tokens: list[int] = field(default_factory=list)  # sequences advanced by each step
    tp_bytes: list[int] = field(default_factory=list)
    tp_wait_seconds: list[float] = field(default_factory=list)
    tp_collectives: list[int] = field(default_factory=list)
    pp_bytes: list[int] = field(default_factory=list)
    pp_wait_seconds: list[float] = field(default_factory=list)
    ep_bytes: list[int] = field(default_factory=list)  # expert all-to-alls (+ gathers, migrations)
    ep_wait_seconds: list[float] = field(default_factory=list)
    ep_sent_to: list[dict[int, int]] = field(default_factory=list)  # bytes to each global rank, per step
    rebalances: list[dict] = field(default_factory=list)  # online EPLB: when, what moved
    prefill_logits: torch.Tensor | None = None  # (batch, prompt, vocab), with return_logits
    step_logits: list[torch.Tensor] | None = None  # (batch, vocab) per decoding step


class TextGenerator:
    def __init__(self, job: TextJob, ctx):
        from distgen.models.checkpoint import DTYPES as TORCH_DTYPES
        from distgen.models.checkpoint import load_parameters, open_checkpoint
        from distgen.models.llama import build_model
        from distgen.parallel import expert, pipeline, tensor

        self.job, self.ctx = job, ctx
        self.device = ctx.device
        self.dtype = TORCH_DTYPES[job.dtype]
        checkpoint = open_checkpoint(job.model)
        config = checkpoint.config
        if job.ladder_layers is not None:
            config = config.with_ladder_layers(job.ladder_layers)
        self.config = config
        model = build_model(config)
        self.tp_stats, self.pp_stats, self.ep_stats = CommStats(), CommStats(), CommStats()
        pp, tp, ep = job.parallel.degree("pp"), job.parallel.degree("tp"), job.parallel.degree("ep")
        layers = range(config.num_layers)
        if pp > 1:
            self.pp_engine = ctx.engine(ctx.group("pp"), self.pp_stats)
            layers = pipeline.apply(model, self.pp_engine.rank, pp)
        if tp > 1:
            tensor.apply(model, ctx.engine(ctx.group("tp"), self.tp_stats), communicate=job.communicate)
        dp = job.parallel.degree("dp")
        # dp ranks decode their own sequences, but with ep they share the experts: every rank then
        # takes part in every expert exchange until all are done (lockstep)
        self.lockstep = dp > 1 and ep > 1
        if ep > 1:  # experts over the dp x tp ranks and their ep / (dp x tp) replicas
            self.ep_engine = ctx.engine(expert.expert_group(ctx, job.parallel), self.ep_stats)
            share = ep // dp  # consecutive ep-group ranks holding the same rows
            first = (ctx.axis_rank("dp") if dp > 1 else 0) * share
            expert.apply(model, self.ep_engine, job.placement, siblings=range(first, first + share))
        self.recorder = None
        if config.moe is not None and (job.record_routing or job.rebalance_interval):
            from distgen.placement.routing import RoutingRecorder

            here = tuple(i for i in expert.moe_layers(config) if i in set(model.layer_indices))
            self.recorder = RoutingRecorder(here, config.moe.num_experts, config.moe.top_k, window=job.rebalance_window)
            expert.set_observer(model, self.recorder.observe)
        load_parameters(model, checkpoint, self.dtype, ctx.device)
        model.eval()
        self.model = model
        if pp > 1:
            feedback = ctx.engine(pipeline.feedback_group(ctx.mesh), self.pp_stats)
            self.schedule = pipeline.PipelineSchedule(model, self.pp_engine, feedback, layers, config.hidden_size,
                                                      self.dtype, ctx.device, keep_logits=job.return_logits)
        else:
            self.schedule = _SingleStage(model, job.return_logits)
        self.pp = pp

    def set_wiring(self, wiring: str) -> None:
        """Switch between WIRINGS without reloading (weights are the same for all three)."""
        from distgen.models.llama import set_ladder_layers
        from distgen.parallel import tensor

        ladder = self.job.ladder_layers if self.job.ladder_layers is not None else self.config.num_layers
        set_ladder_layers(self.model, ladder if wiring == "ladder" else 0)
        if self.job.parallel.degree("tp") > 1:
            tensor.set_communicate(self.model, wiring != "no-comm")
        self.config = self.model.config

    def set_placement(self, layers: dict[int, list[list[int]]]) -> dict:
        """Move the experts to another placement in place (weights travel by P2P)."""
        from distgen.parallel import expert

        started, sent = time.perf_counter(), self.ep_stats.current.bytes_sent
        moves = [block.migrate(layers[block.layer]) for block in expert.blocks(self.model)]
        return {"experts_received": sum(m["received_experts"] for m in moves),
                "experts_moved_all_ranks": sum(m["moved_experts_all_ranks"] for m in moves),
                "bytes_sent": self.ep_stats.current.bytes_sent - sent, "seconds": time.perf_counter() - started}

    def rebalance(self, step: int) -> dict:
        """Online EPLB: new replicas and packing from the recent loads (the same on every rank,
        since every rank routes every row), then migrate."""
        from distgen.placement.policies import eplb

        loads = self.recorder.window_loads()
        ep = self.job.parallel.degree("ep")
        layers = {layer: eplb(loads[i], ep, self.job.redundant_experts, nodes=self.job.nodes)
                  for i, layer in enumerate(self.recorder.layers)}
        return {"step": step} | self.set_placement(layers)

    def _anyone(self, decoding: bool) -> bool:
        """Lockstep: does any rank of the expert group still decode? (one tiny all-reduce)"""
        flag = torch.tensor([1.0 if decoding else 0.0], device=self.device)
        return bool(self.ep_engine.all_reduce(flag)[0] > 0)

    def _null_pass(self) -> None:
        """Lockstep, nothing to decode here: take part in every MoE layer's exchanges with zero rows."""
        from distgen.parallel import expert

        empty = torch.empty(0, self.config.hidden_size, dtype=self.dtype, device=self.device)
        for block in expert.blocks(self.model):
            block(empty)

    def _follow(self, request: TextRequest) -> "TextResult":
        """A dp rank with no sequences in this request: the prefill and every step, with zero rows."""
        self._null_pass()
        for _ in range(request.max_new_tokens):
            if not self._anyone(False):
                break
            self._null_pass()
        return TextResult(tokens=[])

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def generate(self, request: TextRequest, row_offset: int = 0, step_hook=None) -> TextResult:
        """``row_offset``: index of the first sequence in the whole batch (dp shards), for sampling seeds.
        ``step_hook(step, generated)``: called on every rank after the prefill (step 0) and after each
        decoding step with the tokens so far; it must behave the same on every rank (the resident
        group's leader broadcasts its decisions); returning True stops generation: at once on one
        stage, after the micro-batches already in flight with pipeline stages (no receive is left
        posted)."""
        model, schedule, device = self.model, self.schedule, self.device
        batch = request.batch_size
        if batch == 0:
            return self._follow(request) if self.lockstep else TextResult(tokens=[])
        prompt_len = max(len(p) for p in request.prompt_ids)
        new = request.max_new_tokens
        total = prompt_len + new
        # Left padding: every sequence's next token lands at the same cache index.
        tokens = torch.full((batch, prompt_len), request.pad_token_id, dtype=torch.long)
        key_valid = torch.zeros(batch, total, dtype=torch.bool)
        for row, ids in enumerate(request.prompt_ids):
            tokens[row, prompt_len - len(ids):] = torch.tensor(ids, dtype=torch.long)
            key_valid[row, prompt_len - len(ids):] = True
        lengths = key_valid[:, :prompt_len].sum(1)
        positions = (key_valid[:, :prompt_len].long().cumsum(1) - 1).clamp(min=0)
        tokens, key_valid, lengths, positions = (t.to(device) for t in (tokens, key_valid, lengths, positions))
        cache = model.allocate_cache(batch, total, self.dtype, device)

        micro = self.job.micro_batches or (min(self.pp, batch) if self.pp > 1 else 1)
        bounds = [(batch * i // micro, batch * (i + 1) // micro) for i in range(micro)]
        generators = [torch.Generator(device="cpu").manual_seed(request.seed * 1_000_003 + row_offset + row)
                      for row in range(batch)]
        eos = torch.tensor(request.eos_token_ids or [-1], dtype=torch.long)

        def sample(m: int, logits: torch.Tensor) -> torch.Tensor:
            start, stop = bounds[m]
            rows = logits.float().cpu()
            chosen = [_sample_row(rows[i], request.temperature, request.top_p, generators[start + i])
                      for i in range(stop - start)]
            return torch.tensor(chosen, dtype=torch.long, device=device)

        def context(m: int, step: int):
            start, stop = bounds[m]
            if step == 0:
                pos, first = positions[start:stop], 0
            else:
                pos, first = (lengths[start:stop] + step - 1)[:, None], prompt_len + step - 1
            return model.context(pos, first, key_valid[start:stop], cache.rows(start, stop), self.dtype)

        generated: list[list[int]] = [[] for _ in range(batch)]
        finished = torch.zeros(batch, dtype=torch.bool)
        known: dict[int, tuple[bool, torch.Tensor]] = {}
        logits_by_step: list[dict[int, torch.Tensor]] = []

        def learn(m: int, step: int) -> tuple[bool, torch.Tensor]:
            """Record micro-batch m's tokens from run ``step`` once; returns (continues, tokens)."""
            if m not in known:
                chosen = schedule.next_tokens(m)
                logits = schedule.last_logits(m)
                if logits is not None:
                    logits_by_step.extend({} for _ in range(step + 1 - len(logits_by_step)))
                    logits_by_step[step][m] = logits.cpu()
                start, stop = bounds[m]
                cpu = chosen.cpu()
                for i in range(stop - start):
                    if not finished[start + i]:
                        generated[start + i].append(int(cpu[i]))
                finished[start:stop] |= torch.isin(cpu, eos)
                known[m] = (step + 1 < new and not bool(finished[start:stop].all()), chosen)
            return known[m]

        def launch(m: int, inputs: torch.Tensor, step: int) -> None:
            schedule.run(m, inputs, context(m, step), sample, all_logits=self.job.return_logits and step == 0)
            if schedule.sampled_here(m) is not None:  # the last stage knows at once: post the next receive early
                more, _ = learn(m, step)
                if more:
                    schedule.expect(m, bounds[m][1] - bounds[m][0], 1)

        result = TextResult(tokens=generated)
        for stats in (self.tp_stats, self.pp_stats, self.ep_stats):
            stats.reset()

        def record_step(advanced: int) -> None:
            result.step_tokens.append(advanced)
            for stats, sent, wait in ((self.tp_stats, result.tp_bytes, result.tp_wait_seconds),
                                      (self.pp_stats, result.pp_bytes, result.pp_wait_seconds)):
                sent.append(stats.current.bytes_sent)
                wait.append(stats.current.wait_s)
                if stats is self.tp_stats:
                    result.tp_collectives.append(stats.current.collectives)
                stats.end_step()
            result.ep_bytes.append(self.ep_stats.current.bytes_sent)
            result.ep_wait_seconds.append(self.ep_stats.current.wait_s)
            result.ep_sent_to.append(dict(self.ep_stats.current.sent_to))
            self.ep_stats.end_step()

        # Prefill: every micro-batch's prompt, receives posted ahead; done when all first tokens are known.
        started = time.perf_counter()
        for m, (start, stop) in enumerate(bounds):
            schedule.expect(m, stop - start, prompt_len)
        for m, (start, stop) in enumerate(bounds):
            launch(m, tokens[start:stop], 0)
        for m in range(micro):
            learn(m, 0)
        self._sync()
        result.prefill_seconds = time.perf_counter() - started
        record_step(batch)

        def stop_requested(hook_index: int) -> bool:
            """Ask the hook; with pipeline stages, finish the runs in flight: the latest run any stage
            has learned is ``hook_index``, so no stage posts a receive past run hook_index + 1."""
            nonlocal new
            if step_hook is None or not step_hook(hook_index, generated):
                return False
            if self.pp == 1:
                return True
            new = min(new, hook_index + 2)
            return False

        stopped = stop_requested(0)
        # Decode: iteration `step` takes each micro-batch's tokens of run `step` and starts run step+1.
        started = time.perf_counter()
        active = [] if stopped else list(range(micro))
        for step in range(0 if stopped else new):
            advanced = 0
            if self.lockstep:  # pp = 1, one micro-batch: all ranks agree first whether anyone decodes
                going = []
                for m in list(active):
                    more, chosen = learn(m, step)
                    del known[m]
                    if more:
                        going.append((m, chosen))
                    else:
                        active.remove(m)
                if not self._anyone(bool(going)):
                    break
                if not going:
                    self._null_pass()
                for m, chosen in going:
                    launch(m, chosen[:, None], step + 1)
                    advanced += bounds[m][1] - bounds[m][0]
            else:  # learn and launch micro-batch by micro-batch, so pipeline stages overlap
                for m in list(active):
                    more, chosen = learn(m, step)
                    del known[m]
                    if not more:
                        active.remove(m)
                        continue
                    start, stop = bounds[m]
                    schedule.expect(m, stop - start, 1)
                    launch(m, chosen[:, None], step + 1)
                    advanced += stop - start
            if advanced:
                record_step(advanced)
            if stop_requested(step + 1):
                break
            if not active and not self.lockstep:
                break
            interval = self.job.rebalance_interval
            if interval and (step + 1) % interval == 0:
                result.rebalances.append(self.rebalance(step + 1))
        self._sync()
        result.decode_seconds = time.perf_counter() - started
        schedule.drain()
        if self.job.return_logits and logits_by_step:
            def stacked(step: int) -> torch.Tensor | None:
                parts = logits_by_step[step]
                return torch.cat([parts[m] for m in range(micro)]) if len(parts) == micro else None

            result.prefill_logits = stacked(0)
            result.step_logits = [s[:, -1] for s in map(stacked, range(1, len(logits_by_step))) if s is not None]
        return result


def _merge_dp_shards(results: list[dict], ctx, dp_index: int) -> list[dict]:
    """Rank 0: every result with the sequences of all dp shards, in batch order (left-padded prefill
    logits to the longest prompt). Timings and byte counts stay rank 0's. Bookkeeping after the
    work: one object gather."""
    import torch.distributed as dist

    everyone: list = [None] * ctx.world_size
    dist.all_gather_object(everyone, (dp_index, results))
    shards = {}
    for index, shard in everyone:
        shards.setdefault(index, shard)  # one rank per dp index (its tp / ep siblings hold the same)
    ordered = [shards[i] for i in sorted(shards)]
    merged = []
    for i, result in enumerate(results):
        parts = [shard[i] for shard in ordered]
        out = dict(result)
        out["tokens"] = [t for part in parts for t in part["tokens"]]
        logits = [p["prefill_logits"] for p in parts if p["prefill_logits"] is not None]
        if logits:
            longest = max(t.shape[1] for t in logits)
            out["prefill_logits"] = torch.cat([torch.nn.functional.pad(t, (0, 0, longest - t.shape[1], 0)) for t in logits])
            steps = [p["step_logits"] for p in parts if p["step_logits"] is not None]
            out["step_logits"] = [torch.cat([s[k] for s in steps]) for k in range(min(len(s) for s in steps))]
        merged.append(out)
    return merged


def run_text_job(job: TextJob, ctx) -> dict | None:
    """Rank 0 returns one result per request (per request and wiring, in that order, with wirings)."""
    generator = TextGenerator(job, ctx)
    dp = job.parallel.degree("dp")
    dp_index = ctx.axis_rank("dp") if dp > 1 else 0
    results = []
    for placement, layers in job.placements or ((None, None),):
        moved = generator.set_placement(layers) if layers is not None else None
        for request in job.requests:
            # dp: this rank's contiguous share of the batch (possibly none)
            first = request.batch_size * dp_index // dp
            mine = dataclasses.replace(request, prompt_ids=request.prompt_ids[first:request.batch_size * (dp_index + 1) // dp])
            for wiring in job.wirings or (None,):
                if wiring is not None:
                    generator.set_wiring(wiring)
                results.append(dataclasses.asdict(generator.generate(mine, row_offset=first))
                               | {"wiring": wiring, "placement": placement, "migration": moved})
    if dp > 1:
        results = _merge_dp_shards(results, ctx, dp_index)
    if job.parallel.degree("ep") > 1:
        # every rank's expert bytes to every rank, per request (bookkeeping, not activations: one
        # object gather after the work)
        import torch.distributed as dist

        mine = [[sum(step.get(dst, 0) for step in r["ep_sent_to"]) for dst in range(ctx.world_size)] for r in results]
        everyone: list = [None] * ctx.world_size
        dist.all_gather_object(everyone, mine)
        for i, r in enumerate(results):
            r["ep_bytes_matrix"] = [everyone[src][i] for src in range(ctx.world_size)]
    if job.record_routing and ctx.rank == 0:
        generator.recorder.trace().save(job.record_routing)
    if ctx.rank != 0:
        return None
    return {
        "config": {"ladder_layers": generator.config.ladder_layers, "num_layers": generator.config.num_layers},
        "results": results,
    }
