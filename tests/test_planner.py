"""distgen plan (issue 18): model descriptions, each strategy's cost formula against a hand calculation,
feasibility, the fit / validation split, the issue's known reversals, the CLI.

Pure Python over JSON configs (no torch, no worker processes), except the one CLI exit-code test.
"""

from __future__ import annotations

import json
import math

import pytest

from distgen.config import ConfigError
from distgen.planner import catalog
from distgen.planner.hardware import ACCELERATORS, LINKS, accelerator, link
from distgen.planner.models import describe_denoiser, describe_llm, model_kind

A100 = ACCELERATORS["a100-80gb"]
NV3 = LINKS["nvlink3"]
PIXART = catalog.DENOISERS["PixArt-alpha"]
SDXL = catalog.DENOISERS["SDXL"]


def _pixart(res=1024):
    return describe_denoiser(PIXART, res, res, 1, catalog.SD_VAE)


# ---------------------------------------------------------------------------- hardware and links
def test_hardware_table_and_links():
    assert accelerator("A100").name == "a100-80gb"
    assert link("nvlink", accelerator("h100")).name == "nvlink4"
    assert link("pcie", accelerator("l40s")).name == "pcie4"
    assert LINKS["nvlink4"].bw == 450e9  # 900 GB/s bidirectional, halved
    for name in ("h100", "h200", "a100-80gb", "a100-40gb", "l40s", "l40", "l20", "rtx4090", "t4", "cpu"):
        assert ACCELERATORS[name].source
    with pytest.raises(ConfigError, match=r"--hardware b200: unknown hardware; known: h100, .*cpu"):
        accelerator("b200")
    with pytest.raises(ConfigError, match="--interconnect nvlink: l40 has no NVLink"):
        link("nvlink", accelerator("l40"))


# ---------------------------------------------------------------------------- model descriptions
def test_sdxl_flops_match_distrifusion_macs():
    # DistriFusion's teaser: 907 T MACs for SDXL at 1280x1920, 50 steps, guidance batch of two
    d = describe_denoiser(SDXL, 1920, 1280, 1, catalog.SD_VAE)
    macs = d.flops / 2 * 2 * 50
    assert macs == pytest.approx(907e12, rel=0.01)
    assert d.params == pytest.approx(2.57e9, rel=0.03)  # SDXL UNet: 2.57 B
    assert d.row_multiple == 4 and d.heads is None and d.tokens == 240 * 160


def test_dit_descriptions():
    d = _pixart(1024)
    assert d.params == pytest.approx(0.61e9, rel=0.05)  # PixArt-alpha XL/2: ~0.6 B
    assert (d.tokens, d.heads, d.token_rows) == (4096, 16, 64)
    # per layer: 16 d^2 per token of dense matrices + 4 S d of self-attention (+ cross-attention)
    attn = [op for op in d.ops if op.kind == "attn"]
    assert len(attn) == 28 and attn[0].flops == 4 * 4096 * 4096 * 1152
    wan = {"_class_name": "WanTransformer3DModel", "num_layers": 30, "num_attention_heads": 12, "attention_head_dim": 128,
           "ffn_dim": 8960, "patch_size": [1, 2, 2], "in_channels": 16, "text_dim": 4096}
    w = describe_denoiser(wan, 480, 832, 81)
    assert w.latent == (21, 60, 104) and w.tokens == 30 * 52 and not w.guidance_batch
    assert w.params == pytest.approx(1.42e9, rel=0.1)  # Wan2.1-T2V-1.3B
    flux = {"_class_name": "FluxTransformer2DModel", "num_layers": 19, "num_single_layers": 38,
            "num_attention_heads": 24, "attention_head_dim": 128, "in_channels": 64, "joint_attention_dim": 4096}
    fd = describe_denoiser(flux, 1024, 1024)
    assert fd.tokens == 4096 and fd.params == pytest.approx(11.9e9, rel=0.05) and not fd.in_runtime
    sd3 = {"_class_name": "SD3Transformer2DModel", "num_layers": 24, "num_attention_heads": 24,
           "attention_head_dim": 64, "patch_size": 2, "in_channels": 16, "joint_attention_dim": 4096,
           "pos_embed_max_size": 192}
    s = describe_denoiser(sd3, 1024, 1024)
    assert s.tokens == 4096 and s.params == pytest.approx(2.0e9, rel=0.12)  # SD3-medium: 2 B


