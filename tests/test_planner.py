"""distgen plan (issue 18): model descriptions, each strategy's cost formula against a hand calculation,
feasibility, the fit / validation split, the issue's known reversals, the CLI.

Pure Python over JSON configs (no torch, no worker processes), except the one CLI exit-code test.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest

from distgen.config import ConfigError
from distgen.planner import Request, catalog, factors, plan
from distgen.planner.costs import Comm, Env, Layout, diffusion_cost, diffusion_step, settle, text_cost
from distgen.planner.factors import Factors
from distgen.planner.hardware import ACCELERATORS, LINKS, accelerator, link
from distgen.planner.models import describe_denoiser, describe_llm, model_kind

A100 = ACCELERATORS["a100-80gb"]
NV3 = LINKS["nvlink3"]
PIXART = catalog.DENOISERS["PixArt-alpha"]
SDXL = catalog.DENOISERS["SDXL"]


def _env(hw=A100, ln=NV3, **values) -> Env:
    f = Factors()
    f.values.update({k.replace("__", "."): v for k, v in values.items()})
    return Env(hw, ln, f)


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
    assert fd.tokens == 4096 and fd.params == pytest.approx(11.9e9, rel=0.05) and fd.in_runtime
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


# ---------------------------------------------------------------------------- cost formulas by hand
def test_comm_time_and_settle():
    env = _env(alpha__nvlink__nccl=10e-6, eta__nvlink__nccl=0.5, overlap=1.0)
    c = Comm("x", "all_reduce", 300e6, 3, NV3, "blocking", group=4)
    assert c.seconds(env.factors) == pytest.approx(3 * 10e-6 + 300e6 / (300e9 * 0.5))
    # async: hidden behind up to overlap x compute; the rest is exposed
    step = settle(1e-3, [Comm("a", "all_gather", 600e6, 1, NV3, "async")], env.factors)
    t = 10e-6 + 600e6 / 150e9
    assert step.hidden_s == pytest.approx(1e-3) and step.exposed_s == pytest.approx(t - 1e-3)
    # windowed: each call behind its own window
    step = settle(0.0, [Comm("w", "p2p", 4 * 15e6, 4, NV3, "window", window_s=50e-6)], env.factors)
    per = 10e-6 + 15e6 / 150e9
    assert step.exposed_s == pytest.approx(4 * (per - 50e-6))
    # an all-to-all across PCIe sockets (more than 4 ranks) uses its own efficiency
    pcie = LINKS["pcie4"]
    env2 = _env(eta__pcie__nccl=0.8, eta__pcie__a2a=0.1, alpha__pcie__nccl=0.0)
    assert Comm("a", "all_to_all", 1e9, 1, pcie, "blocking", group=8).seconds(env2.factors) == \
        pytest.approx(1e9 / (31.5e9 * 0.1))
    assert Comm("a", "all_to_all", 1e9, 1, pcie, "blocking", group=4).seconds(env2.factors) == \
        pytest.approx(1e9 / (31.5e9 * 0.8))


def _attn_bytes(d, n, per_layer):
    return sum(per_layer(op) for op in d.ops if op.kind == "attn")


def test_cfg_and_patch_formulas():
    d = _pixart(1024)
    env = _env(op__dit=0.0)
    one = diffusion_step(d, Layout(), env, True, False)
    cfg = diffusion_step(d, Layout(cfg=2), env, True, False)
    assert cfg.compute_s == pytest.approx(one.compute_s / 2)
    gather = next(c for c in cfg.comms if c.what == "cfg output all_gather")
    assert gather.sent_bytes == 128 * 128 * 8 * 2 * 1  # 1024 px latent of one sample, bf16 (out_channels 8)
    n, dt, b = 4, 2, 2
    disp = diffusion_step(d, Layout(patch=n), env, True, False)
    kv = next(c for c in disp.comms if c.what == "self-attention K/V")
    assert kv.sent_bytes == pytest.approx(28 * (n - 1) * 2 * (4096 / n) * 1152 * dt * b)
    assert kv.mode == "async" and kv.calls == 28
    sync = diffusion_step(d, Layout(patch=n, patch_mode="sync"), env, True, False)
    assert all(c.mode == "blocking" for c in sync.comms) and sync.exposed_s > disp.exposed_s
    warm = diffusion_step(d, Layout(patch=n), env, True, True)  # a warmup step of displaced waits like sync
    assert warm.exposed_s == pytest.approx(sync.exposed_s)
    part = diffusion_step(d, Layout(patch=n, patch_mode="partial", pcpp_fraction=0.3), env, True, False)
    rows = next(c for c in part.comms if c.what == "partial K/V rows")
    used = math.ceil(0.3 * 64 / n)  # rows of each neighbour band attended
    assert rows.sent_bytes == pytest.approx(28 * 2 * used * 64 * 2 * 1152 * dt * b)
    naive = diffusion_step(d, Layout(patch=n, patch_mode="naive"), env, True, False)
    attn = sum(op.flops for op in d.ops if op.kind == "attn") * b
    assert disp.compute_s - naive.compute_s == pytest.approx(
        (attn / n - attn / n ** 2) / (A100.flops * env.factors["compute.dit"]))
    assert [c.what for c in naive.comms] == ["patch output all_gather"]


def test_patch_bytes_match_this_machines_benchmark():
    """README's dit-bench run (2 ranks, 128 px, fp32, guidance on): bytes sent per rank per step measured
    33.7 MB displaced, 10.6 MB partial (0.3), 0.13 MB naive. At 2 ranks each rank has one neighbour."""
    dit_bench = {"_class_name": "PixArtTransformer2DModel", "sample_size": 16, "num_layers": 8, "patch_size": 2,
                 "num_attention_heads": 8, "attention_head_dim": 64, "in_channels": 4, "out_channels": 8,
                 "caption_channels": 32}
    d = describe_denoiser(dit_bench, 128, 128, 1, {"block_out_channels": [16, 32], "layers_per_block": 1})
    assert d.tokens == 1024
    env = _env(hw=ACCELERATORS["cpu"], ln=LINKS["shm"])
    sent = {mode: sum(c.sent_bytes for c in diffusion_step(d, Layout(patch=2, patch_mode=mode), env, True, False).comms)
            for mode in ("displaced", "partial", "naive")}
    assert sent["displaced"] == pytest.approx(33.7e6, rel=0.01)
    assert sent["partial"] == pytest.approx(10.6e6, rel=0.02)
    assert sent["naive"] == pytest.approx(0.13e6, rel=0.05)


def test_sequence_parallel_formulas():
    d = _pixart(1024)
    env = _env()
    n, dt, b = 4, 2, 2
    uly = diffusion_step(d, Layout(sp=n), env, True, False)
    a2a = next(c for c in uly.comms if c.op == "all_to_all")
    shard = 4096 / n * 1152 * dt * b
    assert a2a.sent_bytes == pytest.approx(28 * 4 * (n - 1) / n * shard) and a2a.mode == "blocking"
    ring = diffusion_step(d, Layout(sp=n, sp_mode="ring"), env, True, False)
    kv = next(c for c in ring.comms if c.what == "ring K/V blocks")
    assert kv.sent_bytes == pytest.approx(28 * (n - 1) * 2 * (4096 / n) * 1152 * dt * b) and kv.mode == "window"
    # README: ring moves N/2 times the bytes of ulysses (equal at N=2)
    assert kv.sent_bytes / a2a.sent_bytes == pytest.approx(n / 2)


def test_clip_formulas():
    t2v = {"_class_name": "UNet3DConditionModel", "block_out_channels": [64, 128],
           "down_block_types": ["CrossAttnDownBlock3D", "DownBlock3D"],
           "up_block_types": ["UpBlock3D", "CrossAttnUpBlock3D"], "layers_per_block": 1, "attention_head_dim": 8,
           "cross_attention_dim": 64}
    d = describe_denoiser(t2v, 128, 128, 32, catalog.SD_VAE)
    env = _env()
    n, dt, b = 4, 2, 2
    tattn = [op for op in d.ops if op.kind == "tattn"]
    exact = diffusion_step(d, Layout(clip=n, clip_mode="exact"), env, True, False)
    kv = next(c for c in exact.comms if c.what == "temporal K/V all_gather")
    assert kv.sent_bytes == pytest.approx(sum((n - 1) * 2 * 8 * op.tokens * op.dim * dt * b for op in tattn))
    dual = diffusion_step(d, Layout(clip=n, clip_mode="dual-scope", local_frames=4, global_frames=8), env, True, False)
    local = next(c for c in dual.comms if c.what == "local window K/V")
    glob = next(c for c in dual.comms if c.what == "global frames K/V")
    assert local.sent_bytes == pytest.approx(sum(2 * 4 * op.tokens * 2 * op.dim * dt * b for op in tattn))
    assert glob.sent_bytes == pytest.approx(sum((n - 1) * 2 * 2 * op.tokens * op.dim * dt * b for op in tattn))
    naive = diffusion_step(d, Layout(clip=n, clip_mode="naive"), env, True, False)
    assert [c.what for c in naive.comms] == ["clip output all_gather"]
    assert naive.compute_s < dual.compute_s < exact.compute_s * 1.01


def test_tensor_ladder_pipeline_expert_formulas():
    l7 = describe_llm(catalog.LLMS["Llama-2-7B"])
    env = _env(layer__llm=0.0, overlap=1.0, alpha__nvlink__nccl=20e-6, eta__nvlink__nccl=0.5, mem=0.5)
    one = text_cost(l7, Layout(), env, batch=1, prompt=8, gen=2)
    # batch-1 decode reads every weight once: bytes / (bandwidth x mem)
    weights = (l7.params - l7.vocab * l7.hidden) + l7.vocab * l7.hidden  # embedding counted through the head
    assert one.decode_step_s == pytest.approx(
        (weights * 2 + 1 * (8 + 1) * l7.kv_bytes_per_token(2)) / (A100.mem_bw * 0.5), rel=0.02)
    tp = text_cost(l7, Layout(tp=4), env, batch=1, prompt=8, gen=2)
    ar = 20e-6 + 2 * 3 / 4 * 4096 * 2 / (300e9 * 0.5)  # one all-reduce of one token's hidden state
    assert tp.decode_step_s - (one.decode_step_s / 4) == pytest.approx(64 * ar + (20e-6 * 2), rel=0.1)
    ladder = text_cost(l7, Layout(tp=4, ladder=True), env, batch=1, prompt=8, gen=2)
    assert ladder.decode_step_s < tp.decode_step_s and ladder.hidden_share > 0.5 and not ladder.exact
    assert not text_cost(l7, Layout(tp=4, ladder=True), env, 1, 8, 2, ladder_checkpoint=False).feasible
    # pp: a decode round is max(micro-batches, stages) stage times; one sequence gains nothing
    pp = text_cost(l7, Layout(pp=4), env, batch=1, prompt=8, gen=2)
    assert pp.decode_step_s == pytest.approx(one.decode_step_s, rel=0.05)
    pp8 = text_cost(l7, Layout(pp=4), env, batch=8, prompt=8, gen=2)
    one8 = text_cost(l7, Layout(), env, batch=8, prompt=8, gen=2)
    assert pp8.memory["weights"] == pytest.approx(one8.memory["weights"] / 4, rel=0.1)
    # ep: three all-to-alls per MoE layer; experts split over the ranks
    mix = describe_llm(catalog.LLMS["Mixtral-8x7B"])
    ep = text_cost(mix, Layout(ep=4), env, batch=4, prompt=8, gen=2)
    assert ep.feasible and ep.memory["weights"] < text_cost(mix, Layout(), env, 4, 8, 2).memory["weights"] / 2
    assert text_cost(l7, Layout(ep=2), env).reason.startswith("ep=2: LlamaForCausalLM is a dense model")


def test_memory_and_feasibility():
    env = _env()
    d = _pixart(8192)
    disp = diffusion_cost(d, Layout(patch=8), env, 20)
    kv_full = 28 * 2 * 512 ** 2 * 1152 * 2 * 2  # every layer's K/V of the whole image (512^2 tokens), bf16, batch 2
    assert disp.memory["exchange_buffers"] == pytest.approx(2 * kv_full / 1e9)
    assert not disp.feasible and disp.reason.startswith("memory:")  # the published OOM
    assert diffusion_cost(d, Layout(sp=8), env, 20).feasible
    small = _pixart(1024)
    assert "heads are not divisible by 3" in diffusion_cost(small, Layout(sp=3), env, 20).reason
    assert diffusion_cost(small, Layout(sp=3, sp_mode="ring"), env, 20).feasible
    assert "more ranks than bands" in diffusion_cost(describe_denoiser(PIXART, 64, 64), Layout(patch=8), env, 20).reason
    assert "latent rows are not a multiple" in diffusion_cost(small, Layout(patch=3), env, 20).reason
    assert "needs a DiT" in diffusion_cost(describe_denoiser(SDXL, 1024, 1024), Layout(sp=2), env, 20).reason
    assert diffusion_cost(small, Layout(cfg=2), env, 20, guidance=False).reason == "cfg=2: guidance is off"
    l70 = describe_llm(catalog.LLMS["Llama-3.1-70B"])
    assert "KV heads 8" in text_cost(l70, Layout(tp=16), env).reason
    assert text_cost(l70, Layout(tp=1), env).reason.startswith("memory: 14")


# ---------------------------------------------------------------------------- fit / validation
@pytest.fixture(scope="module")
def cases():
    from distgen.planner.published import load_cases

    try:
        return load_cases()
    except ConfigError as exc:
        pytest.skip(str(exc))


def test_fit_and_validation_split_by_source(cases):
    from distgen.planner.fit import STAGES

    fit_sources = {c.source for c in cases if c.split == "fit"}
    val_sources = {c.source for c in cases if c.split == "validate"}
    assert fit_sources and val_sources and not fit_sources & val_sources
    for stage in STAGES:
        assert all(c.split == "fit" for c in stage.rows(cases)), stage.name
    fitted = factors.load()
    for key, sources in fitted.fitted_on.items():
        assert set(sources) <= fit_sources, key
    assert len(cases) == 515


def test_fitted_factors_are_reproducible(cases):
    """fitted.py is what the fit gives on the fitting rows (rerun `distgen plan --fit` after a change)."""
    from distgen.planner import fit

    refit, _ = fit.fit(cases)
    committed = factors.load()
    assert set(refit.fitted_on) == set(committed.fitted_on)
    for key in refit.fitted_on:
        assert refit[key] == pytest.approx(committed[key], rel=2e-3), key


def test_validation_report(cases):
    from distgen.planner import fit

    report = fit.evaluate(cases, factors.load())
    assert set(report["domains"]) == {"image-unet", "image-dit", "video", "llm-tp", "collective", "moe"}
    v = report["validation"]
    assert v["rows"] > 200 and v["median_ape_pct"] is not None and v["tables"] > 30
    for t in report["tables"]:
        assert t["split"] in ("fit", "validate")


# ---------------------------------------------------------------------------- the known reversals
def _best(desc, layouts, env, steps=20):
    costs = {lay.label(): diffusion_cost(desc, lay, env, steps) for lay in layouts}
    return min((c.latency_s, k) for k, c in costs.items() if c.feasible)[1]


DIT_8 = (Layout(patch=8), Layout(sp=8), Layout(sp=8, sp_mode="ring"), Layout(pipefusion=8), Layout(dit_tp=8))
DIT_4 = (Layout(patch=4), Layout(sp=4), Layout(sp=4, sp_mode="ring"), Layout(pipefusion=4), Layout(dit_tp=4))


def test_reversal_distrifusion_best_at_1024_on_8_a100_nvlink():
    env = Env(A100, NV3, factors.load())
    assert _best(_pixart(1024), DIT_8, env) == "patch=8 --patch-mode displaced"


@pytest.mark.xfail(strict=True, reason="the model puts displaced, ulysses and ring within 2 % of each other at "
                                       "2048-4096 px and does not pick Ulysses (published: Ulysses from 2048)")
def test_reversal_ulysses_best_from_2048_on_8_a100_nvlink():
    env = Env(A100, NV3, factors.load())
    assert _best(_pixart(2048), DIT_8, env) == "sp=8 --sp-mode ulysses"
    assert _best(_pixart(4096), DIT_8, env) == "sp=8 --sp-mode ulysses"


@pytest.mark.parametrize("res", [1024, 2048])
def test_reversal_pipefusion_best_on_4_a100_pcie(res):
    env = Env(ACCELERATORS["a100-80gb-pcie"], LINKS["pcie4"], factors.load())
    assert _best(_pixart(res), DIT_4, env) == "pipefusion=4"


def test_reversal_tp_slower_than_one_gpu_for_pixart_1024_on_pcie():
    env = Env(ACCELERATORS["a100-80gb-pcie"], LINKS["pcie4"], factors.load())
    d = _pixart(1024)
    assert diffusion_cost(d, Layout(dit_tp=4), env, 20).latency_s > diffusion_cost(d, Layout(), env, 20).latency_s


@pytest.mark.xfail(strict=True, reason="NCCL through host memory (NCCL_P2P_DISABLE=1) has no fitting rows: its "
                                       "per-call cost is a prior, independent of the ranks, so TP8 still wins")
def test_reversal_tp8_without_p2p_slower_than_tp4_for_llama70b():
    env = Env(ACCELERATORS["h100"], LINKS["pcie5-host"], factors.load())
    l70 = describe_llm(catalog.LLMS["Llama-3.1-70B"])
    tp4, tp8 = (text_cost(l70, Layout(tp=t), env, batch=1, prompt=1024, gen=512).latency_s for t in (4, 8))
    assert tp8 > tp4


# ---------------------------------------------------------------------------- planning and the CLI
def test_plan_json_ranked(tmp_path):
    cfg = tmp_path / "pixart.json"
    cfg.write_text(json.dumps(PIXART))
    out = plan(None, str(cfg), 8, "a100-80gb", "nvlink", Request("image", 1024, 1024, 20))
    plans = out["plans"]
    feasible = [p for p in plans if p["feasible"]]
    assert feasible and all(p["feasible"] for p in plans[:len(feasible)])
    lat = [p["predicted_latency_s"] for p in feasible]
    assert lat == sorted(lat)
    first = plans[0]
    for key in ("parallel", "feasible", "reason", "predicted_latency_s", "memory_per_gpu_gb",
                "bytes_per_step_per_link", "communication_hidden_share", "options", "exact"):
        assert key in first
    assert {p["parallel"] for p in plans} >= {"patch=8", "sp=8", "cfg=2,patch=4", "cfg=2,sp=4"}
    assert all(p["in_runtime"] for p in plans)  # DiT tp and USP only with --include-unimplemented
    text = tmp_path / "llama.json"
    text.write_text(json.dumps(catalog.LLMS["Llama-3.1-70B"]))
    out = plan(None, str(text), 8, "h100", None, Request("text", batch=4))
    top = out["plans"][0]
    assert top["parallel"] == "tp=8" and top["ttft_s"] > 0 and top["decode_step_s"] > 0
    assert any(p["options"].get("--ladder-layers") and not p["feasible"] for p in out["plans"])


def test_plan_errors(tmp_path):
    cfg = tmp_path / "pixart.json"
    cfg.write_text(json.dumps(PIXART))
    req = Request("image", 1024, 1024, 20)
    with pytest.raises(ConfigError, match="--gpus must be a positive"):
        plan(None, str(cfg), 0, "h100", None, req)
    with pytest.raises(ConfigError, match="--hardware mi300x: unknown hardware; known:"):
        plan(None, str(cfg), 2, "mi300x", None, req)
    unet = tmp_path / "sdxl.json"
    unet.write_text(json.dumps(SDXL))
    with pytest.raises(ConfigError, match="--gpus 7: no plan can run this model on 7 GPUs: .*patch=7"):
        plan(None, str(unet), 7, "h100", None, req)
    with pytest.raises(ConfigError, match="--nodes 3"):
        plan(None, str(cfg), 8, "h100", None, req, nodes=3, inter_node="ib-ndr")
    with pytest.raises(ConfigError, match="--workload text: .* is a PixArtTransformer2DModel denoiser"):
        plan(None, str(cfg), 2, "h100", None, Request("text"))


def test_cli_parser_and_exit_code(tmp_path, capsys):
    from distgen.cli.plan import register_plan

    cfg = tmp_path / "pixart.json"
    cfg.write_text(json.dumps(PIXART))
    parser = argparse.ArgumentParser()
    register_plan(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["plan", "--model-config", str(cfg), "--gpus", "2", "--hardware", "l40s", "--json"])
    assert args.handler(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["interconnect"] == "pcie4" and out["plans"][0]["feasible"]
    from distgen.cli import main

    assert main(["plan", "--model-config", str(cfg), "--gpus", "2", "--hardware", "nope"]) == 2
    assert "--hardware nope: unknown hardware" in capsys.readouterr().err


def test_op_groups_are_never_another_models():
    """The op-group cache is keyed by id(): an id freed and reused by another description (which made
    test_clip_formulas fail in a long suite) must not hand back the first model's ops."""
    from distgen.planner import costs

    t2v = {"_class_name": "UNet3DConditionModel", "block_out_channels": [64, 128],
           "down_block_types": ["CrossAttnDownBlock3D", "DownBlock3D"],
           "up_block_types": ["UpBlock3D", "CrossAttnUpBlock3D"], "layers_per_block": 1, "attention_head_dim": 8,
           "cross_attention_dim": 64}
    video = describe_denoiser(t2v, 128, 128, 32, catalog.SD_VAE)
    other = describe_denoiser(dict(t2v, block_out_channels=[32, 64]), 64, 64, 8, catalog.SD_VAE)
    costs._GROUPS[id(video)] = (other, costs.op_groups(other))  # what a reused id would leave behind
    assert [op for op, _ in costs.op_groups(video)] == list(dict.fromkeys(video.ops))


