"""The loopback cluster's Kubeflow Trainer v2.3 / JobSet / Job stand-ins (testkit/cluster/trainer_v2.py),
with ctrlnet's own ClusterTrainingRuntime (manifests/runtime/ctrlnet-torch.yaml): TrainJob -> JobSet
-> Indexed-Job pods, the torch plugin's env, restarts and failures by the runtime's policies,
suspend, Kueue, and the TrainJobStatus server. The kubelet is off (run_pods=False) except in one
test: pods are put in their states directly."""

from __future__ import annotations

import json
import re
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

kubernetes = pytest.importorskip("kubernetes")
from kubernetes import client, config  # noqa: E402

from testkit.cluster import LoopbackCluster  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = ROOT / "manifests" / "runtime" / "ctrlnet-torch.yaml"
GROUP, VERSION = "trainer.kubeflow.org", "v1alpha1"


def ctrlnet_runtime() -> dict:
    return yaml.safe_load(RUNTIME.read_text())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LoopbackCluster(tmp_path_factory.mktemp("trainer"), run_pods=False) as c:
        c.create(ctrlnet_runtime())
        yield c
        assert not c.server_errors, [repr(e) for e in c.server_errors]


@pytest.fixture(scope="module")
def co(cluster):
    api_client = config.new_client_from_config(config_file=str(cluster.kubeconfig))
    yield client.CustomObjectsApi(api_client)
    api_client.close()


@pytest.fixture
def ns(cluster, request):
    name = "tj-" + request.node.name.replace("_", "-")[5:35].strip("-").lower()
    cluster.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    return name


def trainjob(name: str, nodes: int = 2, command: list[str] | None = None, **spec) -> dict:
    labels = {"app.kubernetes.io/instance": name, "app.kubernetes.io/name": "ctrlnet"}
    node = {"name": "node", "volumeMounts": [{"name": "scratch", "mountPath": "/tmp"}]}
    pod_template = {
        "metadata": {"labels": labels, "annotations": {"note": "from the patch"}},
        "spec": {"containers": [node], "volumes": [{"name": "scratch", "emptyDir": {}}]},
    }
    patch = {"name": "node", "template": {"spec": {"template": pod_template}}}
    trainer = {
        "image": "ghcr.io/ctrlnet/trainer:0.1.0",
        "command": command or ["python", "-c", "print('hello')"],
        "numNodes": nodes,
        "numProcPerNode": 1,
        "resourcesPerNode": {"requests": {"cpu": "1"}, "limits": {"cpu": "1"}},
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}],
    }
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "runtimeRef": {"apiGroup": GROUP, "kind": "ClusterTrainingRuntime", "name": "ctrlnet-torch"},
            "trainer": trainer,
            "runtimePatches": [
                {"manager": "test", "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [patch]}}}}
            ],
            **spec,
        },
    }


def create(co, ns: str, job: dict) -> dict:
    return co.create_namespaced_custom_object(GROUP, VERSION, ns, "trainjobs", job)


def cond(obj: dict | None, ctype: str) -> dict | None:
    return next((c for c in ((obj or {}).get("status") or {}).get("conditions") or [] if c["type"] == ctype), None)


def pods(cluster, ns: str, name: str, attempt: int | None = None) -> list[dict]:
    sel = f"jobset.sigs.k8s.io/jobset-name={name}"
    if attempt is not None:
        sel += f",jobset.sigs.k8s.io/restart-attempt={attempt}"
    out = [p for p in cluster.list("pods", ns, sel) if not p["metadata"].get("deletionTimestamp")]
    return sorted(out, key=lambda p: p["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"])


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env") or []}


def test_a_trainjob_becomes_a_jobset_of_one_indexed_job(cluster, co, ns):
    created = create(co, ns, trainjob("fill"))
    two = cluster.wait_for(lambda: len(pods(cluster, ns, "fill")) == 2 and pods(cluster, ns, "fill"))
    js = cluster.get("jobsets", ns, "fill")
    assert js["apiVersion"] == "jobset.x-k8s.io/v1alpha2"
    owner = js["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("TrainJob", created["metadata"]["uid"], True)
    (rjob,) = js["spec"]["replicatedJobs"]
    assert rjob["name"] == "node" and rjob["replicas"] == 1
    jspec = rjob["template"]["spec"]
    assert (jspec["parallelism"], jspec["completions"], jspec["completionMode"], jspec["backoffLimit"]) == (
        2,
        2,
        "Indexed",
        0,
    )
    node = jspec["template"]["spec"]["containers"][0]
    assert node["command"] == ["python", "-c", "print('hello')"] and node["resources"]["limits"] == {"cpu": "1"}
    env = env_of(node)
    assert list(env)[:6] == [
        "PYTHONUNBUFFERED",
        "PET_NNODES",
        "PET_NPROC_PER_NODE",
        "PET_NODE_RANK",
        "PET_MASTER_ADDR",
        "PET_MASTER_PORT",
    ]
    assert (env["PET_NNODES"], env["PET_NPROC_PER_NODE"], env["PET_MASTER_ADDR"], env["PET_MASTER_PORT"]) == (
        "2",
        "1",
        "fill-node-0-0.fill",
        "29500",
    )
    assert env["PET_NODE_RANK"] == {
        "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
    }
    assert (
        env["KUBEFLOW_TRAINER_SERVER_URL"]
        == f"{cluster.url}/apis/trainer.kubeflow.org/v1alpha1/namespaces/{ns}/trainjobs/fill/status"
    )
    assert env["KUBEFLOW_TRAINER_SERVER_TOKEN"] == "/var/run/secrets/kubeflow/trainer/token"
    assert {"containerPort": 29500} in node["ports"]
    assert [m["name"] for m in node["volumeMounts"]] == ["scratch", "kubeflow-trainer-token"]
    # The runtime is snapshotted; the headless Service gives the pods their DNS names.
    snap = cluster.get("configmaps", ns, "fill-runtime-snapshot")
    assert json.loads(snap["data"]["runtime"])["metadata"]["name"] == "ctrlnet-torch"
    assert cluster.get("services", ns, "fill")["spec"]["clusterIP"] == "None"
    for index, pod in enumerate(two):
        meta, spec = pod["metadata"], pod["spec"]
        assert re.fullmatch(rf"fill-node-0-{index}-[bcdfghjklmnpqrstvwxz2456789]{{5}}", meta["name"])
        assert (spec["hostname"], spec["subdomain"], spec["restartPolicy"]) == (f"fill-node-0-{index}", "fill", "Never")
        labels = meta["labels"]
        assert labels["jobset.sigs.k8s.io/jobset-name"] == "fill" and labels["jobset.sigs.k8s.io/job-index"] == "0"
        assert (
            labels["jobset.sigs.k8s.io/replicatedjob-name"] == "node"
            and labels["jobset.sigs.k8s.io/restart-attempt"] == "0"
        )
        assert labels["batch.kubernetes.io/job-name"] == labels["job-name"] == "fill-node-0"
        assert labels["batch.kubernetes.io/job-completion-index"] == str(index)
        assert meta["annotations"]["batch.kubernetes.io/job-completion-index"] == str(index)
        assert labels["app.kubernetes.io/instance"] == "fill" and meta["annotations"]["note"] == "from the patch"
        assert meta["ownerReferences"][0]["kind"] == "JobSet"
    assert cluster.events(ns, "fill-node-0", "SuccessfulCreate")
    tj = cluster.wait_for(lambda: (t := cluster.get("trainjobs", ns, "fill")).get("status", {}).get("jobsStatus") and t)
    assert tj["status"]["jobsStatus"] == [
        {"name": "node", "ready": 0, "succeeded": 0, "failed": 0, "active": 1, "suspended": 0}
    ]
    # Every pod succeeds: the JobSet completes, and so does the TrainJob.
    for pod in two:
        cluster.set_terminated(ns, pod["metadata"]["name"], 0)
    done = cluster.wait_for(lambda: cond(cluster.get("trainjobs", ns, "fill"), "Complete"))
    assert (done["status"], done["reason"], done["message"]) == (
        "True",
        "AllJobsCompleted",
        "jobset completed successfully",
    )
    # Deleting the TrainJob takes the JobSet, its pods, Service and the snapshot along.
    co.delete_namespaced_custom_object(GROUP, VERSION, ns, "trainjobs", "fill")
    cluster.wait_for(
        lambda: not cluster.list("pods", ns) and not cluster.list("jobsets", ns) and not cluster.list("configmaps", ns)
    )


def test_a_retryable_exit_restarts_every_pod_and_a_permanent_one_fails_the_trainjob(cluster, co, ns):
    create(co, ns, trainjob("flaky"))
    first = cluster.wait_for(lambda: len(pods(cluster, ns, "flaky", 0)) == 2 and pods(cluster, ns, "flaky", 0))
    cluster.set_terminated(ns, first[0]["metadata"]["name"], 143)  # preempted: SIGTERM
    second = cluster.wait_for(lambda: len(pods(cluster, ns, "flaky", 1)) == 2 and pods(cluster, ns, "flaky", 1))
    assert not pods(cluster, ns, "flaky", 0)  # every pod of the attempt is replaced
    assert {p["metadata"]["name"] for p in second}.isdisjoint(p["metadata"]["name"] for p in first)
    js = cluster.get("jobsets", ns, "flaky")
    assert js["status"]["restarts"] == 1 and js["status"]["restartsCountTowardsMax"] == 1
    restarting = cond(js, "Restarting")
    assert restarting["reason"] == "DefaultFailurePolicy"
    assert restarting["message"] == "applying RestartJobSet failure policy action (first failed job: flaky-node-0)"
    assert (
        cluster.events(ns, "flaky-node-0", "BackoffLimitExceeded")[0]["message"]
        == "Job has reached the specified backoff limit"
    )
    assert cluster.events(ns, "flaky", "RestartJobSetFailurePolicyAction")

    cluster.set_terminated(ns, second[1]["metadata"]["name"], 2)  # bad input: permanent
    failed = cluster.wait_for(lambda: cond(cluster.get("trainjobs", ns, "flaky"), "Failed"))
    assert (failed["reason"], failed["message"]) == (
        "FailJobSetFailurePolicyAction",
        "applying FailJobSet failure policy action (first failed job: flaky-node-0)",
    )
    (pfp,) = cluster.events(ns, "flaky-node-0", "PodFailurePolicy")
    assert pfp["message"] == (
        f"Container node for pod {ns}/{second[1]['metadata']['name']} failed with exit code 2 matching FailJob rule at index 1"
    )
    # The failed pod stays to be looked at; its running peer is deleted.
    cluster.wait_for(
        lambda: [p["metadata"]["name"] for p in pods(cluster, ns, "flaky", 1)] == [second[1]["metadata"]["name"]]
    )
    assert cluster.get("jobsets", ns, "flaky")["status"]["restarts"] == 1
    tj = cluster.get("trainjobs", ns, "flaky")
    assert tj["status"]["jobsStatus"][0]["failed"] == 1


def test_max_restarts_ends_the_retries(cluster, co, ns):
    runtime = ctrlnet_runtime()
    runtime["metadata"]["name"] = "two-restarts"
    runtime["spec"]["template"]["spec"]["failurePolicy"]["maxRestarts"] = 1
    cluster.create(runtime)
    job = trainjob("killed", nodes=1)
    job["spec"]["runtimeRef"]["name"] = "two-restarts"
    create(co, ns, job)
    for attempt in (0, 1):
        (pod,) = cluster.wait_for(lambda a=attempt: pods(cluster, ns, "killed", a))
        cluster.set_terminated(ns, pod["metadata"]["name"], 137, reason="OOMKilled")
    failed = cluster.wait_for(lambda: cond(cluster.get("trainjobs", ns, "killed"), "Failed"))
    assert failed["reason"] == "ReachedMaxRestarts"
    assert failed["message"] == "jobset failed due to reaching max number of restarts (first failed job: killed-node-0)"


def test_suspend_and_resume(cluster, co, ns):
    create(co, ns, trainjob("paused", nodes=1, suspend=True))
    suspended = cluster.wait_for(lambda: cond(cluster.get("trainjobs", ns, "paused"), "Suspended"))
    assert (suspended["status"], suspended["reason"], suspended["message"]) == (
        "True",
        "Suspended",
        "TrainJob is suspended",
    )
    assert cluster.get("jobsets", ns, "paused")["spec"]["suspend"] is True and not pods(cluster, ns, "paused")
    co.patch_namespaced_custom_object(GROUP, VERSION, ns, "trainjobs", "paused", {"spec": {"suspend": False}})
    cluster.wait_for(lambda: pods(cluster, ns, "paused"))
    resumed = cond(cluster.get("trainjobs", ns, "paused"), "Suspended")
    assert (resumed["status"], resumed["reason"], resumed["message"]) == ("False", "Resumed", "TrainJob is resumed")
    co.patch_namespaced_custom_object(GROUP, VERSION, ns, "trainjobs", "paused", {"spec": {"suspend": True}})
    cluster.wait_for(lambda: not pods(cluster, ns, "paused"), message="the pods deleted")
    cluster.wait_for(lambda: cond(cluster.get("jobsets", ns, "paused"), "Suspended")["reason"] == "SuspendedJobs")


def test_a_missing_runtime_is_an_event_and_no_jobset(cluster, co, ns):
    job = trainjob("orphan")
    job["spec"]["runtimeRef"]["name"] = "nope"
    create(co, ns, job)
    (ev,) = cluster.wait_for(lambda: cluster.events(ns, "orphan", "TrainJobResourcesCreationFailed"))
    assert ev["type"] == "Warning" and ev["message"] == (
        "TrainJob resources reconciliation failed: not found ClusterTrainingRuntime specified in TrainJob: "
        'clustertrainingruntimes.trainer.kubeflow.org "nope" not found'
    )
    assert cluster.get("jobsets", ns, "orphan") is None


def test_a_queued_trainjob_waits_for_its_workload(tmp_path):
    with LoopbackCluster(tmp_path, installed={"trainjobs", "workloads"}, run_pods=False) as c:
        c.create(ctrlnet_runtime())
        job = trainjob("queued", nodes=2)
        job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] = "team-a"
        assert c.create(job)["spec"]["suspend"] is True  # Kueue's webhook
        wl = c.wait_for(lambda: c.workload_for("default", "queued"))
        assert re.fullmatch(r"trainjob-queued-[0-9a-f]{5}", wl["metadata"]["name"])
        assert [(p["name"], p["count"]) for p in wl["spec"]["podSets"]] == [("node", 2)]
        assert not c.list("pods", "default")
        c.admit_workload("default", "queued")
        c.wait_for(lambda: len(c.list("pods", "default")) == 2)
        assert c.get("trainjobs", "default", "queued")["spec"]["suspend"] is False
        assert not c.server_errors


