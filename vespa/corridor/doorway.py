"""The doorway: what a request must pass before it counts as load, each "no" a ``Refused``.

Its envelope is opened (the body read only when it may be one; 413 400 408 422), its signature
checked (503 while there is no key, 401), and the door refuses what the worker will not take
(503 draining, 403 a blocked path). Nothing here touches the ledger.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from typing import Protocol

from ..http.body import BodyTooLarge, arrived_body, check_length, is_small, read_body
from ..http.limits import Throttle
from ..http.messages import Request
from ..http.target import path_of, redacted, spellings, without_params
from .auth import PublicKey, Verdict, verify
from .envelope import (BODY_METHODS, PASSTHROUGH, Envelope, EnvelopeError, open_envelope,
                       with_path)
from .refusal import BODY_ERRORS, Reason, Refused, refusal_for
from .replay import ReplayWindow
from .visit import Visit

log = logging.getLogger("vespa.auth")
access_log = logging.getLogger("vespa.access")
# what Vast's client sends a worker besides the envelope: its endpoint key, which spends the
# endpoint owner's money; a signed request's backend gets neither (``Authorization`` too)
CLIENT_CREDENTIALS = frozenset({"api_key"})


class EnvelopeLimits:
    """What an unauthenticated client can make the worker spend on one envelope: its bytes, the
    time it may take to arrive, and the JSON values parsing it would build (parsing runs on the
    event loop and holds the GIL, so every other client waits while it does)."""

    QUICK = 64 * 1024  # a body this small holds too few values to be worth counting

    def __init__(self, max_bytes: int = 4 << 20, max_values: int = 100_000,
                 read_timeout: float = 60.0):
        self.max_bytes = max_bytes
        self.setting = "VESPA_MAX_ENVELOPE_BYTES"  # the setting that sets max_bytes
        self.max_values = max_values
        self.read_timeout = read_timeout

    def check(self, body: bytes) -> None:
        """``Refused`` (413) when the body is larger than allowed (it came whole, or without a
        length), or its JSON would hold more values than allowed: every object, array and
        member costs a ``{``, ``[``, ``,`` or ``:`` (an upper bound)."""
        if len(body) > self.max_bytes:
            raise Refused(Reason.BODY_SIZE, str(BodyTooLarge(self.max_bytes, len(body),
                                                             self.setting)))
        if len(body) <= self.QUICK:
            return
        values = body.count(b"[") + body.count(b"{") + body.count(b",") + body.count(b":")
        if values > self.max_values:
            raise Refused(Reason.BODY_SIZE, f"envelope holds up to {values} JSON values, more "
                                            f"than the {self.max_values} allowed before its "
                                            "signature is checked (VESPA_MAX_ENVELOPE_VALUES)")


class FailureAlarm:
    """Signatures that verify under no scheme at all: one WARNING line a minute at most
    (``Throttle``), with how many since the line before, the schemes tried and the key's
    fingerprint, so an operator is not left guessing (vast-cli issue #493 reports production
    signatures of no documented shape)."""

    def __init__(self, interval: float = 60.0):
        self.throttle = Throttle(interval)

    def note(self, scheme: str, key: PublicKey) -> None:
        held = self.throttle.suppressed  # before ``due`` counts this one or starts again at 0
        if self.throttle.due() is None:
            return
        tried = "full, url, legacy" if scheme == "auto" else scheme
        log.warning("%d signed request(s) since the last such line verified under no scheme "
                    "(tried %s; VESPA_SIGNATURE_SCHEME=%s) with the autoscaler key %s: check "
                    "that REPORT_ADDR is the autoscaler that routes to this worker and that "
                    "its /pubkey/ has this fingerprint", held + 1, tried, scheme,
                    key.fingerprint)


class RestartAlarm:
    """Signed requests that verify but were refused because the worker restarted after a higher
    reqnum: a few are expected (signed before the restart, sent after); one WARNING line a
    minute at most (``Throttle``: with how many were held back), since many mean the
    autoscaler's reqnums started again under the same key, and then only deleting the replay
    mark lets them through."""

    def __init__(self, window: ReplayWindow, interval: float = 60.0):
        self.window = window
        self.throttle = Throttle(interval)

    def note(self, reqnum: int) -> None:
        more = self.throttle.due()
        if more is None:
            return
        log.warning("signed request(s) verified but were refused as too old (reqnum %d): at or "
                    "below reqnum %s, the highest this worker had admitted under this key "
                    "before it restarted (VESPA_CACHE_DIR/replay-mark)%s. If this goes on, the "
                    "autoscaler's reqnums started again: delete that file and restart the "
                    "worker", reqnum, self.window.restored, more)


class KeySource(Protocol):
    """The autoscaler's public key, as the key ring keeps it."""

    key: PublicKey | None

    async def refresh_after_failure(self) -> bool: ...


def compile_patterns(patterns: tuple[str, ...]) -> re.Pattern | None:
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


class Doorway:
    def __init__(self, *, unsecured: bool, max_body_bytes: int, body_read_timeout: float,
                 signature_scheme: str, public_url: str | None, replay_window: int,
                 blocked_paths: tuple[str, ...], envelope_limits: EnvelopeLimits | None = None):
        self.unsecured = unsecured
        self.max_body_bytes = max_body_bytes
        self.body_read_timeout = body_read_timeout
        self.limits = envelope_limits or EnvelopeLimits()
        if max_body_bytes < self.limits.max_bytes:  # the smaller limit of the two holds
            self.limits.max_bytes, self.limits.setting = max_body_bytes, "VESPA_MAX_BODY_BYTES"
        self.signature_scheme = signature_scheme
        self.public_url = public_url or None
        self.replay = ReplayWindow(replay_window)
        self.restart_alarm = RestartAlarm(self.replay)
        self.replay.on_refused_as_restored = self.restart_alarm.note
        self.blocked = compile_patterns(blocked_paths)
        self.keys: KeySource | None = None  # set in signed mode, once the key ring exists
        self.alarm = FailureAlarm()

    # -- the envelope --------------------------------------------------------------------------
    async def open(self, request: Request, target: str | None) -> Envelope:
        """The envelope of ``request`` as sent to the origin-form ``target``; reads the body
        only when it may be one. An absolute-form target (``http://host/path``) is opened and
        forwarded as its path and query (``target``)."""
        try:
            check_length(request, self.max_body_bytes)
            if target is None:  # e.g. OPTIONS * or CONNECT host:port: nothing to forward
                raise Refused(Reason.TARGET, f"request target {request.target[:200]!r} has no "
                                             "path: send /path?query")
            envelope = self.open_without_body(request, target)
            if envelope is None:  # the body may be an envelope: read it (usually all here)
                body = arrived_body(request)
                if body is None:
                    body = await self.read_envelope(request)
                if not self.unsecured:
                    self.limits.check(body)
                envelope = open_envelope(request.method, target, body, unsecured=self.unsecured)
                if envelope is PASSTHROUGH:
                    envelope = Envelope(None, body=body)
        except EnvelopeError as invalid:
            raise Refused(Reason.ENVELOPE, str(invalid), problems=invalid.problems) from None
        except BODY_ERRORS as unreadable:
            raise refusal_for(unreadable) from None
        if envelope.auth_data is not None:  # Vast's client adds its endpoint key: never passed on
            envelope = with_path(envelope, without_params(envelope.path_qs or target,
                                                          CLIENT_CREDENTIALS))
        elif envelope.path_qs is None and target != request.target:
            envelope = with_path(envelope, target)
        return envelope

    async def read_envelope(self, request: Request) -> bytes:
        """A body that may be an envelope, read whole; signed, it is read before anything is
        known of its sender, so its size, its time to arrive and its JSON are bounded."""
        if self.unsecured:  # only a small body is read here (open_without_body)
            return await read_body(request, self.max_body_bytes, self.body_read_timeout)
        limits = self.limits
        check_length(request, limits.max_bytes, limits.setting)
        try:
            return await read_body(request, limits.max_bytes, self.body_read_timeout,
                                   limits.read_timeout, "VESPA_ENVELOPE_READ_TIMEOUT")
        except BodyTooLarge:
            raise BodyTooLarge(limits.max_bytes, None, limits.setting) from None

    def open_without_body(self, request: Request, target: str) -> Envelope | None:
        """The envelope when the body cannot be one (no body, a method without an envelope
        body, or in dev mode a large or streamed body); None when the body must be read."""
        unsecured = self.unsecured
        if request.method not in BODY_METHODS:
            if unsecured and "serverless_" not in target:
                return PASSTHROUGH
            return open_envelope(request.method, target, None, unsecured=unsecured)
        if not request.has_body:
            return open_envelope(request.method, target, None, unsecured=unsecured)
        if unsecured and not is_small(request):
            return PASSTHROUGH  # a large or streamed body is never an envelope in dev mode
        return None

    # -- the signature -------------------------------------------------------------------------
    def must_verify(self, envelope: Envelope) -> bool:
        """The envelope carries auth data and the worker checks signatures."""
        return envelope.auth_data is not None and not self.unsecured

    async def check_signature(self, envelope: Envelope) -> None:
        """``Refused`` unless the envelope is signed right (``must_verify`` said to check)."""
        verdict = self.first_verdict(envelope)
        if not verdict.ok:
            await self.settle(envelope, verdict)

    def first_verdict(self, envelope: Envelope) -> Verdict:
        """The signature checked under the key held now, with no wait (a request signed right
        needs no more); ``Refused`` when there is no key yet."""
        auth_data = envelope.auth_data
        assert auth_data is not None
        keys = self.keys
        if keys is None or keys.key is None:
            raise Refused(Reason.NO_KEY, "worker has not loaded the autoscaler's public key "
                                         "yet; route the request again shortly")
        return verify(auth_data, keys.key, self.signature_scheme,
                      expected_url=self.public_url, replay=self.replay)

    async def settle(self, envelope: Envelope, verdict: Verdict) -> None:
        """After a failed ``first_verdict``: once the key is fetched again (it may have rotated)
        the signature is checked under the new one; ``Refused`` when it still fails."""
        auth_data = envelope.auth_data
        keys = self.keys
        assert auth_data is not None and keys is not None
        if not verdict.ok and verdict.scheme is None and await keys.refresh_after_failure():
            verdict = verify(auth_data, keys.key, self.signature_scheme,
                             expected_url=self.public_url, replay=self.replay)
        if not verdict.ok:
            if verdict.mismatch and keys.key is not None:
                self.alarm.note(self.signature_scheme, keys.key)
            raise Refused(Reason.SIGNATURE, verdict.reason)

    # -- the door ------------------------------------------------------------------------------
    def refusal(self, target: str | None, draining: bool) -> Refused | None:
        """Why a request signed right is turned away at the door, or None to let it in."""
        if draining:
            return Refused(Reason.DRAINING, "worker is shutting down; send the request to "
                                            "another worker", {"Retry-After": "1"})
        if self.blocked is not None and target is not None \
                and any(map(self.blocked.match, spellings(target))):
            return Refused(Reason.BLOCKED, f"path {path_of(target)} is blocked on this worker "
                                           "(VESPA_BLOCKED_PATHS)")
        return None


def log_access(request: Request, visit: Visit) -> None:
    """One access-log line (VESPA_LOG_LEVEL=DEBUG turns the logger on)."""
    if access_log.isEnabledFor(logging.INFO):
        access_log.info('%s "%s %s HTTP/%s" %d %d', request.remote, request.method,
                        redacted(request.target)[:200], request.version, visit.status,
                        visit.exchange.bytes_out)
