"""The envelope (pure): JSON body envelopes, ``serverless_*`` query auth, unsecured passthrough."""

from __future__ import annotations

import dataclasses
import json
from urllib.parse import quote, quote_plus

import pytest
from hypothesis import given, settings, strategies as st

from vespa.corridor.envelope import (AUTH_FIELDS, PASSTHROUGH, REQUIRED_FIELDS, Envelope, EnvelopeError, check_auth_data,
                            open_body, open_envelope, open_query)

AUTH = {"cost": 100, "endpoint": "my-endpoint", "reqnum": 7, "request_idx": 42,
        "signature": "c2lnbmF0dXJl", "url": "http://1.2.3.4:5000"}


def envelope_body(auth=AUTH, payload=None, **extra) -> bytes:
    document = {"auth_data": auth, "payload": {"prompt": "hi"} if payload is None else payload}
    return json.dumps({**document, **extra}).encode()


def query_auth(auth=AUTH) -> str:
    return "&".join(f"serverless_{name}={quote_plus(str(value))}" for name, value in auth.items())


def problems_of(call, *args, **kwargs) -> list[str]:
    with pytest.raises(EnvelopeError) as info:
        call(*args, **kwargs)
    assert info.value.problems, "an EnvelopeError must say what is wrong"
    assert str(info.value) == "; ".join(info.value.problems)
    return info.value.problems


# -- body envelopes (POST/PUT/PATCH) -----------------------------------------------------------

@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH"])
def test_body_envelope_payload_becomes_backend_body(method):
    payload = {"prompt": "héllo", "max_tokens": 16, "temperature": 0.5, "stop": ["\n"]}
    envelope = open_envelope(method, "/v1/completions?x=1", envelope_body(payload=payload),
                             unsecured=False)
    assert envelope.auth_data == AUTH
    assert json.loads(envelope.body) == payload
    assert envelope.path_qs is None  # the request's own path and query go to the backend
    assert envelope.cost == 100.0 and isinstance(envelope.cost, float)
    assert envelope.request_idx == 42


def test_body_envelope_keeps_auth_json_types_and_ignores_extra_keys():
    auth = dict(AUTH, cost=100.0, extra="ignored")
    envelope = open_body(envelope_body(auth, session_id=None), unsecured=False)
    assert envelope.auth_data["cost"] == 100.0 and isinstance(envelope.auth_data["cost"], float)
    as_int = open_body(envelope_body(dict(AUTH, cost=100)), unsecured=False)
    assert isinstance(as_int.auth_data["cost"], int)  # 100 and 100.0 sign differently


@pytest.mark.parametrize("payload", [None, [], [1, 2], "text", 3, {}])
def test_any_json_payload_is_passed_on(payload):
    body = json.dumps({"auth_data": AUTH, "payload": payload}).encode()
    envelope = open_body(body, unsecured=False)
    assert json.loads(envelope.body) == payload


def test_payload_missing_is_a_problem():
    body = json.dumps({"auth_data": AUTH}).encode()
    problems = problems_of(open_body, body, unsecured=False)
    assert len(problems) == 1 and "payload is missing" in problems[0]


def test_auth_data_missing_in_secured_mode():
    problems = problems_of(open_body, json.dumps({"payload": {}}).encode(), unsecured=False)
    assert len(problems) == 1 and "auth_data is missing" in problems[0]
    both = problems_of(open_body, b"{}", unsecured=False)
    assert any("auth_data is missing" in p for p in both)
    assert any("payload is missing" in p for p in both)


@pytest.mark.parametrize("name", REQUIRED_FIELDS)
def test_each_missing_auth_field_has_its_own_message(name):
    auth = {k: v for k, v in AUTH.items() if k != name}
    problems = problems_of(open_body, envelope_body(auth), unsecured=False)
    assert problems == [f"auth_data.{name} is missing"]


