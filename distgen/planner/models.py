"""Model descriptions from configs: what one denoiser call or one token costs, layer by layer.

Input: a diffusers pipeline directory, a denoiser / transformer ``config.json`` alone (so a
checkpoint can be planned before it is downloaded), or an HF LLM ``config.json``. Nothing here
loads weights or imports torch.

A diffusion denoiser becomes a list of :class:`Op` for **one** sample of one denoiser call
(classifier-free guidance doubles the batch; :mod:`distgen.planner.costs` applies that). An op
carries its FLOPs and what a strategy needs to split it: the tokens or latent rows it runs over,
its width, its kernel (conv halos), its keys (attention). FLOPs count a multiply-add as 2.

Text models become an :class:`LLMDesc` (layers, widths, heads, experts); per-token costs are
functions of batch and context there.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from distgen.config import ConfigError

# Text tokens the denoiser attends to, per family (the pipelines' defaults).
TEXT_TOKENS = {"unet": 77, "pixart": 120, "sd3": 333, "flux": 512, "wan": 512, "latte": 120, "video-unet": 77,
               "motion-unet": 77}
# Text encoders when only the denoiser config is given (parameter counts of the released encoders:
# CLIP ViT-L/14 text 123 M, OpenCLIP bigG text 695 M, T5-v1.1-XXL encoder 4.76 B, umT5-XXL encoder 5.7 B).
DEFAULT_TEXT_ENCODERS = {
    "unet": 123e6, "unet-xl": 818e6, "pixart": 4.76e9, "sd3": 5.58e9, "flux": 4.88e9, "wan": 5.7e9, "latte": 4.76e9,
    "video-unet": 354e6, "motion-unet": 123e6,
}

DIFFUSION_CLASSES = ("UNet2DConditionModel", "PixArtTransformer2DModel", "SD3Transformer2DModel",
                     "FluxTransformer2DModel", "UNet3DConditionModel", "UNetMotionModel", "WanTransformer3DModel",
                     "LatteTransformer3DModel")
LLM_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "MixtralForCausalLM",
                     "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "Qwen3ForCausalLM")


@dataclass(frozen=True)
class Op:
    """One layer's work for one sample of one denoiser call.

    kind: ``linear`` (per token / per position: splits with the tokens), ``conv`` (k x k over latent
    rows: a band needs ``kernel // 2`` halo rows each side), ``attn`` (self-attention scores and
    values: ``tokens`` queries x ``kv_tokens`` keys, per frame), ``cross`` (attention to the text),
    ``text_linear`` (projections of the text tokens: do not split with the image), ``norm``
    (GroupNorm: statistics over the whole image), ``tconv`` / ``tattn`` (temporal conv / attention
    over ``frames`` at every spatial position).
    """

    kind: str
    flops: float
    tokens: int = 0  # spatial positions (per frame) the op runs over
    dim: int = 0  # channels / width
    rows: int = 0  # latent rows at this op's resolution
    kv_tokens: int = 0
    heads: int = 0
    kernel: int = 1
    frames: int = 1
    name: str = ""


@dataclass
class DiffusionDesc:
    denoiser_class: str
    family: str  # unet | pixart | sd3 | flux | wan | latte | video-unet | motion-unet
    config: dict
    params: float  # denoiser parameters
    ops: list[Op]
    heads: int | None  # attention heads of the DiT (sp ulysses), None for a UNet
    latent: tuple[int, int, int]  # (frames, rows, cols) of the latent
    token_rows: int  # rows of the token grid (DiT: latent rows / patch; UNet: latent rows)
    row_multiple: int  # latent rows of a band must be a multiple of this
    tokens: int  # image tokens per frame (DiT) / latent positions (UNet)
    guidance_batch: bool  # classifier-free guidance runs as a batch of two (what cfg=2 splits)
    text_encoder_params: float
    text_tokens: int
    vae_decode_flops: float
    vae_params: float
    height: int
    width: int
    frames: int
    vae_channels: int = 128  # the VAE decoder's widest full-resolution activation, channels
    notes: list[str] = field(default_factory=list)

    @property
    def is_video(self) -> bool:
        return self.family in ("wan", "latte", "video-unet", "motion-unet")

    @property
    def in_runtime(self) -> bool:
        """Whether distgen's runtime runs this denoiser (Latte is described for planning only)."""
        return self.family != "latte"

    @property
    def is_dit(self) -> bool:
        return self.family in ("pixart", "sd3", "flux", "wan", "latte")

    @property
    def flops(self) -> float:
        return sum(op.flops for op in self.ops)

    @property
    def attention_layers(self) -> list[Op]:
        return [op for op in self.ops if op.kind == "attn"]


