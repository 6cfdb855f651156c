"""The loopback test cluster, exercised with the real `kubernetes` client over HTTP: what ctrlnet's
commands and its e2e tests rely on (tests/e2e), each behaviour once, with the real server's words."""

from __future__ import annotations

import json
import os
import signal
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
APPLY = "application/apply-patch+yaml"
MERGE = "application/merge-patch+json"  # the client's default for core kinds, strategic merge, is not served


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LoopbackCluster(tmp_path_factory.mktemp("cluster"), max_grace_seconds=2.0) as c:
        yield c
        assert not c.server_errors, [repr(e) for e in c.server_errors]


@pytest.fixture(scope="module")
def api(cluster):
    api_client = config.new_client_from_config(config_file=str(cluster.kubeconfig))
    yield api_client
    api_client.close()


@pytest.fixture
def ns(cluster, request):
    """A fresh namespace per test."""
    name = "t-" + request.node.name.replace("_", "-")[5:40].strip("-").lower()
    cluster.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
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
    meta = {"name": name, **({"labels": labels} if labels else {})}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data or {"k": "v"}}


def pod(name: str, code: str, **spec) -> dict:
    container = {"name": "main", "image": "i", "command": ["python", "-c", code]}
    container.update(spec.pop("container", {}))
    spec = {"restartPolicy": "Never", "containers": [container], **spec}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def create_job(api, ns: str, job: dict) -> dict:
    return client.CustomObjectsApi(api).create_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs", job)


# --- discovery -----------------------------------------------------------------------------------


def test_discovery_serves_only_the_installed_crds(tmp_path):
    """What `Kube.served` reads: a missing operator's group answers 404, as on a cluster without it."""
    with LoopbackCluster(tmp_path, installed={"pytorchjobs"}, run_pods=False) as c:
        code, doc = raw(c, "GET", "/apis/kubeflow.org/v1")
        assert code == 200 and {"pytorchjobs", "pytorchjobs/status"} == {r["name"] for r in doc["resources"]}
        code, doc = raw(c, "GET", "/api/v1")
        names = {r["name"]: r for r in doc["resources"]}
        assert names["pods"]["namespaced"] and "pods/log" in names and not names["namespaces"]["namespaced"]
        for path in (
            "/apis/trainer.kubeflow.org/v1alpha1",
            "/apis/kueue.x-k8s.io/v1beta1/namespaces/default/workloads",
        ):
            code, doc = raw(c, "GET", path)
            assert code == 404 and doc["message"] == "the server could not find the requested resource"
        with pytest.raises(ValueError, match="unknown install"):
            LoopbackCluster(tmp_path, installed={"volcano"}).start()


# --- reads and writes ----------------------------------------------------------------------------


def test_create_get_list_with_selectors(cluster, api, ns):
    v1 = client.CoreV1Api(api)
    v1.create_namespaced_config_map(ns, cm("a", {"app": "x", "tier": "web"}))
    v1.create_namespaced_config_map(ns, cm("b", {"app": "y", "tier": "db"}))
    v1.create_namespaced_config_map(ns, cm("c", {"app": "x"}))
    got = v1.read_namespaced_config_map("a", ns)
    assert got.metadata.uid and got.metadata.creation_timestamp and int(got.metadata.resource_version) > 0
    assert got.metadata.managed_fields[0].manager == "OpenAPI-Generator"  # from the User-Agent, as a real server does

    def names(**kw):
        return sorted(o.metadata.name for o in v1.list_namespaced_config_map(ns, **kw).items)

    assert names(label_selector="app=x") == ["a", "c"]
    assert names(label_selector="app==x,tier=web") == ["a"]
    assert names(label_selector="app!=x") == ["b"]
    assert names(field_selector="metadata.name=b") == ["b"]
    assert names(field_selector="metadata.name!=b") == ["a", "c"]
    with pytest.raises(ApiException) as e:
        v1.list_namespaced_config_map(ns, field_selector="data.k=v")
    assert e.value.status == 400 and status_of(e.value)["message"] == "field label not supported: data.k"
    with pytest.raises(ApiException) as e:  # set-based selectors: not emulated, and said so
        v1.list_namespaced_config_map(ns, label_selector="tier in (web,db)")
    assert e.value.status == 400 and "set-based selectors are not emulated" in status_of(e.value)["message"]
    listed = v1.list_namespaced_config_map(ns)
    assert int(listed.metadata.resource_version) >= int(got.metadata.resource_version)


