"""The desired child objects of a ``DistgenService``: pure functions from a spec to manifests.

Per replica *group* ``NAME-I``: a StatefulSet of ``nodesPerReplica`` pods (ordinal = node rank,
pod 0 leads), ``podManagementPolicy: Parallel`` (all ranks start together) and ``updateStrategy:
OnDelete`` (the operator, not the StatefulSet controller, decides when pods are replaced: always
the whole group at once), and a headless Service ``NAME-I`` that publishes not-ready addresses (the
workers reach the leader before it is ready). Shared: the client Service ``NAME`` over the ready
leaders, the API-key Secret ``NAME-api-key`` (unless the spec names one), and a ConfigMap
``NAME-serve-HASH`` with the rendered ``distgen serve`` options (one per spec hash, so an old
group keeps reading its own options during a rollout).

Every pod runs ``python -m distgen.cluster.pod`` (:mod:`distgen.cluster.pod`), which starts the Ray
head / worker or the torchrun node from the environment set here.
"""

from __future__ import annotations

import hashlib
import json

from distgen.cluster import spec as S

LABEL_SERVICE = f"{S.GROUP}/service"
LABEL_GROUP = f"{S.GROUP}/group"
LABEL_INDEX = f"{S.GROUP}/group-index"
LABEL_ROLE = f"{S.GROUP}/role"
LABEL_HASH = f"{S.GROUP}/spec-hash"
ANNOTATION_RESTARTS = f"{S.GROUP}/restarts"
ANNOTATION_PODS = f"{S.GROUP}/pods"  # uids of the group's pods once all were up: a new uid means a pod was recreated
ANNOTATION_RECOVERING = f"{S.GROUP}/recovering"  # why a failed group was recreated, until it is ready again
MANAGED_BY = ("app.kubernetes.io/managed-by", "distgen-operator")

RAY_PORT = 6379
RENDEZVOUS_PORT = 29500
CONTAINER = "distgen"
SERVE_ARGS_KEY = "args"


def spec_hash(spec: S.DistgenServiceSpec) -> str:
    """Hash of everything that shapes the pods: the spec without ``replicas`` and ``rollout``
    (scaling never rolls; KubeRay does the same)."""
    shaped = S.to_dict(spec)
    shaped.pop("replicas", None)
    shaped.pop("rollout", None)
    return hashlib.sha256(json.dumps(shaped, sort_keys=True).encode()).hexdigest()[:10]


def group_name(name: str, index: int) -> str:
    return f"{name}-{index}"


def leader_address(name: str, index: int) -> str:
    """The leader pod's name under its group's headless Service (resolved by the pod's DNS search path)."""
    group = group_name(name, index)
    return f"{group}-0.{group}"


def secret_name(name: str, spec: S.DistgenServiceSpec) -> tuple[str, str]:
    ref = spec.serve.api_key_secret_ref
    return (ref.name, ref.key) if ref else (f"{name}-api-key", "key")


def configmap_name(name: str, hash_: str) -> str:
    return f"{name}-serve-{hash_}"


def leader_selector(name: str) -> dict[str, str]:
    return {LABEL_SERVICE: name, LABEL_ROLE: "leader"}


def selector_string(name: str) -> str:
    return ",".join(f"{k}={v}" for k, v in leader_selector(name).items())


def plan_text(spec: S.DistgenServiceSpec) -> str:
    return f"{spec.parallel or 'single'} on {spec.topology.nodes_per_replica}x{spec.topology.gpus_per_node}"


# ---------------------------------------------------------------------------------------------- serve options


def model_location(spec: S.DistgenServiceSpec) -> tuple[str, list[dict], list[dict]]:
    """(--model value, volumes, volume mounts) for the model source and the cache."""
    volumes, mounts = [], []
    source = spec.model.source
    if source.startswith("pvc://"):
        claim, _, sub = source[len("pvc://"):].partition("/")
        volumes.append({"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": "model", "mountPath": f"/models/{claim}", "readOnly": True})
        source = f"/models/{claim}/{sub}".rstrip("/")
    cache = spec.model.cache
    if cache.type == "PVC":
        volumes.append({"name": "cache", "persistentVolumeClaim": {"claimName": cache.claim_name}})
        mounts.append({"name": "cache", "mountPath": cache.mount_path})
    elif cache.type == "EmptyDir":
        volumes.append({"name": "cache", "emptyDir": {}})
        mounts.append({"name": "cache", "mountPath": cache.mount_path})
    return source, volumes, mounts


