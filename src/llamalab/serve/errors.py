"""OpenAI's error body, as one exception the routes and the middleware raise."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from llamalab.serve import schemas as s

RETRY_AFTER_S = 1  # what a 503 tells the client to wait before it tries again


class APIError(Exception):
    """An error to report to the client as OpenAI's JSON error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = (
            status,
            message,
            type_,
            code,
            param,
        )
        self.headers = headers

    def response(self) -> JSONResponse:
        """The error as a JSON response."""
        return JSONResponse(
            s.error_body(self.message, self.type, self.code, self.param),
            status_code=self.status,
            headers=self.headers,
        )


def unavailable(message: str, code: str) -> APIError:
    """A 503 that tells the client when to try again."""
    return APIError(
        503,
        message,
        type_="server_error",
        code=code,
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )
