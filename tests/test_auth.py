"""Signed-request checks: canonical messages, every scheme, tampering, URL binding, replays."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from Crypto.Hash import SHA256
from Crypto.PublicKey import RSA
from Crypto.Signature import pkcs1_15
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import example, given, settings, strategies as st

from vespa.corridor import auth
from vespa.corridor.auth import PublicKey, verify
from vespa.corridor.replay import ReplayWindow

URL = "http://203.0.113.7:41234"
AUTH = {"cost": 100, "endpoint": "my-endpoint", "reqnum": 7, "request_idx": 3, "url": URL}


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pem_of(private_key) -> str:
    return PublicKey(private_key.public_key()).pem


@pytest.fixture(scope="module")
def private_key() -> rsa.RSAPrivateKey:
    return new_key()


@pytest.fixture(scope="module")
def public_key(private_key) -> PublicKey:
    return PublicKey.from_pem(pem_of(private_key))


@pytest.fixture
def fresh_public_key(private_key) -> PublicKey:
    """The same key parsed anew: nothing verified yet (the module's key remembers)."""
    return PublicKey.from_pem(pem_of(private_key))


def signed(private_key, scheme: str = "full", **changes) -> dict:
    auth_data = dict(AUTH, **changes)
    return dict(auth_data, signature=auth.sign(private_key, auth_data, scheme))


# -- canonical messages ------------------------------------------------------------------------

def test_full_message_is_sorted_indented_json_of_five_fields():
    extra = dict(AUTH, signature="x", session_id=None)
    assert auth.full_message(extra) == (
        '{\n    "cost": 100,\n    "endpoint": "my-endpoint",\n    "reqnum": 7,\n'
        f'    "request_idx": 3,\n    "url": "{URL}"\n}}')


def test_url_message_is_the_url_alone():
    assert auth.url_message(AUTH) == f'{{\n    "url": "{URL}"\n}}'


def test_legacy_message_keeps_2024_field_order_whatever_the_input_order():
    shuffled = {"url": URL, "reqnum": 7, "endpoint": "my-endpoint", "cost": 100}
    assert auth.legacy_message(shuffled) == (
        '{\n    "cost": 100,\n    "endpoint": "my-endpoint",\n    "reqnum": 7,\n'
        f'    "url": "{URL}"\n}}')


def test_messages_keep_json_number_types():
    assert '"cost": 100,' in auth.full_message(AUTH)
    assert '"cost": 100.0,' in auth.full_message(dict(AUTH, cost=100.0))


def test_messages_escape_non_ascii_like_the_autoscaler():
    assert '"endpoint": "caf\\u00e9"' in auth.full_message(dict(AUTH, endpoint="café"))


def test_message_builders_name_missing_fields():
    with pytest.raises(auth.AuthDataError, match="missing reqnum, url"):
        auth.signed_message({"cost": 1, "endpoint": "e", "request_idx": 1}, "full")
    with pytest.raises(ValueError, match="unknown signature scheme"):
        auth.signed_message(AUTH, "nope")


json_scalars = (st.none() | st.booleans() | st.integers() | st.integers(-2**70, 2**70)
                | st.floats() | st.text(st.characters(codec=None, categories=None), max_size=12))
json_values = st.recursive(json_scalars, lambda children: st.lists(children, max_size=3)
                           | st.dictionaries(st.text(max_size=5), children, max_size=3),
                           max_leaves=6)


@settings(max_examples=300, deadline=None)
@given(values=st.fixed_dictionaries({name: json_values for name in auth.FULL_FIELDS}))
@example(values={"cost": float("nan"), "endpoint": "\ud800\n\"", "reqnum": 10**5000,
                 "request_idx": -0.0, "url": [1, {"a": None}]})
@example(values={"cost": 1e16, "endpoint": "", "reqnum": True, "request_idx": 10**18,
                 "url": float("-inf")})
def test_property_messages_are_exactly_what_json_dumps_writes(values):
    """The messages are written directly for JSON scalars: byte for byte what the autoscaler's
    json.dumps(obj, indent=4[, sort_keys=True]) writes, whatever the values; what json.dumps
    refuses (an integer past str()'s digit limit) is an AuthDataError either way."""
    for build, fields, sort_keys in ((auth.full_message, auth.FULL_FIELDS, True),
                                     (auth.url_message, ("url",), True),
                                     (auth.legacy_message, auth.LEGACY_FIELDS, False)):
        try:
            expected = json.dumps({name: values[name] for name in fields}, indent=4,
                                  sort_keys=sort_keys)
        except ValueError:
            with pytest.raises(auth.AuthDataError, match="not plain JSON"):
                build(values)
            continue
        assert build(values) == expected


# -- every scheme ------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", auth.SCHEMES)
def test_each_scheme_verifies_explicitly_and_under_auto(private_key, public_key, scheme):
    auth_data = signed(private_key, scheme)
    assert verify(auth_data, public_key, scheme) == auth.Verdict(True, "", scheme)
    assert verify(auth_data, public_key) == auth.Verdict(True, "", scheme)


@pytest.mark.parametrize("signed_as,checked_as", [
    ("full", "url"), ("full", "legacy"), ("url", "full"), ("url", "legacy"),
    ("legacy", "full"), ("legacy", "url")])
def test_a_scheme_does_not_verify_as_another(private_key, public_key, signed_as, checked_as):
    verdict = verify(signed(private_key, signed_as), public_key, checked_as)
    assert not verdict.ok
    assert f"the {checked_as} scheme" in verdict.reason


def test_legacy_autoscaler_without_request_idx_verifies_under_auto(private_key, public_key):
    auth_data = signed(private_key, "legacy")
    del auth_data["request_idx"]
    assert verify(auth_data, public_key).scheme == "legacy"


def test_verify_accepts_a_pycryptodome_key(private_key):
    assert verify(signed(private_key), RSA.import_key(pem_of(private_key))).ok


def test_verify_accepts_a_cryptography_key(private_key):
    assert verify(signed(private_key), private_key.public_key()).ok
    assert verify(signed(private_key), private_key).ok


def test_another_autoscaler_key_fails(public_key):
    other = new_key()
    verdict = verify(signed(other), public_key)
    assert not verdict.ok and "does not verify under any scheme" in verdict.reason


# -- tampering ---------------------------------------------------------------------------------

TAMPERED = {"cost": 101, "endpoint": "other-endpoint", "reqnum": 8, "request_idx": 4,
            "url": "http://203.0.113.8:41234"}


@pytest.mark.parametrize("scheme", ["auto", "full"])
@pytest.mark.parametrize("field", auth.FULL_FIELDS)
def test_full_scheme_every_field_tampered_fails(private_key, public_key, scheme, field):
    auth_data = dict(signed(private_key, "full"), **{field: TAMPERED[field]})
    assert not verify(auth_data, public_key, scheme).ok


@pytest.mark.parametrize("field", auth.LEGACY_FIELDS)
def test_legacy_scheme_every_field_tampered_fails(private_key, public_key, field):
    auth_data = dict(signed(private_key, "legacy"), **{field: TAMPERED[field]})
    assert not verify(auth_data, public_key, "legacy").ok
    assert not verify(auth_data, public_key).ok


def test_url_scheme_binds_only_the_url(private_key, public_key):
    auth_data = signed(private_key, "url")
    assert not verify(dict(auth_data, url=TAMPERED["url"]), public_key).ok
    assert verify(dict(auth_data, cost=10**6, reqnum=1), public_key).ok


def test_signature_tampered_fails(private_key, public_key):
    auth_data = signed(private_key)
    raw = bytearray(base64.b64decode(auth_data["signature"]))
    raw[-1] ^= 1
    assert not verify(dict(auth_data, signature=base64.b64encode(raw).decode()), public_key).ok


@pytest.mark.parametrize("signed_cost,sent_cost", [(100, 100.0), (100.0, 100)])
def test_int_and_float_cost_sign_differently(private_key, public_key, signed_cost, sent_cost):
    auth_data = signed(private_key, cost=signed_cost)
    assert verify(auth_data, public_key, "full").ok
    assert not verify(dict(auth_data, cost=sent_cost), public_key, "full").ok


@settings(max_examples=60, deadline=None)
@given(original=st.fixed_dictionaries({
           "cost": st.one_of(st.integers(0, 10**6), st.floats(0, 1e6, allow_nan=False)),
           "endpoint": st.text(max_size=20), "reqnum": st.integers(0, 2**40),
           "request_idx": st.integers(0, 2**40), "url": st.text(max_size=40)}),
       field=st.sampled_from(auth.FULL_FIELDS),
       replacement=st.one_of(st.integers(), st.floats(allow_nan=False), st.text(max_size=20),
                             st.booleans(), st.none()))
def test_property_any_tampering_of_a_full_message_fails(private_key, public_key, original,
                                                        field, replacement):
    auth_data = dict(original, signature=auth.sign(private_key, original, "full"))
    assert verify(auth_data, public_key, "full").ok
    if json.dumps(replacement) != json.dumps(original[field]):
        assert not verify(dict(auth_data, **{field: replacement}), public_key, "full").ok


@settings(max_examples=40, deadline=None)
@given(message=st.text(max_size=60), flip=st.one_of(st.none(), st.integers(0, 255)))
def test_property_fast_verify_agrees_with_pycryptodome(private_key, public_key, message, flip):
    auth_data = dict(AUTH, endpoint=message)
    raw = bytearray(base64.b64decode(auth.sign(private_key, auth_data, "full")))
    if flip is not None:
        raw[flip] ^= 0x80
    digest = SHA256.new(auth.full_message(auth_data).encode())
    try:
        pkcs1_15.new(RSA.import_key(public_key.pem)).verify(digest, bytes(raw))
        expected = True
    except ValueError:
        expected = False
    with_signature = dict(auth_data, signature=base64.b64encode(raw).decode())
    assert verify(with_signature, public_key, "full").ok is expected


def encoded_block(size: int, data: bytes) -> bytes:
    """EMSA-PKCS1-v1_5 (RFC 8017 section 9.2): 00 01 FF..FF 00 data."""
    return b"\x00\x01" + b"\xff" * (size - 3 - len(data)) + b"\x00" + data


def raw_signature(private_key, block: bytes) -> bytes:
    """The RSA signature whose public operation gives ``block`` (block^d mod n)."""
    numbers = private_key.private_numbers()
    n = numbers.public_numbers.n
    return pow(int.from_bytes(block, "big"), numbers.d, n).to_bytes(len(block), "big")


def test_the_rsa_recovery_verify_relies_on(private_key, fresh_public_key):
    """PublicKey does one RSA operation per request, whatever the number of schemes tried, with
    cryptography's public recover_data_from_signature(signature, PKCS1v15(), None) (its verify
    does one per scheme: perf/rsa_verify.py measures both). What that relies on, pinned so that a
    release that changes it fails here: it gives the data under a well-formed EMSA-PKCS1-v1_5
    signature padding (RFC 8017 section 9.2) and refuses any other block, so comparing that data
    with the whole DigestInfo and digest is the standard's verification."""
    key = fresh_public_key
    message = auth.full_message(AUTH)
    digest = hashlib.sha256(message.encode()).digest()
    for info in auth.SHA256_DIGEST_INFOS:  # with and without the NULL parameters
        raw = raw_signature(private_key, encoded_block(key.size_bytes, info + digest))
        assert key.recover(raw) == info + digest
        assert verify(dict(AUTH, signature=base64.b64encode(raw).decode()), key, "full").ok
    good = encoded_block(key.size_bytes, auth.SHA256_DIGEST_INFOS[0] + digest)
    not_padded_as_a_signature = [
        b"\x00\x02" + good[2:],  # encryption padding
        good[:10] + b"\xfe" + good[11:],  # a byte of the padding string is not FF
        b"\x00\x01" + b"\xff" * 4 + b"\x00" + good[7:],  # padding string shorter than 8 bytes
        b"\x00\x01" + b"\xff" * (key.size_bytes - 2),  # no separator
    ]
    for block in not_padded_as_a_signature:
        assert key.recover(raw_signature(private_key, block)) is None
    # well padded around other data: recovered, and no scheme's DigestInfo and digest
    longer = encoded_block(key.size_bytes, b"\x00" + auth.SHA256_DIGEST_INFOS[0] + digest)
    raw = raw_signature(private_key, longer)
    assert key.recover(raw) == b"\x00" + auth.SHA256_DIGEST_INFOS[0] + digest
    assert not verify(dict(AUTH, signature=base64.b64encode(raw).decode()), key, "full").ok
    tampered = bytearray(raw_signature(private_key, good))
    tampered[-1] ^= 0x01
    assert key.recover(bytes(tampered)) is None
    assert key.recover(key.modulus.to_bytes(key.size_bytes, "big")) is None  # >= n
    assert len(key.verified) == 0  # only url-only signatures are remembered


# -- malformed input: a failed verdict with a reason, never an exception -----------------------

@pytest.mark.parametrize("signature,reason", [
    ("not base64 at all!", "not valid base64"),
    ("QUJD", "3 bytes, expected 256"),
    (base64.b64encode(b"\x01" * 255).decode(), "255 bytes, expected 256"),
    (base64.b64encode(b"\xff" * 256).decode(), "does not verify"),  # above the modulus
    (base64.b64encode(b"\x00" * 256).decode(), "does not verify"),
    (12345, "must be a base64 string"),
    (None, "must be a base64 string"),
])
def test_bad_signatures_fail_with_a_reason(private_key, public_key, signature, reason):
    verdict = verify(dict(signed(private_key), signature=signature), public_key)
    assert not verdict.ok and reason in verdict.reason


@pytest.mark.parametrize("auth_data,reason", [
    ({k: v for k, v in AUTH.items()}, "missing signature"),
    ([1, 2, 3], "must be a JSON object"),
    ("auth", "must be a JSON object"),
])
def test_malformed_auth_data_fails_with_a_reason(public_key, auth_data, reason):
    verdict = verify(auth_data, public_key)
    assert not verdict.ok and reason in verdict.reason


def test_missing_fields_are_named(private_key, public_key):
    auth_data = signed(private_key)
    del auth_data["url"], auth_data["reqnum"]
    assert verify(auth_data, public_key).reason == "auth_data is missing reqnum, url"
    assert verify(auth_data, public_key, "url").reason == "auth_data is missing url"


def test_values_that_are_not_json_fail_without_raising(private_key, public_key):
    verdict = verify(dict(signed(private_key), cost=object()), public_key, "full")
    assert not verdict.ok and "not plain JSON" in verdict.reason


def test_unknown_scheme_is_a_failed_verdict(private_key, public_key):
    assert "unknown signature scheme" in verify(signed(private_key), public_key, "md5").reason


def test_public_key_from_pem_rejects_garbage():
    with pytest.raises(ValueError, match="not an RSA public key"):
        PublicKey.from_pem("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")


def test_public_key_round_trips_pem(public_key):
    assert PublicKey.from_pem(public_key.pem).modulus == public_key.modulus


# -- URL binding -------------------------------------------------------------------------------

@pytest.mark.parametrize("expected", [URL, URL + "/"])
@pytest.mark.parametrize("scheme", auth.SCHEMES)
def test_url_binding_accepts_this_worker_trailing_slash_aside(private_key, public_key, scheme,
                                                              expected):
    assert verify(signed(private_key, scheme), public_key, expected_url=expected).ok
    slashed = signed(private_key, scheme, url=URL + "/")
    assert verify(slashed, public_key, expected_url=expected).ok


@pytest.mark.parametrize("scheme", auth.SCHEMES)
def test_url_binding_refuses_a_request_signed_for_another_worker(private_key, public_key,
                                                                 scheme):
    verdict = verify(signed(private_key, scheme), public_key,
                     expected_url="http://203.0.113.7:41235")
    assert not verdict.ok and verdict.scheme == scheme
    assert verdict.reason.startswith("signed for another worker")


# -- replay window -----------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["full", "legacy"])
def test_replay_is_refused_under_reqnum_schemes(private_key, public_key, scheme):
    window = ReplayWindow(size=100)
    auth_data = signed(private_key, scheme)
    assert verify(auth_data, public_key, replay=window).ok
    verdict = verify(auth_data, public_key, replay=window)
    assert not verdict.ok and verdict.reason.startswith("replayed request")


def test_url_only_scheme_is_not_replay_checked(private_key, public_key):
    window = ReplayWindow(size=100)
    auth_data = signed(private_key, "url")
    assert all(verify(auth_data, public_key, replay=window).ok for _ in range(3))
    assert len(window) == 0


def test_too_old_reqnum_is_refused(private_key, public_key):
    window = ReplayWindow(size=10)
    assert verify(signed(private_key, reqnum=100), public_key, replay=window).ok
    assert verify(signed(private_key, reqnum=90), public_key, replay=window).ok
    verdict = verify(signed(private_key, reqnum=89), public_key, replay=window)
    assert not verdict.ok and verdict.reason.startswith("request too old")


def test_refused_requests_do_not_enter_the_window(private_key, public_key):
    window = ReplayWindow(size=10)
    forged = dict(signed(private_key, reqnum=5), reqnum=10**9)
    assert not verify(forged, public_key, replay=window).ok
    elsewhere = signed(private_key, reqnum=6)
    assert not verify(elsewhere, public_key, expected_url="http://other:1", replay=window).ok
    assert len(window) == 0 and window.max_reqnum is None
    assert verify(elsewhere, public_key, expected_url=URL, replay=window).ok


def test_window_accepts_out_of_order_arrivals_inside_it():
    window = ReplayWindow(size=10)
    assert [window.admit(n, b"s") for n in (5, 3, 9, 4, 3)] == ["", "", "", "", window.check(3, b"s")]
    assert window.check(3, b"s").startswith("replayed")


def test_window_requires_integer_reqnum():
    window = ReplayWindow()
    assert window.admit("7", b"s") == window.admit(True, b"s") == "reqnum must be an integer"
    with pytest.raises(ValueError):
        ReplayWindow(size=0)


def test_window_memory_is_bounded_even_for_many_signatures_of_one_reqnum():
    window = ReplayWindow(size=50)
    for n in range(500):
        reason = window.admit(1000 + n // 100, f"sig{n}".encode())
        assert reason == "" or reason.startswith("request too old")
        assert len(window) <= 50
    assert window.floor > 1000  # what was forgotten can never be accepted again
    assert window.check(1000, b"sig0").startswith("request too old")


def test_window_holds_many_signatures_of_one_reqnum_each_refused_once_seen():
    """A busy endpoint may share a reqnum among many signatures: each is admitted once, its
    replay refused, and the window stays cheap to consult (a set, not a list, past the first)."""
    window = ReplayWindow(size=5000)
    signatures = [n.to_bytes(256, "big") for n in range(5000)]
    assert all(window.admit(7, sig) == "" for sig in signatures)
    assert len(window) == 5000
    assert all(window.check(7, sig).startswith("replayed") for sig in signatures[::97])
    assert window.check(7, b"\xff" * 256) == ""
    window.record(7, signatures[0])  # a pair it holds is not counted twice
    assert len(window) == 5000


@settings(max_examples=200, deadline=None)
@given(size=st.integers(1, 30),
       arrivals=st.lists(st.tuples(st.integers(0, 200), st.sampled_from([b"a", b"b", b"c"])), max_size=300))
def test_property_window_is_bounded_and_never_accepts_a_replay(size, arrivals):
    window = ReplayWindow(size=size)
    accepted = set()
    for reqnum, signature in arrivals:
        fresh = (reqnum, signature) not in accepted
        if window.admit(reqnum, signature) == "":
            assert fresh
            accepted.add((reqnum, signature))
        assert len(window) <= size


@settings(max_examples=200, deadline=None)
@given(size=st.integers(1, 30), reqnums=st.lists(st.integers(0, 200), unique=True, max_size=200))
def test_property_fresh_reqnums_inside_the_window_are_accepted(size, reqnums):
    window = ReplayWindow(size=size)
    highest = None
    for reqnum in reqnums:
        inside = highest is None or reqnum >= highest - size
        assert (window.admit(reqnum, f"s{reqnum}".encode()) == "") is inside
        highest = reqnum if highest is None else max(highest, reqnum)


# -- the verified-signature cache (url-only: one signature for every request to a worker) -------

def url_signed(private_key, url: str = URL, **changes) -> dict:
    return signed(private_key, "url", url=url, **changes)


def with_signature(auth_data: dict, raw: bytes) -> dict:
    return dict(auth_data, signature=base64.b64encode(raw).decode())


@pytest.mark.parametrize("scheme", ["auto", "url"])
def test_a_url_only_signature_is_verified_once_then_remembered(private_key, fresh_public_key,
                                                               scheme):
    key = fresh_public_key
    auth_data = url_signed(private_key)
    raw = base64.b64decode(auth_data["signature"])
    assert verify(auth_data, key, scheme, expected_url=URL).ok
    assert list(key.verified.entries) == [auth_data["signature"]]
    assert key.verified.get(auth_data["signature"]) == (  # no RSA operation from here on
        raw, key.recover(raw), "url", auth.url_message(auth_data))
    for reqnum in range(3):  # every request routed here: the same message and signature
        assert verify(dict(auth_data, reqnum=reqnum), key, scheme,
                      expected_url=URL) == auth.Verdict(True, "", "url")
    assert len(key.verified) == 1


def test_a_remembered_signature_still_refuses_a_tampered_message(private_key, fresh_public_key):
    key = fresh_public_key
    auth_data = url_signed(private_key)
    assert verify(auth_data, key).ok and len(key.verified) == 1
    for scheme in ("auto", "url"):
        verdict = verify(dict(auth_data, url=URL + "0"), key, scheme)
        assert not verdict.ok and verdict.mismatch and verdict.scheme is None
    # a signature under the url scheme is no signature under another
    assert not verify(auth_data, key, "full").ok and not verify(auth_data, key, "legacy").ok
    assert len(key.verified) == 1


def test_a_tampered_signature_is_verified_afresh_and_refused(private_key, fresh_public_key):
    key = fresh_public_key
    auth_data = url_signed(private_key)
    assert verify(auth_data, key).ok
    raw = bytearray(base64.b64decode(auth_data["signature"]))
    for index in (0, 100, 255):
        tampered = bytearray(raw)
        tampered[index] ^= 0x01
        assert not verify(with_signature(auth_data, bytes(tampered)), key).ok
    assert len(key.verified) == 1


def test_a_rotated_key_starts_with_nothing_verified(private_key, fresh_public_key):
    """The cache lives on the key: the key ring's new key (another autoscaler key, or the same
    key fetched again) remembers nothing, and a signature of the old key fails under the new."""
    auth_data = url_signed(private_key)
    assert verify(auth_data, fresh_public_key).ok and len(fresh_public_key.verified) == 1
    rotated = PublicKey.from_pem(pem_of(new_key()))
    verdict = verify(auth_data, rotated)
    assert not verdict.ok and verdict.mismatch and len(rotated.verified) == 0
    again = PublicKey.from_pem(fresh_public_key.pem)
    assert len(again.verified) == 0 and verify(auth_data, again).ok


def test_only_url_only_signatures_that_verified_are_remembered(private_key, fresh_public_key):
    key = fresh_public_key
    assert verify(signed(private_key, "full"), key).ok
    assert verify(signed(private_key, "legacy"), key).ok  # good once each: nothing to reuse
    assert not verify(url_signed(new_key()), key).ok  # forged: cannot push a good one out
    elsewhere = url_signed(private_key, url="http://203.0.113.9:1")
    assert not verify(elsewhere, key, expected_url=URL).ok  # signed for another worker
    assert len(key.verified) == 0


def test_the_cache_at_its_bound_forgets_the_oldest_and_verifies_it_afresh(private_key):
    key = PublicKey.from_pem(pem_of(private_key), cache_size=3)
    requests = [url_signed(private_key, url=f"http://203.0.113.7:{port}")
                for port in range(40000, 40005)]
    texts = [auth_data["signature"] for auth_data in requests]
    for auth_data in requests:
        assert verify(auth_data, key).ok
        assert len(key.verified) <= 3
    assert list(key.verified.entries) == texts[2:]
    assert verify(requests[0], key).ok  # forgotten: verified again, and remembered again
    assert list(key.verified.entries) == texts[3:] + texts[:1]
    assert not verify(dict(requests[4], url=requests[3]["url"]), key).ok
    with pytest.raises(ValueError):
        auth.VerifiedSignatures(0)


@settings(max_examples=150, deadline=None)
@given(steps=st.lists(st.tuples(st.integers(0, 3), st.sampled_from(
    ["as signed", "url", "signature", "spelling", "another key"]), st.sampled_from(
    ["auto", "url", "full"])), min_size=1, max_size=12),
    size=st.integers(1, 3))
def test_property_a_cache_hit_answers_exactly_as_a_fresh_verification(private_key, public_key,
                                                                      steps, size):
    """Whatever came before (which signatures were remembered, which were pushed out), a key
    with the cache gives the verdict a freshly parsed key gives, for every message and
    signature, altered or not."""
    cached = PublicKey.from_pem(public_key.pem, cache_size=size)
    for which, change, scheme in steps:
        auth_data = URL_SIGNED[which]
        if change == "url":
            auth_data = dict(auth_data, url=URL_SIGNED[(which + 1) % 4]["url"])
        elif change == "signature":
            raw = bytearray(base64.b64decode(auth_data["signature"]))
            raw[which] ^= 0x04
            auth_data = with_signature(auth_data, bytes(raw))
        elif change == "spelling":
            auth_data = dict(auth_data, signature=spellings(auth_data["signature"])[which + 5])
        elif change == "another key":
            auth_data = OTHER_KEY_SIGNED[which]
        fresh = PublicKey.from_pem(public_key.pem)
        assert verify(auth_data, cached, scheme) == verify(auth_data, fresh, scheme)
        assert len(cached.verified) <= size


URL_SIGNED: list[dict] = []
OTHER_KEY_SIGNED: list[dict] = []


@pytest.fixture(autouse=True, scope="module")
def _url_signed_requests(private_key):
    other = new_key()
    URL_SIGNED[:] = [url_signed(private_key, url=f"http://203.0.113.7:{4000 + i}")
                     for i in range(4)]
    OTHER_KEY_SIGNED[:] = [url_signed(other, url=f"http://203.0.113.7:{4000 + i}")
                           for i in range(4)]


# -- base64 spellings: one signature, 16 ways to write it (issue #17) ----------------------------

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def spellings(signature: str) -> list[str]:
    """Every standard-base64 spelling of the signature's bytes: the character before the padding
    carries bits no byte uses (4 of them for 256 bytes, whose base64 ends in '==')."""
    body = signature.rstrip("=")
    unused = {2: 4, 1: 2, 0: 0}[len(signature) - len(body)]
    value = B64.index(body[-1]) & ~((1 << unused) - 1)
    return [body[:-1] + B64[value | low] + signature[len(body):] for low in range(1 << unused)]


def test_the_spellings_are_16_and_decode_to_the_same_signature(private_key):
    signature = signed(private_key)["signature"]
    written = spellings(signature)
    assert len(set(written)) == 16 and signature in written
    assert {base64.b64decode(text, validate=True) for text in written} == {
        base64.b64decode(signature)}


@pytest.mark.parametrize("scheme", ["full", "legacy"])
def test_a_replay_in_another_base64_spelling_is_refused(private_key, public_key, scheme):
    """Issue #17: the replay window keyed on the signature's text, so each of the 16 spellings
    of one signature was served (and reported) once. It keys on the bytes now."""
    window = ReplayWindow(size=100)
    auth_data = signed(private_key, scheme)
    verdicts = [verify(dict(auth_data, signature=text), public_key, replay=window)
                for text in spellings(auth_data["signature"])]
    assert sum(v.ok for v in verdicts) == 1 and len(window) == 1
    assert all(v.reason.startswith("replayed request") for v in verdicts if not v.ok)
    for text in spellings(auth_data["signature"]):  # each spelling alone verifies
        assert verify(dict(auth_data, signature=text), public_key).ok


def test_every_spelling_of_a_url_only_signature_is_its_own_cache_entry(private_key,
                                                                        fresh_public_key):
    """The cache keys on the signature's exact text: another spelling is verified afresh (it
    decodes to the same bytes, so it verifies) and remembered as itself; none of them lets a
    tampered message through."""
    auth_data = url_signed(private_key)
    for text in spellings(auth_data["signature"]):
        assert verify(dict(auth_data, signature=text), fresh_public_key).ok
    assert len(fresh_public_key.verified) == 16
    tampered = dict(auth_data, url=URL + "0")
    assert not any(verify(dict(tampered, signature=text), fresh_public_key).ok
                   for text in spellings(auth_data["signature"]))
