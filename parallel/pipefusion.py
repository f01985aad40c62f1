"""PipeFusion (xDiT, arXiv 2405.14430; ALGORITHMS.md §1b): DiT blocks in stages, image tokens in patches.

``apply(denoiser, engine, ...)`` changes an unmodified diffusers DiT in place:

* the transformer blocks are cut into N contiguous **stages**, one per rank of ``engine``'s group.
  This rank keeps only its stage's blocks: the model's block list is replaced by a one-element
  list holding a :class:`_Stage` module, so the other blocks' weights are freed (parameters per
  rank ~ 1/N of the blocks'). Patch embedding, timestep / text embeddings and the final norm and
  projection stay on every rank (replicated: small, and per token);
* the model's own forward runs on every rank; when its block loop calls the stage, the image
  tokens (positions of the whole image already added by the patch embedding) are cut into M >= N
  **patches** of contiguous token rows, which flow through the stages as a pipeline: stage k runs
  patch p through its blocks, sends the activations to stage k+1 (async P2P through the exchange
  engine; the receive of the next patch is posted before this one is computed, so the transfer
  overlaps compute) and takes up patch p+1;
* self-attention of a patch needs keys/values of the whole image at that layer: every attention
  layer of the stage keeps a full-sequence **K/V buffer**. The rows of the patches that have
  already passed in this step are fresh (written in place as each patch passes); the others
  still hold the previous step's values (stale, as in DistriFusion). The attention processors
  are replaced (``attn.set_processor``); queries stay the patch's own;
* the model's own tail (final norm, projection, unpatchify) runs on every rank; on the last
  stage it sees the whole image's output tokens, and the denoiser's output there (the latent,
  p*p*C values per token instead of the hidden width) is sent to every other rank (a second
  process group, so that on NCCL every pair of ranks carries one kind of message in one
  direction), which replace their own (computed on placeholder tokens): the pipeline's loop and
  scheduler run unchanged everywhere, on the same latent;
* the first ``warmup_steps`` denoiser calls (at least one) run the whole image as one patch:
  exact, and they fill the K/V buffers.

Text. PixArt cross-attends to the replicated caption states: their K/V are computed once per
denoiser call per layer (cached across the call's patches). SD3's joint attention carries a
text stream through every block, updated from attention over the whole image: it travels with
the **first** patch of each step (that one message is [patch tokens, text tokens]), so it is
computed once per step; its update sees the later patches' K/V from the previous step (as
displaced patch parallelism's replicated text sees the other bands'), and every patch of the
step then attends to this step's text K/V. The other patches pass a zero-length text through the
(unchanged) block. Carrying the text on the last patch instead (fresh image K/V for the text,
previous-step text K/V for every other patch) measured 5 dB worse on the tiny SD3.

Bubble: within a step the pipeline fills and drains (the scheduler needs the whole output
before the next call), so each rank idles about N-1 patch-times per step: a fraction
(N-1)/(M+N-1) of the step. More patches shrink it at the cost of smaller matmuls
(:func:`default_patches`).

Families: a small :class:`_Family` adapter says where the blocks are, how a block is called,
where the token grid comes from and which processors replace which: PixArt, SD3 and Flux
(double- and single-stream blocks in one stage list, RoPE rows cut per patch).

Numerics depend on M only, not on N: a patch sees this step's K/V of the patches before it
at every layer whichever rank holds the layer (pipefusion=4 equals pipefusion=2 at equal M).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from distgen.comm import ExchangeEngine
from distgen.config import ConfigError
from distgen.parallel._denoiser import get_sample, map_output, merge_heads, split_heads

__all__ = ["PipeFusionState", "apply", "default_patches", "stage_blocks", "validate", "validate_image",
           "block_parameter_bytes", "SUPPORTED_DENOISERS"]

# Tags per patch index: a patch's message never matches another's receive (shapes differ).
_ACTIVATION_TAG, _OUTPUT_TAG = 1 << 12, 2 << 12


def stage_blocks(num_blocks: int, stages: int, weights: list[int] | None = None) -> list[range]:
    """Contiguous block ranges, one per stage (at least one block each), balancing ``weights`` (a
    block's parameter bytes; equal by default): the heaviest stage as light as it can be, earlier
    stages taking the extra. Equal blocks: the first ``num_blocks % stages`` stages get one more;
    Flux: its double-stream blocks weigh ~2.4 single-stream ones."""
    weights = list(weights) if weights is not None else [1] * num_blocks
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)

    def split(cap: int) -> list[range] | None:  # greedy from the front, a block left for every later stage
        ranges, start = [], 0
        for stage in range(stages):
            end, last = start + 1, num_blocks - (stages - stage - 1)
            while end < last and prefix[end + 1] - prefix[start] <= cap:
                end += 1
            if prefix[end] - prefix[start] > cap:
                return None
            ranges.append(range(start, end))
            start = end
        return ranges if start == num_blocks else None

    for cap in sorted({prefix[j] - prefix[i] for i in range(num_blocks) for j in range(i + 1, num_blocks + 1)}):
        ranges = split(cap)
        if ranges is not None:
            return ranges
    raise ValueError(f"cannot cut {num_blocks} blocks into {stages} stages")


PATCHES_PER_STAGE = 4
MIN_PATCH_TOKENS = 64


def default_patches(stages: int, token_rows: int, token_cols: int) -> int:
    """The patch count when none is given: the most patches, up to 4 per stage, that divide the token
    rows and keep at least 64 tokens per image in a patch (smaller matmuls cost more than the bubble
    they save); at least one per stage. dit-bench at 2 stages (1024 tokens, 2 cores, quiet machine,
    four runs): 8 patches 1.52-1.72x one rank, 16: 1.53-1.65x, 4: 1.42x. GPUs want bigger patches
    than CPUs: pass --pipefusion-patches."""
    divisors = [m for m in range(stages, token_rows + 1) if token_rows % m == 0] or [stages]
    fitting = [m for m in divisors
               if m <= PATCHES_PER_STAGE * stages and token_rows // m * token_cols >= MIN_PATCH_TOKENS]
    return max(fitting) if fitting else divisors[0]


# ---------------------------------------------------------------------------- families
class _Family:
    """How PipeFusion finds and calls one DiT family's blocks (subclass per family)."""

    block_lists: tuple[str, ...] = ("transformer_blocks",)
    unsupported: tuple[str, ...] = ()  # denoiser keyword arguments PipeFusion cannot honour

    def count_blocks(self, config: dict) -> int:
        return int(config["num_layers"])

    def token_grid(self, denoiser: nn.Module, args: tuple, kwargs: dict) -> tuple[int, int]:
        """(rows, columns) of image tokens of a denoiser call, row-major in the block's sequence."""
        sample, p = get_sample(args, kwargs), denoiser.config.patch_size
        return sample.shape[-2] // p, sample.shape[-1] // p

    def split_call(self, args: tuple, kwargs: dict):
        """The stage's call arguments -> (image tokens, text tokens or None, the other kwargs)."""
        raise NotImplementedError

    def run_block(self, block: nn.Module, hidden: torch.Tensor, text, rest: dict):
        raise NotImplementedError

    def stage_result(self, hidden: torch.Tensor):
        """What the model's block loop expects back from one block."""
        return hidden

    def install(self, blocks: list[nn.Module], state: "PipeFusionState") -> int:
        raise NotImplementedError


class _PixArt(_Family):
    def split_call(self, args, kwargs):
        rest = dict(kwargs)
        hidden = args[0] if args else rest.pop("hidden_states")
        if len(args) > 1:
            raise NotImplementedError("pipefusion: PixArt blocks called with extra positional arguments")
        if rest.get("attention_mask") is not None:
            raise NotImplementedError("pipefusion: PixArt self-attention with a mask")
        return hidden, None, rest

    def run_block(self, block, hidden, text, rest):
        return block(hidden, **rest), None

    def install(self, blocks, state):
        from diffusers.models.attention_processor import Attention, AttnProcessor2_0

        count = 0
        for block in blocks:
            for name, module in block.named_modules():
                if not isinstance(module, Attention):
                    continue
                if module.is_cross_attention:
                    # Caption K/V: the same text for every patch of a call.
                    module.to_k = _CallCache(module.to_k, state)
                    module.to_v = _CallCache(module.to_v, state)
                    continue
                _expect_processor(module, AttnProcessor2_0, name)
                if module.spatial_norm is not None or module.group_norm is not None:
                    raise NotImplementedError(f"pipefusion: {name} has a spatial or group norm")
                module.set_processor(_SelfAttnProcessor(state))
                count += 1
        return count


class _SD3(_Family):
    unsupported = ("block_controlnet_hidden_states", "skip_layers")

    def split_call(self, args, kwargs):
        if args:
            raise NotImplementedError("pipefusion: SD3 blocks are called with keyword arguments")
        rest = dict(kwargs)
        return rest.pop("hidden_states"), rest.pop("encoder_hidden_states"), rest

    def run_block(self, block, hidden, text, rest):
        text, hidden = block(hidden_states=hidden, encoder_hidden_states=text, **rest)
        return hidden, text

    def stage_result(self, hidden):
        # The text leaves the last block as None (context_pre_only); the model reads only the image.
        return None, hidden

    def install(self, blocks, state):
        from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0

        count = 0
        for block in blocks:
            for name, module in block.named_modules():
                if isinstance(module, Attention):  # attn (joint) and SD3.5's attn2 (image only)
                    _expect_processor(module, JointAttnProcessor2_0, name)
                    module.set_processor(_JointAttnProcessor(state))
                    count += 1
        return count


class _Flux(_SD3):
    """Double-stream blocks, then single-stream ones (they take text and image apart and join them
    inside): both kinds are called alike and return (text, image), so a stage may hold some of each.
    The stage stands in for the double-stream list; the single-stream list is emptied."""

    block_lists = ("transformer_blocks", "single_transformer_blocks")
    unsupported = ("controlnet_block_samples", "controlnet_single_block_samples")

    def count_blocks(self, config):
        return int(config["num_layers"]) + int(config["num_single_layers"])

    def token_grid(self, denoiser, args, kwargs):
        # The packed (B, tokens, C) sequence is row-major in the image ids' (row, column).
        ids = kwargs["img_ids"]
        ids = ids[0] if ids.ndim == 3 else ids
        rows, cols = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
        grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).reshape(-1, 2)
        if ids.shape[0] != rows * cols or not torch.equal(ids[:, 1:].cpu(), grid.to(ids.dtype)):
            raise NotImplementedError("pipefusion: Flux image ids must be the pipeline's row-major grid")
        return rows, cols

    def install(self, blocks, state):
        from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor

        count = 0
        for block in blocks:
            for name, module in block.named_modules():
                if isinstance(module, FluxAttention):
                    _expect_processor(module, FluxAttnProcessor, name)
                    module.set_processor(_FluxAttnProcessor(state))
                    count += 1
        return count


