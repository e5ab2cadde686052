"""Errors the API answers with, and the one middleware that formats them.

Every 4xx/5xx leaves as `{"error": {"code", "message", "details"}}`. Anything
unexpected is logged with its traceback and answered as a 500 with an error
id the operator can grep for; the traceback never reaches the client.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ClassVar

from aiohttp import web
from aiohttp.http import HttpProcessingError
from asyncpg.exceptions import (
    CannotConnectNowError,
    PostgresConnectionError,
)
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sdapi.infra.object_store import ObjectMissing, StoreUnavailable
from sdapi.infra.registry import NodesUnknown

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AppError(Exception):
    """An error with a public status, code and message."""

    status: ClassVar[int] = 400
    code: ClassVar[str] = "bad_request"
    default_message: ClassVar[str] = "The request is malformed."

    def __init__(
        self,
        message: str | None = None,
        *,
        details: Sequence[dict[str, Any]] = (),
        headers: dict[str, str] | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.details = list(details)
        self.headers = headers or {}
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "code": self.code,
                "message": self.message,
                "details": self.details,
            }
        }


class BadRequest(AppError):
    pass


class ValidationFailed(AppError):
    status = 422
    code = "validation_error"
    default_message = "The request has invalid fields."


def field_error(field: str, message: str) -> ValidationFailed:
    """A 422 about one field."""
    return ValidationFailed(details=[{"field": field, "message": message}])


class Unauthorized(AppError):
    status = 401
    code = "unauthorized"
    default_message = "Authentication is required: send a valid bearer token."

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="sdapi"'})


class Forbidden(AppError):
    status = 403
    code = "forbidden"
    default_message = "You may not do this."


class PremiumRequired(Forbidden):
    code = "premium_required"
    default_message = "This needs a premium account."


class EmailNotVerified(Forbidden):
    code = "email_not_verified"
    default_message = "Verify your email address first: follow the link we sent you."


class NotFound(AppError):
    status = 404
    code = "not_found"
    default_message = "Nothing here."


class MethodNotAllowed(AppError):
    status = 405
    code = "method_not_allowed"
    default_message = "This method is not allowed here."


class Conflict(AppError):
    status = 409
    code = "conflict"
    default_message = "This conflicts with the current state."


class Gone(AppError):
    status = 410
    code = "gone"
    default_message = "This is no longer available."


class ImageMissing(Gone):
    """An image whose row exists but whose store has no object: lost (a store
    wiped, or restored from an older backup) and not coming back, so a 410
    rather than a 5xx a client would retry."""

    code = "image_missing"
    default_message = "This image's file is missing from the image store."


class PayloadTooLarge(AppError):
    status = 413
    code = "payload_too_large"
    default_message = "The request body is too large."


def refuse_declared_oversize(request: web.Request) -> None:
    """413 at once for a body declared larger than the route takes
    (`client_max_size`, raised per route with `request.clone`): aiohttp would
    wait for that much body before it refused it."""
    length = request.content_length
    if length is not None and length > request.client_max_size:
        raise PayloadTooLarge(
            f"The request body is over {request.client_max_size} bytes."
        )


class RequestTimeout(AppError):
    status = 408
    code = "request_timeout"
    default_message = "The request was not sent in time; the connection is closed."


class _RetryLater(AppError):
    def __init__(self, message: str | None = None, *, retry_after: int) -> None:
        self.retry_after = max(1, retry_after)
        super().__init__(message, headers={"Retry-After": str(self.retry_after)})


class RateLimited(_RetryLater):
    status = 429
    code = "rate_limited"
    default_message = "Too many requests; try again later."


class QuotaExceeded(_RetryLater):
    status = 429
    code = "quota_exceeded"
    default_message = "Your daily image quota is spent."


class Unavailable(_RetryLater):
    status = 503
    code = "unavailable"
    default_message = "The service is unavailable right now; try again later."


class InternalError(AppError):
    status = 500
    code = "internal_error"
    default_message = "Something went wrong on our side."


class GenerationFailed(AppError):
    """A generation a caller waited for ended `failed` on the GPU node."""

    status = 502
    code = "generation_failed"
    default_message = "The generation failed."


class GatewayTimeout(AppError):
    status = 504
    code = "timeout"
    default_message = "The generation did not finish in time."


# PostgreSQL or Redis unreachable (restarting, failing over): a 503 to retry,
# not a 500. Builtin ConnectionError covers refused and reset connections and
# Tortoise's DBConnectionError.
DEPENDENCY_ERRORS: tuple[type[Exception], ...] = (
    ConnectionError,
    # A statement or command past its deadline (SDAPI_DB_TIMEOUT,
    # SDAPI_REDIS_TIMEOUT): the dependency is stalled, not the request wrong.
    TimeoutError,
    RedisConnectionError,
    RedisTimeoutError,
    PostgresConnectionError,
    CannotConnectNowError,
)
DEPENDENCY_RETRY_S = 5

# A body aiohttp could not parse as the client declared it: a multipart part's
# header with a control character (InvalidHeader), a gzip body that is not
# gzip (RequestPayloadError). The client's fault: a 400, never a 500.
MALFORMED_BODY_ERRORS: tuple[type[Exception], ...] = (
    HttpProcessingError,
    web.RequestPayloadError,
)


def malformed_body() -> BadRequest:
    """The 400 for a body that cannot be parsed as its headers say."""
    return BadRequest("The request body is malformed.")


def dependency_unavailable() -> Unavailable:
    """The 503 for a database or Redis that cannot be reached."""
    return Unavailable(
        "A database or queue is unreachable right now; try again shortly.",
        retry_after=DEPENDENCY_RETRY_S,
    )


def store_unavailable() -> Unavailable:
    """The 503 for an image store that is down or too slow (SDAPI_STORAGE_URL)."""
    return Unavailable(
        "The image store is unreachable right now; try again shortly.",
        retry_after=DEPENDENCY_RETRY_S,
    )


# nginx's status for "the client closed the connection before the answer":
# what the metrics count such requests as, apart from the server's errors.
CLIENT_CLOSED_STATUS = 499


def client_gone(request: web.Request, exc: BaseException) -> bool:
    """Whether `exc` is the client's connection ending (mid-body, say), not a
    dependency's."""
    transport = request.transport
    return isinstance(exc, ConnectionError) and (
        transport is None or transport.is_closing()
    )


