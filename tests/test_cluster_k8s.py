"""The operator against a real Kubernetes 1.20 API server (make test-k8s; marker k8s).

cluster/testenv starts etcd, kube-apiserver, kube-controller-manager and kube-scheduler on
loopback and registers fake GPU nodes; the test plays the kubelet (cluster/testenv/kubelet.py:
each bound pod's command runs as a local process with its own loopback address). The operator
runs as its own process (``python -m distgen.cluster run``), as a user would run it.

Most tests run a stub in each pod (cluster/testenv/stub_pod.py answers /health) to exercise the
operator's decisions quickly; test_real_groups_serve_and_a_failed_group_is_recreated runs the
pods' real command: torchrun nodes forming 2 groups x 2 nodes of `distgen serve` on a tiny model.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
import warnings
from pathlib import Path

import pytest

pytestmark = [pytest.mark.k8s, pytest.mark.filterwarnings("ignore:Unverified HTTPS request")]

kubernetes = pytest.importorskip("kubernetes", reason="the k8s extra is not installed (pip install -e '.[k8s]')")
pytest.importorskip("kopf", reason="the k8s extra is not installed (pip install -e '.[k8s]')")
yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "cluster" / "testenv"))
import controlplane  # noqa: E402
from kubelet import FakeKubelet  # noqa: E402

from distgen.cluster import desired as D  # noqa: E402

NODES = [f"gpu-node-{i}" for i in range(8)]  # one nvidia.com/gpu each: one pod per node
STUB = [sys.executable, str(ROOT / "cluster" / "testenv" / "stub_pod.py")]
REAL_NAMESPACES: set[str] = set()  # pods here run their real command; elsewhere the stub

warnings.filterwarnings("ignore", message="Unverified HTTPS request")


class Operator:
    def __init__(self, kubeconfig: str, logdir: Path):
        self.kubeconfig, self.logdir, self.proc, self.runs = kubeconfig, logdir, None, 0

    def start(self) -> None:
        self.runs += 1
        self.log_path = self.logdir / f"operator.{self.runs}.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "distgen.cluster", "run", "--kubeconfig", self.kubeconfig],
                                     stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT,
                                     env=dict(os.environ, PYTHONWARNINGS="ignore"), start_new_session=True)

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)

    def log(self) -> str:
        return self.log_path.read_text()[-4000:]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    try:
        plane = controlplane.ControlPlane()
    except controlplane.Unavailable as exc:
        pytest.skip(f"no Kubernetes control plane here: {exc}")
    plane.start()
    work = tmp_path_factory.mktemp("k8s")
    kubelet = operator = None
    try:
        deploy = ROOT / "cluster" / "deploy"
        for part in ("crd.yaml", "namespace.yaml", "rbac.yaml"):
            plane.kubectl("apply", "-f", str(deploy / part))
        # the operator runs as a user with cluster/deploy/rbac.yaml's ClusterRole and nothing else
        plane.kubectl("create", "clusterrolebinding", "distgen-operator-test-user", "--clusterrole=distgen-operator",
                      f"--user={controlplane.OPERATOR_USER}")
        plane.add_gpu_nodes(NODES, gpus=1)
        kubelet = FakeKubelet(plane.api_client(), NODES, work / "pods",
                              command_for=lambda pod: None if pod["metadata"]["namespace"] in REAL_NAMESPACES
                              else STUB).start()
        _wait(lambda: "distgenservices" in plane.kubectl("api-resources", "--api-group=distgen.io").stdout, 30,
              "the CRD to be served")
        operator = Operator(plane.operator_kubeconfig, work)
        operator.start()
        yield Env(plane, kubelet, operator)
    finally:
        if operator:
            operator.stop()
        if kubelet:
            kubelet.stop()
        plane.stop()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    """A tiny random Llama with a tokenizer, saved with save_pretrained (the pods load it by path)."""
    from distgen.models.tiny_llm import save_chat_llama

    return str(save_chat_llama(tmp_path_factory.mktemp("model") / "tiny-chat-llama"))


@pytest.fixture
def ns(env):
    """A namespace of the test's own; its DistgenServices deleted (and their pods gone: the fake
    nodes' GPUs freed) afterwards."""
    name = env.namespace()
    yield name
    env.plane.kubectl("-n", name, "delete", "dgs", "--all", "--wait=false", check=False)
    _wait(lambda: not env.pods(name), 90, f"the pods of {name} to go", env)


