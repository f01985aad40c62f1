"""The ``DistgenService`` resource: its fields as dataclasses, the one source of the CRD schema.

Every field is declared once here, with its default, its allowed values and its help text. The
CRD's OpenAPI schema (:mod:`distgen.cluster.crd`) is rendered from these declarations, and the
operator parses objects with the same declarations (:func:`parse_spec`), so the schema, its
defaults and what the operator reads cannot drift apart. Python names are snake_case; the
resource's are their camelCase forms.

What a structural schema cannot say (the plan's product equals ``nodesPerReplica x
gpusPerNode``, axes per workload, ...) is checked by :func:`validate_spec` with distgen's own
validation (:class:`distgen.config.ParallelConfig`), giving the message the CLI would print.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

from distgen.config import DTYPES, IMAGE_AXES, ConfigError, ParallelConfig

GROUP = "distgen.io"
VERSION = "v1alpha1"
KIND = "DistgenService"
PLURAL = "distgenservices"
SINGULAR = "distgenservice"
SHORT_NAMES = ("dgs",)

WORKLOADS = ("text", "image", "video")
LAUNCHERS = ("ray", "torchrun")
CACHE_TYPES = ("None", "EmptyDir", "PVC")
PULL_POLICIES = ("IfNotPresent", "Always", "Never")
# the axes of each workload (distgen.runtime.text.TEXT_AXES, distgen.config_video.VIDEO_AXES: repeated
# here so that the operator does not import torch; tests/test_cluster_spec.py checks they agree)
WORKLOAD_AXES = {"text": ("dp", "pp", "ep", "tp"), "image": IMAGE_AXES, "video": ("cfg", "clip", "sp")}


def _meta(help: str, **schema) -> dict:
    """Field metadata: the help text and extra OpenAPI keywords (enum, minimum, maximum, pattern)."""
    return {"help": help, "schema": schema}


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


@dataclass
class SecretKeyRef:
    name: str = field(metadata=_meta("the Secret's name (in the resource's namespace)", minLength=1))
    key: str = field(default="key", metadata=_meta("the key in the Secret that holds the API key"))


@dataclass
class Cache:
    type: str = field(default="None", metadata=_meta(
        "where embedded models and downloaded files are cached: None (the image's file system), EmptyDir "
        "(per pod), PVC (a claim shared by all pods)", enum=list(CACHE_TYPES)))
    claim_name: str = field(default="", metadata=_meta("the PersistentVolumeClaim with type PVC"))
    mount_path: str = field(default="/cache", metadata=_meta("where the cache is mounted (DISTGEN_CACHE, HF_HOME)",
                                                             pattern="^/"))


@dataclass
class Model:
    source: str = field(metadata=_meta(
        "pvc://CLAIM/PATH (a directory on a claim, mounted read-only), a path inside the image, or the name of "
        "an embedded model (as `distgen serve --model` takes)", minLength=1))
    served_model_name: str = field(default="", metadata=_meta("the model id clients send (default: its name)"))
    cache: Cache = field(default_factory=Cache, metadata=_meta("the model cache"))


@dataclass
class Topology:
    nodes_per_replica: int = field(default=1, metadata=_meta(
        "pods (nodes) per replica group; pod 0 leads (Ray head, or torchrun node 0)", minimum=1, maximum=64))
    gpus_per_node: int = field(default=1, metadata=_meta(
        "ranks per pod (GPUs per node); the plan's product must equal nodesPerReplica x gpusPerNode",
        minimum=1, maximum=64))


@dataclass
class Serve:
    port: int = field(default=8000, metadata=_meta("the HTTP port (`distgen serve --port`)", minimum=1, maximum=65535))
    max_queued: int = field(default=64, metadata=_meta("requests waiting or running at once; more get 429",
                                                       minimum=1))
    max_batch_size: int = field(default=8, metadata=_meta("image requests of one shape run together", minimum=1))
    dtype: str = field(default="fp32", metadata=_meta("the weights' dtype", enum=list(DTYPES)))
    drain_timeout_seconds: int = field(default=30, metadata=_meta("on SIGTERM: seconds to finish what runs",
                                                                  minimum=0))
    api_key_secret_ref: SecretKeyRef | None = field(default=None, metadata=_meta(
        "the Secret key holding the API key (default: a Secret the operator generates, NAME-api-key)"))
    extra_args: list[str] = field(default_factory=list, metadata=_meta(
        "more `distgen serve` options, as on the command line (e.g. --patch-mode, --ladder-layers)"))


@dataclass
class Rollout:
    max_surge: int = field(default=0, metadata=_meta(
        "extra groups a rollout may start before old ones go (GPUs are scarce: 0 replaces in place)", minimum=0))
    max_unavailable: int = field(default=1, metadata=_meta(
        "groups that may be down at once during a rollout", minimum=0))


@dataclass
class Probes:
    startup_timeout_seconds: int = field(default=1800, metadata=_meta(
        "how long a leader may take to answer /health before its group is recreated", minimum=10))
    period_seconds: int = field(default=10, metadata=_meta("how often /health is probed", minimum=1, maximum=300))


@dataclass
class Resources:
    limits: dict[str, "IntOrString"] = field(default_factory=dict, metadata=_meta(
        "per pod, e.g. {nvidia.com/gpu: 8, memory: 200Gi}"))
    requests: dict[str, "IntOrString"] = field(default_factory=dict, metadata=_meta("per pod"))


class IntOrString:
    """A quantity: 8 or "200Gi"."""


class AnyObject:
    """An object kept as given (Kubernetes types the operator passes through)."""


@dataclass
class DistgenServiceSpec:
    model: Model = field(metadata=_meta("what to serve"))
    workload: str = field(default="text", metadata=_meta("what the model does", enum=list(WORKLOADS)))
    parallel: str = field(default="", metadata=_meta(
        "degrees per axis, the string `distgen serve --parallel` takes (e.g. tp=8,pp=2); empty: one rank",
        pattern=r"^([a-z]+=[0-9]+)?(,[a-z]+=[0-9]+)*$"))
    topology: Topology = field(default_factory=Topology, metadata=_meta("the shape of one replica group"))
    replicas: int = field(default=1, metadata=_meta("replica groups (the scale subresource)", minimum=0))
    launcher: str = field(default="ray", metadata=_meta(
        "ray: a Ray head and workers per group; torchrun: one torchrun node per pod", enum=list(LAUNCHERS)))
    serve: Serve = field(default_factory=Serve, metadata=_meta("`distgen serve` options"))
    image: str = field(default="distgen:latest", metadata=_meta("the runtime image", minLength=1))
    image_pull_policy: str = field(default="IfNotPresent", metadata=_meta("", enum=list(PULL_POLICIES)))
    resources: Resources = field(default_factory=Resources, metadata=_meta("each pod's resources"))
    rollout: Rollout = field(default_factory=Rollout, metadata=_meta("how spec changes roll over the groups"))
    probes: Probes = field(default_factory=Probes, metadata=_meta("the leader's /health probes"))
    node_selector: dict[str, str] = field(default_factory=dict, metadata=_meta("each pod's nodeSelector"))
    tolerations: list[AnyObject] = field(default_factory=list, metadata=_meta("each pod's tolerations"))
    service_account_name: str = field(default="", metadata=_meta("the pods' service account"))


# ---------------------------------------------------------------------------------------------- parsing


def _hints(cls) -> dict[str, object]:
    return typing.get_type_hints(cls, globalns=globals())


def _origin_args(tp):
    return typing.get_origin(tp), typing.get_args(tp)


def _optional(tp):
    origin, args = _origin_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", ())) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return tp, False


def _parse(tp, value, path: str):
    tp, optional = _optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{path}: required")
    origin, args = _origin_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected an object, got {value!r}")
        return _parse_dataclass(tp, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_parse(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected an object, got {value!r}")
        return {str(k): _parse(args[1], v, f"{path}.{k}") for k, v in value.items()}
    if tp is IntOrString:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{path}: expected an integer or a quantity string, got {value!r}")
        return value
    if tp is AnyObject:
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    raise TypeError(f"unsupported field type {tp!r} at {path}")


def _check_keywords(f: dataclasses.Field, value, path: str) -> None:
    """The schema keywords, applied by the operator too (objects that skipped the API server's
    validation, e.g. in unit tests, give the same errors)."""
    import re

    kw = f.metadata.get("schema", {})
    if value is None:
        return
    if "enum" in kw and value not in kw["enum"]:
        raise ConfigError(f"{path}: unknown value {value!r}; allowed: {', '.join(kw['enum'])}")
    if "minimum" in kw and value < kw["minimum"]:
        raise ConfigError(f"{path}: must be >= {kw['minimum']}, got {value}")
    if "maximum" in kw and value > kw["maximum"]:
        raise ConfigError(f"{path}: must be <= {kw['maximum']}, got {value}")
    if "minLength" in kw and len(value) < kw["minLength"]:
        raise ConfigError(f"{path}: must not be empty")
    if "pattern" in kw and not re.search(kw["pattern"], value):
        raise ConfigError(f"{path}: {value!r} does not match {kw['pattern']}")


def _parse_dataclass(cls, value: dict, path: str):
    hints = _hints(cls)
    fields = {camel(f.name): f for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise ConfigError(f"{path}: unknown field {unknown[0]!r}; allowed: {', '.join(fields)}")
    kwargs = {}
    for key, f in fields.items():
        where = f"{path}.{key}"
        if key in value:
            kwargs[f.name] = _parse(hints[f.name], value[key], where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: required")
        else:
            continue
        _check_keywords(f, kwargs[f.name], where)
    return cls(**kwargs)


def parse_spec(spec: dict) -> DistgenServiceSpec:
    """An object's ``spec`` as dataclasses, with the schema's defaults; ConfigError naming the field."""
    return _parse(DistgenServiceSpec, spec, "spec")


def to_dict(obj) -> dict:
    """A spec (or part) back to the resource's camelCase form, defaults filled in."""
    if dataclasses.is_dataclass(obj):
        return {camel(f.name): to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if getattr(obj, f.name) is not None}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# ---------------------------------------------------------------------------------------------- validation