def test_server_side_apply_conflicts_and_merge_patch(cluster, api, ns):
    co = client.CustomObjectsApi(api)

    def apply(obj, manager="ctrlnet", **kw):
        return co.patch_namespaced_custom_object(
            "kubeflow.org", "v1", ns, "pytorchjobs", "ssa", obj, field_manager=manager, _content_type=APPLY, **kw
        )

    job = pytorchjob("ssa", "print(1)", workers=0, runPolicy={"cleanPodPolicy": "None", "suspend": True})
    assert apply(job) is None  # kubernetes==37 has no 201 in its response map: an apply that creates returns None
    live = co.get_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs", "ssa")
    assert live["metadata"]["generation"] == 1
    entry = next(m for m in live["metadata"]["managedFields"] if m["manager"] == "ctrlnet")
    assert entry["operation"] == "Apply" and entry["fieldsV1"]["f:spec"]["f:runPolicy"]["f:suspend"] == {}
    job["spec"]["runPolicy"]["backoffLimit"] = 2
    updated = apply(job)
    assert updated["spec"]["runPolicy"]["backoffLimit"] == 2 and updated["metadata"]["generation"] == 2
    # fieldManager is required for apply: the real server answers 422 (PatchOptions validation)
    with pytest.raises(ApiException) as e:
        co.patch_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs", "ssa", job, _content_type=APPLY)
    assert e.value.status == 422 and status_of(e.value)["message"] == (
        'PatchOptions.meta.k8s.io "" is invalid: fieldManager: Required value: is required for apply patch'
    )
    # another manager sets a field ctrlnet owns to another value: a conflict, unless forced
    other = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": "ssa"}}
    other["spec"] = {"runPolicy": {"suspend": False}}
    with pytest.raises(ApiException) as e:
        apply(other, "other-manager")
    body = status_of(e.value)
    assert e.value.status == 409 and body["reason"] == "Conflict"
    assert body["message"] == 'Apply failed with 1 conflict: conflict with "ctrlnet": .spec.runPolicy.suspend'
    assert body["details"]["causes"] == [
        {"reason": "FieldManagerConflict", "message": 'conflict with "ctrlnet"', "field": ".spec.runPolicy.suspend"}
    ]
    assert apply(other, "other-manager", force=True)["spec"]["runPolicy"]["suspend"] is False
    # ctrlnet re-applies without suspend: it stays (other-manager owns it); a field ctrlnet alone set and now omits goes
    del job["spec"]["runPolicy"]["suspend"], job["spec"]["runPolicy"]["backoffLimit"]
    assert apply(job)["spec"]["runPolicy"] == {"cleanPodPolicy": "None", "suspend": False}
    # merge patch (suspend/resume); strategic merge and JSON patches are not served
    co.patch_namespaced_custom_object(
        "kubeflow.org", "v1", ns, "pytorchjobs", "ssa", {"metadata": {"labels": {"a": "b"}}}
    )
    assert cluster.get("pytorchjobs", ns, "ssa")["metadata"]["labels"] == {"a": "b"}
    code, body = raw(
        cluster, "PATCH", f"/apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs/ssa", [], "application/json-patch+json"
    )
    assert code == 415 and body["reason"] == "UnsupportedMediaType"
    # what `ctrlnet submit` meets when a ConfigMap of its run's name was written by someone else
    cluster.create(dict(cm("taken", data={"config.yaml": "theirs"}), metadata={"name": "taken", "namespace": ns}))
    with pytest.raises(ApiException) as e:
        client.CoreV1Api(api).patch_namespaced_config_map(
            "taken", ns, cm("taken", data={"config.yaml": "ours"}), field_manager="ctrlnet", _content_type=APPLY
        )
    assert e.value.status == 409 and status_of(e.value)["message"] == (
        'Apply failed with 1 conflict: conflict with "loopback-test" using v1: .data.config.yaml'
    )


def test_dry_run_persists_nothing(cluster, api, ns):
    out = client.CoreV1Api(api).create_namespaced_config_map(ns, cm("dry"), dry_run="All")
    assert out.metadata.uid and not out.metadata.resource_version
    client.CustomObjectsApi(api).patch_namespaced_custom_object(
        "kubeflow.org",
        "v1",
        ns,
        "pytorchjobs",
        "dry",
        pytorchjob("dry", "print(1)", 0),
        field_manager="ctrlnet",
        dry_run="All",
        _content_type=APPLY,
    )
    assert cluster.get("configmaps", ns, "dry") is None and cluster.get("pytorchjobs", ns, "dry") is None


