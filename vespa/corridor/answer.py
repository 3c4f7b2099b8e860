"""A whole answer the worker makes itself: its errors and its own routes (JSON, metrics)."""

from __future__ import annotations

import json

from ..http.messages import JSON_TYPE, Request, http_date
from .refusal import Refused


class Answer:
    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes):
        self.status = status
        self.headers = headers  # without framing (Content-Length) and Date
        self.body = body

    def send(self, request: Request) -> None:
        """Answer ``request`` (one being served) with this."""
        reply = request.reply
        assert reply is not None
        reply.send(self.status, [*((n.encode("latin-1"), v.encode("latin-1"))
                                   for n, v in self.headers), (b"Date", http_date())],
                   self.body)


def json_answer(status: int, document, headers: dict | None = None) -> Answer:
    pairs = [("Content-Type", JSON_TYPE.decode())]
    if headers:
        pairs += headers.items()
    return Answer(status, pairs, json.dumps(document).encode())


def json_error(status: int, message: str, rid: str, headers: dict | None = None,
               **extra) -> Answer:
    """``{"error": message, ...}`` with the request's id in X-Request-Id."""
    answer = json_answer(status, {"error": message, **extra}, headers)
    answer.headers.append(("X-Request-Id", rid))
    return answer


def refusal_answer(refused: Refused, rid: str) -> Answer:
    """The JSON answer to a refused request."""
    return json_error(refused.status, refused.message, rid, refused.headers, **refused.extra)
