"""The Llama family as found in Hugging Face checkpoints: Llama, Mistral, Qwen2.

A plain model module that knows nothing about ranks (torchtitan style): tensor and pipeline
parallelism apply themselves to it from ``distgen.parallel`` by replacing modules. Parameter
names are the checkpoint's tensor names (``model.layers.3.mlp.up_proj.weight``), and
``model.weight_sources`` records, for every parameter, which slice of which checkpoint
tensor fills it (:class:`TensorSlice`); a strategy that replaces a module narrows or rewrites
those entries, and :mod:`distgen.models.checkpoint` reads exactly those slices. Expert
parallelism, for instance, replaces a layer's ``mlp`` with a module holding only this rank's
experts and records their sources (one expert of a fused expert tensor is
``TensorSlice(key).narrow(0, e, e + 1)``): only that rank reads them.

The two points where tensor parallelism communicates are modules too: ``attn_reduce`` and
``mlp_reduce`` of every layer (a sub-block's output is a partial sum over the ranks that hold
its heads / columns). Here they are :class:`LocalSum`, which returns the value as it is.

Ladder Residual (ALGORITHMS.md §6, arXiv 2501.06589): the upper ``ladder_layers`` layers add
each sub-block's output to the residual stream one sub-block late, so its all-reduce can run
behind the next sub-block. It is a different function from the standard wiring, chosen per
layer by the checkpoint (``"ladder_layers"`` in config.json) or by the user.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from distgen.models.moe import MOE_ARCHITECTURES, MoEBlock, MoESpec, set_block_sources, spec_from_hf

# config.json "architectures" entry -> family
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    **MOE_ARCHITECTURES,
}
ROPE_TYPES = ("default", "linear", "llama3")


class ModelConfigError(ValueError):
    """config.json describes something this implementation does not run."""


@dataclass(frozen=True)
class TextModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, float], ...] = ()  # rope_type != default: its parameters
    rope_type: str = "default"
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # per layer: sliding attention window in tokens, or 0 for full attention
    sliding_windows: tuple[int, ...] = ()
    ladder_layers: int = 0
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    moe: MoESpec | None = None  # Mixtral / Qwen MoE: the expert blocks (distgen.models.moe)
    qk_norm: bool = False  # Qwen3-MoE: RMSNorm over each head's q and k before rope

    @property
    def family(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.architecture]

    def is_ladder(self, layer: int) -> bool:
        return layer >= self.num_layers - self.ladder_layers

    def with_ladder_layers(self, k: int) -> "TextModelConfig":
        return replace(self, ladder_layers=k)

    @classmethod
    def from_hf(cls, hf: dict) -> "TextModelConfig":
        """Read a Hugging Face ``config.json`` dict (transformers 4.x and 5.x layouts)."""
        architectures = hf.get("architectures") or []
        architecture = next((a for a in architectures if a in SUPPORTED_ARCHITECTURES), None)
        if architecture is None:
            raise ModelConfigError(
                f"unsupported architecture {architectures or hf.get('model_type')!r}; supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise ModelConfigError(f"unsupported hidden_act {hf['hidden_act']!r}; supported: silu")
        heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        layers = int(hf["num_hidden_layers"])
        head_dim = int(hf.get("head_dim") or hidden // heads)
        # transformers 5 keeps rope settings in rope_parameters; 4.x in rope_theta + rope_scaling.
        rope = dict(hf.get("rope_parameters") or {})
        scaling = hf.get("rope_scaling") or {}
        rope = {**scaling, **rope}
        theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        if rope_type not in ROPE_TYPES:
            raise ModelConfigError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ModelConfigError("partial_rotary_factor != 1 is not supported")
        scaling_items = tuple(sorted((k, float(v)) for k, v in rope.items()
                                     if k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")))
        family = SUPPORTED_ARCHITECTURES[architecture]
        if family == "qwen2":
            qkv_bias, o_bias = True, False
            windows = _qwen2_windows(hf, layers)
        elif family == "qwen2_moe":
            qkv_bias, o_bias = bool(hf.get("qkv_bias", True)), False
            windows = _qwen2_windows(hf, layers)
        elif family == "qwen3_moe":
            qkv_bias = o_bias = bool(hf.get("attention_bias", False))
            windows = _qwen2_windows(hf, layers)
        else:
            qkv_bias = o_bias = bool(hf.get("attention_bias", False))
            window = hf.get("sliding_window") if family in ("mistral", "mixtral") else None
            windows = (int(window or 0),) * layers
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        ladder = int(hf.get("ladder_layers", 0) or 0)
        if not 0 <= ladder <= layers:
            raise ModelConfigError(f"config.json ladder_layers={ladder} must be between 0 and num_hidden_layers={layers}")
        return cls(
            architecture=architecture,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling_items,
            rope_type=rope_type,
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            sliding_windows=windows,
            ladder_layers=ladder,
            eos_token_ids=eos_ids,
            bos_token_id=hf.get("bos_token_id"),
            moe=spec_from_hf(hf, family, layers) if family in MOE_ARCHITECTURES.values() else None,
            qk_norm=family == "qwen3_moe",
        )


def _qwen2_windows(hf: dict, layers: int) -> tuple[int, ...]:
    window = int(hf.get("sliding_window") or 0) if hf.get("use_sliding_window") else 0
    if not window:
        return (0,) * layers
    types = hf.get("layer_types")
    if types:
        return tuple(window if t == "sliding_attention" else 0 for t in types)
    first = int(hf.get("max_window_layers", layers))
    return tuple(window if i >= first else 0 for i in range(layers))


# ----------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class TensorSlice:
    """Which part of which checkpoint tensor fills a parameter.

    ``ranges`` gives (start, stop) for the leading dimensions (the rest are whole). A stop past
    the tensor's end means zero padding (vocab rows padded to a multiple of tp).
    """

    key: str
    ranges: tuple[tuple[int, int] | None, ...] = ()

    def narrow(self, dim: int, start: int, stop: int) -> "TensorSlice":
        """Keep [start, stop) of dimension ``dim`` of what this slice already selects."""
        ranges = list(self.ranges) + [None] * (dim + 1 - len(self.ranges))
        base = ranges[dim][0] if ranges[dim] is not None else 0
        ranges[dim] = (base + start, base + stop)
        return TensorSlice(self.key, tuple(ranges))


# ------------------------------------------------------------------------------ modules


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding:
    """cos/sin tables for given positions; inverse frequencies as in transformers (incl. llama3)."""

    def __init__(self, config: TextModelConfig):
        dim = config.head_dim
        # Built on the CPU explicitly: the model itself may be constructed on the meta device.
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
        params = dict(config.rope_scaling)
        if config.rope_type == "linear":
            inv_freq = inv_freq / params["factor"]
        elif config.rope_type == "llama3":
            factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
            old = params["original_max_position_embeddings"]
            low_wavelen, high_wavelen = old / low, old / high
            wavelen = 2 * math.pi / inv_freq
            scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
            smooth = (old / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
            inv_freq = torch.where(medium, smoothed, scaled)
        self.inv_freq = inv_freq
        self._on: dict[torch.device, torch.Tensor] = {}

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self._on.get(positions.device)
        if inv_freq is None:
            inv_freq = self._on[positions.device] = self.inv_freq.to(positions.device)
        freqs = positions[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class KVCache:
    """Static key/value buffers per layer: (batch, kv heads, max length, head dim)."""

    def __init__(self, keys: dict[int, torch.Tensor], values: dict[int, torch.Tensor]):
        self.keys = keys
        self.values = values

    def rows(self, start: int, stop: int) -> "KVCache":
        """A view of batch rows [start, stop) (one pipeline micro-batch)."""
        if start == 0 and all(stop == k.shape[0] for k in self.keys.values()):
            return self
        return KVCache({i: k[start:stop] for i, k in self.keys.items()}, {i: v[start:stop] for i, v in self.values.items()})

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        stop = start + k.shape[2]
        self.keys[layer][:, :, start:stop] = k
        self.values[layer][:, :, start:stop] = v
        return self.keys[layer][:, :, :stop], self.values[layer][:, :, :stop]


@dataclass
class ForwardContext:
    """Everything a layer needs besides its input for one forward over a chunk of tokens."""

    cos: torch.Tensor  # (batch, chunk, head_dim)
    sin: torch.Tensor
    start: int  # cache index of the chunk's first token
    key_valid: torch.Tensor  # (batch, start + chunk) bool: False for left padding
    cache: KVCache
    _masks: dict[int, torch.Tensor] = field(default_factory=dict)

    def mask(self, window: int) -> torch.Tensor:
        """(batch, 1, chunk, start + chunk) bool: causal, padding and sliding window."""
        found = self._masks.get(window)
        if found is None:
            chunk = self.cos.shape[1]
            stop = self.start + chunk
            q = torch.arange(self.start, stop, device=self.key_valid.device)[:, None]
            k = torch.arange(stop, device=self.key_valid.device)[None, :]
            allowed = k <= q
            if window:
                allowed &= k > q - window
            # A padding query attends to itself only, so its row stays finite (and unused).
            found = (allowed[None] & self.key_valid[:, None, :stop]) | (k == q)[None]
            found = self._masks[window] = found[:, None]
        return found

    @property
    def rows(self) -> int:
        """Sequences in this forward (one sampled token each)."""
        return self.cos.shape[0]

    def last_positions(self, h: torch.Tensor) -> torch.Tensor:
        """(rows, 1, hidden): the hidden state each row samples its next token from."""
        return h[:, -1:]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
        """Write this chunk's keys/values into the cache, attend over everything before: (batch, heads, chunk, dim)."""
        keys, values = self.cache.update(layer, k, v, self.start)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=self.mask(window),
                                              enable_gqa=q.shape[1] != keys.shape[1])


