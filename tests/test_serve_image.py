"""`distgen serve` for images and video: real servers with real gloo ranks on the embedded tiny
pipelines; images compared with the one-shot `distgen generate image` PNG of the same seed
(max pixel difference <= 1), a video job followed through its states to an MP4.
"""

import base64
import concurrent.futures
import io
import os
import subprocess
import sys

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.serving import Server, metric

pytestmark = [pytest.mark.serve, pytest.mark.timeout(900)]

STEPS = 4


def one_shot_png(tmp_path, model: str, parallel: str, seed: int, size: int, extra=()) -> np.ndarray:
    out = tmp_path / f"one-shot-{parallel}-{seed}-{size}.png"
    from distgen.models.tiny import preset_dir

    args = [sys.executable, "-m", "distgen", "generate", "image", "--model", str(preset_dir(model)), "--prompt", "a lighthouse",
            "--height", str(size), "--width", str(size), "--steps", str(STEPS), "--seed", str(seed),
            "--parallel", parallel, "--out", str(out), "--no-progress", *extra]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr
    return np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)


def served(url: str, seed: int, size: int, **extra) -> np.ndarray:
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    result = client.images.generate(model=extra.pop("model", "tiny-sd"), prompt="a lighthouse", size=f"{size}x{size}",
                                    response_format="b64_json", extra_body={"seed": seed, "steps": STEPS, **extra})
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).convert("RGB")
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def cfg_server():
    with Server(["--model", "tiny-sd", "--parallel", "cfg=2", "--max-batch-size", "8"]) as server:
        yield server


def _check_against_one_shot(tmp_path, url: str, model: str, parallel: str, extra=()) -> None:
    from distgen.client import Client

    got = served(url, seed=3, size=128, model=model)
    mine = Client(url).image("a lighthouse", size=(128, 128), seed=3, steps=STEPS)  # the client's view: PIL
    assert mine.size == (128, 128)
    expected = one_shot_png(tmp_path, model, parallel, seed=3, size=128, extra=extra)
    assert got.shape == expected.shape == (128, 128, 3)
    assert np.abs(got - expected).max() <= 1
    assert np.abs(np.asarray(mine.convert("RGB"), dtype=np.int16) - expected).max() <= 1


def test_cfg_image_equals_one_shot_png(tmp_path, cfg_server):
    _check_against_one_shot(tmp_path, cfg_server.url, "tiny-sd", "cfg=2")


@pytest.mark.parametrize("model,parallel,extra", [
    ("tiny-sd", "patch=2", ("--patch-mode", "displaced", "--vae-parallel")),  # decode over the 2 ranks too
    ("tiny-pixart", "sp=2", ("--sp-mode", "ring")),
])
def test_served_image_equals_one_shot_png(tmp_path, model, parallel, extra):
    with Server(["--model", model, "--parallel", parallel, *extra]) as server:
        _check_against_one_shot(tmp_path, server.url, model, parallel, extra)


def test_concurrent_images_of_two_sizes_each_get_their_own(cfg_server):
    server = cfg_server
    cases = [(seed, size) for seed in range(8) for size in (64, 128)]
    expected = {case: served(server.url, *case) for case in cases}  # one at a time: batches of one
    assert len({e.tobytes() for e in expected.values()}) == len(cases)  # every case differs

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda case: (case, served(server.url, *case)), cases * 2))
    assert len(results) == 32
    for case, image in results:
        assert np.abs(image - expected[case]).max() <= 1, case
    assert metric(server.url, "distgen_running_requests") == 0
    status, report = server.health()
    assert status == 200 and report["restarts"] == 0


BAD_IMAGE = [
    ({"prompt": "x", "size": "100x128"}, 400, "size"),  # not a multiple of the VAE factor x bands
    ({"prompt": "x", "size": "big"}, 400, "size"),
    ({"prompt": "x", "size": "8192x8192"}, 400, "size"),
    ({"prompt": "x", "n": 50}, 400, "n"),
    ({"prompt": "x", "n": 0}, 422, "n"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": 5}, 422, "prompt"),
    ({"prompt": "x", "steps": 100000}, 400, "steps"),
    ({"prompt": "x", "guidance_scale": 1.0}, 400, "guidance_scale"),  # cfg=2 needs guidance
    ({"prompt": "x", "patch_mode": "naive"}, 400, "patch_mode"),
    ({"prompt": "x", "response_format": "url"}, 400, "response_format"),
    ({"prompt": "x", "model": "sdxl"}, 404, "model"),
    ({"size": "64x64"}, 422, "prompt"),
]


def test_bad_image_parameters_are_refused_before_queueing(cfg_server):
    server = cfg_server
    admitted = metric(server.url, 'distgen_requests_admitted_total{kind="image"}')
    for body, status, param in BAD_IMAGE:
        response = httpx.post(server.url + "/v1/images/generations", json=body, timeout=30)
        assert response.status_code == status, (body, response.text)
        error = response.json()["error"]
        assert error["param"] is not None and error["param"].startswith(param), (body, error)
    assert metric(server.url, 'distgen_requests_admitted_total{kind="image"}') == admitted
    assert metric(server.url, "distgen_queue_depth") == 0
    assert server.health()[1]["restarts"] == 0


def test_video_job_progresses_and_its_mp4_has_the_frames(tmp_path):
    import av

    from distgen.client import Client

    with Server(["--model", "tiny-t2v", "--parallel", "clip=2", "--output-dir", str(tmp_path)]) as server:
        bad = httpx.post(server.url + "/v1/videos", json={"prompt": "a boat", "frames": 1, "size": "64x64"})
        assert bad.status_code == 400  # fewer frames than clip ranks
        client = Client(server.url)
        job = client.create_video("a paper boat", frames=8, size=(64, 64), steps=6)
        assert job["status"] == "queued" and job["progress"] == 0
        seen = []
        import time

        while True:
            status = client.video_status(job["id"])
            seen.append((status["status"], status["progress"]))
            if status["status"] in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.1)
        assert seen[-1] == ("completed", 100), seen
        progress = [p for s, p in seen if s == "in_progress"]
        assert progress and progress == sorted(progress) and len(set(progress)) >= 2, seen
        path = client.download_video(job["id"], str(tmp_path / "boat.mp4"))
        with av.open(path) as container:
            frames = [f for f in container.decode(video=0)]
        assert len(frames) == 8 and (frames[0].width, frames[0].height) == (64, 64)
        assert httpx.get(server.url + "/v1/videos/video_nope").status_code == 404

        # cancel a running job: it ends as cancelled and the group takes the next one
        long_job = client.create_video("a long one", frames=8, size=(64, 64), steps=200)
        while client.video_status(long_job["id"])["status"] == "queued":
            time.sleep(0.05)
        assert client.cancel_video(long_job["id"])["status"] == "cancelled"
        assert server.health()[0] == 200
        again = client.video("again", frames=8, size=(64, 64), steps=2, out=str(tmp_path / "again.mp4"))
        assert os.path.getsize(again) > 0