def serve_args(spec: S.DistgenServiceSpec) -> list[str]:
    """The `distgen serve` options every group of this spec runs with (the pod adds --host, --launcher
    and the Ray address itself)."""
    model, _, _ = model_location(spec)
    args = ["--model", model, "--workload", spec.workload, "--port", str(spec.serve.port),
            "--nproc", str(S.ranks_per_group(spec)), "--max-queued", str(spec.serve.max_queued),
            "--max-batch-size", str(spec.serve.max_batch_size), "--dtype", spec.serve.dtype,
            "--drain-timeout", str(spec.serve.drain_timeout_seconds)]
    if spec.parallel:
        args += ["--parallel", spec.parallel]
    if spec.model.served_model_name:
        args += ["--served-model-name", spec.model.served_model_name]
    return args + list(spec.serve.extra_args)


# ---------------------------------------------------------------------------------------------- manifests


def _labels(name: str, **more) -> dict[str, str]:
    return {MANAGED_BY[0]: MANAGED_BY[1], LABEL_SERVICE: name, **more}


def _meta(name: str, namespace: str, labels: dict, annotations: dict | None = None) -> dict:
    out = {"name": name, "namespace": namespace, "labels": labels}
    if annotations:
        out["annotations"] = annotations
    return out


def configmap(name: str, namespace: str, spec: S.DistgenServiceSpec) -> dict:
    h = spec_hash(spec)
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": _meta(configmap_name(name, h), namespace, _labels(name, **{LABEL_HASH: h})),
            "data": {SERVE_ARGS_KEY: json.dumps(serve_args(spec)),
                     "spec.json": json.dumps(S.to_dict(spec), indent=1, sort_keys=True)}}


def secret(name: str, namespace: str, key_value: str) -> dict:
    """The generated API-key Secret (only when the spec names none)."""
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": _meta(f"{name}-api-key", namespace, _labels(name)), "stringData": {"key": key_value}}


def client_service(name: str, namespace: str, spec: S.DistgenServiceSpec) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(name, namespace, _labels(name)),
            "spec": {"selector": leader_selector(name),
                     "ports": [{"name": "http", "port": spec.serve.port, "targetPort": "http", "protocol": "TCP"}]}}


def headless_service(name: str, namespace: str, index: int) -> dict:
    group = group_name(name, index)
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": _meta(group, namespace, _labels(name, **{LABEL_GROUP: group, LABEL_INDEX: str(index)})),
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                     "selector": {LABEL_SERVICE: name, LABEL_GROUP: group},
                     "ports": [{"name": "ray", "port": RAY_PORT}, {"name": "rendezvous", "port": RENDEZVOUS_PORT}]}}


