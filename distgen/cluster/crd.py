"""The CustomResourceDefinition, rendered from :mod:`distgen.cluster.spec` (``cluster/deploy/crd.yaml``).

``python -m distgen.cluster crd`` prints it; tests/test_cluster_crd.py checks that the committed
file is what this renders.
"""

from __future__ import annotations

import dataclasses

from distgen.cluster import spec as S

CONDITION_TYPES = ("Ready", "Progressing", "Degraded")
GROUP_PHASES = ("Pending", "Starting", "Ready", "Failed", "Recreating", "Terminating")


def _schema_of(tp, help: str = "", keywords: dict | None = None) -> dict:
    tp, _ = S._optional(tp)
    origin, args = S._origin_args(tp)
    out: dict = {}
    if dataclasses.is_dataclass(tp):
        out = _object_schema(tp)
    elif origin is list:
        out = {"type": "array", "items": _schema_of(args[0])}
    elif origin is dict:
        out = {"type": "object", "additionalProperties": _schema_of(args[1])}
    elif tp is S.IntOrString:
        out = {"x-kubernetes-int-or-string": True}
    elif tp is S.AnyObject:
        out = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    else:
        out = {"type": {int: "integer", str: "string", bool: "boolean"}[tp]}
    if help:
        out = {"description": help, **out}
    out.update(keywords or {})
    return out


def _object_schema(cls) -> dict:
    hints = S._hints(cls)
    props, required = {}, []
    for f in dataclasses.fields(cls):
        key = S.camel(f.name)
        schema = _schema_of(hints[f.name], f.metadata.get("help", ""), f.metadata.get("schema"))
        if f.default is not dataclasses.MISSING:
            # (an empty-string default is left to the operator: 1.20's apiserver reads it as null)
            if f.default is not None and f.default != "":
                schema["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = S.to_dict(f.default_factory())
            # an object defaults to {} (its own fields' defaults then apply); a list or map to empty
            schema["default"] = {} if dataclasses.is_dataclass(f.default_factory()) else value
        else:
            required.append(key)
        props[key] = schema
    out = {"type": "object", "properties": props}
    if required:
        out["required"] = required
    return out


def spec_schema() -> dict:
    return _object_schema(S.DistgenServiceSpec)


def _condition_schema() -> dict:
    return {"type": "object", "required": ["type", "status"], "properties": {
        "type": {"type": "string", "enum": list(CONDITION_TYPES)},
        "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
        "reason": {"type": "string"},
        "message": {"type": "string"},
        "lastTransitionTime": {"type": "string", "format": "date-time"},
        "observedGeneration": {"type": "integer"},
    }}


def status_schema() -> dict:
    """Every field the operator writes (anything else would be pruned)."""
    group = {"type": "object", "properties": {
        "name": {"type": "string"},
        "index": {"type": "integer"},
        "phase": {"type": "string", "enum": list(GROUP_PHASES)},
        "restarts": {"type": "integer", "description": "times this group was recreated as a unit"},
        "specHash": {"type": "string"},
        "readyPods": {"type": "integer"},
        "leader": {"type": "string", "description": "the leader pod's address"},
        "message": {"type": "string"},
    }}
    return {"type": "object", "properties": {
        "observedGeneration": {"type": "integer"},
        "replicas": {"type": "integer", "description": "groups that exist"},
        "readyReplicas": {"type": "integer", "description": "groups whose leader is ready"},
        "updatedReplicas": {"type": "integer", "description": "groups with the current spec"},
        "ready": {"type": "string", "description": "readyReplicas/spec.replicas, for kubectl get"},
        "plan": {"type": "string", "description": "the plan over the group's nodes, for kubectl get"},
        "specHash": {"type": "string", "description": "hash of the pod-shaping spec (not replicas)"},
        "selector": {"type": "string", "description": "label selector of the leader pods (scale subresource)"},
        "conditions": {"type": "array", "items": _condition_schema()},
        "groups": {"type": "array", "items": group},
    }}


PRINTER_COLUMNS = [
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.source"},
    {"name": "Plan", "type": "string", "jsonPath": ".status.plan"},
    {"name": "Ready", "type": "string", "jsonPath": ".status.ready"},
    {"name": "Replicas", "type": "integer", "jsonPath": ".spec.replicas"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def crd() -> dict:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{S.PLURAL}.{S.GROUP}"},
        "spec": {
            "group": S.GROUP,
            "scope": "Namespaced",
            "names": {"kind": S.KIND, "plural": S.PLURAL, "singular": S.SINGULAR, "shortNames": list(S.SHORT_NAMES),
                      "listKind": f"{S.KIND}List", "categories": ["all"]},
            "versions": [{
                "name": S.VERSION, "served": True, "storage": True,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": "Multi-node model-parallel replicas of `distgen serve`, each group of pods one unit.",
                    "required": ["spec"],
                    "properties": {
                        "apiVersion": {"type": "string"}, "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": spec_schema(),
                        "status": status_schema(),
                    }}},
                "subresources": {"status": {}, "scale": {
                    "specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.readyReplicas",
                    "labelSelectorPath": ".status.selector"}},
                "additionalPrinterColumns": PRINTER_COLUMNS,
            }],
        },
    }


HEADER = ("# Generated by `python -m distgen.cluster crd` from distgen/cluster/spec.py and crd.py: edit those, "
          "then regenerate.\n")


def render_yaml() -> str:
    import yaml

    return HEADER + yaml.safe_dump(crd(), sort_keys=False, width=120)

