"""Progress in the TrainJob's own status: `kubectl get trainjob -o yaml` (and the Kubeflow
dashboard) show `status.trainerStatus` (percent, ETA, loss, lr) without ctrlnet.

The mechanism is Kubeflow Trainer's (v2.2+, the controller's `TrainJobStatus` feature gate; its
plugin pkg/runtime/framework/plugins/trainjobstatus and server pkg/statusserver at v2.3.0): the
controller injects into the trainer's containers

    KUBEFLOW_TRAINER_SERVER_URL      https://<controller service>/apis/trainer.kubeflow.org/v1alpha1/
                                     namespaces/<ns>/trainjobs/<name>/status
    KUBEFLOW_TRAINER_SERVER_CA_CERT  the path of the CA that signs the server's certificate
    KUBEFLOW_TRAINER_SERVER_TOKEN    the path of a projected service-account token (audience: that
                                     TrainJob's status; rotated hourly: re-read for every request)

and the trainer POSTs `{"trainerStatus": {progressPercentage, estimatedRemainingSeconds, metrics:
[{name, value}], lastUpdatedTime}}`, which the controller applies to the TrainJob's status. So the
pod needs no RBAC of its own (the token is scoped to its TrainJob by the controller). Without these
variables (a PyTorchJob, a local run, a controller without the gate) nothing is sent.

Rank 0 reports at each logging step, at most every MIN_INTERVAL_S (the Kubeflow SDK's throttle),
and always at each checkpoint (so also before exiting after a preemption) and at the end. Reporting never stops training: every request has one TIMEOUT_S deadline, a
failure is logged once, and after MAX_FAILURES failures in a row it stops trying.
"""

from __future__ import annotations

import json
import os
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Mapping

from ctrlnet.log import get_logger

log = get_logger(__name__)

ENV_URL = "KUBEFLOW_TRAINER_SERVER_URL"
ENV_CA_CERT = "KUBEFLOW_TRAINER_SERVER_CA_CERT"
ENV_TOKEN = "KUBEFLOW_TRAINER_SERVER_TOKEN"

MIN_INTERVAL_S = 5.0
TIMEOUT_S = 5.0
MAX_FAILURES = 5
INT32_MAX = 2**31 - 1
MAX_VALUE_CHARS = 64
"""The CRD's maxLength of a metric's name and value."""


class TrainJobStatus:
    """Sends rank 0's progress to the Trainer controller's status server."""

    def __init__(self, url: str, ca_cert: str | None, token_file: str | None, clock=time.monotonic):
        self.url, self.ca_cert, self.token_file, self.clock = url, ca_cert, token_file, clock
        self.last_sent: float | None = None
        self.failures, self.gave_up, self.sent = 0, False, 0
        self._context = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> TrainJobStatus | None:
        """The reporter when the controller injected its variables, else None."""
        url = env.get(ENV_URL)
        if not url:
            return None
        return cls(url, env.get(ENV_CA_CERT), env.get(ENV_TOKEN))

    def report(
        self,
        *,
        step: int,
        total: int,
        eta_s: float | None = None,
        metrics: Mapping[str, float | int | None] | None = None,
        force: bool = False,
    ) -> bool:
        """Send the progress at `step` of `total` unless one was sent less than MIN_INTERVAL_S ago
        (`force`: the end, always); whether it was sent."""
        now = self.clock()
        if self.gave_up or (not force and self.last_sent is not None and now - self.last_sent < MIN_INTERVAL_S):
            return False
        self.last_sent = now
        try:
            self._post(payload(step, total, eta_s, metrics or {}))
        except (OSError, ValueError) as e:  # URLError, HTTPError, timeouts, a bad CA or token file
            self.failures += 1
            if self.failures == 1:
                log.warning(f"could not report progress to the TrainJob's status ({_reason(e)}); training goes on")
            if self.failures >= MAX_FAILURES:
                self.gave_up = True
                log.warning(
                    f"{MAX_FAILURES} progress reports to the TrainJob's status failed in a row: no more are sent"
                )
            return False
        self.failures = 0
        self.sent += 1
        return True

    def _post(self, body: dict) -> None:
        headers = {"Content-Type": "application/json"}
        if self.token_file:  # re-read every time: the projected token rotates
            with open(self.token_file) as f:
                headers["Authorization"] = f"Bearer {f.read().strip()}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=TIMEOUT_S, context=self._ssl()) as response:
            response.read()

    def _ssl(self) -> ssl.SSLContext | None:
        if not self.url.startswith("https://"):
            return None
        if self._context is None:
            self._context = ssl.create_default_context(cafile=self.ca_cert or None)
        return self._context


def payload(step: int, total: int, eta_s: float | None, metrics: Mapping[str, float | int | None]) -> dict:
    """The request body the status server takes (trainer.UpdateTrainJobStatusRequest), within the
    CRD's bounds: percent 0-100, seconds an int32, metric values as strings of at most 64 chars."""
    status: dict = {
        "progressPercentage": max(0, min(100, int(100 * step / total))) if total > 0 else 0,
        "metrics": [
            {"name": name[:MAX_VALUE_CHARS], "value": _value(value)}
            for name, value in metrics.items()
            if value is not None
        ],
        "lastUpdatedTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if eta_s is not None and eta_s == eta_s:  # not NaN
        status["estimatedRemainingSeconds"] = max(0, min(INT32_MAX, round(eta_s)))
    return {"trainerStatus": status}


def _value(value: float | int) -> str:
    text = f"{value:.6g}" if isinstance(value, float) else str(value)
    return text[:MAX_VALUE_CHARS]


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} from the status server"
    if isinstance(e, urllib.error.URLError):
        return f"{type(e.reason).__name__}: {e.reason}"
    return f"{type(e).__name__}: {e}"
