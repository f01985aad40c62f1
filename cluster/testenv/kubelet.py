"""The test's kubelet: runs the pods bound to the fake nodes as local processes, and reports them.

For every pod the scheduler bound to one of its nodes it:
- gives the pod an address of its own on loopback (127.77.X.Y, stable per pod name), reported as
  ``status.podIP``; the pod's processes bind to it (``distgen serve --host $POD_IP``);
- resolves the container's environment as a kubelet does (values, ``fieldRef`` metadata.name /
  metadata.namespace / status.podIP / spec.nodeName, ``configMapKeyRef``, ``secretKeyRef``), and
  plays the cluster DNS for pod names under a headless Service (``POD.SERVICE``: replaced by that
  pod's address) and the pod's own network namespace for the group's rendezvous port
  (``MASTER_PORT``, ``DISTGEN_RAY_PORT``: a free port per leader address, since all "pods" share
  this machine's ports);
- runs ``command + args`` (``python`` is this interpreter) in a new session, ``GLOO_SOCKET_IFNAME=lo``;
- reports Running, then Ready from the container's readiness probe (HTTP GET on the pod's
  address), and Failed with the exit code when the process exits (no in-place restarts: the
  operator sees the failed pod);
- on deletion: SIGTERM to the process group, SIGKILL after the grace period, then removes the
  pod object (grace 0), as a kubelet confirms a deletion.

``command_for(pod) -> argv | None`` may replace a pod's command (the light tests run a stub that
only answers /health instead of `distgen serve`).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

POLL_S = 0.4


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Pod:
    def __init__(self, namespace: str, name: str, uid: str, ip: str, proc: subprocess.Popen, log_path: Path,
                 probe: tuple[str, int, str] | None, grace: int):
        self.namespace, self.name, self.uid, self.ip, self.proc = namespace, name, uid, ip, proc
        self.log_path, self.probe, self.grace = log_path, probe, grace
        self.ready = False
        self.reported: tuple | None = None
        self.started = _now()
        self.stopping = False


class FakeKubelet:
    def __init__(self, api_client, nodes: list[str], workdir: str | Path, command_for=None):
        from kubernetes import client

        self.core = client.CoreV1Api(api_client)
        self.nodes = set(nodes)
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.command_for = command_for
        self.pods: dict[str, Pod] = {}  # uid -> Pod
        self.ips: dict[tuple[str, str], str] = {}
        self.ports: dict[tuple[str, str, str], int] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="fake-kubelet", daemon=True)
        self.errors: list[str] = []
        self._finished: set[str] = set()  # uids whose process ended (never started again)

    # ------------------------------------------------------------------ public

    def start(self) -> "FakeKubelet":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for pod in list(self.pods.values()):
            self._kill(pod, grace=3)

    def process_of(self, namespace: str, name: str) -> Pod | None:
        with self._lock:
            return next((p for p in self.pods.values() if (p.namespace, p.name) == (namespace, name)), None)

    def kill(self, namespace: str, name: str, sig: int = signal.SIGKILL) -> None:
        """A fault: kill the pod's processes (its whole process group)."""
        pod = self.process_of(namespace, name)
        assert pod is not None, f"no process for pod {namespace}/{name}"
        os.killpg(pod.proc.pid, sig)

    def ip_of(self, namespace: str, name: str) -> str:
        with self._lock:
            key = (namespace, name)
            if key not in self.ips:
                n = len(self.ips) + 1
                self.ips[key] = f"127.77.{n // 250}.{n % 250 + 2}"
            return self.ips[key]

    # ------------------------------------------------------------------ loop

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._sync()
            except Exception as exc:  # keep the kubelet alive; the test sees the errors
                self.errors.append(repr(exc))
                if len(self.errors) > 200:
                    del self.errors[:100]
            self._stop.wait(POLL_S)

    def _sync(self) -> None:
        items = json.loads(self.core.list_pod_for_all_namespaces(_preload_content=False).data)["items"]
        seen = set()
        for pod in items:
            meta, spec = pod["metadata"], pod["spec"]
            if spec.get("nodeName") not in self.nodes:
                continue
            uid = meta["uid"]
            seen.add(uid)
            running = self.pods.get(uid)
            if meta.get("deletionTimestamp"):
                if running is None:
                    self._confirm_deletion(meta)
                elif not running.stopping:
                    running.stopping = True
                    threading.Thread(target=self._terminate, args=(running, meta), daemon=True).start()
                continue
            phase = (pod.get("status") or {}).get("phase")
            if running is None and phase not in ("Failed", "Succeeded") and uid not in self._finished:
                self._run(pod)
            elif running is not None and not running.stopping:
                self._report(running, pod)
        for uid in list(self.pods):
            if uid not in seen:  # deleted without us (force deletion): nothing may outlive it
                pod = self.pods.pop(uid)
                threading.Thread(target=self._kill, args=(pod, 1), daemon=True).start()

    # ------------------------------------------------------------------ pods

    def _resolve_env(self, pod: dict, ip: str) -> dict[str, str]:
        meta, spec = pod["metadata"], pod["spec"]
        ns = meta["namespace"]
        container = spec["containers"][0]
        env: dict[str, str] = {}
        fields = {"metadata.name": meta["name"], "metadata.namespace": ns, "status.podIP": ip,
                  "spec.nodeName": spec.get("nodeName", ""), "metadata.uid": meta["uid"]}
        for item in container.get("env") or []:
            if "value" in item:
                env[item["name"]] = item["value"]
                continue
            src = item.get("valueFrom") or {}
            if "fieldRef" in src:
                env[item["name"]] = fields[src["fieldRef"]["fieldPath"]]
            elif "configMapKeyRef" in src:
                ref = src["configMapKeyRef"]
                cm = json.loads(self.core.read_namespaced_config_map(ref["name"], ns, _preload_content=False).data)
                env[item["name"]] = (cm.get("data") or {})[ref["key"]]
            elif "secretKeyRef" in src:
                ref = src["secretKeyRef"]
                secret = json.loads(self.core.read_namespaced_secret(ref["name"], ns, _preload_content=False).data)
                env[item["name"]] = base64.b64decode((secret.get("data") or {})[ref["key"]]).decode()
        # the cluster DNS for POD.SERVICE names, and a rendezvous port per leader (own network namespace)
        dns = re.compile(r"^([a-z0-9-]+)\.([a-z0-9-]+)$")
        for key, value in list(env.items()):
            m = dns.match(value)
            if m and m.group(1).startswith(m.group(2) + "-"):
                env[key] = self.ip_of(ns, m.group(1))
        leader = env.get("MASTER_ADDR", "")
        for port_var in ("MASTER_PORT", "DISTGEN_RAY_PORT"):
            if port_var in env and leader:
                with self._lock:
                    env[port_var] = str(self.ports.setdefault((ns, leader, port_var), _free_port()))
        return env

    def _probe_target(self, container: dict, ip: str) -> tuple[str, int, str] | None:
        probe = container.get("readinessProbe") or {}
        get = probe.get("httpGet")
        if not get:
            return None
        port = get["port"]
        if isinstance(port, str):
            port = next(p["containerPort"] for p in container.get("ports") or [] if p.get("name") == port)
        return ip, int(port), get.get("path", "/")

    def _run(self, pod: dict) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        ns, name = meta["namespace"], meta["name"]
        ip = self.ip_of(ns, name)
        container = spec["containers"][0]
        try:
            env = self._resolve_env(pod, ip)
        except Exception as exc:  # e.g. a ConfigMap not there yet: CreateContainerConfigError, retried
            self._patch(ns, name, {"phase": "Pending", "podIP": ip, "conditions": [
                {"type": "Ready", "status": "False", "reason": "CreateContainerConfigError", "message": str(exc)[:200]}]})
            return
        argv = (self.command_for(pod) if self.command_for else None) or [
            *(container.get("command") or []), *(container.get("args") or [])]
        argv = [sys.executable if a == "python" else a for a in argv]
        log_path = self.dir / f"{ns}.{name}.{meta['uid'][:8]}.log"
        log = open(log_path, "w")
        process_env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBECONFIG",))}
        process_env.update(env)
        process_env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        process_env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"
        proc = subprocess.Popen(argv, env=process_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=str(self.dir))
        log.close()
        running = Pod(ns, name, meta["uid"], ip, proc, log_path, self._probe_target(container, ip),
                      int(spec.get("terminationGracePeriodSeconds", 30)))
        with self._lock:
            self.pods[meta["uid"]] = running
        self._report(running, pod)

    def _probe(self, pod: Pod) -> bool:
        if pod.probe is None:
            return True
        host, port, path = pod.probe
        try:
            with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=2) as r:
                return 200 <= r.status < 400
        except Exception:
            return False

    def _report(self, pod: Pod, obj: dict) -> None:
        code = pod.proc.poll()
        name = obj["spec"]["containers"][0]["name"]
        if code is not None:
            tail = ""
            with contextlib.suppress(OSError):
                tail = pod.log_path.read_text()[-300:].strip().replace("\n", " | ")
            status = {"phase": "Failed", "podIP": pod.ip, "reason": "Error",
                      "message": f"container {name} exited with code {code}: {tail}"[:900],
                      "conditions": [{"type": "Ready", "status": "False", "reason": "PodFailed",
                                      "lastTransitionTime": _now()}],
                      "containerStatuses": [{"name": name, "ready": False, "restartCount": 0, "image": "local",
                                             "imageID": "", "state": {"terminated": {
                                                 "exitCode": code, "reason": "Error", "finishedAt": _now(),
                                                 "startedAt": pod.started}}}]}
            self._patch(pod.namespace, pod.name, status)
            with self._lock:
                self.pods.pop(pod.uid, None)
                self._finished.add(pod.uid)
            return
        ready = self._probe(pod)
        key = ("Running", ready)
        if pod.reported == key:
            return
        status = {"phase": "Running", "podIP": pod.ip, "hostIP": "127.0.0.1", "startTime": pod.started,
                  "conditions": [{"type": "Ready", "status": "True" if ready else "False",
                                  "lastTransitionTime": _now()},
                                 {"type": "ContainersReady", "status": "True" if ready else "False",
                                  "lastTransitionTime": _now()},
                                 {"type": "Initialized", "status": "True", "lastTransitionTime": pod.started},
                                 {"type": "PodScheduled", "status": "True", "lastTransitionTime": pod.started}],
                  "containerStatuses": [{"name": name, "ready": ready, "restartCount": 0, "image": "local",
                                         "imageID": "", "started": True,
                                         "state": {"running": {"startedAt": pod.started}}}]}
        if self._patch(pod.namespace, pod.name, status):
            pod.reported = key

    def _patch(self, ns: str, name: str, status: dict) -> bool:
        from kubernetes.client.rest import ApiException

        try:
            self.core.patch_namespaced_pod_status(name, ns, {"status": status}, _preload_content=False)
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise

    def _kill(self, pod: Pod, grace: float) -> None:
        if pod.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pod.proc.pid, signal.SIGTERM)
            try:
                pod.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pod.proc.pid, signal.SIGKILL)  # whatever of the group is left
        with contextlib.suppress(subprocess.TimeoutExpired):
            pod.proc.wait(5)

    def _terminate(self, pod: Pod, meta: dict) -> None:
        self._kill(pod, grace=min(pod.grace, 15))
        with self._lock:
            self.pods.pop(pod.uid, None)
            self._finished.add(pod.uid)
        self._confirm_deletion(meta)

    def _confirm_deletion(self, meta: dict) -> None:
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        try:
            self.core.delete_namespaced_pod(meta["name"], meta["namespace"], grace_period_seconds=0,
                                            body=client.V1DeleteOptions(
                                                grace_period_seconds=0,
                                                preconditions=client.V1Preconditions(uid=meta["uid"])),
                                            _preload_content=False)
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise
