"""Signed-request checks (pure core): canonical messages, RSA verify, URL binding, replay window.

Values in, values out: no clock, environment or socket here. The public key is parsed once into a
``PublicKey``; ``verify`` returns a ``Verdict`` whose ``reason`` is fit for a 401 error message.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass

from Crypto.Hash import SHA256
from Crypto.PublicKey import RSA
from Crypto.Signature import pkcs1_15
from mypy_extensions import mypyc_attr

SCHEMES = ("full", "url", "legacy")
"""Signature schemes, in the order ``auto`` tries them (the message that binds most first)."""
FULL_FIELDS = ("cost", "endpoint", "reqnum", "request_idx", "url")
LEGACY_FIELDS = ("cost", "endpoint", "reqnum", "url")
REPLAY_SCHEMES = frozenset({"full", "legacy"})
"""Schemes whose message carries reqnum; under url-only every request has the same signature."""
DEFAULT_REPLAY_WINDOW = 10_000


@mypyc_attr(native_class=False)  # a builtin exception's subclass stays a Python class
class AuthDataError(ValueError):
    """auth_data cannot make a signed message (a field is missing or not JSON)."""


@dataclass(frozen=True)
class Verdict:
    """The outcome of a signature check: ``ok``, the scheme that verified, or why it failed."""

    ok: bool
    reason: str = ""
    scheme: str | None = None
    mismatch: bool = False  # a well-formed signature that matches no scheme's message


# DER DigestInfo prefixes for SHA-256 (RFC 8017 section 9.2, note 1), with and without the NULL
# parameters: pycryptodome's pkcs1_15 accepts both, and so do we.
SHA256_DIGEST_INFOS = (
    bytes.fromhex("3031300d060960864801650304020105000420"),
    bytes.fromhex("302f300b0609608648016503040201" "0420"),
)


class PublicKey:
    """The autoscaler's RSA public key, parsed once and prepared for the request path.

    Verifying costs one RSA public operation per signature whatever the number of schemes tried:
    the recovered EMSA-PKCS1-v1_5 block is compared with the expected block of each message.
    """

    def __init__(self, rsa_key: RSA.RsaKey):
        self.rsa_key = rsa_key.public_key()
        self.size_bytes = self.rsa_key.size_in_bytes()
        self.modulus = int(self.rsa_key.n)
        exponent = int(self.rsa_key.e)
        # pycryptodome's private _encrypt (signature^e mod n): its modexp is ~3x faster than
        # Python's pow, kept as a fallback. The public pkcs1_15 verify would cost one RSA
        # operation per scheme tried (perf/rsa_verify.py); tests/test_auth.py pins what this
        # relies on.
        self.raw_rsa = getattr(self.rsa_key, "_encrypt", None) or (
            lambda value: pow(value, exponent, self.modulus))
        # what an operator compares with the autoscaler's /pubkey/ when signatures fail
        self.fingerprint = "sha256:" + hashlib.sha256(
            self.rsa_key.export_key("DER")).hexdigest()[:16]
        self.block_prefixes = tuple(
            b"\x00\x01" + b"\xff" * (self.size_bytes - 3 - len(info) - 32) + b"\x00" + info
            for info in SHA256_DIGEST_INFOS)

    @classmethod
    def from_pem(cls, pem: str | bytes) -> "PublicKey":
        """Parse a PEM public key; ValueError with a readable message when it is not one."""
        try:
            return cls(RSA.import_key(pem))
        except (ValueError, IndexError, TypeError) as exc:
            raise ValueError(f"not an RSA public key in PEM form: {exc}") from None

    @property
    def pem(self) -> str:
        return self.rsa_key.export_key("PEM").decode("ascii")

    def recover_block(self, raw_signature: bytes) -> bytes | None:
        """signature^e mod n as a block of the key's size; None when the signature is >= n."""
        value = int.from_bytes(raw_signature, "big")
        if value >= self.modulus:
            return None
        return int(self.raw_rsa(value)).to_bytes(self.size_bytes, "big")

    def block_matches(self, block: bytes, message: str) -> bool:
        """Whether ``block`` is the PKCS#1 v1.5 encoding of SHA-256 of the UTF-8 ``message``."""
        digest = hashlib.sha256(message.encode("utf-8")).digest()
        return any(hmac.compare_digest(block, prefix + digest) for prefix in self.block_prefixes)


