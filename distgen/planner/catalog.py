"""Configs of the models the published measurements ran, transcribed from their released
``config.json`` files (Hugging Face model repositories), so that they can be planned without a
download and the planner can be checked against the measurements."""

from __future__ import annotations

# Stable Diffusion VAE (every SD 1.x / SDXL / PixArt / Latte pipeline): stabilityai/sdxl-vae config.json
SD_VAE = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4}

DENOISERS: dict[str, dict] = {
    # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    "SDXL": {"_class_name": "UNet2DConditionModel", "block_out_channels": [320, 640, 1280],
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "layers_per_block": 2,
             "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20],
             "cross_attention_dim": 2048, "addition_embed_type": "text_time", "in_channels": 4, "out_channels": 4,
             "sample_size": 128},
    # PixArt-alpha/PixArt-XL-2-1024-MS transformer/config.json
    "PixArt-alpha": {"_class_name": "PixArtTransformer2DModel", "num_layers": 28, "num_attention_heads": 16,
                     "attention_head_dim": 72, "patch_size": 2, "in_channels": 4, "out_channels": 8,
                     "caption_channels": 4096, "sample_size": 128},
    # maxin-cn/Latte-1 transformer/config.json
    "Latte": {"_class_name": "LatteTransformer3DModel", "num_layers": 28, "num_attention_heads": 16,
              "attention_head_dim": 72, "patch_size": 2, "in_channels": 4, "out_channels": 8,
              "caption_channels": 4096, "sample_size": 64, "video_length": 16},
}

_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
LLMS: dict[str, dict] = {
    # meta-llama/Llama-2-7b-hf, -13b-hf, -70b-hf; huggyllama/llama-30b (the "33B"); meta-llama/Llama-3.1-8B,
    # -70B; meta-llama/Llama-3.2-1B, -3B; mistralai/Mixtral-8x7B-v0.1 (config.json of each)
    "Llama-2-7B": {**_LLAMA, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
                   "max_position_embeddings": 4096},
    "Llama-2-13B": {**_LLAMA, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                    "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 32000,
                    "max_position_embeddings": 4096},
    "Llama-33B": {**_LLAMA, "hidden_size": 6656, "intermediate_size": 17920, "num_hidden_layers": 60,
                  "num_attention_heads": 52, "num_key_value_heads": 52, "vocab_size": 32000,
                  "max_position_embeddings": 2048},
    "Llama-2-70B": {**_LLAMA, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000,
                    "max_position_embeddings": 4096},
    "Llama-3.1-8B": {**_LLAMA, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                     "max_position_embeddings": 131072},
    "Llama-3.1-70B": {**_LLAMA, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                      "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
                      "max_position_embeddings": 131072},
    "Llama-3.2-1B": {**_LLAMA, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                     "tie_word_embeddings": True, "max_position_embeddings": 131072},
    "Llama-3.2-3B": {**_LLAMA, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
                     "num_attention_heads": 24, "num_key_value_heads": 8, "vocab_size": 128256,
                     "tie_word_embeddings": True, "max_position_embeddings": 131072},
    "Mixtral-8x7B": {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
                     "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "vocab_size": 32000, "num_local_experts": 8,
                     "num_experts_per_tok": 2, "max_position_embeddings": 32768},
}
