"""API errors as the real API server words them: every failure is a `Status` object.

The messages follow k8s.io/apimachinery/pkg/api/errors (NewNotFound, NewAlreadyExists, NewConflict,
NewInvalid, NewForbidden, ...) and the apiserver's handlers, so a client that matches on
`reason`, `code` or the message text sees what it would see against a real cluster.
"""

from __future__ import annotations

import json
from typing import Any


class ApiError(Exception):
    """An API failure; `status()` is the body the server answers with."""

    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
        }
        if self.reason:
            out["reason"] = self.reason
        if self.details is not None:
            out["details"] = self.details
        out["code"] = self.code
        return out

    def __repr__(self) -> str:
        return f"ApiError({self.code} {self.reason}: {self.message})"


def _details(group: str, resource: str, name: str | None = None, **extra: Any) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if name is not None:
        d["name"] = name
    if group:
        d["group"] = group
    d["kind"] = resource  # the real server puts the resource (plural) in details.kind
    d.update(extra)
    return d


def qualified(group: str, resource: str) -> str:
    return f"{resource}.{group}" if group else resource


def not_found(group: str, resource: str, name: str) -> ApiError:
    return ApiError(
        404, "NotFound", f'{qualified(group, resource)} "{name}" not found', _details(group, resource, name)
    )


def path_not_found() -> ApiError:
    return ApiError(404, "NotFound", "the server could not find the requested resource", {})


def already_exists(group: str, resource: str, name: str) -> ApiError:
    return ApiError(
        409, "AlreadyExists", f'{qualified(group, resource)} "{name}" already exists', _details(group, resource, name)
    )


def conflict(
    group: str,
    resource: str,
    name: str,
    why: str = "the object has been modified; please apply your changes to the latest version and try again",
) -> ApiError:
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {qualified(group, resource)} "{name}": {why}',
        _details(group, resource, name),
    )


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def unauthorized() -> ApiError:
    return ApiError(401, "Unauthorized", "Unauthorized")


def forbidden(group: str, resource: str, name: str | None, why: str) -> ApiError:
    q = qualified(group, resource)
    subject = f'{q} "{name}"' if name else q
    return ApiError(403, "Forbidden", f"{subject} is forbidden: {why}", _details(group, resource, name))


def rbac_forbidden(
    user: str, verb: str, group: str, resource: str, name: str | None, namespace: str | None
) -> ApiError:
    """What the RBAC authorizer says (staging/src/k8s.io/apiserver/pkg/endpoints/handlers/responsewriters/errors.go)."""
    where = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
    top = resource.split("/")[0]
    why = f'User "{user}" cannot {verb} resource "{resource}" in API group "{group}" {where}'
    return forbidden(group, top, name, why)


def gone(message: str) -> ApiError:
    return ApiError(410, "Expired", message)


def method_not_allowed() -> ApiError:
    return ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource", {})


def unsupported_media_type(content_type: str, accepted: list[str]) -> ApiError:
    return ApiError(
        415,
        "UnsupportedMediaType",
        f"the body of the request was in an unknown format - accepted media types include: {', '.join(accepted)}",
        {},
    )


def internal(message: str) -> ApiError:
    """A plain Go error turned into a Status (apierrors.ErrorToAPIStatus): code 500, no reason."""
    return ApiError(500, "", message)


# --- 422 Invalid ---------------------------------------------------------------------------------

CAUSE_REASONS = {
    "Invalid value": "FieldValueInvalid",
    "Required value": "FieldValueRequired",
    "Unsupported value": "FieldValueNotSupported",
    "Forbidden": "FieldValueForbidden",
    "Too long": "FieldValueTooLong",
    "Too many": "FieldValueTooMany",
    "Duplicate value": "FieldValueDuplicate",
}


def go_value(v: Any) -> str:
    """How field.Invalid prints a value: strings quoted, numbers bare, objects by type name."""
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if v is None:
        return "null"
    return '"object"' if isinstance(v, dict) else '"array"'


class FieldError:
    """One field.Error: `<field>: <kind>[: <value>][: <detail>]`."""

    def __init__(self, field: str, kind: str, detail: str = "", value: Any = ...):
        self.field = field
        self.kind = kind
        self.detail = detail
        self.value = value

    def body(self) -> str:
        parts = [self.kind]
        if self.value is not ...:
            parts.append(go_value(self.value))
        if self.detail:
            parts.append(self.detail)
        return ": ".join(parts)

    def __str__(self) -> str:
        return f"{self.field or '<nil>'}: {self.body()}"

    def cause(self) -> dict[str, Any]:
        return {
            "reason": CAUSE_REASONS.get(self.kind, "FieldValueInvalid"),
            "message": self.body(),
            "field": self.field or "<nil>",
        }


def invalid(group: str, kind: str, name: str, errors: list[FieldError]) -> ApiError:
    """apierrors.NewInvalid: `<Kind>[.<group>] "<name>" is invalid: <err>` or `[<err>, <err>]`."""
    qkind = f"{kind}.{group}" if group else kind
    texts = [str(e) for e in errors]
    agg = texts[0] if len(texts) == 1 else "[" + ", ".join(texts) + "]"
    details: dict[str, Any] = {"name": name} if name else {}
    if group:
        details["group"] = group
    details["kind"] = kind
    details["causes"] = [e.cause() for e in errors]
    return ApiError(422, "Invalid", f'{qkind} "{name}" is invalid: {agg}', details)


def unprocessable(server_message: str) -> ApiError:
    """apierrors.NewGenericServerResponse(422, ...): what a failing JSON patch gets."""
    return ApiError(
        422,
        "Invalid",
        "the server rejected our request due to an error in our request",
        {"causes": [{"reason": "UnexpectedServerResponse", "message": server_message}]},
    )
