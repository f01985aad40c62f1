"""Embedded trained models: small pipelines trained by :mod:`distgen.models.train` and shipped in the package.

Their weights are fp16 safetensors under ``distgen/models/weights/<name>/`` (a diffusers
``save_pretrained`` directory, with the ``training.json`` of the run that made it). On first use
a model is installed once into the cache, as the random presets are built there, and from then on
loaded from the cache like any user checkpoint. The cache directory is named by a digest of the
shipped files, so a package with retrained weights installs them beside the old ones instead of
serving stale ones.
"""

from __future__ import annotations

import functools
import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

WEIGHTS_ROOT = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class TrainedModel:
    workload: str  # "image", "video" or "text"
    size: int | tuple[int, int, int] | None  # the training side in pixels / (frames, height, width); text: None


# The default of each workload first.
TRAINED: dict[str, TrainedModel] = {
    # SD layout (UNet2DCondition + CLIP text encoder + 4x AutoencoderKL), procedural shape scenes at 64 px
    "shapes-sd": TrainedModel("image", 64),
    # ModelScope layout (UNet3DCondition) on shapes-sd's VAE and text encoder, 16-frame moving-shape clips
    "shapes-t2v": TrainedModel("video", (16, 64, 64)),
    # Qwen2-MoE layout (16 routed experts, top-4, shared expert), the Python standard library's source
    "distgen-moe": TrainedModel("text", None),
}


def _marker(name: str) -> str:
    """The file every complete directory of that model has: a pipeline's index, a checkpoint's config."""
    return "config.json" if TRAINED[name].workload == "text" else "model_index.json"


def _shipped(name: str) -> bool:
    return name in TRAINED and (WEIGHTS_ROOT / name / _marker(name)).exists()


def names(workload: str) -> tuple[str, ...]:
    """The trained models of ``workload`` whose weights are in this package."""
    return tuple(name for name, model in TRAINED.items() if model.workload == workload and _shipped(name))


@functools.lru_cache(maxsize=None)  # the shipped files do not change while a process runs
def _digest(source: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(source)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def trained_dir(name: str) -> Path:
    """The cache directory of trained model ``name``, installed from the package on first use."""
    from distgen.models.tiny import cached_directory

    source = WEIGHTS_ROOT / name
    if not _shipped(name):
        from distgen.config import ConfigError

        raise ConfigError(f"--model {name}: not a trained model in this package; trained: "
                          f"{', '.join(n for n in TRAINED if _shipped(n)) or 'none'}")
    return cached_directory(f"{name}-{_digest(source)}", lambda tmp: shutil.copytree(source, tmp, dirs_exist_ok=True),
                            marker=_marker(name))
