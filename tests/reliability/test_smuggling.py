"""Request smuggling through the proxy: duplicate and conflicting Content-Length and
Transfer-Encoding, obfuscated framing, bodies that hold a whole second request.

Crafted bytes go in on raw sockets; a strict (llhttp) backend records what the worker really sent.
The property: the backend never sees a request the worker did not answer to its client (one
response per forwarded request, matched by the backend's ``X-Backend-Seq``), every forwarded
request has exactly one, consistent framing, and a clean request on a new connection afterwards
arrives exactly as sent (no leftover bytes on the pooled upstream connection).
"""

from __future__ import annotations

import os
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .harness import UrlSigner, check_reported_once, query_auth
from .rawhttp import raw_exchange_sync

EXAMPLES = int(os.environ.get("VESPA_RELIABILITY_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: backend\r\nX-Smuggled: 1\r\n\r\n"
CLOSER = b"GET /end HTTP/1.1\r\nHost: w\r\nConnection: close\r\n\r\n"


def chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)


def request(headers: list[bytes], body: bytes, target: bytes = b"/upload",
            method: bytes = b"POST") -> bytes:
    return method + b" " + target + b" HTTP/1.1\r\nHost: w\r\n" + b"".join(
        h + b"\r\n" for h in headers) + b"\r\n" + body


CRAFTED = {
    "CL.TE classic": request([b"Content-Length: 6", b"Transfer-Encoding: chunked"],
                             b"0\r\n\r\nG"),
    "TE.CL classic": request([b"Transfer-Encoding: chunked", b"Content-Length: 3"],
                             chunked(SMUGGLED)),
    "CL.TE with a whole request": request(
        [b"Content-Length: %d" % (5 + len(SMUGGLED)), b"Transfer-Encoding: chunked"],
        b"0\r\n\r\n" + SMUGGLED),
    "two Content-Lengths, different": request([b"Content-Length: 0",
                                               b"Content-Length: %d" % len(SMUGGLED)], SMUGGLED),
    "two Content-Lengths, same": request([b"Content-Length: %d" % len(SMUGGLED)] * 2, SMUGGLED),
    "Content-Length list": request([b"Content-Length: %d, %d" % (len(SMUGGLED), len(SMUGGLED))],
                                   SMUGGLED),
    "Content-Length +N": request([b"Content-Length: +%d" % len(SMUGGLED)], SMUGGLED),
    "Content-Length hex": request([b"Content-Length: 0x%x" % len(SMUGGLED)], SMUGGLED),
    "Content-Length negative": request([b"Content-Length: -1"], SMUGGLED),
    "Content-Length huge": request([b"Content-Length: 99999999999999999999999"], SMUGGLED),
    "Content-Length leading zeros": request([b"Content-Length: 000%d" % len(SMUGGLED)],
                                            SMUGGLED),
    "Content-Length space in name": request([b"Content-Length : %d" % len(SMUGGLED)], SMUGGLED),
    "Content-Length tab value": request([b"Content-Length:\t%d" % len(SMUGGLED)], SMUGGLED),
    "two Transfer-Encodings": request([b"Transfer-Encoding: chunked",
                                       b"Transfer-Encoding: identity"], chunked(SMUGGLED)),
    "Transfer-Encoding identity, chunked": request(
        [b"Transfer-Encoding: identity, chunked"], chunked(SMUGGLED)),
    "Transfer-Encoding chunked, identity": request(
        [b"Transfer-Encoding: chunked, identity"], chunked(SMUGGLED)),
    "Transfer-Encoding xchunked + CL": request(
        [b"Transfer-Encoding: xchunked", b"Content-Length: %d" % len(SMUGGLED)], SMUGGLED),
    "Transfer-Encoding CHUNKED": request([b"Transfer-Encoding: CHUNKED"], chunked(SMUGGLED)),
    "Transfer-Encoding space before colon": request(
        [b"Transfer-Encoding : chunked", b"Content-Length: 4"], chunked(SMUGGLED)),
    "Transfer-Encoding obs-fold": request(
        [b"Transfer-Encoding: identity", b" chunked", b"Content-Length: 4"], chunked(SMUGGLED)),
    "Transfer-Encoding vertical tab": request([b"Transfer-Encoding:\x0bchunked"],
                                              chunked(SMUGGLED)),
    "Transfer-Encoding gzip, chunked": request([b"Transfer-Encoding: gzip, chunked"],
                                               chunked(SMUGGLED)),
    "chunk size with extension": request([b"Transfer-Encoding: chunked"],
                                         b"%x;ext=1\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED),
                                                                          SMUGGLED)),
    "chunk size overflow": request([b"Transfer-Encoding: chunked"],
                                   b"fffffffffffffffff1\r\n" + SMUGGLED + b"\r\n0\r\n\r\n"),
    "chunk size with spaces": request([b"Transfer-Encoding: chunked"],
                                      b" %x \r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)),
    "chunk data longer than its size": request([b"Transfer-Encoding: chunked"],
                                               b"3\r\nabcdef\r\n0\r\n\r\n" + SMUGGLED),
    "LF-only chunk lines": request([b"Transfer-Encoding: chunked"],
                                   b"%x\n%s\n0\n\n" % (len(SMUGGLED), SMUGGLED)),
    "trailer with a request": request([b"Transfer-Encoding: chunked"],
                                      b"0\r\nX-Trailer: " + SMUGGLED.replace(b"\r\n", b" ")
                                      + b"\r\n\r\n"),
    "bare LF in a header value": request([b"X-A: a\nContent-Length: %d" % len(SMUGGLED)],
                                         SMUGGLED),
    "bare CR in a header value": request([b"X-A: a\rContent-Length: 5"], SMUGGLED),
    "NUL in a header value": request([b"X-A: a\x00b", b"Content-Length: %d" % len(SMUGGLED)],
                                     SMUGGLED),
    "GET with a body holding a request": request([b"Content-Length: %d" % len(SMUGGLED)],
                                                 SMUGGLED, method=b"GET", target=b"/after"),
    "HTTP/1.0 chunked": request([b"Transfer-Encoding: chunked"], chunked(SMUGGLED)).replace(
        b"HTTP/1.1", b"HTTP/1.0", 1),
    "Connection: content-length": request([b"Connection: Content-Length",
                                           b"Content-Length: %d" % len(SMUGGLED)], SMUGGLED),
    "Connection: transfer-encoding": request([b"Connection: Transfer-Encoding",
                                              b"Transfer-Encoding: chunked"], chunked(SMUGGLED)),
    "Expect 100-continue with CL": request([b"Expect: 100-continue",
                                            b"Content-Length: %d" % len(SMUGGLED)], SMUGGLED),
    "Upgrade h2c": request([b"Connection: Upgrade, HTTP2-Settings", b"Upgrade: h2c",
                            b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
                            b"Content-Length: %d" % len(SMUGGLED)], SMUGGLED),
    "plain pipelining": request([b"Content-Length: 2"], b"ok") + SMUGGLED,
}

FRAMING = st.lists(st.sampled_from([
    b"Content-Length: 0", b"Content-Length: 5", b"Content-Length: %d" % len(SMUGGLED),
    b"Content-Length: %d" % (len(SMUGGLED) + 5), b"Content-Length: -5", b"Content-Length: 1e3",
    b"Content-Length: 5, 5", b"Content-Length:  5 ", b"content-length: 5", b"CONTENT-LENGTH: 5",
    b"Content-Length: 05", b"Content-Length: 18446744073709551621",
    b"Transfer-Encoding: chunked", b"Transfer-Encoding: Chunked", b"Transfer-Encoding: chunked ",
    b"Transfer-Encoding:  chunked", b"Transfer-Encoding: identity", b"Transfer-Encoding: gzip",
    b"Transfer-Encoding: chunked, chunked", b"Transfer-Encoding: x", b"Transfer-Encoding:",
    b"transfer-encoding: chunked", b"Transfer_Encoding: chunked", b"Content_Length: 5",
    b"Connection: close", b"Connection: keep-alive", b"Connection: Content-Length",
    b"Connection: Transfer-Encoding", b"Expect: 100-continue", b"Trailer: Content-Length",
]), max_size=4)
BODY = st.sampled_from([b"", b"hello", SMUGGLED, chunked(b"hello"), chunked(SMUGGLED),
                        b"0\r\n\r\n" + SMUGGLED, chunked(b"hello") + SMUGGLED,
                        b"5\r\nhello\r\n", b"zz\r\nhello\r\n0\r\n\r\n"])


class SmugglingCheck:
    """Runs one crafted request and checks what the backend saw against what the client got."""

    def __init__(self, stack, signed: bool):
        self.stack, self.signed = stack, signed
        self.signer = UrlSigner(stack.emulator.signer, stack.url) if signed else None
        self.statuses: Counter = Counter()
        self.canaries = 0
        self.must: set[int] = set()
        self.may: set[int] = set()

    def target(self, path: bytes) -> bytes:
        if not self.signed:
            return path
        auth_data = self.signer.auth_data(cost=2)
        self.may.add(auth_data["request_idx"])
        return path + b"?" + query_auth(auth_data).encode()

    def run(self, data: bytes, label: str) -> None:
        recording = self.stack.recording
        before = len(recording.requests)
        responses, raw = raw_exchange_sync(self.stack.port, data + CLOSER, read_timeout=0.5)
        seen = [r for r in recording.requests[before:] if r.target != b"/health"]
        for response in responses:
            self.statuses[response.status] += 1
        assert all(r.status < 500 for r in responses), f"{label}: {raw[:400]!r}"
        answered = {int(r.header(b"X-Backend-Seq")) for r in responses
                    if r.header(b"X-Backend-Seq") is not None}
        seqs = {r.seq for r in seen}
        assert seqs <= answered, (
            f"{label}: the backend saw {len(seqs)} request(s) "
            f"{[r.method + b' ' + r.target for r in seen]}, the client got answers to "
            f"{len(answered)}: a request went upstream that the worker never answered")
        for r in seen:
            self.check_framing(r, label)
        self.canary(label)

    @staticmethod
    def check_framing(seen, label: str) -> None:
        names = Counter(name.lower() for name, _ in seen.headers)
        assert names[b"content-length"] + names[b"transfer-encoding"] <= 1, \
            f"{label}: forwarded with framing {seen.headers}"
        assert names[b"content-length"] <= 1 and names[b"transfer-encoding"] <= 1
        for name, value in seen.headers:
            assert not any(c in value for c in b"\r\n\x00"), f"{label}: {name}: {value!r}"
            if name.lower() == b"content-length":
                assert int(value) == len(seen.body), f"{label}: {value} vs {len(seen.body)}"

    def canary(self, label: str) -> None:
        """A clean request on a new connection arrives exactly as sent."""
        self.canaries += 1
        path = b"/canary-%d" % self.canaries
        target = self.target(path)
        recording = self.stack.recording
        before = len(recording.requests)
        responses, raw = raw_exchange_sync(
            self.stack.port, b"GET " + target + b" HTTP/1.1\r\nHost: w\r\nConnection: close"
                             b"\r\n\r\n", read_timeout=5)
        seen = [r for r in recording.requests[before:] if r.target != b"/health"]
        assert len(responses) == 1 and responses[0].status == 200, f"after {label}: {raw[:300]!r}"
        assert [(r.method, r.target.split(b"?")[0]) for r in seen] == [(b"GET", path)], \
            f"after {label}, the canary arrived as {[(r.method, r.target) for r in seen]}"
        assert int(responses[0].header(b"X-Backend-Seq")) == seen[0].seq, \
            f"after {label}, the canary got another request's answer"
        if self.signed:
            self.must.add(int(target.split(b"serverless_request_idx=")[1].split(b"&")[0]))

    def finish(self, measure, inputs: int) -> None:
        stack = self.stack
        stack.sync(stack.check_serving(self.must))
        stack.sync(stack.settle())
        if self.signed:
            check_reported_once(stack.emulator, self.must, may=self.may)
        assert not stack.recording.parse_errors, stack.recording.parse_errors[:5]
        measure(inputs=inputs, canaries=self.canaries,
                **{f"answered_{s}": n for s, n in sorted(self.statuses.items())},
                **{"5xx": sum(n for s, n in self.statuses.items() if s >= 500)})


def test_crafted_smuggling_attempts_never_desync_the_backend(stacks, measure):
    stack = stacks(signed=False, recording=True)
    check = SmugglingCheck(stack, signed=False)
    for label, data in CRAFTED.items():
        check.run(data, label)
    check.finish(measure, len(CRAFTED))


def test_crafted_smuggling_attempts_signed_get_with_body(stacks, measure):
    stack = stacks(signed=True, recording=True)
    check = SmugglingCheck(stack, signed=True)
    for label, data in CRAFTED.items():
        method_line, rest = data.split(b"\r\n", 1)
        method = method_line.split(b" ")[0]
        data = b"GET " + check.target(b"/after") + b" " + method_line.rsplit(b" ", 1)[1] \
            + b"\r\n" + rest
        check.run(data, f"{label} (signed GET, was {method.decode()})")
    check.finish(measure, len(CRAFTED))


def test_generated_framing_combinations_never_desync_the_backend(stacks, measure):
    stack = stacks(signed=False, recording=True)
    check = SmugglingCheck(stack, signed=False)
    tried = 0

    @FUZZ
    @given(headers=FRAMING, body=BODY, method=st.sampled_from([b"POST", b"GET", b"PUT"]))
    def one(headers: list[bytes], body: bytes, method: bytes) -> None:
        nonlocal tried
        tried += 1
        check.run(request(headers, body, method=method), repr((headers, body[:30], method)))

    one()
    check.finish(measure, tried)