def client_closed_response() -> web.Response:
    """What a request whose client left "answers": never sent, only counted."""
    return web.Response(status=CLIENT_CLOSED_STATUS, reason="Client Closed Request")


def validation_details(exc: ValidationError) -> list[dict[str, str]]:
    """One `{"field", "message"}` per bad field, as the contract says."""
    details = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or "body"
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "Unknown field."
        details.append({"field": field, "message": message})
    return details


def from_validation_error(exc: ValidationError) -> ValidationFailed:
    """The 422 for a pydantic error at the boundary."""
    return ValidationFailed(details=validation_details(exc))


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "bad_request",
    429: "rate_limited",
}

# Paths answered in the OpenAI API's error shape, so OpenAI clients understand
# them; every other path keeps the contract's own format.
OPENAI_PREFIX = "/v1/"


def openai_body(error: AppError) -> dict[str, Any]:
    """`error` in the OpenAI API's shape: {"error": {message, type, param, code}},
    plus the contract's `details`."""
    if error.status == 401:
        kind = "authentication_error"
    elif error.status == 403:
        kind = "permission_error"
    elif error.status == 429:
        kind = "insufficient_quota" if error.code == "quota_exceeded" else "requests"
    elif error.status >= 500:
        kind = "server_error"
    else:
        kind = "invalid_request_error"
    param = error.details[0].get("field") if error.details else None
    # OpenAI's clients show the message only: the fields go into it too. They
    # ignore keys they do not know, so `details` comes along as everywhere.
    message = " ".join(
        [error.message]
        + [f"{d.get('field', 'body')}: {d.get('message', '')}" for d in error.details]
    )
    return {
        "error": {
            "message": message,
            "type": kind,
            "param": param,
            "code": error.code,
            "details": error.details,
        }
    }


