"""Routing: ask the autoscaler's ``POST /route/`` for a worker, waiting out cold starts.

An answer with ``url`` is a signed route. One without is a cold start: poll again with the
returned ``request_idx``, jittered backoff capped near 5 s, until the route timeout. Connection
errors, 408, 429 and 5xx are retried a few times; every failure becomes a ``RouteError`` that
carries the HTTP status and message the caller gets.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from dataclasses import dataclass

import aiohttp

from .keys import refused_key_message
from .wrapping import AUTH_FIELDS

log = logging.getLogger("vespa.client")
# What the Vast SDK sends as replay_timeout on /route/.
REPLAY_TIMEOUT = 60.0


class RouteError(Exception):
    """No route: ``status`` and ``message`` are what the caller is told."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class RoutePolicy:
    timeout: float = 300.0  # seconds to wait for a ready worker
    poll_base: float = 0.5  # first cold-start poll delay (before jitter)
    poll_cap: float = 5.0
    call_timeout: float = 30.0  # one /route/ call
    call_attempts: int = 3  # tries of one /route/ call on connection errors, 408, 429, 5xx
    retry_base: float = 0.25


def backoff(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with jitter: a delay in [d/2, d], d = min(cap, base * 2^attempt)."""
    delay = min(cap, base * (2 ** min(attempt, 30)))
    return delay * (rng or random).uniform(0.5, 1.0)


def retryable(status: int) -> bool:
    return status in (408, 429) or 500 <= status < 600


@dataclass(frozen=True)
class EndpointKey:
    """The endpoint key and where it came from (for the 401 message)."""

    value: str
    source: str
    looked_up: bool = False


class Router:
    """Routes requests of one endpoint through one autoscaler."""

    def __init__(self, session: aiohttp.ClientSession, autoscaler_url: str, endpoint: str,
                 key: EndpointKey, policy: RoutePolicy = RoutePolicy()):
        self.session, self.endpoint, self.key, self.policy = session, endpoint, key, policy
        self.route_url = autoscaler_url.rstrip("/") + "/route/"
        self.autoscaler_url = autoscaler_url.rstrip("/")

    async def route(self, cost: float) -> dict:
        """A signed route for a request of workload ``cost``; RouteError when there is none."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.policy.timeout
        request_idx, polls = 0, 0
        while True:
            answer = await self.call(cost, request_idx)
            if answer.get("url"):
                return answer
            request_idx = answer.get("request_idx") or request_idx
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise RouteError(503, self.no_worker_message(answer.get("status")))
            if polls == 0:
                log.info("endpoint %r has no ready worker yet (%s); waiting up to %gs",
                         self.endpoint, describe_workers(answer.get("status")),
                         self.policy.timeout)
            delay = backoff(polls, self.policy.poll_base, self.policy.poll_cap)
            await asyncio.sleep(min(delay, remaining))
            polls += 1

    def no_worker_message(self, status: object) -> str:
        return (f"endpoint {self.endpoint!r} has no ready worker: none became ready within "
                f"{self.policy.timeout:g}s (--route-timeout); workers: {describe_workers(status)}")

    async def call(self, cost: float, request_idx: int) -> dict:
        """One /route/ answer, retrying connection errors, 408, 429 and 5xx a few times."""
        body = {"endpoint": self.endpoint, "api_key": self.key.value, "cost": cost,
                "request_idx": request_idx, "replay_timeout": REPLAY_TIMEOUT}
        for attempt in range(self.policy.call_attempts):
            last = attempt + 1 == self.policy.call_attempts
            try:
                status, text = await self.post(body)
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                if last:
                    raise RouteError(502, f"autoscaler unreachable at {self.route_url}: "
                                          f"{exc or type(exc).__name__}") from None
                log.debug("route call failed (%r); retrying", exc)
            else:
                if not retryable(status) or last:
                    return self.answer(status, text)
                log.debug("autoscaler answered %d; retrying", status)
            await asyncio.sleep(backoff(attempt, self.policy.retry_base, self.policy.poll_cap))
        raise AssertionError("unreachable")

    async def post(self, body: dict) -> tuple[int, str]:
        timeout = aiohttp.ClientTimeout(total=self.policy.call_timeout)
        headers = {"Authorization": f"Bearer {self.key.value}"}
        async with self.session.post(self.route_url, json=body, headers=headers,
                                     timeout=timeout) as response:
            return response.status, await response.text()

    def answer(self, status: int, text: str) -> dict:
        """The route answer of a final response, or the RouteError the caller gets."""
        if status in (401, 403):
            raise RouteError(401, refused_key_message(self.endpoint, self.autoscaler_url, status,
                                                      self.key.source, self.key.looked_up))
        detail = error_detail(text)
        if status == 404:
            raise RouteError(404, f"the autoscaler at {self.autoscaler_url} knows no endpoint "
                                  f"{self.endpoint!r}: {detail}")
        if status != 200:
            raise RouteError(502, f"the autoscaler at {self.route_url} answered {status}: "
                                  f"{detail}")
        try:
            answer = json.loads(text)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise RouteError(502, f"the autoscaler at {self.route_url} answered with no JSON "
                                  f"object: {text[:200]!r}")
        missing = [name for name in AUTH_FIELDS if name not in answer]
        if answer.get("url") and missing:
            raise RouteError(502, f"the autoscaler's route lacks {', '.join(missing)}")
        return answer


def error_detail(text: str) -> str:
    """The ``error``/``msg`` of a JSON error answer, else the start of the text."""
    try:
        document = json.loads(text)
    except ValueError:
        return text[:300] or "(empty answer)"
    if isinstance(document, dict):
        for name in ("error", "msg", "detail", "message"):
            if document.get(name):
                return str(document[name])[:300]
    return text[:300]


def describe_workers(status: object) -> str:
    """'0 ready, 2 loading' from the cold-start answer's worker counts."""
    if isinstance(status, dict) and status:
        return ", ".join(f"{count} {state}" for state, count in status.items())
    return "no worker information" if not status else str(status)[:200]
