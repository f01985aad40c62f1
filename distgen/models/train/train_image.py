"""Train a small text-to-image model on the procedural scenes and save it as a diffusers pipeline (issue 17 part 2).

    python -m distgen.models.train.train_image --out DIR --seed 0 --steps N --device cpu|cuda --layout sd|pixart

Three stages, in order, each logged with its loss:

1. **Data**: ``--images`` scenes of :mod:`.scenes` (seed ``--seed``) rendered once at ``--resolution``
   (64 px by default) into one uint8 tensor; captions tokenized once.
2. **VAE**: an ``AutoencoderKL`` with three blocks (4x downsampling: 64 px -> 16 x 16 x 4 latents,
   0.23 M parameters, no attention), trained with L1 reconstruction + a small KL term on 32 px crops for
   ``--vae-steps``; its
   ``scaling_factor`` is set to 1 / std of the latents. ``--vae DIR`` reuses the VAE of an earlier run (so
   both layouts share one). Latent means and standard deviations of all images are then computed once.
3. **Denoiser and text encoder, jointly** (a text encoder trained from scratch with the denoiser learns
   exactly the distinctions the captions draw; a frozen random one would leave the denoiser to decode
   arbitrary features): SD layout: ``CLIPTextModel`` (causal, 2 layers, hidden 64) +
   ``UNet2DConditionModel`` (32/64/128 channels, cross-attention at 8 x 8 and 4 x 4 latents); PixArt layout:
   ``T5EncoderModel`` (2 layers, d_model 64) + ``PixArtTransformer2DModel`` (6 layers, hidden 128, patch 2).
   v-prediction on the scaled-linear DDPM schedule of the saved ``DDIMScheduler``, captions dropped to ""
   10 % of the time (classifier-free guidance), AdamW with warm-up and cosine decay, an EMA of the
   weights (what is saved).

The pipeline is saved with ``save_pretrained`` in fp16 safetensors, with ``training.json`` beside it
(arguments, parameter counts, loss curve, step times). The run is deterministic given the seed and the
thread count: seeded ``torch`` generators for initialisation, data order, noise and timesteps.

Why 64 px and a 4x VAE: the objects are flat shapes whose size is 10-17 % of the side, so 64 px draws
them cleanly (a small star spans 13 px); a 4x VAE keeps 16 x 16 latents, where an 8 x VAE at 64 px would
leave 8 x 8, too coarse for five positions and four shapes; and a 128 px image with an 8x VAE has the same
latents at four times the VAE cost. The denoiser's cost is set by the latents, so this is the cheapest
resolution that still resolves the scenes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from distgen.models.train import scenes

MAX_TOKENS = 32  # the longest caption is 19 tokens with start and end
CFG_DROPOUT = 0.1


def _log(message: str) -> None:
    print(message, flush=True)


# ----------------------------------------------------------------------------------------- models
# Denoiser sizes: "small" for an hour on 2 CPU cores, "base" for a GPU.
DENOISER_SIZES = {
    "sd": {"small": dict(block_out_channels=(32, 64, 64)), "base": dict(block_out_channels=(64, 128, 192))},
    "pixart": {"small": dict(num_layers=6, attention_head_dim=32), "base": dict(num_layers=8, attention_head_dim=48)},
}


def build_vae():
    """Fully convolutional (no mid-block attention), so it trains on crops and runs at any size."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(16, 32, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        mid_block_add_attention=False,
    )


def build_text_encoder(layout: str, tokenizer):
    vocab = len(tokenizer)
    if layout == "sd":
        from transformers import CLIPTextConfig, CLIPTextModel

        return CLIPTextModel(CLIPTextConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS, projection_dim=64, attention_dropout=0.0, dropout=0.0,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ))
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=vocab, d_model=64, d_kv=16, d_ff=256, num_layers=2, num_heads=4, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    ))


def build_denoiser(layout: str, latent_size: int, size: str = "small"):
    if layout == "sd":
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel(
            sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
            attention_head_dim=4, norm_num_groups=16, **DENOISER_SIZES["sd"][size],
        )
    from diffusers import PixArtTransformer2DModel

    config = dict(sample_size=latent_size, patch_size=2, num_attention_heads=4, in_channels=4, out_channels=4,
                  caption_channels=64, attention_bias=True, activation_fn="gelu-approximate",
                  num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                  use_additional_conditions=False, **DENOISER_SIZES["pixart"][size])
    config["cross_attention_dim"] = config["num_attention_heads"] * config["attention_head_dim"]
    return PixArtTransformer2DModel(**config)


