"""The loopback test cluster, exercised with the real `kubernetes` client (and kubectl) over HTTP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import textwrap
import threading
import time
import urllib.error
import urllib.request

import pytest

kubernetes = pytest.importorskip("kubernetes")
from kubernetes import client, config, watch  # noqa: E402
from kubernetes.client.exceptions import ApiException  # noqa: E402

from testkit.cluster import LoopbackCluster  # noqa: E402

NS = "default"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LoopbackCluster(tmp_path_factory.mktemp("cluster"), max_grace_seconds=2.0) as c:
        yield c
        assert not c.server_errors, [repr(e) for e in c.server_errors]


@pytest.fixture(scope="module")
def api(cluster):
    config.load_kube_config(config_file=str(cluster.kubeconfig))  # what a CLI does; also sets the default client
    api_client = config.new_client_from_config(config_file=str(cluster.kubeconfig))
    yield api_client
    api_client.close()


@pytest.fixture
def ns(cluster, request):
    """A fresh namespace per test (with its default ServiceAccount)."""
    name = "t-" + request.node.name.replace("_", "-")[5:40].strip("-").lower()
    cluster.create_namespace(name)
    return name


def status_of(e: ApiException) -> dict:
    return json.loads(e.body)


def raw(cluster, method: str, path: str, body=None, content_type: str = "application/json") -> tuple[int, dict]:
    """A request without the client's own checks (it refuses some invalid bodies before sending)."""
    req = urllib.request.Request(
        cluster.url + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {cluster.token}", "Content-Type": content_type},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def cond(obj: dict, ctype: str) -> dict | None:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == ctype), None)


def is_true(obj: dict | None, ctype: str) -> bool:
    c = cond(obj or {}, ctype)
    return bool(c and c["status"] == "True")


def pytorchjob(name: str, code: str, workers: int = 1, policy: str = "ExitCode", **spec_extra) -> dict:
    template = {
        "metadata": {"labels": {"app": name}},
        "spec": {
            "containers": [
                {"name": "pytorch", "image": "ghcr.io/ctrlnet/trainer:test", "command": ["python", "-c", code]}
            ]
        },
    }
    replicas = {"Master": {"replicas": 1, "restartPolicy": policy, "template": template}}
    if workers:
        replicas["Worker"] = {"replicas": workers, "restartPolicy": policy, "template": template}
    spec = {"nprocPerNode": "1", "runPolicy": {"cleanPodPolicy": "None"}, "pytorchReplicaSpecs": replicas}
    spec.update(spec_extra)
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": name}, "spec": spec}


def cm(name: str, labels: dict | None = None, data: dict | None = None) -> dict:
    meta = {"name": name}
    if labels:
        meta["labels"] = labels
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data or {"k": "v"}}


# --- discovery -----------------------------------------------------------------------------------


def test_discovery_lists_only_installed_crds(tmp_path):
    with LoopbackCluster(tmp_path, installed={"pytorchjobs"}, run_pods=False) as c:
        api_client = config.new_client_from_config(config_file=str(c.kubeconfig))
        try:
            groups = {g.name: g for g in client.ApisApi(api_client).get_api_versions().groups}
            assert "kubeflow.org" in groups and groups["kubeflow.org"].preferred_version.version == "v1"
            assert "trainer.kubeflow.org" not in groups and "kueue.x-k8s.io" not in groups
            core = {r.name: r for r in client.CoreV1Api(api_client).get_api_resources().resources}
            assert core["pods"].namespaced and core["pods"].kind == "Pod" and "po" in core["pods"].short_names
            assert "pods/log" in core and "pods/status" in core and not core["namespaces"].namespaced
            res = client.CustomObjectsApi(api_client).get_api_resources("kubeflow.org", "v1")
            assert {"pytorchjobs", "pytorchjobs/status"} <= {r.name for r in res.resources}
            with pytest.raises(ApiException) as e:
                client.CustomObjectsApi(api_client).list_namespaced_custom_object(
                    "trainer.kubeflow.org", "v1alpha1", NS, "trainjobs"
                )
            assert e.value.status == 404
            assert status_of(e.value)["message"] == "the server could not find the requested resource"
            assert client.VersionApi(api_client).get_code().git_version == "v1.30.0"
        finally:
            api_client.close()


def test_discovery_with_every_install(cluster, api):
    groups = {g.name: [v.version for v in g.versions] for g in client.ApisApi(api).get_api_versions().groups}
    assert groups["kubeflow.org"] == ["v1"]
    assert groups["trainer.kubeflow.org"] == ["v1alpha1"]
    assert set(groups["kueue.x-k8s.io"]) == {"v1beta1", "v1beta2"}


# --- create / get / list -------------------------------------------------------------------------


def test_create_get_list_with_selectors(cluster, api, ns):
    v1 = client.CoreV1Api(api)
    v1.create_namespaced_config_map(ns, cm("a", {"app": "x", "tier": "web"}))
    v1.create_namespaced_config_map(ns, cm("b", {"app": "y", "tier": "db"}))
    v1.create_namespaced_config_map(ns, cm("c", {"app": "x"}))
    got = v1.read_namespaced_config_map("a", ns)
    assert got.metadata.uid and got.metadata.creation_timestamp and int(got.metadata.resource_version) > 0
    assert got.metadata.managed_fields[0].manager == "OpenAPI-Generator"  # from the User-Agent, as a real server does

    def names(**kw):
        return sorted(
            o.metadata.name
            for o in v1.list_namespaced_config_map(ns, **kw).items
            if o.metadata.name != "kube-root-ca.crt"
        )

    assert names(label_selector="app=x") == ["a", "c"]
    assert names(label_selector="app==x,tier=web") == ["a"]
    assert names(label_selector="app!=x") == ["b"]
    assert names(label_selector="tier in (web,db)") == ["a", "b"]
    assert names(label_selector="tier notin (web)") == ["b", "c"]
    assert names(label_selector="tier") == ["a", "b"]
    assert names(label_selector="!tier") == ["c"]
    assert names(field_selector="metadata.name=b") == ["b"]
    assert names(field_selector="metadata.name!=b") == ["a", "c"]
    with pytest.raises(ApiException) as e:
        v1.list_namespaced_config_map(ns, field_selector="data.k=v")
    assert e.value.status == 400 and status_of(e.value)["message"] == "field label not supported: data.k"
    with pytest.raises(ApiException) as e:
        client.CustomObjectsApi(api).list_namespaced_custom_object(
            "kubeflow.org", "v1", ns, "pytorchjobs", field_selector="spec.x=1"
        )
    assert (
        status_of(e.value)["message"]
        == '"spec.x" is not a known field selector: only "metadata.name", "metadata.namespace"'
    )
    page = v1.list_namespaced_config_map(ns, limit=2)
    assert len(page.items) == 2 and page.metadata._continue
    rest = v1.list_namespaced_config_map(ns, limit=2, _continue=page.metadata._continue)
    assert len(rest.items) == 2 and not rest.metadata._continue


def test_events_and_pod_field_selectors(cluster, api, ns):
    v1 = client.CoreV1Api(api)
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "quick"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "main", "image": "python:3.11", "command": ["python", "-c", "print('done')"]}],
        },
    }
    v1.create_namespaced_pod(ns, pod)
    cluster.wait_for(lambda: cluster.get("pods", ns, "quick")["status"]["phase"] == "Succeeded")
    assert [p.metadata.name for p in v1.list_namespaced_pod(ns, field_selector="status.phase=Succeeded").items] == [
        "quick"
    ]
    assert v1.list_namespaced_pod(ns, field_selector="status.phase=Running").items == []
    evs = v1.list_namespaced_event(ns, field_selector="involvedObject.name=quick,involvedObject.kind=Pod").items
    reasons = {e.reason for e in evs}
    assert {"Scheduled", "Pulled", "Created", "Started"} <= reasons
    sched = next(e for e in evs if e.reason == "Scheduled")
    assert (
        sched.message == f"Successfully assigned {ns}/quick to loopback-node"
        and sched.source.component == "default-scheduler"
    )


