"""The HTTP face of the loopback API server: routing, authentication, the RBAC stand-in,
content negotiation (JSON, and meta.k8s.io Tables for kubectl), watch streams and pod logs."""

from __future__ import annotations

import base64
import json
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlparse

import yaml

from . import errors as E
from .errors import ApiError
from .registry import Ctx
from .resources import ResourceType
from .selectors import fields_match, labels_match, parse_field_selector, parse_label_selector

if TYPE_CHECKING:
    from .cluster import LoopbackCluster

VERB_BY_METHOD = {"POST": "create", "PUT": "update", "PATCH": "patch"}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, addr: tuple[str, int], handler: type, cluster: LoopbackCluster):
        self.cluster = cluster
        self.conn_lock = threading.Lock()
        self.conns: dict[socket.socket, threading.Thread] = {}
        self.closing = threading.Event()
        super().__init__(addr, handler)

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


def _q(query: dict[str, list[str]], key: str, default: str | None = None) -> str | None:
    v = query.get(key)
    return v[-1] if v else default


def _bool(v: str | None) -> bool:
    return (v or "").lower() in ("true", "1")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    error_content_type = "application/json"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        if self.server.cluster.verbose:
            super().log_message(format, *args)

    # --- plumbing --------------------------------------------------------------------------------

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(
        self, code: int, body: Any, content_type: str = "application/json", warnings: list[str] | None = None
    ) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Audit-Id", "loopback")
        for w in warnings or []:
            self.send_header("Warning", f"299 - {json.dumps(w)}")
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, err: ApiError) -> None:
        self._send(err.code, err.status())

    def _start_stream(self, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache, private")
        self.end_headers()
        self.wfile.flush()

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _end_stream(self) -> None:
        try:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            pass

    def _client_gone(self) -> bool:
        """The client closed a streaming connection (checked between events)."""
        sock = self.connection
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            if not readable or isinstance(sock, ssl.SSLSocket):
                return False
            return sock.recv(1, socket.MSG_PEEK) == b""
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
        query = parse_qs(url.query, keep_blank_values=True)
        path = url.path.rstrip("/") or "/"
        body = self._body() if method in ("POST", "PUT", "PATCH", "DELETE") else b""
        try:
            if path in ("/healthz", "/livez", "/readyz") and "Authorization" not in self.headers:
                self._send(200, b"ok", "text/plain; charset=utf-8")
                return
            auth = self.headers.get("Authorization", "")
            if auth != f"Bearer {c.token}":
                raise E.unauthorized()
            if c.request_hook is not None:
                c.request_hook(method, self.path)
            self._route(method, path, query, body)
        except ApiError as err:
            self._send_error(err)
        except OSError:  # the client went away (incl. TLS errors): not a bug of the stand-in
            self.close_connection = True
        except Exception as exc:  # a bug in the stand-in: answer like an apiserver panic would
            if c.verbose:
                import traceback

                traceback.print_exc()
            c.server_errors.append(exc)
            try:
                self._send_error(E.internal(f"loopback API server error: {exc!r}"))
            except OSError:
                pass

    def _route(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> None:
        c = self.server.cluster
        cat = c.catalog
        parts = [unquote(p) for p in path.strip("/").split("/")] if path != "/" else []
        if method == "GET":
            if path == "/version":
                return self._send(200, cat.version())
            if path in ("/healthz", "/livez", "/readyz"):
                return self._send(200, b"ok", "text/plain; charset=utf-8")
            if path == "/api":
                return self._send(200, cat.api_versions())
            if path == "/api/v1":
                return self._send(200, cat.resource_list("", "v1"))
            if path == "/apis":
                return self._send(200, cat.api_group_list())
            if len(parts) == 2 and parts[0] == "apis":
                doc = cat.api_group(parts[1])
                if doc is None:
                    raise E.path_not_found()
                return self._send(200, doc)
            if len(parts) == 3 and parts[0] == "apis":
                doc = cat.resource_list(parts[1], parts[2])
                if doc is None:
                    raise E.path_not_found()
                return self._send(200, doc)
        if len(parts) >= 3 and parts[0] == "api" and parts[1] == "v1":
            group, version, rest = "", "v1", parts[2:]
        elif len(parts) >= 4 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise E.path_not_found()
        watch_path = False
        if rest and rest[0] == "watch":
            watch_path, rest = True, rest[1:]
        namespace = None
        if len(rest) >= 3 and rest[0] == "namespaces" and not (len(rest) == 3 and rest[2] in ("status", "finalize")):
            namespace, rest = rest[1], rest[2:]
        plural = rest[0] if rest else ""
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else ""
        if len(rest) > 3 or not plural:
            raise E.path_not_found()
        rt = cat.lookup(group, version, plural)
        if (
            rt is None
            or (rt.namespaced and namespace is None and name is not None)
            or (not rt.namespaced and namespace is not None)
            or (sub and sub not in rt.subresources)
        ):
            raise E.path_not_found()
        watch = watch_path or _bool(_q(query, "watch"))
        verb = self._verb(method, name, watch)
        resource = f"{plural}/{sub}" if sub else plural
        c.authorize(verb, group, resource, name, namespace)
        ctx = Ctx(
            manager=_q(query, "fieldManager") or self._ua_manager(method),
            dry_run=self._dry_run(query, method),
            field_validation=self._field_validation(query, method),
        )
        ns = namespace or ""
        reg = c.registry
        if sub == "log":
            if method != "GET":
                raise E.method_not_allowed()
            return self._logs(ns, name or "", query)
        if method == "GET":
            if watch:
                return self._watch(rt, version, namespace, name, query)
            if name is None:
                return self._list(rt, version, namespace, query)
            obj = reg.get(rt, ns, name, version)
            return self._send(200, self._maybe_table(rt, version, [obj], single=True) or obj)
        if method == "POST":
            if name is not None or (rt.namespaced and namespace is None):
                raise E.method_not_allowed()
            obj = reg.create(rt, ns, self._decode(body), ctx, version)
            return self._send(201, obj, warnings=ctx.warnings)
        if method == "PUT":
            if name is None:
                raise E.method_not_allowed()
            obj = reg.update(rt, ns, name, self._decode(body), ctx, subresource=sub, version=version)
            return self._send(200, obj, warnings=ctx.warnings)
        if method == "PATCH":
            if name is None:
                raise E.method_not_allowed()
            force_q = _q(query, "force")
            force = None if force_q is None else _bool(force_q)
            if not _q(query, "fieldManager"):
                ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
                ctx.manager = "" if ctype == "application/apply-patch+yaml" else ctx.manager
            obj, created = reg.patch(
                rt,
                ns,
                name,
                self.headers.get("Content-Type", ""),
                body,
                ctx,
                subresource=sub,
                force=force,
                version=version,
            )
            return self._send(201 if created else 200, obj, warnings=ctx.warnings)
        if method == "DELETE":
            opts = json.loads(body) if body.strip() else {}
            propagation = _q(query, "propagationPolicy") or opts.get("propagationPolicy")
            if propagation is None and "orphanDependents" in opts:
                propagation = "Orphan" if opts["orphanDependents"] else "Background"
            grace_q = _q(query, "gracePeriodSeconds")
            grace = int(grace_q) if grace_q not in (None, "") else opts.get("gracePeriodSeconds")
            if opts.get("dryRun"):
                ctx.dry_run = ctx.dry_run or opts["dryRun"] == ["All"]
            if name is None:
                return self._delete_collection(rt, version, namespace, query, ctx, propagation, grace)
            code, out = reg.delete(
                rt,
                ns,
                name,
                ctx,
                propagation=propagation,
                grace=grace,
                preconditions=opts.get("preconditions"),
                version=version,
            )
            c.wake()
            return self._send(code, out)
        raise E.method_not_allowed()

    @staticmethod
    def _verb(method: str, name: str | None, watch: bool) -> str:
        if method == "GET":
            return "watch" if watch else ("get" if name else "list")
        if method == "DELETE":
            return "delete" if name else "deletecollection"
        return VERB_BY_METHOD.get(method, method.lower())

    def _ua_manager(self, method: str) -> str:
        ua = self.headers.get("User-Agent", "") or "unknown"
        return ua.split("/")[0][:128]

    OPTIONS_KIND = {"POST": "CreateOptions", "PUT": "UpdateOptions", "PATCH": "PatchOptions", "DELETE": "DeleteOptions"}

    def _dry_run(self, query: dict[str, list[str]], method: str) -> bool:
        vals = query.get("dryRun") or []
        for v in vals:
            if v != "All":
                raise E.invalid(
                    "meta.k8s.io",
                    self.OPTIONS_KIND.get(method, "CreateOptions"),
                    "",
                    [E.FieldError("dryRun", "Unsupported value", 'supported values: "All"', value=v)],
                )
        return bool(vals)

    def _field_validation(self, query: dict[str, list[str]], method: str) -> str:
        v = _q(query, "fieldValidation") or ""
        if v not in ("", "Ignore", "Warn", "Strict"):
            raise E.invalid(
                "meta.k8s.io",
                self.OPTIONS_KIND.get(method, "CreateOptions"),
                "",
                [
                    E.FieldError(
                        "fieldValidation",
                        "Unsupported value",
                        'supported values: "", "Ignore", "Strict", "Warn"',
                        value=v,
                    )
                ],
            )
        return v or "Warn"

    def _decode(self, body: bytes) -> Any:
        ctype = (self.headers.get("Content-Type") or "application/json").split(";")[0].strip()
        try:
            if "yaml" in ctype:
                return yaml.safe_load(body.decode())
            return json.loads(body.decode() or "null")
        except (ValueError, yaml.YAMLError) as e:
            raise E.bad_request(f"the body of the request could not be decoded: {e}") from None

    # --- lists, tables ---------------------------------------------------------------------------

    def _list(self, rt: ResourceType, version: str, namespace: str | None, query: dict[str, list[str]]) -> None:
        c = self.server.cluster
        with c.store.lock:
            items = c.registry.list(rt, namespace, _q(query, "labelSelector"), _q(query, "fieldSelector"), version)
            rv = str(c.store.rv)
        meta: dict[str, Any] = {"resourceVersion": rv}
        limit = int(_q(query, "limit") or 0)
        cont = _q(query, "continue")
        if cont:
            try:
                token = json.loads(base64.b64decode(cont))
                start = tuple(token["start"])
                meta["resourceVersion"] = token["rv"]
            except (ValueError, KeyError, TypeError):
                raise E.bad_request("continue key is not valid: illegal base64 data") from None
            items = [o for o in items if (o["metadata"].get("namespace", ""), o["metadata"]["name"]) > start]
        if limit and len(items) > limit:
            last = items[limit - 1]["metadata"]
            meta["continue"] = base64.b64encode(
                json.dumps({"rv": meta["resourceVersion"], "start": [last.get("namespace", ""), last["name"]]}).encode()
            ).decode()
            meta["remainingItemCount"] = len(items) - limit
            items = items[:limit]
        table = self._maybe_table(rt, version, items, meta=meta)
        if table is not None:
            return self._send(200, table)
        for o in items:
            o.pop("apiVersion", None)
            o.pop("kind", None)
        self._send(200, {"kind": rt.list_kind, "apiVersion": rt.api_version(version), "metadata": meta, "items": items})

    def _maybe_table(
        self,
        rt: ResourceType,
        version: str,
        items: list[dict[str, Any]],
        single: bool = False,
        meta: dict[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        accept = self.headers.get("Accept", "")
        if "as=Table" not in accept:
            return None
        from .tables import to_table

        return to_table(rt, version, items, meta or {"resourceVersion": str(self.server.cluster.store.rv)})

    def _delete_collection(
        self,
        rt: ResourceType,
        version: str,
        namespace: str | None,
        query: dict[str, list[str]],
        ctx: Ctx,
        propagation: str | None,
        grace: int | None,
    ) -> None:
        c = self.server.cluster
        items = c.registry.list(rt, namespace, _q(query, "labelSelector"), _q(query, "fieldSelector"), version)
        out = []
        for o in items:
            try:
                _, d = c.registry.delete(
                    rt,
                    o["metadata"].get("namespace", ""),
                    o["metadata"]["name"],
                    ctx,
                    propagation=propagation,
                    grace=grace,
                    version=version,
                )
            except ApiError as err:
                if err.code == 404:
                    continue
                raise
            d.pop("apiVersion", None)
            d.pop("kind", None)
            out.append(d)
        c.wake()
        self._send(
            200,
            {
                "kind": rt.list_kind,
                "apiVersion": rt.api_version(version),
                "metadata": {"resourceVersion": str(c.store.rv)},
                "items": out,
            },
        )

    # --- watch -----------------------------------------------------------------------------------

    def _watch(
        self, rt: ResourceType, version: str, namespace: str | None, name: str | None, query: dict[str, list[str]]
    ) -> None:
        c = self.server.cluster
        store = c.store
        lreqs = parse_label_selector(_q(query, "labelSelector"))
        fsel = _q(query, "fieldSelector")
        if name:
            fsel = f"metadata.name={name}" + (f",{fsel}" if fsel else "")
        freqs = parse_field_selector(fsel, rt.group, rt.plural, rt.custom)
        timeout = _q(query, "timeoutSeconds")
        deadline = time.monotonic() + (float(timeout) if timeout else 1800.0)
        rv_q = _q(query, "resourceVersion")
        bookmarks = _bool(_q(query, "allowWatchBookmarks"))

        def matches(obj: dict[str, Any] | None) -> bool:
            return (
                obj is not None
                and labels_match(lreqs, obj["metadata"].get("labels"))
                and fields_match(freqs, obj, rt.group, rt.plural)
            )

        def encode(etype: str, obj: dict[str, Any]) -> bytes:
            obj = c.registry.present(rt, json.loads(json.dumps(obj)), version)
            return json.dumps({"type": etype, "object": obj}).encode() + b"\n"

        initial: list[bytes] = []
        with store.lock:
            if rv_q not in (None, "", "0"):
                try:
                    pos = int(rv_q)
                except ValueError:
                    raise E.bad_request(
                        f"resourceVersion: Invalid value: {json.dumps(rv_q)}: must be a number"
                    ) from None
                if store.too_old(pos):
                    gone = E.gone(f"too old resource version: {pos} ({store.compacted_rv + 1})")
                    self._start_stream("application/json")
                    self._chunk(json.dumps({"type": "ERROR", "object": gone.status()}).encode() + b"\n")
                    self._end_stream()
                    return
            else:
                pos = store.rv
                for obj in store.list(rt.key, namespace if rt.namespaced else None):
                    if matches(obj):
                        initial.append(encode("ADDED", obj))
        self._start_stream("application/json")
        try:
            for line in initial:
                self._chunk(line)
            last_bookmark = time.monotonic()
            while not self.server.closing.is_set() and time.monotonic() < deadline and not self._client_gone():
                with store.lock:
                    changes = store.changes_after(pos, rt.key, namespace if rt.namespaced else None)
                    if not changes:
                        store.changed.wait(min(0.25, max(0.0, deadline - time.monotonic())))
                        changes = store.changes_after(pos, rt.key, namespace if rt.namespaced else None)
                    if store.too_old(pos):
                        gone = E.gone(f"too old resource version: {pos} ({store.compacted_rv + 1})")
                        self._chunk(json.dumps({"type": "ERROR", "object": gone.status()}).encode() + b"\n")
                        break
                    if changes:
                        pos = changes[-1].rv
                    current_rv = store.rv
                out = []
                for ch in changes:
                    now_m, was_m = matches(ch.obj), matches(ch.prev)
                    if ch.type == "ADDED" and now_m:
                        out.append(encode("ADDED", ch.obj))
                    elif ch.type == "MODIFIED":
                        if now_m and was_m:
                            out.append(encode("MODIFIED", ch.obj))
                        elif now_m:
                            out.append(encode("ADDED", ch.obj))
                        elif was_m:
                            out.append(encode("DELETED", ch.obj))
                    elif ch.type == "DELETED" and (now_m or was_m):
                        out.append(encode("DELETED", ch.obj))
                for line in out:
                    self._chunk(line)
                if bookmarks and time.monotonic() - last_bookmark > 1.0:
                    last_bookmark = time.monotonic()
                    bm = {
                        "kind": rt.kind,
                        "apiVersion": rt.api_version(version),
                        "metadata": {"resourceVersion": str(max(pos, current_rv))},
                    }
                    self._chunk(json.dumps({"type": "BOOKMARK", "object": bm}).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True
            return
        self._end_stream()

    # --- logs ------------------------------------------------------------------------------------

    def _logs(self, namespace: str, name: str, query: dict[str, list[str]]) -> None:
        c = self.server.cluster
        opts = {
            "container": _q(query, "container"),
            "follow": _bool(_q(query, "follow")),
            "previous": _bool(_q(query, "previous")),
            "timestamps": _bool(_q(query, "timestamps")),
            "tailLines": int(_q(query, "tailLines")) if _q(query, "tailLines") else None,
            "sinceSeconds": int(_q(query, "sinceSeconds")) if _q(query, "sinceSeconds") else None,
            "sinceTime": _q(query, "sinceTime"),
            "limitBytes": int(_q(query, "limitBytes")) if _q(query, "limitBytes") else None,
        }
        stream: Iterator[bytes] = c.pod_logs(namespace, name, opts, self.server.closing)
        first = next(stream, None)  # raises ApiError before anything is sent
        if not opts["follow"]:
            data = (first or b"") + b"".join(stream)
            return self._send(200, data, "text/plain")
        self._start_stream("text/plain")
        try:
            if first:
                self._chunk(first)
            for chunk in stream:
                if chunk:
                    self._chunk(chunk)
                elif self._client_gone():
                    break
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True
            return
        self._end_stream()


def parse_time(s: str) -> float:
    s = s.replace("Z", "+00:00")
    if "." in s:
        head, frac = s.split(".", 1)
        digits = "".join(ch for ch in frac if ch.isdigit())
        tz = frac[len(digits) :]
        s = f"{head}.{digits[:6]}{tz}"
    return datetime.fromisoformat(s).astimezone(UTC).timestamp()
