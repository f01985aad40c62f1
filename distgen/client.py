"""A thin Python client for ``distgen serve``.

For text and images the plain ``openai`` package works unchanged (``OpenAI(base_url=
"http://127.0.0.1:8000/v1", api_key=...)``). This client adds what it lacks: images as
``PIL.Image``, video jobs with a progress bar, cancel and download, and typed errors that carry
the server's message. It is built on ``httpx`` (which the ``openai`` package also uses), so
streaming reads server-sent events as they arrive, without a second HTTP stack.
"""

from __future__ import annotations

import base64
import io
import json
import time
from typing import Iterator

import httpx


class DistgenError(RuntimeError):
    """An error answer of the server: ``status``, ``message``, ``param``, ``code``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(f"{status}: {message}")
        self.status, self.message, self.param, self.code = status, message, param, code


class BadRequest(DistgenError):
    """400 / 404 / 413 / 422: the request is wrong; retrying will not help."""


class Unauthorized(DistgenError):
    """401: no valid API key."""


class ServerBusy(DistgenError):
    """429: the queue is full; ``retry_after`` seconds is the server's hint."""

    def __init__(self, *args, retry_after: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.retry_after = retry_after


class Unavailable(DistgenError):
    """503 (the worker group is starting, rebuilding or down) and other server-side failures."""


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        error = response.json().get("error", {})
    except (ValueError, json.JSONDecodeError):
        error = {"message": response.text}
    args = (response.status_code, error.get("message", ""), error.get("param"), error.get("code"))
    if response.status_code == 401:
        raise Unauthorized(*args)
    if response.status_code == 429:
        retry = response.headers.get("retry-after")
        raise ServerBusy(*args, retry_after=float(retry) if retry else None)
    if response.status_code < 500:
        raise BadRequest(*args)
    raise Unavailable(*args)


class Client:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 600.0):
        base = base_url.rstrip("/")
        self.base_url = base[:-3] if base.endswith("/v1") else base
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _post(self, path: str, body: dict) -> dict:
        response = self.http.post(path, json=body)
        _raise_for(response)
        return response.json()

    # ------------------------------------------------------------------ service

    def health(self) -> dict:
        """The server's health report (``status`` is ``ok`` when every rank answers)."""
        response = self.http.get("/health")
        return response.json() | {"http_status": response.status_code}

    def models(self) -> list[str]:
        response = self.http.get("/v1/models")
        _raise_for(response)
        return [m["id"] for m in response.json()["data"]]

    def wait_ready(self, timeout: float = 600.0, interval: float = 0.5) -> dict:
        """Poll ``/health`` until the group is up (raises Unavailable on timeout or when it failed)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                report = self.health()
            except httpx.TransportError:
                report = {"status": "unreachable", "http_status": None}
            if report.get("status") == "ok":
                return report
            if report.get("state") == "failed":
                raise Unavailable(503, f"the worker group is down: {report.get('last_failure')}")
            if time.monotonic() > deadline:
                raise Unavailable(503, f"the server was not ready within {timeout:.0f} s (last: {report})")
            time.sleep(interval)

    def _model(self, model: str | None) -> str:
        return model or self.models()[0]

    # ------------------------------------------------------------------ text

    def chat(self, messages: list[dict] | str, model: str | None = None, stream: bool = False, **options):
        """Chat completion: the reply text, or (``stream=True``) an iterator over text pieces."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        body = {"model": self._model(model), "messages": messages, **options}
        if stream:
            return self._stream("/v1/chat/completions", body, lambda c: c["delta"].get("content", ""))
        return self._post("/v1/chat/completions", body)["choices"][0]["message"]["content"]

    def complete(self, prompt: str, model: str | None = None, stream: bool = False, **options):
        """Text completion: the continuation, or (``stream=True``) an iterator over text pieces."""
        body = {"model": self._model(model), "prompt": prompt, **options}
        if stream:
            return self._stream("/v1/completions", body, lambda c: c.get("text", ""))
        return self._post("/v1/completions", body)["choices"][0]["text"]

    def _stream(self, path: str, body: dict, piece) -> Iterator[str]:
        with self.http.stream("POST", path, json=body | {"stream": True}) as response:
            if response.status_code >= 400:
                response.read()
                _raise_for(response)
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    e = chunk["error"]
                    raise Unavailable(int(e.get("code") or 500), e.get("message", ""))
                for choice in chunk.get("choices", []):
                    text = piece(choice)
                    if text:
                        yield text

    # ------------------------------------------------------------------ images

    def image(self, prompt: str, size: tuple[int, int] | None = None, seed: int | None = None, n: int = 1,
              model: str | None = None, **options):
        """Generate ``n`` images; returns a ``PIL.Image`` (a list when n > 1)."""
        from PIL import Image

        body = {"prompt": prompt, "n": n, "response_format": "b64_json", **options}
        if model:
            body["model"] = model
        if size is not None:
            body["size"] = f"{size[0]}x{size[1]}"
        if seed is not None:
            body["seed"] = seed
        data = self._post("/v1/images/generations", body)["data"]
        images = [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in data]
        for image in images:
            image.load()
        return images[0] if n == 1 else images

    # ------------------------------------------------------------------ video jobs

    def create_video(self, prompt: str, frames: int | None = None, size: tuple[int, int] | None = None,
                     **options) -> dict:
        body = {"prompt": prompt, **options}
        if frames is not None:
            body["frames"] = frames
        if size is not None:
            body["size"] = f"{size[0]}x{size[1]}"
        return self._post("/v1/videos", body)

    def video_status(self, video_id: str) -> dict:
        response = self.http.get(f"/v1/videos/{video_id}")
        _raise_for(response)
        return response.json() | {"_poll_ms": int(response.headers.get("openai-poll-after-ms", "1000"))}

    def cancel_video(self, video_id: str) -> dict:
        response = self.http.delete(f"/v1/videos/{video_id}")
        _raise_for(response)
        return response.json()

    def download_video(self, video_id: str, path: str) -> str:
        with self.http.stream("GET", f"/v1/videos/{video_id}/content") as response:
            if response.status_code >= 400:
                response.read()
                _raise_for(response)
            with open(path, "wb") as f:
                for chunk in response.iter_bytes():
                    f.write(chunk)
        return path

    def video(self, prompt: str, out: str | None = None, progress: bool = False, timeout: float = 3600.0,
              **options) -> str:
        """Create a video job, poll it (at the server's hint) until done, download the MP4; returns
        its path. ``progress=True`` shows a tqdm bar. Raises Unavailable when the job failed."""
        job = self.create_video(prompt, **options)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=100, desc="video", unit="%")
        deadline = time.monotonic() + timeout
        try:
            while True:
                status = self.video_status(job["id"])
                if bar is not None:
                    bar.update(status["progress"] - bar.n)
                if status["status"] == "completed":
                    break
                if status["status"] in ("failed", "cancelled"):
                    message = (status.get("error") or {}).get("message", status["status"])
                    raise Unavailable(500, f"video {job['id']} {status['status']}: {message}")
                if time.monotonic() > deadline:
                    self.cancel_video(job["id"])
                    raise Unavailable(504, f"video {job['id']} did not finish within {timeout:.0f} s; cancelled")
                time.sleep(status["_poll_ms"] / 1000)
        finally:
            if bar is not None:
                bar.close()
        return self.download_video(job["id"], out or f"{job['id']}.mp4")