# --- server-side apply and patches -----------------------------------------------------------------


def test_server_side_apply(cluster, api, ns):
    co = client.CustomObjectsApi(api)
    job = pytorchjob("ssa", "print(1)", workers=0, runPolicy={"cleanPodPolicy": "None", "suspend": True})
    container = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    container["ports"] = [{"name": "pytorchjob-port", "containerPort": 23456}]  # protocol: defaulted by the CRD
    # quirk of kubernetes==37: 201 is missing from the response map, so an apply that creates returns None
    created = co.patch_namespaced_custom_object(
        "kubeflow.org",
        "v1",
        ns,
        "pytorchjobs",
        "ssa",
        job,
        field_manager="ctrlnet",
        _content_type="application/apply-patch+yaml",
    )
    assert created is None
    live = co.get_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs", "ssa")
    assert live["metadata"]["generation"] == 1
    entry = next(m for m in live["metadata"]["managedFields"] if m["manager"] == "ctrlnet")
    assert entry["operation"] == "Apply" and "f:spec" in entry["fieldsV1"]
    job["spec"]["runPolicy"]["backoffLimit"] = 2
    updated = co.patch_namespaced_custom_object(
        "kubeflow.org",
        "v1",
        ns,
        "pytorchjobs",
        "ssa",
        job,
        field_manager="ctrlnet",
        _content_type="application/apply-patch+yaml",
    )
    assert updated["spec"]["runPolicy"]["backoffLimit"] == 2 and updated["metadata"]["generation"] == 2
    ports = updated["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["ports"]
    assert ports == [
        {"name": "pytorchjob-port", "containerPort": 23456, "protocol": "TCP"}
    ]  # merged by key, not appended
    # fieldManager is required for apply: the real server answers 422 (PatchOptions validation)
    with pytest.raises(ApiException) as e:
        co.patch_namespaced_custom_object(
            "kubeflow.org", "v1", ns, "pytorchjobs", "ssa", job, _content_type="application/apply-patch+yaml"
        )
    assert e.value.status == 422
    assert status_of(e.value)["message"] == (
        'PatchOptions.meta.k8s.io "" is invalid: fieldManager: Required value: is required for apply patch'
    )
    assert status_of(e.value)["details"] == {
        "group": "meta.k8s.io",
        "kind": "PatchOptions",
        "causes": [
            {
                "reason": "FieldValueRequired",
                "message": "Required value: is required for apply patch",
                "field": "fieldManager",
            }
        ],
    }
    # another manager owns suspend: changing it without force conflicts
    other = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": "ssa"},
        "spec": {"runPolicy": {"suspend": False}},
    }
    with pytest.raises(ApiException) as e:
        co.patch_namespaced_custom_object(
            "kubeflow.org",
            "v1",
            ns,
            "pytorchjobs",
            "ssa",
            other,
            field_manager="other-manager",
            _content_type="application/apply-patch+yaml",
        )
    body = status_of(e.value)
    assert e.value.status == 409 and body["reason"] == "Conflict"
    assert body["message"] == 'Apply failed with 1 conflict: conflict with "ctrlnet": .spec.runPolicy.suspend'
    assert body["details"]["causes"][0] == {
        "reason": "FieldManagerConflict",
        "message": 'conflict with "ctrlnet"',
        "field": ".spec.runPolicy.suspend",
    }
    forced = co.patch_namespaced_custom_object(
        "kubeflow.org",
        "v1",
        ns,
        "pytorchjobs",
        "ssa",
        other,
        force=True,
        field_manager="other-manager",
        _content_type="application/apply-patch+yaml",
    )
    assert forced["spec"]["runPolicy"]["suspend"] is False
    # the first manager re-applies without suspend: its other fields stay, suspend stays (now owned by other-manager)
    del job["spec"]["runPolicy"]["suspend"]
    again = co.patch_namespaced_custom_object(
        "kubeflow.org",
        "v1",
        ns,
        "pytorchjobs",
        "ssa",
        job,
        field_manager="ctrlnet",
        _content_type="application/apply-patch+yaml",
    )
    assert again["spec"]["runPolicy"] == {"cleanPodPolicy": "None", "backoffLimit": 2, "suspend": False}
    # a field the manager owned alone and now omits is removed
    del job["spec"]["runPolicy"]["backoffLimit"]
    again = co.patch_namespaced_custom_object(
        "kubeflow.org",
        "v1",
        ns,
        "pytorchjobs",
        "ssa",
        job,
        field_manager="ctrlnet",
        _content_type="application/apply-patch+yaml",
    )
    assert "backoffLimit" not in again["spec"]["runPolicy"]
    # merge patch and JSON patch
    co.patch_namespaced_custom_object(
        "kubeflow.org", "v1", ns, "pytorchjobs", "ssa", {"metadata": {"labels": {"team": "a"}}}
    )
    co.patch_namespaced_custom_object(
        "kubeflow.org",
        "v1",
        ns,
        "pytorchjobs",
        "ssa",  # the client's default is merge patch
        [{"op": "replace", "path": "/spec/runPolicy/suspend", "value": True}],
        _content_type="application/json-patch+json",
    )
    live = co.get_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs", "ssa")
    assert live["metadata"]["labels"] == {"team": "a"} and live["spec"]["runPolicy"]["suspend"] is True
    with pytest.raises(ApiException) as e:
        co.patch_namespaced_custom_object(
            "kubeflow.org",
            "v1",
            ns,
            "pytorchjobs",
            "ssa",
            [{"op": "test", "path": "/spec/nprocPerNode", "value": "8"}],
            _content_type="application/json-patch+json",
        )
    assert e.value.status == 422
    # strategic merge patch: custom resources refuse it (415); core kinds merge lists by key
    with pytest.raises(ApiException) as e:
        co.patch_namespaced_custom_object(
            "kubeflow.org",
            "v1",
            ns,
            "pytorchjobs",
            "ssa",
            {"spec": {}},
            _content_type="application/strategic-merge-patch+json",
        )
    assert e.value.status == 415


def test_dry_run_persists_nothing(cluster, api, ns):
    v1 = client.CoreV1Api(api)
    co = client.CustomObjectsApi(api)
    out = v1.create_namespaced_config_map(ns, cm("dry"), dry_run="All")
    assert out.metadata.uid and not out.metadata.resource_version
    co.patch_namespaced_custom_object(
        "kubeflow.org",
        "v1",
        ns,
        "pytorchjobs",
        "dry",
        pytorchjob("dry", "print(1)", 0),
        field_manager="ctrlnet",
        dry_run="All",
        _content_type="application/apply-patch+yaml",
    )
    assert cluster.get("configmaps", ns, "dry") is None and cluster.get("pytorchjobs", ns, "dry") is None
    v1.create_namespaced_config_map(ns, cm("real"))
    v1.patch_namespaced_config_map("real", ns, {"data": {"k": "changed"}}, dry_run="All")
    v1.delete_namespaced_config_map("real", ns, dry_run="All")
    assert cluster.get("configmaps", ns, "real")["data"] == {"k": "v"}


def test_strategic_merge_patch_merges_containers_by_name(cluster, api, ns):
    v1 = client.CoreV1Api(api)
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "smp"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {"name": "a", "image": "img:1", "command": ["python", "-c", "import time; time.sleep(30)"]},
                {"name": "b", "image": "img:1", "command": ["python", "-c", "import time; time.sleep(30)"]},
            ],
        },
    }
    v1.create_namespaced_pod(ns, pod)
    out = v1.patch_namespaced_pod("smp", ns, {"spec": {"containers": [{"name": "b", "image": "img:2"}]}})
    assert [(c.name, c.image) for c in out.spec.containers] == [("a", "img:1"), ("b", "img:2")]
    with pytest.raises(ApiException) as e:  # pod specs are immutable but for images & co.
        v1.patch_namespaced_pod("smp", ns, {"spec": {"restartPolicy": "Always"}})
    assert e.value.status == 422 and "pod updates may not change fields" in status_of(e.value)["message"]
    v1.delete_namespaced_pod("smp", ns, grace_period_seconds=0)


