"""Helpers for the serving tests: start a real ``distgen serve`` process on loopback, wait for it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import httpx

from distgen.launch.local import free_port


class Server:
    def __init__(self, args: list[str], env: dict | None = None, ready_timeout: float = 240.0, expect_ready=True):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = f"/tmp/distgen-serve-{self.port}.log"
        self.log = open(self.log_path, "w")
        environment = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
        self.proc = subprocess.Popen([sys.executable, "-m", "distgen", "serve", "--port", str(self.port), *args],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=environment,
                                     start_new_session=True)
        if expect_ready:
            self.wait_ready(ready_timeout)

    def wait_ready(self, timeout: float = 240.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.output()}")
            with contextlib.suppress(httpx.TransportError):
                response = httpx.get(self.url + "/health", timeout=5)
                if response.status_code == 200:
                    return response.json()
            time.sleep(0.3)
        raise TimeoutError(f"the server was not healthy within {timeout} s:\n{self.output()}")

    def health(self) -> tuple[int, dict]:
        response = httpx.get(self.url + "/health", timeout=10)
        return response.status_code, response.json()

    def output(self) -> str:
        self.log.flush()
        with open(self.log_path) as f:
            return f.read()[-6000:]

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (the server drains), then the server's exit code."""
        if self.log.closed:
            return self.proc.returncode
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        # nothing of the group may outlive the server
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()
        return self.proc.returncode

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def metric(url: str, name: str) -> float:
    """A Prometheus sample's value from /metrics (first sample of that exact name)."""
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)
