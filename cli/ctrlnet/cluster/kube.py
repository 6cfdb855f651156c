"""The few Kubernetes calls ctrlnet makes, through the official client, with every failure turned
into one line that names what the cluster said and what to do.

Calls go through `ApiClient.call_api` on REST paths built from one resource table, rather than
the generated per-kind methods: one code path for core kinds and custom resources, and it sidesteps
the client's missing 201 response type for custom objects (a server-side apply that *creates* an
object returns None from `patch_namespaced_custom_object`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ctrlnet.cluster.connect import Connection
from ctrlnet.errors import ClusterError, UserError

FIELD_MANAGER = "ctrlnet"
TIMEOUT_S = 15.0
"""Default seconds an ordinary API call may take, retries included, before the server counts as
not answering (CTRLNET_REQUEST_TIMEOUT overrides it, like kubectl's --request-timeout)."""
TIMEOUT_RANGE = (1.0, 600.0)
TIMEOUT_VAR = "CTRLNET_REQUEST_TIMEOUT"


def request_timeout() -> float:
    """CTRLNET_REQUEST_TIMEOUT in seconds (default 15), refused in one line outside 1..600."""
    raw = os.environ.get(TIMEOUT_VAR, "").strip()
    if not raw:
        return TIMEOUT_S
    lo, hi = TIMEOUT_RANGE
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not lo <= value <= hi:  # also false for nan
        raise UserError(f"{TIMEOUT_VAR}={raw[:20]!r} is not a timeout: give seconds from {lo:g} to {hi:g}")
    return value


@dataclass(frozen=True)
class Resource:
    kind: str
    group: str  # "" for core
    version: str
    plural: str
    installed_by: str = ""  # what to install when the API group is missing
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def what(self) -> str:
        return f"{self.kind} ({self.api_version})"

    def path(self, namespace: str | None, name: str | None = None, sub: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if namespace is not None and self.namespaced:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name:
            base += f"/{name}"
        if sub:
            base += f"/{sub}"
        return base


TRAINING_OPERATOR = (
    "the Kubeflow Training Operator v1.9 (kubectl apply --server-side -k "
    '"github.com/kubeflow/trainer.git/manifests/overlays/standalone?ref=v1.9.4")'
)
KUBEFLOW_TRAINER = (
    "Kubeflow Trainer v2 (helm install kubeflow-trainer oci://ghcr.io/kubeflow/charts/kubeflow-trainer --version 2.3.0)"
)
KUEUE = "Kueue (https://kueue.sigs.k8s.io/docs/installation/)"
VOLCANO = "Volcano (https://volcano.sh/en/docs/installation/)"

RESOURCES = {
    r.kind: r
    for r in [
        Resource("Namespace", "", "v1", "namespaces", namespaced=False),
        Resource("Pod", "", "v1", "pods"),
        Resource("Event", "", "v1", "events"),
        Resource("ConfigMap", "", "v1", "configmaps"),
        Resource("ServiceAccount", "", "v1", "serviceaccounts"),
        Resource("PersistentVolumeClaim", "", "v1", "persistentvolumeclaims"),
        Resource("NetworkPolicy", "networking.k8s.io", "v1", "networkpolicies"),
        Resource("PyTorchJob", "kubeflow.org", "v1", "pytorchjobs", TRAINING_OPERATOR),
        Resource("TrainJob", "trainer.kubeflow.org", "v1alpha1", "trainjobs", KUBEFLOW_TRAINER),
        Resource(
            "ClusterTrainingRuntime",
            "trainer.kubeflow.org",
            "v1alpha1",
            "clustertrainingruntimes",
            KUBEFLOW_TRAINER,
            namespaced=False,
        ),
        Resource("TrainingRuntime", "trainer.kubeflow.org", "v1alpha1", "trainingruntimes", KUBEFLOW_TRAINER),
        Resource("Workload", "kueue.x-k8s.io", "v1beta1", "workloads", KUEUE),
        Resource("PodGroup", "scheduling.volcano.sh", "v1beta1", "podgroups", VOLCANO),
    ]
}


class Kube:
    """One cluster connection; methods raise UserError (exit 2) or ClusterError (exit 1) only."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self.namespace = conn.namespace
        self.timeout = request_timeout()
        self._served: dict[str, bool] = {}

    # ------------------------------------------------------------ discovery
    def served(self, res: Resource) -> bool:
        """Whether the API server serves `res`'s group/version (its CRD is installed)."""
        if not res.group:
            return True
        key = res.api_version
        if key not in self._served:
            try:
                doc = self.request("GET", f"/apis/{res.group}/{res.version}", what=f"the {res.group} API")
                self._served[key] = any(r.get("name") == res.plural for r in doc.get("resources", []))
            except _NotFound:
                self._served[key] = False
        return self._served[key]

    def require(self, res: Resource, why: str = "") -> None:
        if not self.served(res):
            raise ClusterError(
                f"{res.what} is not installed on the cluster of context {self.conn.context}{why}: "
                f"install {res.installed_by}"
            )

    # ------------------------------------------------------------ verbs
    def get(self, kind: str, name: str, namespace: str | None = None) -> dict | None:
        """The object, or None when it does not exist."""
        res = RESOURCES[kind]
        try:
            return self.request("GET", res.path(namespace or self.namespace, name), verb="get", res=res)
        except _NotFound as e:
            self._raise_if_namespace_missing(e, namespace)
            return None

    def list(
        self,
        kind: str,
        namespace: str | None = None,
        *,
        all_namespaces: bool = False,
        labels: str | None = None,
        fields: str | None = None,
    ) -> list[dict]:
        res = RESOURCES[kind]
        query = [(k, v) for k, v in (("labelSelector", labels), ("fieldSelector", fields)) if v]
        path = res.path(None if all_namespaces else (namespace or self.namespace))
        try:
            doc = self.request("GET", path, query=query, verb="list", res=res)
        except _NotFound as e:
            self._raise_if_namespace_missing(e, namespace)
            raise ClusterError(
                f"{res.what} is not served by the cluster of context {self.conn.context}: "
                f"install {res.installed_by or 'it'}"
            ) from None
        items = doc.get("items") or []
        for item in items:  # list items carry no apiVersion/kind; callers print them
            item.setdefault("kind", kind)
            item.setdefault("apiVersion", res.api_version)
        return items

    def apply(self, obj: dict, *, dry_run: bool = False, force: bool = False) -> dict:
        """Server-side apply `obj` (field manager `ctrlnet`); the object as the server has it."""
        res = RESOURCES[obj["kind"]]
        meta = obj["metadata"]
        query = [("fieldManager", FIELD_MANAGER)]
        if force:
            query.append(("force", "true"))
        if dry_run:
            query.append(("dryRun", "All"))
        try:  # RBAC sees a server-side apply as the verb "patch"
            return self.request(
                "PATCH",
                res.path(meta.get("namespace") or self.namespace, meta["name"]),
                query=query,
                body=obj,
                content_type="application/apply-patch+yaml",
                verb="patch",
                res=res,
                name=meta["name"],
            )
        except _NotFound as e:
            self._raise_if_namespace_missing(e, meta.get("namespace"))
            if not res.installed_by and res.group:  # part of Kubernetes (NetworkPolicy): nothing to install
                raise ClusterError(
                    f"the cluster of context {self.conn.context} does not serve {res.what}, part of Kubernetes "
                    f"itself, not a CRD to install: ask its admin to enable that API"
                    + (" or set cluster.network_policy.enabled=false" if res.kind == "NetworkPolicy" else "")
                ) from None
            raise ClusterError(
                f"{res.what} is not installed on the cluster of context {self.conn.context}: "
                f"install {res.installed_by or 'its CRD'}"
            ) from None

    def merge_patch(self, kind: str, name: str, patch: dict, namespace: str | None = None) -> dict:
        res = RESOURCES[kind]
        try:
            return self.request(
                "PATCH",
                res.path(namespace or self.namespace, name),
                body=patch,
                content_type="application/merge-patch+json",
                verb="patch",
                res=res,
                name=name,
            )
        except _NotFound:
            raise UserError(f"{kind} {name!r} does not exist in namespace {namespace or self.namespace}") from None

    def delete(self, kind: str, name: str, namespace: str | None = None) -> bool:
        """Delete with foreground-independent background propagation; False when already gone."""
        res = RESOURCES[kind]
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"}
        try:
            self.request(
                "DELETE", res.path(namespace or self.namespace, name), body=body, verb="delete", res=res, name=name
            )
            return True
        except _NotFound:
            return False

    def log_lines(
        self,
        pod: str,
        container: str,
        *,
        namespace: str | None = None,
        tail: int | None = None,
        since_s: int | None = None,
        previous: bool = False,
        timestamps: bool = False,
        follow: bool = False,
    ) -> Iterator[str]:
        """A pod's log as text lines (a stream that ends with the container when following)."""
        query: list[tuple[str, Any]] = [("container", container)]
        for key, value in (("tailLines", tail), ("sinceSeconds", since_s)):
            if value is not None:
                query.append((key, str(value)))
        for key, flag in (("previous", previous), ("timestamps", timestamps), ("follow", follow)):
            if flag:
                query.append((key, "true"))
        res = RESOURCES["Pod"]
        path = res.path(namespace or self.namespace, pod, "log")
        try:
            with self._errors("get", res, namespace, pod):
                response = self._call(
                    "GET", path, query, None, None, stream=True, timeout=None if follow else self.timeout
                )
        except _NotFound:
            return  # the pod is gone (deleted or re-created): no more lines
        yield from _lines(response)

    def watch(
        self,
        kind: str,
        *,
        namespace: str | None = None,
        labels: str | None = None,
        fields: str | None = None,
        resource_version: str | None = None,
        timeout_s: int = 300,
    ) -> Iterator[dict]:
        """Watch events {"type", "object"} from `resource_version` on; ends after `timeout_s` or on
        410 Gone (the caller lists again)."""
        res = RESOURCES[kind]
        query = [("watch", "true"), ("timeoutSeconds", str(timeout_s)), ("allowWatchBookmarks", "true")]
        for key, value in (("labelSelector", labels), ("fieldSelector", fields), ("resourceVersion", resource_version)):
            if value:
                query.append((key, value))
        with self._errors("watch", res, namespace, None):
            response = self._call(
                "GET",
                res.path(namespace or self.namespace),
                query,
                None,
                None,
                stream=True,
                timeout=timeout_s + self.timeout,
            )
        for line in _lines(response):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError:
                if line.lstrip().startswith("{"):
                    return  # a line cut short by a dropped connection: the caller lists again
                raise ClusterError(_junk(self.conn.server, res.path(namespace or self.namespace), line)) from None
            if not isinstance(event, dict):
                raise ClusterError(_junk(self.conn.server, res.path(namespace or self.namespace), line))
            if event.get("type") == "ERROR":
                return  # 410 Gone (history expired) or a server-side stop: list again
            yield event

    # ------------------------------------------------------------ the transport
    def request(
        self,
        method: str,
        path: str,
        *,
        query=None,
        body=None,
        content_type: str | None = None,
        verb: str = "get",
        res: Resource | None = None,
        name: str | None = None,
        what: str | None = None,
    ) -> dict:
        with self._errors(verb, res, None, name, what=what):
            response = self._call(method, path, query or [], body, content_type)
        if not response.data:
            return {}
        try:
            doc = json.loads(response.data)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):  # a proxy, ingress or SSO page answering in the API's place
            raise ClusterError(_junk(self.conn.server, path, response.data))
        return doc

    def _call(self, method, path, query, body, content_type, *, stream: bool = False, timeout: float | None = -1.0):
        """One HTTP request with the context's credentials; the raw urllib3 response when streaming.

        `timeout` (default: the request timeout) bounds the whole call: the client's own retries
        are off (connect.py), and a refused or reset connection is tried again only for a read
        and only while the deadline leaves time."""
        import time

        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import MaxRetryError, NewConnectionError, ProtocolError

        if timeout is not None and timeout < 0:
            timeout = self.timeout
        api = self.conn.api
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        request = api.param_serialize(
            method, path, query_params=list(query), header_params=headers, body=body, auth_settings=["BearerToken"]
        )
        deadline = None if timeout is None else time.monotonic() + timeout
        for attempt in range(3):
            left = None if deadline is None else deadline - time.monotonic()
            try:
                response = api.call_api(*request, _request_timeout=None if left is None else max(left, 0.001))
                break
            except (MaxRetryError, ProtocolError) as e:
                cause = getattr(e, "reason", None) or e
                retriable = method == "GET" and isinstance(cause, (NewConnectionError, ProtocolError))
                pause = 0.2 * (attempt + 1)
                if not retriable or attempt == 2 or (deadline is not None and deadline - time.monotonic() < 2 * pause):
                    raise
                time.sleep(pause)
        if not 200 <= response.status <= 299:
            response.read()
            raise ApiException.from_response(http_resp=response, body=None, data=None)
        if stream:
            return response.response
        response.read()
        return response

    @contextmanager
    def _errors(
        self, verb: str, res: Resource | None, namespace: str | None, name: str | None, what: str | None = None
    ):
        """Client exceptions -> one line; 404 -> _NotFound for the caller to interpret."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError, NewConnectionError
        from urllib3.exceptions import TimeoutError as Urllib3Timeout

        ctx, server = self.conn.context, self.conn.server
        ns = namespace or self.namespace
        resource = what or (f"{res.plural}" if res else "the API")
        try:
            yield
        except ApiException as e:
            if not e.status:  # the client's own failure before an HTTP answer (e.g. TLS)
                raise ClusterError(
                    f"cannot talk to the API server at {server} (context {ctx}): {_reason(e.reason)}"
                ) from None
            status = _status(e)
            message = status.get("message") or e.reason or ""
            if e.status == 404:
                raise _NotFound(message) from None
            if e.status == 401:
                raise ClusterError(
                    f"the API server at {server} rejected the credentials of context {ctx} "
                    "(401 Unauthorized): refresh them (log in again) or choose another --context"
                ) from None
            if e.status == 403:
                group = f" in API group {res.group!r}" if res and res.group else ""
                raise Forbidden(
                    f"forbidden (403): context {ctx} may not {verb} {resource}{group} in namespace {ns}; "
                    "ask a cluster admin for the ctrlnet Role (manifests/rbac/role.yaml)"
                ) from None
            if e.status == 409:
                raise ClusterError(_conflict(message, res, name)) from None
            if e.status == 422:
                raise ClusterError(
                    f"the API server rejected {res.kind if res else 'the object'} {name or ''}: {_one_line(message)}"
                ) from None
            if e.status in (500, 502, 503, 504):
                raise ClusterError(
                    f"the API server at {server} failed ({e.status} {e.reason}): {_one_line(message)}; try again"
                ) from None
            raise ClusterError(
                f"the API server at {server} answered {e.status} {e.reason} to {verb} {resource}: {_one_line(message)}"
            ) from None
        except HTTPError as e:
            cause = getattr(e, "reason", None) or e
            # urllib3's NewConnectionError (refused, no route) subclasses its timeout error.
            if isinstance(cause, NewConnectionError) or not isinstance(cause, Urllib3Timeout):
                reason = getattr(e, "reason", None) or e
                raise ClusterError(
                    f"cannot reach the API server at {server} (context {ctx}): {_reason(reason)}; "
                    "check the cluster is up, the context is right and the network (VPN) is on"
                ) from None
            raise ClusterError(
                f"the API server at {server} (context {ctx}) did not answer within {self.timeout:g} s: "
                "check the cluster is up and reachable (VPN, firewall)"
            ) from None

    def _raise_if_namespace_missing(self, e: _NotFound, namespace: str | None) -> None:
        ns = namespace or self.namespace
        if f'namespaces "{ns}" not found' in str(e):
            raise UserError(
                f"namespace {ns!r} does not exist on the cluster of context {self.conn.context}: "
                "check -n (kubectl get namespaces lists them)"
            )


class Forbidden(ClusterError):
    """403 from the server: RBAC does not allow the request (a caller may do without it)."""


class _NotFound(Exception):
    """404 from the server: the caller decides whether that is an error."""


def _junk(server: str, path: str, data) -> str:
    """One line for a 2xx answer that is not the API's JSON: what came back, never all of it."""
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)
    head = text.lstrip()[:200].lower()
    if head.startswith("<!doctype html") or head.startswith("<html") or "<html" in head or "<body" in head:
        what = "an HTML page: is a proxy or SSO login in front of the API server? check the context's server URL"
    else:
        what = f"not JSON ({_one_line(text)[:80]!r}): check the context's server URL points at the API server"
    return f"the API server at {server} answered {path} with {what}"