class SlotKVCache:
    """Static key/value buffers per layer, one slot per running sequence: (slots, kv heads, max length,
    head dim). A sequence owns its slot from admission to its last token; positions are its own
    (no padding between sequences). A paged cache would put a block table where the slot index is."""

    def __init__(self, keys: dict[int, torch.Tensor], values: dict[int, torch.Tensor]):
        self.keys, self.values = keys, values

    @property
    def slots(self) -> int:
        return next(iter(self.keys.values())).shape[0] if self.keys else 0

    @property
    def max_len(self) -> int:
        return next(iter(self.keys.values())).shape[2] if self.keys else 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys.values(), *self.values.values()))


@dataclass(frozen=True)
class Segment:
    """One sequence's tokens in a slot-batched forward: ``length`` tokens at positions
    [start, start + length) of slot ``slot`` (length 1: a decoding step; more: a prefill chunk)."""

    slot: int
    start: int
    length: int


class SlotContext:
    """One forward over the tokens of several sequences, each in its own cache slot (iteration-level
    batching). The tokens of all sequences are one flat chunk (batch 1), so every token-wise op
    (projections, MLP, experts) runs once over all of them; attention runs per sequence against its
    slot: every one-token (decoding) segment together, with a mask over each row's own length, and
    each prefill chunk on its own. Decoding segments come first."""

    def __init__(self, segments: list[Segment], cache: SlotKVCache, cos: torch.Tensor, sin: torch.Tensor):
        self.segments, self.cache, self.cos, self.sin = segments, cache, cos, sin
        self.decoding = 0
        while self.decoding < len(segments) and segments[self.decoding].length == 1:
            self.decoding += 1
        device = cos.device
        decoding = segments[:self.decoding]
        self._slots = torch.tensor([s.slot for s in decoding], dtype=torch.long, device=device)
        self._positions = torch.tensor([s.start for s in decoding], dtype=torch.long, device=device)
        # the decoding slots as one contiguous range when they are (then the cache is read as a view)
        first = decoding[0].slot if decoding else 0
        self._slot_range = (first, first + len(decoding)) if all(
            s.slot == first + i for i, s in enumerate(decoding)) else None
        self._key_len = max((s.start + 1 for s in decoding), default=0)
        ends, at = [], 0
        for s in segments:
            at += s.length
            ends.append(at - 1)
        self._ends = torch.tensor(ends, dtype=torch.long, device=device)
        self._masks: dict[tuple, torch.Tensor] = {}

    @classmethod
    def build(cls, model: "CausalLM", segments: list[Segment], cache: SlotKVCache, dtype: torch.dtype) -> "SlotContext":
        device = next(iter(cache.keys.values())).device if cache.keys else torch.device("cpu")
        positions = torch.cat([torch.arange(s.start, s.start + s.length) for s in segments]).to(device)
        cos, sin = model.rope(positions[None], dtype)
        return cls(segments, cache, cos, sin)

    @property
    def rows(self) -> int:
        return len(self.segments)

    @property
    def tokens(self) -> int:
        return self.cos.shape[1]

    def last_positions(self, h: torch.Tensor) -> torch.Tensor:
        return h[0, self._ends][:, None]

    def _mask(self, key: tuple, build) -> torch.Tensor:
        found = self._masks.get(key)
        if found is None:
            found = self._masks[key] = build()
        return found

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        outs = []
        d = self.decoding
        gqa = q.shape[1] != keys.shape[1]
        if d:
            # in-place writes at each row's own position, then one attention over the rows' slots
            keys[self._slots, :, self._positions] = k[0, :, :d].transpose(0, 1)
            values[self._slots, :, self._positions] = v[0, :, :d].transpose(0, 1)
            length = self._key_len
            if self._slot_range is not None:
                lo, hi = self._slot_range
                row_keys, row_values = keys[lo:hi, :, :length], values[lo:hi, :, :length]
            else:
                row_keys, row_values = keys[self._slots, :, :length], values[self._slots, :, :length]

            def decode_mask():
                index = torch.arange(length, device=q.device)[None, :]
                allowed = index <= self._positions[:, None]
                if window:
                    allowed &= index > self._positions[:, None] - window
                return allowed[:, None, None, :]

            mask = self._mask(("decode", window), decode_mask)
            out = F.scaled_dot_product_attention(q[0, :, :d].transpose(0, 1)[:, :, None], row_keys, row_values,
                                                 attn_mask=mask, enable_gqa=gqa)
            outs.append(out[:, :, 0].transpose(0, 1)[None])
        at = d
        for index in range(d, len(self.segments)):
            s = self.segments[index]
            stop = s.start + s.length
            keys[s.slot, :, s.start:stop] = k[0, :, at:at + s.length]
            values[s.slot, :, s.start:stop] = v[0, :, at:at + s.length]

            def chunk_mask(s=s, stop=stop):
                query = torch.arange(s.start, stop, device=q.device)[:, None]
                index = torch.arange(stop, device=q.device)[None, :]
                allowed = index <= query
                if window:
                    allowed &= index > query - window
                return allowed[None, None]

            mask = self._mask((index, window), chunk_mask)
            outs.append(F.scaled_dot_product_attention(q[:, :, at:at + s.length], keys[s.slot:s.slot + 1, :, :stop],
                                                       values[s.slot:s.slot + 1, :, :stop], attn_mask=mask,
                                                       enable_gqa=gqa))
            at += s.length
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


