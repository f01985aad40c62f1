"""What every pod of a group runs: ``python -m distgen.cluster.pod``.

The pod's environment (set by :mod:`distgen.cluster.desired`) says the launcher, the group's
leader address, nnodes and nproc-per-node; the node rank is the StatefulSet ordinal at the end
of ``POD_NAME``. This process supervises what it starts and exits (non-zero) as soon as any of it
exits, so a failed rank shows as a failed pod and the operator recreates the group as a unit:

- ray, pod 0: ``ray start --head``, then ``distgen serve --launcher ray`` against it;
- ray, pod k: ``ray start --address LEADER:6379 --block``;
- torchrun, pod k: ``torchrun --nnodes N --node-rank k --nproc-per-node G --master-addr LEADER
  -m distgen serve --launcher torchrun`` (rank 0, on pod 0, serves HTTP).

A worker pod answers ``/health`` on the serve port itself (200 while its processes run), so one
probe definition fits every pod of the StatefulSet.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def node_rank(pod_name: str) -> int:
    try:
        return int(pod_name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        raise SystemExit(f"distgen.cluster.pod: POD_NAME {pod_name!r} does not end in a StatefulSet ordinal") from None


def commands(env: dict[str, str]) -> list[list[str]]:
    """The processes this pod runs, in order (the last one is the main one)."""
    launcher = env.get("DISTGEN_LAUNCHER", "ray")
    rank = node_rank(env["POD_NAME"])
    ip = env["POD_IP"]
    leader = env["DISTGEN_LEADER_ADDRESS"]
    nnodes, nproc = env["DISTGEN_NNODES"], env["DISTGEN_NPROC_PER_NODE"]
    serve = json.loads(env.get("DISTGEN_SERVE_ARGS", "[]"))
    py = sys.executable
    distgen_serve = ["-m", "distgen", "serve", *serve, "--host", ip]
    if launcher == "torchrun":
        # torchrun's WORLD_SIZE gives the ranks; and its parser would take --nproc for an ambiguous
        # abbreviation of its own --nproc-per-node, even after the module name
        if "--nproc" in serve:
            i = serve.index("--nproc")
            del serve[i:i + 2]
        distgen_serve = ["-m", "distgen", "serve", *serve, "--host", ip]
        return [[py, "-m", "torch.distributed.run", "--nnodes", nnodes, "--node-rank", str(rank),
                 "--nproc-per-node", nproc, "--master-addr", leader, "--master-port", env.get("MASTER_PORT", "29500"),
                 "--max-restarts", "0", *distgen_serve, "--launcher", "torchrun"]]
    if launcher != "ray":
        raise SystemExit(f"distgen.cluster.pod: DISTGEN_LAUNCHER {launcher!r}; allowed: ray, torchrun")
    port = env.get("DISTGEN_RAY_PORT", "6379")
    ray = [py, "-m", "ray.scripts.scripts", "start", "--node-ip-address", ip, "--num-gpus", nproc,
           "--disable-usage-stats"]
    if rank == 0:
        return [[*ray, "--head", "--port", port, "--include-dashboard", "false"],
                [py, *distgen_serve, "--launcher", "ray", "--ray-address", f"{ip}:{port}"]]
    return [[*ray, "--address", f"{leader}:{port}", "--block"]]


def _serve_port(env: dict[str, str]) -> int:
    args = json.loads(env.get("DISTGEN_SERVE_ARGS", "[]"))
    return int(args[args.index("--port") + 1]) if "--port" in args else 8000


def _health_server(host: str, port: int, alive) -> ThreadingHTTPServer:
    class Health(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            ok = self.path == "/health" and alive()
            self.send_response(200 if ok else 503)
            self.end_headers()
            self.wfile.write(b'{"status": "ok"}' if ok else b'{"status": "down"}')

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer((host, port), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> int:
    env = dict(os.environ)
    steps = commands(env)
    children: list[subprocess.Popen] = []
    stopping = []

    def stop(signum, frame):
        stopping.append(signum)
        for child in reversed(children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    *setup, main_command = steps
    for command in setup:  # ray start --head: returns once the head runs
        code = subprocess.call(command)
        if code:
            print(f"distgen.cluster.pod: {' '.join(command)} exited with {code}", file=sys.stderr)
            return code
    children.append(subprocess.Popen(main_command))
    if node_rank(env["POD_NAME"]) != 0:
        _health_server(env["POD_IP"], _serve_port(env), lambda: children[-1].poll() is None)
    while not stopping:
        code = children[-1].poll()
        if code is not None:
            print(f"distgen.cluster.pod: {main_command[1:4]} exited with {code}", file=sys.stderr, flush=True)
            break
        time.sleep(0.5)
    for child in children:
        try:
            child.wait(60)
        except subprocess.TimeoutExpired:
            child.kill()
    if setup:  # the Ray head this pod started
        subprocess.call([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"])
    code = children[-1].returncode
    return 0 if stopping and code in (0, -signal.SIGTERM) else (code or 1)


if __name__ == "__main__":
    sys.exit(main())