# --- validation ----------------------------------------------------------------------------------


def test_schema_validation_like_the_api_server(cluster, api, ns):
    co = client.CustomObjectsApi(api)
    bad = pytorchjob("unknown-field", "print(1)", 0)
    bad["spec"]["nprocPerNodes"] = "1"  # typo: not in the CRD
    # server-side apply refuses undeclared fields (a plain Go error: 500, no reason)
    with pytest.raises(ApiException) as e:
        co.patch_namespaced_custom_object(
            "kubeflow.org",
            "v1",
            ns,
            "pytorchjobs",
            "unknown-field",
            bad,
            field_manager="ctrlnet",
            _content_type="application/apply-patch+yaml",
        )
    assert e.value.status == 500
    assert status_of(e.value)["message"] == (
        f"failed to create typed patch object ({ns}/unknown-field; kubeflow.org/v1, Kind=PyTorchJob): "
        ".spec.nprocPerNodes: field not declared in schema"
    )
    # POST with fieldValidation=Strict: 400
    with pytest.raises(ApiException) as e:
        co.create_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs", bad, field_validation="Strict")
    assert e.value.status == 400 and status_of(e.value)["message"] == (
        'PyTorchJob in version "v1" cannot be handled as a PyTorchJob: strict decoding error: unknown field "spec.nprocPerNodes"'
    )
    # POST by default (Warn): pruned, with a Warning header
    created, code, headers = co.create_namespaced_custom_object_with_http_info(
        "kubeflow.org", "v1", ns, "pytorchjobs", bad
    )
    assert code == 201 and "nprocPerNodes" not in created["spec"]
    assert 'unknown field \\"spec.nprocPerNodes\\"' in headers.get("Warning", "")
    # a wrong type: 422 Invalid with the field path
    wrong = pytorchjob("wrong-type", "print(1)", 0)
    wrong["spec"]["runPolicy"]["backoffLimit"] = "three"
    with pytest.raises(ApiException) as e:
        co.create_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs", wrong)
    body = status_of(e.value)
    assert e.value.status == 422 and body["reason"] == "Invalid"
    assert body["details"]["kind"] == "PyTorchJob" and body["details"]["group"] == "kubeflow.org"
    assert body["details"]["causes"][0]["field"] == "spec.runPolicy.backoffLimit"
    assert body["message"].startswith(
        'PyTorchJob.kubeflow.org "wrong-type" is invalid: spec.runPolicy.backoffLimit: Invalid value'
    )
    # core kinds: kubernetes==37 validates typed bodies client-side (pydantic), so send raw JSON
    code, body = raw(
        cluster,
        "POST",
        f"/api/v1/namespaces/{ns}/pods",
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "noname"},
            "spec": {"restartPolicy": "Sometimes", "containers": [{"image": "x"}]},
        },
    )
    assert code == 422 and [c["field"] for c in body["details"]["causes"]] == [
        "spec.containers[0].name",
        "spec.restartPolicy",
    ]
    assert body["message"] == (
        'Pod "noname" is invalid: [spec.containers[0].name: Required value, spec.restartPolicy: '
        'Unsupported value: "Sometimes": supported values: "Always", "OnFailure", "Never"]'
    )


def test_names_and_the_pytorchjob_webhook(cluster, api, ns):
    v1 = client.CoreV1Api(api)
    with pytest.raises(ApiException) as e:
        v1.create_namespaced_config_map(ns, cm("Bad_Name"))
    body = status_of(e.value)
    assert e.value.status == 422 and body["message"].startswith(
        'ConfigMap "Bad_Name" is invalid: metadata.name: Invalid value: "Bad_Name": a lowercase RFC 1123 subdomain'
    )
    assert body["details"]["causes"][0]["reason"] == "FieldValueInvalid"
    co = client.CustomObjectsApi(api)
    job = pytorchjob("two-masters", "print(1)", 0)
    job["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = 2
    with pytest.raises(ApiException) as e:
        co.create_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs", job)
    assert e.value.status == 403 and status_of(e.value)["message"] == (
        'admission webhook "validator.pytorchjob.training-operator.kubeflow.org" denied the request: '
        "spec.pytorchReplicaSpecs[Master].replicas: Forbidden: must be 1"
    )
    job = pytorchjob("9lives", "print(1)", 0)  # a DNS-1123 name, not a DNS-1035 label
    with pytest.raises(ApiException) as e:
        co.create_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs", job)
    assert (
        e.value.status == 403
        and 'metadata.name: Invalid value: "9lives": should match: a DNS-1035 label' in status_of(e.value)["message"]
    )


# --- errors --------------------------------------------------------------------------------------


def test_auth_and_error_statuses(cluster, api, ns):
    bad = config.new_client_from_config(config_file=str(cluster.kubeconfig), context="bad-token")
    try:
        with pytest.raises(ApiException) as e:
            client.CoreV1Api(bad).list_namespaced_pod(ns)
        assert e.value.status == 401
        assert status_of(e.value) == {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": "Unauthorized",
            "reason": "Unauthorized",
            "code": 401,
        }
    finally:
        bad.close()
    v1 = client.CoreV1Api(api)
    cluster.deny("list", "pods", namespace=ns)
    try:
        with pytest.raises(ApiException) as e:
            v1.list_namespaced_pod(ns)
        body = status_of(e.value)
        assert e.value.status == 403 and body["reason"] == "Forbidden"
        assert (
            body["message"]
            == f'pods is forbidden: User "loopback" cannot list resource "pods" in API group "" in the namespace "{ns}"'
        )
        v1.list_namespaced_config_map(ns)  # other resources are allowed
    finally:
        cluster.allow_all()
    cluster.deny("get", "pods/log", namespace=ns, times=1)
    with pytest.raises(ApiException) as e:
        v1.read_namespaced_pod_log("x", ns)
    assert status_of(e.value)["message"] == (
        f'pods "x" is forbidden: User "loopback" cannot get resource "pods/log" in API group "" in the namespace "{ns}"'
    )
    with pytest.raises(ApiException) as e:
        v1.read_namespaced_pod("nope", ns)
    assert e.value.status == 404 and status_of(e.value)["message"] == 'pods "nope" not found'
    assert status_of(e.value)["details"] == {"name": "nope", "kind": "pods"}
    with pytest.raises(ApiException) as e:
        client.CustomObjectsApi(api).get_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs", "nope")
    assert status_of(e.value)["message"] == 'pytorchjobs.kubeflow.org "nope" not found'
    with pytest.raises(ApiException) as e:
        v1.create_namespaced_config_map("no-such-ns", cm("x"))
    assert e.value.status == 404 and status_of(e.value)["message"] == 'namespaces "no-such-ns" not found'
    v1.create_namespaced_config_map(ns, cm("dup"))
    with pytest.raises(ApiException) as e:
        v1.create_namespaced_config_map(ns, cm("dup"))
    assert e.value.status == 409 and status_of(e.value)["reason"] == "AlreadyExists"
    assert status_of(e.value)["message"] == 'configmaps "dup" already exists'
    stale = v1.read_namespaced_config_map("dup", ns)
    v1.patch_namespaced_config_map("dup", ns, {"data": {"k": "new"}})
    stale.data = {"k": "stale"}
    with pytest.raises(ApiException) as e:
        v1.replace_namespaced_config_map("dup", ns, stale)
    assert e.value.status == 409 and status_of(e.value)["message"] == (
        'Operation cannot be fulfilled on configmaps "dup": the object has been modified; please apply your changes '
        "to the latest version and try again"
    )
    with pytest.raises(ApiException) as e:  # a pod whose ServiceAccount does not exist (ServiceAccount admission)
        v1.create_namespaced_pod(
            ns,
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "nosa"},
                "spec": {"serviceAccountName": "ghost", "containers": [{"name": "c", "image": "i"}]},
            },
        )
    assert e.value.status == 403 and status_of(e.value)["message"] == (
        f'pods "nosa" is forbidden: error looking up service account {ns}/ghost: serviceaccount "ghost" not found'
    )