@pytest.fixture
def real_ns(env):
    name = env.namespace(real=True)
    yield name
    env.plane.kubectl("-n", name, "delete", "dgs", "--all", "--wait=false", check=False)
    _wait(lambda: not env.pods(name), 90, f"the pods of {name} to go", env)


class Env:
    def __init__(self, plane, kubelet, operator):
        self.plane, self.kubelet, self.operator = plane, kubelet, operator
        api = plane.api_client()
        self.core = kubernetes.client.CoreV1Api(api)
        self.apps = kubernetes.client.AppsV1Api(api)
        self.custom = kubernetes.client.CustomObjectsApi(api)

    def namespace(self, real: bool = False) -> str:
        ns = f"t-{uuid.uuid4().hex[:6]}"
        self.core.create_namespace({"metadata": {"name": ns}})
        if real:
            REAL_NAMESPACES.add(ns)
        return ns

    def apply(self, ns: str, obj: dict) -> subprocess.CompletedProcess:
        return self.plane.kubectl("-n", ns, "apply", "-f", "-", input=yaml.safe_dump(obj))

    def get(self, ns: str, name: str) -> dict:
        return self.custom.get_namespaced_custom_object("distgen.io", "v1alpha1", ns, "distgenservices", name)

    def cond(self, ns: str, name: str) -> dict:
        st = self.get(ns, name).get("status") or {}
        return {c["type"]: c for c in st.get("conditions") or []}

    def sets(self, ns: str) -> list:
        return self.apps.list_namespaced_stateful_set(ns).items

    def pods(self, ns: str) -> list:
        return self.core.list_namespaced_pod(ns).items

    def events(self, ns: str, name: str) -> list[tuple[str, str]]:
        return [(e.reason, e.message) for e in self.core.list_namespaced_event(ns).items
                if e.involved_object.name == name and e.involved_object.kind == "DistgenService"]

    def wait_ready(self, ns: str, name: str, ready: int, timeout: float = 90, updated: int | None = None) -> dict:
        def check():
            st = self.get(ns, name).get("status") or {}
            c = {c["type"]: c for c in st.get("conditions") or []}
            return (st.get("readyReplicas") == ready and c.get("Ready", {}).get("status") == "True"
                    and (updated is None or st.get("updatedReplicas") == updated)
                    and c.get("Progressing", {}).get("status") == "False"
                    and st.get("observedGeneration") == self.get(ns, name)["metadata"]["generation"])

        _wait(check, timeout, f"{ns}/{name} to have {ready} ready groups", self)
        return self.get(ns, name)

    def diagnose(self) -> str:
        out = [self.operator.log()[-2500:], "kubelet errors: " + "; ".join(self.kubelet.errors[-5:])]
        return "\n".join(out)


def _wait(check, timeout: float, what: str, env: Env | None = None, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except kubernetes.client.rest.ApiException as exc:
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last error {last})\n"
                         + (env.diagnose() if env else ""))


def service(name: str, replicas: int = 2, parallel: str = "tp=2", nodes: int = 2, **over) -> dict:
    spec = {"model": {"source": "tiny"}, "workload": "text", "parallel": parallel,
            "topology": {"nodesPerReplica": nodes, "gpusPerNode": 1}, "replicas": replicas, "launcher": "torchrun",
            "resources": {"limits": {"nvidia.com/gpu": 1}}, "probes": {"periodSeconds": 1}}
    spec.update(over)
    return {"apiVersion": "distgen.io/v1alpha1", "kind": "DistgenService", "metadata": {"name": name}, "spec": spec}


# ---------------------------------------------------------------------------------------------- schema


def test_schema_defaults_and_rejections(env, ns):
    env.apply(ns, {"apiVersion": "distgen.io/v1alpha1", "kind": "DistgenService", "metadata": {"name": "minimal"},
                   "spec": {"model": {"source": "smollm2"}, "replicas": 0}})
    spec = env.get(ns, "minimal")["spec"]
    assert (spec["workload"], spec["launcher"], spec["image"]) == ("text", "ray", "distgen:latest")
    assert spec["topology"] == {"nodesPerReplica": 1, "gpusPerNode": 1}
    assert spec["rollout"] == {"maxSurge": 0, "maxUnavailable": 1}
    assert spec["serve"]["port"] == 8000 and spec["serve"]["maxQueued"] == 64
    bad = [({"launcher": "mpirun"}, 'spec.launcher: Unsupported value: "mpirun"'),
           ({"replicas": -1}, "spec.replicas: Invalid value: -1"),
           ({"topology": {"nodesPerReplica": 0}}, "spec.topology.nodesPerReplica: Invalid value: 0"),
           ({"workload": "audio"}, 'spec.workload: Unsupported value: "audio"'),
           ({"parallel": "tp = 2"}, "spec.parallel in body should match"),
           ({"model": {}}, "spec.model.source: Required value")]
    for change, message in bad:
        obj = service("bad")
        obj["spec"].update(change)
        # --validate=false: the API server's own validation, not kubectl's
        proc = env.plane.kubectl("-n", ns, "apply", "--validate=false", "-f", "-", input=yaml.safe_dump(obj),
                                 check=False)
        assert proc.returncode != 0 and message in proc.stderr, (change, proc.stderr)