def _status(e) -> dict:
    try:
        body = json.loads(e.body or "{}")
        return body if isinstance(body, dict) else {}
    except (ValueError, TypeError):
        return {}


def _conflict(message: str, res: Resource | None, name: str | None) -> str:
    managers = sorted(set(part.split('"')[1] for part in message.split("conflict with ")[1:] if '"' in part))
    owner = f" is managed by {', '.join(managers)}" if managers else " already exists and belongs to someone else"
    return (
        f"{res.kind if res else 'object'} {name!r}{owner}: it is not this run's; choose another --name, "
        "or delete the other object first"
    )


def _reason(reason) -> str:
    text = str(reason)
    # urllib3 wraps the OS error in its own words; keep the part a user recognises.
    for marker in (
        "Connection refused",
        "Name or service not known",
        "No route to host",
        "timed out",
        "certificate verify failed",
        "Temporary failure in name resolution",
    ):
        if marker in text:
            return marker.lower()
    return _one_line(text)[:200]


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:400]


def _lines(response) -> Iterator[str]:
    """Whole text lines from a streamed urllib3 response (a line never splits across chunks)."""
    from urllib3.exceptions import HTTPError

    buffer = b""
    try:
        try:
            for chunk in response.stream(4096, decode_content=True):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    yield line.decode("utf-8", "replace")
        except HTTPError:
            pass  # the connection dropped mid-stream (server restart, pod gone): the stream ends here
        if buffer:
            yield buffer.decode("utf-8", "replace")
    finally:
        response.release_conn()
