"""The DistgenService resource: one source for the CRD schema, defaults, and distgen's own validation."""

from pathlib import Path

import pytest
import yaml

from distgen.cluster import crd, spec as S
from distgen.config import ConfigError, ParallelConfig

ROOT = Path(__file__).resolve().parents[1]


def example(**over) -> dict:
    body = {"model": {"source": "pvc://models/llama-3.1-70b", "cache": {"type": "PVC", "claimName": "models"}},
            "workload": "text", "parallel": "tp=8,pp=2", "topology": {"nodesPerReplica": 2, "gpusPerNode": 8},
            "replicas": 2, "launcher": "ray", "image": "distgen:latest"}
    body.update(over)
    return body


def test_committed_crd_is_the_rendered_one():
    committed = (ROOT / "cluster" / "deploy" / "crd.yaml").read_text()
    assert committed == crd.render_yaml(), "cluster/deploy/crd.yaml is stale: python -m distgen.cluster crd > it"


def test_crd_shape():
    c = yaml.safe_load(crd.render_yaml())
    assert c["apiVersion"] == "apiextensions.k8s.io/v1"
    version = c["spec"]["versions"][0]
    assert c["spec"]["names"]["shortNames"] == ["dgs"]
    assert version["subresources"]["scale"] == {"specReplicasPath": ".spec.replicas",
                                                "statusReplicasPath": ".status.readyReplicas",
                                                "labelSelectorPath": ".status.selector"}
    assert "status" in version["subresources"]
    assert [col["name"] for col in version["additionalPrinterColumns"]] == ["Model", "Plan", "Ready", "Replicas", "Age"]
    props = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert props["launcher"] == {"description": props["launcher"]["description"], "type": "string",
                                 "enum": ["ray", "torchrun"], "default": "ray"}
    assert props["topology"]["default"] == {} and props["topology"]["properties"]["nodesPerReplica"]["minimum"] == 1
    assert props["rollout"]["properties"]["maxSurge"]["default"] == 0
    assert props["rollout"]["properties"]["maxUnavailable"]["default"] == 1
    assert props["resources"]["properties"]["limits"]["additionalProperties"] == {"x-kubernetes-int-or-string": True}
    assert version["schema"]["openAPIV3Schema"]["properties"]["spec"]["required"] == ["model"]
    # every status field the operator writes is declared (else the API server prunes it)
    status_props = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert {"observedGeneration", "conditions", "replicas", "readyReplicas", "updatedReplicas", "groups",
            "selector"} <= set(status_props)


def _structural(schema: dict, path="") -> None:
    """Every node has a type (or int-or-string / preserve-unknown-fields), as apiextensions/v1 requires."""
    assert "type" in schema or schema.get("x-kubernetes-int-or-string"), path
    for key, sub in (schema.get("properties") or {}).items():
        _structural(sub, f"{path}.{key}")
    if isinstance(schema.get("items"), dict):
        _structural(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        _structural(schema["additionalProperties"], f"{path}{{}}")


def test_schema_is_structural():
    _structural(crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


def test_defaults_match_the_schema():
    spec = S.parse_spec({"model": {"source": "smollm2"}})
    assert (spec.workload, spec.launcher, spec.replicas, spec.parallel) == ("text", "ray", 1, "")
    assert (spec.topology.nodes_per_replica, spec.topology.gpus_per_node) == (1, 1)
    assert (spec.rollout.max_surge, spec.rollout.max_unavailable, spec.serve.port) == (0, 1, 8000)
    schema = crd.spec_schema()["properties"]
    assert schema["serve"]["properties"]["port"]["default"] == spec.serve.port
    assert schema["serve"]["properties"]["maxQueued"]["default"] == spec.serve.max_queued == 64
    assert S.to_dict(S.parse_spec(S.to_dict(spec))) == S.to_dict(spec)


@pytest.mark.parametrize("body, message", [
    ({"workload": "audio"}, "spec.workload: unknown value 'audio'; allowed: text, image, video"),
    ({"launcher": "mpirun"}, "spec.launcher: unknown value 'mpirun'; allowed: ray, torchrun"),
    ({"replicas": -1}, "spec.replicas: must be >= 0, got -1"),
    ({"topology": {"nodesPerReplica": 0}}, "spec.topology.nodesPerReplica: must be >= 1, got 0"),
    ({"topology": {"nodes": 2}}, "spec.topology: unknown field 'nodes'; allowed: nodesPerReplica, gpusPerNode"),
    ({"replicas": "two"}, "spec.replicas: expected an integer, got 'two'"),
    ({"model": {}}, "spec.model.source: required"),
])
def test_schema_rules_in_the_operator_too(body, message):
    with pytest.raises(ConfigError) as err:
        S.parse_spec(example(**body))
    assert str(err.value) == message


def cli_message(parallel: str, nproc: int, axes) -> str:
    with pytest.raises(ConfigError) as err:
        plan = ParallelConfig.parse(parallel, axes, "text")
        plan.validate(nproc, axes, "text")
    return str(err.value)


def test_plan_product_must_equal_nodes_times_gpus_with_the_cli_message():
    spec = S.parse_spec(example(topology={"nodesPerReplica": 1, "gpusPerNode": 8}))
    with pytest.raises(ConfigError) as err:
        S.validate_spec(spec)
    expected = cli_message("tp=8,pp=2", 8, S.WORKLOAD_AXES["text"])
    assert str(err.value).startswith(expected)
    assert "must equal the number of ranks" in expected
    assert "spec.topology.nodesPerReplica 1 x gpusPerNode 8 = 8" in str(err.value)
    assert S.validate_spec(S.parse_spec(example())).degrees == {"tp": 8, "pp": 2}


@pytest.mark.parametrize("body, fragment", [
    ({"parallel": "tp=16,xp=1"}, "--parallel: unknown axis 'xp'; allowed axes for text: dp, pp, ep, tp"),
    ({"parallel": "patch=16"}, "--parallel: axis 'patch' is not available for text; allowed: dp, pp, ep, tp"),
    ({"parallel": "tp=8,dp=2"}, "--parallel: dp is not served yet"),
    ({"workload": "image", "parallel": "cfg=2,patch=2"}, "(cfg=2 x patch=2 = 4) must equal the number of ranks"),
    ({"rollout": {"maxSurge": 0, "maxUnavailable": 0}}, "spec.rollout: maxSurge and maxUnavailable are both 0"),
    ({"serve": {"extraArgs": ["--port=9000"]}}, "spec.serve.extraArgs: --port is set by the operator"),
    ({"model": {"source": "x", "cache": {"type": "PVC"}}}, "spec.model.cache.claimName: required"),
])
def test_validation_beyond_the_schema(body, fragment):
    with pytest.raises(ConfigError) as err:
        S.validate_spec(S.parse_spec(example(**body)))
    assert fragment in str(err.value)


def test_workload_axes_agree_with_the_runtime():
    from distgen.config import IMAGE_AXES
    from distgen.config_video import VIDEO_AXES
    from distgen.runtime.text import TEXT_AXES

    assert S.WORKLOAD_AXES == {"text": TEXT_AXES, "image": IMAGE_AXES, "video": VIDEO_AXES}


def test_examples_parse_and_validate():
    examples = sorted((ROOT / "cluster" / "examples").glob("*.yaml"))
    assert len(examples) >= 3
    for path in examples:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == S.KIND:
                S.validate_spec(S.parse_spec(doc["spec"]))