def test_schema_validation_like_the_api_server(cluster, api, ns):
    co = client.CustomObjectsApi(api)
    wrong = pytorchjob("wrong-type", "print(1)", 0)
    wrong["spec"]["runPolicy"]["backoffLimit"] = "three"
    with pytest.raises(ApiException) as e:
        co.create_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs", wrong)
    body = status_of(e.value)
    assert e.value.status == 422 and body["reason"] == "Invalid"
    assert body["details"]["kind"] == "PyTorchJob" and body["details"]["group"] == "kubeflow.org"
    assert body["details"]["causes"][0]["field"] == "spec.runPolicy.backoffLimit"
    assert body["message"].startswith(
        'PyTorchJob.kubeflow.org "wrong-type" is invalid: spec.runPolicy.backoffLimit: Invalid value: "three"'
    )
    unknown = pytorchjob("unknown-field", "print(1)", 0)
    unknown["spec"]["nprocPerNodes"] = "1"  # a typo: the strict schema refuses it (a real server would prune it)
    with pytest.raises(ApiException) as e:
        co.create_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs", unknown)
    assert e.value.status == 422 and "nprocPerNodes" in status_of(e.value)["message"]
    # core kinds: kubernetes==37 validates typed bodies client-side (pydantic), so send raw JSON
    bad = pod("noname", "")
    bad["spec"].update(containers=[{"image": "x"}], terminationGracePeriodSeconds="60")
    code, body = raw(cluster, "POST", f"/api/v1/namespaces/{ns}/pods", bad)
    assert code == 422 and [c["field"] for c in body["details"]["causes"]] == [
        "spec.containers[0].name",
        "spec.terminationGracePeriodSeconds",
    ]
    assert body["message"].startswith('Pod "noname" is invalid: [spec.containers[0].name: Required value, ')
    with pytest.raises(ApiException) as e:
        client.CoreV1Api(api).create_namespaced_config_map(ns, cm("Bad_Name"))
    assert e.value.status == 422 and status_of(e.value)["message"].startswith(
        'ConfigMap "Bad_Name" is invalid: metadata.name: Invalid value: "Bad_Name": a lowercase RFC 1123 subdomain'
    )
    # Kueue's Workload (no CRD ctrlnet validates): checked against the CRD file
    wl = {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "Workload", "metadata": {"name": "wl"}}
    template = {"spec": {"containers": [{"name": "c", "image": "i"}]}}
    wl["spec"] = {"queueName": "q", "podSets": [{"name": "m", "count": -1, "template": template}]}
    code, body = raw(cluster, "POST", f"/apis/kueue.x-k8s.io/v1beta2/namespaces/{ns}/workloads", wl)
    assert code == 422 and body["details"]["causes"][0]["field"] == "spec.podSets[0].count"
    assert "should be greater than or equal to 0" in body["message"]