def test_video_unet_descriptions():
    t2v = {"_class_name": "UNet3DConditionModel", "block_out_channels": [320, 640, 1280, 1280],
           "down_block_types": ["CrossAttnDownBlock3D"] * 3 + ["DownBlock3D"],
           "up_block_types": ["UpBlock3D"] + ["CrossAttnUpBlock3D"] * 3, "layers_per_block": 2,
           "attention_head_dim": 64, "cross_attention_dim": 1024}
    d = describe_denoiser(t2v, 256, 256, 16, catalog.SD_VAE)
    kinds = {op.kind for op in d.ops}
    assert {"tconv", "tattn", "attn", "conv"} <= kinds and d.latent == (16, 32, 32)
    assert d.params == pytest.approx(1.4e9, rel=0.15)  # ModelScope T2V UNet: ~1.4 B


def test_llm_descriptions():
    l7 = describe_llm(catalog.LLMS["Llama-2-7B"])
    assert l7.params == pytest.approx(6.74e9, rel=0.01)
    mix = describe_llm(catalog.LLMS["Mixtral-8x7B"])
    assert mix.params == pytest.approx(46.7e9, rel=0.01) and mix.active_params == pytest.approx(12.9e9, rel=0.02)
    qwen2moe = {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "hidden_size": 2048,
                "intermediate_size": 5632, "num_hidden_layers": 24, "num_attention_heads": 16,
                "num_key_value_heads": 16, "vocab_size": 151936, "num_experts": 60, "num_experts_per_tok": 4,
                "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632, "decoder_sparse_step": 1,
                "mlp_only_layers": [0]}
    q = describe_llm(qwen2moe)
    assert q.moe.sparse_layers[0] is False and all(q.moe.sparse_layers[1:])
    assert q.params == pytest.approx(14.3e9, rel=0.05)  # Qwen1.5-MoE-A2.7B: 14.3 B total
    assert q.active_params == pytest.approx(2.7e9, rel=0.35)  # "A2.7B" counts non-embedding weights
    qwen3 = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
             "intermediate_size": 6144, "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
             "head_dim": 128, "vocab_size": 151936, "num_experts": 128, "num_experts_per_tok": 8,
             "moe_intermediate_size": 768}
    q3 = describe_llm(qwen3)
    assert q3.params == pytest.approx(30.5e9, rel=0.03) and q3.head_dim == 128  # Qwen3-30B-A3B


def test_pipeline_directory_and_bad_configs(tmp_path):
    root = tmp_path / "pipe"
    for sub, cfg in (("unet", SDXL), ("vae", catalog.SD_VAE),
                     ("text_encoder", {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                                       "vocab_size": 49408})):
        (root / sub).mkdir(parents=True)
        (root / sub / "config.json").write_text(json.dumps(cfg))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline",
                                                       "unet": ["diffusers", "UNet2DConditionModel"],
                                                       "vae": ["diffusers", "AutoencoderKL"],
                                                       "text_encoder": ["transformers", "CLIPTextModel"]}))
    kind, config, pipe = model_kind(root, "--model")
    assert kind == "diffusion" and pipe.text_encoder_params == pytest.approx(123e6, rel=0.02)
    (tmp_path / "vae.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ConfigError, match=r"--model-config .*vae.json: AutoencoderKL is neither a denoiser"):
        model_kind(tmp_path / "vae.json", "--model-config")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="--model-config: .*bad.json is not a JSON config"):
        model_kind(tmp_path / "bad.json", "--model-config")
    with pytest.raises(ConfigError, match="does not exist"):
        model_kind(tmp_path / "missing", "--model")