# --- watch ---------------------------------------------------------------------------------------


def test_watch_added_modified_deleted(cluster, api, ns):
    v1 = client.CoreV1Api(api)
    rv = v1.list_namespaced_config_map(ns).metadata.resource_version
    seen: list[tuple[str, str]] = []

    def consume():
        w = watch.Watch()
        for ev in w.stream(
            v1.list_namespaced_config_map, ns, resource_version=rv, label_selector="w=1", timeout_seconds=5
        ):
            seen.append((ev["type"], ev["object"].metadata.name))
            if ev["type"] == "DELETED":
                w.stop()

    t = threading.Thread(target=consume)
    t.start()
    time.sleep(0.2)
    v1.create_namespaced_config_map(ns, cm("w1", {"w": "1"}))
    v1.create_namespaced_config_map(ns, cm("other"))  # not selected
    v1.patch_namespaced_config_map("w1", ns, {"data": {"k": "2"}})
    v1.delete_namespaced_config_map("w1", ns)
    t.join(10)
    assert seen == [("ADDED", "w1"), ("MODIFIED", "w1"), ("DELETED", "w1")]


def test_watch_too_old_resource_version_is_gone(tmp_path):
    with LoopbackCluster(tmp_path, installed=(), run_pods=False, watch_history=5) as c:
        api_client = config.new_client_from_config(config_file=str(c.kubeconfig))
        try:
            v1 = client.CoreV1Api(api_client)
            old = v1.list_namespaced_config_map(NS).metadata.resource_version
            for i in range(10):
                v1.create_namespaced_config_map(NS, cm(f"c{i}"))
            with pytest.raises(ApiException) as e:
                for _ in watch.Watch().stream(
                    v1.list_namespaced_config_map, NS, resource_version=old, timeout_seconds=2
                ):
                    pass
            assert e.value.status == 410 and e.value.reason.startswith("Expired: too old resource version:")
            # the raw stream: an ERROR event whose object is a Status 410
            resp = v1.list_namespaced_config_map(
                NS, watch=True, resource_version=old, timeout_seconds=1, _preload_content=False
            )
            event = json.loads(resp.data.decode().splitlines()[0])
            assert (
                event["type"] == "ERROR" and event["object"]["code"] == 410 and event["object"]["reason"] == "Expired"
            )
        finally:
            api_client.close()


# --- PyTorchJob: pods, env, logs -----------------------------------------------------------------

HELLO = "import os; print('hello'); print(os.environ['RANK'])"
PORTS = (
    "import os; print(os.environ['MASTER_ADDR'], os.environ['MASTER_PORT'] == os.environ['PET_MASTER_PORT'] != '23456')"
)


def test_pytorchjob_pods_env_logs_and_success(cluster, api, ns):
    co = client.CustomObjectsApi(api)
    v1 = client.CoreV1Api(api)
    co.create_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs", pytorchjob("hello", HELLO))
    job = cluster.wait_for(
        lambda: (j := cluster.get("pytorchjobs", ns, "hello")) and is_true(j, "Succeeded") and j,
        message="job Succeeded",
    )
    pods = {
        p.metadata.name: p
        for p in v1.list_namespaced_pod(ns, label_selector="training.kubeflow.org/job-name=hello").items
    }
    assert set(pods) == {"hello-master-0", "hello-worker-0"}
    master, worker = pods["hello-master-0"], pods["hello-worker-0"]
    assert master.metadata.labels == {
        "app": "hello",
        "training.kubeflow.org/job-name": "hello",
        "training.kubeflow.org/operator-name": "pytorchjob-controller",
        "training.kubeflow.org/replica-type": "master",
        "training.kubeflow.org/replica-index": "0",
        "training.kubeflow.org/job-role": "master",
    }
    assert "training.kubeflow.org/job-role" not in worker.metadata.labels
    ref = master.metadata.owner_references[0]
    assert (ref.kind, ref.name, ref.controller, ref.block_owner_deletion) == ("PyTorchJob", "hello", True, True)
    assert master.spec.restart_policy == "Never"  # ExitCode: the operator, not the kubelet, restarts
    env = {e.name: e.value for e in worker.spec.containers[0].env}
    assert env == {
        "PYTHONUNBUFFERED": "1",
        "MASTER_PORT": "23456",
        "PET_MASTER_PORT": "23456",
        "MASTER_ADDR": "hello-master-0",
        "PET_MASTER_ADDR": "hello-master-0",
        "WORLD_SIZE": "2",
        "RANK": "1",
        "PET_NODE_RANK": "1",
        "PET_NPROC_PER_NODE": "1",
        "PET_NNODES": "2",
    }
    assert [c.name for c in worker.spec.init_containers] == ["init-pytorch"]
    assert worker.spec.containers[0].ports[0].name == "pytorchjob-port"
    assert v1.read_namespaced_pod_log("hello-master-0", ns) == "hello\n0\n"
    assert v1.read_namespaced_pod_log("hello-worker-0", ns, container="pytorch") == "hello\n1\n"
    assert v1.read_namespaced_pod_log("hello-worker-0", ns, tail_lines=1) == "1\n"
    assert v1.read_namespaced_pod_log("hello-worker-0", ns, since_seconds=3600) == "hello\n1\n"
    assert v1.read_namespaced_pod_log("hello-worker-0", ns, limit_bytes=3) == "hel"
    stamped = v1.read_namespaced_pod_log("hello-master-0", ns, timestamps=True).splitlines()
    assert len(stamped) == 2 and stamped[0].endswith(" hello") and len(stamped[0].split(" ")[0]) == 30
    assert "Name:\thello-master-0" in v1.read_namespaced_pod_log("hello-worker-0", ns, container="init-pytorch")
    co.create_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs", pytorchjob("ports", PORTS, workers=0))
    cluster.wait_for(lambda: is_true(cluster.get("pytorchjobs", ns, "ports"), "Succeeded"))
    # in the process: the master's host name is 127.0.0.1, its port a free one chosen for the job
    assert v1.read_namespaced_pod_log("ports-master-0", ns) == "127.0.0.1 True\n"
    svcs = {s.metadata.name: s for s in v1.list_namespaced_service(ns).items}
    assert svcs["hello-master-0"].spec.cluster_ip == "None" and svcs["hello-master-0"].spec.ports[0].port == 23456
    assert job["status"]["replicaStatuses"]["Master"]["succeeded"] == 1 and job["status"]["completionTime"]
    types = [c["type"] for c in job["status"]["conditions"]]
    assert types in (
        ["Created", "Running", "Succeeded"],
        ["Created", "Succeeded"],
    )  # Running only if a reconcile saw it
    assert cond(job, "Running") is None or cond(job, "Running")["status"] == "False"
    reasons = [e["reason"] for e in cluster.events(ns, "hello")]
    assert {"SuccessfulCreatePod", "SuccessfulCreateService", "PyTorchJobSucceeded", "ExitedWithCode"} <= set(reasons)
    with pytest.raises(ApiException) as e:
        v1.read_namespaced_pod_log("hello-worker-0", ns, container="nope")
    assert (
        e.value.status == 400 and status_of(e.value)["message"] == "container nope is not valid for pod hello-worker-0"
    )


def test_follow_streams_until_the_container_exits(cluster, api, ns):
    v1 = client.CoreV1Api(api)
    code = "import time\nfor i in range(4):\n    print('line', i, flush=True); time.sleep(0.3)"
    co = client.CustomObjectsApi(api)
    co.create_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs", pytorchjob("follow", code, workers=0))
    cluster.wait_for(lambda: cluster.get("pods", ns, "follow-master-0")["status"]["phase"] == "Running")
    t0 = time.monotonic()
    lines = list(watch.Watch().stream(v1.read_namespaced_pod_log, "follow-master-0", ns, follow=True))
    assert lines == ["line 0", "line 1", "line 2", "line 3"]
    assert time.monotonic() - t0 > 0.5  # it streamed while the process ran
    cluster.wait_for(lambda: is_true(cluster.get("pytorchjobs", ns, "follow"), "Succeeded"))


