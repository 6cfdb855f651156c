"""The HTTP face of the loopback API server: routing, the bearer token, the RBAC stand-in, watch
streams and pod logs. Plain HTTP on 127.0.0.1 (ctrlnet and the `kubernetes` client need no TLS;
kubectl, which sends tokens over TLS only, is not supported). It also answers `POST
/apis/trainer.kubeflow.org/v1alpha1/namespaces/<ns>/trainjobs/<name>/status` as Kubeflow Trainer's
status server does (its own port, TLS and OIDC token review there; the same port and the tokens
the cluster issued here)."""

from __future__ import annotations

import json
import re
import select
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlparse

from . import errors as E
from .errors import ApiError, FieldError
from .registry import Ctx, Selector
from .resources import ResourceType
from .trainer_v2 import token_audience

if TYPE_CHECKING:
    from .cluster import LoopbackCluster

STATUS_PATH = re.compile(
    r"^/apis/trainer\.kubeflow\.org/v1alpha1/namespaces/(?P<ns>[^/]+)/trainjobs/(?P<name>[^/]+)/status$"
)


class _Server(ThreadingHTTPServer):
    """Tracks its connections so that stop() can end open watch and log streams."""

    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, addr: tuple[str, int], cluster: LoopbackCluster):
        self.cluster = cluster
        self.conn_lock = threading.Lock()
        self.conns: dict[socket.socket, threading.Thread] = {}
        self.closing = threading.Event()
        super().__init__(addr, Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        t = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name=f"{self.cluster.tag}-apiserver-conn",
            daemon=True,
        )
        with self.conn_lock:
            self.conns[request] = t
        t.start()

    def shutdown_request(self, request: Any) -> None:
        with self.conn_lock:
            self.conns.pop(request, None)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if self.cluster.verbose:
            super().handle_error(request, client_address)

    def close_connections(self, timeout: float = 5.0) -> None:
        self.closing.set()
        with self.conn_lock:
            items = list(self.conns.items())
        for sock, _ in items:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for _, t in items:
            t.join(max(0.0, deadline - time.monotonic()))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        if self.server.cluster.verbose:
            super().log_message(format, *args)

    def _send(self, code: int, body: Any, content_type: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _start_stream(self, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _client_gone(self) -> bool:
        """The client closed a streaming connection (checked between events)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    # --- dispatch --------------------------------------------------------------------------------

    def _handle(self, method: str) -> None:
        c = self.server.cluster
        url = urlparse(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        m = STATUS_PATH.match(url.path)
        if method == "POST" and m and c.trainer_status:
            return self._trainer_status(m["ns"], m["name"], body)
        try:
            if self.headers.get("Authorization", "") != f"Bearer {c.token}":
                raise E.unauthorized()
            self._route(method, url.path.rstrip("/"), query, body)
        except ApiError as err:
            self._send(err.code, err.status())
        except OSError:  # the client went away: not a bug of the stand-in
            self.close_connection = True
        except Exception as exc:  # a bug in the stand-in: answer like an apiserver panic would
            c.server_errors.append(exc)
            try:
                self._send(500, E.internal(f"loopback API server error: {exc!r}").status())
            except OSError:
                pass

    def _route(self, method: str, path: str, query: dict[str, str], body: bytes) -> None:
        c = self.server.cluster
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if method == "GET" and (parts == ["api", "v1"] or (len(parts) == 3 and parts[0] == "apis")):
            doc = c.catalog.resource_list(*(("", "v1") if parts[0] == "api" else parts[1:]))
            if doc is None:
                raise E.path_not_found()
            return self._send(200, doc)
        if parts[:2] == ["api", "v1"] and len(parts) >= 3:
            group, version, rest = "", "v1", parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 4:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise E.path_not_found()
        namespace = None
        if len(rest) >= 3 and rest[0] == "namespaces" and not (len(rest) == 3 and rest[2] == "status"):
            namespace, rest = rest[1], rest[2:]
        plural, name, sub = (rest + [None, None])[:3]
        rt = c.catalog.lookup(group, version, plural)
        if (
            rt is None
            or len(rest) > 3
            or (rt.namespaced and namespace is None and name is not None)
            or (not rt.namespaced and namespace is not None)
            or (sub and sub not in rt.subresources)
        ):
            raise E.path_not_found()
        watch = query.get("watch", "").lower() in ("true", "1")
        if method == "GET":
            verb = "watch" if watch else ("get" if name else "list")
        else:
            verb = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}[method]
        c.authorize(verb, group, f"{plural}/{sub}" if sub else plural, name, namespace)
        # The manager: fieldManager, else the client's User-Agent as a real server does (an apply
        # without fieldManager gets none, and a 422).
        agent = (self.headers.get("User-Agent") or "unknown").split("/")[0][:128]
        ctype = (self.headers.get("Content-Type") or "application/json").split(";")[0].strip()
        manager = query.get("fieldManager") or ("" if ctype == "application/apply-patch+yaml" else agent)
        ctx = Ctx(manager=manager, dry_run=query.get("dryRun") == "All")
        ns, reg = namespace or "", c.registry
        if sub == "log":
            if method != "GET":
                raise E.method_not_allowed()
            return self._logs(ns, name, query)
        if method == "GET":
            if watch:
                return self._watch(rt, version, namespace, query)
            if name is None:
                return self._list(rt, version, namespace, query)
            return self._send(200, reg.get(rt, ns, name, version))
        if (method == "POST") != (name is None) or (rt.namespaced and namespace is None):
            raise E.method_not_allowed()  # create on a collection; the rest on one object
        if method == "POST":
            return self._send(201, reg.create(rt, ns, self._decode(body), ctx, version))
        if method == "PUT":
            return self._send(
                200, reg.update(rt, ns, name, self._decode(body), ctx, subresource=sub or "", version=version)
            )
        if method == "PATCH":
            force = query.get("force", "").lower() in ("true", "1")
            obj, created = reg.patch(rt, ns, name, ctype, body, ctx, force, sub or "", version)
            return self._send(201 if created else 200, obj)
        # DELETE: propagationPolicy is not read (the garbage collector always works in the background)
        if ctx.dry_run:
            return self._send(200, reg.get(rt, ns, name, version))
        opts = self._decode(body) if body.strip() else {}
        grace = query.get("gracePeriodSeconds") or opts.get("gracePeriodSeconds")
        out = reg.delete(rt, ns, name, None if grace in (None, "") else int(grace), version)
        c.wake()
        self._send(200, out)

    # --- Kubeflow Trainer's status server ---------------------------------------------------------

    def _trainer_status(self, namespace: str, name: str, body: bytes) -> None:
        """pkg/statusserver (Trainer v2.3.0) handleTrainJobRuntimeStatus: a projected token whose
        audience is this TrainJob's and whose namespace is its namespace, else 403 Forbidden; a body
        that is not an UpdateTrainJobStatusRequest: 422; `trainerStatus` applied to the TrainJob's
        status (validated against the CRD: 422 with the API server's message; 404 when the TrainJob
        is gone); the parsed request echoed back."""
        c = self.server.cluster

        def fail(code: int, message: str, reason: str) -> None:
            self._send(code, {"metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code})

        try:
            parts = (self.headers.get("Authorization") or "").split()
            token = parts[1] if len(parts) == 2 and parts[0].lower() == "bearer" else ""
            if c.token_claims(token) != (namespace, token_audience(namespace, name)):
                return fail(403, "Forbidden", "Forbidden")
            try:
                req = json.loads(body.decode() or "null")
                if not isinstance(req, dict) or not isinstance(req.get("trainerStatus") or {}, dict):
                    raise ValueError("not an object")
            except ValueError:
                return fail(422, "Invalid payload", "Invalid")
            req = {"trainerStatus": req["trainerStatus"]} if req.get("trainerStatus") is not None else {}
            if not req:
                return self._send(200, req)
            rt = c.catalog.by_kind("trainer.kubeflow.org", "TrainJob")
            with c.store.lock:
                job = c.store.get(rt.key, namespace, name) if rt else None
                if job is None:
                    return fail(404, "Train job not found", "NotFound")
                status = dict(job.get("status") or {}, trainerStatus=req["trainerStatus"])
                if "lastUpdatedTime" not in req["trainerStatus"]:  # the CRD's CEL rule
                    cause = FieldError(
                        "status.trainerStatus",
                        "Invalid value",
                        "lastUpdatedTime is required when trainerStatus is present",
                        value="object",
                    )
                    raise E.invalid(rt.group, rt.kind, name, [cause])
                cur = dict(job, status=status)
                cur["metadata"] = {k: v for k, v in job["metadata"].items() if k != "resourceVersion"}
                c.registry.update(rt, namespace, name, cur, Ctx(manager="trainer-status"), subresource="status")
            c.wake()
            self._send(200, req)
        except ApiError as err:
            if err.code in (400, 422):
                return fail(422, err.message, "Invalid")
            fail(404 if err.code == 404 else 500, "Train job not found" if err.code == 404 else "Internal error", "")
        except OSError:
            self.close_connection = True

    @staticmethod
    def _decode(body: bytes) -> Any:
        try:
            return json.loads(body.decode() or "null")
        except ValueError as e:
            raise E.bad_request(f"the body of the request could not be decoded: {e}") from None

    def _list(self, rt: ResourceType, version: str, namespace: str | None, query: dict[str, str]) -> None:
        c = self.server.cluster
        sel = Selector(query.get("labelSelector"), query.get("fieldSelector"), rt.plural)
        with c.store.lock:
            items, rv = c.registry.list(rt, namespace, sel, version), str(c.store.rv)
        for o in items:  # list items carry no apiVersion/kind
            o.pop("apiVersion", None)
            o.pop("kind", None)
        meta = {"resourceVersion": rv}
        self._send(
            200, {"kind": rt.kind + "List", "apiVersion": rt.api_version(version), "metadata": meta, "items": items}
        )

    # --- watch -----------------------------------------------------------------------------------

    def _watch(self, rt: ResourceType, version: str, namespace: str | None, query: dict[str, str]) -> None:
        """Newline-delimited JSON events: from `resourceVersion` on (410 Expired once it left the
        history), else ADDED for what exists first; an object that starts or stops matching the
        selectors is ADDED or DELETED, as the watch cache does. Ends at `timeoutSeconds`."""
        store, reg = self.server.cluster.store, self.server.cluster.registry
        sel = Selector(query.get("labelSelector"), query.get("fieldSelector"), rt.plural)
        deadline = time.monotonic() + float(query.get("timeoutSeconds") or 1800)
        ns = namespace if rt.namespaced else None

        def event(etype: str, obj: dict[str, Any]) -> bytes:
            return json.dumps({"type": etype, "object": reg.present(rt, json.loads(json.dumps(obj)), version)}).encode()

        def gone(pos: int) -> bytes:
            err = E.gone(f"too old resource version: {pos} ({store.compacted_rv + 1})")
            return json.dumps({"type": "ERROR", "object": err.status()}).encode()

        out: list[bytes] = []
        with store.lock:
            rv = query.get("resourceVersion")
            if rv not in (None, "", "0"):
                if not rv.isdigit():
                    raise E.bad_request(f"resourceVersion: Invalid value: {json.dumps(rv)}: must be a number")
                pos = int(rv)
            else:
                pos = store.rv
                out = [event("ADDED", o) for o in store.list(rt.key, ns) if sel.matches(o)]
        self._start_stream("application/json")
        try:
            while True:
                for line in out:
                    self._chunk(line + b"\n")
                if self.server.closing.is_set() or time.monotonic() >= deadline or self._client_gone():
                    break
                with store.lock:
                    if store.too_old(pos):
                        self._chunk(gone(pos) + b"\n")
                        break
                    changes = store.changes_after(pos, rt.key, ns)
                    if not changes:
                        store.changed.wait(min(0.25, max(0.0, deadline - time.monotonic())))
                        changes = store.changes_after(pos, rt.key, ns)
                    pos = changes[-1].rv if changes else pos
                out = []
                for ch in changes:
                    now_m, was_m = sel.matches(ch.obj), sel.matches(ch.prev)
                    if ch.type == "MODIFIED" and now_m != was_m:
                        out.append(event("ADDED" if now_m else "DELETED", ch.obj))
                    elif now_m or (ch.type == "DELETED" and was_m):
                        out.append(event(ch.type, ch.obj))
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            self.close_connection = True

    # --- logs ------------------------------------------------------------------------------------

    def _logs(self, namespace: str, name: str, query: dict[str, str]) -> None:
        def flag(k: str) -> bool:
            return query.get(k, "").lower() in ("true", "1")

        opts = {
            "container": query.get("container"),
            "follow": flag("follow"),
            "previous": flag("previous"),
            "timestamps": flag("timestamps"),
            "tailLines": int(query["tailLines"]) if query.get("tailLines") else None,
            "sinceSeconds": int(query["sinceSeconds"]) if query.get("sinceSeconds") else None,
        }
        stream = self.server.cluster.kubelet.logs(namespace, name, opts, self.server.closing)
        first = next(stream, None)  # raises ApiError before anything is sent
        if not opts["follow"]:
            return self._send(200, (first or b"") + b"".join(stream), "text/plain")
        self._start_stream("text/plain")
        try:
            if first:
                self._chunk(first)
            for chunk in stream:
                if chunk:
                    self._chunk(chunk)
                elif self._client_gone():
                    break
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            self.close_connection = True