# -- canonical messages ----------------------------------------------------------------------

def _pick(auth_data: Mapping, fields: tuple[str, ...]) -> dict:
    missing = [name for name in fields if name not in auth_data]
    if missing:
        raise AuthDataError(f"auth_data is missing {', '.join(missing)}")
    return {name: auth_data[name] for name in fields}


def _dumps(obj: dict, sort_keys: bool) -> str:
    try:
        return json.dumps(obj, indent=4, sort_keys=sort_keys)
    except (TypeError, ValueError) as exc:
        raise AuthDataError(f"auth_data is not plain JSON: {exc}") from None


def full_message(auth_data: Mapping) -> str:
    """The full scheme: cost, endpoint, reqnum, request_idx, url, sorted, JSON types as received."""
    return _dumps(_pick(auth_data, FULL_FIELDS), sort_keys=True)


def url_message(auth_data: Mapping) -> str:
    """The url-only scheme (2026): ``{"url": ...}``, the same for every request to a worker."""
    return _dumps(_pick(auth_data, ("url",)), sort_keys=True)


def legacy_message(auth_data: Mapping) -> str:
    """The 2024 scheme: cost, endpoint, reqnum, url in that order, not sorted."""
    return _dumps(_pick(auth_data, LEGACY_FIELDS), sort_keys=False)


MESSAGE_BUILDERS = {"full": full_message, "url": url_message, "legacy": legacy_message}


def signed_message(auth_data: Mapping, scheme: str) -> str:
    """The exact text the autoscaler signs under ``scheme``; AuthDataError if it cannot be made."""
    if scheme not in MESSAGE_BUILDERS:
        raise ValueError(f"unknown signature scheme {scheme!r}: expected one of {SCHEMES}")
    return MESSAGE_BUILDERS[scheme](auth_data)


# -- signing and verifying -------------------------------------------------------------------

def sign(private_key: RSA.RsaKey, auth_data: Mapping, scheme: str = "full") -> str:
    """Sign auth_data as the autoscaler does (for the emulator and tests): standard base64."""
    digest = SHA256.new(signed_message(auth_data, scheme).encode("utf-8"))
    return base64.b64encode(pkcs1_15.new(private_key).sign(digest)).decode("ascii")


def decode_signature(signature: object, key: PublicKey) -> bytes | str:
    """The signature's bytes, or a reason (str) why it cannot be one for this key."""
    if not isinstance(signature, str):
        return "signature must be a base64 string"
    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        return "signature is not valid base64"
    if len(raw) != key.size_bytes:
        return f"signature is {len(raw)} bytes, expected {key.size_bytes} for the autoscaler key"
    return raw


def urls_match(signed_url: object, expected_url: str) -> bool:
    """Equal URLs, ignoring one trailing slash on either side."""
    if not isinstance(signed_url, str):
        return False
    return signed_url.removesuffix("/") == expected_url.removesuffix("/")


def verify(auth_data: Mapping, public_key: PublicKey | RSA.RsaKey, scheme: str = "auto", *,
           expected_url: str | None = None, replay: "ReplayWindow | None" = None) -> Verdict:
    """Check a request's auth_data; never raises on bad input, returns a failed Verdict instead.

    ``scheme`` is auto|full|url|legacy (auto accepts any scheme that verifies). With
    ``expected_url`` the signed url must be this worker's. With ``replay`` a verified (reqnum,
    signature) under the full or legacy scheme is recorded and a replay of it refused.
    """
    if not isinstance(auth_data, Mapping):
        return Verdict(False, "auth_data must be a JSON object")
    key = public_key if isinstance(public_key, PublicKey) else PublicKey(public_key)
    tried = SCHEMES if scheme == "auto" else (scheme,)
    if not set(tried) <= set(SCHEMES):
        return Verdict(False, f"unknown signature scheme {scheme!r}")
    if "signature" not in auth_data:
        return Verdict(False, "auth_data is missing signature")
    raw = decode_signature(auth_data["signature"], key)
    if isinstance(raw, str):
        return Verdict(False, raw)
    verified, unbuildable = _first_verified(auth_data, key.recover_block(raw), key, tried)
    if verified is None:
        return Verdict(False, _refusal(unbuildable, tried),
                       mismatch=len(unbuildable) < len(tried))
    if expected_url is not None and not urls_match(auth_data.get("url"), expected_url):
        signed_url = repr(auth_data.get("url"))[:200]
        return Verdict(False, f"signed for another worker: url {signed_url} is not this worker's "
                              f"{expected_url!r}; route the request again", verified)
    if replay is not None and verified in REPLAY_SCHEMES:
        reason = replay.admit(auth_data.get("reqnum"), auth_data["signature"])
        if reason:
            return Verdict(False, reason, verified)
    return Verdict(True, "", verified)