def test_all_fields_missing_gives_one_message_per_field():
    problems = problems_of(open_body, envelope_body({}, payload={"a": 1}), unsecured=False)
    assert problems == [f"auth_data.{name} is missing" for name in REQUIRED_FIELDS]
    assert "request_idx" not in REQUIRED_FIELDS and "request_idx" in AUTH_FIELDS


def test_a_legacy_envelope_without_request_idx_opens():
    """2024 autoscalers sign cost, endpoint, reqnum and url and send no request_idx."""
    legacy = {k: v for k, v in AUTH.items() if k != "request_idx"}
    envelope = open_body(envelope_body(legacy), unsecured=False)
    assert envelope.request_idx is None and envelope.cost == 100.0


@pytest.mark.parametrize("name,value,expected", [
    ("cost", "100", "auth_data.cost must be a finite number >= 0"),
    ("cost", -1, "auth_data.cost must be a finite number >= 0"),
    ("cost", -0.5, "auth_data.cost must be a finite number >= 0"),
    ("cost", True, "auth_data.cost must be a finite number >= 0"),
    ("cost", None, "auth_data.cost must be a finite number >= 0"),
    ("reqnum", 1.5, "auth_data.reqnum must be a whole number >= 0"),
    ("reqnum", 1.0, "auth_data.reqnum must be a whole number >= 0"),
    ("reqnum", -3, "auth_data.reqnum must be a whole number >= 0"),
    ("reqnum", "7", "auth_data.reqnum must be a whole number >= 0"),
    ("reqnum", False, "auth_data.reqnum must be a whole number >= 0"),
    ("request_idx", True, "auth_data.request_idx must be a whole number >= 0"),
    ("request_idx", None, "auth_data.request_idx must be a whole number >= 0"),
    ("endpoint", 5, "auth_data.endpoint must be a string"),
    ("signature", None, "auth_data.signature must be a string"),
    ("url", ["http://x"], "auth_data.url must be a string"),
])
def test_each_mistyped_auth_field_has_its_own_message(name, value, expected):
    problems = problems_of(open_body, envelope_body(dict(AUTH, **{name: value})),
                           unsecured=False)
    assert problems == [expected]


def test_several_mistyped_fields_each_reported():
    auth = dict(AUTH, cost="x", reqnum=-1, url=3)
    problems = problems_of(open_body, envelope_body(auth), unsecured=False)
    assert len(problems) == 3
    assert {p.split(" ")[0] for p in problems} == {"auth_data.cost", "auth_data.reqnum",
                                                   "auth_data.url"}


@pytest.mark.parametrize("raw", [b"NaN", b"-Infinity", b"Infinity", b"1e400"])
def test_non_finite_cost_refused(raw):
    body = (b'{"auth_data": {"cost": ' + raw + b', "endpoint": "e", "reqnum": 1, '
            b'"request_idx": 1, "signature": "s", "url": "u"}, "payload": {}}')
    problems = problems_of(open_body, body, unsecured=False)
    assert problems == ["auth_data.cost must be a finite number >= 0"]


def test_huge_integer_cost_refused_not_crashing():
    body = envelope_body(dict(AUTH, cost=10 ** 400))
    problems = problems_of(open_body, body, unsecured=False)
    assert problems == ["auth_data.cost must be a finite number >= 0"]


@pytest.mark.parametrize("auth", [[], "x", 3, None])
def test_auth_data_not_an_object(auth):
    problems = problems_of(open_body, envelope_body(auth), unsecured=False)
    assert problems == ["auth_data must be a JSON object"]


@pytest.mark.parametrize("body", [b"not json", b"{", b"\xff\xfe\x00", b'{"auth_data": '])
def test_non_json_body_needs_to_be_an_envelope(body):
    problems = problems_of(open_body, body, unsecured=False)
    assert len(problems) == 1 and "not JSON" in problems[0]


@pytest.mark.parametrize("body", [b"[1, 2]", b'"text"', b"3", b"null"])
def test_json_that_is_not_an_object(body):
    problems = problems_of(open_body, body, unsecured=False)
    assert len(problems) == 1 and "JSON object" in problems[0]