def test_logs_of_pending_and_waiting_pods(cluster, api, ns):
    v1 = client.CoreV1Api(api)
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "nocm"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "pytorch",
                    "image": "i",
                    "command": ["python", "-c", "print(1)"],
                    "volumeMounts": [{"name": "config", "mountPath": "/etc/ctrlnet"}],
                }
            ],
            "volumes": [{"name": "config", "configMap": {"name": "missing"}}],
        },
    }
    v1.create_namespaced_pod(ns, pod)
    cluster.wait_for(lambda: cluster.events(ns, "nocm", "FailedMount"))
    with pytest.raises(ApiException) as e:
        v1.read_namespaced_pod_log("nocm", ns)
    assert e.value.status == 400
    assert status_of(e.value)["message"] == 'container "pytorch" in pod "nocm" is waiting to start: ContainerCreating'
    assert cluster.events(ns, "nocm", "FailedMount")[0]["message"] == (
        'MountVolume.SetUp failed for volume "config" : configmap "missing" not found'
    )
    cluster.create_configmap(ns, "missing", {"config.yaml": "a: 1\n"})  # it appears: the pod starts
    cluster.wait_for(
        lambda: (
            cluster.get("pods", ns, "nocm")["status"]["phase"] == "Running"
            or cluster.get("pods", ns, "nocm")["status"]["phase"] == "Succeeded"
        )
    )
    v1.create_namespaced_pod(ns, dict(pod, metadata={"name": "pull"}))
    cluster.set_waiting(ns, "pull", "ImagePullBackOff", 'Back-off pulling image "i"')
    with pytest.raises(ApiException) as e:
        v1.read_namespaced_pod_log("pull", ns)
    assert (
        status_of(e.value)["message"]
        == 'container "pytorch" in pod "pull" is waiting to start: trying and failing to pull image'
    )
    st = cluster.get("pods", ns, "pull")["status"]["containerStatuses"][0]["state"]["waiting"]
    assert st == {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "i"'}


def test_config_volume_env_and_secret_rewriting(cluster, api, ns):
    v1 = client.CoreV1Api(api)
    cluster.create_configmap(ns, "cfg", {"config.yaml": "steps: 3\n"})
    cluster.create_secret(ns, "s3", {"AWS_ACCESS_KEY_ID": "AKIA-test"})
    code = textwrap.dedent("""
        import os, sys
        print(open(sys.argv[1]).read().strip())
        print(os.environ['KEY'], os.environ['POD'], os.environ['NS'], os.environ['CFG_DIR'] == os.path.dirname(sys.argv[1]))
        print(os.environ['EXTRA'], os.environ['EXPANDED'])
    """)
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "env"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "main",
                    "image": "i",
                    "command": ["python", "-c", code, "/etc/ctrlnet/config.yaml"],
                    "env": [
                        {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "AWS_ACCESS_KEY_ID"}}},
                        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                        {"name": "CFG_DIR", "value": "/etc/ctrlnet"},
                        {"name": "EXPANDED", "value": "pod-$(POD)"},
                    ],
                    "volumeMounts": [{"name": "config", "mountPath": "/etc/ctrlnet", "readOnly": True}],
                }
            ],
            "volumes": [{"name": "config", "configMap": {"name": "cfg"}}],
        },
    }
    cluster.extra_env["EXTRA"] = "from-the-test"
    try:
        v1.create_namespaced_pod(ns, pod)
        cluster.wait_for(lambda: cluster.get("pods", ns, "env")["status"]["phase"] in ("Succeeded", "Failed"))
    finally:
        del cluster.extra_env["EXTRA"]
    assert v1.read_namespaced_pod_log("env", ns) == f"steps: 3\nAKIA-test env {ns} True\nfrom-the-test pod-env\n"
    # a missing secret key: CreateContainerConfigError, as the kubelet reports it
    bad = json.loads(json.dumps(pod))
    bad["metadata"]["name"] = "nokey"
    bad["spec"]["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"]["key"] = "NOPE"
    v1.create_namespaced_pod(ns, bad)
    waiting = cluster.wait_for(
        lambda: cluster.get("pods", ns, "nokey")["status"]["containerStatuses"][0]["state"]["waiting"]
    )
    assert waiting == {"reason": "CreateContainerConfigError", "message": f"couldn't find key NOPE in Secret {ns}/s3"}


# --- restarts ------------------------------------------------------------------------------------


def test_exit_code_143_recreates_the_pod_then_succeeds(cluster, api, ns, tmp_path):
    marker = tmp_path / "preempted-once"
    code = textwrap.dedent(f"""
        import os, sys
        if not os.path.exists({str(marker)!r}):
            open({str(marker)!r}, 'w').close(); print('interrupted'); sys.exit(143)
        print('resumed')
    """)
    client.CustomObjectsApi(api).create_namespaced_custom_object(
        "kubeflow.org", "v1", ns, "pytorchjobs", pytorchjob("retry", code, workers=0)
    )
    first = cluster.wait_for(lambda: cluster.get("pods", ns, "retry-master-0"))["metadata"]["uid"]
    job = cluster.wait_for(lambda: (j := cluster.get("pytorchjobs", ns, "retry")) and is_true(j, "Succeeded") and j)
    assert cluster.get("pods", ns, "retry-master-0")["metadata"]["uid"] != first
    assert client.CoreV1Api(api).read_namespaced_pod_log("retry-master-0", ns) == "resumed\n"
    restarting = cond(job, "Restarting")
    assert restarting is None or restarting["reason"] == "PyTorchJobRestarting"  # Running replaced it
    msgs = [e["message"] for e in cluster.events(ns, "retry")]
    assert f"Pod: {ns}.retry-master-0 exited with code 143" in msgs
    assert "job retry is restarting because Master replica(s) failed." in msgs


def test_exit_code_2_fails_the_job(cluster, api, ns):
    client.CustomObjectsApi(api).create_namespaced_custom_object(
        "kubeflow.org",
        "v1",
        ns,
        "pytorchjobs",
        pytorchjob("broken", "import sys; print('bad config'); sys.exit(2)", workers=0),
    )
    job = cluster.wait_for(lambda: (j := cluster.get("pytorchjobs", ns, "broken")) and is_true(j, "Failed") and j)
    failed = cond(job, "Failed")
    assert failed["reason"] == "PyTorchJobFailed"
    assert failed["message"] == 'job "broken" is failing because "Master" replica(s) failed.'
    assert f"Pod: {ns}.broken-master-0 exited with code 2" in [e["message"] for e in cluster.events(ns, "broken")]
    pod = cluster.get("pods", ns, "broken-master-0")
    term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (pod["status"]["phase"], term["exitCode"], term["reason"]) == ("Failed", 2, "Error")


def test_on_failure_restarts_in_place_with_previous_logs(cluster, api, ns, tmp_path):
    marker = tmp_path / "crashed-once"
    code = f"import os, sys\nif not os.path.exists({str(marker)!r}):\n    open({str(marker)!r}, 'w').close(); print('crash'); sys.exit(1)\nprint('ok')"
    client.CustomObjectsApi(api).create_namespaced_custom_object(
        "kubeflow.org", "v1", ns, "pytorchjobs", pytorchjob("onfail", code, workers=0, policy="OnFailure")
    )
    cluster.wait_for(lambda: is_true(cluster.get("pytorchjobs", ns, "onfail"), "Succeeded"))
    v1 = client.CoreV1Api(api)
    pod = v1.read_namespaced_pod("onfail-master-0", ns)
    cs = pod.status.container_statuses[0]
    assert pod.spec.restart_policy == "OnFailure" and cs.restart_count == 1
    assert cs.last_state.terminated.exit_code == 1
    assert v1.read_namespaced_pod_log("onfail-master-0", ns) == "ok\n"
    assert v1.read_namespaced_pod_log("onfail-master-0", ns, previous=True) == "crash\n"
    cluster.create(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "once", "namespace": ns},
            "spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "c", "image": "i", "command": ["python", "-c", ""]}],
            },
        }
    )
    cluster.wait_for(lambda: cluster.get("pods", ns, "once")["status"]["phase"] == "Succeeded")
    with pytest.raises(ApiException) as e:
        v1.read_namespaced_pod_log("once", ns, previous=True)
    assert (
        e.value.status == 400
        and status_of(e.value)["message"] == 'previous terminated container "c" in pod "once" not found'
    )