def build_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")


def parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------------- data
def _render_chunk(job: tuple[int, int, int, int]):
    seed, start, count, resolution = job
    return scenes.dataset(seed, count, resolution, start=start)


def render_data(seed: int, count: int, resolution: int, workers: int = 1) -> tuple[torch.Tensor, list[str]]:
    """Scenes 0..count-1 of ``seed`` as uint8 (count, 3, H, W); ``workers`` processes render chunks (each scene
    depends only on (seed, index), so the result is the same for any number of workers)."""
    if workers <= 1:
        images, captions = scenes.dataset(seed, count, resolution)
    else:
        import multiprocessing

        chunk = -(-count // (4 * workers))
        jobs = [(seed, start, min(chunk, count - start), resolution) for start in range(0, count, chunk)]
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            parts = pool.map(_render_chunk, jobs)
        images = np.concatenate([p[0] for p in parts])
        captions = [c for p in parts for c in p[1]]
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), captions


def tokenize(tokenizer, texts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    out = tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    return out.input_ids, out.attention_mask


def _to_unit(batch: torch.Tensor) -> torch.Tensor:
    return batch.float().div_(127.5).sub_(1.0)


class _Batches:
    """Deterministic shuffled minibatch indices (a fresh permutation each epoch, from a seeded generator)."""

    def __init__(self, count: int, batch: int, seed: int):
        self.count, self.batch = count, batch
        self.generator = torch.Generator().manual_seed(seed)
        self.order, self.at = torch.randperm(count, generator=self.generator), 0

    def next(self) -> torch.Tensor:
        if self.at + self.batch > self.count:
            self.order, self.at = torch.randperm(self.count, generator=self.generator), 0
        index = self.order[self.at:self.at + self.batch]
        self.at += self.batch
        return index


def _lr(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


class _EMA:
    def __init__(self, modules, decay: float):
        self.modules, self.decay = modules, decay
        self.shadow = [[p.detach().clone() for p in m.parameters()] for m in modules]

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for module, shadow in zip(self.modules, self.shadow):
            for s, p in zip(shadow, module.parameters()):
                s.lerp_(p.detach(), 1 - decay)

    @torch.no_grad()
    def copy_to(self) -> None:
        for module, shadow in zip(self.modules, self.shadow):
            for s, p in zip(shadow, module.parameters()):
                p.copy_(s)


class _Progress:
    def __init__(self, stage: str, total: int, every: int):
        self.stage, self.total, self.every = stage, total, max(1, every)
        self.start_wall, self.start_cpu = time.perf_counter(), time.process_time()
        self.window: list[float] = []
        self.curve: list[tuple[int, float]] = []

    def step(self, step: int, loss: float, extra: str = "") -> None:
        self.window.append(loss)
        if (step + 1) % self.every == 0 or step + 1 == self.total:
            mean = float(np.mean(self.window))
            self.curve.append((step + 1, mean))
            self.window = []
            wall = time.perf_counter() - self.start_wall
            _log(f"[{self.stage}] step {step + 1}/{self.total} loss {mean:.5f} {extra}"
                 f"({wall / (step + 1):.3f} s/step, eta {wall / (step + 1) * (self.total - step - 1):.0f} s)")

    def summary(self) -> dict:
        steps = max(1, self.curve[-1][0] if self.curve else 1)
        wall, cpu = time.perf_counter() - self.start_wall, time.process_time() - self.start_cpu
        return {"steps": self.total, "final_loss": self.curve[-1][1] if self.curve else None, "curve": self.curve,
                "wall_s": round(wall, 2), "wall_s_per_step": round(wall / steps, 4),
                "cpu_s_per_step": round(cpu / steps, 4), "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------ stages
def train_vae(images: torch.Tensor, steps: int, batch: int, lr: float, device: torch.device, seed: int,
              log_every: int, crop: int = 32, kl_weight: float = 1e-6):
    """L1 + KL on random ``crop`` x ``crop`` crops (the VAE is convolutional: a quarter of the cost at 64 px)."""
    torch.manual_seed(seed)
    vae = build_vae().to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    batches = _Batches(len(images), batch, seed + 1)
    noise = torch.Generator(device=device).manual_seed(seed + 2)
    progress = _Progress("vae", steps, log_every)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr)
        x = _to_unit(images[batches.next()].to(device))
        if crop and crop < x.shape[-1]:
            top, left = (int(v) * 4 for v in torch.randint(0, (x.shape[-1] - crop) // 4 + 1, (2,), generator=batches.generator))
            x = x[:, :, top:top + crop, left:left + crop]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=noise, device=device)
        recon = vae.decode(z).sample
        l1 = (recon - x).abs().mean()
        loss = l1 + kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        progress.step(step, l1.item())
    vae.eval()
    return vae, progress.summary()


@torch.no_grad()
def vae_check(vae, seed: int, start: int, count: int, resolution: int, device: torch.device) -> dict:
    """The checker on VAE reconstructions of ``count`` held-out scenes (indices from ``start``): the ceiling
    the denoiser can reach through this VAE, and the sign that it needs more steps."""
    from distgen.models.train.checker import check

    images, captions = scenes.dataset(seed, count, resolution, start=start)
    x = _to_unit(torch.from_numpy(images).permute(0, 3, 1, 2).to(device))
    recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    pixels = ((recon + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    reports = [check(image, caption) for image, caption in zip(pixels, captions)]
    return {"l1": float((recon - x).abs().mean()), "adherence": float(np.mean([r.adherence for r in reports])),
            "found_with_colour": float(np.mean([r.found_with_colour for r in reports])), "scenes": count}


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, device: torch.device, batch: int = 256):
    means, stds = [], []
    for start in range(0, len(images), batch):
        posterior = vae.encode(_to_unit(images[start:start + batch].to(device))).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def _denoiser_forward(layout: str, denoiser, noisy, t, text, mask):
    if layout == "sd":
        return denoiser(noisy, t, encoder_hidden_states=text).sample
    return denoiser(noisy, encoder_hidden_states=text, timestep=t, encoder_attention_mask=mask,
                    added_cond_kwargs={"aspect_ratio": None, "resolution": None}).sample


def _encode_text(layout: str, text_encoder, ids, mask):
    if layout == "sd":  # StableDiffusionPipeline passes no mask to a CLIP text encoder
        return text_encoder(ids)[0]
    return text_encoder(ids, attention_mask=mask)[0]  # PixArtAlphaPipeline passes the mask to both


def _v_noised(alphas: torch.Tensor, x0: torch.Tensor, generator: torch.Generator):
    """(noised latents, timesteps, v-prediction target) for a batch (noise, then timesteps, drawn in that order)."""
    b = x0.shape[0]
    eps = torch.randn(x0.shape, generator=generator, device=x0.device)
    t = torch.randint(0, len(alphas), (b,), generator=generator, device=x0.device)
    a = alphas[t].view(b, *([1] * (x0.dim() - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * eps, t, a.sqrt() * eps - (1 - a).sqrt() * x0


def _optimizer_step(opt, loss: torch.Tensor, modules, ema: "_EMA", step: int) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for m in modules for p in m.parameters()], 1.0)
    opt.step()
    ema.update(step)


def train_denoiser(layout: str, latents: tuple[torch.Tensor, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor,
                   empty: tuple[torch.Tensor, torch.Tensor], tokenizer, scaling: float, steps: int, batch: int,
                   lr: float, device: torch.device, seed: int, log_every: int, size: str = "small",
                   ema_decay: float = 0.999):
    torch.manual_seed(seed + 10)
    text_encoder = build_text_encoder(layout, tokenizer).to(device).train()
    denoiser = build_denoiser(layout, latents[0].shape[-1], size).to(device).train()
    scheduler = build_scheduler()
    alphas = scheduler.alphas_cumprod.to(device)
    modules = [text_encoder, denoiser]
    opt = torch.optim.AdamW([p for m in modules for p in m.parameters()], lr=lr, weight_decay=0.01)
    ema = _EMA(modules, ema_decay)
    batches = _Batches(len(ids), batch, seed + 11)
    generator = torch.Generator(device=device).manual_seed(seed + 12)
    means, stds = latents
    empty_ids, empty_mask = (e.to(device) for e in empty)
    progress = _Progress(f"{layout} denoiser", steps, log_every)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr)
        index = batches.next()
        mean, std = means[index].to(device), stds[index].to(device)
        b = len(index)
        x0 = (mean + std * torch.randn(mean.shape, generator=generator, device=device)) * scaling
        noisy, t, target = _v_noised(alphas, x0, generator)
        drop = torch.rand(b, generator=generator, device=device) < CFG_DROPOUT
        batch_ids = torch.where(drop[:, None], empty_ids, ids[index].to(device))
        batch_mask = torch.where(drop[:, None], empty_mask, mask[index].to(device))
        text = _encode_text(layout, text_encoder, batch_ids, batch_mask)
        pred = _denoiser_forward(layout, denoiser, noisy, t, text, batch_mask)
        loss = F.mse_loss(pred, target)
        _optimizer_step(opt, loss, modules, ema, step)
        progress.step(step, loss.item())
    ema.copy_to()
    for m in modules:
        m.eval()
    return text_encoder, denoiser, scheduler, progress.summary()


# ------------------------------------------------------------------------------------------ saving
def assemble(layout: str, vae, text_encoder, tokenizer, denoiser, scheduler):
    if layout == "sd":
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=denoiser,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    from diffusers import PixArtAlphaPipeline

    return PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=denoiser,
                               scheduler=scheduler)


def save(pipe, out: Path, record: dict) -> None:
    from distgen.models.tiny import save_pipeline

    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # "fp16 cannot run on cpu": it is stored in fp16, loaded as asked
    try:
        pipe.to("cpu", torch.float16)
    finally:
        diffusers_logging.set_verbosity(level)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    save_pipeline(pipe, out)
    (out / "training.json").write_text(json.dumps(record, indent=1))


def load_vae(directory: str | os.PathLike, device: torch.device):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(Path(directory) / "vae", dtype=torch.float32).to(device).eval()


@torch.no_grad()
def sample(directory: str | os.PathLike, prompts: list[str], steps: int = 20, guidance: float = 4.0, seed: int = 0,
           size: int = 64):
    """Generate with the saved pipeline through ``from_pretrained`` (what a user's checkpoint takes)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(directory), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                  generator=torch.Generator().manual_seed(seed))
    if type(pipe).__name__.startswith("PixArt"):
        kwargs.update(use_resolution_binning=False, clean_caption=False)
    return pipe(prompts, **kwargs).images


# --------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m distgen.models.train.train_image", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="pipeline directory to write")
    p.add_argument("--layout", default="sd", choices=("sd", "pixart"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=2000, help="denoiser + text encoder steps")
    p.add_argument("--vae-steps", type=int, default=None, help="VAE steps (default: a quarter of --steps, at least 50)")
    p.add_argument("--vae", default=None, help="reuse the VAE of this pipeline directory instead of training one")
    p.add_argument("--images", type=int, default=10000, help="scenes rendered for training")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-crop", type=int, default=32, help="VAE trains on random crops of this side (0: whole images)")
    p.add_argument("--size", default="small", choices=("small", "base"),
                   help="denoiser size: small (CPU, ~1.7 M parameters) or base (GPU)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    p.add_argument("--workers", type=int, default=1, help="processes rendering the scenes (same data for any number)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--sample", type=int, default=4, help="after saving, generate this many images from fixed "
                   "captions into DIR/samples.png and score them with the checker (0: skip)")
    args = p.parse_args(argv)
    if args.resolution % 16:
        p.error(f"--resolution {args.resolution} must be a multiple of 16 (VAE 4 x UNet 4)")
    if args.images < args.batch or args.images < args.vae_batch:
        p.error("--images must be at least --batch and --vae-batch")
    if args.vae_steps is None:
        args.vae_steps = max(50, args.steps // 4)
    return args


SAMPLE_PROMPTS = (
    "a red circle and a blue square on a yellow background",
    "a large green triangle on the left on a white background",
    "two blue stars side by side on a black background",
    "a small yellow circle above a purple square on a white background",
    "a large orange square in the center on a blue background",
    "a white star at the top on a red background",
    "a black circle to the right of a green triangle on a white background",
    "two red squares one above the other on a yellow gradient background",
)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    out = Path(args.out)
    record: dict = {"args": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads()}
    started = time.perf_counter()

    t0 = time.perf_counter()
    images, captions = render_data(args.seed, args.images, args.resolution, args.workers)
    tokenizer = scenes.build_tokenizer(MAX_TOKENS)
    ids, mask = tokenize(tokenizer, captions, MAX_TOKENS)
    empty = tuple(x[0] for x in tokenize(tokenizer, [""], MAX_TOKENS))
    record["data"] = {"images": len(images), "resolution": args.resolution, "render_s": round(time.perf_counter() - t0, 2)}
    _log(f"[data] {len(images)} scenes at {args.resolution} px rendered in {record['data']['render_s']} s")

    if args.vae:
        vae = load_vae(args.vae, device)
        record["vae"] = {"from": str(args.vae)}
        _log(f"[vae] reused from {args.vae}")
    else:
        vae, record["vae"] = train_vae(images, args.vae_steps, args.vae_batch, args.vae_lr, device, args.seed,
                                       args.log_every, args.vae_crop)
    record["vae"]["parameters"] = parameters(vae)
    record["vae"]["held_out"] = vae_check(vae, args.seed, args.images, 32, args.resolution, device)
    _log(f"[vae] held-out reconstructions: L1 {record['vae']['held_out']['l1']:.4f}, checker adherence "
         f"{record['vae']['held_out']['adherence']:.2f}, found with the right colour "
         f"{record['vae']['held_out']['found_with_colour']:.2f}")
    t0 = time.perf_counter()
    means, stds = encode_latents(vae, images, device)
    if not args.vae:
        scale = float(1.0 / means.std())
        vae.register_to_config(scaling_factor=scale)
    scaling = float(vae.config.scaling_factor)
    record["latents"] = {"shape": list(means.shape[1:]), "scaling_factor": scaling,
                         "encode_s": round(time.perf_counter() - t0, 2)}
    _log(f"[latents] {tuple(means.shape)} encoded in {record['latents']['encode_s']} s, scaling factor {scaling:.4f}")
    for p in vae.parameters():
        p.requires_grad_(False)

    text_encoder, denoiser, scheduler, record["denoiser"] = train_denoiser(
        args.layout, (means, stds), ids, mask, empty, tokenizer, scaling, args.steps, args.batch, args.lr, device,
        args.seed, args.log_every, args.size)
    record["denoiser"]["parameters"] = parameters(denoiser)
    record["text_encoder"] = {"parameters": parameters(text_encoder), "class": type(text_encoder).__name__}
    record["total_s"] = round(time.perf_counter() - started, 1)

    pipe = assemble(args.layout, vae, text_encoder, tokenizer, denoiser, scheduler)
    save(pipe, out, record)
    size = sum(f.stat().st_size for f in out.rglob("*.safetensors"))
    _log(f"[save] {out} ({size / 1e6:.2f} MB of fp16 safetensors; denoiser {record['denoiser']['parameters'] / 1e6:.2f} M, "
         f"text encoder {record['text_encoder']['parameters'] / 1e6:.2f} M, vae {record['vae']['parameters'] / 1e6:.2f} M "
         f"parameters) in {record['total_s']} s")

    if args.sample:
        from distgen.models.train.checker import check

        prompts = list(SAMPLE_PROMPTS[:args.sample])
        generated = sample(out, prompts, size=args.resolution, seed=args.seed)
        reports = [check(img, prompt).summary() for img, prompt in zip(generated, prompts)]
        strip = np.concatenate([np.asarray(img) for img in generated], axis=1)
        from PIL import Image

        Image.fromarray(strip).save(out / "samples.png")
        adherence = float(np.mean([r["adherence"] for r in reports]))
        found = float(np.mean([r["found_with_colour"] for r in reports]))
        record["samples"] = {"prompts": prompts, "adherence": adherence, "found_with_colour": found}
        (out / "training.json").write_text(json.dumps(record, indent=1))
        _log(f"[sample] {len(prompts)} images -> {out / 'samples.png'}; checker adherence {adherence:.2f}, "
             f"found with the right colour {found:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
