"""The operator: one idempotent :func:`reconcile` per ``DistgenService``.

Driven by kopf (create / update / resume of the resource, events of its StatefulSets and pods, and
a timer); the API calls go through the official ``kubernetes`` client (synchronous, typed,
kept in step with the API; kopf has no general-purpose client of its own). kopf runs the sync
handlers in a thread pool, so reconciles of one object are serialised and coalesced here: an
event that arrives while a reconcile runs makes that reconcile run once more, never two at once.

The decisions are pure functions (:mod:`distgen.cluster.decide`, :mod:`distgen.cluster.desired`);
this module only reads the objects, calls them and executes their actions.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import secrets
import threading

import kopf
from kubernetes import client
from kubernetes.client.rest import ApiException

from distgen.cluster import decide as X
from distgen.cluster import desired as D
from distgen.cluster import spec as S
from distgen.config import ConfigError

log = logging.getLogger("distgen.cluster")
TIMER_INTERVAL_S = 15.0


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _escape(key: str) -> str:  # JSON-pointer escaping of a label / annotation key
    return key.replace("~", "~0").replace("/", "~1")


class Cluster:
    """The API calls reconcile makes (one place, so a test can count or fake them)."""

    def __init__(self, api_client: client.ApiClient | None = None):
        self.api = api_client or client.ApiClient()
        self.core, self.apps = client.CoreV1Api(self.api), client.AppsV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

    @staticmethod
    def _json(response) -> dict:
        return json.loads(response.data)

    def get_service_object(self, namespace: str, name: str) -> dict | None:
        try:
            return self._json(self.custom.get_namespaced_custom_object(
                S.GROUP, S.VERSION, namespace, S.PLURAL, name, _preload_content=False))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def patch_status(self, namespace: str, name: str, status: dict) -> None:
        self.custom.patch_namespaced_custom_object_status(S.GROUP, S.VERSION, namespace, S.PLURAL, name,
                                                          {"status": _without_empty_strings(status)},
                                                          _preload_content=False)

    def list(self, kind: str, namespace: str, selector: str) -> list[dict]:
        call = {"pods": self.core.list_namespaced_pod, "statefulsets": self.apps.list_namespaced_stateful_set,
                "services": self.core.list_namespaced_service,
                "configmaps": self.core.list_namespaced_config_map}[kind]
        return self._json(call(namespace, label_selector=selector, _preload_content=False))["items"]

    def read_secret(self, namespace: str, name: str) -> dict | None:
        try:
            return self._json(self.core.read_namespaced_secret(name, namespace, _preload_content=False))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def create(self, obj: dict) -> bool:
        """Create; False when it already exists (idempotent)."""
        ns = obj["metadata"]["namespace"]
        call = {("v1", "Service"): self.core.create_namespaced_service,
                ("v1", "ConfigMap"): self.core.create_namespaced_config_map,
                ("v1", "Secret"): self.core.create_namespaced_secret,
                ("apps/v1", "StatefulSet"): self.apps.create_namespaced_stateful_set}[obj["apiVersion"], obj["kind"]]
        try:
            call(ns, obj, _preload_content=False)
            return True
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise

    def delete(self, kind: str, namespace: str, name: str) -> None:
        call = {"Service": self.core.delete_namespaced_service, "ConfigMap": self.core.delete_namespaced_config_map,
                "StatefulSet": self.apps.delete_namespaced_stateful_set, "Pod": self.core.delete_namespaced_pod}[kind]
        try:
            call(name, namespace, propagation_policy="Background", _preload_content=False)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def delete_pods(self, namespace: str, selector: str) -> None:
        self.core.delete_collection_namespaced_pod(namespace, label_selector=selector, _preload_content=False)

    def json_patch(self, kind: str, namespace: str, name: str, ops: list[dict]) -> None:
        call = {"StatefulSet": self.apps.patch_namespaced_stateful_set, "Pod": self.core.patch_namespaced_pod,
                "Service": self.core.patch_namespaced_service}[kind]
        call(name, namespace, ops, _preload_content=False)  # a list body: application/json-patch+json

    def event(self, obj: dict, type_: str, reason: str, message: str) -> None:
        meta = obj["metadata"]
        now = _dt.datetime.now(_dt.timezone.utc)
        body = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{meta['name']}.", namespace=meta["namespace"]),
            involved_object=client.V1ObjectReference(api_version=f"{S.GROUP}/{S.VERSION}", kind=S.KIND,
                                                     name=meta["name"], namespace=meta["namespace"], uid=meta["uid"],
                                                     resource_version=meta.get("resourceVersion")),
            reason=reason, message=message[:1024], type=type_, first_timestamp=now, last_timestamp=now, count=1,
            source=client.V1EventSource(component="distgen-operator"), reporting_component="distgen-operator")
        try:
            self.core.create_namespaced_event(meta["namespace"], body, _preload_content=False)
        except ApiException as exc:  # an event is never worth failing a reconcile over
            log.warning("could not post event %s: %s", reason, exc.reason)


def _without_empty_strings(value):
    """1.20's API server reads an empty string in a custom resource as null (and rejects it as not a
    string): leave such fields out."""
    if isinstance(value, dict):
        return {k: _without_empty_strings(v) for k, v in value.items() if v != ""}
    if isinstance(value, list):
        return [_without_empty_strings(v) for v in value]
    return value


def owner_reference(obj: dict) -> dict:
    return {"apiVersion": f"{S.GROUP}/{S.VERSION}", "kind": S.KIND, "name": obj["metadata"]["name"],
            "uid": obj["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}


def _owned(child: dict, obj: dict) -> dict:
    child["metadata"]["ownerReferences"] = [owner_reference(obj)]
    return child


def _group_states(cluster: Cluster, ns: str, name: str) -> list[X.GroupState]:
    selector = f"{D.LABEL_SERVICE}={name}"
    sets = cluster.list("statefulsets", ns, selector)
    pods = cluster.list("pods", ns, selector)
    return [X.group_state(sts, [p for p in pods if (p["metadata"].get("labels") or {}).get(D.LABEL_GROUP)
                                == sts["metadata"]["name"]]) for sts in sets]


def reconcile(obj: dict, cluster: Cluster | None = None) -> dict:
    """Bring the children of one ``DistgenService`` one step closer to its spec; returns the status
    written. Safe to call any number of times, from any trigger."""
    cluster = cluster or Cluster()
    meta = obj["metadata"]
    name, ns, generation = meta["name"], meta["namespace"], meta.get("generation", 1)
    previous = (obj.get("status") or {}).get("conditions") or []
    if meta.get("deletionTimestamp"):
        return obj.get("status") or {}
    try:
        spec = S.parse_spec(obj.get("spec") or {})
        S.validate_spec(spec)
        ref = spec.serve.api_key_secret_ref
        if ref:
            found = cluster.read_secret(ns, ref.name)
            if found is None or ref.key not in (found.get("data") or {}):
                raise ConfigError(f"spec.serve.apiKeySecretRef: Secret {ref.name!r} with key {ref.key!r} not found in "
                                  f"namespace {ns}")
    except ConfigError as exc:
        message = str(exc)
        before = next((c for c in previous if c.get("type") == "Ready"), {})
        if before.get("reason") != "InvalidSpec" or before.get("message") != message:
            cluster.event(obj, "Warning", "InvalidSpec", message)
        status = X.invalid_status(name, message, generation, previous, _now(), obj.get("status"))
        cluster.patch_status(ns, name, status)
        return status

    h = D.spec_hash(spec)
    # shared children
    if not spec.serve.api_key_secret_ref and cluster.read_secret(ns, f"{name}-api-key") is None:
        if cluster.create(_owned(D.secret(name, ns, secrets.token_urlsafe(24)), obj)):
            cluster.event(obj, "Normal", "SecretCreated", f"generated the API key Secret {name}-api-key")
    cluster.create(_owned(D.configmap(name, ns, spec), obj))
    service = _owned(D.client_service(name, ns, spec), obj)
    services = {s["metadata"]["name"]: s for s in cluster.list("services", ns, f"{D.LABEL_SERVICE}={name}")}
    if name not in services:
        cluster.create(service)
    elif [(p.get("port"), p.get("targetPort")) for p in services[name]["spec"].get("ports") or []] != [
            (p["port"], p["targetPort"]) for p in service["spec"]["ports"]]:
        cluster.json_patch("Service", ns, name, [{"op": "replace", "path": "/spec/ports", "value":
                                                  service["spec"]["ports"]}])

    groups = _group_states(cluster, ns, name)
    by_index = {g.index: g for g in groups}
    actions = X.decide(groups, h, spec.replicas, spec.rollout.max_surge, spec.rollout.max_unavailable)
    acted = set()
    for action in actions:
        acted.add(action.index)
        group = D.group_name(name, action.index)
        if isinstance(action, X.Create):
            cluster.create(_owned(D.headless_service(name, ns, action.index), obj))
            if cluster.create(_owned(D.statefulset(name, ns, action.index, spec), obj)):
                cluster.event(obj, "Normal", "GroupCreated", f"group {group} created ({action.reason}; spec {h}, "
                              f"{spec.topology.nodes_per_replica} pod(s))")
        elif isinstance(action, X.Delete):
            cluster.delete("StatefulSet", ns, group)
            cluster.delete("Service", ns, group)
            cluster.event(obj, "Normal", "GroupDeleted", f"group {group} deleted ({action.reason})")
        elif isinstance(action, X.Recreate):
            g = by_index[action.index]
            ops = [{"op": "add", "path": f"/metadata/annotations/{_escape(D.ANNOTATION_PODS)}", "value": ""}]
            if action.failure:
                ops += [{"op": "add", "path": f"/metadata/annotations/{_escape(D.ANNOTATION_RESTARTS)}",
                         "value": str(g.restarts + 1)},
                        {"op": "add", "path": f"/metadata/annotations/{_escape(D.ANNOTATION_RECOVERING)}",
                         "value": action.reason}]
            if action.update:
                new = D.statefulset(name, ns, action.index, spec)
                ops += [{"op": "replace", "path": "/spec/template", "value": new["spec"]["template"]},
                        {"op": "add", "path": f"/metadata/labels/{_escape(D.LABEL_HASH)}", "value": h}]
            cluster.json_patch("StatefulSet", ns, group, ops)
            cluster.delete_pods(ns, f"{D.LABEL_GROUP}={group}")
            if action.failure:
                cluster.event(obj, "Warning", "GroupRecreated", f"group {group}: {action.reason} (restart "
                              f"{g.restarts + 1})")
            else:
                cluster.event(obj, "Normal", "RolloutStep", f"group {group}: {action.reason}")
    for g in groups:
        if g.index in acted or g.phase == "Terminating":
            continue
        group = g.name
        if g.record_uids and g.phase != "Failed":
            cluster.json_patch("StatefulSet", ns, group, [
                {"op": "add", "path": f"/metadata/annotations/{_escape(D.ANNOTATION_PODS)}",
                 "value": ",".join(g.record_uids)}])
        if g.unlabeled_leader:
            cluster.json_patch("Pod", ns, g.unlabeled_leader, [
                {"op": "add", "path": f"/metadata/labels/{_escape(D.LABEL_ROLE)}", "value": "leader"}])
        if g.ready and g.recovering:
            cluster.json_patch("StatefulSet", ns, group, [
                {"op": "add", "path": f"/metadata/annotations/{_escape(D.ANNOTATION_RECOVERING)}", "value": ""}])
            cluster.event(obj, "Normal", "GroupRecovered", f"group {group} is ready again after: {g.recovering}")
    # the headless Service of every group (recreated if someone deleted it)
    for g in groups:
        if g.phase != "Terminating" and g.index not in acted and g.name not in services:
            cluster.create(_owned(D.headless_service(name, ns, g.index), obj))
    # serve-option ConfigMaps no group uses any more
    after = _group_states(cluster, ns, name)
    in_use = {g.hash for g in after} | {h}
    for cm in cluster.list("configmaps", ns, f"{D.LABEL_SERVICE}={name}"):
        if (cm["metadata"].get("labels") or {}).get(D.LABEL_HASH) not in in_use:
            cluster.delete("ConfigMap", ns, cm["metadata"]["name"])
    status = X.status(name, spec, after, h, generation, previous, _now())
    old = obj.get("status") or {}
    was = {g.get("name"): g.get("phase") for g in old.get("groups") or []}
    for g in after:
        if g.ready and was.get(g.name) != "Ready":
            cluster.event(obj, "Normal", "GroupReady", f"group {g.name} is ready (leader {g.leader}, spec {g.hash})")
    if {k: v for k, v in old.items() if k in status} != _without_empty_strings(status):
        before = {c["type"]: c["status"] for c in previous}
        for c in status["conditions"]:
            if before.get(c["type"]) not in (None, c["status"]) or (c["type"] == "Ready" and c["status"] == "True"
                                                                     and before.get("Ready") != "True"):
                bad = (c["type"], c["status"]) in (("Ready", "False"), ("Degraded", "True"))
                cluster.event(obj, "Warning" if bad else "Normal",
                              f"{c['type']}{c['status']}", f"{c['type']}={c['status']} ({c['reason']}): {c['message']}")
        cluster.patch_status(ns, name, status)
    return status


# ---------------------------------------------------------------------------------------------- triggers

_running: dict[tuple[str, str], list] = {}  # (namespace, name) -> [running, dirty]
_lock = threading.Lock()


def reconcile_named(namespace: str, name: str, cluster: Cluster | None = None) -> None:
    """Reconcile the object as it is now in the API server; coalesced per object (see module doc)."""
    key = (namespace, name)
    with _lock:
        state = _running.setdefault(key, [False, False])
        if state[0]:
            state[1] = True
            return
        state[0] = True
    try:
        while True:
            with _lock:
                state[1] = False
            obj = (cluster or Cluster()).get_service_object(namespace, name)
            if obj is not None:
                try:
                    reconcile(obj, cluster)
                except ApiException as exc:
                    if exc.status not in (404, 409):  # a conflict or a vanished child: the next trigger retries
                        raise
                    log.info("reconcile %s/%s: %s (retrying on the next trigger)", namespace, name, exc.reason)
            with _lock:
                if not state[1]:
                    state[0] = False
                    return
    except BaseException:
        with _lock:
            state[0] = False
        raise


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=f"operator.{S.GROUP}")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=f"operator.{S.GROUP}")
    settings.posting.level = logging.WARNING  # our own Events say what happens; not kopf's per-handler ones
    settings.watching.server_timeout = 60
    settings.execution.max_workers = 8


@kopf.on.resume(S.GROUP, S.VERSION, S.PLURAL)
@kopf.on.create(S.GROUP, S.VERSION, S.PLURAL)
@kopf.on.update(S.GROUP, S.VERSION, S.PLURAL)
def reconcile_on_change(namespace: str, name: str, **_) -> None:
    reconcile_named(namespace, name)


@kopf.timer(S.GROUP, S.VERSION, S.PLURAL, interval=TIMER_INTERVAL_S, idle=5)
def reconcile_on_timer(namespace: str, name: str, **_) -> None:
    reconcile_named(namespace, name)


_CHILD_LABELS = {D.MANAGED_BY[0]: D.MANAGED_BY[1]}


@kopf.on.event("apps", "v1", "statefulsets", labels=_CHILD_LABELS)
@kopf.on.event("v1", "pods", labels={D.LABEL_SERVICE: kopf.PRESENT, D.LABEL_GROUP: kopf.PRESENT})
def reconcile_on_child(body, namespace: str, **_) -> None:
    owner = (body.get("metadata", {}).get("labels") or {}).get(D.LABEL_SERVICE)
    if owner:
        reconcile_named(namespace, owner)