def _first_verified(auth_data: Mapping, block: bytes | None, key: PublicKey,
                    tried: tuple[str, ...]) -> tuple[str | None, list[str]]:
    """The first scheme whose message verifies, and why each message that could not be made."""
    unbuildable = []
    for name in tried:
        try:
            message = MESSAGE_BUILDERS[name](auth_data)
        except AuthDataError as exc:
            unbuildable.append(str(exc))
            continue
        if block is not None and key.block_matches(block, message):
            return name, unbuildable
    return None, unbuildable


def _refusal(unbuildable: list[str], tried: tuple[str, ...]) -> str:
    if len(unbuildable) == len(tried):
        return unbuildable[0]  # the widest message's complaint names every missing field
    under = "any scheme (full, url, legacy)" if len(tried) > 1 else f"the {tried[0]} scheme"
    return (f"signature does not verify under {under}: auth_data was altered, signed with "
            f"another autoscaler key, or VESPA_SIGNATURE_SCHEME does not match the autoscaler")


# -- replay window ---------------------------------------------------------------------------

class ReplayWindow:
    """Refuses replays of verified (reqnum, signature) pairs; bounded memory.

    Every admitted pair with reqnum >= (highest reqnum seen - ``size``) is remembered, so a replay
    inside the window is always caught; a reqnum below that floor is refused as too old. At most
    ``size`` pairs are kept: when more arrive (many signatures for one reqnum), the oldest are
    forgotten and the floor rises past them, so nothing forgotten can be accepted again.
    The default 10,000 tolerates late arrivals when reqnums are shared by a busy endpoint, and
    costs at most ~4 MB (a 2048-bit signature is 344 characters).
    """

    def __init__(self, size: int = DEFAULT_REPLAY_WINDOW):
        if size < 1:
            raise ValueError("replay window size must be at least 1")
        self.size = size
        self.max_reqnum: int | None = None
        self.floor: int | None = None
        self.seen: set[tuple[int, str]] = set()
        self.by_age: list[tuple[int, str]] = []  # min-heap over seen

    def __len__(self) -> int:
        return len(self.seen)

    def check(self, reqnum: object, signature: str) -> str:
        """Why this pair must be refused, or "" when it is fresh (nothing is recorded)."""
        if not isinstance(reqnum, int) or isinstance(reqnum, bool):
            return "reqnum must be an integer"
        if self.floor is not None and reqnum < self.floor:
            return (f"request too old: reqnum {reqnum} is below the replay window "
                    f"(oldest accepted {self.floor}); route the request again")
        if (reqnum, signature) in self.seen:
            return f"replayed request: reqnum {reqnum} was already served; route the request again"
        return ""

    def admit(self, reqnum: object, signature: str) -> str:
        """Check and, when fresh, record the pair; returns the refusal reason or ""."""
        reason = self.check(reqnum, signature)
        if reason or not isinstance(reqnum, int):  # check refuses any reqnum but an int
            return reason
        self.record(reqnum, signature)
        return ""

    def record(self, reqnum: int, signature: str) -> None:
        pair = (reqnum, signature)
        self.seen.add(pair)
        heapq.heappush(self.by_age, pair)
        if self.max_reqnum is None or reqnum > self.max_reqnum:
            self.max_reqnum = reqnum
        self.raise_floor(self.max_reqnum - self.size)
        while len(self.seen) > self.size:
            self.raise_floor(self.by_age[0][0] + 1)

    def raise_floor(self, floor: int) -> None:
        if self.floor is not None and floor <= self.floor:
            return
        self.floor = floor
        while self.by_age and self.by_age[0][0] < floor:
            self.seen.discard(heapq.heappop(self.by_age))