def ranks_per_group(spec: DistgenServiceSpec) -> int:
    return spec.topology.nodes_per_replica * spec.topology.gpus_per_node


def validate_spec(spec: DistgenServiceSpec) -> ParallelConfig:
    """What the schema cannot check, with distgen's own validation; returns the plan.

    Raises ConfigError with the message ``distgen serve`` would print for the same plan, and
    which spec fields it came from."""
    workload = spec.workload
    axes = WORKLOAD_AXES[workload]
    nproc = ranks_per_group(spec)
    where = (f" (spec.parallel {spec.parallel!r}, {workload}; ranks per group = spec.topology.nodesPerReplica "
             f"{spec.topology.nodes_per_replica} x gpusPerNode {spec.topology.gpus_per_node} = {nproc})")
    try:
        plan = ParallelConfig.parse(spec.parallel, axes, workload)
        plan.validate(nproc, axes, workload)
        if workload == "text" and plan.degree("dp") > 1:  # as distgen.serve.service.Service does
            raise ConfigError("--parallel: dp is not served yet (each dp rank decodes its own share of one batch); "
                              "serve tp / pp / ep, and run one server per replica")
        if workload == "image" and plan.degree("cfg") > 2:
            raise ConfigError(f"--parallel: cfg degree must be 1 or 2 (the two halves of the guidance batch), "
                              f"got {plan.degree('cfg')}")
    except ConfigError as exc:
        raise ConfigError(f"{exc}{where}") from None
    if spec.rollout.max_surge == 0 and spec.rollout.max_unavailable == 0:
        raise ConfigError("spec.rollout: maxSurge and maxUnavailable are both 0, so no group could ever be replaced; "
                          "set maxUnavailable >= 1 (or maxSurge >= 1)")
    if spec.model.cache.type == "PVC" and not spec.model.cache.claim_name:
        raise ConfigError("spec.model.cache.claimName: required with spec.model.cache.type PVC")
    if spec.model.source.startswith("pvc://"):
        claim, _, sub = spec.model.source[len("pvc://"):].partition("/")
        if not claim:
            raise ConfigError(f"spec.model.source {spec.model.source!r}: expected pvc://CLAIM/PATH")
    for arg in spec.serve.extra_args:
        name = arg.split("=", 1)[0]
        if name in RESERVED_SERVE_ARGS:
            raise ConfigError(f"spec.serve.extraArgs: {name} is set by the operator from the spec; set "
                              f"{RESERVED_SERVE_ARGS[name]} instead")
    return plan


# `distgen serve` options the operator sets itself, and the field that sets each
RESERVED_SERVE_ARGS = {
    "--model": "spec.model.source", "--workload": "spec.workload", "--parallel": "spec.parallel",
    "--port": "spec.serve.port", "--host": "(the pod's address)", "--launcher": "spec.launcher",
    "--nproc": "spec.topology", "--max-queued": "spec.serve.maxQueued", "--api-key-file":
    "spec.serve.apiKeySecretRef", "--served-model-name": "spec.model.servedModelName", "--dtype": "spec.serve.dtype",
    "--max-batch-size": "spec.serve.maxBatchSize", "--drain-timeout": "spec.serve.drainTimeoutSeconds",
    "--ray-address": "(the group's Ray head)",
}
