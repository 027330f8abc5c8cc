"""The service's exception tree and its single mapping to HTTP (`{"error": {message, type, code}}`)."""

from __future__ import annotations

from dataclasses import dataclass

import lokr

__all__ = [
    "AdapterBusyError",
    "AuthError",
    "BadRequestError",
    "ConflictError",
    "ContextLengthError",
    "EngineError",
    "ForbiddenError",
    "HttpError",
    "NotFoundError",
    "NotReadyError",
    "OverloadedError",
    "PayloadTooLargeError",
    "ServiceError",
    "http_error_for",
]


class ServiceError(Exception):
    """Base of the service's own errors; each subclass fixes its HTTP status, type and code."""

    status = 500
    type = "server_error"
    code = "internal_error"
    headers: dict[str, str] | None = None

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class BadRequestError(ServiceError):
    status, type, code = 400, "invalid_request_error", "invalid_request"


class ContextLengthError(BadRequestError):
    code = "context_length_exceeded"


class ClientGoneError(ServiceError):
    """The client closed the connection and its work was cancelled (nobody reads this answer)."""

    status, type, code = 499, "invalid_request_error", "client_closed_request"


class AuthError(ServiceError):
    status, type, code = 401, "authentication_error", "invalid_api_key"
    headers = {"WWW-Authenticate": "Bearer"}


class ForbiddenError(ServiceError):
    status, type, code = 403, "permission_error", "forbidden"


class NotFoundError(ServiceError):
    status, type, code = 404, "not_found_error", "not_found"


class ConflictError(ServiceError):
    status, type, code = 409, "conflict_error", "conflict"


class PayloadTooLargeError(ServiceError):
    status, type, code = 413, "invalid_request_error", "payload_too_large"


class OverloadedError(ServiceError):
    status, type, code = 503, "overloaded_error", "queue_full"
    headers = {"Retry-After": "1"}


class NotReadyError(ServiceError):
    status, type, code = 503, "unavailable_error", "not_ready"
    headers = {"Retry-After": "5"}


class AdapterUnavailableError(ServiceError):
    """A registered adapter could not be brought back into memory (its file gone or broken): the server's fault,
    not the request's; the adapter stays registered and the next request tries again."""

    status, type, code = 503, "unavailable_error", "adapter_unavailable"
    headers = {"Retry-After": "5"}


class AdapterBusyError(ServiceError):
    status, type, code = 409, "conflict_error", "adapter_busy"


class EngineError(ServiceError):
    """A forward pass failed; only the requests of that batch see it."""

    status, type, code = 500, "server_error", "engine_error"


@dataclass(frozen=True)
class HttpError:
    status: int
    type: str
    code: str
    message: str
    headers: dict[str, str] | None = None

    def body(self) -> dict[str, dict[str, str]]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code}}


def http_error_for(exc: BaseException) -> HttpError:
    """The one place where exceptions become HTTP errors."""
    if isinstance(exc, ServiceError):
        return HttpError(exc.status, exc.type, exc.code, exc.message, exc.headers)
    if isinstance(exc, lokr.AdapterNotFoundError):
        return HttpError(404, "not_found_error", "adapter_not_found", str(exc))
    if isinstance(exc, lokr.AdapterExistsError):
        return HttpError(409, "conflict_error", "adapter_exists", str(exc))
    if isinstance(exc, lokr.UnsupportedAdapterError):
        return HttpError(400, "invalid_request_error", "unsupported_adapter", str(exc))
    if isinstance(exc, lokr.TargetError):
        return HttpError(400, "invalid_request_error", "adapter_incompatible", str(exc))
    if isinstance(exc, (lokr.AdapterFormatError, lokr.ConfigError)):
        return HttpError(400, "invalid_request_error", "invalid_adapter", str(exc))
    if isinstance(exc, lokr.LoKrError):
        return HttpError(400, "invalid_request_error", "adapter_error", str(exc))
    return HttpError(500, "server_error", "internal_error", "internal server error; see the server log")
