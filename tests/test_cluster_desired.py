"""The child objects a DistgenService wants: pure functions from its spec."""

import json

from distgen.cluster import desired as D, pod, spec as S


def spec(**over):
    body = {"model": {"source": "pvc://models/llama", "cache": {"type": "PVC", "claimName": "cache"}},
            "parallel": "tp=8,pp=2", "topology": {"nodesPerReplica": 2, "gpusPerNode": 8}, "replicas": 2,
            "resources": {"limits": {"nvidia.com/gpu": 8}}}
    body.update(over)
    return S.parse_spec(body)


def env_of(container) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_group_statefulset():
    sts = D.statefulset("llama", "ns", 1, spec())
    assert sts["metadata"]["name"] == "llama-1" and sts["spec"]["serviceName"] == "llama-1"
    assert sts["spec"]["replicas"] == 2
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    assert sts["spec"]["updateStrategy"] == {"type": "OnDelete"}  # the operator replaces whole groups itself
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert all(labels[k] == v for k, v in sts["spec"]["selector"]["matchLabels"].items())
    assert labels[D.LABEL_HASH] == D.spec_hash(spec())
    c = sts["spec"]["template"]["spec"]["containers"][0]
    env = env_of(c)
    assert env["DISTGEN_LEADER_ADDRESS"] == env["MASTER_ADDR"] == env["LWS_LEADER_ADDRESS"] == "llama-1-0.llama-1"
    assert (env["DISTGEN_NNODES"], env["DISTGEN_NPROC_PER_NODE"], env["PET_NNODES"]) == ("2", "8", "2")
    assert env["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env["DISTGEN_API_KEY"] == {"secretKeyRef": {"name": "llama-api-key", "key": "key"}}
    assert env["DISTGEN_SERVE_ARGS"]["configMapKeyRef"]["name"] == D.configmap_name("llama", D.spec_hash(spec()))
    assert c["resources"] == {"limits": {"nvidia.com/gpu": "8"}}  # quantities as strings
    assert c["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] == 1800
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/models/models"]["readOnly"] and "/cache" in mounts


def test_services_secret_configmap():
    s = spec(serve={"port": 9000, "apiKeySecretRef": {"name": "mine", "key": "k"}})
    headless = D.headless_service("llama", "ns", 0)
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    client = D.client_service("llama", "ns", s)
    assert client["spec"]["selector"] == {D.LABEL_SERVICE: "llama", D.LABEL_ROLE: "leader"}
    assert client["spec"]["ports"][0]["port"] == 9000
    assert D.secret_name("llama", s) == ("mine", "k")
    args = json.loads(D.configmap("llama", "ns", s)["data"]["args"])
    assert args[:2] == ["--model", "/models/models/llama"]
    assert args[args.index("--parallel") + 1] == "tp=8,pp=2" and args[args.index("--nproc") + 1] == "16"
    assert args[args.index("--port") + 1] == "9000"


def test_hash_ignores_replicas_and_rollout_but_not_the_plan():
    base = D.spec_hash(spec())
    assert D.spec_hash(spec(replicas=5, rollout={"maxSurge": 1})) == base
    assert D.spec_hash(spec(parallel="tp=16", topology={"nodesPerReplica": 2, "gpusPerNode": 8})) != base
    assert D.spec_hash(spec(image="distgen:v2")) != base


def test_children_set():
    kinds = [(o["kind"], o["metadata"]["name"]) for o in D.children("llama", "ns", spec(), [0, 1])]
    assert ("Service", "llama") in kinds and ("StatefulSet", "llama-1") in kinds and ("Service", "llama-0") in kinds


def pod_env(launcher, name, parallel="tp=2", nodes=2, gpus=1):
    s = spec(launcher=launcher, parallel=parallel, topology={"nodesPerReplica": nodes, "gpusPerNode": gpus})
    env = {k: v for k, v in env_of(D.statefulset("g", "ns", 0, s)["spec"]["template"]["spec"]["containers"][0]).items()
           if isinstance(v, str)}
    return {**env, "POD_NAME": name, "POD_IP": "10.0.0.5", "DISTGEN_SERVE_ARGS": json.dumps(D.serve_args(s))}


def test_pod_commands_ray():
    head, serve = pod.commands(pod_env("ray", "g-0-0"))
    assert "--head" in head and head[head.index("--node-ip-address") + 1] == "10.0.0.5"
    assert serve[serve.index("--launcher") + 1] == "ray" and serve[serve.index("--ray-address") + 1] == "10.0.0.5:6379"
    assert serve[serve.index("--host") + 1] == "10.0.0.5"
    (worker,) = pod.commands(pod_env("ray", "g-0-1"))
    assert worker[worker.index("--address") + 1] == "g-0-0.g-0:6379" and "--block" in worker


def test_pod_commands_torchrun():
    for rank in (0, 1):
        (cmd,) = pod.commands(pod_env("torchrun", f"g-0-{rank}"))
        assert cmd[cmd.index("--node-rank") + 1] == str(rank) and cmd[cmd.index("--nnodes") + 1] == "2"
        assert cmd[cmd.index("--master-addr") + 1] == "g-0-0.g-0"
        assert cmd[cmd.index("--launcher") + 1] == "torchrun"
        assert "--nproc" not in cmd  # torchrun's WORLD_SIZE (and its parser would choke on it)
