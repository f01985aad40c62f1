"""Pipeline parallelism over a ``pp`` axis (ALGORITHMS.md §7), applied to a plain model.

:func:`apply` keeps this stage's contiguous layers of a meta-device
:class:`~distgen.models.llama.CausalLM` (plus the embedding on the first stage, the final norm
and head on the last) and drops the other parameters' sources, so a rank loads only its
stage. :class:`PipelineSchedule` runs micro-batches through the stages: activations go to the
next stage with async P2P through the exchange engine, the receives posted ahead; the last
stage samples and sends each micro-batch's tokens to every other stage, so stage 0 starts a
micro-batch's next decoding step as soon as its tokens arrive while later stages still work
on the other micro-batches. A stage boundary inside a Ladder region carries the residual
stream and both late sub-block outputs (waited before sending).

Activations and tokens travel on two communicators over the same ranks (:func:`feedback_group`):
on each, every pair of stages carries one kind of message in one direction, issued in the same
order on both ends. NCCL runs a pair's point-to-point operations in issue order on one stream,
so a receive posted ahead for an activation must never sit in front of a token that the peer
sends first.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from distgen.comm import ExchangeEngine
from distgen.config import ConfigError
from distgen.models.llama import CausalLM, ForwardContext, Ready, TextModelConfig, join_residual

__all__ = ["PipelineSchedule", "apply", "feedback_group", "stage_layers", "validate"]

TOKENS_TAG, LOGITS_TAG, ACTIVATION_TAG = 1, 2, 3


def stage_layers(config: TextModelConfig, pp: int) -> list[range]:
    """Contiguous layer ranges, one per stage, balanced by weights read per decoding step.

    The last stage also runs the head (vocab x hidden weights; for SmolLM2 as much as 8 layers),
    so it gets fewer layers; the others share the rest evenly, the first stages taking one
    extra when uneven. Every stage keeps at least one layer.
    """
    layers = config.num_layers
    if pp == 1:
        return [range(layers)]
    hd = config.head_dim
    per_layer = (2 * config.hidden_size * config.num_heads * hd + 2 * config.hidden_size * config.num_kv_heads * hd
                 + 3 * config.hidden_size * config.intermediate_size)
    head = config.vocab_size * config.hidden_size / per_layer  # in layers

    def slowest(last: int) -> float:
        return max(-(-(layers - last) // (pp - 1)), last + head)

    last = min(range(1, layers - pp + 2), key=lambda k: (slowest(k), -k))
    base, extra = divmod(layers - last, pp - 1)
    ranges, start = [], 0
    for stage in range(pp - 1):
        size = base + (1 if stage < extra else 0)
        ranges.append(range(start, start + size))
        start += size
    ranges.append(range(start, layers))
    return ranges


def validate(config: TextModelConfig, pp: int) -> None:
    if pp > config.num_layers:
        raise ConfigError(f"--parallel pp={pp}: more pipeline stages than the model's {config.num_layers} layers; "
                          f"pp must be between 1 and {config.num_layers}")


def apply(model: CausalLM, stage: int, pp: int) -> range:
    """Keep stage ``stage``'s part of ``model`` (meta device, before loading); returns its layers."""
    config = model.config
    validate(config, pp)
    mine = stage_layers(config, pp)[stage]
    for key in list(model.model.layers.keys()):
        if int(key) not in mine:
            del model.model.layers[key]
    if stage != 0:
        model.model.embed_tokens = None
    if stage != pp - 1:
        model.model.norm = None
        model.lm_head = None
    present = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    for name in list(model.weight_sources):
        if name not in present:
            del model.weight_sources[name]
    return mine


def feedback_group(mesh, axis: str = "pp") -> dist.ProcessGroup:
    """A second process group over this rank's ``axis`` ranks (same order), for the tokens sent
    back from the last stage. Every rank creates every such group, in the same order."""
    ranks = mesh.mesh
    dim = mesh.mesh_dim_names.index(axis)
    rows = ranks.movedim(dim, -1).reshape(-1, ranks.shape[dim]).tolist()
    mine = None
    for row in rows:
        group = dist.new_group(row)
        if dist.get_rank() in row:
            mine = group
    return mine


