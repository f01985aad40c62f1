"""What the operator does next: pure functions from observed groups to actions and status.

A *group* is one replica: a StatefulSet ``NAME-I`` and its ``nodesPerReplica`` pods. Its state is
read from the objects alone (:func:`group_state`); :func:`decide` turns the states, the desired
spec hash and the replica count into actions; :func:`status` into the resource's status. None of
this talks to the API server, so the decisions are unit-tested on plain dicts.

- A group is one unit: any pod Failed, restarted (restartCount > 0) or recreated alone (a uid the
  group did not start with) makes the whole group Failed, and it is recreated (all its pods
  deleted at once; the StatefulSet creates them anew). Never because the app is slow: a group
  whose pods run but whose leader is not ready yet is only Starting (its startup probe, on a
  real kubelet, restarts it after ``probes.startupTimeoutSeconds``, which then counts as failed).
- ``replicas`` adds groups at the lowest free indexes or removes whole groups (not-ready first,
  then the highest index).
- A changed spec hash rolls: with ``maxSurge`` 0 an outdated group is replaced in place while at
  least ``replicas - maxUnavailable`` groups stay ready (so one at a time with the defaults); with
  ``maxSurge`` > 0 new groups are added first and an outdated one goes only when that keeps
  ``replicas - maxUnavailable`` ready.
"""

from __future__ import annotations

from dataclasses import dataclass

from distgen.cluster import desired as D

# ---------------------------------------------------------------------------------------------- group state


@dataclass
class GroupState:
    index: int
    name: str
    hash: str
    phase: str  # Pending, Starting, Ready, Failed, Recreating, Terminating
    restarts: int = 0
    ready_pods: int = 0
    reason: str = ""  # why Failed (the pod and what happened)
    leader: str = ""  # the leader pod's IP
    recovering: str = ""  # set while a group recreated after a failure is not ready again
    record_uids: list[str] | None = None  # all pods up and not yet recorded: record these uids
    unlabeled_leader: str = ""  # pod 0 lacks the leader label: label it

    @property
    def ready(self) -> bool:
        return self.phase == "Ready"


def _pod_ready(pod: dict) -> bool:
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return c.get("status") == "True"
    return False


def _ordinal(pod: dict) -> int:
    return int(pod["metadata"]["name"].rsplit("-", 1)[1])


def group_state(sts: dict, pods: list[dict]) -> GroupState:
    meta = sts["metadata"]
    labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
    index = int(labels[D.LABEL_INDEX])
    g = GroupState(index=index, name=meta["name"], hash=labels.get(D.LABEL_HASH, ""), phase="Pending",
                   restarts=int(annotations.get(D.ANNOTATION_RESTARTS, "0") or 0),
                   recovering=annotations.get(D.ANNOTATION_RECOVERING, ""))
    nodes = int(sts["spec"]["replicas"])
    if meta.get("deletionTimestamp"):
        g.phase = "Terminating"
        return g
    pods = sorted((p for p in pods if p["metadata"]["name"].rsplit("-", 1)[0] == g.name), key=_ordinal)
    if any(p["metadata"].get("deletionTimestamp") for p in pods):
        g.phase = "Recreating"
        return g
    # the template was updated but some pods still run the old one (an operator stopped between the
    # two steps of a replacement): the group counts as outdated, so the replacement is done again
    stale = [(p["metadata"].get("labels") or {}).get(D.LABEL_HASH) for p in pods]
    stale = [h for h in stale if h and h != g.hash]
    if stale:
        g.hash = stale[0]
    recorded = set(filter(None, annotations.get(D.ANNOTATION_PODS, "").split(",")))
    for p in pods:
        name, st = p["metadata"]["name"], p.get("status") or {}
        if st.get("phase") in ("Failed", "Succeeded"):
            detail = st.get("message") or st.get("reason") or ""
            g.phase, g.reason = "Failed", f"pod {name} {'failed' if st['phase'] == 'Failed' else 'exited'}" + (
                f": {detail}" if detail else "")
            return g
        for cs in st.get("containerStatuses") or []:
            if cs.get("restartCount", 0) > 0:
                last = ((cs.get("lastState") or {}).get("terminated") or {})
                why = f" (exit code {last['exitCode']}, {last.get('reason', '')})" if "exitCode" in last else ""
                g.phase, g.reason = "Failed", f"pod {name} restarted{why}"
                return g
        if recorded and p["metadata"]["uid"] not in recorded:
            g.phase, g.reason = "Failed", f"pod {name} was recreated alone (a rank of the group was lost)"
            return g
    running = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]
    g.ready_pods = sum(1 for p in pods if _pod_ready(p))
    leader = next((p for p in pods if _ordinal(p) == 0), None)
    if leader is not None:
        g.leader = (leader.get("status") or {}).get("podIP", "")
        if (leader["metadata"].get("labels") or {}).get(D.LABEL_ROLE) != "leader":
            g.unlabeled_leader = leader["metadata"]["name"]
    if len(pods) == nodes and not recorded:
        g.record_uids = [p["metadata"]["uid"] for p in pods]
    if len(running) < nodes:
        g.phase = "Starting" if running else "Pending"
    elif g.ready_pods == nodes:
        g.phase = "Ready"
    else:
        g.phase = "Starting"
    return g