def test_empty_body_where_an_envelope_is_required():
    problems = problems_of(open_envelope, "POST", "/x", None, unsecured=False)
    assert len(problems) == 1 and "empty" in problems[0]
    assert open_envelope("POST", "/x", None, unsecured=True) is PASSTHROUGH


def test_check_auth_data_accepts_well_formed_and_zero_values():
    assert check_auth_data(AUTH) == []
    assert check_auth_data(dict(AUTH, cost=0, reqnum=0, request_idx=0, endpoint="")) == []
    assert check_auth_data(dict(AUTH, cost=0.25)) == []


# -- unsecured passthrough ---------------------------------------------------------------------

@pytest.mark.parametrize("body", [b'{"prompt": "hi"}', b"plain text", b"[1, 2, 3]",
                                  b'{"messages": [{"auth_data": 1}]}',
                                  b'{"prompt": "say \\"auth_data\\""}', b""])
def test_unsecured_without_auth_data_passes_through(body):
    assert open_envelope("POST", "/v1/x", body, unsecured=True) is PASSTHROUGH


@pytest.mark.parametrize("body", [b'["auth_data"]', b'not json but "auth_data"',
                                  b'"auth_data"'])
def test_unsecured_body_without_an_auth_data_key_passes_through(body):
    """No top-level auth_data key: in unsecured mode that is a plain request, not an envelope."""
    assert open_body(body, unsecured=True) is PASSTHROUGH


def test_unsecured_with_auth_data_is_still_opened_and_checked():
    envelope = open_body(envelope_body(payload={"a": 1}), unsecured=True)
    assert envelope.auth_data == AUTH and json.loads(envelope.body) == {"a": 1}
    problems = problems_of(open_body, envelope_body(dict(AUTH, cost="x")), unsecured=True)
    assert problems == ["auth_data.cost must be a finite number >= 0"]


def test_unsecured_get_without_serverless_params_passes_through():
    assert open_envelope("GET", "/models?a=1", None, unsecured=True) is PASSTHROUGH
    assert open_envelope("GET", "/models", None, unsecured=True) is PASSTHROUGH


@pytest.mark.parametrize("raw_path", ["/search?q=serverless_cost", "/search?q=my+serverless_x",
                                      "/a/serverless_b?c=d", "/s?serverless_other=1"])
def test_unsecured_get_with_serverless_text_but_no_auth_param_passes_through(raw_path):
    assert open_envelope("GET", raw_path, None, unsecured=True) is PASSTHROUGH


# -- query envelopes (GET/DELETE/HEAD) ---------------------------------------------------------

@pytest.mark.parametrize("method", ["GET", "DELETE", "HEAD"])
def test_query_auth_is_taken_out_and_other_params_kept(method):
    raw = f"/v1/models?b=2&{query_auth()}&a=1"
    envelope = open_envelope(method, raw, None, unsecured=False)
    assert envelope.auth_data == AUTH
    assert envelope.path_qs == "/v1/models?b=2&a=1"
    assert envelope.body is None
    assert envelope.cost == 100.0 and envelope.request_idx == 42


def test_query_keeps_other_params_exactly_as_sent():
    others = "z=%2F%20x&dup=1&dup=2&flag&plus=a+b&%E2%9C%93=%C3%A9&empty="
    raw = f"/p/a%20th?{others}&{query_auth()}"
    envelope = open_query(raw, unsecured=False)
    assert envelope.path_qs == f"/p/a%20th?{others}"


def test_query_only_auth_params_leaves_bare_path():
    envelope = open_query(f"/health?{query_auth()}", unsecured=False)
    assert envelope.path_qs == "/health"


