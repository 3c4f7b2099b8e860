"""Hostile or broken input in the request itself: malformed JSON, wrong types and absurd costs
in auth_data, huge headers, invalid UTF-8, signatures of the wrong length, replays.

The rule for all of them: a 4xx (never a 5xx, never a crash), nothing reported for a request the
worker did not accept or reject, and the worker keeps serving everyone else.
Hypothesis drives the generated inputs; VESPA_RELIABILITY_EXAMPLES sets how many (default 300).
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
from collections import Counter

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from .harness import MB, UrlSigner, check_reported_once, envelope, query_auth, signed_call
from .rawhttp import raw_exchange, raw_exchange_sync, raw_request

EXAMPLES = int(os.environ.get("VESPA_RELIABILITY_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
AUTH_FIELDS = ("cost", "endpoint", "reqnum", "request_idx", "signature", "url")


def tally(statuses: Counter) -> dict:
    return {"5xx": sum(n for s, n in statuses.items() if isinstance(s, int) and s >= 500)}


def finish_unreported(stack, statuses: Counter, measure) -> None:
    """The worker still serves; nothing but that last normal request was reported."""
    must: set[int] = set()
    stack.sync(stack.check_serving(must))
    stack.sync(stack.settle())
    if stack.emulator is not None:
        check_reported_once(stack.emulator, must)
    measure(inputs=sum(statuses.values()), **tally(statuses),
            **{f"answered_{s}": n for s, n in sorted(statuses.items())})

# -- malformed JSON ------------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=16)


@st.composite
def broken_json(draw) -> bytes:
    """A JSON envelope-ish document, then cut, spliced or corrupted."""
    document = {"auth_data": draw(JSON_VALUES | st.dictionaries(
        st.sampled_from(AUTH_FIELDS), JSON_VALUES, max_size=6)), "payload": draw(JSON_VALUES)}
    text = json.dumps(document).encode()
    at = draw(st.integers(0, len(text)))
    how = draw(st.sampled_from(["cut", "drop", "insert", "replace", "double"]))
    junk = draw(st.binary(min_size=1, max_size=4))
    return {"cut": text[:at], "drop": text[:at] + text[at + 1:], "insert": text[:at] + junk +
            text[at:], "replace": text[:at] + junk + text[at + len(junk):],
            "double": text + text}[how]


BODIES = st.one_of(st.binary(max_size=2000), broken_json(),
                   JSON_VALUES.map(lambda v: json.dumps(v).encode()))


NAMED_BODIES = {
    "empty": b"",
    "deep array": b"[" * 100_000,
    "deep auth_data, unterminated": b'{"auth_data": ' + b"[" * 50_000,
    "deep payload": b'{"auth_data": {"cost": 1}, "payload": ' + b'{"a":' * 3000 + b"1"
                    + b"}" * 3000 + b"}",
    "auth_data 990 deep": b'{"auth_data": ' + b"[" * 990 + b"]" * 990 + b', "payload": {}}',
    "payload 990 deep": b'{"auth_data": {}, "payload": ' + b"[" * 990 + b"]" * 990 + b"}",
    "byte order mark": b"\xef\xbb\xbf" + json.dumps({"auth_data": {}, "payload": {}}).encode(),
    "utf-16": json.dumps({"auth_data": {}, "payload": {}}).encode("utf-16"),
    "trailing text": b'{"auth_data": {}, "payload": {}} trailing',
    "two documents": b'{"auth_data": {}, "payload": {}}{"auth_data": {}, "payload": {}}',
    "invalid utf-8 string": b'{"auth_data": "\xff\xfe", "payload": {}}',
    "NaN cost": b'{"auth_data": {"cost": NaN}, "payload": {}}',
    "duplicate keys": b'{"auth_data": {}, "auth_data": 5, "payload": {}}',
    "1e999 cost": b'{"auth_data": {"cost": 1e999}, "payload": {}}',
}


def test_malformed_json_bodies_are_refused_never_500(stacks, measure):
    stack = stacks()
    statuses: Counter = Counter()

    @FUZZ
    @given(case=st.one_of(st.sampled_from(sorted(NAMED_BODIES)), BODIES))
    def one(case: str | bytes) -> None:
        body = NAMED_BODIES[case] if isinstance(case, str) else case
        status, text = stack.sync(stack.request("POST", "/echo", body,
                                                {"Content-Type": "application/json"}))
        statuses[status] += 1
        assert status in (401, 413, 422), f"{status}: {text[:300]!r}"

    for name in NAMED_BODIES:  # every named case once, whatever hypothesis draws
        one.hypothesis.inner_test(name)
    one()
    finish_unreported(stack, statuses, measure)


# -- wrong types and absurd costs in auth_data ---------------------------------------------------

GOOD = {"cost": 10.0, "endpoint": "vespa-dev", "reqnum": 1, "request_idx": 1,
        "signature": base64.b64encode(b"\x01" * 256).decode(), "url": "http://127.0.0.1:1"}
ABSURD = st.sampled_from([math.nan, math.inf, -math.inf, -1, -1e-300, -0.0, 1e308,
                          1.7976931348623157e308, 5e-324, 10 ** 400, -(10 ** 400), 2 ** 64,
                          True, False, None, "", "10", "NaN", "1e999", [], {}, [10], {"a": 1}])
WRONG = st.one_of(ABSURD, st.none(), st.booleans(), st.text(max_size=20),
                  st.floats(allow_nan=True, allow_infinity=True),
                  st.integers(min_value=-(10 ** 30), max_value=10 ** 30),
                  st.lists(st.integers(), max_size=3),
                  st.dictionaries(st.text(max_size=5), st.integers(), max_size=3))


@st.composite
def auth_datas(draw) -> dict:
    auth_data = {}
    for name, good in GOOD.items():
        fate = draw(st.sampled_from(["good", "good", "wrong", "missing"]))
        if fate == "good":
            auth_data[name] = good
        elif fate == "wrong":
            auth_data[name] = draw(WRONG)
    auth_data.update(draw(st.dictionaries(st.text(max_size=8), WRONG, max_size=2)))
    return auth_data


def test_auth_data_with_wrong_types_and_absurd_costs_is_refused(stacks, measure):
    stack = stacks()
    statuses: Counter = Counter()

    @FUZZ
    @given(auth_data=auth_datas(), as_query=st.booleans())
    @example(auth_data={**GOOD, "cost": math.nan}, as_query=False)
    @example(auth_data={**GOOD, "cost": -math.inf}, as_query=False)
    @example(auth_data={**GOOD, "cost": 10 ** 400}, as_query=False)
    @example(auth_data={**GOOD, "cost": -5}, as_query=True)
    @example(auth_data={**GOOD, "cost": "1e999"}, as_query=True)
    @example(auth_data={**GOOD, "reqnum": 1.5, "request_idx": -1}, as_query=False)
    @example(auth_data=GOOD, as_query=False)
    def one(auth_data: dict, as_query: bool) -> None:
        if as_query:
            query = "&".join(f"serverless_{k}={v}" for k, v in auth_data.items()
                             if k in AUTH_FIELDS)
            status, text = stack.sync(stack.request("GET", f"/echo?{query}"))
        else:
            body = json.dumps({"auth_data": auth_data, "payload": {}}).encode()  # NaN, Infinity
            status, text = stack.sync(stack.request("POST", "/echo", body))
        statuses[status] += 1
        assert status in (401, 422), f"{status} for {auth_data!r:.300}: {text[:300]!r}"

    one()
    finish_unreported(stack, statuses, measure)


HUGE_COSTS = [0, 0.0, 5e-324, 1, 1.0, 1.5, 1e300, 1e308, 1.7976931348623157e308, 2 ** 53 + 1,
              10 ** 30]


async def test_signed_absurd_costs_do_not_poison_admission_or_reports(astack, measure):
    """The autoscaler signs whatever cost the client asked /route/ for: 1e308 included."""
    stack = await astack(signed=True, VESPA_MAX_WAIT_TIME="5")
    signer = stack.emulator.signer
    results = []
    for cost in HUGE_COSTS:
        results.append(await signed_call(stack.session, stack.url, signer, "POST", "/echo",
                                         cost))
    # two of the largest finite costs at once: their sum overflows a float
    pair = await asyncio.gather(*(signed_call(stack.session, stack.url, signer, "GET",
                                              "/slow?delay=0.3", 1.7976931348623157e308)
                                  for _ in range(2)))
    normal = [await signed_call(stack.session, stack.url, signer, "POST", "/echo", 3)
              for _ in range(10)]
    statuses = Counter(status for _, status, _ in results + pair)
    assert set(statuses) <= {200, 429}, statuses
    assert [status for _, status, _ in normal] == [200] * 10, "admission stayed poisoned"
    must = {idx for idx, _, _ in results + pair + normal}
    await stack.check_serving(must)
    await stack.settle()  # every record delivered, and a last status report sent
    bad = [r for r in stack.emulator.reports
           if not all(math.isfinite(r[k]) for k in ("cur_load", "new_load", "rej_load",
                                                    "cur_perf", "max_perf"))]
    measure(inputs=len(HUGE_COSTS) + 2, **tally(statuses), overloaded=statuses[429],
            non_finite_reports=len(bad))
    assert not bad, f"{len(bad)} of {len(stack.emulator.reports)} worker_status reports carry " \
                    f"non-finite load (JSON NaN/Infinity), the last: {bad[-1]}"
    check_reported_once(stack.emulator, must)


# -- huge headers and invalid UTF-8 --------------------------------------------------------------

def signed_target(signer: UrlSigner, path: str = "/after") -> tuple[int, bytes]:
    auth_data = signer.auth_data(cost=2)
    sep = "&" if "?" in path else "?"
    return auth_data["request_idx"], f"{path}{sep}{query_auth(auth_data)}".encode()


async def test_huge_headers_are_refused_or_forwarded_intact(astack, measure):
    stack = await astack(signed=True, recording=True)
    signer = UrlSigner(stack.emulator.signer, stack.url)
    cases = {
        "one 64 KB header": [b"X-Big: " + b"a" * 65536],
        "one 1 MB header": [b"X-Big: " + b"a" * MB],
        "10,000 headers": [b"X-H%d: v" % i for i in range(10_000)],
        "200 headers of 8 KB": [b"X-H%d: " % i + b"b" * 8000 for i in range(200)],
        "one 8,000-byte header": [b"X-Near-Limit: " + b"c" * 8000],
        "1 MB header name": [b"X-" + b"n" * MB + b": v"],
    }
    statuses: Counter = Counter()
    must, may, wrong = set(), set(), []
    for name, headers in cases.items():
        idx, target = signed_target(signer)
        before = len(stack.recording.real_requests())
        responses, raw = await raw_exchange(stack.port, raw_request(target, *headers),
                                            read_timeout=5)
        status = responses[0].status if responses else None
        statuses[status] += 1
        seen = stack.recording.real_requests()[before:]
        if status == 200:
            must.add(idx)
            forwarded = {k: v for k, v in seen[0].headers} if seen else {}
            if any(forwarded.get(h.split(b": ", 1)[0]) != h.split(b": ", 1)[1] for h in headers):
                wrong.append(f"{name}: forwarded, but not intact")
        elif status is None or not 400 <= status < 500:
            wrong.append(f"{name}: answered {status!r} ({raw[:100]!r})")
            may.add(idx)
        elif seen:
            wrong.append(f"{name}: refused with {status} yet the backend saw it")
    # a big target: 1 MB of query string
    idx, target = signed_target(signer, "/after?q=" + "x" * MB)
    responses, raw = await raw_exchange(stack.port, raw_request(target), read_timeout=5)
    status = responses[0].status if responses else None
    statuses[status] += 1
    if not (status is not None and 400 <= status < 500):
        wrong.append(f"1 MB request target: answered {status!r}")
    may.add(idx)
    await stack.check_serving(must)
    await stack.settle()
    check_reported_once(stack.emulator, must, may=may)
    assert not wrong, "\n".join(wrong)
    measure(inputs=len(cases) + 1, **tally(statuses),
            refused=sum(n for s, n in statuses.items() if s and 400 <= s < 500))


def test_invalid_utf8_anywhere_is_refused_or_passed_through_exactly(stacks, measure):
    stack = stacks(signed=True, recording=True)
    signer = UrlSigner(stack.emulator.signer, stack.url)
    statuses: Counter = Counter()
    served: set[int] = set()
    unsure: set[int] = set()

    @FUZZ
    @given(where=st.sampled_from(["path", "query", "header value", "header name", "request id",
                                  "payload"]),
           junk=st.binary(min_size=1, max_size=40).filter(
               lambda b: b"\r" not in b and b"\n" not in b))
    @example(where="path", junk=b"\xff\xfe")
    @example(where="header value", junk=b"\xc3\x28\xa0\xa1")
    @example(where="request id", junk="日本語".encode())
    @example(where="request id", junk=b"\xed\xa0\x80")
    @example(where="payload", junk=b"\xed\xa0\x80\xff")
    def one(where: str, junk: bytes) -> None:
        auth_data = signer.auth_data(cost=2)
        idx = auth_data["request_idx"]
        if where in ("path", "query"):  # keep the target one target: no space, ?, # or &
            junk = bytes(b for b in junk if b not in b" ?#&") or b"\xff"
        if where == "header value":  # a header value has no leading or trailing blanks
            junk = junk.strip(b" \t") or b"\xff"
        if where == "payload":
            body = envelope(auth_data).replace(b'"payload": {}', b'"payload": "' + junk + b'"')
            data = raw_request(b"/after", b"Content-Type: application/json", method=b"POST",
                               body=body)
        else:
            path = b"/after/" + junk if where == "path" else b"/after"
            query = query_auth(auth_data).encode() + (b"&q=" + junk if where == "query" else b"")
            extra = {"header value": [b"X-Junk: " + junk],
                     "header name": [b"X-" + junk.replace(b":", b"") + b": v"],
                     "request id": [b"X-Request-Id: " + junk]}.get(where, [])
            data = raw_request(path + b"?" + query, *extra)
        before = len(stack.recording.real_requests())
        responses, raw = raw_exchange_sync(stack.port, data, read_timeout=2)
        status = responses[0].status if responses else None
        statuses[status] += 1
        assert status is not None and status < 500, f"{where} {junk!r}: {raw[:300]!r}"
        seen = stack.recording.real_requests()[before:]
        if status == 200:
            served.add(idx)
            assert len(seen) == 1
            if where == "path":
                assert seen[0].target.startswith(path), (seen[0].target, path)
            if where == "query":
                assert seen[0].target.endswith(b"q=" + junk), seen[0].target
            if where == "header value":
                assert (b"X-Junk", junk) in seen[0].headers
            if where == "request id":
                assert len(responses[0].header(b"X-Request-Id") or b"") > 0
        else:
            unsure.add(idx)  # a signed request refused before the ledger is not reported
            assert status in (400, 401, 404, 422), (where, junk, status, raw[:300])
            assert not seen, f"refused with {status}, yet the backend saw {seen}"

    one()
    must: set[int] = set(served)
    stack.sync(stack.check_serving(must))
    stack.sync(stack.settle())
    check_reported_once(stack.emulator, must, never=unsure)
    measure(inputs=sum(statuses.values()), **tally(statuses),
            **{f"answered_{s}": n for s, n in sorted(statuses.items())})


async def test_invalid_utf8_body_passes_through_byte_exact_unsecured(make_worker, measure):
    import hashlib
    client, _ = await make_worker()
    bodies = [b"\xff\xfe\xfd" * 1000, b'{"text": "\xed\xa0\x80 lone surrogate"}',
              b'{"auth_data": "\xff"}', bytes(range(256)) * 300]
    for body in bodies:
        response = await client.post("/echo", data=body)
        assert response.status == 200
        seen = await response.json()
        assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()
    measure(inputs=len(bodies))


# -- signatures of the wrong length, replays -----------------------------------------------------

def test_signatures_valid_base64_but_wrong_length_are_401(stacks, measure):
    stack = stacks()
    signer = stack.emulator.signer
    statuses: Counter = Counter()

    @FUZZ
    @given(raw=st.binary(max_size=600).filter(lambda b: len(b) != 256), as_query=st.booleans())
    @example(raw=b"", as_query=False)
    @example(raw=b"\xff" * 255, as_query=False)
    @example(raw=b"\xff" * 257, as_query=True)
    @example(raw=b"\x00" * 512, as_query=False)
    def one(raw: bytes, as_query: bool) -> None:
        auth_data = signer.auth_data(stack.url, cost=2)
        auth_data["signature"] = base64.b64encode(raw).decode()
        if as_query:
            status, text = stack.sync(stack.request("GET", f"/echo?{query_auth(auth_data)}"))
        else:
            status, text = stack.sync(stack.request("POST", "/echo", envelope(auth_data)))
        statuses[status] += 1
        assert status == 401, (len(raw), status, text[:200])

    one()
    # and 256 bytes that are not a signature: all ones (>= the modulus), all zeros, random
    for raw in (b"\xff" * 256, b"\x00" * 256, os.urandom(256)):
        auth_data = signer.auth_data(stack.url, cost=2)
        auth_data["signature"] = base64.b64encode(raw).decode()
        status, _ = stack.sync(stack.request("POST", "/echo", envelope(auth_data)))
        statuses[status] += 1
        assert status == 401
    finish_unreported(stack, statuses, measure)


async def test_replays_are_refused_and_reported_once(astack, measure):
    stack = await astack(signed=True, VESPA_REPLAY_WINDOW="50")
    signer = stack.emulator.signer
    statuses: Counter = Counter()
    original = signer.auth_data(stack.url, cost=3)
    first = await signed_call(stack.session, stack.url, signer, "POST", "/echo",
                              auth_data=original)
    again = await signed_call(stack.session, stack.url, signer, "POST", "/echo",
                              auth_data=original)
    as_get = await signed_call(stack.session, stack.url, signer, "GET", "/echo",
                               auth_data=original)
    assert (first[1], again[1], as_get[1]) == (200, 401, 401)
    # 20 copies of one fresh request at once: exactly one is served
    fresh = signer.auth_data(stack.url, cost=3)
    burst = await asyncio.gather(*(signed_call(stack.session, stack.url, signer, "POST",
                                               "/echo", auth_data=fresh)
                                   for _ in range(20)))
    assert sorted(s for _, s, _ in burst) == [200] + [401] * 19
    # older than the window: refused as too old, even though never seen
    old = signer.auth_data(stack.url, cost=3)
    for _ in range(60):
        await signed_call(stack.session, stack.url, signer, "POST", "/echo", 2)
    too_old = await signed_call(stack.session, stack.url, signer, "POST", "/echo",
                                auth_data=old)
    assert too_old[1] == 401 and b"too old" in too_old[2]
    for _, status, _ in [first, again, as_get, too_old, *burst]:
        statuses[status] += 1
    await stack.settle()
    deleted = Counter(stack.emulator.deleted_request_idxs())
    assert deleted[original["request_idx"]] == 1 and deleted[fresh["request_idx"]] == 1
    assert deleted[old["request_idx"]] == 0
    assert max(deleted.values()) == 1
    assert stack.emulator.validation_errors == []
    await stack.check_serving()
    measure(inputs=23, replays_refused=statuses[401], **tally(statuses))


async def test_url_scheme_signatures_cannot_be_replay_checked(astack, measure):
    """The documented limit of url-only signatures (README, Security): the signature is the same
    for every request to a worker, so nothing ties it to one request_idx; a replayed auth_data
    is served again and its request_idx reported again. Asserted exactly, so that the README's
    promise changes when this behaviour does."""
    stack = await astack(signed=True)
    signer = UrlSigner(stack.emulator.signer, stack.url)
    auth_data = signer.auth_data(cost=2)
    results = [await signed_call(stack.session, stack.url, signer, "POST", "/echo",
                                 auth_data=auth_data) for _ in range(3)]
    assert [s for _, s, _ in results] == [200, 200, 200]
    await stack.settle()
    reported = Counter(stack.emulator.deleted_request_idxs())[auth_data["request_idx"]]
    assert reported == 3
    await stack.check_serving()
    measure(inputs=3, url_scheme_replays_served=sum(s == 200 for _, s, _ in results) - 1,
            same_request_idx_reported=reported)
