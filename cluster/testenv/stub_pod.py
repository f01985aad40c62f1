"""A stand-in for a pod's processes in the light tests: answers /health on the pod's address.

It reads what the real pod would (POD_IP, the serve port from DISTGEN_SERVE_ARGS) and serves
``/health`` (200 after STUB_READY_AFTER seconds, default 1) and ``/info`` (the pod's view: its
name, group, serve options, leader address) until SIGTERM; exit code 0 then.
"""

import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

START = time.monotonic()
READY_AFTER = float(os.environ.get("STUB_READY_AFTER", "1"))
ARGS = json.loads(os.environ.get("DISTGEN_SERVE_ARGS", "[]"))
PORT = int(ARGS[ARGS.index("--port") + 1]) if "--port" in ARGS else 8000
INFO = {k: os.environ.get(k, "") for k in ("POD_NAME", "POD_IP", "DISTGEN_GROUP", "DISTGEN_LEADER_ADDRESS",
                                            "DISTGEN_LAUNCHER", "MASTER_ADDR", "DISTGEN_NNODES")}
INFO["args"] = ARGS


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        if self.path == "/health":
            ok = time.monotonic() - START >= READY_AFTER
            self.send_response(200 if ok else 503)
            body = b"{}"
        elif self.path == "/info":
            self.send_response(200)
            body = json.dumps(INFO).encode()
        else:
            self.send_response(404)
            body = b"{}"
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer((os.environ["POD_IP"], PORT), Handler)
signal.signal(signal.SIGTERM, lambda *a: threading.Thread(target=server.shutdown).start())
server.serve_forever()
sys.exit(0)
