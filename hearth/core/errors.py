"""Errors that carry an HTTP status, a machine code and a hint to fix them.

Engines and core raise these; each dialect renders them in its own envelope.
"""

from __future__ import annotations


class HearthError(Exception):
    """Base class: a client-visible error with a status and a fix."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.retry_after = retry_after



def internal_error(exc: BaseException) -> HearthError:
    """The 500 a client gets for an unexpected exception (its class only: details go to the log)."""
    return HearthError(f"internal error ({type(exc).__name__}); the server log has details")

class BadRequest(HearthError):
    """The request is malformed or asks for something impossible (400)."""

    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(BadRequest):
    """Prompt (plus requested completion) does not fit the context (400)."""

    code = "context_length_exceeded"


class Unauthorized(HearthError):
    """No valid key (401)."""

    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(HearthError):
    """A valid key that may not do this (403)."""

    status = 403
    type = "permission_error"
    code = "forbidden"


class NotFound(HearthError):
    """Unknown model or resource (404)."""

    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class PayloadTooLarge(HearthError):
    """Request body over the configured limit (413)."""

    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class RateLimited(HearthError):
    """Queue full or quota exhausted (429); carries `retry_after` seconds."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class EngineUnavailable(HearthError):
    """The engine or upstream cannot serve right now (503)."""

    status = 503
    type = "server_error"
    code = "engine_unavailable"


class UpstreamError(HearthError):
    """An upstream answered wrongly (502)."""

    status = 502
    type = "server_error"
    code = "bad_upstream_response"
