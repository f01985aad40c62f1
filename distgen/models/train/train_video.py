"""Train a small text-to-video model (ModelScope ``UNet3DConditionModel`` layout) on moving-shape clips (issue 17 part 3).

    python -m distgen.models.train.train_video --out DIR --image DIR_SD --seed 0 --steps N --device cpu|cuda

Reuses the VAE, tokenizer and text encoder of an SD-layout image pipeline trained by :mod:`.train_image`
(``--image``): the VAE is frame-wise and frozen; the text encoder is fine-tuned jointly with the UNet
(its motion words never occurred in the image captions). Data: ``--clips`` clips of :func:`.scenes.sample_clip`
of ``--frames`` frames, rendered once, encoded frame by frame once. Training: v-prediction on the same
schedule as the image model, captions dropped 10 % of the time, EMA weights saved. The pipeline is a
``TextToVideoSDPipeline`` in fp16 safetensors, with ``training.json`` beside it.

A skeleton: it trains, saves and loads (tests/test_train_video.py is not written yet); the step counts
that make the motion legible are still to be found.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from distgen.models.train import scenes
from distgen.models.train.train_image import (CFG_DROPOUT, MAX_TOKENS, _EMA, _Batches, _log, _lr, _optimizer_step,
                                              _Progress, _v_noised,
                                              _to_unit, build_scheduler, parameters, save, tokenize)

DENOISER_SIZES = {"small": dict(block_out_channels=(32, 64, 64)), "base": dict(block_out_channels=(64, 128, 128))}


def build_unet3d(latent_size: int, cross_attention_dim: int, size: str = "small"):
    from diffusers import UNet3DConditionModel

    return UNet3DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=1,
        down_block_types=("DownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D"),
        up_block_types=("CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "UpBlock3D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=16, **DENOISER_SIZES[size],
    )


def render_clips(seed: int, count: int, frames: int, resolution: int) -> tuple[torch.Tensor, list[str]]:
    """uint8 (count, frames, 3, H, W) and captions."""
    out = torch.empty((count, frames, 3, resolution, resolution), dtype=torch.uint8)
    captions = []
    for k in range(count):
        clip = scenes.sample_clip(seed, k, frames)
        out[k] = torch.from_numpy(scenes.render_clip(clip, resolution)).permute(0, 3, 1, 2)
        captions.append(clip.caption)
    return out, captions


@torch.no_grad()
def encode_clips(vae, clips: torch.Tensor, device, batch: int = 256):
    """Frame-wise posterior means and stds, laid out (count, C, frames, h, w) as UNet3D takes them."""
    n, f = clips.shape[:2]
    frames = clips.reshape(n * f, *clips.shape[2:])
    means, stds = [], []
    for start in range(0, len(frames), batch):
        posterior = vae.encode(_to_unit(frames[start:start + batch].to(device))).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    shape = lambda x: torch.cat(x).reshape(n, f, *x[0].shape[1:]).permute(0, 2, 1, 3, 4).contiguous()  # noqa: E731
    return shape(means), shape(stds)


def train(args) -> dict:
    from diffusers import AutoencoderKL, TextToVideoSDPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    device = torch.device(args.device)
    image = Path(args.image)
    record: dict = {"args": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads()}
    vae = AutoencoderKL.from_pretrained(image / "vae", dtype=torch.float32).to(device).eval()
    tokenizer = CLIPTokenizer.from_pretrained(image / "tokenizer")
    torch.manual_seed(args.seed)
    text_encoder = CLIPTextModel.from_pretrained(image / "text_encoder", dtype=torch.float32).to(device).train()

    t0 = time.perf_counter()
    clips, captions = render_clips(args.seed, args.clips, args.frames, args.resolution)
    ids, mask = tokenize(tokenizer, captions, MAX_TOKENS)
    empty_ids = tokenize(tokenizer, [""], MAX_TOKENS)[0][0].to(device)
    means, stds = encode_clips(vae, clips, device)
    record["data"] = {"clips": len(clips), "frames": args.frames, "resolution": args.resolution,
                      "render_encode_s": round(time.perf_counter() - t0, 2)}
    _log(f"[data] {len(clips)} clips of {args.frames} frames rendered and encoded in {record['data']['render_encode_s']} s")
    scaling = float(vae.config.scaling_factor)

    torch.manual_seed(args.seed + 10)
    unet = build_unet3d(means.shape[-1], text_encoder.config.hidden_size, args.size).to(device).train()
    scheduler = build_scheduler()
    alphas = scheduler.alphas_cumprod.to(device)
    modules = [text_encoder, unet]
    opt = torch.optim.AdamW([p for m in modules for p in m.parameters()], lr=args.lr, weight_decay=0.01)
    ema = _EMA(modules, 0.999)
    batches = _Batches(len(clips), args.batch, args.seed + 11)
    generator = torch.Generator(device=device).manual_seed(args.seed + 12)
    progress = _Progress("t2v unet", args.steps, args.log_every)
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, args.steps, args.lr)
        index = batches.next()
        b = len(index)
        mean, std = means[index].to(device), stds[index].to(device)
        x0 = (mean + std * torch.randn(mean.shape, generator=generator, device=device)) * scaling
        noisy, t, target = _v_noised(alphas, x0, generator)
        drop = torch.rand(b, generator=generator, device=device) < CFG_DROPOUT
        batch_ids = torch.where(drop[:, None], empty_ids, ids[index].to(device))
        text = text_encoder(batch_ids)[0]
        loss = F.mse_loss(unet(noisy, t, encoder_hidden_states=text).sample, target)
        _optimizer_step(opt, loss, modules, ema, step)
        progress.step(step, loss.item())
    ema.copy_to()
    for m in modules:
        m.eval()
    record["unet"] = {**progress.summary(), "parameters": parameters(unet)}
    record["text_encoder"] = {"parameters": parameters(text_encoder), "from": str(image)}
    pipe = TextToVideoSDPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
    save(pipe, Path(args.out), record)
    _log(f"[save] {args.out}: UNet3D {record['unet']['parameters'] / 1e6:.2f} M parameters, "
         f"final loss {record['unet']['final_loss']:.5f}")
    return record


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m distgen.models.train.train_video", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--image", required=True, help="SD-layout pipeline of train_image (its VAE, tokenizer, text encoder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--clips", type=int, default=2000)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--size", default="small", choices=tuple(DENOISER_SIZES))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--log-every", type=int, default=50)
    args = p.parse_args(argv)
    if args.clips < args.batch:
        p.error("--clips must be at least --batch")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
