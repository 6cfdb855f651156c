"""Nothing lost, nothing hangs, nothing diverges silently (issue 18), cluster side: verbs that change
things touch ctrlnet's objects only and report every object's fate; one deadline per API call;
one `error:` line for credential plugins, junk answers and the surprises a user meets. Against
the loopback cluster with no pods running, plus a socket that never answers and a tiny HTTP
server that answers HTML."""

from __future__ import annotations

import copy
import http.server
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from testkit.cluster import LoopbackCluster

NS = "default"
TOKEN = "t0k3n-never-printed"
JOB = {
    "train": {"output": "s3://bucket/runs", "loop": {"max_steps": 2}},
    "cluster": {"name": "fault", "gpus_per_node": 0, "resources": {"cpu": "1", "memory": "1Gi"}, "shm_size": "64Mi"},
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LoopbackCluster(tmp_path_factory.mktemp("faults"), installed={"pytorchjobs"}, run_pods=False, tls=False) as c:
        yield c


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("job") / "job.yaml"
    path.write_text(yaml.safe_dump(JOB))
    return path


def run(
    *args: str, kubeconfig: Path | str, env: dict | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "CTRLNET_REQUEST_TIMEOUT")}
    environ["HOME"] = str(Path(kubeconfig).parent)
    environ["KUBECONFIG"] = str(kubeconfig)
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "ctrlnet", *args], capture_output=True, text=True, timeout=timeout, env=environ
    )


def one_line(result: subprocess.CompletedProcess, code: int, *needles: str, absent: tuple[str, ...] = ()) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for needle in needles:
        assert needle in lines[0], lines[0]
    for text in absent:
        assert text not in result.stdout + result.stderr, (text, result.stdout, result.stderr)
    return lines[0]