# ---------------------------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class Create:
    index: int
    reason: str


@dataclass(frozen=True)
class Delete:
    index: int
    reason: str


@dataclass(frozen=True)
class Recreate:
    """Delete every pod of the group at once; ``update``: with the current spec's template first."""

    index: int
    reason: str
    update: bool
    failure: bool  # a failure (counts as a restart, Degraded) rather than a rollout step


def _free_indexes(used: set[int], count: int) -> list[int]:
    out, i = [], 0
    while len(out) < count:
        if i not in used:
            out.append(i)
        i += 1
    return out


def _removal_order(groups: list[GroupState]) -> list[GroupState]:
    """Which groups go first: not ready, then the highest index."""
    return sorted(groups, key=lambda g: (g.ready, -g.index))


def decide(groups: list[GroupState], desired_hash: str, replicas: int, max_surge: int,
           max_unavailable: int) -> list:
    """The next actions (each idempotent: running them twice changes nothing more)."""
    actions: list = []
    live = [g for g in groups if g.phase != "Terminating"]
    used = {g.index for g in groups}  # a terminating group's index is taken until it is gone
    outdated = [g for g in live if g.hash != desired_hash]
    surge = max_surge if outdated else 0

    # scale down: whole groups
    excess = len(live) - (replicas + surge)
    removed: set[int] = set()
    if excess > 0:
        for g in _removal_order(outdated)[:excess] + _removal_order([g for g in live if g not in outdated]):
            if len(removed) == excess:
                break
            removed.add(g.index)
            actions.append(Delete(g.index, f"scaling to {replicas} replica(s)" if g.hash == desired_hash
                                  else f"scaling to {replicas} replica(s) (outdated group first)"))
    live = [g for g in live if g.index not in removed]
    outdated = [g for g in outdated if g.index not in removed]

    # failed groups: recreated as a unit (with the current template when outdated)
    replaced: set[int] = set()
    for g in live:
        if g.phase == "Failed":
            replaced.add(g.index)
            actions.append(Recreate(g.index, f"{g.reason}; recreating the whole group", update=g.hash != desired_hash,
                                    failure=True))

    # scale up (and surge): new groups at the lowest free indexes
    missing = replicas + surge - len(live)
    if surge:  # no more new groups than outdated ones to replace
        updated = len(live) - len(outdated)
        missing = min(missing, max(0, replicas - updated))
    for i in _free_indexes(used, max(0, missing)):
        actions.append(Create(i, "scaling up" if not surge else f"rollout: surge group (maxSurge {max_surge})"))

    # rollout of outdated groups
    if outdated:
        available = sum(1 for g in live if g.ready and g.index not in replaced)
        floor = replicas - max_unavailable
        for g in _removal_order([g for g in outdated if g.index not in replaced]):
            if g.ready:
                if available - 1 < floor:
                    continue
                available -= 1
            if max_surge and len(live) > replicas:
                live = [x for x in live if x.index != g.index]
                actions.append(Delete(g.index, f"rollout: outdated group (spec {g.hash} -> {desired_hash})"))
            elif not max_surge:
                actions.append(Recreate(g.index, f"rollout: replacing group in place (spec {g.hash} -> "
                                        f"{desired_hash}, maxSurge 0)", update=True, failure=False))
    return actions


