"""vLLM-style error responses.

Body shape (vLLM's current OpenAI server)::

    {"error": {"message": "...", "type": "BadRequestError", "param": null, "code": 400}}

``type`` is the OpenAI SDK exception name for the status (BadRequestError, NotFoundError, ...).
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    409: "ConflictError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    501: "NotImplementedError",
    503: "ServiceUnavailableError",
}


def error_type(status: int) -> str:
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    return "InternalServerError" if status >= 500 else "BadRequestError"


class ApiError(Exception):
    """Raised anywhere in request handling; the server turns it into a JSON error response."""

    def __init__(self, status: int, message: str, *, param: str | None = None, err_type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.err_type = err_type or error_type(status)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.err_type, "param": self.param, "code": self.status}}


def status_error(status: int) -> ApiError:
    """The error for a forced status (``X-Return-Error``)."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    return ApiError(status, f"{phrase} (forced by X-Return-Error)")


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def model_not_found(model: str) -> ApiError:
    return ApiError(404, f"The model `{model}` does not exist.", param="model")


def context_length_exceeded(max_model_len: int, prompt_tokens: int, max_tokens: int | None) -> ApiError:
    if max_tokens is None:
        message = (
            f"This model's maximum context length is {max_model_len} tokens. However, your request has "
            f"{prompt_tokens} input tokens. Please reduce the length of the input messages."
        )
    else:
        message = (
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
            "completion). Please reduce the length of the messages or completion."
        )
    return ApiError(400, message, param="input_tokens")
