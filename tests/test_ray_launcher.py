"""The Ray controller (``distgen.launch.ray``) against a private Ray bound to 127.0.0.1.

One local Ray serves the whole module (starting Ray costs seconds); it runs with token
authentication on (RAY_AUTH_MODE=token, the token in RAY_AUTH_TOKEN), and ``run_on_ray``
reuses it. The token tests run their drivers in subprocesses so that their environment
stays out of this session.
"""

import os
import secrets
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest
import torch

ray = pytest.importorskip("ray")

from distgen.config import ImageJob, ImageRequest, ParallelConfig, PatchConfig  # noqa: E402
from distgen.launch.local import WorkerError, spawn  # noqa: E402
from distgen.launch.ray import connect, run_on_ray  # noqa: E402
from distgen.models.tiny import preset_dir  # noqa: E402

CLUSTER_CPUS = 2
_RAY_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")

# The job the subprocess drivers run (the same as tiny_job() below); they save rank 0's latents.
DRIVER = textwrap.dedent(
    """
    import sys, torch
    from distgen.config import ImageJob, ImageRequest, ParallelConfig, PatchConfig
    from distgen.launch.ray import run_on_ray
    from distgen.models.tiny import preset_dir

    job = ImageJob(request=ImageRequest(height=64, width=64, steps=4), parallel=ParallelConfig.parse("patch=2"),
                   patch=PatchConfig(mode="displaced", warmup_steps=2), model=str(preset_dir("tiny-sd")),
                   return_latents=True, progress=False, threads_per_rank=1)
    address = sys.argv[2] if len(sys.argv) > 2 else None
    result = run_on_ray(job, 2, address=address, timeout_s=150)
    from ray._private.authentication.authentication_utils import is_token_auth_enabled
    assert is_token_auth_enabled(), "the driver did not run in token mode"
    torch.save(result["latents"], sys.argv[1])
    print("driver done")
    """
)


def tiny_job(**changes) -> ImageJob:
    job = ImageJob(
        request=ImageRequest(height=64, width=64, steps=4),
        parallel=ParallelConfig.parse("patch=2"),
        patch=PatchConfig(mode="displaced", warmup_steps=2),
        model=str(preset_dir("tiny-sd")),
        return_latents=True,
        progress=False,
        threads_per_rank=1,
    )
    return job.replace(**changes)


def _driver_env(home, **extra) -> dict:
    """A clean environment for a subprocess driver: no Ray settings of this session, own HOME."""
    env = {k: v for k, v in os.environ.items() if k not in _RAY_VARS}
    env.update(HOME=str(home), OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0", **extra)
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _wait_for_free_cpus(expected: float, within_s: float = 20.0) -> float:
    """Poll until the cluster has ``expected`` CPUs free again (actors killed, bundles released)."""
    deadline = time.monotonic() + within_s
    while True:
        free = ray.available_resources().get("CPU", 0)
        if free >= expected or time.monotonic() > deadline:
            return free
        time.sleep(0.2)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray on 127.0.0.1 with token auth on, for every test of this module."""
    assert not ray.is_initialized(), "another test left Ray initialised in this process"
    saved = {k: os.environ.get(k) for k in _RAY_VARS}
    token = secrets.token_hex(16)
    for k in _RAY_VARS:
        os.environ.pop(k, None)
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    try:
        assert connect(num_cpus=CLUSTER_CPUS) is True
        yield SimpleNamespace(address=ray.get_runtime_context().gcs_address, token=token)
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def spawn_latents():
    """Rank 0's latents of tiny_job() under the local spawn launcher: the reference."""
    return spawn(tiny_job(), 2, timeout_s=300)["latents"]


@pytest.mark.timeout(60)
def test_local_ray_keeps_to_loopback_with_token_auth(ray_cluster):
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    assert ray_cluster.address.startswith("127.0.0.1:")
    assert {node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"]} == {"127.0.0.1"}
    assert is_token_auth_enabled()
    assert ray.cluster_resources()["CPU"] == CLUSTER_CPUS


@pytest.mark.timeout(200)
def test_ray_gives_the_same_latents_as_spawn(ray_cluster, spawn_latents, tmp_path, monkeypatch):
    # The actors' working directory is the one Ray started in, not this one: a relative --out
    # must still land here, where the command was run.
    monkeypatch.chdir(tmp_path)
    result = run_on_ray(tiny_job(out="ray.png"), 2, timeout_s=300)
    torch.testing.assert_close(result["latents"], spawn_latents, atol=1e-5, rtol=0)
    assert result["image"] is not None and len(result["runs"][0]["step_seconds"]) == 4
    assert result["out"] == str(tmp_path / "ray.png") and (tmp_path / "ray.png").exists()
    # The Ray of this process was reused, not shut down, and every bundle was given back.
    assert ray.is_initialized()
    assert _wait_for_free_cpus(CLUSTER_CPUS) == CLUSTER_CPUS


@pytest.mark.timeout(90)
def test_failing_rank_under_ray_stops_every_rank(ray_cluster):
    job = tiny_job(comm_timeout_s=300.0)  # only the launcher's kill can end rank 0 quickly
    started = time.monotonic()
    with pytest.raises(WorkerError) as info:
        run_on_ray(job, 2, timeout_s=300, env={"DISTGEN_INJECT_FAULT": "1"})
    elapsed = time.monotonic() - started
    message = str(info.value)
    assert message.startswith("rank 1 failed: RuntimeError: injected fault on rank 1"), message
    assert "traceback of rank 1" in message
    assert elapsed < 60, f"the failure took {elapsed:.0f} s to report"
    assert _wait_for_free_cpus(CLUSTER_CPUS) == CLUSTER_CPUS


@pytest.mark.timeout(60)
def test_ray_job_timeout_stops_every_rank(ray_cluster):
    with pytest.raises(WorkerError, match=r"did not finish within 2 s.*all ranks were stopped"):
        run_on_ray(tiny_job(request=ImageRequest(height=64, width=64, steps=50)), 2, timeout_s=2)
    assert _wait_for_free_cpus(CLUSTER_CPUS) == CLUSTER_CPUS


@pytest.mark.timeout(60)
def test_unplaceable_job_says_what_it_needs(ray_cluster):
    with pytest.raises(WorkerError, match=r"needs 3 CPUs \(one per rank\), the Ray cluster has 2 CPUs available of 2"):
        run_on_ray(tiny_job(), 3, timeout_s=60, placement_timeout_s=1)
    assert _wait_for_free_cpus(CLUSTER_CPUS) == CLUSTER_CPUS


@pytest.mark.timeout(150)
def test_token_auth_on_a_new_local_ray(tmp_path, spawn_latents):
    """run_on_ray starts its own Ray with RAY_AUTH_MODE=token and the token in RAY_AUTH_TOKEN."""
    home = tmp_path / "home"
    home.mkdir()
    env = _driver_env(home, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    out = tmp_path / "latents.pt"
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(out)], env=env, capture_output=True, text=True,
                          timeout=140)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    torch.testing.assert_close(torch.load(out), spawn_latents, atol=1e-5, rtol=0)
    # The token came from the environment: Ray generated no token file.
    assert not (home / ".ray" / "auth_token").exists()


@pytest.mark.timeout(120)
def test_token_auth_when_joining_a_cluster(ray_cluster, tmp_path, spawn_latents):
    """A driver joins the module's token-protected Ray by address: with the token it runs the
    job; without token mode it is refused, with a hint about the token settings."""
    home = tmp_path / "home"
    home.mkdir()
    # The module's Ray is bound to 127.0.0.1 only; see launch/ray.py::_loopback_only.
    loopback = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    out = tmp_path / "latents.pt"
    env = _driver_env(home, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=ray_cluster.token, **loopback)
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(out), ray_cluster.address], env=env,
                          capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    torch.testing.assert_close(torch.load(out), spawn_latents, atol=1e-5, rtol=0)

    refused = textwrap.dedent(
        """
        import sys
        from distgen.launch.ray import connect
        try:
            connect(sys.argv[1])
        except ConnectionError as exc:
            print("refused:", exc)
        else:
            print("joined")
        """
    )
    # RAY_NUM_REDIS_GET_RETRIES: give up after 2 refused attempts rather than Ray's 20.
    env = _driver_env(home, RAY_NUM_REDIS_GET_RETRIES="2", **loopback)
    proc = subprocess.run([sys.executable, "-c", refused, ray_cluster.address], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "refused:" in proc.stdout and "RAY_AUTH_MODE=token" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert "Authentication token is missing or incorrect" in proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_ray_job_submit_against_ray_start_with_token_auth(tmp_path):
    """``ray start --head`` with token auth, then ``ray job submit --working-dir . -- distgen ...
    --launcher ray``: the job's driver finds the cluster through RAY_ADDRESS."""
    import signal
    import shutil
    import tempfile
    from pathlib import Path

    from distgen.launch.local import free_port

    repo = Path(__file__).resolve().parents[1]
    bin_dir = Path(sys.executable).parent
    home = tmp_path / "home"
    home.mkdir()
    out = tmp_path / "job.png"
    env = _driver_env(home, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16),
                      RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
                      DISTGEN_CACHE=os.environ["DISTGEN_CACHE"])
    temp_dir = tempfile.mkdtemp(prefix="dgray", dir="/tmp")  # short: Ray's unix sockets live under it
    dashboard = free_port()
    head = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={free_port()}",
         # Not the fixed default 52365, which the module's Ray (still up) already holds.
         f"--dashboard-agent-listen-port={free_port()}",
         f"--num-cpus={CLUSTER_CPUS}", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + 120
        while subprocess.run([str(bin_dir / "ray"), "job", "list", "--address", address], env=env,
                             capture_output=True, timeout=60).returncode != 0:
            assert head.poll() is None and time.monotonic() < deadline, "ray start --head did not come up"
            time.sleep(2)
        submit = [str(bin_dir / "ray"), "job", "submit", "--address", address, "--working-dir", str(repo), "--",
                  "distgen", "generate", "image", "--parallel", "patch=2", "--height", "64", "--width", "64",
                  "--steps", "4", "--warmup-steps", "2", "--no-progress", "--launcher", "ray", "--nproc", "2",
                  "--out", str(out)]
        while True:
            proc = subprocess.run(submit, env=env, cwd=repo, capture_output=True, text=True, timeout=240)
            # The job API answers before the node's agent has registered: nothing was submitted then.
            if "No available agent to submit job" not in proc.stderr or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert proc.returncode == 0 and out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "succeeded" in proc.stdout + proc.stderr
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # the group of the `ray start` we started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:  # whatever of that group outlived its drain
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        head.wait(timeout=10)
        shutil.rmtree(temp_dir, ignore_errors=True)
