"""A client's mistake, and how the service answers it."""

from __future__ import annotations


class RequestError(Exception):
    """A client mistake; ``field`` names the offending JSON field (or None for the body as a whole)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class Problem(Exception):
    """An answer other than 200: its status, one line for the client, the field at fault, extra headers."""

    def __init__(self, status: int, message: str, field: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.field, self.headers = status, field, headers or {}