def kubeconfig_for(server: str, folder: Path, user: dict | None = None, current: str | None = "c") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "kubeconfig"
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": server}}],
        "users": [{"name": "u", "user": user or {"token": TOKEN}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
    }
    if current:
        doc["current-context"] = current
    path.write_text(yaml.safe_dump(doc))
    return path


def submit(cluster, job: Path, name: str, *sets: str) -> None:
    result = run(
        "submit",
        "-f",
        str(job),
        "--name",
        name,
        *(a for s in sets for a in ("--set", s)),
        kubeconfig=cluster.kubeconfig,
    )
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------ 1. nothing a user has is lost


def test_verbs_that_change_things_refuse_a_job_ctrlnet_did_not_submit(cluster, job):
    submit(cluster, job, "template")
    foreign = copy.deepcopy(cluster.get("pytorchjobs", NS, "template"))
    foreign["metadata"] = {"name": "foreign", "namespace": NS}  # someone else's job: no ctrlnet labels
    foreign.pop("status", None)
    cluster.create(foreign)
    for verb in ("delete", "suspend", "resume"):
        extra = ["--yes"] if verb == "delete" else []
        one_line(
            run(verb, "foreign", *extra, kubeconfig=cluster.kubeconfig),
            2,
            "PyTorchJob 'foreign' in namespace default was not submitted by ctrlnet",
            "app.kubernetes.io/part-of=ctrlnet",
        )
    kept = cluster.get("pytorchjobs", NS, "foreign")
    assert kept is not None and not (kept["spec"].get("runPolicy") or {}).get("suspend")
    run("delete", "template", "--yes", kubeconfig=cluster.kubeconfig)


def test_a_delete_reports_every_object_when_one_part_fails(cluster, job):
    submit(cluster, job, "halfway")
    cluster.deny("delete", "configmaps")
    try:
        result = run("delete", "halfway", "--yes", kubeconfig=cluster.kubeconfig)
    finally:
        cluster.allow_all()
    one_line(result, 1, "1 object(s) of run halfway were not deleted")
    assert "deleted PyTorchJob/halfway" in result.stdout and "ServiceAccount/halfway" in result.stdout
    assert "not deleted ConfigMap/halfway-config: forbidden (403)" in result.stdout
    assert cluster.get("pytorchjobs", NS, "halfway") is None
    assert cluster.get("configmaps", NS, "halfway-config") is not None


def test_an_api_the_cluster_does_not_serve_is_nothing_to_delete(tmp_path, job):
    with LoopbackCluster(tmp_path, installed={"pytorchjobs"}, run_pods=False, tls=False) as bare:
        bare.unserve("networking.k8s.io", "networkpolicies")
        # Item 4: NetworkPolicy is Kubernetes' own API, not a CRD; the line names the setting.
        line = one_line(
            run("submit", "-f", str(job), "--name", "nonet", kubeconfig=bare.kubeconfig),
            1,
            "NetworkPolicy (networking.k8s.io/v1)",
            "cluster.network_policy.enabled=false",
        )
        assert "install its CRD" not in line and "not a CRD" in line
        submit(bare, job, "nonet", "cluster.network_policy.enabled=false")
        result = run("delete", "nonet", "--yes", kubeconfig=bare.kubeconfig)
        assert result.returncode == 0, result.stderr
        assert "deleted PyTorchJob/nonet" in result.stdout and not result.stderr.strip()


# ------------------------------------------------------------------ 2. nothing hangs


def test_one_deadline_per_call_including_retries(tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    threading.Thread(target=lambda: [listener.accept() for _ in range(16)], daemon=True).start()
    try:
        port = listener.getsockname()[1]
        start = time.monotonic()
        result = run(
            "list",
            kubeconfig=kubeconfig_for(f"http://127.0.0.1:{port}", tmp_path),
            env={"CTRLNET_REQUEST_TIMEOUT": "2"},
        )
        elapsed = time.monotonic() - start
        one_line(result, 1, "did not answer within 2 s", absent=(TOKEN,))
        assert elapsed < 6, f"a 2 s timeout took {elapsed:.1f} s (the client's retries multiply it)"
    finally:
        listener.close()


@pytest.mark.parametrize("value", ["0", "-5", "abc", "1e9", "nan"])
def test_request_timeout_out_of_range_is_one_line(cluster, value):
    one_line(
        run("list", kubeconfig=cluster.kubeconfig, env={"CTRLNET_REQUEST_TIMEOUT": value}),
        2,
        "CTRLNET_REQUEST_TIMEOUT",
        "from 1 to 600",
    )


# ------------------------------------------------------------------ 3. one shape for every error


def test_a_failing_exec_credential_plugin_is_one_line_without_its_stdout(tmp_path):
    plugin = tmp_path / "login-plugin"
    plugin.write_text(
        "#!/bin/sh\necho 'ghp_SECRETSECRETSECRETSECRETSECRETSECRET12'\necho 'session expired: run login' >&2\nexit 1\n"
    )
    plugin.chmod(plugin.stat().st_mode | stat.S_IEXEC)
    user = {
        "exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": str(plugin), "interactiveMode": "Never"}
    }
    result = run("list", kubeconfig=kubeconfig_for("http://127.0.0.1:9", tmp_path, user=user))
    one_line(
        result,
        2,
        "exec credential plugin failed",
        "session expired: run login",
        absent=("ERROR:root", "ghp_SECRET"),
    )


def test_an_auth_provider_whose_command_is_missing_is_one_line(tmp_path):
    user = {"auth-provider": {"name": "gcp", "config": {"cmd-path": "/nonexistent/gcloud config config-helper"}}}
    result = run("list", kubeconfig=kubeconfig_for("http://127.0.0.1:9", tmp_path, user=user))
    one_line(result, 2, "context 'c'", "/nonexistent/gcloud")


class _Junk(http.server.BaseHTTPRequestHandler):
    body = b""
    content_type = "text/html"

    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(200)
        self.send_header("Content-Type", self.content_type)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(
    "body,content_type,needle",
    [
        (b"<!DOCTYPE html><html><body>Sign in with SSO</body></html>", "text/html", "an HTML page"),
        (b"Service Unavailable, try later", "text/plain", "not JSON ('Service Unavailable"),
    ],
)
def test_an_api_server_answering_200_with_junk_is_one_line(tmp_path, body, content_type, needle):
    handler = type("Handler", (_Junk,), {"body": body, "content_type": content_type})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        line = one_line(run("list", kubeconfig=kubeconfig_for(url, tmp_path)), 1, f"the API server at {url}", needle)
        assert "/apis/" in line  # the endpoint that answered
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------ 4. surprises


def test_a_bad_name_is_blamed_on_the_option(cluster, job):
    line = one_line(run("submit", "-f", str(job), "--name", "Bad_Name", kubeconfig=cluster.kubeconfig), 2, "--name")
    assert "cluster.name" not in line


def test_a_kubeconfig_without_current_context_is_used_with_context(cluster, tmp_path):
    path = kubeconfig_for(cluster.url, tmp_path, user={"token": cluster.token}, current=None)
    one_line(run("list", kubeconfig=path), 2, "no current context", "--context")
    result = run("list", "--context", "c", kubeconfig=path)
    assert result.returncode == 0, result.stderr


def test_suspend_or_resume_of_a_finished_run_changes_nothing(cluster, job):
    submit(cluster, job, "done")
    cluster.wait_for(lambda: cluster.get("pods", NS, "done-master-0"))
    cluster.set_terminated(NS, "done-master-0", 0)
    cluster.wait_for(
        lambda: any(
            c.get("type") == "Succeeded" and c.get("status") == "True"
            for c in (cluster.get("pytorchjobs", NS, "done").get("status") or {}).get("conditions") or []
        )
    )
    for verb in ("suspend", "resume"):
        one_line(run(verb, "done", kubeconfig=cluster.kubeconfig), 2, "has finished (Succeeded)", "nothing was changed")
    assert not (cluster.get("pytorchjobs", NS, "done")["spec"].get("runPolicy") or {}).get("suspend")


def test_a_missing_namespace_is_named(cluster):
    one_line(run("list", "-n", "nope", kubeconfig=cluster.kubeconfig), 2, "namespace 'nope' does not exist")
    one_line(run("status", "x", "-n", "nope", kubeconfig=cluster.kubeconfig), 2, "namespace 'nope' does not exist")
    empty = run("list", kubeconfig=cluster.kubeconfig, env={})  # an existing namespace: no error
    assert empty.returncode == 0, empty.stderr


def test_logs_of_a_rank_the_run_does_not_have(cluster, job):
    submit(cluster, job, "single")
    one_line(run("logs", "single", "--rank", "5", kubeconfig=cluster.kubeconfig), 2, "--rank 5", "ranks 0..0")


def test_a_token_shaped_name_is_not_echoed(cluster):
    token = "ghp_" + "A1b2C3d4E5" * 4
    for verb in ("status", "delete"):
        extra = ["--yes"] if verb == "delete" else []
        one_line(run(verb, token, *extra, kubeconfig=cluster.kubeconfig), 2, "no ctrlnet run", absent=(token,))