def test_invalid_spec_gets_the_cli_message_and_nothing_is_created(env, ns, tiny_llama):
    # what the CLI prints for the same plan on one rank (its own process, started first: it takes a while)
    cli = subprocess.Popen([sys.executable, "-m", "distgen", "serve", "--model", tiny_llama, "--parallel", "tp=4",
                            "--nproc", "1"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    env.apply(ns, service("wrong", parallel="tp=4", nodes=1))
    _wait(lambda: env.cond(ns, "wrong").get("Ready", {}).get("reason") == "InvalidSpec", 30, "InvalidSpec", env)
    ready = env.cond(ns, "wrong")["Ready"]
    assert ready["status"] == "False"
    _, err = cli.communicate(timeout=180)
    assert cli.returncode == 2
    cli_message = err.strip().splitlines()[-1].removeprefix("distgen: error: ")
    assert cli_message.startswith("--parallel: the product of the degrees (tp=4 = 4) must equal the number of ranks")
    assert ready["message"].startswith(cli_message)
    assert "spec.topology.nodesPerReplica 1 x gpusPerNode 1 = 1" in ready["message"]
    time.sleep(2)
    assert env.sets(ns) == [] and env.core.list_namespaced_service(ns).items == []
    assert [c.metadata.name for c in env.core.list_namespaced_config_map(ns).items] in ([], ["kube-root-ca.crt"])
    assert ("InvalidSpec", ready["message"]) in env.events(ns, "wrong")
    # fixed: the operator goes on
    env.plane.kubectl("-n", ns, "patch", "dgs", "wrong", "--type=merge", "-p",
                      json.dumps({"spec": {"parallel": "tp=1", "replicas": 1}}))
    env.wait_ready(ns, "wrong", 1, timeout=60)


# ---------------------------------------------------------------------------------------------- lifecycle


def _owned_by(obj, uid: str) -> bool:
    refs = obj.metadata.owner_references or []
    return any(r.uid == uid and r.controller and r.kind == "DistgenService" for r in refs)


def test_create_scale_and_delete(env, ns):
    env.apply(ns, service("svc"))
    obj = env.wait_ready(ns, "svc", 2)
    uid = obj["metadata"]["uid"]
    sets = {s.metadata.name: s for s in env.sets(ns)}
    assert sorted(sets) == ["svc-0", "svc-1"]
    for s in sets.values():
        assert _owned_by(s, uid) and s.spec.replicas == 2 and s.spec.pod_management_policy == "Parallel"
    services = {s.metadata.name: s for s in env.core.list_namespaced_service(ns).items}
    assert sorted(services) == ["svc", "svc-0", "svc-1"]
    assert services["svc-0"].spec.cluster_ip == "None" and services["svc-0"].spec.publish_not_ready_addresses
    assert all(_owned_by(s, uid) for s in services.values())
    assert _owned_by(env.core.read_namespaced_secret("svc-api-key", ns), uid)
    cms = [c for c in env.core.list_namespaced_config_map(ns).items if c.metadata.name.startswith("svc-serve-")]
    assert len(cms) == 1 and _owned_by(cms[0], uid)
    # the client Service's endpoints are the two leaders (pod 0 of each group), ready. (EndpointSlices:
    # the Endpoints object refuses the loopback addresses the test's pods have.)
    leaders = sorted(env.kubelet.ip_of(ns, f"svc-{i}-0") for i in range(2))

    def client_endpoints():
        slices = json.loads(env.plane.kubectl("-n", ns, "get", "endpointslices", "-l",
                                              "kubernetes.io/service-name=svc", "-o", "json").stdout)["items"]
        return sorted(a for s in slices for e in s.get("endpoints") or [] if e["conditions"].get("ready")
                      for a in e["addresses"])

    _wait(lambda: client_endpoints() == leaders, 30, "client Service endpoints", env)
    st = obj["status"]
    assert (st["replicas"], st["readyReplicas"], st["updatedReplicas"], st["ready"]) == (2, 2, 2, "2/2")
    assert [g["phase"] for g in st["groups"]] == ["Ready", "Ready"]
    table = env.plane.kubectl("-n", ns, "get", "dgs").stdout.splitlines()
    assert table[0].split() == ["NAME", "MODEL", "PLAN", "READY", "REPLICAS", "AGE"]
    assert table[1].split()[:2] == ["svc", "tiny"] and "tp=2 on 2x1" in table[1] and " 2/2 " in table[1]
    # the pods saw the group's environment
    info = json.loads(_get(f"http://{env.kubelet.ip_of(ns, 'svc-1-1')}:8000/info"))
    assert info["DISTGEN_GROUP"] == "svc-1" and info["MASTER_ADDR"] == env.kubelet.ip_of(ns, "svc-1-0")
    # scale subresource: 2 -> 3 -> 1
    env.plane.kubectl("-n", ns, "scale", "dgs/svc", "--replicas", "3")
    env.wait_ready(ns, "svc", 3)
    scale = json.loads(env.plane.kubectl("-n", ns, "get", "--raw",
                                         f"/apis/distgen.io/v1alpha1/namespaces/{ns}/distgenservices/svc/scale").stdout)
    assert scale["status"] == {"replicas": 3, "selector": "distgen.io/service=svc,distgen.io/role=leader"}
    env.plane.kubectl("-n", ns, "scale", "dgs/svc", "--replicas", "1")
    env.wait_ready(ns, "svc", 1)
    _wait(lambda: [s.metadata.name for s in env.sets(ns)] == ["svc-0"], 30, "scale-down to svc-0", env)
    _wait(lambda: len(env.pods(ns)) == 2, 60, "the removed groups' pods to go", env)
    reasons = [r for r, _ in env.events(ns, "svc")]
    assert reasons.count("GroupCreated") == 3 and reasons.count("GroupDeleted") == 2
    # delete: everything goes (garbage collection by the controller manager)
    env.plane.kubectl("-n", ns, "delete", "dgs", "svc")
    _wait(lambda: not env.sets(ns) and not env.pods(ns) and not [
        s for s in env.core.list_namespaced_service(ns).items] and not [
        c for c in env.core.list_namespaced_config_map(ns).items if c.metadata.name.startswith("svc")] and not [
        s for s in env.core.list_namespaced_secret(ns).items if s.metadata.name.startswith("svc")],
        90, "garbage collection of every child", env)


def _get(url: str, timeout: float = 5) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def _watch(env: Env, ns: str, name: str, stop: threading.Event, seen: list) -> None:
    while not stop.is_set():
        with contextlib.suppress(Exception):
            st = env.get(ns, name).get("status") or {}
            seen.append((len(env.sets(ns)), st.get("readyReplicas"), st.get("updatedReplicas"),
                         tuple(g["phase"] for g in st.get("groups") or [])))
        time.sleep(0.3)


def test_rollout_one_group_at_a_time_with_max_surge_0(env, ns):
    env.apply(ns, service("roll", replicas=3))
    env.wait_ready(ns, "roll", 3)
    before = {p.metadata.name: p.metadata.uid for p in env.pods(ns)}
    seen, stop = [], threading.Event()
    watcher = threading.Thread(target=_watch, args=(env, ns, "roll", stop, seen), daemon=True)
    watcher.start()
    env.plane.kubectl("-n", ns, "patch", "dgs", "roll", "--type=merge", "-p", '{"spec": {"parallel": "pp=2"}}')
    try:
        obj = env.wait_ready(ns, "roll", 3, timeout=120, updated=3)
    finally:
        stop.set()
        watcher.join(5)
    assert obj["status"]["updatedReplicas"] == 3
    # never more groups than replicas (maxSurge 0), never fewer than 2 ready (maxUnavailable 1)
    assert max(s[0] for s in seen) == 3
    assert min(s[1] for s in seen if s[1] is not None) == 2
    assert any(s[2] == 1 for s in seen) and any(s[2] == 2 for s in seen)  # one group at a time
    after = {p.metadata.name: p.metadata.uid for p in env.pods(ns)}
    assert sorted(after) == sorted(before) and not set(after.values()) & set(before.values())  # every pod new
    info = json.loads(_get(f"http://{env.kubelet.ip_of(ns, 'roll-0-0')}:8000/info"))
    assert info["args"][info["args"].index("--parallel") + 1] == "pp=2"
    steps = [m for r, m in env.events(ns, "roll") if r == "RolloutStep"]
    assert len(steps) == 3 and all("maxSurge 0" in m for m in steps)
    cms = [c.metadata.name for c in env.core.list_namespaced_config_map(ns).items if c.metadata.name.startswith("roll")]
    assert cms == [D.configmap_name("roll", obj["status"]["specHash"])]  # the old options' ConfigMap is gone


def test_operator_restart_mid_rollout(env, ns):
    env.apply(ns, service("resume", replicas=3, probes={"periodSeconds": 1}))
    env.wait_ready(ns, "resume", 3)
    # slow groups: each new group takes 4 s to become ready, so the rollout is under way when we kill
    env.plane.kubectl("-n", ns, "patch", "dgs", "resume", "--type=merge", "-p",
                      '{"spec": {"serve": {"extraArgs": ["--max-steps", "100"]}}}')
    _wait(lambda: (env.get(ns, "resume").get("status") or {}).get("updatedReplicas") == 1, 60, "the first step", env)
    env.operator.stop(signal.SIGKILL)
    time.sleep(2)
    env.operator.start()
    obj = env.wait_ready(ns, "resume", 3, timeout=120, updated=3)
    assert sorted(s.metadata.name for s in env.sets(ns)) == ["resume-0", "resume-1", "resume-2"]
    assert len(env.pods(ns)) == 6
    assert sorted(s.metadata.name for s in env.core.list_namespaced_service(ns).items) == [
        "resume", "resume-0", "resume-1", "resume-2"]
    assert len([c for c in env.core.list_namespaced_config_map(ns).items if c.metadata.name.startswith("resume")]) == 1
    assert all(g["restarts"] == 0 for g in obj["status"]["groups"])
    assert len([1 for r, _ in env.events(ns, "resume") if r == "RolloutStep"]) == 3


# ---------------------------------------------------------------------------------------------- real serve


def test_real_groups_serve_and_a_failed_group_is_recreated(env, real_ns, tiny_llama):
    from distgen.client import Client

    model, ns = tiny_llama, real_ns
    # the reference answer: `distgen generate text` in its own process (started now, read later)
    one_shot = subprocess.Popen([sys.executable, "-m", "distgen", "generate", "text", "--model", model, "--prompt",
                                 "hello", "--max-new-tokens", "8", "--chat", "off"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    obj = service("llm", replicas=2, parallel="tp=2",
                  model={"source": model, "servedModelName": "tiny"},
                  serve={"extraArgs": ["--threads-per-rank", "1", "--comm-timeout", "20"]},
                  probes={"periodSeconds": 1})
    env.apply(ns, obj)
    env.wait_ready(ns, "llm", 2, timeout=240)
    key = env.core.read_namespaced_secret("llm-api-key", ns).data["key"]
    import base64

    key = base64.b64decode(key).decode()
    leaders = [f"http://{env.kubelet.ip_of(ns, f'llm-{i}-0')}:8000" for i in range(2)]
    answers = []
    for url in leaders:
        with Client(url, api_key=key, timeout=120) as c:
            answers.append(c.complete("hello", model="tiny", max_tokens=8, temperature=0))
    out, err = one_shot.communicate(timeout=300)
    assert one_shot.returncode == 0, err
    assert answers == [out[:-1]] * 2  # print() adds one newline
    # a fault in group 1 (a worker's processes die): group 1 is recreated as a unit, group 0 serves on
    failures, done, stop = [], [], threading.Event()

    def loop():
        with Client(leaders[0], api_key=key, timeout=60) as c:
            while not stop.is_set():
                try:
                    assert c.complete("hello", model="tiny", max_tokens=4, temperature=0)
                    done.append(1)
                except Exception as exc:  # counted: must stay 0
                    failures.append(repr(exc))
                time.sleep(0.2)

    client_loop = threading.Thread(target=loop, daemon=True)
    client_loop.start()
    try:
        env.kubelet.kill(ns, "llm-1-1")
        _wait(lambda: env.cond(ns, "llm").get("Degraded", {}).get("status") == "True", 60, "Degraded", env)
        env.wait_ready(ns, "llm", 2, timeout=240)
    finally:
        stop.set()
        client_loop.join(90)
    assert failures == [] and len(done) > 3
    status = env.get(ns, "llm")["status"]
    assert [g["restarts"] for g in status["groups"]] == [0, 1]
    with Client(leaders[1], api_key=key, timeout=120) as c:
        assert c.complete("hello", model="tiny", max_tokens=8, temperature=0) == answers[0]
    assert any(r == "GroupRecreated" and "llm-1-1" in m for r, m in env.events(ns, "llm"))