def test_auth_and_error_statuses(cluster, api, ns):
    bad = config.new_client_from_config(config_file=str(cluster.kubeconfig), context="bad-token")
    try:
        with pytest.raises(ApiException) as e:
            client.CoreV1Api(bad).list_namespaced_pod(ns)
        assert e.value.status == 401 and status_of(e.value) == {
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
        assert e.value.status == 403 and status_of(e.value)["message"] == (
            f'pods is forbidden: User "loopback" cannot list resource "pods" in API group "" in the namespace "{ns}"'
        )
        v1.list_namespaced_config_map(ns)  # other resources are allowed
    finally:
        cluster.allow_all()
    with pytest.raises(ApiException) as e:
        v1.read_namespaced_pod("nope", ns)
    assert e.value.status == 404 and status_of(e.value)["message"] == 'pods "nope" not found'
    assert status_of(e.value)["details"] == {"name": "nope", "kind": "pods"}
    with pytest.raises(ApiException) as e:
        client.CustomObjectsApi(api).get_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs", "nope")
    assert status_of(e.value)["message"] == 'pytorchjobs.kubeflow.org "nope" not found'
    with pytest.raises(ApiException) as e:  # what ctrlnet turns into "namespace 'x' does not exist"
        v1.create_namespaced_config_map("no-such-ns", cm("x"))
    assert e.value.status == 404 and status_of(e.value)["message"] == 'namespaces "no-such-ns" not found'
    v1.create_namespaced_config_map(ns, cm("dup"))
    with pytest.raises(ApiException) as e:
        v1.create_namespaced_config_map(ns, cm("dup"))
    assert e.value.status == 409 and status_of(e.value)["reason"] == "AlreadyExists"
    assert status_of(e.value)["message"] == 'configmaps "dup" already exists'
    stale = v1.read_namespaced_config_map("dup", ns)
    v1.patch_namespaced_config_map("dup", ns, {"data": {"k": "new"}}, _content_type=MERGE)
    stale.data = {"k": "stale"}
    with pytest.raises(ApiException) as e:
        v1.replace_namespaced_config_map("dup", ns, stale)
    assert e.value.status == 409 and status_of(e.value)["message"] == (
        'Operation cannot be fulfilled on configmaps "dup": the object has been modified; please apply your changes '
        "to the latest version and try again"
    )
    code, body = raw(cluster, "DELETE", f"/api/v1/namespaces/{ns}/configmaps/dup")
    assert code == 200 and (body["status"], body["details"]["name"]) == ("Success", "dup")


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
    patch = {"metadata": {"labels": {"w": "1"}}}
    v1.patch_namespaced_config_map("other", ns, patch, _content_type=MERGE)  # selected from now on: ADDED
    v1.patch_namespaced_config_map("w1", ns, {"data": {"k": "2"}}, _content_type=MERGE)
    v1.delete_namespaced_config_map("w1", ns)
    t.join(10)
    assert seen == [("ADDED", "w1"), ("ADDED", "other"), ("MODIFIED", "w1"), ("DELETED", "w1")]


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
        finally:
            api_client.close()


# --- PyTorchJob: pods, env, logs -----------------------------------------------------------------

HELLO = "import os; print('hello'); print(os.environ['RANK'])"
PORTS = (
    "import os; print(os.environ['MASTER_ADDR'], os.environ['MASTER_PORT'] == os.environ['PET_MASTER_PORT'] != '23456')"
)


def test_pytorchjob_pods_env_logs_and_success(cluster, api, ns):
    v1 = client.CoreV1Api(api)
    create_job(api, ns, pytorchjob("hello", HELLO))
    job = cluster.wait_for(
        lambda: (j := cluster.get("pytorchjobs", ns, "hello")) and is_true(j, "Succeeded") and j, message="Succeeded"
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
    assert {e.name: e.value for e in worker.spec.containers[0].env} == {
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
    assert v1.read_namespaced_pod_log("hello-master-0", ns) == "hello\n0\n"
    assert v1.read_namespaced_pod_log("hello-worker-0", ns, container="pytorch") == "hello\n1\n"
    assert v1.read_namespaced_pod_log("hello-worker-0", ns, tail_lines=1) == "1\n"
    assert v1.read_namespaced_pod_log("hello-worker-0", ns, since_seconds=3600) == "hello\n1\n"
    stamped = v1.read_namespaced_pod_log("hello-master-0", ns, timestamps=True).splitlines()
    assert len(stamped) == 2 and stamped[0].endswith(" hello") and len(stamped[0].split(" ")[0]) == 30
    assert "Name:\thello-master-0" in v1.read_namespaced_pod_log("hello-worker-0", ns, container="init-pytorch")
    with pytest.raises(ApiException) as e:
        v1.read_namespaced_pod_log("hello-worker-0", ns, container="nope")
    assert status_of(e.value)["message"] == "container nope is not valid for pod hello-worker-0"
    with pytest.raises(ApiException) as e:
        v1.read_namespaced_pod_log("hello-master-0", ns, previous=True)
    assert status_of(e.value)["message"] == 'previous terminated container "pytorch" in pod "hello-master-0" not found'
    svc = v1.read_namespaced_service("hello-master-0", ns)
    assert svc.spec.cluster_ip == "None" and svc.spec.ports[0].port == 23456
    assert job["status"]["replicaStatuses"]["Master"]["succeeded"] == 1 and job["status"]["completionTime"]
    assert [c["type"] for c in job["status"]["conditions"]] in (
        ["Created", "Running", "Succeeded"],
        ["Created", "Succeeded"],  # Running only if a reconcile saw it
    )
    reasons = {e["reason"] for e in cluster.events(ns, "hello")}
    assert {"SuccessfulCreatePod", "SuccessfulCreateService", "PyTorchJobSucceeded", "ExitedWithCode"} <= reasons
    uid = master.metadata.uid  # the Events of one pod, as `ctrlnet logs` asks for them
    reasons = {e.reason for e in v1.list_namespaced_event(ns, field_selector=f"involvedObject.uid={uid}").items}
    assert {"Scheduled", "Pulled", "Created", "Started"} <= reasons
    # in the process: the master's host name is 127.0.0.1, its port a free one chosen for the job
    create_job(api, ns, pytorchjob("ports", PORTS, workers=0))
    cluster.wait_for(lambda: is_true(cluster.get("pytorchjobs", ns, "ports"), "Succeeded"))
    assert v1.read_namespaced_pod_log("ports-master-0", ns) == "127.0.0.1 True\n"


def test_follow_streams_until_the_container_exits(cluster, api, ns):
    v1 = client.CoreV1Api(api)
    code = "import time\nfor i in range(4):\n    print('line', i, flush=True); time.sleep(0.3)"
    create_job(api, ns, pytorchjob("follow", code, workers=0))
    cluster.wait_for(lambda: cluster.get("pods", ns, "follow-master-0")["status"]["phase"] == "Running")
    t0 = time.monotonic()
    lines = list(watch.Watch().stream(v1.read_namespaced_pod_log, "follow-master-0", ns, follow=True))
    assert lines == ["line 0", "line 1", "line 2", "line 3"]
    assert time.monotonic() - t0 > 0.5  # it streamed while the process ran


def test_volumes_env_and_path_rewriting(cluster, api, ns):
    v1 = client.CoreV1Api(api)
    code = textwrap.dedent("""
        import os, sys
        print(open(sys.argv[1]).read().strip(), os.environ['CFG_DIR'] == os.path.dirname(sys.argv[1]))
        print(os.environ['EXTRA'], os.environ['EXPANDED'] == 'dir-' + os.environ['CFG_DIR'], os.path.isdir(os.environ['SCRATCH']))
    """)
    spec = {
        "container": {
            "command": ["python", "-c", code, "/etc/ctrlnet/config.yaml"],
            "env": [
                {"name": "CFG_DIR", "value": "/etc/ctrlnet"},
                {"name": "EXPANDED", "value": "dir-$(CFG_DIR)"},
                {"name": "SCRATCH", "value": "/scratch/tmp"},
            ],
            "volumeMounts": [
                {"name": "config", "mountPath": "/etc/ctrlnet", "readOnly": True},
                {"name": "scratch", "mountPath": "/scratch/tmp", "subPath": "tmp"},
            ],
        },
        "volumes": [{"name": "config", "configMap": {"name": "cfg"}}, {"name": "scratch", "emptyDir": {}}],
    }
    v1.create_namespaced_pod(ns, pod("env", code, **spec))
    cluster.wait_for(lambda: cluster.events(ns, "env", "FailedMount"))  # its ConfigMap is not there yet
    with pytest.raises(ApiException) as e:
        v1.read_namespaced_pod_log("env", ns)
    assert status_of(e.value)["message"] == 'container "main" in pod "env" is waiting to start: ContainerCreating'
    assert cluster.events(ns, "env", "FailedMount")[0]["message"] == (
        'MountVolume.SetUp failed for volume "config" : configmap "cfg" not found'
    )
    cluster.extra_env["EXTRA"] = "from-the-test"
    try:
        v1.create_namespaced_config_map(ns, cm("cfg", data={"config.yaml": "steps: 3\n"}))  # it appears: the pod starts
        cluster.wait_for(lambda: cluster.get("pods", ns, "env")["status"]["phase"] in ("Succeeded", "Failed"))
    finally:
        del cluster.extra_env["EXTRA"]
    assert v1.read_namespaced_pod_log("env", ns) == "steps: 3 True\nfrom-the-test True True\n"
    # env from the pod's fields is resolved (the downward API); from Secrets it is not: the container does not start
    fields = [
        {"name": "P", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "L", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
        {"name": "A", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['rank']"}}},
    ]
    fielded = pod(
        "fields", "import os; print(os.environ['P'], os.environ['L'], os.environ['A'])", container={"env": fields}
    )
    fielded["metadata"].update(labels={"app": "x"}, annotations={"rank": "3"})
    v1.create_namespaced_pod(ns, fielded)
    cluster.wait_for(lambda: cluster.get("pods", ns, "fields")["status"]["phase"] == "Succeeded")
    assert v1.read_namespaced_pod_log("fields", ns) == "fields x 3\n"
    secret_ref = {"secretKeyRef": {"name": "s", "key": "k"}}
    v1.create_namespaced_pod(ns, pod("ref", "", container={"env": [{"name": "P", "valueFrom": secret_ref}]}))
    term = cluster.wait_for(
        lambda: cluster.get("pods", ns, "ref")["status"]["containerStatuses"][0]["state"]["terminated"]
    )
    assert term["reason"] == "StartError" and "valueFrom" in term["message"]


# --- restarts, injected states -------------------------------------------------------------------


def test_exit_codes_under_the_exit_code_policy(cluster, api, ns, tmp_path):
    """143 (SIGTERM: preempted) re-creates the pod, which resumes; 2 fails the job at once."""
    marker = tmp_path / "preempted-once"
    code = textwrap.dedent(f"""
        import os, sys
        if not os.path.exists({str(marker)!r}):
            open({str(marker)!r}, 'w').close(); print('interrupted'); sys.exit(143)
        print('resumed')
    """)
    create_job(api, ns, pytorchjob("retry", code, workers=0))
    create_job(api, ns, pytorchjob("broken", "import sys; print('bad config'); sys.exit(2)", workers=0))
    first = cluster.wait_for(lambda: cluster.get("pods", ns, "retry-master-0"))["metadata"]["uid"]
    cluster.wait_for(lambda: is_true(cluster.get("pytorchjobs", ns, "retry"), "Succeeded"))
    assert cluster.get("pods", ns, "retry-master-0")["metadata"]["uid"] != first
    assert cluster.logs(ns, "retry-master-0") == "resumed\n"
    msgs = [e["message"] for e in cluster.events(ns, "retry")]
    assert f"Pod: {ns}.retry-master-0 exited with code 143" in msgs
    assert "job retry is restarting because Master replica(s) failed." in msgs
    created = [e for e in cluster.events(ns, "retry", "SuccessfulCreatePod")]
    assert sum(e["count"] for e in created) == 2  # what `ctrlnet status` counts re-creations by

    job = cluster.wait_for(lambda: (j := cluster.get("pytorchjobs", ns, "broken")) and is_true(j, "Failed") and j)
    assert cond(job, "Failed")["message"] == 'job "broken" is failing because "Master" replica(s) failed.'
    term = cluster.get("pods", ns, "broken-master-0")["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (term["exitCode"], term["reason"]) == (2, "Error")


def test_sigterm_eviction_and_injected_states(cluster, api, ns):
    code = textwrap.dedent("""
        import signal, sys, time
        def stop(*_):
            print('checkpointing', flush=True); sys.exit(143)
        signal.signal(signal.SIGTERM, stop)
        print('training', flush=True)
        time.sleep(30)
    """)
    create_job(api, ns, pytorchjob("preempt", code, workers=0))
    name = "preempt-master-0"
    uid = cluster.wait_for(lambda: "training" in cluster.logs(ns, name) and cluster.get("pods", ns, name))["metadata"][
        "uid"
    ]
    cluster.signal_pod(ns, name, signal.SIGTERM)  # preemption: the kubelet's SIGTERM
    cluster.wait_for(lambda: cluster.get("pods", ns, name)["metadata"]["uid"] != uid, message="re-created after 143")
    assert f"Pod: {ns}.{name} exited with code 143" in [e["message"] for e in cluster.events(ns, "preempt")]
    uid = cluster.wait_for(lambda: (p := cluster.get("pods", ns, name)) and p["status"]["phase"] == "Running" and p)
    uid = uid["metadata"]["uid"]
    evicted = cluster.evict(ns, name)
    assert (
        evicted["status"]["reason"] == "Evicted"
        and cond(evicted, "DisruptionTarget")["reason"] == "TerminationByKubelet"
    )
    cluster.wait_for(
        lambda: cluster.get("pods", ns, name)["metadata"]["uid"] != uid, message="evicted (137): re-created"
    )
    oom = cluster.set_terminated(ns, name, 137, reason="OOMKilled")
    assert oom["status"]["phase"] == "Failed"
    assert oom["status"]["containerStatuses"][0]["state"]["terminated"]["reason"] == "OOMKilled"
    cluster.wait_for(lambda: cluster.get("pods", ns, name)["metadata"]["uid"] != oom["metadata"]["uid"])
    cluster.set_waiting(ns, name, "ImagePullBackOff", 'Back-off pulling image "i"')
    with pytest.raises(ApiException) as e:
        client.CoreV1Api(api).read_namespaced_pod_log(name, ns)
    assert status_of(e.value)["message"] == (
        f'container "pytorch" in pod "{name}" is waiting to start: trying and failing to pull image'
    )
    assert cluster.get("pods", ns, name)["status"]["phase"] == "Pending"  # the operator waits with it


# --- suspend / resume, pending, Kueue ------------------------------------------------------------


def test_suspend_and_resume(cluster, api, ns):
    co = client.CustomObjectsApi(api)
    job = pytorchjob("pause", "import time; time.sleep(30)", runPolicy={"cleanPodPolicy": "None", "suspend": True})
    create_job(api, ns, job)
    suspended = cluster.wait_for(
        lambda: (j := cluster.get("pytorchjobs", ns, "pause")) and is_true(j, "Suspended") and j
    )
    assert cond(suspended, "Suspended")["message"] == "PyTorchJob pause is suspended."
    assert cluster.list("pods", ns) == []

    def patch(suspend: bool):
        co.patch_namespaced_custom_object(
            "kubeflow.org", "v1", ns, "pytorchjobs", "pause", {"spec": {"runPolicy": {"suspend": suspend}}}
        )

    patch(False)
    cluster.wait_for(lambda: is_true(cluster.get("pytorchjobs", ns, "pause"), "Running"))
    resumed = cluster.get("pytorchjobs", ns, "pause")
    assert (
        cond(resumed, "Suspended")["status"] == "False" and cond(resumed, "Suspended")["reason"] == "PyTorchJobResumed"
    )
    assert len(cluster.list("pods", ns)) == 2
    patch(True)
    cluster.wait_for(lambda: not cluster.list("pods", ns), message="suspend deletes the running pods")
    job = cluster.get("pytorchjobs", ns, "pause")
    assert is_true(job, "Suspended") and cond(job, "Running")["status"] == "False"


def test_held_pending_pod_and_its_failed_scheduling_event(cluster, api, ns):
    msg = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    cluster.hold_pending(ns, "gpu-master-0", message=msg)
    create_job(api, ns, pytorchjob("gpu", "print('trained')", workers=0))
    pod = cluster.wait_for(lambda: (p := cluster.get("pods", ns, "gpu-master-0")) and cond(p, "PodScheduled") and p)
    assert pod["status"]["phase"] == "Pending" and not pod["spec"].get("nodeName")
    sched = cond(pod, "PodScheduled")
    assert (sched["status"], sched["reason"], sched["message"]) == ("False", "Unschedulable", msg)
    ev = cluster.wait_for(lambda: cluster.events(ns, "gpu-master-0", "FailedScheduling"))[0]
    assert ev["type"] == "Warning" and ev["message"] == msg and ev["source"]["component"] == "default-scheduler"
    assert client.CoreV1Api(api).read_namespaced_pod_log("gpu-master-0", ns) == ""  # no node yet: empty
    cluster.release(ns)
    cluster.wait_for(lambda: is_true(cluster.get("pytorchjobs", ns, "gpu"), "Succeeded"))


def test_queued_job_gets_a_workload_and_runs_once_admitted(cluster, api, ns):
    job = pytorchjob("queued", "print('admitted')", workers=1)
    job["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "team-queue"}
    created = create_job(api, ns, job)
    assert created["spec"]["runPolicy"]["suspend"] is True  # Kueue's webhook suspends queued jobs
    wl = cluster.wait_for(lambda: (w := cluster.workload_for(ns, "queued")) and cond(w, "QuotaReserved") and w)
    uid = created["metadata"]["uid"]
    assert wl["metadata"]["name"].startswith("pytorchjob-queued-") and len(wl["metadata"]["name"]) == 23
    assert wl["metadata"]["ownerReferences"][0]["uid"] == uid and wl["spec"]["queueName"] == "team-queue"
    assert [(p["name"], p["count"]) for p in wl["spec"]["podSets"]] == [("master", 1), ("worker", 1)]
    qr = cond(wl, "QuotaReserved")
    assert (qr["status"], qr["reason"], qr["message"]) == (
        "False",
        "Inadmissible",
        "LocalQueue team-queue doesn't exist",
    )
    listed = client.CustomObjectsApi(api).list_namespaced_custom_object("kueue.x-k8s.io", "v1beta1", ns, "workloads")
    assert listed["apiVersion"] == "kueue.x-k8s.io/v1beta1"  # as asked (stored as v1beta2)
    assert [w["metadata"]["name"] for w in listed["items"]] == [wl["metadata"]["name"]]
    assert cluster.list("pods", ns) == []
    cluster.admit_workload(ns, "queued")
    cluster.wait_for(lambda: is_true(cluster.get("pytorchjobs", ns, "queued"), "Succeeded"))
    wl = cluster.wait_for(lambda: (w := cluster.workload_for(ns, "queued")) and is_true(w, "Finished") and w)
    assert is_true(wl, "Admitted") and is_true(wl, "QuotaReserved")


def test_trainjob_is_stored_with_a_status_subresource(cluster, api, ns):
    co = client.CustomObjectsApi(api)
    tj = {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob", "metadata": {"name": "tj"}}
    tj["spec"] = {"runtimeRef": {"name": "torch-distributed"}, "trainer": {"numNodes": 2}}
    args = ("trainer.kubeflow.org", "v1alpha1", ns, "trainjobs")
    co.create_namespaced_custom_object(*args, tj)
    # writes to the object ignore status, status writes ignore the rest
    co.patch_namespaced_custom_object(*args, "tj", {"status": {"conditions": [{"type": "Complete", "status": "True"}]}})
    assert "status" not in cluster.get("trainjobs", ns, "tj")
    condition = {"type": "Complete", "status": "True", "reason": "Done", "message": "done"}
    condition["lastTransitionTime"] = "2024-01-01T00:00:00Z"
    co.patch_namespaced_custom_object_status(
        *args, "tj", {"spec": {"trainer": {"numNodes": 5}}, "status": {"conditions": [condition]}}
    )
    stored = cluster.get("trainjobs", ns, "tj")
    assert stored["spec"]["trainer"]["numNodes"] == 2 and stored["status"]["conditions"][0]["type"] == "Complete"
    assert stored["metadata"]["generation"] == 1


# --- deletion ------------------------------------------------------------------------------------


def test_deleting_a_job_collects_its_pods_and_services(cluster, api, ns):
    create_job(api, ns, pytorchjob("gc", "import time; time.sleep(30)", workers=1))
    cluster.wait_for(lambda: len([p for p in cluster.list("pods", ns) if p["status"]["phase"] == "Running"]) == 2)
    body = client.V1DeleteOptions(propagation_policy="Background")  # as `ctrlnet delete` sends it
    client.CustomObjectsApi(api).delete_namespaced_custom_object(
        "kubeflow.org", "v1", ns, "pytorchjobs", "gc", body=body
    )
    cluster.wait_for(
        lambda: not cluster.list("pods", ns) and not cluster.list("services", ns), message="pods and services collected"
    )
    kills = cluster.events(ns, "gc-master-0", "Killing")
    assert kills and kills[0]["message"] == "Stopping container pytorch"


def test_clean_pod_policy_running_stops_the_workers_when_the_master_succeeds(cluster, api, ns):
    code = "import os, time\nif os.environ['RANK'] != '0':\n    time.sleep(30)\nprint('done')"
    create_job(api, ns, pytorchjob("cleanup", code, workers=1, runPolicy={"cleanPodPolicy": "Running"}))
    cluster.wait_for(lambda: is_true(cluster.get("pytorchjobs", ns, "cleanup"), "Succeeded"))
    cluster.wait_for(
        lambda: cluster.get("pods", ns, "cleanup-worker-0") is None, message="the running worker is deleted"
    )
    assert cluster.get("pods", ns, "cleanup-master-0")["status"]["phase"] == "Succeeded"  # finished pods stay
    assert "Deleted pod: cleanup-worker-0" in [e["message"] for e in cluster.events(ns, "cleanup")]


# --- shutdown ------------------------------------------------------------------------------------


def test_clean_shutdown_leaves_no_threads_or_processes(tmp_path):
    with LoopbackCluster(tmp_path, installed={"pytorchjobs"}, max_grace_seconds=1.0) as c:
        c.create(pytorchjob("long", "import time; print('x', flush=True); time.sleep(60)", workers=1))
        c.wait_for(lambda: len([p for p in c.list("pods", NS) if p["status"]["phase"] == "Running"]) == 2)
        pids = [r.current["pytorch"].proc.pid for r in c.kubelet.runtimes.values()]
        api_client = config.new_client_from_config(config_file=str(c.kubeconfig))
        stream = watch.Watch().stream(client.CoreV1Api(api_client).list_namespaced_pod, NS, timeout_seconds=30)
        next(stream)  # an open watch connection at shutdown
    time.sleep(0.2)
    assert [t for t in threading.enumerate() if t.name.startswith(c.tag)] == []
    assert not c.server_errors
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    api_client.close()
