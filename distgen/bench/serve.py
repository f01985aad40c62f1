"""``distgen bench serve``: a real server on loopback under Poisson arrivals, against one-shot runs.

The server is a ``distgen serve`` process (its own ranks, the model loaded once); requests come
from an in-process asyncio client (httpx) at exponential inter-arrival times (``--rate`` per
second, seeded), each its own prompt (text: distinct prompts; image: alternating sizes). Text
requests stream, so time to first token and inter-token latency are measured at the client.
Then the same kind of request goes through one-shot ``distgen generate`` processes, one per
request (``--oneshot-requests`` of them, run one after another): what residency buys. One JSON
object: throughput, latency p50/p90/p99, TTFT / ITL (text), errors by status, per mode.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

from distgen.config import ConfigError

TOPICS = ("the sea", "a city at night", "tensor parallelism", "a red bicycle", "mountains", "the moon", "bread",
          "a library", "rain", "a chess game", "volcanoes", "a lighthouse", "music", "trains", "gardens", "snow")


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "mean": statistics.fmean(ordered)}


def _server_args(args, port: int) -> list[str]:
    out = ["--port", str(port), "--max-queued", str(args.max_queued)]
    for flag, value in (("--model", args.model), ("--parallel", args.parallel), ("--nproc", args.nproc),
                        ("--launcher", args.launcher if args.launcher != "auto" else None),
                        ("--workload", args.workload)):
        if value:
            out += [flag, str(value)]
    return out


def _requests(args) -> list[dict]:
    rng = random.Random(args.seed)
    bodies = []
    for i in range(args.requests):
        topic = TOPICS[i % len(TOPICS)]
        if args.workload == "text":
            # mixed lengths (seeded): output uniform in max_tokens x [1 - spread, 1 + spread], and 0..4 extra
            # sentences of prompt (about 12 tokens each)
            spread = args.length_spread
            tokens = max(1, round(args.max_tokens * rng.uniform(1 - spread, 1 + spread)))
            extra = " ".join(f"Mention {TOPICS[(i + k) % len(TOPICS)]} too." for k in range(rng.randrange(5) if spread else 0))
            bodies.append({"messages": [{"role": "user", "content": f"Write one sentence about {topic} (#{i}). {extra}".strip()}],
                           "max_tokens": tokens, "temperature": 0, "ignore_eos": True})
        elif args.workload == "image":
            size = args.sizes[i % len(args.sizes)]
            bodies.append({"prompt": f"{topic}, detailed", "size": f"{size}x{size}", "steps": args.steps,
                           "seed": rng.randrange(1 << 30)})
        else:
            bodies.append({"prompt": f"{topic}, moving", "frames": args.frames, "steps": args.steps,
                           "size": f"{args.sizes[0]}x{args.sizes[0]}", "seed": rng.randrange(1 << 30)})
    return bodies


async def _drive(url: str, model: str, bodies: list[dict], args) -> dict:
    import httpx

    rng = random.Random(args.seed + 1)
    results: list[dict] = []

    async def one(client, body: dict, delay: float):
        await asyncio.sleep(delay)
        started = time.perf_counter()
        record = {"status": None, "latency": None, "ttft": None, "itl": [], "tokens": 0}
        try:
            if args.workload == "text":
                async with client.stream("POST", "/v1/chat/completions",
                                         json=body | {"model": model, "stream": True}) as response:
                    record["status"] = response.status_code
                    last = None
                    async for line in response.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            record["status"] = int(chunk["error"].get("code") or 500)
                            break
                        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                            now = time.perf_counter()
                            if last is None:
                                record["ttft"] = now - started
                            else:
                                record["itl"].append(now - last)
                            last = now
                            record["tokens"] += 1
            elif args.workload == "image":
                response = await client.post("/v1/images/generations", json=body | {"model": model})
                record["status"] = response.status_code
            else:
                response = await client.post("/v1/videos", json=body | {"model": model})
                record["status"] = response.status_code
                if response.status_code == 200:
                    job = response.json()["id"]
                    while True:
                        status = (await client.get(f"/v1/videos/{job}")).json()
                        if status["status"] in ("completed", "failed", "cancelled"):
                            record["status"] = 200 if status["status"] == "completed" else 500
                            break
                        await asyncio.sleep(0.2)
        except httpx.HTTPError as exc:
            record["status"] = f"transport: {type(exc).__name__}"
        record["latency"] = time.perf_counter() - started
        results.append(record)

    delays, t = [], 0.0
    for _ in bodies:
        delays.append(t)
        t += rng.expovariate(args.rate)
    started = time.perf_counter()
    limits = httpx.Limits(max_connections=len(bodies) + 8, max_keepalive_connections=len(bodies) + 8)
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout, limits=limits) as client:
        await asyncio.gather(*(one(client, body, delay) for body, delay in zip(bodies, delays)))
    wall = time.perf_counter() - started
    ok = [r for r in results if r["status"] == 200]
    errors: dict[str, int] = {}
    for r in results:
        if r["status"] != 200:
            errors[str(r["status"])] = errors.get(str(r["status"]), 0) + 1
    report = {"requests": len(results), "ok": len(ok), "errors_by_status": errors, "wall_seconds": wall,
              "offered_rate_per_s": args.rate, "throughput_requests_per_s": len(ok) / wall,
              "latency_s": _percentiles([r["latency"] for r in ok])}
    if args.workload == "text":
        tokens = sum(r["tokens"] for r in ok)
        report |= {"output_tokens_per_s": tokens / wall,
                   "time_to_first_token_s": _percentiles([r["ttft"] for r in ok if r["ttft"] is not None]),
                   "inter_token_latency_s": _percentiles([x for r in ok for x in r["itl"]])}
    return report


def _one_shot(args, body: dict, tmp: str, index: int) -> float:
    """Seconds for one `distgen generate` process doing this request (start-up and load included)."""
    cmd = [sys.executable, "-m", "distgen", "generate", args.workload, "--no-progress"] if args.workload != "text" \
        else [sys.executable, "-m", "distgen", "generate", "text"]
    for flag, value in (("--model", args.model), ("--parallel", args.parallel), ("--nproc", args.nproc),
                        ("--launcher", args.launcher if args.launcher != "auto" else None)):
        if value:
            cmd += [flag, str(value)]
    if args.workload == "text":
        cmd += ["--prompt", body["messages"][0]["content"], "--max-new-tokens", str(body["max_tokens"]), "--ignore-eos"]
    elif args.workload == "image":
        width, height = body["size"].split("x")
        cmd += ["--prompt", body["prompt"], "--width", width, "--height", height, "--steps", str(body["steps"]),
                "--seed", str(body["seed"]), "--out", os.path.join(tmp, f"{index}.png")]
    else:
        width, height = body["size"].split("x")
        cmd += ["--prompt", body["prompt"], "--frames", str(body["frames"]), "--width", width, "--height", height,
                "--steps", str(body["steps"]), "--seed", str(body["seed"]), "--out", os.path.join(tmp, f"{index}.mp4")]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        raise RuntimeError(f"one-shot run failed: {done.stderr[-2000:]}")
    return time.perf_counter() - started


def bench_serve(args) -> dict:
    if args.requests < 1:
        raise ConfigError(f"--requests must be >= 1, got {args.requests}")
    if args.rate <= 0:
        raise ConfigError(f"--rate must be > 0 (requests per second), got {args.rate}")
    if args.workload not in ("text", "image", "video"):
        raise ConfigError(f"--workload must be text, image or video, got {args.workload!r}")
    try:
        args.sizes = [int(s) for s in str(args.sizes).split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--sizes must be a comma list of pixel sizes, e.g. 64,128, got {args.sizes!r}") from None
    modes = [m.strip() for m in (args.compare or "").split(",") if m.strip()]
    if modes and args.workload != "text":
        raise ConfigError("--compare: batching modes are for --workload text")
    from distgen.runtime.continuous import BATCHING_MODES

    for mode in modes:
        if mode not in BATCHING_MODES:
            raise ConfigError(f"--compare: unknown batching mode {mode!r}; allowed: {', '.join(BATCHING_MODES)}")
    bodies = _requests(args)
    runs = {}
    for mode in modes or [None]:
        extra = [] if mode is None else ["--batching", mode]
        runs[mode] = _serve_and_drive(args, bodies, extra)
    startup, model, resident, log_name = runs[modes[0] if modes else None]
    report = {"workload": args.workload, "model": model, "parallel": args.parallel or "none",
              "requests": args.requests, "rate_per_s": args.rate, "seed": args.seed,
              "server_startup_seconds": startup, "resident": resident, "server_log": log_name}
    if args.workload == "text":
        report["lengths"] = (f"max_tokens uniform in {args.max_tokens} x [{1 - args.length_spread:g}, "
                             f"{1 + args.length_spread:g}]; prompts with 0-4 extra sentences (uniform), seed {args.seed}")
    if modes:
        report["modes"] = {mode: run[2] | {"server_startup_seconds": run[0], "server_log": run[3]}
                           for mode, run in runs.items()}
        if set(modes) == set(BATCHING_MODES):
            c, r = report["modes"]["continuous"], report["modes"]["request-level"]
            report["continuous_over_request_level"] = {
                "output_tokens_per_s": c["output_tokens_per_s"] / max(r["output_tokens_per_s"], 1e-9),
                "ttft_p99_s": [c["time_to_first_token_s"]["p99"], r["time_to_first_token_s"]["p99"]]}
        args.oneshot_requests = 0 if args.oneshot_requests == 4 else args.oneshot_requests  # default off here
    if args.oneshot_requests:
        with tempfile.TemporaryDirectory() as tmp:
            seconds = [_one_shot(args, body, tmp, i) for i, body in enumerate(bodies[: args.oneshot_requests])]
        report["one_shot"] = {
            "requests": len(seconds), "latency_s": _percentiles(seconds),
            "throughput_requests_per_s": len(seconds) / sum(seconds),
            "note": "one `distgen generate` process per request, run one after another (start-up and model load "
                    "included each time); the first --oneshot-requests of the same requests",
        }
        report["resident_over_one_shot_throughput"] = (resident["throughput_requests_per_s"]
                                                       / report["one_shot"]["throughput_requests_per_s"])
    return report


def _serve_and_drive(args, bodies: list[dict], extra: list[str]) -> tuple[float, str, dict, str]:
    """Start a server (its own ranks), drive the requests at it, stop it: (startup s, model id, report, log)."""
    import httpx

    from distgen.launch.local import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads_per_rank))
    log = tempfile.NamedTemporaryFile("w+", prefix="distgen-bench-serve-", suffix=".log", delete=False)
    started = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "distgen", "serve", *_server_args(args, port), *extra],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        while True:
            if server.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"the server exited: {log.read()[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.perf_counter() - started > args.timeout:
                raise RuntimeError("the server did not become healthy in time")
            time.sleep(0.3)
        startup = time.perf_counter() - started
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        resident = asyncio.run(_drive(url, model, bodies, args))
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
    return startup, model, resident, log.name