@dataclass(frozen=True)
class MoEDesc:
    experts: int
    top_k: int
    expert_intermediate: int
    shared_intermediate: int
    sparse_layers: tuple[bool, ...]


@dataclass
class LLMDesc:
    architecture: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    max_context: int
    moe: MoEDesc | None = None
    config: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ parameters per part
    @property
    def attn_params(self) -> float:
        return self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim + self.heads * self.head_dim * self.hidden

    def mlp_params(self, layer: int) -> float:
        """All MLP / expert weights of a layer (what must be stored)."""
        if self.moe is not None and self.moe.sparse_layers[layer]:
            m = self.moe
            return m.experts * 3 * self.hidden * m.expert_intermediate + 3 * self.hidden * m.shared_intermediate \
                + self.hidden * m.experts
        return 3 * self.hidden * self.intermediate

    def active_mlp_params(self, layer: int) -> float:
        """MLP weights one token goes through."""
        if self.moe is not None and self.moe.sparse_layers[layer]:
            m = self.moe
            return m.top_k * 3 * self.hidden * m.expert_intermediate + 3 * self.hidden * m.shared_intermediate \
                + self.hidden * m.experts
        return 3 * self.hidden * self.intermediate

    def expert_params(self, layer: int) -> float:
        """The routed experts' weights of a layer (what ep splits); 0 for a dense layer."""
        if self.moe is not None and self.moe.sparse_layers[layer]:
            return self.moe.experts * 3 * self.hidden * self.moe.expert_intermediate
        return 0.0

    @property
    def embed_params(self) -> float:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def params(self) -> float:
        return self.embed_params + sum(self.attn_params + self.mlp_params(i) for i in range(self.layers))

    @property
    def active_params(self) -> float:
        return self.embed_params + sum(self.attn_params + self.active_mlp_params(i) for i in range(self.layers))

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> float:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


