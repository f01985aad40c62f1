"""Group state, group recreation, scaling and rollout decisions, status: pure functions on plain dicts."""

from distgen.cluster import decide as X, desired as D, spec as S

H_OLD, H_NEW = "old0000000", "new0000000"


def sts(index, h=H_NEW, nodes=2, pods_uids="", restarts=0, deleting=False):
    meta = {"name": f"s-{index}", "labels": {D.LABEL_INDEX: str(index), D.LABEL_HASH: h},
            "annotations": {D.ANNOTATION_RESTARTS: str(restarts), D.ANNOTATION_PODS: pods_uids}}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta, "spec": {"replicas": nodes}}


def pod(group, ordinal, phase="Running", ready=True, restarts=0, uid=None, deleting=False, leader_label=True,
        h=H_NEW):
    name = f"s-{group}-{ordinal}"
    meta = {"name": name, "uid": uid or f"uid-{name}", "labels": {D.LABEL_HASH: h}}
    if ordinal == 0 and leader_label:
        meta["labels"][D.LABEL_ROLE] = "leader"
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta, "status": {"phase": phase, "podIP": f"10.0.{group}.{ordinal}",
                                         "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                                         "containerStatuses": [{"restartCount": restarts}]}}


def state(index, *pods, **kw):
    return X.group_state(sts(index, **kw), list(pods))


def uids(group, n=2):
    return ",".join(f"uid-s-{group}-{i}" for i in range(n))


def test_group_phases():
    assert state(0, pod(0, 0), pod(0, 1), pods_uids=uids(0)).phase == "Ready"
    assert state(0, pod(0, 0, ready=False), pod(0, 1), pods_uids=uids(0)).phase == "Starting"
    assert state(0, pod(0, 0, phase="Pending", ready=False)).phase == "Pending"
    assert state(0, pod(0, 0), pod(0, 1, deleting=True)).phase == "Recreating"
    assert state(0, pod(0, 0), deleting=True).phase == "Terminating"
    failed = state(0, pod(0, 0), pod(0, 1, phase="Failed"), pods_uids=uids(0))
    assert failed.phase == "Failed" and failed.reason == "pod s-0-1 failed"
    assert state(0, pod(0, 0, restarts=1), pod(0, 1), pods_uids=uids(0)).reason == "pod s-0-0 restarted"
    alone = state(0, pod(0, 0), pod(0, 1, uid="fresh"), pods_uids=uids(0))
    assert alone.phase == "Failed" and "recreated alone" in alone.reason


def test_uids_recorded_once_all_pods_exist_and_leader_labelled():
    assert state(0, pod(0, 0)).record_uids is None  # one of two pods
    assert state(0, pod(0, 0), pod(0, 1)).record_uids == ["uid-s-0-0", "uid-s-0-1"]
    assert state(0, pod(0, 0), pod(0, 1), pods_uids=uids(0)).record_uids is None
    assert state(0, pod(0, 0, leader_label=False), pod(0, 1)).unlabeled_leader == "s-0-0"


def test_pods_of_an_old_template_make_the_group_outdated():
    """An operator stopped between updating a group's template and deleting its pods: the group is
    outdated still, so the next reconcile replaces it (rather than calling it updated)."""
    g = state(0, pod(0, 0, h=H_OLD), pod(0, 1, h=H_OLD), pods_uids=uids(0))
    assert g.hash == H_OLD and g.phase == "Ready"
    assert [type(a) for a in X.decide([g], H_NEW, 1, 0, 1)] == [X.Recreate]


def ready(index, h=H_NEW):
    return X.GroupState(index=index, name=f"s-{index}", hash=h, phase="Ready")


def g(index, phase, h=H_NEW, reason=""):
    return X.GroupState(index=index, name=f"s-{index}", hash=h, phase=phase, reason=reason)


def test_create_missing_groups_at_the_lowest_free_indexes():
    assert X.decide([], H_NEW, 2, 0, 1) == [X.Create(0, "scaling up"), X.Create(1, "scaling up")]
    assert [a.index for a in X.decide([ready(1)], H_NEW, 3, 0, 1)] == [0, 2]
    # a terminating group keeps its index until it is gone
    assert [a.index for a in X.decide([g(0, "Terminating")], H_NEW, 1, 0, 1)] == [1]


def test_scale_down_removes_whole_groups_not_ready_first_then_highest():
    actions = X.decide([ready(0), ready(1), ready(2)], H_NEW, 1, 0, 1)
    assert [(type(a), a.index) for a in actions] == [(X.Delete, 2), (X.Delete, 1)]
    actions = X.decide([ready(0), g(1, "Starting"), ready(2)], H_NEW, 2, 0, 1)
    assert [(type(a), a.index) for a in actions] == [(X.Delete, 1)]


def test_failed_group_is_recreated_as_a_unit_others_untouched():
    actions = X.decide([ready(0), g(1, "Failed", reason="pod s-1-1 failed")], H_NEW, 2, 0, 1)
    assert actions == [X.Recreate(1, "pod s-1-1 failed; recreating the whole group", update=False, failure=True)]
    assert X.decide([ready(0), ready(1)], H_NEW, 2, 0, 1) == []
    assert X.decide([ready(0), g(1, "Starting")], H_NEW, 2, 0, 1) == []  # slow is not failed
    assert X.decide([ready(0), g(1, "Recreating")], H_NEW, 2, 0, 1) == []


def test_rollout_in_place_one_group_at_a_time_with_max_surge_0():
    groups = [ready(0, H_OLD), ready(1, H_OLD), ready(2, H_OLD)]
    step = X.decide(groups, H_NEW, 3, 0, 1)
    assert [(type(a), a.index, a.update) for a in step] == [(X.Recreate, 2, True)]
    # group 2 is coming up with the new spec: nothing else goes until it is ready
    assert X.decide([ready(0, H_OLD), ready(1, H_OLD), g(2, "Starting")], H_NEW, 3, 0, 1) == []
    assert X.decide([ready(0, H_OLD), ready(1, H_OLD), g(2, "Recreating")], H_NEW, 3, 0, 1) == []
    step = X.decide([ready(0, H_OLD), ready(1, H_OLD), ready(2)], H_NEW, 3, 0, 1)
    assert [(type(a), a.index) for a in step] == [(X.Recreate, 1)]
    # an outdated group that is not ready anyway may go at once
    step = X.decide([ready(0, H_OLD), g(1, "Starting", H_OLD), ready(2)], H_NEW, 3, 0, 1)
    assert [a.index for a in step] == [1]
    # maxUnavailable 2: two at a time
    assert len(X.decide([ready(0, H_OLD), ready(1, H_OLD), ready(2, H_OLD)], H_NEW, 3, 0, 2)) == 2
    assert X.decide([ready(0), ready(1), ready(2)], H_NEW, 3, 0, 1) == []


def test_rollout_with_surge_adds_first_then_removes():
    step = X.decide([ready(0, H_OLD), ready(1, H_OLD)], H_NEW, 2, 1, 0)
    assert [(type(a), a.index) for a in step] == [(X.Create, 2)]
    assert X.decide([ready(0, H_OLD), ready(1, H_OLD), g(2, "Starting")], H_NEW, 2, 1, 0) == []
    step = X.decide([ready(0, H_OLD), ready(1, H_OLD), ready(2)], H_NEW, 2, 1, 0)
    assert [(type(a), a.index) for a in step] == [(X.Delete, 1)]
    step = X.decide([ready(0, H_OLD), ready(2)], H_NEW, 2, 1, 0)
    assert [(type(a), a.index) for a in step] == [(X.Create, 1)]
    step = X.decide([ready(0, H_OLD), ready(1), ready(2)], H_NEW, 2, 1, 0)
    assert [(type(a), a.index) for a in step] == [(X.Delete, 0)]


def test_scale_during_rollout_removes_outdated_first():
    step = X.decide([ready(0), ready(1, H_OLD), ready(2, H_OLD)], H_NEW, 1, 0, 1)
    assert sorted(a.index for a in step if isinstance(a, X.Delete)) == [1, 2]


def test_failed_outdated_group_comes_back_with_the_new_spec():
    step = X.decide([ready(0, H_OLD), g(1, "Failed", H_OLD, "pod s-1-0 failed")], H_NEW, 2, 0, 1)
    assert step == [X.Recreate(1, "pod s-1-0 failed; recreating the whole group", update=True, failure=True)]


def the_spec(replicas=2):
    return S.parse_spec({"model": {"source": "m"}, "replicas": replicas, "parallel": "tp=2",
                         "topology": {"nodesPerReplica": 2}})


def conds(status):
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_status_and_conditions():
    st = X.status("s", the_spec(), [ready(0), ready(1)], H_NEW, 3, [], "T1")
    assert (st["replicas"], st["readyReplicas"], st["updatedReplicas"], st["ready"]) == (2, 2, 2, "2/2")
    assert st["observedGeneration"] == 3 and st["selector"] == "distgen.io/service=s,distgen.io/role=leader"
    assert conds(st) == {"Ready": ("True", "AllGroupsReady"), "Progressing": ("False", "Complete"),
                         "Degraded": ("False", "AllGroupsHealthy")}
    st2 = X.status("s", the_spec(), [ready(0), g(1, "Failed", reason="pod s-1-1 failed")], H_NEW, 3,
                   st["conditions"], "T2")
    assert conds(st2)["Degraded"] == ("True", "GroupFailed") and conds(st2)["Ready"][0] == "False"
    times = {c["type"]: c["lastTransitionTime"] for c in st2["conditions"]}
    assert times == {"Ready": "T2", "Progressing": "T2", "Degraded": "T2"}
    st3 = X.status("s", the_spec(), [ready(0), ready(1, H_OLD)], H_NEW, 4, st["conditions"], "T3")
    assert conds(st3)["Progressing"] == ("True", "RollingOut") and st3["updatedReplicas"] == 1
    assert {c["type"]: c["lastTransitionTime"] for c in st3["conditions"]}["Ready"] == "T1"  # unchanged since T1
    assert st3["groups"][1] == {"name": "s-1", "index": 1, "phase": "Ready", "restarts": 0, "specHash": H_OLD,
                                "readyPods": 0, "leader": "", "message": ""}


def test_invalid_spec_status():
    st = X.invalid_status("s", "--parallel: ...", 2, [], "T")
    assert conds(st)["Ready"] == ("False", "InvalidSpec")
    assert [c["message"] for c in st["conditions"] if c["type"] == "Ready"] == ["--parallel: ..."]
