"""A real Kubernetes 1.20 control plane on loopback, for the operator's tests.

etcd, kube-apiserver (token authentication, RBAC), kube-controller-manager (garbage collection,
the StatefulSet and endpoints controllers) and kube-scheduler, each a local process bound to
127.0.0.1 on free ports, state in a temporary folder; fake GPU nodes (``nvidia.com/gpu``
capacity) registered as Node objects. No kubelet: see ``kubelet.py`` beside this file.

    python cluster/testenv/controlplane.py up      # start, print KUBECONFIG, wait for Ctrl-C

The binaries come from ``binaries.sh`` (DISTGEN_K8S_BIN, the cache, the prebuilt set, or a build).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import ssl
from pathlib import Path

HERE = Path(__file__).resolve().parent
ADMIN_TOKEN = "distgen-test-admin-token"
# a user with no groups: the tests bind it to cluster/deploy/rbac.yaml's ClusterRole only, and run the
# operator as it (so the RBAC is checked to be enough)
OPERATOR_TOKEN, OPERATOR_USER = "distgen-test-operator-token", "distgen-operator"
# components that reconcile nothing the tests need (or want a kubelet heartbeat: nodelifecycle would
# taint the fake nodes unreachable after 40 s)
DISABLED_CONTROLLERS = ("nodelifecycle", "nodeipam", "cloud-node-lifecycle", "route", "service", "attachdetach",
                        "persistentvolume-binder", "persistentvolume-expander", "pvc-protection", "pv-protection",
                        "ttl", "bootstrapsigner", "tokencleaner", "csrsigning", "csrapproving", "csrcleaner")


class Unavailable(RuntimeError):
    """The binaries (or etcd) cannot be had here: the tests skip with this message."""


def binaries() -> Path:
    proc = subprocess.run(["bash", str(HERE / "binaries.sh")], capture_output=True, text=True)
    if proc.returncode == 3:
        raise Unavailable(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "binaries.sh: unavailable")
    if proc.returncode:
        raise RuntimeError(f"cluster/testenv/binaries.sh failed ({proc.returncode}):\n{proc.stderr}")
    return Path(proc.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ControlPlane:
    def __init__(self, bin_dir: Path | None = None, workdir: str | None = None):
        self.bin = Path(bin_dir) if bin_dir else binaries()
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="distgen-k8s-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.kubeconfig = str(self.dir / "kubeconfig")
        self.operator_kubeconfig = str(self.dir / "kubeconfig.operator")

    # ------------------------------------------------------------------ processes

    def _start(self, name: str, argv: list[str]) -> None:
        log = open(self.dir / f"{name}.log", "w")
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def log(self, name: str, tail: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return (self.dir / f"{name}.log").read_text()[-tail:]
        return ""

    def _wait(self, what: str, check, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log(name)}")
            with contextlib.suppress(Exception):
                if check():
                    return
            time.sleep(0.3)
        raise TimeoutError(f"{what} not up within {timeout} s:\n" + "\n".join(self.log(n) for n in self.procs))

    def start(self) -> "ControlPlane":
        etcd_port, peer_port = free_port(), free_port()
        self._start("etcd", ["etcd", "--data-dir", str(self.dir / "etcd"), "--name", "distgen-test",
                             "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
                             "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
                             "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
                             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
                             "--initial-cluster", f"distgen-test=http://127.0.0.1:{peer_port}",
                             "--log-level", "warn"])
        key, pub = self.dir / "sa.key", self.dir / "sa.pub"
        subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True)
        subprocess.run(["openssl", "rsa", "-in", str(key), "-pubout", "-out", str(pub)], check=True, capture_output=True)
        (self.dir / "tokens.csv").write_text(f'{ADMIN_TOKEN},admin,admin,"system:masters"\n'
                                             f'{OPERATOR_TOKEN},{OPERATOR_USER},{OPERATOR_USER}\n')
        certs = self.dir / "certs"
        self._wait("etcd", lambda: urllib.request.urlopen(f"http://127.0.0.1:{etcd_port}/health", timeout=2), 30)
        self._start("kube-apiserver", [
            str(self.bin / "kube-apiserver"), f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={self.port}",
            "--insecure-port=0", f"--cert-dir={certs}", f"--token-auth-file={self.dir / 'tokens.csv'}",
            "--authorization-mode=RBAC", "--service-cluster-ip-range=10.96.0.0/16",
            f"--service-account-key-file={pub}", f"--service-account-signing-key-file={key}",
            "--service-account-issuer=https://kubernetes.default.svc", "--api-audiences=distgen-test",
            # no kubelet mounts tokens here: pods need no service-account token volumes
            "--disable-admission-plugins=ServiceAccount", "--allow-privileged=true",
            "--enable-priority-and-fairness=false", "--event-ttl=1h", "-v=0"])
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE

        def ready():
            req = urllib.request.Request(self.url + "/readyz", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
            return urllib.request.urlopen(req, timeout=2, context=context).status == 200

        self._wait("kube-apiserver", ready, 90)
        self.write_kubeconfig(self.kubeconfig, ADMIN_TOKEN)
        self.write_kubeconfig(self.operator_kubeconfig, OPERATOR_TOKEN)
        disabled = ",".join(f"-{c}" for c in DISABLED_CONTROLLERS)
        self._start("kube-controller-manager", [
            str(self.bin / "kube-controller-manager"), f"--kubeconfig={self.kubeconfig}", "--leader-elect=false",
            f"--controllers=*,{disabled}", f"--service-account-private-key-file={key}", "--port=0",
            "--secure-port=0", "--concurrent-gc-syncs=5", "--concurrent-statefulset-syncs=5", "-v=0"])
        self._start("kube-scheduler", [
            str(self.bin / "kube-scheduler"), f"--kubeconfig={self.kubeconfig}", "--leader-elect=false",
            "--port=0", "--secure-port=0", "-v=0"])
        time.sleep(0.5)
        for name in ("kube-controller-manager", "kube-scheduler"):
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited:\n{self.log(name)}")
        return self

    def write_kubeconfig(self, path: str, token: str) -> None:
        config = {"apiVersion": "v1", "kind": "Config", "current-context": "test",
                  "clusters": [{"name": "test", "cluster": {"server": self.url, "insecure-skip-tls-verify": True}}],
                  "users": [{"name": "admin", "user": {"token": token}}],
                  "contexts": [{"name": "test", "context": {"cluster": "test", "user": "admin",
                                                            "namespace": "default"}}]}
        Path(path).write_text(json.dumps(config))

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        if not os.environ.get("DISTGEN_K8S_KEEP"):
            shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------------ helpers

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(["kubectl", f"--kubeconfig={self.kubeconfig}", *args], input=input, text=True,
                              capture_output=True, timeout=60)
        if check and proc.returncode:
            raise RuntimeError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def api_client(self):
        from kubernetes import client, config

        return config.new_client_from_config(config_file=self.kubeconfig)

    def add_gpu_nodes(self, names: list[str], gpus: int = 1, cpu: str = "16", memory: str = "64Gi") -> None:
        from kubernetes import client

        core = client.CoreV1Api(self.api_client())
        for name in names:
            core.create_node({"apiVersion": "v1", "kind": "Node",
                              "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name,
                                                                    "distgen.io/fake-node": "true"}}})
            capacity = {"cpu": cpu, "memory": memory, "pods": "110", "nvidia.com/gpu": str(gpus)}
            now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            core.patch_node_status(name, {"status": {
                "capacity": capacity, "allocatable": capacity,
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                "message": "the test kubelet", "lastHeartbeatTime": now,
                                "lastTransitionTime": now}],
                "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}]}})
            # the admission plugin TaintNodesByCondition taints a new node not-ready; the node lifecycle
            # controller (off here: it wants kubelet heartbeats) would lift it once Ready
            core.patch_node(name, {"spec": {"taints": None}})


def main(argv: list[str]) -> int:
    if argv[:1] != ["up"]:
        print(__doc__)
        return 2
    plane = ControlPlane().start()
    plane.add_gpu_nodes([f"gpu-node-{i}" for i in range(4)])
    print(f"export KUBECONFIG={plane.kubeconfig}", flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        plane.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
