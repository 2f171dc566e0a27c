"""One error type for the whole service: JSON for the API, a message on the page."""

from __future__ import annotations


class ServiceError(Exception):
    """An expected failure with an HTTP status, a stable code and a human message."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def as_json(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}


class BodyTooLarge(ServiceError):
    """A request body past the service's limit, refused while it streams in."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, "upload_too_large", f"the upload is larger than this service accepts "
                                                  f"({limit / 1024 / 1024:.0f} MB in one request)")


class LoginRequired(Exception):
    """A page needs a logged-in user: answered with a redirect to the log-in page."""


def refuse_nul(texts) -> None:
    """A 400 when any of ``texts`` holds a NUL character (no database text column takes one: PostgreSQL refuses
    it, and a request that reached the database with one answered 500)."""
    if any("\x00" in text for text in texts if isinstance(text, str)):
        raise ServiceError(400, "nul_character", "text fields may not contain a NUL character (\\x00)")