def _post(cluster, path: str, body, token: str | None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    req = urllib.request.Request(cluster.url + path, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_status_server_takes_the_trainjobs_own_token_only(cluster, co, ns):
    create(co, ns, trainjob("progress", nodes=1))
    path = f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{ns}/trainjobs/progress/status"
    audience = f"trainer.kubeflow.org/v1alpha1/namespaces/{ns}/trainjobs/progress/status"
    good = cluster.service_account_token(ns, audience)
    other = cluster.service_account_token(ns, audience.replace("progress", "other"))
    body = {
        "trainerStatus": {
            "progressPercentage": 25,
            "estimatedRemainingSeconds": 30,
            "metrics": [{"name": "loss", "value": "0.25"}, {"name": "step", "value": "4"}],
            "lastUpdatedTime": "2026-01-01T00:00:00Z",
        }
    }
    for token in (None, cluster.token, other):  # not even the cluster's admin token
        code, doc = _post(cluster, path, body, token)
        assert (code, doc["reason"], doc["message"]) == (403, "Forbidden", "Forbidden")
    assert _post(cluster, path, ["no"], good)[0] == 422
    bad = {"trainerStatus": {**body["trainerStatus"], "progressPercentage": 101}}
    code, doc = _post(cluster, path, bad, good)
    assert code == 422 and "progressPercentage" in doc["message"]
    code, doc = _post(cluster, path, {"trainerStatus": {"progressPercentage": 5}}, good)
    assert code == 422 and "lastUpdatedTime is required when trainerStatus is present" in doc["message"]
    assert _post(cluster, path, body, good) == (200, body)
    assert cluster.get("trainjobs", ns, "progress")["status"]["trainerStatus"] == body["trainerStatus"]
    co.delete_namespaced_custom_object(GROUP, VERSION, ns, "trainjobs", "progress")
    cluster.wait_for(lambda: cluster.get("trainjobs", ns, "progress") is None)
    assert _post(cluster, path, body, good)[0] == 404


def test_pods_run_with_their_rank_a_reachable_master_and_the_status_token(tmp_path):
    """The kubelet resolves PET_NODE_RANK's fieldRef, maps <pod>.<subdomain> names to 127.0.0.1 and the
    master port to a free one, and writes the projected token the status server accepts."""
    code = textwrap.dedent(
        """
        import json, os, urllib.request
        print("rank", os.environ["PET_NODE_RANK"], "master", os.environ["PET_MASTER_ADDR"], os.environ["PET_MASTER_PORT"])
        if os.environ["PET_NODE_RANK"] == "0":
            token = open(os.environ["KUBEFLOW_TRAINER_SERVER_TOKEN"]).read()
            body = {"trainerStatus": {"progressPercentage": 100, "lastUpdatedTime": "2026-01-01T00:00:00Z"}}
            req = urllib.request.Request(os.environ["KUBEFLOW_TRAINER_SERVER_URL"], data=json.dumps(body).encode(),
                                         headers={"Authorization": "Bearer " + token}, method="POST")
            print("status", urllib.request.urlopen(req).status)
        """
    )
    with LoopbackCluster(tmp_path, installed={"trainjobs"}) as c:
        c.create(ctrlnet_runtime())
        c.create(trainjob("run", nodes=2, command=[sys.executable, "-c", code]))
        c.wait_for(lambda: cond(c.get("trainjobs", "default", "run"), "Complete"), timeout=60)
        logs = {
            p["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"]: c.logs(
                "default", p["metadata"]["name"]
            )
            for p in c.list("pods", "default")
        }
        port = c.job_port("default", "run", 29500)
        assert logs["0"] == f"rank 0 master 127.0.0.1 {port}\nstatus 200\n"
        assert logs["1"] == f"rank 1 master 127.0.0.1 {port}\n"
        assert c.get("trainjobs", "default", "run")["status"]["trainerStatus"]["progressPercentage"] == 100
        assert not c.server_errors


def test_an_active_deadline_fails_the_trainjob_and_removes_its_jobset(cluster, co, ns):
    create(co, ns, trainjob("late", nodes=1, activeDeadlineSeconds=1))
    failed = cluster.wait_for(lambda: cond(cluster.get("trainjobs", ns, "late"), "Failed"), timeout=10)
    assert (failed["reason"], failed["message"]) == ("DeadlineExceeded", "TrainJob exceeded its active deadline")
    cluster.wait_for(lambda: cluster.get("jobsets", ns, "late") is None and not pods(cluster, ns, "late"))
    assert cond(cluster.get("trainjobs", ns, "late"), "Failed")["reason"] == "DeadlineExceeded"  # it stays