@pytest.fixture(scope="module")
def tiny_llm_dir(tmp_path_factory):
    from distgen.models.tiny_llm import save_chat_llama

    return str(save_chat_llama(tmp_path_factory.mktemp("auto") / "llama"))


def test_parallel_auto_picks_the_top_runnable_plan_and_sets_its_options(capsys, tiny_llm_dir):
    """--parallel auto: the planner's best feasible, runnable, non-baseline plan for the ranks given."""
    import argparse

    from distgen.planner import Request, plan
    from distgen.workloads import resolve_auto_parallel

    args = argparse.Namespace(parallel="auto", nproc=2, patch_mode="displaced", pcpp_fraction=0.3)
    resolve_auto_parallel(args, "image", "tiny-sd", height=128, width=128, steps=20)
    ranked = [p for p in plan("tiny-sd", None, 2, "cpu", None, Request("image", height=128, width=128))["plans"]
              if p["feasible"] and p["in_runtime"] and "naive" not in p["options"].values()]
    assert args.parallel == ranked[0]["parallel"] and args.parallel != "auto"
    for flag, value in ranked[0]["options"].items():
        assert str(getattr(args, flag[2:].replace("-", "_"))) == str(value)
    assert "--parallel auto on 2 rank(s) of cpu" in capsys.readouterr().err
    text = argparse.Namespace(parallel="auto", nproc=2, ladder_layers=None)
    resolve_auto_parallel(text, "text", tiny_llm_dir, batch=1, gen_len=16)
    assert text.parallel in ("pp=2", "tp=2") and text.ladder_layers is None  # not a ladder checkpoint
    untouched = argparse.Namespace(parallel="tp=2", nproc=2)
    resolve_auto_parallel(untouched, "text", tiny_llm_dir)
    assert untouched.parallel == "tp=2"


def test_parallel_auto_says_why_when_nothing_fits(tiny_llm_dir):
    import argparse

    from distgen.workloads import resolve_auto_parallel

    with pytest.raises(ConfigError, match="--parallel auto: --gpus 64: no plan can run this model on 64 GPUs: tp=64: must "
                                          "divide the attention heads 4"):
        resolve_auto_parallel(argparse.Namespace(parallel="auto", nproc=64), "text", tiny_llm_dir, batch=1)
