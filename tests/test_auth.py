"""Signed-request checks: canonical messages, every scheme, tampering, URL binding, replays."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from Crypto.Hash import SHA256
from Crypto.PublicKey import RSA
from Crypto.Signature import pkcs1_15
from hypothesis import given, settings, strategies as st

from vespa.corridor import auth
from vespa.corridor.auth import PublicKey, ReplayWindow, verify

URL = "http://203.0.113.7:41234"
AUTH = {"cost": 100, "endpoint": "my-endpoint", "reqnum": 7, "request_idx": 3, "url": URL}


@pytest.fixture(scope="module")
def private_key() -> RSA.RsaKey:
    return RSA.generate(2048)


@pytest.fixture(scope="module")
def public_key(private_key) -> PublicKey:
    return PublicKey.from_pem(private_key.public_key().export_key("PEM"))


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
    assert verify(signed(private_key), private_key.public_key()).ok


def test_another_autoscaler_key_fails(public_key):
    other = RSA.generate(2048)
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
        pkcs1_15.new(private_key.public_key()).verify(digest, bytes(raw))
        expected = True
    except ValueError:
        expected = False
    with_signature = dict(auth_data, signature=base64.b64encode(raw).decode())
    assert verify(with_signature, public_key, "full").ok is expected


def test_the_private_rsa_operation_verify_relies_on(private_key, public_key):
    """PublicKey does one RSA operation per request, whatever the number of schemes tried, with
    pycryptodome's private RsaKey._encrypt (the public pkcs1_15 verify does one per scheme:
    perf/rsa_verify.py measures both). What that relies on, pinned so that a pycryptodome
    release that changes it fails here: _encrypt is signature^e mod n, and of a valid signature
    it gives the EMSA-PKCS1-v1_5 encoding of the SHA-256 digest (RFC 8017 section 9.2)."""
    key = private_key.public_key()
    assert public_key.raw_rsa == public_key.rsa_key._encrypt  # not the slower pow fallback
    message = auth.full_message(AUTH).encode()
    signature = pkcs1_15.new(private_key).sign(SHA256.new(message))
    size = key.size_in_bytes()
    digest_info = bytes.fromhex("3031300d060960864801650304020105000420")  # SHA-256, NULL params
    encoded = digest_info + hashlib.sha256(message).digest()
    expected = b"\x00\x01" + b"\xff" * (size - 3 - len(encoded)) + b"\x00" + encoded
    tampered = bytearray(signature)
    tampered[-1] ^= 0x01
    for raw, valid in ((signature, True), (bytes(tampered), False)):
        value = int.from_bytes(raw, "big")
        recovered = key._encrypt(value)
        assert int(recovered) == pow(value, key.e, key.n)
        assert (int(recovered).to_bytes(size, "big") == expected) is valid
        assert (public_key.recover_block(raw) == expected) is valid
    assert public_key.block_matches(public_key.recover_block(signature), auth.full_message(AUTH))


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
    assert [window.admit(n, "s") for n in (5, 3, 9, 4, 3)] == ["", "", "", "", window.check(3, "s")]
    assert window.check(3, "s").startswith("replayed")


def test_window_requires_integer_reqnum():
    window = ReplayWindow()
    assert window.admit("7", "s") == window.admit(True, "s") == "reqnum must be an integer"
    with pytest.raises(ValueError):
        ReplayWindow(size=0)


def test_window_memory_is_bounded_even_for_many_signatures_of_one_reqnum():
    window = ReplayWindow(size=50)
    for n in range(500):
        reason = window.admit(1000 + n // 100, f"sig{n}")
        assert reason == "" or reason.startswith("request too old")
        assert len(window) <= 50
    assert window.floor > 1000  # what was forgotten can never be accepted again
    assert window.check(1000, "sig0").startswith("request too old")


@settings(max_examples=200, deadline=None)
@given(size=st.integers(1, 30),
       arrivals=st.lists(st.tuples(st.integers(0, 200), st.sampled_from("abc")), max_size=300))
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
        assert (window.admit(reqnum, f"s{reqnum}") == "") is inside
        highest = reqnum if highest is None else max(highest, reqnum)