def test_query_numbers_keep_json_types():
    envelope = open_query("/x?" + query_auth(dict(AUTH, cost="100.0")), unsecured=False)
    assert envelope.auth_data["cost"] == 100.0 and isinstance(envelope.auth_data["cost"], float)
    assert json.dumps(envelope.auth_data["cost"]) == "100.0"
    envelope = open_query("/x?" + query_auth(dict(AUTH, cost="100")), unsecured=False)
    assert isinstance(envelope.auth_data["cost"], int)
    assert isinstance(envelope.auth_data["reqnum"], int)
    assert isinstance(envelope.auth_data["request_idx"], int)


def test_query_strings_are_url_decoded():
    auth = dict(AUTH, signature="ab+/cd==", url="https://1.2.3.4:443", endpoint="my endpoint")
    envelope = open_query("/x?" + query_auth(auth), unsecured=False)
    assert envelope.auth_data["signature"] == "ab+/cd=="
    assert envelope.auth_data["url"] == "https://1.2.3.4:443"
    assert envelope.auth_data["endpoint"] == "my endpoint"
    # a numeric-looking string field stays a string
    envelope = open_query("/x?" + query_auth(dict(AUTH, endpoint="123")), unsecured=False)
    assert envelope.auth_data["endpoint"] == "123"


def test_query_missing_in_secured_mode_names_every_param():
    problems = problems_of(open_envelope, "GET", "/x?a=1", None, unsecured=False)
    assert problems == [f"query parameter serverless_{name} is missing"
                        for name in REQUIRED_FIELDS]


@pytest.mark.parametrize("name", REQUIRED_FIELDS)
def test_query_each_missing_param_has_its_own_message(name):
    auth = {k: v for k, v in AUTH.items() if k != name}
    problems = problems_of(open_query, "/x?" + query_auth(auth), unsecured=False)
    assert problems == [f"query parameter serverless_{name} is missing"]


@pytest.mark.parametrize("name,value", [("cost", "NaN"), ("cost", "-1"), ("cost", "true"),
                                        ("cost", "abc"), ("cost", "Infinity"),
                                        ("reqnum", "1.5"), ("request_idx", "x"),
                                        ("request_idx", "-2")])
def test_query_mistyped_numbers(name, value):
    problems = problems_of(open_query, "/x?" + query_auth(dict(AUTH, **{name: value})),
                           unsecured=False)
    assert len(problems) == 1
    assert problems[0].startswith(f"query parameter serverless_{name} must be")


def test_query_partial_auth_in_unsecured_mode_is_checked():
    problems = problems_of(open_query, "/x?serverless_cost=1", unsecured=True)
    assert len(problems) == len(REQUIRED_FIELDS) - 1


def test_envelope_dataclass_defaults():
    assert PASSTHROUGH == Envelope(None)
    assert PASSTHROUGH.body is None and PASSTHROUGH.path_qs is None and PASSTHROUGH.cost is None


# -- properties --------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.text() | st.floats(
    allow_nan=False, allow_infinity=False)
json_values = st.recursive(json_scalars, lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(st.text(max_size=8), children, max_size=4),
                           max_leaves=12)
well_formed_auth = st.fixed_dictionaries({
    "cost": st.integers(0, 10 ** 12) | st.floats(0, 1e12, allow_nan=False),
    "endpoint": st.text(max_size=30),
    "reqnum": st.integers(0, 2 ** 63),
    "request_idx": st.integers(0, 2 ** 63),
    "signature": st.text(max_size=50),
    "url": st.text(max_size=50),
}, optional={"session_key": json_values})


@settings(max_examples=200, deadline=None)
@given(auth=well_formed_auth, payload=json_values)
def test_any_well_formed_body_envelope_round_trips(auth, payload):
    body = json.dumps({"auth_data": auth, "payload": payload}).encode()
    envelope = open_body(body, unsecured=False)
    assert envelope.auth_data == auth
    assert json.loads(envelope.body) == payload
    assert envelope.cost == float(auth["cost"])
    assert envelope.request_idx == auth["request_idx"]
    for name in ("cost", "reqnum", "request_idx"):
        assert type(envelope.auth_data[name]) is type(auth[name])


