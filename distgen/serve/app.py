"""The HTTP server: OpenAI-compatible endpoints over one :class:`~distgen.engine.Engine`.

Text: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (server-sent events with
``stream: true``). Images: ``/v1/images/generations``. Video: asynchronous jobs under
``/v1/videos``. ``/health`` (200 only while every rank answers) and ``/metrics`` (Prometheus)
stay open; everything else needs ``Authorization: Bearer <key>`` when a key is set. Every error
has OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import io
import json
import logging
import os
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from distgen.engine import Engine, EngineUnavailable, QueueFull
from distgen.serve.metrics import ServerMetrics
from distgen.serve.service import RequestError, Service

logger = logging.getLogger("distgen.serve")

POLL_AFTER_MS = 1000
KEEP_FINISHED_VIDEOS = 256  # finished jobs (and their MP4s) kept for GET; older ones are removed


# --------------------------------------------------------------------------- request bodies


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(BaseModel):
    include_usage: bool = False


class _TextBody(_Body):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    n: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    timeout_s: float | None = Field(default=None, gt=0)
    user: str | None = None


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatBody(_TextBody):
    messages: list[ChatMessage]


class CompletionBody(_TextBody):
    prompt: str | list[str]


class ImageBody(_Body):
    prompt: str
    model: str | None = None
    n: int | None = Field(default=None, ge=1)
    size: str | None = None
    response_format: str | None = None
    seed: int | None = None
    steps: int | None = Field(default=None, ge=1)
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    patch_mode: str | None = None
    sp_mode: str | None = None
    timeout_s: float | None = Field(default=None, gt=0)
    user: str | None = None


class VideoBody(_Body):
    prompt: str
    model: str | None = None
    size: str | None = None
    frames: int | None = Field(default=None, ge=1)
    steps: int | None = Field(default=None, ge=1)
    seed: int | None = None
    fps: int | None = Field(default=None, ge=1)
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    clip_mode: str | None = None
    timeout_s: float | None = Field(default=None, gt=0)


# --------------------------------------------------------------------------- errors


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error"}.get(
        status, "server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _unavailable(exc: Exception) -> JSONResponse:
    return error_response(503, str(exc), code="unavailable", headers={"Retry-After": "5"})


def _full(exc: QueueFull) -> JSONResponse:
    return error_response(429, str(exc), code="queue_full", headers={"Retry-After": str(exc.retry_after_s)})


def _failure(status: int, message: str) -> JSONResponse:
    # a retry would run the generation again: tell the openai client not to (it retries 5xx)
    headers = {"x-should-retry": "false"}
    if status == 503:
        headers["Retry-After"] = "5"
    return error_response(status, message, code="generation_failed" if status != 504 else "timeout", headers=headers)


# --------------------------------------------------------------------------- the app


def create_app(service: Service, engine: Engine, api_key: str | None = None,
               max_body_bytes: int = 1 << 20) -> FastAPI:
    app = FastAPI(title="distgen", version="0.1.0")
    metrics = ServerMetrics(engine)
    app.state.service, app.state.engine, app.state.metrics = service, engine, metrics
    videos: dict[str, dict] = {}
    open_paths = {"/health", "/metrics"}

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if api_key is not None and request.url.path not in open_paths:
            header = request.headers.get("authorization", "")
            token = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), api_key.encode()):
                return error_response(401, "a valid API key is required: send 'Authorization: Bearer <key>'",
                                      code="invalid_api_key")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            return error_response(413, f"the request body is {length} bytes; at most {max_body_bytes} are accepted",
                                  code="request_too_large")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(where) or None
        message = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request body")
        return error_response(422, message, param=param, code="invalid_type")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)

    @app.exception_handler(RequestError)
    async def bad_request(request: Request, exc: RequestError):
        return error_response(exc.status, str(exc), param=exc.param, code=exc.code)

    # ------------------------------------------------------------------ open endpoints

    @app.get("/health")
    async def health():
        report = engine.health()
        return JSONResponse(report, status_code=200 if report["status"] == "ok" else 503)

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.name, "object": "model", "created": int(time.time()),
                                            "owned_by": "distgen", "workload": service.workload}]}

    # ------------------------------------------------------------------ text

    async def _text(request: Request, body: _TextBody, chat: bool):
        service.check_model(body.model)
        raw = body.model_dump()
        if chat:
            prompt_ids = service.chat_prompt_ids([m.model_dump() for m in body.messages])
        else:
            prompt_ids = service.completion_prompt_ids(body.prompt)
        text_request = service.text_request(raw, prompt_ids)
        stops = service.stop_strings(raw)
        try:
            handle = engine.submit("text", text_request)
        except QueueFull as exc:
            return _full(exc)
        except EngineUnavailable as exc:
            return _unavailable(exc)
        metrics.admitted("text")
        run = _TextRun(service, handle, text_request, stops, chat, body, metrics)
        if body.stream:
            return StreamingResponse(run.stream(request), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        outcome = await _wait(request, handle, body.timeout_s, engine, consume=run.consume, complete=run.complete)
        if outcome is not None:
            return outcome
        return run.response()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatBody):
        return await _text(request, body, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionBody):
        return await _text(request, body, chat=False)

    # ------------------------------------------------------------------ images

    @app.post("/v1/images/generations")
    async def images(request: Request, body: ImageBody):
        image_requests = service.image_requests(body.model_dump())
        handles = []
        try:
            for image_request in image_requests:
                handles.append(engine.submit("image", image_request))
        except (QueueFull, EngineUnavailable) as exc:
            for handle in handles:
                handle.cancel()
            return _full(exc) if isinstance(exc, QueueFull) else _unavailable(exc)
        metrics.admitted("image", len(handles))
        started = time.monotonic()
        data = []
        for handle in handles:
            outcome = await _wait(request, handle, body.timeout_s, engine, cancel_also=handles)
            if outcome is not None:
                return outcome
            result = handle.outcome[1]
            buffer = io.BytesIO()
            result["image"].save(buffer, format="PNG")
            data.append({"b64_json": base64.b64encode(buffer.getvalue()).decode("ascii"),
                         "revised_prompt": None})
            metrics.observe_steps(result.get("step_seconds", []), result.get("bytes_sent", []),
                                  result.get("wait_seconds", []))
        metrics.finished("image", "200", time.monotonic() - started)
        return {"created": int(time.time()), "data": data}

    # ------------------------------------------------------------------ video jobs

    def _video_view(job_id: str) -> dict:
        job = videos[job_id]
        handle = job["handle"]
        outcome = handle.outcome
        status = "queued" if handle.started_at is None else "in_progress"
        progress = 0
        done, total = handle.progress
        if total:
            progress = int(100 * done / total)
        error = None
        if outcome is not None:
            status = {"result": "completed", "cancelled": "cancelled"}.get(outcome[0], "failed")
            progress = 100 if status == "completed" else progress
            if outcome[0] == "error":
                error = {"message": outcome[2], "code": "generation_failed"}
        r = job["request"]
        return {"id": job_id, "object": "video", "model": service.name, "status": status, "progress": progress,
                "created_at": job["created"], "completed_at": job.get("completed_at"),
                "size": f"{r.width}x{r.height}", "frames": r.frames, "seconds": str(round(r.frames / r.fps, 3)),
                "prompt": r.prompt, "error": error}

    def _poll_headers() -> dict:
        return {"openai-poll-after-ms": str(POLL_AFTER_MS)}

    @app.post("/v1/videos")
    async def create_video(body: VideoBody):
        video_request = service.video_request(body.model_dump())
        job_id = f"video_{uuid.uuid4().hex[:24]}"
        out = os.path.join(service.output_dir, f"{job_id}.mp4")
        try:
            handle = engine.submit("video", video_request, options={"out": out}, request_id=job_id)
        except QueueFull as exc:
            return _full(exc)
        except EngineUnavailable as exc:
            return _unavailable(exc)
        metrics.admitted("video")
        videos[job_id] = {"handle": handle, "request": video_request, "created": int(time.time()), "out": out}
        finished = [k for k, v in videos.items() if v["handle"].done]
        for old in finished[: max(0, len(finished) - KEEP_FINISHED_VIDEOS)]:  # oldest first (dicts keep order)
            with contextlib.suppress(OSError):
                os.remove(videos[old]["out"])
            del videos[old]
        if body.timeout_s:
            asyncio.get_running_loop().call_later(body.timeout_s, handle.cancel)
        return JSONResponse(_video_view(job_id), headers=_poll_headers())

    @app.get("/v1/videos/{job_id}")
    async def get_video(job_id: str):
        if job_id not in videos:
            return error_response(404, f"no video job {job_id!r}", param="video_id", code="not_found")
        view = _video_view(job_id)
        if view["status"] in ("completed", "failed", "cancelled") and videos[job_id].get("completed_at") is None:
            videos[job_id]["completed_at"] = int(time.time())
            view["completed_at"] = videos[job_id]["completed_at"]
        return JSONResponse(view, headers=_poll_headers())

    @app.get("/v1/videos/{job_id}/content")
    async def video_content(job_id: str):
        if job_id not in videos:
            return error_response(404, f"no video job {job_id!r}", param="video_id", code="not_found")
        view = _video_view(job_id)
        if view["status"] != "completed":
            return error_response(400 if view["status"] in ("failed", "cancelled") else 409,
                                  f"video {job_id} is {view['status']}; its content exists once it is completed",
                                  param="video_id", code="not_ready")
        return FileResponse(videos[job_id]["out"], media_type="video/mp4", filename=f"{job_id}.mp4")

    @app.delete("/v1/videos/{job_id}")
    async def cancel_video(job_id: str):
        if job_id not in videos:
            return error_response(404, f"no video job {job_id!r}", param="video_id", code="not_found")
        handle = videos[job_id]["handle"]
        if not handle.done:
            handle.cancel()
            for _ in range(100):  # answered within a step; report the settled state when it comes
                if handle.done:
                    break
                await asyncio.sleep(0.05)
        return JSONResponse(_video_view(job_id))

    return app


async def _wait(request: Request, handle, timeout_s: float | None, engine: Engine, consume=None,
                cancel_also=(), complete=None) -> JSONResponse | None:
    """Wait for a handle's answer, cancelling it when the client goes away or the deadline passes.
    Returns an error response, or None when the result is there."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        event = await handle.next_event(0.5)
        if event is None:
            if await request.is_disconnected():
                for h in (handle, *cancel_also):
                    h.cancel()
                return error_response(499, "the client closed the connection", code="client_closed")
            if deadline is not None and time.monotonic() > deadline:
                for h in (handle, *cancel_also):
                    h.cancel()
                return _failure(504, f"the request did not finish within timeout_s={timeout_s}")
            continue
        if consume is not None:
            consume(event)
        if event[0] == "result":
            return None
        if event[0] == "error":
            for h in cancel_also:
                h.cancel()
            return _failure(event[1], event[2])
        if event[0] == "cancelled":
            if complete is not None and complete():
                return None  # we cancelled it ourselves: stop strings ended every choice
            return _failure(504 if deadline is not None and time.monotonic() > deadline else 499,
                            "the request was cancelled")