# Paths answered in the AUTOMATIC1111 API's shapes (FastAPI's for invalid
# fields), so A1111 clients understand them.
A1111_PREFIX = "/sdapi/"


def a1111_body(error: AppError) -> dict[str, Any]:
    """`error` as A1111 answers it: FastAPI's `{"detail": [{loc, msg, type}]}`
    for invalid fields, else its handler's `{error, detail, body, errors}`,
    plus the contract's `code`."""
    if error.status == 422 and error.details:
        return {
            "detail": [
                {
                    "loc": ["body", *str(d.get("field", "body")).split(".")],
                    "msg": d.get("message", ""),
                    "type": "value_error",
                }
                for d in error.details
            ]
        }
    return {
        "error": "HTTPException",
        "detail": error.message,
        "body": "",
        "errors": f"{error.status}: {error.message}",
        "code": error.code,
    }


def error_response(error: AppError, request: web.Request | None = None) -> web.Response:
    """The JSON response for `error` (OpenAI's shape under /v1/, A1111's under
    /sdapi/)."""
    if request is not None and request.path.startswith(A1111_PREFIX):
        return web.json_response(
            a1111_body(error), status=error.status, headers=error.headers
        )
    if request is not None and request.path.startswith(OPENAI_PREFIX):
        # OpenAI answers invalid parameters with 400, never 422.
        status = 400 if error.status == 422 else error.status
        return web.json_response(
            openai_body(error), status=status, headers=error.headers
        )
    return web.json_response(error.body(), status=error.status, headers=error.headers)


def _from_http_exception(exc: web.HTTPException) -> AppError:
    if exc.status == 413:
        error: AppError = PayloadTooLarge()
    elif exc.status == 404:
        error = NotFound()
    elif exc.status == 405:
        error = MethodNotAllowed()
    else:
        error = AppError(exc.reason)
        error.status = exc.status  # type: ignore[misc]
        error.code = _HTTP_CODES.get(exc.status, "error")  # type: ignore[misc]
    for name in ("Allow", "Retry-After", "WWW-Authenticate"):
        if name in exc.headers:
            error.headers[name] = exc.headers[name]
    return error


@web.middleware
async def error_middleware(
    request: web.Request, handler: Handler
) -> web.StreamResponse:
    """Turn every error into the contract's JSON error format."""
    try:
        return await handler(request)
    except AppError as exc:
        return error_response(exc, request)
    # A pydantic ValidationError is not caught here: the boundaries turn the
    # client's into 422s (web.openapi); one that gets here is our own bug.
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(_from_http_exception(exc), request)
    except MALFORMED_BODY_ERRORS as exc:
        # Only the type: the text can quote the client's bytes.
        log.info(
            "%s %s: malformed body (%s)",
            request.method,
            request.path,
            type(exc).__name__,
        )
        return error_response(malformed_body(), request)
    except NodesUnknown as exc:
        return error_response(
            Unavailable(
                "The list of GPU nodes cannot be read right now.",
                retry_after=exc.retry_after_s,
            ),
            request,
        )
    except StoreUnavailable:
        log.warning(
            "%s %s: the image store is unreachable",
            request.method,
            request.path,
            exc_info=True,
        )
        return error_response(store_unavailable(), request)
    except ObjectMissing as exc:
        log.error(
            "%s %s: image object %s is missing", request.method, request.path, exc
        )
        return error_response(ImageMissing(), request)
    except DEPENDENCY_ERRORS as exc:
        if client_gone(request, exc):
            # Anyone can do this at will: not an outage, nor worth a traceback.
            log.info(
                "%s %s: the client went away (%s)",
                request.method,
                request.path,
                type(exc).__name__,
            )
            return client_closed_response()
        log.warning(
            "%s %s: a dependency is unreachable",
            request.method,
            request.path,
            exc_info=True,
        )
        return error_response(dependency_unavailable(), request)
    except Exception:
        error_id = uuid.uuid4().hex
        log.exception(
            "unhandled error %s on %s %s", error_id, request.method, request.path
        )
        return error_response(
            InternalError(f"Something went wrong on our side (error id {error_id})."),
            request,
        )
