"""The same workers under every launcher: torchrun, local spawn and the Ray controller.

These run the real command line in subprocesses, as a user would.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ARGS = ["generate", "image", "--parallel", "patch=2", "--height", "64", "--width", "64", "--steps", "4",
        "--warmup-steps", "2", "--patch-mode", "displaced", "--no-progress"]


_RAY_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")


def _env(home, **extra):
    """The user's environment minus any rank or Ray settings, with a private HOME (Ray writes there)."""
    env = {k: v for k, v in os.environ.items() if k not in _RAY_VARS + ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(HOME=str(home), OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0", **extra)
    return env


def _torchrun(out, **env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "distgen", *ARGS, "--out", str(out)]
    return subprocess.run(cmd, env=_env(out.parent, **env), capture_output=True, text=True, timeout=180)


def _distgen(out, *extra, **env):
    cmd = [sys.executable, "-m", "distgen", *ARGS, "--out", str(out), *extra]
    return subprocess.run(cmd, env=_env(out.parent, **env), capture_output=True, text=True, timeout=240)


def _pixels(path):
    return np.asarray(Image.open(path)).astype(np.int16)


@pytest.fixture(scope="module")
def torchrun_image(tmp_path_factory):
    out = tmp_path_factory.mktemp("torchrun") / "torchrun.png"
    proc = _torchrun(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _pixels(out)


@pytest.mark.timeout(200)
def test_torchrun_and_spawn_give_the_same_image(torchrun_image, tmp_path):
    proc = _distgen(tmp_path / "spawn.png", "--nproc", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert np.array_equal(_pixels(tmp_path / "spawn.png"), torchrun_image)


@pytest.mark.timeout(260)
def test_ray_gives_the_same_image_as_torchrun(torchrun_image, tmp_path):
    proc = _distgen(tmp_path / "ray.png", "--nproc", "2", "--launcher", "ray")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert np.array_equal(_pixels(tmp_path / "ray.png"), torchrun_image)


@pytest.mark.timeout(200)
def test_failing_rank_under_torchrun_stops_every_rank(tmp_path):
    proc = _torchrun(tmp_path / "never.png", DISTGEN_INJECT_FAULT="1")
    assert proc.returncode != 0
    assert "injected fault on rank 1" in proc.stderr
    assert not (tmp_path / "never.png").exists()


@pytest.mark.timeout(200)
def test_failing_rank_under_spawn_reports_its_message(tmp_path):
    proc = _distgen(tmp_path / "never.png", "--nproc", "2", DISTGEN_INJECT_FAULT="1")
    assert proc.returncode == 1
    assert "rank 1 failed: RuntimeError: injected fault on rank 1" in proc.stderr