def _env(name: str, index: int, spec: S.DistgenServiceSpec) -> list[dict]:
    nodes, gpus = spec.topology.nodes_per_replica, spec.topology.gpus_per_node
    leader = leader_address(name, index)
    secret_ref, secret_key = secret_name(name, spec)
    h = spec_hash(spec)
    plain = {
        "DISTGEN_LAUNCHER": spec.launcher,
        "DISTGEN_GROUP": group_name(name, index),
        "DISTGEN_LEADER_ADDRESS": leader,
        "DISTGEN_NNODES": str(nodes), "DISTGEN_NPROC_PER_NODE": str(gpus),
        "DISTGEN_RAY_PORT": str(RAY_PORT),
        # the names LeaderWorkerSet and Kubeflow's PyTorchJob use (vLLM / SGLang multi-node read them)
        "LWS_LEADER_ADDRESS": leader, "LWS_GROUP_SIZE": str(nodes),
        "MASTER_ADDR": leader, "MASTER_PORT": str(RENDEZVOUS_PORT),
        "PET_NNODES": str(nodes), "PET_NPROC_PER_NODE": str(gpus),
        "OMP_NUM_THREADS": "1" if not spec.resources.limits.get("cpu") else str(spec.resources.limits["cpu"]),
    }
    if spec.model.cache.type != "None":
        plain["DISTGEN_CACHE"] = spec.model.cache.mount_path
        plain["HF_HOME"] = f"{spec.model.cache.mount_path}/huggingface"
    env = [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
           {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
    env += [{"name": k, "value": v} for k, v in plain.items()]
    env += [{"name": "DISTGEN_SERVE_ARGS",
             "valueFrom": {"configMapKeyRef": {"name": configmap_name(name, h), "key": SERVE_ARGS_KEY}}},
            {"name": "DISTGEN_API_KEY", "valueFrom": {"secretKeyRef": {"name": secret_ref, "key": secret_key}}}]
    return env


def statefulset(name: str, namespace: str, index: int, spec: S.DistgenServiceSpec) -> dict:
    group = group_name(name, index)
    h = spec_hash(spec)
    _, volumes, mounts = model_location(spec)
    selector = {LABEL_SERVICE: name, LABEL_GROUP: group}
    pod_labels = _labels(name, **{LABEL_GROUP: group, LABEL_INDEX: str(index), LABEL_HASH: h})
    probes = spec.probes
    health = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": probes.period_seconds,
              "timeoutSeconds": 5}
    container = {
        "name": CONTAINER, "image": spec.image, "imagePullPolicy": spec.image_pull_policy,
        "command": ["python", "-m", "distgen.cluster.pod"],
        "env": _env(name, index, spec),
        "ports": [{"name": "http", "containerPort": spec.serve.port, "protocol": "TCP"},
                  {"name": "ray", "containerPort": RAY_PORT}, {"name": "rendezvous", "containerPort": RENDEZVOUS_PORT}],
        # the leader's /health is distgen serve's (200 once every rank answers); a worker pod's is its
        # supervisor's (200 while its Ray worker / torchrun node runs), see distgen.cluster.pod
        "startupProbe": {**health, "failureThreshold": max(1, probes.startup_timeout_seconds // probes.period_seconds)},
        "readinessProbe": {**health, "failureThreshold": 3},
        "resources": {k: {r: str(q) for r, q in v.items()} for k, v in (("limits", spec.resources.limits),
                                                                           ("requests", spec.resources.requests)) if v},
        "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}, *mounts],
    }
    pod_spec = {
        "containers": [container],
        "volumes": [{"name": "shm", "emptyDir": {"medium": "Memory"}}, *volumes],
        "terminationGracePeriodSeconds": spec.serve.drain_timeout_seconds + 10,
        "restartPolicy": "Always",
    }
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod_spec["tolerations"] = list(spec.tolerations)
    if spec.service_account_name:
        pod_spec["serviceAccountName"] = spec.service_account_name
    return {
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": _meta(group, namespace, _labels(name, **{LABEL_GROUP: group, LABEL_INDEX: str(index),
                                                              LABEL_HASH: h}),
                          {ANNOTATION_RESTARTS: "0"}),
        "spec": {
            "serviceName": group, "replicas": spec.topology.nodes_per_replica,
            "podManagementPolicy": "Parallel", "updateStrategy": {"type": "OnDelete"},
            "selector": {"matchLabels": selector},
            "template": {"metadata": {"labels": pod_labels, "annotations": {LABEL_HASH: h}}, "spec": pod_spec},
        },
    }


def pod_role(pod_name: str) -> str:
    """leader for ordinal 0, else worker. (Pods of one StatefulSet share one template: the operator
    labels each group's pod 0 ``role=leader`` itself, and the client Service selects that label.)"""
    return "leader" if pod_name.rsplit("-", 1)[-1] == "0" else "worker"


def children(name: str, namespace: str, spec: S.DistgenServiceSpec, indexes: list[int]) -> list[dict]:
    """Everything a spec wants for the given group indexes (without the generated Secret)."""
    out = [configmap(name, namespace, spec), client_service(name, namespace, spec)]
    for i in indexes:
        out += [headless_service(name, namespace, i), statefulset(name, namespace, i, spec)]
    return out