_FAMILIES: dict[str, _Family] = {
    "PixArtTransformer2DModel": _PixArt(),
    "SD3Transformer2DModel": _SD3(),
    "FluxTransformer2DModel": _Flux(),
}
SUPPORTED_DENOISERS = tuple(_FAMILIES)


def _expect_processor(module, expected: type, name: str) -> None:
    if type(module.processor) is not expected:
        raise NotImplementedError(
            f"pipefusion replaces {expected.__name__}; {name} uses {type(module.processor).__name__}"
        )


# ---------------------------------------------------------------------------- validation
def validate(denoiser_class: str, num_blocks: int | None, degree: int, patches: int | None,
             token_rows: int | None = None) -> None:
    """Everything about ``pipefusion`` a user can get wrong, as a ConfigError (before launching)."""
    if degree <= 1:
        if patches is not None:
            raise ConfigError(f"--pipefusion-patches {patches} applies only with --parallel pipefusion=N (N >= 2)")
        return
    if denoiser_class not in _FAMILIES:
        raise ConfigError(
            f"--parallel pipefusion={degree}: PipeFusion splits a DiT's transformer blocks into stages; supported "
            f"denoisers: {', '.join(SUPPORTED_DENOISERS)}; this model's denoiser is {denoiser_class}"
        )
    if num_blocks is not None and degree > num_blocks:
        allowed = f"2..{num_blocks}" if num_blocks > 2 else "2" if num_blocks == 2 else "none (one block)"
        raise ConfigError(
            f"--parallel pipefusion={degree}: the denoiser has {num_blocks} transformer blocks, fewer than the "
            f"{degree} stages; allowed pipefusion degrees: {allowed}"
        )
    if patches is not None and patches < degree:
        raise ConfigError(
            f"--pipefusion-patches {patches}: needs at least one patch per stage (M >= N = {degree}); "
            f"allowed: {degree} or more, dividing the latent's token rows"
        )
    if token_rows is not None:
        if token_rows < degree:
            raise ConfigError(
                f"--parallel pipefusion={degree}: the latent has only {token_rows} token rows, fewer than one patch "
                f"row per stage; use a taller image or at most pipefusion={token_rows}"
            )
        if patches is not None and token_rows % patches:
            valid = ", ".join(str(m) for m in range(degree, token_rows + 1) if token_rows % m == 0)
            raise ConfigError(
                f"--pipefusion-patches {patches}: patches are contiguous token rows and the latent has {token_rows} "
                f"token rows, not divisible by {patches}; allowed patch counts for pipefusion={degree}: {valid}"
            )


