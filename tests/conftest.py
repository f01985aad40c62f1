import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Embedded presets are built into a per-session cache (never the user's)."""
    os.environ.setdefault("DISTGEN_CACHE", str(tmp_path_factory.mktemp("distgen-cache")))
    torch.set_num_threads(1)
    yield


def psnr(output: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR of ``output`` against ``reference`` over the reference's value range (dB)."""
    mse = (output.float() - reference.float()).square().mean().item()
    value_range = (reference.max() - reference.min()).item()
    return float("inf") if mse == 0 else 10.0 * torch.log10(torch.tensor(value_range**2 / mse)).item()
