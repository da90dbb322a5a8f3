"""The server's error answer: OpenAI's body ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from typing import ClassVar

from fastapi.responses import JSONResponse


class APIError(Exception):
    """An error answered with OpenAI's body ``{"error": {"message", "type", "param", "code"}}``."""

    TYPES: ClassVar[dict[int, str]] = {
        400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
        404: "not_found_error", 408: "invalid_request_error", 413: "invalid_request_error",
        415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
        503: "service_unavailable",
    }  # fmt: skip

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}  # fmt: skip

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status in (429, 503) else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)