def _denoiser_config(info) -> dict:
    path = Path(info.path) / info.denoiser_attr / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--model: {path} not found") from None


def validate_image(info, request, parallel, patches: int | None) -> None:
    """Image path: ``info`` is :class:`distgen.models.diffusion.PipelineInfo`."""
    degree = parallel.degree("pipefusion")  # with patch / sp: ImageJob.validate says no
    if degree <= 1 or info.denoiser_class not in _FAMILIES:
        validate(info.denoiser_class, None, degree, patches)
        return
    blocks = _FAMILIES[info.denoiser_class].count_blocks(_denoiser_config(info))
    rows = request.height // info.vae_scale_factor // info.band_row_multiple
    validate(info.denoiser_class, blocks, degree, patches, rows)


# ---------------------------------------------------------------------------- state
class PipeFusionState:
    """This rank's stage: its blocks, the call in progress, the per-request buffers."""

    def __init__(self, engine: ExchangeEngine, feedback: ExchangeEngine, patches: int | None, warmup_steps: int,
                 blocks: range, num_blocks: int):
        self.engine = engine
        self.feedback = feedback  # the last stage's output to every other rank
        self.stage, self.stages = engine.rank, engine.world
        self.first, self.last = self.stage == 0, self.stage == self.stages - 1
        self.patches = patches  # None: default_patches for the latent's token grid
        self.warmup_steps = warmup_steps
        self.blocks = blocks
        self.num_blocks = num_blocks
        self.call_index = 0  # denoiser calls since the request started
        self.grid = (0, 0)  # token rows, columns of the current call
        self.patch_start = 0  # first image token of the patch being computed
        self.tokens = 0  # image tokens of the whole image
        self.text_tokens = 0  # text tokens of the call (SD3, Flux)
        self.text_in_patch = True  # whether the patch being computed carries the text stream
        self.processors: list = []  # whatever keeps per-request buffers
        self.replaced: dict[str, int] = {}

    @property
    def warmup_calls(self) -> int:
        # At least one whole-image call: stale K/V must exist before it can be used.
        return max(1, self.warmup_steps)

    @property
    def warmup(self) -> bool:
        return self.call_index < self.warmup_calls

    def new_request(self) -> None:
        self.call_index = 0
        for p in self.processors:
            p.clear()

    def output_of_last_stage(self, output: torch.Tensor) -> torch.Tensor:
        """The denoiser's output as the last stage computed it, on every rank (blocking)."""
        self.call_index += 1
        last = self.stages - 1
        if self.last:
            self.feedback.exchange({r: output for r in range(last)}, {}, tag=_OUTPUT_TAG).wait()
            return output
        return self.feedback.exchange({}, {last: torch.empty_like(output)}, tag=_OUTPUT_TAG).wait()[last]

    def patch_bounds(self) -> list[tuple[int, int]]:
        """Token ranges of this call's patches (one in warm-up calls)."""
        rows, cols = self.grid
        m = 1 if self.warmup else (self.patches or default_patches(self.stages, rows, cols))
        if rows % m:
            raise RuntimeError(f"pipefusion: {rows} token rows do not divide into {m} patches")
        per = rows // m * cols
        return [(p * per, (p + 1) * per) for p in range(m)]