class _TextRun:
    """One text request's output: incremental detokenization, stop strings, OpenAI chunks."""

    def __init__(self, service: Service, handle, text_request, stops: list[str], chat: bool, body, metrics):
        self.service, self.handle, self.request = service, handle, text_request
        self.stops, self.chat, self.body, self.metrics = stops, chat, body, metrics
        self.n = text_request.batch_size
        self.tokens: list[list[int]] = [[] for _ in range(self.n)]
        self.text: list[str] = [""] * self.n  # text emitted so far per choice
        self.finish: list[str | None] = [None] * self.n
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.started = time.monotonic()
        self.last_token_at: float | None = None
        self.error: tuple | None = None

    # tokens -> text, holding back an incomplete UTF-8 sequence and a possible stop-string prefix
    def _advance(self, row: int, new_ids: list[int]) -> str:
        if self.finish[row] is not None or not new_ids:
            return ""
        eos = set(self.request.eos_token_ids)
        for token in new_ids:
            if self.finish[row] is not None:
                break
            self.tokens[row].append(token)
            if token in eos:
                self.finish[row] = "stop"
        if self.finish[row] is None and len(self.tokens[row]) >= self.request.max_new_tokens:
            self.finish[row] = "length"
        ids = [t for t in self.tokens[row] if t not in eos]
        full = self.service.tokenizer.decode(ids, skip_special_tokens=True)
        for stop in self.stops:
            at = full.find(stop)
            if at != -1:
                full = full[:at]
                self.finish[row] = "stop"
        if self.finish[row] is None:
            if full.endswith("\ufffd"):
                full = full[: len(full.rstrip("\ufffd"))]
            hold = max((len(s) - 1 for s in self.stops), default=0)
            for k in range(min(hold, len(full)), 0, -1):  # keep back what may begin a stop string
                if any(s.startswith(full[-k:]) for s in self.stops):
                    full = full[:-k]
                    break
        delta = full[len(self.text[row]):] if full.startswith(self.text[row]) else ""
        self.text[row] = full if full.startswith(self.text[row]) else self.text[row]
        return delta

    def consume(self, event) -> list[tuple[int, str, str | None]]:
        """Fold one engine event in; returns (row, text delta, finish reason now set) per row."""
        out = []
        now = time.monotonic()
        if event[0] == "progress" and event[3]:
            rows = event[3]
            for row, new_ids in enumerate(rows):
                if new_ids:
                    if self.last_token_at is None:
                        self.metrics.observe_ttft(now - self.started)
                    else:
                        self.metrics.observe_itl((now - self.last_token_at) / max(1, len(new_ids)))
                    self.last_token_at = now
                before = self.finish[row]
                delta = self._advance(row, list(new_ids))
                out.append((row, delta, self.finish[row] if before is None else None))
            if all(f is not None for f in self.finish) and self.stops:
                self.handle.cancel()  # a stop string ended every choice: free the group
        elif event[0] == "result":
            result = event[1]
            for row, new_ids in enumerate(result["new"]):
                before = self.finish[row]
                delta = self._advance(row, list(new_ids))
                if self.finish[row] is None:
                    self.finish[row] = "length"
                out.append((row, delta, self.finish[row] if before is None else None))
            self.metrics.finished("text", "200", now - self.started)
            self.metrics.tokens(len(self.request.prompt_ids[0]) * self.n, sum(len(t) for t in self.tokens))
        elif event[0] == "cancelled" and all(f is not None for f in self.finish):
            # cancelled by us after stop strings ended every choice: a normal end
            self.metrics.finished("text", "200", now - self.started)
        elif event[0] in ("error", "cancelled"):
            self.error = event
        return out

    def complete(self) -> bool:
        return all(f is not None for f in self.finish)

    def usage(self) -> dict:
        prompt = len(self.request.prompt_ids[0])
        completion = sum(len(t) for t in self.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def response(self) -> dict:
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": self.text[i]},
                        "finish_reason": self.finish[i] or "length", "logprobs": None} for i in range(self.n)]
            kind = "chat.completion"
        else:
            choices = [{"index": i, "text": self.text[i], "finish_reason": self.finish[i] or "length",
                        "logprobs": None} for i in range(self.n)]
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.service.name,
                "choices": choices, "usage": self.usage()}

    def _chunk(self, row: int, delta: str, finish: str | None, first: bool) -> str:
        if self.chat:
            piece = {"content": delta} if delta else {}
            if first:
                piece = {"role": "assistant", "content": delta}
            choice = {"index": row, "delta": piece, "finish_reason": finish, "logprobs": None}
            kind = "chat.completion.chunk"
        else:
            choice = {"index": row, "text": delta, "finish_reason": finish, "logprobs": None}
            kind = "text_completion"
        chunk = {"id": self.id, "object": kind, "created": self.created, "model": self.service.name,
                 "choices": [choice]}
        return f"data: {json.dumps(chunk)}\n\n"

    async def stream(self, request: Request):
        opened = [False] * self.n
        deadline = None if self.body.timeout_s is None else time.monotonic() + self.body.timeout_s
        finished_all = False
        try:
            while True:
                event = await self.handle.next_event(0.5)
                if event is None:
                    if await request.is_disconnected():
                        return
                    if deadline is not None and time.monotonic() > deadline:
                        self.handle.cancel()
                        yield _sse_error(504, f"the request did not finish within timeout_s={self.body.timeout_s}")
                        return
                    continue
                for row, delta, finish in self.consume(event):
                    if delta or finish or (self.chat and not opened[row]):
                        if finish is not None and delta:
                            yield self._chunk(row, delta, None, not opened[row])
                            opened[row] = True
                            delta = ""
                        yield self._chunk(row, delta, finish, self.chat and not opened[row])
                        opened[row] = True
                if self.error is not None:
                    kind = self.error[0]
                    status, message = (self.error[1], self.error[2]) if kind == "error" else (499, "cancelled")
                    yield _sse_error(status, message)
                    return
                if event[0] in ("result", "cancelled"):
                    break
            finished_all = True
            options = self.body.stream_options
            if options is not None and options.include_usage:
                chunk = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                         "created": self.created, "model": self.service.name, "choices": [], "usage": self.usage()}
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if not finished_all and not self.handle.done:
                self.handle.cancel()  # the client went away: free the slot within a step
                self.metrics.finished("text", "499", time.monotonic() - self.started)


def _sse_error(status: int, message: str) -> str:
    return "data: " + json.dumps({"error": {"message": message, "type": "server_error" if status >= 500 else
                                            "invalid_request_error", "param": None, "code": status}}) + "\n\n"
