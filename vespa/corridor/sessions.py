"""Sessions (Vast's protocol): a client holds this worker for a series of requests; pure.

A session is created by a signed ``/session/create`` and is one request_idx to the autoscaler:
its ledger entry (the create's cost) is in flight until it ends, by ``/session/end``, by expiry
or by the worker's drain. A request naming an open session extends it by one lifetime from now.
``Sessions`` keeps the open ones (at most ``limit``) and remembers recently ended ids, so an
ended session answers 410 and one never seen 400. No clock, no IO: ``now`` is passed in.
"""

from __future__ import annotations

import hmac
import json
import math
import secrets
import string
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from mypy_extensions import mypyc_attr

from .ledger import Entry

ID_ALPHABET = string.ascii_letters + string.digits
ID_LENGTH = 13  # as Vast's worker makes them (62**13: about 2**77, unguessable)
DEFAULT_LIFETIME = 60.0
MAX_LIFETIME = 86_400.0  # a day
REMEMBERED_ENDED = 4096  # ended ids kept to answer 410 (not 400) for them


@mypyc_attr(native_class=False)  # a builtin exception's subclass stays a Python class
class SessionInputError(ValueError):
    """A session call the client got wrong (422)."""


@dataclass(frozen=True)
class SessionPlan:
    """What ``/session/create`` asks for (its payload)."""

    lifetime: float = DEFAULT_LIFETIME
    on_close_route: str | None = None
    on_close_payload: Any = None


def plan_from(payload: object) -> SessionPlan:
    """The plan in a create's payload; ``SessionInputError`` says what is wrong."""
    if not isinstance(payload, dict):
        raise SessionInputError("payload must be a JSON object {\"lifetime\": seconds, "
                                "\"on_close_route\": path or null, \"on_close_payload\": ...}")
    lifetime = payload.get("lifetime", DEFAULT_LIFETIME)
    if lifetime is None:
        lifetime = DEFAULT_LIFETIME
    if isinstance(lifetime, bool) or not isinstance(lifetime, (int, float)) \
            or not math.isfinite(lifetime) or not 0 < lifetime <= MAX_LIFETIME:
        raise SessionInputError(f"lifetime must be a number of seconds above 0 and at most "
                                f"{MAX_LIFETIME:g} (a day), not {lifetime!r}")
    route = payload.get("on_close_route")
    if route is not None and (not isinstance(route, str) or not route.startswith("/")
                              or len(route) > 2048):
        raise SessionInputError("on_close_route must be a path on the backend (\"/...\") or null")
    return SessionPlan(float(lifetime), route,
                       payload.get("on_close_payload") if route is not None else None)


def same_auth(given: object, kept: dict) -> bool:
    """``given`` is the auth data the session was created with (compared in constant time)."""
    if not isinstance(given, dict):
        return False
    try:
        mine = json.dumps(given, sort_keys=True).encode()
    except (TypeError, ValueError):
        return False
    return hmac.compare_digest(mine, json.dumps(kept, sort_keys=True).encode())


def close_body(session: Session) -> dict:
    """What ``on_close_route`` is POSTed: the create's ``on_close_payload`` (an object as it is,
    anything else under ``payload``) with the ``session_id``."""
    payload = session.plan.on_close_payload
    body = dict(payload) if isinstance(payload, dict) else \
        ({} if payload is None else {"payload": payload})
    body.setdefault("session_id", session.session_id)
    return body


@dataclass(eq=False)
class Session:
    session_id: str
    auth_data: dict
    plan: SessionPlan
    created_at: float
    expiration: float
    entry: Entry  # in the ledger from create to end
    requests: set = field(default_factory=set)  # the requests in flight in it (opaque handles)

    def vouches_for(self, auth_data: dict | None) -> bool:
        """A request carrying the auth data this session was created (and verified) with."""
        return auth_data is not None and same_auth(auth_data, self.auth_data)

    def describe(self) -> dict:
        """The answer to ``/session/get``."""
        return {"session_id": self.session_id, "auth_data": self.auth_data,
                "lifetime": self.plan.lifetime, "expiration": self.expiration,
                "created_at": self.created_at, "on_close_route": self.plan.on_close_route,
                "on_close_payload": self.plan.on_close_payload}


class Sessions:
    def __init__(self, limit: int):
        self.limit = limit
        self.open: dict[str, Session] = {}
        self.ended: OrderedDict[str, str] = OrderedDict()  # id -> how it ended
        self.created = 0
        self.ends = {"ended": 0, "expired": 0, "drained": 0}

    @property
    def full(self) -> bool:
        return len(self.open) >= self.limit

    def create(self, auth_data: dict, plan: SessionPlan, entry: Entry, now: float) -> Session:
        session_id = "".join(secrets.choice(ID_ALPHABET) for _ in range(ID_LENGTH))
        while session_id in self.open or session_id in self.ended:
            session_id = "".join(secrets.choice(ID_ALPHABET) for _ in range(ID_LENGTH))
        session = Session(session_id, auth_data, plan, now, now + plan.lifetime, entry)
        self.open[session_id] = session
        self.created += 1
        return session

    def get(self, session_id: str) -> Session | None:
        return self.open.get(session_id)

    def was_ended(self, session_id: str) -> bool:
        return session_id in self.ended

    @staticmethod
    def extend(session: Session, now: float) -> None:
        """A request in the session: it lives one lifetime from now (never less than before)."""
        session.expiration = max(session.expiration, now + session.plan.lifetime)

    def end(self, session_id: str, how: str) -> Session | None:
        """Close the session (``how``: ended, expired or drained); None when it is not open."""
        session = self.open.pop(session_id, None)
        if session is None:
            return None
        self.ended[session_id] = how
        if len(self.ended) > REMEMBERED_ENDED:
            self.ended.popitem(last=False)
        self.ends[how] += 1
        return session

    def expired(self, now: float) -> list[str]:
        """The sessions whose time is up; one with a request still in flight is not (a long
        generation outlives a short lifetime), it expires once idle past its expiration."""
        return [sid for sid, session in self.open.items()
                if session.expiration <= now and not session.requests]
