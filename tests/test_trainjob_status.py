"""Progress in the TrainJob's status (ctrlnet_trainer.trainjob_status): rank 0 POSTs Kubeflow
Trainer's UpdateTrainJobStatusRequest to the status server the controller names in the pod's env,
over TLS with the injected CA and the projected token (re-read each time), throttled, bounded, and
never stopping training. The server here is an HTTPS endpoint on loopback with a CA made here."""

from __future__ import annotations

import json
import ssl
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from testkit.training import small_config

STATUS_PATH = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/default/trainjobs/fill50k/status"


@pytest.fixture(scope="module")
def status_server(tmp_path_factory):
    """An HTTPS server on 127.0.0.1 recording each POST (path, Authorization, body); 200 with the body."""
    folder = tmp_path_factory.mktemp("status-server")
    cert, key = folder / "ca.crt", folder / "server.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": json.loads(body)})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"https://127.0.0.1:{server.server_address[1]}{STATUS_PATH}"
    yield {"url": url, "ca": str(cert), "received": received, "folder": folder}
    server.shutdown()


def env_for(server, token_file) -> dict:
    from ctrlnet_trainer import trainjob_status as ts

    return {ts.ENV_URL: server["url"], ts.ENV_CA_CERT: server["ca"], ts.ENV_TOKEN: str(token_file)}


def test_the_payload_is_what_the_crd_admits():
    from ctrlnet_trainer.trainjob_status import payload

    body = payload(37, 200, 12345.6, {"loss": 0.123456789, "lr": 1e-4, "epoch": 2, "none": None})
    status = body["trainerStatus"]
    assert status["progressPercentage"] == 18 and status["estimatedRemainingSeconds"] == 12346
    assert status["metrics"] == [
        {"name": "loss", "value": "0.123457"},
        {"name": "lr", "value": "0.0001"},
        {"name": "epoch", "value": "2"},
    ]
    assert status["lastUpdatedTime"].endswith("Z") and "T" in status["lastUpdatedTime"]
    bounded = payload(500, 100, 1e12, {})["trainerStatus"]  # past the end, an ETA beyond int32
    assert bounded["progressPercentage"] == 100 and bounded["estimatedRemainingSeconds"] == 2**31 - 1
    assert "estimatedRemainingSeconds" not in payload(1, 10, float("nan"), {})["trainerStatus"]


def test_reports_over_tls_with_the_rotating_token_and_a_throttle(status_server, tmp_path):
    from ctrlnet_trainer.trainjob_status import MIN_INTERVAL_S, TrainJobStatus

    token = tmp_path / "token"
    token.write_text("first-token\n")
    now = [100.0]
    reporter = TrainJobStatus.from_env(env_for(status_server, token))
    reporter.clock = lambda: now[0]
    received = status_server["received"]
    received.clear()
    assert reporter.report(step=1, total=10, eta_s=90, metrics={"loss": 0.5})
    now[0] += MIN_INTERVAL_S / 2
    assert not reporter.report(step=2, total=10)  # throttled
    token.write_text("rotated-token\n")  # the kubelet rotates the projected token
    now[0] += MIN_INTERVAL_S
    assert reporter.report(step=3, total=10)
    assert reporter.report(step=10, total=10, force=True)  # the end: always
    assert [r["path"] for r in received] == [STATUS_PATH] * 3
    assert [r["auth"] for r in received] == ["Bearer first-token", "Bearer rotated-token", "Bearer rotated-token"]
    assert [r["body"]["trainerStatus"]["progressPercentage"] for r in received] == [10, 30, 100]
    assert TrainJobStatus.from_env({}) is None  # no controller variables: nothing is sent


def test_failures_never_stop_training_and_end_the_reports(status_server, tmp_path, caplog):
    from ctrlnet_trainer.trainjob_status import MAX_FAILURES, TrainJobStatus

    token = tmp_path / "token"
    token.write_text("t")
    closed = TrainJobStatus("https://127.0.0.1:9/status", status_server["ca"], str(token))  # nothing listens
    untrusted = TrainJobStatus(status_server["url"], None, str(token))  # the system CAs do not sign it
    for reporter in (closed, untrusted):
        for _ in range(MAX_FAILURES + 2):
            assert not reporter.report(step=1, total=2, force=True)
        assert reporter.gave_up and reporter.failures == MAX_FAILURES
    warnings = [r.getMessage() for r in caplog.records if "TrainJob's status" in r.getMessage()]
    assert len(warnings) == 4, warnings  # per reporter: the first failure, and giving up


def test_a_training_run_reports_its_progress(status_server, tmp_path, monkeypatch):
    from ctrlnet_trainer.run import train

    token = tmp_path / "token"
    token.write_text("pod-token")
    for key, value in env_for(status_server, token).items():
        monkeypatch.setenv(key, value)
    received = status_server["received"]
    received.clear()
    config = small_config(
        tmp_path / "run", loop={"max_steps": 3, "seed": 0}, logging={"every_steps": 1}, checkpoint={"every_steps": 2}
    )
    train(config)
    assert received, "no report reached the status server"
    steps = [next(m["value"] for m in r["body"]["trainerStatus"]["metrics"] if m["name"] == "step") for r in received]
    # step 1 (the first), the checkpoint at step 2 (past the 5 s throttle), the end
    assert steps == ["1", "2", "3"], steps
    last = received[-1]["body"]["trainerStatus"]
    assert last["progressPercentage"] == 100 and last["estimatedRemainingSeconds"] == 0
    assert {m["name"] for m in last["metrics"]} == {"step", "total_steps", "loss", "lr", "samples_per_s", "epoch"}
    assert all(r["auth"] == "Bearer pod-token" for r in received)