def query_text(name: str, value) -> str:
    """How a client writes an auth value into the query: numbers as JSON, strings as they are."""
    return json.dumps(value) if name in ("cost", "reqnum", "request_idx") else value


query_keys = st.text(min_size=1, max_size=10).filter(lambda k: not k.startswith("serverless_"))
query_pairs = st.lists(st.tuples(query_keys, st.text(max_size=10)), max_size=6)


@settings(max_examples=200, deadline=None)
@given(auth=well_formed_auth, pairs=query_pairs, quoting=st.sampled_from([quote, quote_plus]),
       position=st.integers(0, 6))
def test_any_non_serverless_query_params_survive_exactly(auth, pairs, quoting, position):
    others = [f"{quoting(k, safe='')}={quoting(v, safe='')}" for k, v in pairs]
    auth_parts = [f"serverless_{name}={quote_plus(query_text(name, value))}"
                  for name, value in auth.items() if name in AUTH_FIELDS]
    position = min(position, len(others))
    parts = others[:position] + auth_parts + others[position:]
    envelope = open_query("/p/q?" + "&".join(parts), unsecured=False)
    assert envelope.path_qs == "/p/q" + ("?" + "&".join(others) if others else "")
    assert envelope.auth_data == {k: v for k, v in auth.items() if k in AUTH_FIELDS}
    for name in ("cost", "reqnum", "request_idx"):
        assert type(envelope.auth_data[name]) is type(auth[name])


@settings(max_examples=200, deadline=None)
@given(document=st.dictionaries(st.sampled_from(["auth_data", "payload", "x"]), json_values))
def test_any_json_object_either_opens_or_raises_envelope_error(document):
    body = json.dumps(document).encode()
    try:
        envelope = open_body(body, unsecured=False)
    except EnvelopeError as exc:
        assert exc.problems and all(isinstance(p, str) for p in exc.problems)
    else:
        assert check_auth_data(envelope.auth_data) == []


# -- the payload passed on as the client wrote it --------------------------------------------------

def test_the_payload_bytes_are_cut_from_the_envelope_not_re_encoded():
    payload = (b'{ "prompt" : "h\\u00e9llo \xc3\xa9", "n": 1.0e3, "big": 123456789012345678901234,'
               b' "stop": ["\\n"],\n\t"z": null, "a": -0.0 }')
    body = (b'{"auth_data": ' + json.dumps(AUTH).encode() + b', "session_id": null,\n'
            b' "payload": ' + payload + b' }\n')
    envelope = open_body(body, unsecured=False)
    assert envelope.body == payload  # spacing, key order, number spellings, escapes: as sent
    assert envelope.auth_data == AUTH and envelope.cost == 100.0 and envelope.session_id is None


@pytest.mark.parametrize("payload", [b"null", b"[]", b'"text"', b"3", b"{}", b"-1.5e-7", b"true"])
def test_any_json_payload_is_cut_whole(payload):
    body = b'{"payload":' + payload + b',"auth_data":' + json.dumps(AUTH).encode() + b"}"
    assert open_body(body, unsecured=False).body == payload


def test_a_repeated_key_counts_once_as_json_loads_reads_it_the_last():
    body = (b'{"payload": {"first": 1}, "auth_data": ' + json.dumps(AUTH).encode()
            + b', "payload": {"last": 2}}')
    assert open_body(body, unsecured=False).body == b'{"last": 2}'


@pytest.mark.parametrize("body", [
    "\ufeff".encode() + envelope_body(),  # a byte-order mark: json.loads reads it
    envelope_body().decode().encode("utf-16"),  # json.loads reads UTF-16 and UTF-32 too
    envelope_body().decode().encode("utf-32-le"),
])
def test_what_is_not_read_directly_is_json_loads_to_decide(body):
    envelope = open_body(body, unsecured=False)
    assert envelope.auth_data == AUTH and json.loads(envelope.body) == {"prompt": "hi"}