def test_sigterm_preemption_and_eviction(cluster, api, ns):
    code = textwrap.dedent("""
        import signal, sys, time
        def stop(*_):
            print('checkpointing', flush=True); sys.exit(143)
        signal.signal(signal.SIGTERM, stop)
        print('training', flush=True)
        time.sleep(30)
    """)
    client.CustomObjectsApi(api).create_namespaced_custom_object(
        "kubeflow.org", "v1", ns, "pytorchjobs", pytorchjob("preempt", code, workers=0)
    )
    pod = cluster.wait_for(
        lambda: (
            (p := cluster.get("pods", ns, "preempt-master-0"))
            and "training" in cluster.logs(ns, "preempt-master-0")
            and p
        )
    )
    cluster.signal_pod(ns, "preempt-master-0", signal.SIGTERM)
    cluster.wait_for(
        lambda: (p := cluster.get("pods", ns, "preempt-master-0")) and p["metadata"]["uid"] != pod["metadata"]["uid"],
        message="the operator recreates the pod after exit 143",
    )
    assert f"Pod: {ns}.preempt-master-0 exited with code 143" in [e["message"] for e in cluster.events(ns, "preempt")]
    cluster.wait_for(lambda: cluster.get("pods", ns, "preempt-master-0")["status"]["phase"] == "Running")
    second = cluster.get("pods", ns, "preempt-master-0")["metadata"]["uid"]
    cluster.evict(ns, "preempt-master-0")
    evicted = cluster.get("pods", ns, "preempt-master-0")
    assert evicted is None or evicted["metadata"]["uid"] != second or evicted["status"]["reason"] == "Evicted"
    cluster.wait_for(
        lambda: cluster.get("pods", ns, "preempt-master-0")["metadata"]["uid"] != second,
        message="evicted pods are replaced (exit 137 is retryable)",
    )
    client.CustomObjectsApi(api).delete_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs", "preempt")
    cluster.wait_for(
        lambda: not cluster.list("pods", ns, label_selector="training.kubeflow.org/job-name=preempt"),
        message="garbage collection of the job's pods",
    )


# --- suspend / resume, pending, Kueue ------------------------------------------------------------


def test_suspend_and_resume(cluster, api, ns):
    co = client.CustomObjectsApi(api)
    code = "import time; print('up', flush=True); time.sleep(30)"
    job = pytorchjob("pause", code, workers=1, runPolicy={"cleanPodPolicy": "None", "suspend": True})
    co.create_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs", job)
    suspended = cluster.wait_for(
        lambda: (j := cluster.get("pytorchjobs", ns, "pause")) and is_true(j, "Suspended") and j
    )
    assert cond(suspended, "Suspended")["message"] == "PyTorchJob pause is suspended."
    assert cluster.list("pods", ns) == []
    co.patch_namespaced_custom_object(
        "kubeflow.org", "v1", ns, "pytorchjobs", "pause", {"spec": {"runPolicy": {"suspend": False}}}
    )
    cluster.wait_for(lambda: is_true(cluster.get("pytorchjobs", ns, "pause"), "Running"))
    resumed = cluster.get("pytorchjobs", ns, "pause")
    assert (
        cond(resumed, "Suspended")["status"] == "False" and cond(resumed, "Suspended")["reason"] == "PyTorchJobResumed"
    )
    assert len(cluster.list("pods", ns)) == 2
    co.patch_namespaced_custom_object(
        "kubeflow.org", "v1", ns, "pytorchjobs", "pause", {"spec": {"runPolicy": {"suspend": True}}}
    )
    cluster.wait_for(lambda: not cluster.list("pods", ns), message="suspend deletes the running pods")
    job = cluster.get("pytorchjobs", ns, "pause")
    assert is_true(job, "Suspended") and cond(job, "Running")["status"] == "False"


def test_held_pending_pod_and_its_failed_scheduling_event(cluster, api, ns):
    msg = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    cluster.hold_pending(ns, "gpu-master-0", message=msg)
    client.CustomObjectsApi(api).create_namespaced_custom_object(
        "kubeflow.org", "v1", ns, "pytorchjobs", pytorchjob("gpu", "print('trained')", workers=0)
    )
    pod = cluster.wait_for(lambda: (p := cluster.get("pods", ns, "gpu-master-0")) and cond(p, "PodScheduled") and p)
    assert pod["status"]["phase"] == "Pending" and not pod["spec"].get("nodeName")
    sched = cond(pod, "PodScheduled")
    assert (sched["status"], sched["reason"], sched["message"]) == ("False", "Unschedulable", msg)
    ev = cluster.wait_for(lambda: cluster.events(ns, "gpu-master-0", "FailedScheduling"))[0]
    assert ev["type"] == "Warning" and ev["message"] == msg and ev["source"]["component"] == "default-scheduler"
    assert client.CoreV1Api(api).read_namespaced_pod_log("gpu-master-0", ns) == ""  # no node yet: empty
    cluster.release(ns)
    cluster.wait_for(lambda: is_true(cluster.get("pytorchjobs", ns, "gpu"), "Succeeded"))


def test_scheduler_honours_gpu_capacity(tmp_path):
    with LoopbackCluster(
        tmp_path,
        installed=(),
        validate_internal=True,
        node_allocatable={"cpu": "4", "memory": "8Gi", "nvidia.com/gpu": "0", "pods": "110"},
    ) as c:
        c.create(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "big"},
                "spec": {
                    "containers": [
                        {
                            "name": "c",
                            "image": "i",
                            "command": ["python", "-c", "print(1)"],
                            "resources": {"limits": {"nvidia.com/gpu": "1"}},
                        }
                    ]
                },
            }
        )
        ev = c.wait_for(lambda: c.events(NS, "big", "FailedScheduling"))[0]
        assert ev["message"].startswith("0/1 nodes are available: 1 Insufficient nvidia.com/gpu.")
        c.create(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "small"},
                "spec": {
                    "restartPolicy": "OnFailure",
                    "containers": [
                        {
                            "name": "c",
                            "image": "i",
                            "command": [
                                "python",
                                "-c",
                                "import os, sys; os.path.exists('x') or open('x', 'w').close() or sys.exit(1)",
                            ],
                        }
                    ],
                },
            }
        )
        c.wait_for(lambda: c.get("pods", NS, "small")["status"]["phase"] == "Succeeded")
        assert c.get("pods", NS, "small")["status"]["containerStatuses"][0]["restartCount"] == 1
        assert not c.server_errors  # validate_internal: every status and Event the stand-ins wrote was schema-valid


