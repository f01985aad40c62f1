"""Clip parallelism over video frames (ALGORITHMS.md §4; Video-Infinity, arXiv 2406.16260).

``apply(denoiser, engine, config)`` changes an unmodified video UNet (``UNet3DConditionModel``,
``UNetMotionModel``) in place so that each rank of ``engine``'s group denoises one contiguous
clip of frames:

* a forward pre-hook cuts the latent (and AnimateDiff's per-frame text states) to this rank's
  clip; a forward hook puts the clip's output back into a full-length tensor, so the
  pipeline's own loop runs unchanged on every rank. Schedulers act frame by frame, so frames
  outside the clip are never needed (they get a zero prediction, and nothing reads them);
  a scheduler that is not frame-wise (dynamic thresholding) gets the outputs all-gathered;
* spatial layers act per frame and stay as they are; the temporal modules are replaced:
  - ``TemporalConvLayer`` -> :class:`_ClipTemporalConv`: halo frames from ranks i±1 (P2P),
    on interior sides only (the video ends keep the convs' own zero padding): one frame per
    conv stage, sent with that stage's GroupNorm statistics, or, without statistics
    exchanged, the whole receptive field of its 4 stacked k=3 convs at once (in stages when
    clips are shorter than 4 frames). Its GroupNorms use statistics of the whole video,
    computed over real frames only: halo frames are normalised, never counted;
  - ``GroupNorm`` of ``TransformerTemporalModel`` / ``AnimateDiffTransformer3D`` (statistics
    across frames) -> :class:`_ClipGroupNorm` (whole-video statistics);
  - temporal self-attention (``attn1``/``attn2`` of those blocks) -> :class:`_ClipAttnProcessor`
    (exact: keys/values of the whole video; dual-scope: keys/values of the window and global
    frames, the window's sent before the queries are projected so the two overlap);
  - AnimateDiff's sinusoidal frame positions -> :class:`_ClipPositions` (global frame indices
    where the table allows, see ``ClipState.position_offset``).

Modes (``ClipConfig.mode``):

* ``exact``: full temporal K/V (all-gathered), fresh halos and statistics: the single-device
  result. Our oracle.
* ``dual-scope``: halos and statistics as exact; attention over a local window of
  ±``local_frames`` (the neighbours' nearest frames, P2P) plus ``global_frames`` frames sampled
  evenly across the video (all-gathered, identical on every rank); +10 on the global logits
  while t >= ``scope_switch_t``, on the local ones after. Missing neighbours at the video ends
  are simply absent (never zero-filled keys).
* ``naive``: independent clips, nothing exchanged.

``stale_context`` (exact, dual-scope): after ``warmup_steps`` synchronous denoiser calls,
halos, K/V and statistics of step t-1 are used at step t (DistriFusion in time) and this
step's values are sent asynchronously, so no exchange blocks the step.

GroupNorm statistics travel as (count, mean, M2) per group and are merged with Chan's
parallel rule: the mean-then-centred-variance of the paper's two-stage scheme, in one round.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from distgen.comm import ExchangeEngine
from distgen.config_video import ClipConfig
from distgen.parallel._denoiser import get_sample, map_output, merge_heads, set_sample, split_heads

SUPPORTED_DENOISERS = ("UNet3DConditionModel", "UNetMotionModel")
TEMPORAL_BLOCKS = ("TransformerTemporalModel", "AnimateDiffTransformer3D")
SCOPE_BIAS = 10.0  # Video-Infinity's logit bonus for the emphasised scope


def clip_lengths(frames: int, world: int) -> list[int]:
    """Contiguous clips, one per rank; when frames do not divide, the larger clips go first."""
    base, extra = divmod(frames, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


def global_frame_indices(frames: int, count: int) -> list[int]:
    """``count`` frames spread evenly over the video (centres of equal segments)."""
    return sorted({min(frames - 1, int((j + 0.5) * frames / count)) for j in range(count)})


@dataclasses.dataclass
class DualScopeLayout:
    """The keys of one rank's dual-scope attention: [previous window | own clip | next window |
    global frames outside those], and the (queries, keys) bias that weights the two scopes."""

    extra: list[int]  # positions, among all global frames, of those outside this rank's window
    gather_globals: bool  # some rank needs another's global frames (the same on every rank)
    bias: torch.Tensor
    # Where the extra frames are among the gathered ones: (owning rank, index into its part).
    extra_sources: list[tuple[int, slice | list[int]]] = dataclasses.field(default_factory=list)


def dual_scope_layout(starts: list[int], lengths: list[int], rank: int, local: int, global_indices: list[int],
                      emphasise_global: bool, dtype=torch.float32, device=None) -> DualScopeLayout:
    """Keys and bias of ``rank``'s clip for a window of ±``local`` frames and ``global_indices``.

    Query frame q sees key frame k locally when |k - q| <= local (k in its clip or the
    neighbours' edges) and globally when k is a global frame; each scope adds its bias (+10 for
    the emphasised one) and a key in both gets logaddexp of the two, which is what two copies
    of it (Video-Infinity's separate local and global keys) give. Missing neighbours at the
    video ends contribute no keys.
    """
    world = len(lengths)

    def window(r: int) -> tuple[int, int]:
        return starts[r] - (local if r > 0 else 0), starts[r] + lengths[r] + (local if r < world - 1 else 0)

    def outside(r: int) -> list[int]:
        lo, hi = window(r)
        return [p for p, g in enumerate(global_indices) if not lo <= g < hi]

    lo, hi = window(rank)
    extra = outside(rank)
    frames = torch.tensor(list(range(lo, hi)) + [global_indices[p] for p in extra], device=device)
    queries = torch.arange(starts[rank], starts[rank] + lengths[rank], device=device)
    in_window = torch.arange(len(frames), device=device) < hi - lo
    local_scope = in_window[None, :] & ((frames[None, :] - queries[:, None]).abs() <= local)
    global_scope = torch.isin(frames, torch.tensor(global_indices, dtype=frames.dtype, device=device))
    local_bias, global_bias = (0.0, SCOPE_BIAS) if emphasise_global else (SCOPE_BIAS, 0.0)
    none = torch.tensor(float("-inf"), dtype=torch.float64, device=device)
    bias = torch.logaddexp(torch.where(local_scope, local_bias, none),
                           torch.where(global_scope, global_bias, none).expand_as(local_scope))
    owner = [(r, sum(1 for h in global_indices if starts[r] <= h < g))
             for g in global_indices for r in range(world) if starts[r] <= g < starts[r] + lengths[r]]
    sources = [(r, _as_index([owner[p][1] for p in extra if owner[p][0] == r]))
               for r in sorted({owner[p][0] for p in extra})]
    return DualScopeLayout(extra, any(outside(r) for r in range(world)), bias.to(dtype), sources)


class ClipState:
    """What every replaced module of one denoiser needs to know about the current call."""

    def __init__(self, engine: ExchangeEngine, config: ClipConfig, max_positions: int | None = None,
                 per_frame_text: bool = False):
        self.engine = engine
        self.config = config
        self.requested = config  # as given: windows left unset are resolved again for each video length
        self.rank = engine.rank
        self.world = engine.world
        self.exchanges = config.active_exchanges if self.world > 1 else frozenset()
        self.max_positions = max_positions
        self.per_frame_text = per_frame_text  # AnimateDiff passes text states repeated per frame
        self.gather_outputs = False
        self.call_index = 0
        self.timestep = 1000.0
        self.frames = 0
        self.lengths: list[int] = []
        self.starts: list[int] = []
        self.replaced: dict[str, int] = {}
        self._layout_key = None
        self._layout = None

    # ------------------------------------------------------------------ geometry
    def set_frames(self, frames: int) -> None:
        if frames == self.frames:
            return
        if frames < self.world:
            raise RuntimeError(f"clip={self.world}: {frames} frames cannot fill {self.world} clips")
        self.frames = frames
        self.config = self.requested.resolved(frames, self.world)
        self.lengths = clip_lengths(frames, self.world)
        self.starts = [sum(self.lengths[:r]) for r in range(self.world)]
        indices = global_frame_indices(frames, self.config.global_frames) if self.config.global_frames else []
        self.global_indices = indices
        # Which of the sampled global frames each rank owns (clip-local indices).
        self.global_owned = [
            [i - s for i in indices if s <= i < s + n] for s, n in zip(self.starts, self.lengths)
        ]
        self._layout_key = None

    @property
    def start(self) -> int:
        return self.starts[self.rank]

    @property
    def length(self) -> int:
        return self.lengths[self.rank]

    @property
    def position_offset(self) -> int:
        """First frame position of this clip in AnimateDiff's sinusoidal table.

        Global indices when the whole video fits the table (what one device computes);
        beyond it every clip uses positions 0..len-1, the range the motion modules were
        trained on (validation keeps clips within the table).
        """
        if self.max_positions is None or self.frames <= self.max_positions:
            return self.start
        return 0

    @property
    def conv_halo(self) -> int:
        """Halo frames fetched per stage by temporal convs (0: no exchange).

        With GroupNorm statistics exchanged, every conv stage synchronises anyway: one frame per
        stage then rides along with the statistics and no rank computes a neighbour's frames.
        Without them, one exchange of the whole receptive field (4 frames) saves three rounds.
        """
        if "conv" not in self.exchanges:
            return 0
        return 1 if "norm" in self.exchanges else min(4, min(self.lengths))

    # ------------------------------------------------------------------ stepping
    def new_request(self) -> None:
        self.call_index = 0
        self.engine.reset()

    @property
    def sync_step(self) -> bool:
        return not self.config.stale_context or self.call_index < max(1, self.config.warmup_steps)

    def gather(self, name: str, fresh: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's value of ``name``: fresh (blocking) in sync steps, else last step's.

        The returned tensors may be the engine's static buffers: consume them (copy / cat)
        before :meth:`publish`.
        """
        if not self.config.stale_context:
            return self.engine.all_gather(fresh)
        if self.sync_step:
            return self.engine.gather_now(name, fresh)  # also the next step's stale copy
        parts = list(self.engine.stale(name))
        parts[self.rank] = fresh
        return parts

    def publish(self, name: str, fresh: torch.Tensor) -> None:
        """Stale steps: send this step's value for the next step (async, bucketed)."""
        if self.config.stale_context and not self.sync_step:
            self.engine.enqueue(name, fresh)

    def halo(self, name: str, to_prev: torch.Tensor, to_next: torch.Tensor) -> tuple:
        """(frames from rank i-1, frames from rank i+1), copied; None at the video ends."""
        engine = self.engine
        if self.sync_step:
            engine.post_halo(name, to_prev, to_next)
            from_prev, from_next = engine.halo(name)
            return from_prev, from_next
        from_prev, from_next = engine.halo(name)  # posted at the previous step
        from_prev = None if from_prev is None else from_prev.clone()
        from_next = None if from_next is None else from_next.clone()
        engine.post_halo(name, to_prev, to_next)  # this step's frames, used at the next
        return from_prev, from_next

    def halo_begin(self, name: str, to_prev: torch.Tensor, to_next: torch.Tensor):
        """Start a halo exchange; :meth:`halo_end` returns it. Synchronous steps post the
        transfer here so that work between the two calls overlaps it."""
        if self.sync_step:
            self.engine.post_halo(name, to_prev, to_next)
            return None
        return self.halo(name, to_prev, to_next)  # stale: last step's frames, already here

    def halo_end(self, name: str, begun) -> tuple:
        return begun if begun is not None else self.engine.halo(name)

    # ------------------------------------------------------------------ group norm
    def group_norm(self, x: torch.Tensor, norm: nn.GroupNorm, name: str, own: slice) -> torch.Tensor:
        """GroupNorm of ``x`` (B, C, frames, ...) with statistics of the video's real frames.

        ``own`` selects this clip's frames in ``x`` (the rest is halo: normalised, not counted).
        """
        return self.normalize(x, norm, self.norm_stats(x[:, :, own], norm, name))

    def norm_stats(self, own: torch.Tensor, norm: nn.GroupNorm, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, variance) per (batch, group) over the video's real frames; ``own``: this clip's."""
        local = _local_stats(own, norm.num_groups)
        if "norm" in self.exchanges:
            mean, var = _merge_stats(self.gather(name, local))
            self.publish(name, local)
            return mean, var
        return local[..., 1], local[..., 2] / local[..., 0]

    def normalize(self, x: torch.Tensor, norm: nn.GroupNorm, stats: tuple[torch.Tensor, torch.Tensor],
                  out: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` normalised with ``stats``; written into ``out`` (a view of a larger buffer) when given."""
        mean, var = stats
        groups = norm.num_groups
        # One pass over x: fold normalisation and affine into a per-(batch, channel) scale and shift.
        per_group = x.shape[1] // groups
        scale = torch.rsqrt(var + norm.eps).repeat_interleave(per_group, dim=1)
        shift = -mean.repeat_interleave(per_group, dim=1) * scale
        if norm.affine:
            scale = scale * norm.weight.float()
            shift = shift * norm.weight.float() + norm.bias.float()
        shape = x.shape[:2] + (1,) * (x.dim() - 2)
        # mul then add_ rather than addcmul: with per-channel operands addcmul takes a slow
        # broadcasting loop on CPU (~3x the two vectorised passes).
        if out is not None and x.dtype == torch.float32:
            return torch.mul(x, scale.view(shape), out=out).add_(shift.view(shape))
        result = (x.float() * scale.view(shape)).add_(shift.view(shape)).to(x.dtype)
        return result if out is None else out.copy_(result)

    # ------------------------------------------------------------------ attention
    def full_kv(self, name: str, kv: torch.Tensor) -> torch.Tensor:
        """Exact: keys|values (N, frames, 2D) of the whole video, in frame order."""
        return torch.cat(self._gather_frames(f"{name}.full", kv, self.lengths), dim=1)

    def dual_scope_begin(self, name: str, kv: torch.Tensor):
        """Dual-scope, part 1: send this clip's edge keys|values (N, frames, 2D) to the neighbours.

        Keys and values travel (twice the bytes of the attention inputs) so that no rank
        projects another's frames again: on CPU the projections cost more than the bytes.
        """
        local = self.config.local_frames
        return self.halo_begin(f"{name}.local", kv[:, :local], kv[:, -local:])

    def dual_scope_end(self, name: str, kv: torch.Tensor, begun) -> tuple[torch.Tensor, torch.Tensor]:
        """Part 2: (keys|values, bias) over the local window and the global frames.

        A global frame that is also in the window (or this clip) is one key whose bias is
        logaddexp of its two scopes' biases: softmax sums exp(logit) over keys, so that equals
        the reference's two copies of it, exactly, with fewer keys.
        """
        layout = self._dual_scope_layout(kv.dtype, kv.device)
        extra = None
        if layout.gather_globals:
            mine = kv[:, _as_index(self.global_owned[self.rank])]
            sampled = self._gather_frames(f"{name}.global", mine, [len(o) for o in self.global_owned])
            if layout.extra:
                extra = torch.cat([sampled[r][:, index] for r, index in layout.extra_sources], dim=1)
        from_prev, from_next = self.halo_end(f"{name}.local", begun)
        if from_prev is None and from_next is None and extra is None:
            return kv, layout.bias
        # The layout's key order: previous window, own clip, next window, extra globals.
        return torch.cat([p for p in (from_prev, kv, from_next, extra) if p is not None], dim=1), layout.bias

    def _gather_frames(self, name: str, mine: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
        """Every rank's ``mine`` (N, counts[rank], ...), in rank order; padded to equal shapes on
        the wire, trimmed here."""
        width = max(counts)
        if mine.shape[1] < width:
            mine = F.pad(mine, (0, 0, 0, width - mine.shape[1]))
        parts = [part[:, :n] for part, n in zip(self.gather(name, mine), counts)]
        self.publish(name, mine)
        return parts

    def _dual_scope_layout(self, dtype, device) -> DualScopeLayout:
        emphasise_global = self.timestep >= self.config.scope_switch_t
        key = (emphasise_global, dtype, device)
        if key != self._layout_key:
            self._layout_key = key
            self._layout = dual_scope_layout(self.starts, self.lengths, self.rank, self.config.local_frames,
                                           self.global_indices, emphasise_global, dtype, device)
        return self._layout

    # ------------------------------------------------------------------ denoiser io
    def expand_output(self, clip: torch.Tensor) -> torch.Tensor:
        """This clip's prediction (B, C, f, h, w) placed in a full-length tensor."""
        if self.gather_outputs:
            return self._padded_gather_frames(clip)
        full = clip.new_zeros(clip.shape[:2] + (self.frames,) + clip.shape[3:])
        full[:, :, self.start : self.start + self.length] = clip
        return full

    def _padded_gather_frames(self, clip: torch.Tensor) -> torch.Tensor:
        width = max(self.lengths)
        padded = F.pad(clip, (0, 0, 0, 0, 0, width - clip.shape[2]))
        parts = self.engine.all_gather(padded)
        return torch.cat([p[:, :, :n] for p, n in zip(parts, self.lengths)], dim=2)


def _as_index(positions: list[int]):
    """A slice where ``positions`` are evenly spaced (a view, not a gather), else the list."""
    if len(positions) < 2:
        return slice(positions[0], positions[0] + 1) if positions else positions
    step = positions[1] - positions[0]
    if step > 0 and all(b - a == step for a, b in zip(positions, positions[1:])):
        return slice(positions[0], positions[-1] + 1, step)
    return positions


def _local_stats(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(count, mean, M2) per (batch, group) of ``x`` (B, C, ...), fp32, without cancellation.

    GroupNorm's own kernel gives the moments (mean and 1/sqrt(var + eps), eps = 0): one
    vectorised pass, some 20x faster on CPU than ``torch.var_mean`` over the same groups.
    """
    x = x.float().contiguous()
    _, mean, rstd = torch.native_group_norm(x, None, None, x.shape[0], x.shape[1], x[0, 0].numel(), groups, 0.0)
    count = x[0].numel() // groups
    var = rstd.pow(-2)  # var = 0 gives rstd = inf and back 0
    return torch.stack([torch.full_like(mean, count), mean, var * count], dim=-1)


def _merge_stats(parts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Chan's parallel merge of (count, mean, M2): global mean and (biased) variance."""
    stats = torch.stack(parts)
    count, means = stats[..., 0], stats[..., 1]
    total = count.sum(0)
    mean = (count * means).sum(0) / total
    m2 = stats[..., 2].sum(0) + (count * (means - mean).square()).sum(0)
    return mean, m2 / total


class _ClipGroupNorm(nn.Module):
    """GroupNorm over (B, C, frames, H, W) with statistics of the whole video."""

    def __init__(self, norm: nn.GroupNorm, state: ClipState, name: str):
        super().__init__()
        self.norm = norm
        self.state = state
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.state.group_norm(x, self.norm, self.name, slice(None))


class _ClipTemporalConv(nn.Module):
    """``TemporalConvLayer`` (4 x [GroupNorm, SiLU, Dropout, Conv3d k=(3,1,1)]) on one clip.

    Interior sides get halo frames of the neighbours' activations (``ClipState.conv_halo`` per
    exchange; each k=3 conv consumes one frame per side); the video ends keep zero padding.
    A stage that fetches a halo sends the neighbours its raw edge frames while the GroupNorm
    statistics of its own frames travel, then normalises own and halo frames alike.
    """

    def __init__(self, layer: nn.Module, state: ClipState, name: str):
        super().__init__()
        self.layer = layer
        self.state = state
        self.name = name
        self.stages = [layer.conv1, layer.conv2, layer.conv3, layer.conv4]
        for seq in self.stages:
            conv = seq[-1]
            if not isinstance(seq[0], nn.GroupNorm) or not isinstance(conv, nn.Conv3d) or tuple(conv.kernel_size[:1]) != (3,) \
                    or conv.padding[0] != 1 or conv.stride[0] != 1 or conv.dilation[0] != 1:
                raise NotImplementedError(f"clip parallelism: unexpected TemporalConvLayer structure at {name}")

    def forward(self, hidden_states: torch.Tensor, num_frames: int = 1) -> torch.Tensor:
        state = self.state
        x = hidden_states[None, :].reshape((-1, num_frames) + hidden_states.shape[1:]).permute(0, 2, 1, 3, 4)
        identity = x
        width = state.conv_halo
        has_prev = width > 0 and state.rank > 0
        has_next = width > 0 and state.rank < state.world - 1
        h, left = x, 0  # `left`: halo frames still attached on each interior side
        lead, trail = (0 if has_prev else 1), (0 if has_next else 1)  # the convs' own zero padding at video ends
        for i, seq in enumerate(self.stages):
            name = f"{self.name}.{i}"
            if width and left == 0:
                # h is exactly this clip's frames here: its statistics travel while the halo does
                left = min(width, len(self.stages) - i)
                begun = state.halo_begin(name, h[:, :, :left], h[:, :, -left:])
                stats = state.norm_stats(h, seq[0], name)
                from_prev, from_next = state.halo_end(name, begun)
                parts = [p for p in (from_prev, h, from_next) if p is not None]
            else:
                own_start = left if has_prev else 0
                stats = state.norm_stats(h[:, :, own_start:own_start + num_frames], seq[0], name)
                parts = [h]
            # Normalise every part straight into one buffer that also holds the zero padding: no
            # concatenation, no padded copy.
            frames = sum(p.shape[2] for p in parts)
            buffer = h.new_empty(h.shape[:2] + (lead + frames + trail,) + h.shape[3:])
            offset = lead
            for part in parts:
                state.normalize(part, seq[0], stats, out=buffer[:, :, offset:offset + part.shape[2]])
                offset += part.shape[2]
            buffer[:, :, :lead].zero_()
            buffer[:, :, offset:].zero_()
            h = buffer
            for module in seq[1:-1]:  # SiLU (in place: silu(0) = 0 keeps the padding), Dropout
                h = F.silu(h, inplace=True) if isinstance(module, nn.SiLU) else module(h)
            conv = seq[-1]
            h = F.conv3d(h, conv.weight, conv.bias, conv.stride, (0,) + tuple(conv.padding[1:]), conv.dilation, conv.groups)
            left = max(0, left - 1)
        h = identity + h
        return h.permute(0, 2, 1, 3, 4).reshape((h.shape[0] * h.shape[2], -1) + h.shape[3:])


class _ClipAttnProcessor:
    """Temporal self-attention: this clip's queries against the keys/values the mode gives.

    Calls with encoder states or a mask (not temporal self-attention) go to the original
    processor.
    """

    def __init__(self, state: ClipState, name: str, original):
        self.state = state
        self.name = name
        self.original = original
        self._stacked_key = None
        self._stacked = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        state, residual = self.state, hidden_states
        # Keys and values from one matmul, side by side (N, frames, 2D): what travels and what
        # is concatenated is then one tensor, and the attention reads k and v as views of it.
        kv = self._project_kv(attn, hidden_states)
        bias = None
        if "attention" in state.exchanges and state.config.mode == "dual-scope":
            begun = state.dual_scope_begin(self.name, kv)
            query = attn.to_q(hidden_states)  # while the window's keys and values travel
            kv, bias = state.dual_scope_end(self.name, kv, begun)
        else:
            query = attn.to_q(hidden_states)
            if "attention" in state.exchanges:  # exact: the whole video's keys and values
                kv = state.full_kv(self.name, kv)
        d = kv.shape[-1] // 2
        query, key, value = split_heads(attn, query, kv[..., :d], kv[..., d:])
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=0.0, is_causal=False)
        out = merge_heads(out, query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _project_kv(self, attn, hidden_states: torch.Tensor) -> torch.Tensor:
        """``cat([to_k(x), to_v(x)], -1)`` as one linear (weights stacked once, re-stacked if
        the layers' parameters are replaced or moved)."""
        to_k, to_v = attn.to_k, attn.to_v
        if type(to_k) is not nn.Linear or type(to_v) is not nn.Linear or (to_k.bias is None) != (to_v.bias is None):
            return torch.cat([to_k(hidden_states), to_v(hidden_states)], dim=-1)  # e.g. LoRA-wrapped layers
        params = (to_k.weight, to_v.weight, to_k.bias, to_v.bias)
        key = tuple((p.data_ptr(), p._version) if p is not None else None for p in params)
        if self._stacked_key != key:
            self._stacked_key = key
            self._stacked = (torch.cat([to_k.weight, to_v.weight]).detach(),
                             None if to_k.bias is None else torch.cat([to_k.bias, to_v.bias]).detach())
        return F.linear(hidden_states, *self._stacked)


class _ClipPositions(nn.Module):
    """AnimateDiff's sinusoidal frame embedding with this clip's frame positions."""

    def __init__(self, embed: nn.Module, state: ClipState):
        super().__init__()
        self.embed = embed
        self.state = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset = self.state.position_offset
        return x + self.embed.pe[:, offset : offset + x.shape[1]]


def _replace_modules(denoiser: nn.Module, state: ClipState) -> dict[str, int]:
    from diffusers.models.attention_processor import Attention
    from diffusers.models.embeddings import SinusoidalPositionalEmbedding
    from diffusers.models.resnet import TemporalConvLayer

    # What is not exchanged keeps the model's own module (naive: the unmodified model on a clip);
    # frame positions cost nothing and are always global.
    exchanges = state.exchanges
    counts = {"temporal_conv": 0, "group_norm": 0, "temporal_attention": 0, "frame_positions": 0}
    replacements: list[tuple[nn.Module, str, nn.Module]] = []
    for path, module in denoiser.named_modules():
        if isinstance(module, TemporalConvLayer):
            if not exchanges & {"conv", "norm"}:
                continue
            parent, _, child = path.rpartition(".")
            replacements.append((denoiser.get_submodule(parent), child, _ClipTemporalConv(module, state, path)))
            counts["temporal_conv"] += 1
        elif type(module).__name__ in TEMPORAL_BLOCKS:
            if "norm" in exchanges and isinstance(module.norm, nn.GroupNorm):
                replacements.append((module, "norm", _ClipGroupNorm(module.norm, state, f"{path}.norm")))
                counts["group_norm"] += 1
            for sub_path, sub in module.named_modules():
                name = f"{path}.{sub_path}"
                if "attention" in exchanges and isinstance(sub, Attention) and not sub.is_cross_attention:
                    if sub.spatial_norm is not None or sub.group_norm is not None:
                        raise NotImplementedError(f"clip parallelism: temporal attention with extra norms at {name}")
                    sub.set_processor(_ClipAttnProcessor(state, name, sub.processor))
                    counts["temporal_attention"] += 1
                elif isinstance(sub, SinusoidalPositionalEmbedding):
                    parent, _, child = sub_path.rpartition(".")
                    replacements.append((module.get_submodule(parent), child, _ClipPositions(sub, state)))
                    counts["frame_positions"] += 1
    for parent, child, replacement in replacements:
        setattr(parent, child, replacement)
    return counts


def apply(denoiser: nn.Module, engine: ExchangeEngine, config: ClipConfig) -> ClipState:
    """Make ``denoiser`` run on this rank's clip of frames; returns the shared state.

    Call ``state.new_request()`` before each pipeline call.
    """
    family = type(denoiser).__name__
    if family not in SUPPORTED_DENOISERS:
        raise NotImplementedError(f"clip parallelism supports {', '.join(SUPPORTED_DENOISERS)}; got {family}")
    max_positions = getattr(denoiser.config, "motion_max_seq_length", None) if family == "UNetMotionModel" else None
    state = ClipState(engine, config, max_positions=max_positions, per_frame_text=family == "UNetMotionModel")
    state.replaced = _replace_modules(denoiser, state)

    def take_clip(module, args, kwargs):
        sample = get_sample(args, kwargs)
        frames = sample.shape[2]
        state.set_frames(frames)
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        state.timestep = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        start, stop = state.start, state.start + state.length
        args, kwargs = set_sample(args, kwargs, sample[:, :, start:stop])
        text = kwargs.get("encoder_hidden_states")
        if state.per_frame_text and isinstance(text, torch.Tensor):
            kwargs = dict(kwargs)
            if text.dim() == 4:  # folded (B, F, S, D) by fold_frame_text
                kwargs["encoder_hidden_states"] = text[:, start:stop]
            else:
                per_frame = text.reshape(-1, frames, *text.shape[1:])
                kwargs["encoder_hidden_states"] = per_frame[:, start:stop].reshape(-1, *text.shape[1:])
        return args, kwargs

    def place_clip(module, args, kwargs, output):
        state.call_index += 1
        return map_output(output, state.expand_output)

    denoiser.register_forward_pre_hook(take_clip, with_kwargs=True)
    denoiser.register_forward_hook(place_clip, with_kwargs=True)
    return state


def fold_frame_text(denoiser: nn.Module) -> None:
    """AnimateDiff repeats the text states per frame, (B·F, S, D); the cfg split needs a batch axis.

    Registers a pre-hook before every other (folds to (B, F, S, D)) and one after the hooks
    registered so far (unfolds). Apply after ``cfg`` and ``clip``.
    """

    def fold(module, args, kwargs):
        text = kwargs.get("encoder_hidden_states")
        sample = get_sample(args, kwargs)
        batch, frames = sample.shape[0], sample.shape[2]
        if isinstance(text, torch.Tensor) and text.dim() == 3 and text.shape[0] == batch * frames:
            kwargs = dict(kwargs, encoder_hidden_states=text.reshape(batch, frames, *text.shape[1:]))
        return args, kwargs

    def unfold(module, args, kwargs):
        text = kwargs.get("encoder_hidden_states")
        if isinstance(text, torch.Tensor) and text.dim() == 4:
            kwargs = dict(kwargs, encoder_hidden_states=text.reshape(-1, *text.shape[2:]))
        return args, kwargs

    denoiser.register_forward_pre_hook(fold, with_kwargs=True, prepend=True)
    denoiser.register_forward_pre_hook(unfold, with_kwargs=True)