LONE = b'{"auth_data": {"cost": 1, "endpoint": "e", "reqnum": 1, "request_idx": 1, ' \
       b'"signature": "s", "url": "u"}, "payload": {"p": "%s lone"}}'


@pytest.mark.parametrize("body,passed_on", [
    (LONE % b"\\ud800", b'{"p": "\\ud800 lone"}'),  # escaped: cut as it is
    (LONE % b"\xed\xa0\x80", b'{"p":"\\ud800 lone"}'),  # raw: json.loads reads it, re-escaped
])
def test_a_lone_surrogate_in_the_payload_is_passed_on_escaped(body, passed_on):
    """It used to reach the backend re-encoded, and a lone surrogate cannot be UTF-8: the
    worker failed with a 500."""
    envelope = open_body(body, unsecured=False)
    assert envelope.body == passed_on
    assert json.loads(envelope.body) == {"p": "\ud800 lone"}


def reference_open_body(body: bytes) -> list[str] | tuple[dict, object, object]:
    """What open_body answered before the payload was cut from the body (json.loads, then
    json.dumps of the payload): its problems, or (auth_data, session_id, payload)."""
    try:
        document = json.loads(body)
    except RecursionError:
        return ["body is JSON nested too deeply to be an envelope"]
    except (ValueError, UnicodeDecodeError):
        return ['body must be a JSON envelope {"auth_data": {...}, "payload": {...}}, but it is '
                'not JSON']
    if not isinstance(document, dict):
        return ['body must be a JSON object {"auth_data": ..., "payload": ...}']
    if "auth_data" not in document:
        return ["auth_data is missing: send requests through the autoscaler's /route/"] + (
            [] if "payload" in document else ["payload is missing"])
    problems = check_auth_data(document["auth_data"])
    if "payload" not in document:
        problems.append("payload is missing (it is the JSON body the backend receives)")
    session_id = document.get("session_id")
    if session_id is not None and not isinstance(session_id, str):
        problems.append("session_id must be a string (from /session/create) or null")
    return problems or (document["auth_data"], session_id, document["payload"])


@settings(max_examples=400, deadline=None)
@given(auth=well_formed_auth, payload=json_values, session=st.none() | st.text(max_size=5),
       indent=st.none() | st.integers(0, 3), space=st.sampled_from(["", " ", "\n", "\t \r\n"]),
       ascii_only=st.booleans(), cut=st.none() | st.integers(0, 400),
       insert=st.sampled_from(["", ",", "}", "{", '"', ":", "x", " ", "\\", "]", "0"]))
def test_property_the_envelope_reads_as_json_loads_reads_it(auth, payload, session, indent, space,
                                                            ascii_only, cut, insert):
    """Any envelope, formatted any way and then broken anywhere: open_body opens what json.loads
    reads (the same auth data, a payload that is the same JSON) and refuses what it refuses."""
    document = {"auth_data": auth, "session_id": session, "payload": payload}
    text = json.dumps(document, indent=indent, ensure_ascii=ascii_only)
    text = space + text.replace(", ", "," + space) + space
    if cut is not None:
        cut = min(cut, len(text))
        text = text[:cut] + insert + text[cut:]
    body = text.encode("utf-8", "surrogatepass")
    expected = reference_open_body(body)
    try:
        envelope = open_body(body, unsecured=False)
    except EnvelopeError as error:
        assert error.problems == expected, body
        return
    assert (envelope.auth_data, envelope.session_id) == expected[:2], body
    assert json.loads(envelope.body) == expected[2]
    if cut is None:
        assert envelope.body in body  # the payload's own bytes


def test_with_path_keeps_every_other_field():
    """with_path is a hand-written replace: a field added to Envelope must not be dropped."""
    from vespa.corridor.envelope import Envelope, with_path
    full = Envelope({"a": 1}, b"body", "/old", 2.0, 3, "session", 4)
    assert None not in [getattr(full, f.name) for f in dataclasses.fields(Envelope)]  # all set
    assert with_path(full, "/p?q") == dataclasses.replace(full, path_qs="/p?q")