class _KVBuffer:
    """Keys and values of the whole sequence at one attention layer (B, H, tokens, D)."""

    def __init__(self):
        self.key: torch.Tensor | None = None
        self.value: torch.Tensor | None = None

    def clear(self) -> None:
        self.key = self.value = None

    def ready(self, state: PipeFusionState, like: torch.Tensor, tokens: int) -> None:
        shape = (*like.shape[:2], tokens, like.shape[-1])
        if state.warmup and (self.key is None or self.key.shape != shape or self.key.dtype != like.dtype):
            self.key = like.new_empty(shape)
            self.value = like.new_empty(shape)
        elif self.key is None:
            raise RuntimeError("pipefusion: stale K/V used before a whole-image (warm-up) call filled it")
        elif self.key.shape != shape:
            raise RuntimeError(f"pipefusion: K/V buffer is {tuple(self.key.shape)}, this call needs {shape}; "
                               "call new_request() between requests of different shapes")

    def write(self, start: int, key: torch.Tensor, value: torch.Tensor) -> None:
        end = start + key.shape[2]
        self.key[:, :, start:end] = key
        self.value[:, :, start:end] = value


class _SelfAttnProcessor:
    """``AttnProcessor2_0`` for a DiT self-attention: patch queries against the K/V buffer."""

    def __init__(self, state: PipeFusionState):
        self.state = state
        self.kv = _KVBuffer()
        state.processors.append(self.kv)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise NotImplementedError("pipefusion: self-attention with a mask or encoder states")
        state, residual = self.state, hidden_states
        query, key, value = split_heads(attn, attn.to_q(hidden_states), attn.to_k(hidden_states),
                                        attn.to_v(hidden_states))
        self.kv.ready(state, key, state.tokens)
        self.kv.write(state.patch_start, key, value)  # this patch fresh, the ones still to come stale
        out = F.scaled_dot_product_attention(query, self.kv.key, self.kv.value)
        out = attn.to_out[1](attn.to_out[0](merge_heads(out, query.dtype)))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class _JointAttnProcessor:
    """``JointAttnProcessor2_0`` (SD3 / SD3.5): image + text K/V in one buffer [image | text].

    Text present (the step's first patch, or a warm-up call): its Q/K/V are computed and its K/V
    written to the buffer's tail. Zero-length text (the other patches): the tail written by this
    step's first patch is used. ``encoder_hidden_states`` None (SD3.5's image-only ``attn2``): no tail.
    """

    def __init__(self, state: PipeFusionState):
        self.state = state
        self.kv = _KVBuffer()
        self.text_tokens = 0  # of the warm-up call: the buffer's tail
        state.processors.append(self.kv)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if attention_mask is not None:
            raise NotImplementedError("pipefusion: joint attention with a mask")
        state = self.state
        batch, patch_tokens = hidden_states.shape[:2]
        query, key, value = split_heads(attn, attn.to_q(hidden_states), attn.to_k(hidden_states),
                                        attn.to_v(hidden_states))
        text_tokens = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        if state.warmup:
            self.text_tokens = text_tokens
        mismatch = text_tokens and text_tokens != self.text_tokens
        if mismatch or (encoder_hidden_states is None) != (self.text_tokens == 0):
            raise RuntimeError(f"pipefusion: {text_tokens} text tokens where the warm-up call had {self.text_tokens}")
        self.kv.ready(state, key, state.tokens + self.text_tokens)
        self.kv.write(state.patch_start, key, value)
        if text_tokens:
            head_dim = key.shape[-1]
            text = [proj(encoder_hidden_states).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
                    for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)]
            if attn.norm_added_q is not None:
                text[0] = attn.norm_added_q(text[0])
            if attn.norm_added_k is not None:
                text[1] = attn.norm_added_k(text[1])
            self.kv.write(state.tokens, text[1], text[2])
            query = torch.cat([query, text[0]], dim=2)
        out = F.scaled_dot_product_attention(query, self.kv.key, self.kv.value)
        out = merge_heads(out, query.dtype)
        image_out = attn.to_out[1](attn.to_out[0](out[:, :patch_tokens]))
        if encoder_hidden_states is None:
            return image_out
        text_out = out[:, patch_tokens:]
        if text_tokens and not attn.context_pre_only:
            text_out = attn.to_add_out(text_out)
        return image_out, text_out