class PipelineSchedule:
    """One rank's stage of the pipeline, driven micro-batch by micro-batch by the generator.

    For every micro-batch ``m`` and step, every stage calls, in the same order:
    ``expect(m, rows, chunk)`` (post the receive for its next input; no-op on stage 0), then
    ``run(m, tokens, ctx, sample)``. ``next_tokens(m)`` returns the tokens sampled by the last
    stage for the last ``run`` of ``m`` (waiting for them on other stages).
    """

    def __init__(self, model: CausalLM, engine: ExchangeEngine, feedback: ExchangeEngine, layers: range,
                 hidden: int, dtype: torch.dtype, device: torch.device, keep_logits: bool = False):
        self.model, self.engine, self.feedback = model, engine, feedback
        self.stage, self.stages = engine.rank, engine.world
        self.first, self.last = self.stage == 0, self.stage == self.stages - 1
        self.layers = layers
        self.hidden, self.dtype, self.device = hidden, dtype, device
        self.keep_logits = keep_logits
        self._inputs: dict[int, object] = {}  # m -> Pending receive of the next activation
        self._token_recv: dict[int, object] = {}  # m -> Pending receive of sampled tokens
        self._logit_recv: dict[int, object] = {}
        self._tokens: dict[int, torch.Tensor] = {}
        self._logits: dict[int, torch.Tensor] = {}
        self._sends: dict[int, list] = {}  # m -> in-flight sends (kept referenced until waited)

    @property
    def recv_parts(self) -> int:
        """A boundary inside a Ladder region carries (residual, attention out, MLP out)."""
        start = self.layers.start
        return 3 if start > 0 and self.model.config.is_ladder(start - 1) else 1

    @property
    def send_parts(self) -> int:
        return 3 if not self.last and self.model.config.is_ladder(self.layers.stop - 1) else 1

    def expect(self, m: int, rows: int, chunk: int) -> None:
        """Post the receive for micro-batch ``m``'s next input activation (ahead of its use)."""
        if self.first or m in self._inputs:
            return
        buf = torch.empty((self.recv_parts, rows, chunk, self.hidden), dtype=self.dtype, device=self.device)
        self._inputs[m] = self.engine.exchange({}, {self.stage - 1: buf}, tag=ACTIVATION_TAG)

    def run(self, m: int, tokens: torch.Tensor, ctx: ForwardContext,
            sample: Callable[[int, torch.Tensor], torch.Tensor], all_logits: bool = False) -> None:
        for pending in self._sends.pop(m, []):
            pending.wait()
        if self.first:
            h, attn_out, mlp_out = self.model.embed(tokens), None, None
        else:
            received = self._inputs.pop(m).wait()[self.stage - 1]
            h = received[0]
            ladder = received.shape[0] == 3
            attn_out = Ready(received[1]) if ladder else None
            mlp_out = Ready(received[2]) if ladder else None
        h, attn_out, mlp_out = self.model.run_layers(h, attn_out, mlp_out, ctx)
        if not self.last:
            if self.send_parts == 3:
                payload = torch.stack((h, attn_out.wait(), mlp_out.wait()))
            else:
                payload = h[None]
            self._sends[m] = [self.engine.exchange({self.stage + 1: payload}, {}, tag=ACTIVATION_TAG)]
            rows = ctx.rows  # one sampled token per sequence (a slot batch is one flat chunk of many)
            buf = torch.empty(rows, dtype=torch.long, device=self.device)
            self._token_recv[m] = self.feedback.exchange({}, {self.stages - 1: buf}, tag=TOKENS_TAG)
            if self.keep_logits and self.first:
                shape = (rows, h.shape[1] if all_logits else 1, self.model.config.vocab_size)
                buf = torch.empty(shape, dtype=torch.float32, device=self.device)
                self._logit_recv[m] = self.feedback.exchange({}, {self.stages - 1: buf}, tag=LOGITS_TAG)
            return
        h = join_residual(h, attn_out, mlp_out)
        logits = self.model.head(h if all_logits else ctx.last_positions(h))
        chosen = sample(m, logits[:, -1])
        self._tokens[m] = chosen
        sends = [self.feedback.exchange({s: chosen for s in range(self.stages - 1)}, {}, tag=TOKENS_TAG)]
        if self.keep_logits:
            self._logits[m] = logits.float()
            sends.append(self.feedback.exchange({0: logits.float()}, {}, tag=LOGITS_TAG))
        self._sends[m] = sends

    def sampled_here(self, m: int) -> torch.Tensor | None:
        """The tokens of ``m``'s last run if this stage sampled them (last stage), else None."""
        return self._tokens.get(m) if self.last else None

    def next_tokens(self, m: int) -> torch.Tensor:
        if self.last:
            return self._tokens.pop(m)
        return self._token_recv.pop(m).wait()[self.stages - 1]

    def last_logits(self, m: int) -> torch.Tensor | None:
        if self.last:
            return self._logits.pop(m, None)
        pending = self._logit_recv.pop(m, None)
        return None if pending is None else pending.wait()[self.stages - 1]

    def drain(self) -> None:
        for sends in self._sends.values():
            for pending in sends:
                pending.wait()
        self._sends.clear()
        leftover = [m for m in self._inputs] + [m for m in self._token_recv]
        if leftover:
            raise RuntimeError(f"pipeline stage {self.stage}: receives still posted for micro-batches {leftover}")