def test_queued_job_gets_a_workload_and_runs_once_admitted(cluster, api, ns):
    co = client.CustomObjectsApi(api)
    job = pytorchjob("queued", "print('admitted')", workers=1)
    job["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "team-queue"}
    created = co.create_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs", job)
    assert created["spec"]["runPolicy"]["suspend"] is True  # Kueue's webhook suspends queued jobs
    wl = cluster.wait_for(lambda: (w := cluster.workload_for(ns, "queued")) and cond(w, "QuotaReserved") and w)
    uid = created["metadata"]["uid"]
    assert (
        wl["metadata"]["name"].startswith("pytorchjob-queued-")
        and len(wl["metadata"]["name"]) == len("pytorchjob-queued-") + 5
    )
    assert (
        wl["metadata"]["ownerReferences"][0]["uid"] == uid and wl["metadata"]["labels"]["kueue.x-k8s.io/job-uid"] == uid
    )
    assert wl["spec"]["queueName"] == "team-queue"
    assert [(p["name"], p["count"]) for p in wl["spec"]["podSets"]] == [("master", 1), ("worker", 1)]
    qr = cond(wl, "QuotaReserved")
    assert (qr["status"], qr["reason"], qr["message"]) == (
        "False",
        "Inadmissible",
        "LocalQueue team-queue doesn't exist",
    )
    listed = co.list_namespaced_custom_object("kueue.x-k8s.io", "v1beta2", ns, "workloads")["items"]
    assert [w["metadata"]["name"] for w in listed] == [wl["metadata"]["name"]]
    v1beta1 = co.get_namespaced_custom_object("kueue.x-k8s.io", "v1beta1", ns, "workloads", wl["metadata"]["name"])
    assert v1beta1["apiVersion"] == "kueue.x-k8s.io/v1beta1"
    assert cluster.list("pods", ns) == []
    cluster.admit_workload(ns, "queued")
    cluster.wait_for(lambda: is_true(cluster.get("pytorchjobs", ns, "queued"), "Succeeded"))
    wl = cluster.workload_for(ns, "queued")
    assert is_true(wl, "Admitted") and is_true(wl, "QuotaReserved")
    cluster.wait_for(lambda: is_true(cluster.workload_for(ns, "queued"), "Finished"))


def test_workloads_are_checked_against_the_kueue_crd(cluster, api, ns):
    code, body = raw(
        cluster,
        "POST",
        f"/apis/kueue.x-k8s.io/v1beta2/namespaces/{ns}/workloads",
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "Workload",
            "metadata": {"name": "wl"},
            "spec": {
                "queueName": "q",
                "podSets": [
                    {"name": "main", "count": -1, "template": {"spec": {"containers": [{"name": "c", "image": "i"}]}}}
                ],
            },
        },
    )
    assert code == 422 and body["details"]["causes"][0]["field"] == "spec.podSets[0].count"
    assert "should be greater than or equal to 0" in body["message"]


def test_kueue_pending_message_with_a_local_queue(cluster, api, ns):
    cluster.create(
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "LocalQueue",
            "metadata": {"name": "lq", "namespace": ns},
            "spec": {"clusterQueue": "cq"},
        }
    )
    job = pytorchjob("gpujob", "print(1)", workers=0)
    job["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "lq"}
    job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["resources"] = {
        "limits": {"nvidia.com/gpu": "8"}
    }
    client.CustomObjectsApi(api).create_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs", job)
    wl = cluster.wait_for(lambda: (w := cluster.workload_for(ns, "gpujob")) and cond(w, "QuotaReserved") and w)
    assert cond(wl, "QuotaReserved")["reason"] == "Pending"
    assert cond(wl, "QuotaReserved")["message"] == (
        "couldn't assign flavors to pod set master: insufficient unused quota "
        "for nvidia.com/gpu in flavor default-flavor, 8 more needed"
    )


def test_trainjob_is_stored_and_validated(cluster, api, ns):
    co = client.CustomObjectsApi(api)
    tj = {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": {"name": "tj"},
        "spec": {"runtimeRef": {"name": "torch-distributed"}, "trainer": {"numNodes": 2}},
    }
    co.create_namespaced_custom_object("trainer.kubeflow.org", "v1alpha1", ns, "trainjobs", tj)
    assert (
        co.get_namespaced_custom_object("trainer.kubeflow.org", "v1alpha1", ns, "trainjobs", "tj")["spec"]["trainer"][
            "numNodes"
        ]
        == 2
    )
    bad = json.loads(json.dumps(tj))
    bad["metadata"]["name"] = "tj.two"  # a DNS-1123 subdomain, but the CRD's CEL rule wants a DNS-1035 label
    with pytest.raises(ApiException) as e:
        co.create_namespaced_custom_object("trainer.kubeflow.org", "v1alpha1", ns, "trainjobs", bad)
    assert (
        e.value.status == 422 and "metadata.name must match RFC 1035 DNS label format" in status_of(e.value)["message"]
    )
    # a status subresource: writes to the object ignore status, status writes ignore the rest
    co.patch_namespaced_custom_object(
        "trainer.kubeflow.org",
        "v1alpha1",
        ns,
        "trainjobs",
        "tj",
        {"status": {"conditions": [{"type": "Complete", "status": "True"}]}},
    )
    assert "status" not in cluster.get("trainjobs", ns, "tj")
    co.patch_namespaced_custom_object_status(
        "trainer.kubeflow.org",
        "v1alpha1",
        ns,
        "trainjobs",
        "tj",
        {
            "spec": {"trainer": {"numNodes": 5}},
            "status": {
                "conditions": [
                    {
                        "type": "Complete",
                        "status": "True",
                        "reason": "Done",
                        "message": "done",
                        "lastTransitionTime": "2024-01-01T00:00:00Z",
                    }
                ]
            },
        },
    )
    stored = cluster.get("trainjobs", ns, "tj")
    assert stored["spec"]["trainer"]["numNodes"] == 2 and stored["status"]["conditions"][0]["type"] == "Complete"
    assert stored["metadata"]["generation"] == 1
    with pytest.raises(ApiException) as e:  # spec.runtimeRef is immutable (CEL: self == oldSelf)
        co.patch_namespaced_custom_object(
            "trainer.kubeflow.org", "v1alpha1", ns, "trainjobs", "tj", {"spec": {"runtimeRef": {"name": "other"}}}
        )
    assert e.value.status == 422 and "field is immutable" in status_of(e.value)["message"]


# --- deletion ------------------------------------------------------------------------------------


def test_deleting_a_job_collects_its_pods_and_services(cluster, api, ns):
    co = client.CustomObjectsApi(api)
    co.create_namespaced_custom_object(
        "kubeflow.org", "v1", ns, "pytorchjobs", pytorchjob("gc", "import time; time.sleep(30)", workers=1)
    )
    cluster.wait_for(lambda: len([p for p in cluster.list("pods", ns) if p["status"]["phase"] == "Running"]) == 2)
    co.delete_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs", "gc")
    cluster.wait_for(
        lambda: not cluster.list("pods", ns) and not cluster.list("services", ns),
        message="pods and services garbage-collected",
    )
    kills = cluster.events(ns, "gc-master-0", "Killing")
    assert kills and kills[0]["message"] == "Stopping container pytorch"
    # Orphan keeps the dependents
    co.create_namespaced_custom_object(
        "kubeflow.org", "v1", ns, "pytorchjobs", pytorchjob("orphan", "print(1)", workers=0)
    )
    cluster.wait_for(lambda: cluster.get("pods", ns, "orphan-master-0"))
    co.delete_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs", "orphan", propagation_policy="Orphan")
    time.sleep(0.5)
    pod = cluster.get("pods", ns, "orphan-master-0")
    assert pod is not None and not pod["metadata"].get("ownerReferences")


def test_clean_pod_policy_running_stops_the_workers_when_the_master_succeeds(cluster, api, ns):
    code = "import os, time\nif os.environ['RANK'] != '0':\n    time.sleep(30)\nprint('done')"
    job = pytorchjob("cleanup", code, workers=1, runPolicy={"cleanPodPolicy": "Running"})
    client.CustomObjectsApi(api).create_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs", job)
    cluster.wait_for(lambda: is_true(cluster.get("pytorchjobs", ns, "cleanup"), "Succeeded"))
    cluster.wait_for(
        lambda: cluster.get("pods", ns, "cleanup-worker-0") is None, message="the running worker is deleted"
    )
    assert cluster.get("pods", ns, "cleanup-master-0")["status"]["phase"] == "Succeeded"  # finished pods stay
    assert "Deleted pod: cleanup-worker-0" in [e["message"] for e in cluster.events(ns, "cleanup")]


def test_backoff_limit_counts_in_place_restarts(cluster, api, ns):
    job = pytorchjob(
        "crashy",
        "import sys; print('boom'); sys.exit(1)",
        workers=0,
        policy="OnFailure",
        runPolicy={"cleanPodPolicy": "All", "backoffLimit": 1},
    )
    client.CustomObjectsApi(api).create_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs", job)
    job = cluster.wait_for(lambda: (j := cluster.get("pytorchjobs", ns, "crashy")) and is_true(j, "Failed") and j)
    assert cond(job, "Failed")["message"] == "Job crashy has failed because it has reached the specified backoff limit"
    assert job["status"]["completionTime"]
    cluster.wait_for(lambda: not cluster.list("pods", ns), message="cleanPodPolicy All")


def test_injected_oom_kill_is_retried_by_exit_code_policy(cluster, api, ns):
    client.CustomObjectsApi(api).create_namespaced_custom_object(
        "kubeflow.org", "v1", ns, "pytorchjobs", pytorchjob("oom", "import time; time.sleep(30)", workers=0)
    )
    first = cluster.wait_for(
        lambda: (p := cluster.get("pods", ns, "oom-master-0")) and p["status"]["phase"] == "Running" and p
    )
    out = cluster.set_terminated(ns, "oom-master-0", 137, reason="OOMKilled")
    assert out["status"]["phase"] == "Failed"
    assert out["status"]["containerStatuses"][0]["state"]["terminated"]["reason"] == "OOMKilled"
    cluster.wait_for(lambda: cluster.get("pods", ns, "oom-master-0")["metadata"]["uid"] != first["metadata"]["uid"])
    assert f"Pod: {ns}.oom-master-0 exited with code 137" in [e["message"] for e in cluster.events(ns, "oom")]
    client.CustomObjectsApi(api).delete_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs", "oom")


def test_oom_kill_restarts_in_place_and_preemption_deletes(cluster, api, ns):
    v1 = client.CoreV1Api(api)
    code = "import signal, time\nsignal.signal(signal.SIGTERM, lambda *_: time.sleep(0.3) or exit(0))\nprint('up', flush=True)\ntime.sleep(30)"
    v1.create_namespaced_pod(
        ns,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "mem"},
            "spec": {
                "restartPolicy": "OnFailure",
                "terminationGracePeriodSeconds": 5,
                "containers": [{"name": "c", "image": "i", "command": ["python", "-c", code]}],
            },
        },
    )
    cluster.wait_for(lambda: "up" in cluster.logs(ns, "mem"))
    cluster.oom_kill(ns, "mem")
    cs = cluster.wait_for(
        lambda: (
            (s := cluster.get("pods", ns, "mem")["status"]["containerStatuses"][0])["restartCount"] == 1
            and "running" in s["state"]
            and s
        )
    )
    assert cs["lastState"]["terminated"]["reason"] == "OOMKilled" and cs["lastState"]["terminated"]["exitCode"] == 137
    cluster.wait_for(lambda: "up" in cluster.logs(ns, "mem"))
    cluster.preempt(ns, "mem")
    pod = cluster.get("pods", ns, "mem")
    if pod is not None:  # terminating: the handler sleeps 0.3 s
        assert (
            pod["metadata"]["deletionTimestamp"] and cond(pod, "DisruptionTarget")["reason"] == "PreemptionByScheduler"
        )
    cluster.wait_for(lambda: cluster.get("pods", ns, "mem") is None)