class _FluxAttnProcessor:
    """``FluxAttnProcessor`` for both Flux block kinds: K/V buffer [image | text], K after RoPE.

    Queries and keys are rotated with the rows of the rotary table of the tokens at hand: the text
    (first ``state.text_tokens`` rows) when this patch carries it, and the patch's image rows. The
    double-stream blocks get the text as ``encoder_hidden_states`` (zero tokens on patches that do
    not carry it); single-stream ones as the first tokens of ``hidden_states``.
    """

    def __init__(self, state: PipeFusionState):
        # Flux's Q/K/V and output helpers, shared with patch and sp (imported where Flux is used)
        from distgen.parallel._denoiser import flux_attention_output, flux_qkv

        self.state = state
        self.kv = _KVBuffer()
        self._qkv, self._output = flux_qkv, flux_attention_output
        state.processors.append(self.kv)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None or image_rotary_emb is None:
            raise NotImplementedError("pipefusion: Flux attention with a mask or without RoPE")
        state = self.state
        joint = encoder_hidden_states is not None
        text_now = (encoder_hidden_states.shape[1] if joint else
                    state.text_tokens if state.text_in_patch else 0)
        patch = hidden_states.shape[1] - (0 if joint else text_now)
        text_all, start = state.text_tokens, state.patch_start
        image_rows = slice(text_all + start, text_all + start + patch)
        rotary = tuple(torch.cat([r[:text_now], r[image_rows]]) for r in image_rotary_emb)
        (query, key, value), text = self._qkv(attn, hidden_states, encoder_hidden_states, rotary, text_now)
        self.kv.ready(state, key, state.tokens + text_all)
        self.kv.write(start, key, value)
        if text_now:
            self.kv.write(state.tokens, text[1], text[2])
        out = F.scaled_dot_product_attention(torch.cat([text[0], query], dim=2), self.kv.key, self.kv.value)
        return self._output(attn, out[:, :, text_now:], out[:, :, :text_now], joint, hidden_states.dtype)