# ---------------------------------------------------------------------------- helpers
def _read_json(path: Path, option: str) -> dict:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{option}: {path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{option}: {path} is not a JSON config ({exc})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{option}: {path} is not a JSON object")
    return value


def _per_block(value, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def _linear(tokens: int, d_in: int, d_out: int, rows: int = 0, frames: int = 1, name: str = "") -> Op:
    """A per-token matrix (d_in x d_out) over ``tokens`` positions of each of ``frames`` frames."""
    return Op("linear", 2.0 * tokens * frames * d_in * d_out, tokens=tokens, dim=d_out, rows=rows, frames=frames,
              name=name)


def _attn(tokens: int, kv_tokens: int, dim: int, heads: int, rows: int = 0, frames: int = 1, name: str = "") -> Op:
    return Op("attn", 4.0 * tokens * kv_tokens * dim * frames, tokens=tokens, kv_tokens=kv_tokens, dim=dim,
              heads=heads, rows=rows, frames=frames, name=name)


def _cross(tokens: int, text: int, dim: int, text_dim: int, heads: int, rows: int = 0, frames: int = 1) -> list[Op]:
    """Cross-attention to ``text`` tokens: Q and output on the image, K/V of the text (cached per request
    by patch parallelism; computed on every rank otherwise)."""
    return [
        _linear(tokens, dim, dim, rows, frames, "cross.q"),
        Op("text_linear", 2.0 * text * text_dim * 2 * dim, tokens=text, dim=2 * dim, name="cross.kv"),
        Op("cross", 4.0 * tokens * frames * text * dim, tokens=tokens, kv_tokens=text, dim=dim, heads=heads, rows=rows,
           frames=frames),
        _linear(tokens, dim, dim, rows, frames, "cross.out"),
    ]


def _norm(c: int, h: int, w: int, frames: int = 1) -> Op:
    return Op("norm", 8.0 * c * h * w * frames, tokens=h * w, dim=c, rows=h, frames=frames)


def _conv(c_in: int, c_out: int, h: int, w: int, kernel: int = 3, frames: int = 1) -> Op:
    return Op("conv", 2.0 * kernel * kernel * c_in * c_out * h * w * frames, tokens=h * w, dim=c_out, rows=h,
              kernel=kernel, frames=frames)


# ---------------------------------------------------------------------------- UNets
def _resnet(c_in: int, c_out: int, h: int, w: int, frames: int = 1) -> list[Op]:
    ops = [_norm(c_in, h, w, frames), _conv(c_in, c_out, h, w, 3, frames), _norm(c_out, h, w, frames),
           _conv(c_out, c_out, h, w, 3, frames)]
    if c_in != c_out:
        ops.append(_conv(c_in, c_out, h, w, 1, frames))
    return ops


def _spatial_transformer(c: int, depth: int, heads: int, h: int, w: int, text: int, text_dim: int,
                         frames: int = 1) -> list[Op]:
    """Transformer2DModel inside a UNet: GroupNorm, proj_in, depth x (self-attention, cross-attention,
    GEGLU feed-forward of 4c), proj_out; per frame."""
    s = h * w
    ops = [_norm(c, h, w, frames), _linear(s, c, c, h, frames, "proj_in")]
    for _ in range(depth):
        ops += [_linear(s, c, 3 * c, h, frames, "self.qkv"), _attn(s, s, c, heads, h, frames, "self"),
                _linear(s, c, c, h, frames, "self.out")]
        ops += _cross(s, text, c, text_dim, heads, h, frames)
        ops += [_linear(s, c, 8 * c, h, frames, "ff.geglu"), _linear(s, 4 * c, c, h, frames, "ff.out")]
    ops.append(_linear(s, c, c, h, frames, "proj_out"))
    return ops


def _temporal_conv(c: int, h: int, w: int, frames: int) -> list[Op]:
    """diffusers TemporalConvLayer: four (3, 1, 1) convs over frames (exact halo: 4 frames a side)."""
    return [Op("tconv", 2.0 * 3 * c * c * h * w * frames, tokens=h * w, dim=c, rows=h, kernel=3, frames=frames,
               name=f"tconv{i}") for i in range(4)]


def _temporal_transformer(c: int, heads: int, h: int, w: int, frames: int, depth: int = 1) -> list[Op]:
    """Attention over frames at every spatial position (TransformerTemporalModel / motion module)."""
    s = h * w
    ops = [_norm(c, h, w, frames), _linear(s, c, c, h, frames, "temporal.proj_in")]
    for _ in range(depth):
        ops += [_linear(s, c, 3 * c, h, frames, "temporal.qkv"),
                Op("tattn", 4.0 * s * frames * frames * c, tokens=s, kv_tokens=frames, dim=c, heads=heads, rows=h,
                   frames=frames, name="temporal"),
                _linear(s, c, c, h, frames), _linear(s, c, 8 * c, h, frames), _linear(s, 4 * c, c, h, frames)]
    ops.append(_linear(s, c, c, h, frames, "temporal.proj_out"))
    return ops


def unet_ops(config: dict, rows: int, cols: int, frames: int = 1, kind: str = "2d") -> list[Op]:
    """UNet2DConditionModel (kind '2d'), UNet3DConditionModel ('3d': a temporal conv after every ResNet and a
    temporal transformer after every spatial one) or UNetMotionModel ('motion': a motion module after every
    ResNet), following diffusers' block layout (skip channels included)."""
    boc = list(config.get("block_out_channels", (320, 640, 1280, 1280)))
    n = len(boc)
    down_types = list(config.get("down_block_types", ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"]))
    up_types = list(config.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1)))
    lpb = _per_block(config.get("layers_per_block", 2), n)
    depth = _per_block(config.get("transformer_layers_per_block", 1) or 1, n)
    heads = _per_block(config.get("num_attention_heads") or config.get("attention_head_dim", 8), n)
    text_dim = config.get("cross_attention_dim", 768)
    text_dim = text_dim[0] if isinstance(text_dim, (list, tuple)) else text_dim
    text = TEXT_TOKENS["unet"]
    in_ch, out_ch = config.get("in_channels", 4), config.get("out_channels", 4)
    f = frames

    def after_resnet(c: int, h: int, w: int) -> list[Op]:
        if kind == "3d":
            return _temporal_conv(c, h, w, f)
        if kind == "motion":
            return _temporal_transformer(c, int(config.get("motion_num_attention_heads", 8) or 8), h, w, f)
        return []

    def after_transformer(c: int, h: int, w: int, hd: int) -> list[Op]:
        return _temporal_transformer(c, hd, h, w, f) if kind == "3d" else []

    h, w = rows, cols
    ops: list[Op] = [_conv(in_ch, boc[0], h, w, 3, f)]
    if kind == "3d":
        ops += _temporal_transformer(boc[0], 8, h, w, f)  # transformer_in
    skips = [boc[0]]
    c_prev = boc[0]
    for i, (block, c) in enumerate(zip(down_types, boc)):
        for j in range(lpb[i]):
            ops += _resnet(c_prev if j == 0 else c, c, h, w, f) + after_resnet(c, h, w)
            if "CrossAttn" in block:
                ops += _spatial_transformer(c, depth[i], heads[i], h, w, text, text_dim, f)
                ops += after_transformer(c, h, w, heads[i])
            skips.append(c)
        c_prev = c
        if i < n - 1:
            h, w = (h + 1) // 2, (w + 1) // 2
            ops.append(_conv(c, c, h, w, 3, f))
            skips.append(c)
    c = boc[-1]
    ops += _resnet(c, c, h, w, f) + after_resnet(c, h, w)
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None:
        ops += _spatial_transformer(c, depth[-1], heads[-1], h, w, text, text_dim, f) + after_transformer(c, h, w, heads[-1])
        ops += _resnet(c, c, h, w, f) + after_resnet(c, h, w)
    rboc, rdepth, rheads, rlpb = boc[::-1], depth[::-1], heads[::-1], lpb[::-1]
    prev = rboc[0]
    for i, (block, c) in enumerate(zip(up_types, rboc)):
        for j in range(rlpb[i] + 1):
            skip = skips.pop()
            ops += _resnet((prev if j == 0 else c) + skip, c, h, w, f) + after_resnet(c, h, w)
            if "CrossAttn" in block:
                ops += _spatial_transformer(c, rdepth[i], rheads[i], h, w, text, text_dim, f)
                ops += after_transformer(c, h, w, rheads[i])
        prev = c
        if i < n - 1:
            h, w = h * 2, w * 2
            ops.append(_conv(c, c, h, w, 3, f))
    ops += [_norm(boc[0], h, w, f), _conv(boc[0], out_ch, h, w, 3, f)]
    return ops


def weights_of(ops: list[Op]) -> float:
    """The weights behind a list of ops (convs, per-token matrices, text projections)."""
    total = 0.0
    for op in ops:
        if op.kind in ("conv", "linear", "tconv"):
            total += op.flops / (2.0 * op.tokens * op.frames)
        elif op.kind == "text_linear" and not op.name.endswith("attn"):
            total += op.flops / (2.0 * op.tokens)
    return total


def unet_params(config: dict, kind: str = "2d") -> float:
    """Weights of a UNet from its config (biases, norms and embeddings, below 1 %, left out)."""
    side = 2 ** len(config.get("block_out_channels", (1, 1, 1, 1)))
    return weights_of(unet_ops(config, side, side, 2 if kind != "2d" else 1, kind))


# ---------------------------------------------------------------------------- DiTs
def _dit_block(s: int, d: int, heads: int, text: int, text_dim: int, ff: int, rows: int, frames: int = 1,
               cross: bool = True, gated_ff: bool = False) -> list[Op]:
    ops = [_linear(s, d, 3 * d, rows, frames, "self.qkv"), _attn(s, s, d, heads, rows, frames, "self"),
           _linear(s, d, d, rows, frames, "self.out")]
    if cross:
        ops += _cross(s, text, d, text_dim, heads, rows=rows, frames=frames)
    ops += [_linear(s, d, (2 if gated_ff else 1) * ff, rows, frames, "ff.in"), _linear(s, ff, d, rows, frames, "ff.out")]
    return ops


def _joint_block(s: int, t: int, d: int, heads: int, ff: int, rows: int, context_ff: bool = True) -> list[Op]:
    """MMDiT (SD3 / Flux double-stream): image and text streams with their own weights, one attention over
    both. The text stream's projections are ``text_linear`` (replicated by every image strategy); attention
    keys are image + text."""
    ops = [_linear(s, d, 3 * d, rows=rows, name="img.qkv"), Op("text_linear", 2.0 * t * d * 3 * d, tokens=t, dim=3 * d),
           _attn(s, s + t, d, heads, rows=rows, name="joint"),
           Op("text_linear", 4.0 * t * (s + t) * d, tokens=t, dim=d, name="text.attn"),
           _linear(s, d, d, rows=rows), _linear(s, d, ff, rows=rows), _linear(s, ff, d, rows=rows)]
    if context_ff:
        ops += [Op("text_linear", 2.0 * t * d * d + 4.0 * t * d * ff, tokens=t, dim=d, name="text.out+ff")]
    return ops


def dit_ops(family: str, config: dict, latent_rows: int, latent_cols: int, latent_frames: int = 1) -> tuple[list[Op], int, int]:
    """(ops, heads, patch) of a DiT at a latent size."""
    if family == "wan":
        patch = config.get("patch_size", (1, 2, 2))
        pt, ph, pw = (patch if isinstance(patch, (list, tuple)) else (1, patch, patch))
    else:
        pt, ph = 1, int(config.get("patch_size", 1 if family == "flux" else 2) or 1)
        pw = ph
    if family == "flux":
        ph = pw = 2  # the pipeline packs 2 x 2 latent pixels into one token (patch_size stays 1 in the config)
    heads = int(config.get("num_attention_heads", 16))
    hd = int(config.get("attention_head_dim", 72))
    d = heads * hd
    rows, cols = latent_rows // ph, latent_cols // pw
    s = rows * cols
    layers = int(config.get("num_layers", 28))
    ops: list[Op] = []
    in_ch = int(config.get("in_channels", 4))
    token_frames = max(1, latent_frames // pt) if family in ("wan", "latte") else 1
    ops.append(_linear(s, in_ch * ph * pw * pt, d, rows, token_frames, "patch_embed"))
    if family == "pixart":
        text_dim = d  # caption_projection maps the T5 states to d once per request
        text = TEXT_TOKENS["pixart"]
        ops.append(Op("text_linear", 2.0 * text * int(config.get("caption_channels", 4096)) * d * 2, tokens=text, dim=d))
        for _ in range(layers):
            ops += _dit_block(s, d, heads, text, text_dim, 4 * d, rows)
    elif family == "sd3":
        t = TEXT_TOKENS["sd3"]
        jd = int(config.get("joint_attention_dim", 4096))
        ops.append(Op("text_linear", 2.0 * t * jd * d, tokens=t, dim=d))
        dual = len(config.get("dual_attention_layers") or ())
        for i in range(layers):
            ops += _joint_block(s, t, d, heads, 4 * d, rows, context_ff=i < layers - 1)
        for _ in range(dual):  # SD3.5: a second self-attention on the image stream in the first layers
            ops += [_linear(s, d, 3 * d, rows=rows), _attn(s, s, d, heads, rows=rows), _linear(s, d, d, rows=rows)]
    elif family == "flux":
        t = TEXT_TOKENS["flux"]
        jd = int(config.get("joint_attention_dim", 4096))
        ops.append(Op("text_linear", 2.0 * t * jd * d, tokens=t, dim=d))
        for _ in range(layers):
            ops += _joint_block(s, t, d, heads, 4 * d, rows)
        for _ in range(int(config.get("num_single_layers", 38))):
            # single-stream: text and image tokens concatenated; fused QKV + MLP-in, one output projection
            ops += [_linear(s, d, 3 * d + 4 * d, rows=rows), Op("text_linear", 2.0 * t * d * 7 * d, tokens=t, dim=7 * d),
                    _attn(s, s + t, d, heads, rows=rows), Op("text_linear", 4.0 * t * (s + t) * d, tokens=t, dim=d),
                    _linear(s, 5 * d, d, rows=rows), Op("text_linear", 2.0 * t * 5 * d * d, tokens=t, dim=d)]
    elif family == "wan":
        f = max(1, latent_frames // pt)
        text = TEXT_TOKENS["wan"]
        ffn = int(config.get("ffn_dim", 4 * d))
        text_dim = int(config.get("text_dim", 4096))
        ops.append(Op("text_linear", 2.0 * text * text_dim * d * 2, tokens=text, dim=d))
        # 3D full attention over every token of every latent frame: fold frames into the tokens
        for _ in range(layers):
            ops += _dit_block(s * f, d, heads, text, d, ffn, rows * f)
    elif family == "latte":
        f = latent_frames
        text = TEXT_TOKENS["latte"]
        ops.append(Op("text_linear", 2.0 * text * int(config.get("caption_channels", 4096)) * d * 2, tokens=text, dim=d))
        for _ in range(layers):
            ops += _dit_block(s, d, heads, text, d, 4 * d, rows, frames=f)  # spatial: per frame, with the text
            # temporal block: attention over the frames at every token position, no text
            ops += [_linear(s, d, 3 * d, rows, f, "temporal.qkv"),
                    Op("tattn", 4.0 * s * f * f * d, tokens=s, kv_tokens=f, dim=d, heads=heads, rows=rows, frames=f),
                    _linear(s, d, d, rows, f), _linear(s, d, 4 * d, rows, f), _linear(s, 4 * d, d, rows, f)]
    else:
        raise ValueError(family)
    out_ch = int(config.get("out_channels") or in_ch)
    ops.append(_linear(s, d, out_ch * ph * pw * pt, rows, token_frames, "proj_out"))
    return ops, heads, ph


def dit_params(family: str, config: dict) -> float:
    heads = int(config.get("num_attention_heads", 16))
    d = heads * int(config.get("attention_head_dim", 72))
    layers = int(config.get("num_layers", 28))
    if family == "pixart":  # self, cross, ff per layer; adaLN-single is one shared table
        return layers * (4 * d * d + 4 * d * d + 8 * d * d) + 6 * d * d
    if family == "sd3":
        return layers * 2 * (4 * d * d + 8 * d * d + 6 * d * d)
    if family == "flux":
        return layers * 2 * (4 * d * d + 8 * d * d + 6 * d * d) + int(config.get("num_single_layers", 38)) * (12 * d * d + 3 * d * d)
    if family == "wan":
        ffn = int(config.get("ffn_dim", 4 * d))
        return layers * (4 * d * d + 4 * d * d + 2 * d * ffn)
    if family == "latte":
        return layers * (4 * d * d + 4 * d * d + 8 * d * d) + layers * (4 * d * d + 8 * d * d) + 6 * d * d
    raise ValueError(family)


# ---------------------------------------------------------------------------- VAE, text encoders
def vae_decode_flops(vae: dict | None, height: int, width: int, frames: int = 1) -> float:
    """AutoencoderKL decoder at the output size: conv_in, mid block (two ResNets and one self-attention at the
    latent size), up blocks of layers_per_block + 1 ResNets with an upsampling conv, conv_out. Video VAEs
    that decode frame by frame (UNet3D / AnimateDiff pipelines) multiply by the frames; Wan's causal 3D VAE
    is counted as its 2D decoder per latent frame x 4 output frames x 3 (3 x 3 x 3 kernels)."""
    vae = vae or {}
    boc = list(vae.get("block_out_channels", (128, 256, 512, 512)))
    lpb = int(vae.get("layers_per_block", 2))
    scale = 2 ** (len(boc) - 1)
    h, w = max(1, height // scale), max(1, width // scale)
    latent_ch = int(vae.get("latent_channels", 4))
    c = boc[-1]
    flops = 2.0 * 9 * latent_ch * c * h * w
    flops += 2 * 2.0 * 2 * 9 * c * c * h * w + 4.0 * (h * w) ** 2 * c + 8.0 * h * w * c * c
    prev = c
    for i, c in enumerate(reversed(boc)):
        for j in range(lpb + 1):
            cin = prev if j == 0 else c
            flops += 2.0 * 9 * (cin * c + c * c) * h * w + (2.0 * cin * c * h * w if cin != c else 0)
        prev = c
        if i < len(boc) - 1:
            h, w = h * 2, w * 2
            flops += 2.0 * 9 * c * c * h * w
    flops += 2.0 * 9 * boc[0] * 3 * h * w
    return flops * frames


def vae_params(vae: dict | None) -> float:
    vae = vae or {}
    boc = list(vae.get("block_out_channels", (128, 256, 512, 512)))
    lpb = int(vae.get("layers_per_block", 2))
    # encoder + decoder ResNets (two 3x3 convs each), roughly symmetric
    total = 0.0
    for c in boc:
        total += (2 * lpb + 1) * 2 * 9 * c * c
    return total + 4 * 9 * boc[-1] ** 2


def encoder_params(config: dict) -> float:
    """A text encoder's weights from its config (CLIP text, T5 / umT5 encoder)."""
    if "d_model" in config:  # T5
        d, ff, layers = config["d_model"], config.get("d_ff", 4 * config["d_model"]), config.get("num_layers", 24)
        gated = 3 if str(config.get("feed_forward_proj", "")).startswith("gated") else 2
        inner = config.get("num_heads", 64) * config.get("d_kv", 64)
        return layers * (4 * d * inner + gated * d * ff) + config.get("vocab_size", 32128) * d
    d = config.get("hidden_size", 768)
    ff = config.get("intermediate_size", 4 * d)
    layers = config.get("num_hidden_layers", 12)
    return layers * (4 * d * d + 2 * d * ff) + config.get("vocab_size", 49408) * d


# ---------------------------------------------------------------------------- entry points
def _family(denoiser_class: str, config: dict) -> str:
    return {"UNet2DConditionModel": "unet", "PixArtTransformer2DModel": "pixart", "SD3Transformer2DModel": "sd3",
            "FluxTransformer2DModel": "flux", "UNet3DConditionModel": "video-unet", "UNetMotionModel": "motion-unet",
            "WanTransformer3DModel": "wan", "LatteTransformer3DModel": "latte"}[denoiser_class]


def describe_denoiser(config: dict, height: int, width: int, frames: int = 1, vae: dict | None = None,
                      text_encoder_params: float | None = None, guidance: bool | None = None,
                      option: str = "--model-config") -> DiffusionDesc:
    """A denoiser config (``_class_name`` says which) at an output size."""
    cls = config.get("_class_name")
    if cls not in DIFFUSION_CLASSES:
        raise ConfigError(f"{option}: {cls or 'a config without _class_name'} is not a denoiser the planner "
                          f"knows; known: {', '.join(DIFFUSION_CLASSES)} (or an LLM: {', '.join(LLM_ARCHITECTURES)})")
    family = _family(cls, config)
    for name, value in (("--height", height), ("--width", width), ("--frames", frames)):
        if value is None or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value}")
    vae_scale = 2 ** (len((vae or {}).get("block_out_channels", (1, 1, 1, 1))) - 1)
    if family == "flux":
        vae_scale = 8
    latent_frames = frames
    notes: list[str] = []
    if family == "wan":
        vae_scale = 8
        latent_frames = (frames - 1) // 4 + 1
    rows, cols = height // vae_scale, width // vae_scale
    if rows < 1 or cols < 1:
        raise ConfigError(f"--height/--width {height}x{width}: smaller than the VAE factor {vae_scale}")
    if family in ("unet", "video-unet", "motion-unet"):
        kind = {"unet": "2d", "video-unet": "3d", "motion-unet": "motion"}[family]
        ops = unet_ops(config, rows, cols, frames if family != "unet" else 1, kind)
        heads, row_multiple = None, 2 ** (len(config.get("block_out_channels", (1, 1, 1, 1))) - 1)
        token_rows, tokens = rows, rows * cols
        params = unet_params(config, kind)
        te_key = "unet-xl" if config.get("addition_embed_type") == "text_time" else family
    else:
        ops, heads, patch = dit_ops(family, config, rows, cols, latent_frames)
        row_multiple = patch
        token_rows, tokens = rows // patch, (rows // patch) * (cols // patch)
        params = dit_params(family, config)
        te_key = family
    if guidance is None:
        guidance = family not in ("flux", "wan")  # Flux is guidance-distilled; Wan runs its two passes apart
    if family == "wan":
        notes.append("Wan runs the conditional and unconditional passes as two denoiser calls (no cfg axis)")
    if family in ("flux", "latte"):
        notes.append(f"{cls}: described for planning; distgen's runtime does not run it yet")
    if family in ("wan", "latte"):
        vae_flops = vae_decode_flops(vae, height, width, 1) * (latent_frames * 4 * 3 if family == "wan" else frames)
    elif family in ("video-unet", "motion-unet"):
        vae_flops = vae_decode_flops(vae, height, width, frames)
    else:
        vae_flops = vae_decode_flops(vae, height, width)
    return DiffusionDesc(
        denoiser_class=cls, family=family, config=config, params=params, ops=ops, heads=heads,
        latent=(latent_frames, rows, cols), token_rows=token_rows, row_multiple=row_multiple, tokens=tokens,
        guidance_batch=guidance, text_encoder_params=text_encoder_params if text_encoder_params is not None
        else DEFAULT_TEXT_ENCODERS[te_key], text_tokens=TEXT_TOKENS[family], vae_decode_flops=vae_flops,
        vae_params=vae_params(vae), height=height, width=width, frames=frames,
        vae_channels=int(((vae or {}).get("block_out_channels") or (128,))[0]), notes=notes)


def describe_llm(config: dict, option: str = "--model-config") -> LLMDesc:
    archs = config.get("architectures") or []
    arch = archs[0] if archs else config.get("model_type", "?")
    model_type = config.get("model_type", "")
    if arch not in LLM_ARCHITECTURES and model_type not in ("llama", "mistral", "qwen2", "mixtral", "qwen2_moe", "qwen3_moe", "qwen3"):
        raise ConfigError(f"{option}: {arch} is not an LLM the planner knows; known: {', '.join(LLM_ARCHITECTURES)}")
    try:
        hidden = int(config["hidden_size"])
        layers = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{option}: LLM config lacks {exc}") from None
    kv = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    inter = int(config.get("intermediate_size", 4 * hidden))
    moe = None
    experts = config.get("num_local_experts") or config.get("num_experts")
    if experts:
        top_k = int(config.get("num_experts_per_tok", 2))
        if "num_local_experts" in config:  # Mixtral: every layer sparse, intermediate_size is per expert
            moe = MoEDesc(int(experts), top_k, inter, 0, (True,) * layers)
        else:
            step = int(config.get("decoder_sparse_step", 1) or 1)
            dense = set(config.get("mlp_only_layers", []) or [])
            sparse = tuple((i not in dense) and (i + 1) % step == 0 for i in range(layers))
            moe = MoEDesc(int(experts), top_k, int(config.get("moe_intermediate_size", inter)),
                          int(config.get("shared_expert_intermediate_size", 0) or 0), sparse)
    return LLMDesc(architecture=arch, layers=layers, hidden=hidden, heads=heads, kv_heads=kv, head_dim=head_dim,
                   intermediate=inter, vocab=int(config.get("vocab_size", 32000)),
                   tied=bool(config.get("tie_word_embeddings", False)),
                   max_context=int(config.get("max_position_embeddings", 4096)), moe=moe, config=config)


def load_config(path: str | Path, option: str) -> dict:
    return _read_json(Path(path), option)


def is_llm_config(config: dict) -> bool:
    return "num_hidden_layers" in config and "hidden_size" in config and "_class_name" not in config


@dataclass
class PipelineConfigs:
    """What a pipeline directory says, read once: the denoiser config, the VAE config, text encoders."""

    denoiser: dict
    vae: dict | None
    text_encoder_params: float | None


def read_pipeline(directory: str | Path, option: str = "--model") -> PipelineConfigs:
    root = Path(directory)
    index = _read_json(root / "model_index.json", option)
    attr = next((a for a in ("unet", "transformer") if isinstance(index.get(a), list) and index[a][1]), None)
    if attr is None:
        raise ConfigError(f"{option} {directory}: model_index.json has no unet or transformer; the planner needs a "
                          f"denoiser ({', '.join(DIFFUSION_CLASSES)}) or an LLM config.json")
    denoiser = _read_json(root / attr / "config.json", option)
    denoiser.setdefault("_class_name", index[attr][1])
    vae = _read_json(root / "vae" / "config.json", option) if (root / "vae" / "config.json").exists() else None
    encoders = [k for k in index if k.startswith("text_encoder") and isinstance(index[k], list) and index[k][1]]
    te = None
    if encoders:
        te = 0.0
        for k in encoders:
            cfg_path = root / k / "config.json"
            if cfg_path.exists():
                te += encoder_params(_read_json(cfg_path, option))
    return PipelineConfigs(denoiser, vae, te)


def model_kind(path: str | Path, option: str) -> tuple[str, dict, PipelineConfigs | None]:
    """('diffusion' | 'llm', config, pipeline) of a directory or a config file."""
    p = Path(path)
    if p.is_dir():
        if (p / "model_index.json").exists():
            pipe = read_pipeline(p, option)
            return "diffusion", pipe.denoiser, pipe
        if (p / "config.json").exists():
            return _kind_of(_read_json(p / "config.json", option), str(p / "config.json"), option), \
                _read_json(p / "config.json", option), None
        raise ConfigError(f"{option} {path}: neither a diffusers pipeline (model_index.json) nor a checkpoint "
                          "(config.json)")
    if p.is_file():
        config = _read_json(p, option)
        return _kind_of(config, str(p), option), config, None
    raise ConfigError(f"{option} {path}: does not exist")


def _kind_of(config: dict, where: str, option: str) -> str:
    if config.get("_class_name") in DIFFUSION_CLASSES:
        return "diffusion"
    if is_llm_config(config):
        return "llm"
    what = config.get("_class_name") or (config.get("architectures") or [config.get("model_type")])[0]
    raise ConfigError(f"{option} {where}: {what or 'this config'} is neither a denoiser the planner knows "
                      f"({', '.join(DIFFUSION_CLASSES)}) nor an LLM ({', '.join(LLM_ARCHITECTURES)})")


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def log2(x: float) -> float:
    return math.log2(x)
