"""Random-weight Llama checkpoints for benchmarks and tests (no tokenizer: prompts are token ids).

Built with transformers from a config, saved with ``save_pretrained`` into the cache and
loaded back through the same path as any checkpoint.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

from distgen.config import ConfigError

# name -> LlamaConfig keyword arguments
PRESETS: dict[str, dict] = {
    # the size the tests use
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    # ~160 M parameters, the size of ALGORITHMS.md §10's CPU tp reference (hidden 1024, 8 layers, 16/8 heads)
    "llama-bench": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                        num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=2048),
}
BENCH_PRESETS = ("smollm2", *PRESETS)


def cache_root() -> Path:
    return Path(os.environ.get("DISTGEN_CACHE", Path.home() / ".cache" / "distgen"))


def save_random_llama(directory: str | os.PathLike, seed: int = 0, **config) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**config)).eval()
    model.save_pretrained(directory)
    return Path(directory)


def preset_dir(name: str) -> Path:
    """Checkpoint directory of a bench preset, built and cached on first use (safe across processes)."""
    if name == "smollm2":
        from distgen.models import smollm2

        return smollm2.model_dir()
    if name not in PRESETS:
        raise ConfigError(f"--preset: unknown preset {name!r}; allowed: {', '.join(BENCH_PRESETS)}")
    directory = cache_root() / "models" / f"llm-{name}-v1"
    if (directory / "config.json").exists():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f".llm-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (directory / "config.json").exists():
            tmp = Path(tempfile.mkdtemp(prefix=directory.name + ".", dir=directory.parent))
            try:
                save_random_llama(tmp, **PRESETS[name])
                os.rename(tmp, directory)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
    return directory


_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = (
    "the quick brown fox jumps over the lazy dog. what is two plus two? name a colour: red, green, blue. "
    "tensor parallelism splits each layer over ranks; pipeline parallelism splits the layers. "
    "hello world, this is a tiny language model with a byte level tokenizer and a chat template."
)


def save_chat_llama(directory: str | os.PathLike, family: str = "llama", seed: int = 0, vocab_size: int = 384,
                    **config) -> Path:
    """A tiny random Llama / Qwen2 checkpoint *with* a tokenizer (byte-level BPE trained on a few
    sentences, ChatML template, ``<|im_end|>`` as EOS): what serving tests need to go from text
    to tokens and back through the same files a user's checkpoint has."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token=None)
    fast.chat_template = _CHAT_TEMPLATE
    settings = dict(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, bos_token_id=None)
    settings.update(config)
    torch.manual_seed(seed)
    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **settings))
    else:
        model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **settings))
    model.eval().save_pretrained(directory)
    fast.save_pretrained(directory)
    return Path(directory)
