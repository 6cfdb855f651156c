"""API errors as the real API server words them: every failure is a `Status` object.

The messages follow k8s.io/apimachinery/pkg/api/errors (NewNotFound, NewAlreadyExists, NewConflict,
NewInvalid, NewForbidden, ...), so a client that matches on `reason`, `code` or the message text
(ctrlnet does: 404 "namespaces ... not found", 409 "conflict with \"<manager>\"") sees what it would
see against a real cluster.
"""

from __future__ import annotations

import json
from typing import Any


class ApiError(Exception):
    """An API failure; `status()` is the body the server answers with."""

    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure"}
        out["message"] = self.message
        if self.reason:
            out["reason"] = self.reason
        if self.details is not None:
            out["details"] = self.details
        out["code"] = self.code
        return out

    def __repr__(self) -> str:
        return f"ApiError({self.code} {self.reason}: {self.message})"


def _details(group: str, resource: str, name: str | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {} if name is None else {"name": name}
    if group:
        d["group"] = group
    d["kind"] = resource  # the real server puts the resource (plural) in details.kind
    return d


def _qualified(group: str, resource: str) -> str:
    return f"{resource}.{group}" if group else resource


def not_found(group: str, resource: str, name: str) -> ApiError:
    msg = f'{_qualified(group, resource)} "{name}" not found'
    return ApiError(404, "NotFound", msg, _details(group, resource, name))


def path_not_found() -> ApiError:
    return ApiError(404, "NotFound", "the server could not find the requested resource", {})


def already_exists(group: str, resource: str, name: str) -> ApiError:
    msg = f'{_qualified(group, resource)} "{name}" already exists'
    return ApiError(409, "AlreadyExists", msg, _details(group, resource, name))


def conflict(group: str, resource: str, name: str) -> ApiError:
    why = "the object has been modified; please apply your changes to the latest version and try again"
    msg = f'Operation cannot be fulfilled on {_qualified(group, resource)} "{name}": {why}'
    return ApiError(409, "Conflict", msg, _details(group, resource, name))


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def unauthorized() -> ApiError:
    return ApiError(401, "Unauthorized", "Unauthorized")


def rbac_forbidden(
    user: str, verb: str, group: str, resource: str, name: str | None, namespace: str | None
) -> ApiError:
    """What the RBAC authorizer says (apiserver/pkg/endpoints/handlers/responsewriters/errors.go)."""
    where = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
    top = resource.split("/")[0]
    subject = f'{_qualified(group, top)} "{name}"' if name else _qualified(group, top)
    why = f'User "{user}" cannot {verb} resource "{resource}" in API group "{group}" {where}'
    return ApiError(403, "Forbidden", f"{subject} is forbidden: {why}", _details(group, top, name))


def gone(message: str) -> ApiError:
    return ApiError(410, "Expired", message)


def method_not_allowed() -> ApiError:
    return ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource", {})


def unsupported_media_type(accepted: list[str]) -> ApiError:
    msg = f"the body of the request was in an unknown format - accepted media types include: {', '.join(accepted)}"
    return ApiError(415, "UnsupportedMediaType", msg, {})


def internal(message: str) -> ApiError:
    """A plain Go error turned into a Status (apierrors.ErrorToAPIStatus): code 500, no reason."""
    return ApiError(500, "", message)


# --- 422 Invalid ---------------------------------------------------------------------------------

CAUSE_REASONS = {
    "Invalid value": "FieldValueInvalid",
    "Required value": "FieldValueRequired",
    "Unsupported value": "FieldValueNotSupported",
    "Forbidden": "FieldValueForbidden",
}


def go_value(v: Any) -> str:
    """How field.Invalid prints a value: strings quoted, numbers bare, objects by type name."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (str, int, float)):
        return json.dumps(v) if isinstance(v, str) else str(v)
    return "null" if v is None else ('"object"' if isinstance(v, dict) else '"array"')


class FieldError:
    """One field.Error: `<field>: <kind>[: <value>][: <detail>]`."""

    def __init__(self, field: str, kind: str, detail: str = "", value: Any = ...):
        self.field, self.kind, self.detail, self.value = field, kind, detail, value

    def body(self) -> str:
        parts = [self.kind] + ([go_value(self.value)] if self.value is not ... else []) + [self.detail]
        return ": ".join(p for p in parts if p)

    def __str__(self) -> str:
        return f"{self.field or '<nil>'}: {self.body()}"

    def cause(self) -> dict[str, Any]:
        reason = CAUSE_REASONS.get(self.kind, "FieldValueInvalid")
        return {"reason": reason, "message": self.body(), "field": self.field or "<nil>"}


def invalid(group: str, kind: str, name: str, errors: list[FieldError]) -> ApiError:
    """apierrors.NewInvalid: `<Kind>[.<group>] "<name>" is invalid: <err>` or `[<err>, <err>]`."""
    texts = [str(e) for e in errors]
    agg = texts[0] if len(texts) == 1 else "[" + ", ".join(texts) + "]"
    details: dict[str, Any] = {"name": name} if name else {}
    if group:
        details["group"] = group
    details.update(kind=kind, causes=[e.cause() for e in errors])
    return ApiError(422, "Invalid", f'{kind}{"." + group if group else ""} "{name}" is invalid: {agg}', details)