class _CallCache(nn.Module):
    """A cross-attention K or V projection computed once per denoiser call (every patch of the
    call attends to the same caption states)."""

    def __init__(self, proj: nn.Module, state: PipeFusionState):
        super().__init__()
        self.proj = proj
        self.state = state
        self._key = None
        self._value = None
        state.processors.append(self)

    def clear(self) -> None:
        self._key = self._value = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = (self.state.call_index, x.data_ptr(), tuple(x.shape), x._version)
        if key != self._key:
            self._key, self._value = key, self.proj(x)
        return self._value


# ---------------------------------------------------------------------------- the stage
class _Stage(nn.Module):
    """This rank's blocks, standing in for the model's whole block list: called once per
    denoiser call with every image token, it runs the patch pipeline. The last stage returns
    the last block's output for the whole image; the others return their input as placeholder
    (the denoiser's output is then replaced by the last stage's)."""

    def __init__(self, blocks: list[nn.Module], family: _Family, state: PipeFusionState):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.family = family
        self.state = state

    def forward(self, *args, **kwargs):
        family, state = self.family, self.state
        hidden, text, rest = family.split_call(args, kwargs)
        batch, tokens, dim = hidden.shape
        if tokens != state.grid[0] * state.grid[1]:
            raise RuntimeError(f"pipefusion: {tokens} image tokens for a {state.grid[0]}x{state.grid[1]} token grid")
        state.tokens, state.text_tokens = tokens, (text.shape[1] if text is not None else 0)
        bounds, text_tokens, engine = state.patch_bounds(), state.text_tokens, state.engine
        count = len(bounds)

        def message(p: int) -> torch.Tensor:  # what stage k-1 sends for patch p: [patch | text on the first]
            start, end = bounds[p]
            extra = text_tokens if p == 0 else 0
            return hidden.new_empty((batch, end - start + extra, dim))

        inputs = {}

        def expect(p: int) -> None:
            if not state.first and p < count:
                inputs[p] = engine.exchange({}, {state.stage - 1: message(p)}, tag=_ACTIVATION_TAG + p)

        expect(0)
        sends, done = [], []
        for p, (start, end) in enumerate(bounds):
            expect(p + 1)  # posted before this patch's compute: the next transfer overlaps it
            if state.first:
                x = hidden[:, start:end]
                t = text
            else:
                received = inputs.pop(p).wait()[state.stage - 1]
                x, t = received[:, : end - start], received[:, end - start:] if text is not None else None
            if t is not None and p > 0:
                t = t[:, :0]  # the text stream travels with the first patch
            state.patch_start, state.text_in_patch = start, p == 0
            for block in self.blocks:
                x, t = family.run_block(block, x, t, rest)
            if not state.last:
                payload = torch.cat([x, t], dim=1) if t is not None and t.shape[1] else x
                sends.append(engine.exchange({state.stage + 1: payload}, {}, tag=_ACTIVATION_TAG + p))
            else:
                done.append(x)
        for pending in sends:  # received by now but for the last one or two (stage k+1 is at work on them)
            pending.wait()
        # Other stages: placeholder tokens for the model's tail; its output is replaced by the last stage's.
        return family.stage_result(torch.cat(done, dim=1) if state.last else hidden)