def test_namespace_deletion_waits_for_finalizers(tmp_path):
    with LoopbackCluster(tmp_path, installed=(), run_pods=False) as c:
        api_client = c.api_client()
        try:
            v1 = client.CoreV1Api(api_client)
            c.create_namespace("doomed")
            held = cm("held")
            held["metadata"]["finalizers"] = ["example.com/hold"]
            v1.create_namespaced_config_map("doomed", held)
            v1.delete_namespace("doomed")
            c.wait_for(lambda: c.get("configmaps", "doomed", "held")["metadata"].get("deletionTimestamp"))
            assert c.get("namespaces", "", "doomed")["status"]["phase"] == "Terminating"
            with pytest.raises(ApiException) as e:
                v1.create_namespaced_config_map("doomed", cm("late"))
            assert e.value.status == 403 and status_of(e.value)["message"] == (
                'configmaps "late" is forbidden: unable to create new content in namespace doomed because it is being terminated'
            )
            v1.patch_namespaced_config_map("held", "doomed", {"metadata": {"finalizers": None}})
            c.wait_for(lambda: c.get("namespaces", "", "doomed") is None, message="namespace gone")
        finally:
            api_client.close()


def test_volcano_gang_scheduling_podgroup(tmp_path):
    with LoopbackCluster(
        tmp_path, installed={"pytorchjobs", "podgroups"}, run_pods=False, gang_scheduler="volcano"
    ) as c:
        job = pytorchjob("gang", "print(1)", workers=2)
        job["spec"]["runPolicy"]["schedulingPolicy"] = {"queue": "research"}
        c.create(job)
        pg = c.wait_for(lambda: c.get("podgroups", NS, "gang"))
        assert pg["spec"] == {"minMember": 3, "queue": "research"}
        pod = c.wait_for(lambda: c.get("pods", NS, "gang-worker-1"))
        assert pod["spec"]["schedulerName"] == "volcano"
        assert pod["metadata"]["annotations"]["scheduling.k8s.io/group-name"] == "gang"
        assert pod["status"]["phase"] == "Pending" and not pod["spec"].get("nodeName")  # run_pods=False: nothing runs


# --- kubectl -------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kubectl_get_and_logs(cluster, api, ns):
    client.CustomObjectsApi(api).create_namespaced_custom_object(
        "kubeflow.org", "v1", ns, "pytorchjobs", pytorchjob("kctl", HELLO, workers=1)
    )
    cluster.wait_for(lambda: is_true(cluster.get("pytorchjobs", ns, "kctl"), "Succeeded"))

    def kubectl(*args: str) -> str:
        out = cluster.kubectl(*args, namespace=ns)  # context loopback-tls: kubectl sends tokens over TLS only
        assert out.returncode == 0, out.stderr
        return out.stdout

    pods = kubectl("get", "pods", "-l", "training.kubeflow.org/job-name=kctl")
    assert pods.splitlines()[0].split() == ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    assert {line.split()[0] for line in pods.splitlines()[1:]} == {"kctl-master-0", "kctl-worker-0"}
    assert "Completed" in pods
    jobs = kubectl("get", "pytorchjobs")
    assert jobs.splitlines()[0].split() == ["NAME", "STATE", "AGE"] and "Succeeded" in jobs
    assert kubectl("logs", "kctl-worker-0") == "hello\n1\n"
    names = json.loads(kubectl("get", "pods", "-o", "json", "-l", "training.kubeflow.org/replica-type=master"))
    assert [i["metadata"]["name"] for i in names["items"]] == ["kctl-master-0"]
    plain = subprocess.run(
        ["kubectl", "--kubeconfig", str(cluster.kubeconfig), "get", "pods"],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, HOME=str(cluster.root)),
    )
    assert plain.returncode != 0 and "provide credentials" in plain.stderr  # plain HTTP: kubectl sends no token


# --- shutdown ------------------------------------------------------------------------------------


def test_clean_shutdown_leaves_no_threads_or_processes(tmp_path):
    with LoopbackCluster(tmp_path, installed={"pytorchjobs"}, max_grace_seconds=1.0) as c:
        c.create(pytorchjob("long", "import time; print('x', flush=True); time.sleep(60)", workers=1))
        c.wait_for(lambda: len([p for p in c.list("pods", NS) if p["status"]["phase"] == "Running"]) == 2)
        pids = [r.current["pytorch"].proc.pid for r in c.kubelet.runtimes.values()]
        api_client = c.api_client()
        w = watch.Watch()
        stream = w.stream(client.CoreV1Api(api_client).list_namespaced_pod, NS, timeout_seconds=30)
        next(stream)  # an open watch connection at shutdown
    time.sleep(0.2)
    assert [t for t in threading.enumerate() if t.name.startswith(c.tag)] == []
    assert not c.server_errors
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    api_client.close()