class Attention(nn.Module):
    def __init__(self, config: TextModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.head_dim = config.head_dim
        self.sliding_window = config.sliding_windows[layer] if config.sliding_windows else 0
        hidden, hd = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(hidden, config.num_heads * hd, bias=config.qkv_bias)
        self.k_proj = nn.Linear(hidden, config.num_kv_heads * hd, bias=config.qkv_bias)
        self.v_proj = nn.Linear(hidden, config.num_kv_heads * hd, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.num_heads * hd, hidden, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(hd, config.rms_norm_eps)
            self.k_norm = RMSNorm(hd, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, ctx: "ForwardContext | SlotContext") -> torch.Tensor:
        batch, chunk, _ = x.shape
        # Head counts come from the projections, so a sharded copy (fewer heads) runs as is.
        q = self.q_proj(x).view(batch, chunk, -1, self.head_dim)
        k = self.k_proj(x).view(batch, chunk, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(batch, chunk, -1, self.head_dim).transpose(1, 2)
        cos, sin = ctx.cos[:, None], ctx.sin[:, None]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        out = ctx.attend(self.layer, q, k, v, self.sliding_window)
        return self.o_proj(out.transpose(1, 2).reshape(batch, chunk, -1))


class MLP(nn.Module):
    def __init__(self, config: TextModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Ready:
    """A sub-block output that is already complete (same interface as an in-flight all-reduce)."""

    __slots__ = ("value",)

    def __init__(self, value: torch.Tensor):
        self.value = value

    def wait(self) -> torch.Tensor:
        return self.value


class LocalSum(nn.Module):
    """Where a sub-block's partial outputs are summed across ranks; on one rank, nothing to do."""

    def forward(self, partial: torch.Tensor) -> Ready:
        return Ready(partial)


class DecoderLayer(nn.Module):
    def __init__(self, config: TextModelConfig, layer: int):
        super().__init__()
        self.ladder = config.is_ladder(layer)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        moe = config.moe is not None and config.moe.sparse_layers[layer]
        self.mlp = MoEBlock(config.hidden_size, config.moe) if moe else MLP(config)
        if moe:
            self.mlp.layer = layer
        self.attn_reduce = LocalSum()
        self.mlp_reduce = LocalSum()

    def forward(self, h: torch.Tensor, attn_out, mlp_out, ctx: ForwardContext):
        """``h``: residual stream; ``attn_out`` / ``mlp_out``: the previous layer's sub-block
        outputs not yet added (ladder; ``.wait()`` gives the value), else None."""
        if not self.ladder:
            h = join_residual(h, attn_out, mlp_out)
            h = h + self.attn_reduce(self.self_attn(self.input_layernorm(h), ctx)).wait()
            return h + self.mlp_reduce(self.mlp(self.post_attention_layernorm(h))).wait(), None, None
        # Ladder: each output joins the stream one sub-block late, so its reduction overlaps
        # the next sub-block's compute. Attention does not see the previous MLP's output.
        if attn_out is not None:
            h = h + attn_out.wait()
        attn_out = self.attn_reduce(self.self_attn(self.input_layernorm(h), ctx))
        if mlp_out is not None:
            h = h + mlp_out.wait()
        mlp_out = self.mlp_reduce(self.mlp(self.post_attention_layernorm(h)))
        return h, attn_out, mlp_out


def join_residual(h: torch.Tensor, attn_out, mlp_out) -> torch.Tensor:
    """The residual stream with any late sub-block outputs added (end of a ladder region)."""
    if attn_out is not None:
        h = h + attn_out.wait()
    if mlp_out is not None:
        h = h + mlp_out.wait()
    return h


class DecoderStack(nn.Module):
    """``model.*`` of the checkpoint. ``layers`` is keyed by layer index: a pipeline stage
    keeps only its own, and a stage without the embedding or the final norm drops them."""

    def __init__(self, config: TextModelConfig):
        super().__init__()
        self.embed_tokens: nn.Module | None = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(config, i) for i in range(config.num_layers)})
        self.norm: nn.Module | None = RMSNorm(config.hidden_size, config.rms_norm_eps)


class CausalLM(nn.Module):
    def __init__(self, config: TextModelConfig):
        super().__init__()
        self.config = config
        self.model = DecoderStack(config)
        self.lm_head: nn.Module | None = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rope = RotaryEmbedding(config)
        self.weight_sources: dict[str, TensorSlice] = {name: TensorSlice(name) for name, _ in self.named_parameters()}
        if config.tie_word_embeddings:
            self.weight_sources["lm_head.weight"] = TensorSlice("model.embed_tokens.weight")
        for index in range(config.num_layers):
            if isinstance(self.model.layers[str(index)].mlp, MoEBlock):
                set_block_sources(self, index)

    # -- the pieces a pipeline stage runs ------------------------------------------------
    @property
    def layer_indices(self) -> list[int]:
        return sorted(int(i) for i in self.model.layers.keys())

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(tokens)

    def run_layers(self, h: torch.Tensor, attn_out, mlp_out, ctx: ForwardContext):
        for layer in self.model.layers.values():
            h, attn_out, mlp_out = layer(h, attn_out, mlp_out, ctx)
        return h, attn_out, mlp_out

    def head(self, h: torch.Tensor, attn_out=None, mlp_out=None) -> torch.Tensor:
        return self.lm_head(self.model.norm(join_residual(h, attn_out, mlp_out)))

    def forward(self, tokens: torch.Tensor, ctx: ForwardContext, all_logits: bool = False) -> torch.Tensor:
        """Whole model on one stage: logits of the last position, or of every position."""
        h, attn_out, mlp_out = self.run_layers(self.embed(tokens), None, None, ctx)
        h = join_residual(h, attn_out, mlp_out)
        return self.head(h if all_logits else ctx.last_positions(h))

    # -- decoding state ---------------------------------------------------------------------
    def allocate_cache(self, batch: int, length: int, dtype: torch.dtype, device: torch.device) -> KVCache:
        """Buffers for this model's layers, sized by its (possibly sharded) key/value heads."""
        keys, values = {}, {}
        for index in self.layer_indices:
            attn = self.model.layers[str(index)].self_attn
            kv_heads = attn.k_proj.out_features // attn.head_dim
            shape = (batch, kv_heads, length, attn.head_dim)
            keys[index] = torch.zeros(shape, dtype=dtype, device=device)
            values[index] = torch.zeros(shape, dtype=dtype, device=device)
        return KVCache(keys, values)

    def allocate_slot_cache(self, slots: int, max_len: int, dtype: torch.dtype, device: torch.device) -> SlotKVCache:
        """Per layer of this stage: ``slots`` sequences x ``max_len`` positions of this rank's key/value heads."""
        keys, values = {}, {}
        for index in self.layer_indices:
            attn = self.model.layers[str(index)].self_attn
            shape = (slots, attn.k_proj.out_features // attn.head_dim, max_len, attn.head_dim)
            # zeros, not empty: masked positions are still multiplied (by 0) in attention, so no NaN may sit there
            keys[index] = torch.zeros(shape, dtype=dtype, device=device)
            values[index] = torch.zeros(shape, dtype=dtype, device=device)
        return SlotKVCache(keys, values)

    def context(self, positions: torch.Tensor, start: int, key_valid: torch.Tensor, cache: KVCache,
                dtype: torch.dtype) -> ForwardContext:
        cos, sin = self.rope(positions, dtype)
        return ForwardContext(cos=cos, sin=sin, start=start, key_valid=key_valid, cache=cache)


def set_ladder_layers(model: CausalLM, k: int) -> None:
    """Rewire the upper ``k`` layers as Ladder (0: standard everywhere); weights are unchanged."""
    model.config = model.config.with_ladder_layers(k)
    for index in model.layer_indices:
        model.model.layers[str(index)].ladder = model.config.is_ladder(index)


def build_model(config: TextModelConfig, device: torch.device | str = "meta") -> CausalLM:
    """The model with unmaterialised parameters (meta) by default; see checkpoint.load_parameters."""
    with torch.device(device):
        return CausalLM(config)