def block_parameter_bytes(denoiser: nn.Module) -> int:
    """Bytes of the transformer blocks' parameters this rank holds (all of them without PipeFusion)."""
    family = _FAMILIES.get(type(denoiser).__name__)
    lists = family.block_lists if family else ("transformer_blocks",)
    total = 0
    for attr in lists:
        blocks = getattr(denoiser, attr, None)
        if blocks is not None:
            total += sum(p.numel() * p.element_size() for p in blocks.parameters())
    return total


def apply(denoiser: nn.Module, engine: ExchangeEngine, patches: int | None = None, warmup_steps: int = 1,
          feedback: ExchangeEngine | None = None) -> PipeFusionState:
    """Keep this rank's stage of ``denoiser``'s blocks and pipeline patches through the stages.

    ``engine``: the pipefusion axis (activations, stage k -> k+1); ``feedback``: a second engine
    over the same ranks for the last stage's outputs (``parallel.pipeline.feedback_group``; on
    gloo ``engine`` itself would do). Call ``state.new_request()`` before each pipeline call.
    """
    name = type(denoiser).__name__
    family = _FAMILIES.get(name)
    if family is None:
        raise NotImplementedError(f"pipefusion supports {', '.join(SUPPORTED_DENOISERS)}; got {name}")
    all_blocks = [b for attr in family.block_lists for b in getattr(denoiser, attr)]
    stages = engine.world
    if stages > len(all_blocks):
        raise ValueError(f"pipefusion={stages}: the denoiser has only {len(all_blocks)} transformer blocks")
    if patches is not None and patches < stages:
        raise ValueError(f"pipefusion={stages}: {patches} patches, fewer than the stages")
    weights = [sum(p.numel() * p.element_size() for p in b.parameters()) for b in all_blocks]
    mine = stage_blocks(len(all_blocks), stages, weights)[engine.rank]
    state = PipeFusionState(engine, feedback or engine, patches, warmup_steps, mine, len(all_blocks))
    own = [all_blocks[i] for i in mine]
    state.replaced = {"blocks": len(own), "attention": family.install(own, state)}
    # The first block list becomes the stage; the others empty: the dropped blocks are freed.
    for i, attr in enumerate(family.block_lists):
        setattr(denoiser, attr, nn.ModuleList([_Stage(own, family, state)] if i == 0 else []))
    del all_blocks, own

    def plan_call(module, args, kwargs):
        for unsupported in family.unsupported:
            if kwargs.get(unsupported) is not None:
                raise NotImplementedError(f"pipefusion: {unsupported}")
        state.grid = family.token_grid(denoiser, args, kwargs)
        return None

    denoiser.register_forward_pre_hook(plan_call, with_kwargs=True)
    # Registered before cfg's (the runner applies cfg after): each cfg half takes its last stage's output first.
    denoiser.register_forward_hook(lambda m, a, out: map_output(out, state.output_of_last_stage))
    return state