# ---------------------------------------------------------------------------------------------- status


def condition(type_: str, status_: bool | str, reason: str, message: str, generation: int,
              previous: list[dict], now: str) -> dict:
    value = status_ if isinstance(status_, str) else ("True" if status_ else "False")
    before = next((c for c in previous or [] if c.get("type") == type_), None)
    since = before["lastTransitionTime"] if before and before.get("status") == value and before.get(
        "lastTransitionTime") else now
    return {"type": type_, "status": value, "reason": reason, "message": message, "lastTransitionTime": since,
            "observedGeneration": generation}


def status(name: str, spec, groups: list[GroupState], desired_hash: str, generation: int,
           previous: list[dict], now: str) -> dict:
    live = [g for g in groups if g.phase != "Terminating"]
    ready = sum(1 for g in live if g.ready)
    updated = sum(1 for g in live if g.hash == desired_hash)
    replicas = spec.replicas
    failed = [g for g in live if g.phase == "Failed" or g.recovering]
    if ready >= replicas:
        ready_c = ("AllGroupsReady" if replicas else "ScaledToZero",
                   f"{ready}/{replicas} groups ready" if replicas else "replicas is 0")
    else:
        ready_c = ("GroupsNotReady", f"{ready}/{replicas} groups ready: " + ", ".join(
            f"{g.name} {g.phase}" for g in sorted(live, key=lambda g: g.index) if not g.ready))
    if updated < len(live) or updated < replicas:
        progressing = (True, "RollingOut", f"{updated}/{replicas} groups have spec {desired_hash}")
    elif len(live) != replicas or len(groups) != len(live):
        progressing = (True, "Scaling", f"{len(live)} groups, {replicas} wanted")
    elif ready < replicas:
        progressing = (True, "GroupsStarting", f"{ready}/{replicas} groups ready")
    else:
        progressing = (False, "Complete", f"{replicas} group(s) with spec {desired_hash}, all ready")
    degraded = (True, "GroupFailed", "; ".join(f"{g.name}: {g.reason or g.recovering}" for g in failed)) if failed \
        else (False, "AllGroupsHealthy", "no group failed")
    return {
        "observedGeneration": generation,
        "replicas": len(live), "readyReplicas": ready, "updatedReplicas": updated,
        "ready": f"{ready}/{replicas}", "plan": D.plan_text(spec), "specHash": desired_hash,
        "selector": D.selector_string(name),
        "conditions": [
            condition("Ready", ready >= replicas, *ready_c, generation, previous, now),
            condition("Progressing", progressing[0], *progressing[1:], generation, previous, now),
            condition("Degraded", degraded[0], *degraded[1:], generation, previous, now),
        ],
        "groups": [{"name": g.name, "index": g.index, "phase": g.phase, "restarts": g.restarts, "specHash": g.hash,
                    "readyPods": g.ready_pods, "leader": g.leader, "message": g.reason or g.recovering}
                   for g in sorted(groups, key=lambda g: g.index)],
    }


def invalid_status(name: str, message: str, generation: int, previous: list[dict], now: str,
                   before: dict | None = None) -> dict:
    """A spec distgen's validation rejects: Ready=False reason=InvalidSpec; nothing is created or changed."""
    out = {k: v for k, v in (before or {}).items() if k in ("replicas", "readyReplicas", "updatedReplicas", "groups",
                                                             "ready", "plan", "specHash")}
    out.update({"observedGeneration": generation, "selector": D.selector_string(name), "conditions": [
        condition("Ready", False, "InvalidSpec", message, generation, previous, now),
        condition("Progressing", False, "InvalidSpec", "the spec must be fixed first", generation, previous, now),
        condition("Degraded", False, "InvalidSpec", "nothing was changed", generation, previous, now),
    ]})
    out.setdefault("ready", "0/0")
    return out

