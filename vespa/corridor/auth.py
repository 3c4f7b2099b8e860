"""Signed-request checks (pure core): canonical messages, RSA verify, URL binding; the replay
window (``replay.py``) is consulted for the schemes that sign reqnum.

Values in, values out: no clock, environment or socket here. The public key is parsed once into a
``PublicKey``; ``verify`` returns a ``Verdict`` whose ``reason`` is fit for a 401 error message.

RSA goes through ``cryptography`` (OpenSSL): one public operation per signature whatever the
number of schemes tried (``recover_data_from_signature``, then each scheme's DigestInfo and
digest compared), and none for a signature the key has already verified under the url-only scheme,
where every request routed to one worker carries the same signature (``VerifiedSignatures``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii
from typing import Final

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from mypy_extensions import mypyc_attr

from .replay import ReplayWindow

SCHEMES: Final = ("full", "url", "legacy")
"""Signature schemes, in the order ``auto`` tries them (the message that binds most first)."""
FULL_FIELDS: Final = ("cost", "endpoint", "reqnum", "request_idx", "url")  # sorted, as signed
URL_FIELDS: Final = ("url",)
LEGACY_FIELDS: Final = ("cost", "endpoint", "reqnum", "url")
REPLAY_SCHEMES: Final = frozenset({"full", "legacy"})
"""Schemes whose message carries reqnum; under url-only every request has the same signature."""
VERIFIED_CACHE_SIZE = 64
"""Signatures a key remembers having verified (url-only: one per worker URL it was signed for)."""
PKCS1V15: Final = padding.PKCS1v15()


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


ACCEPTED: Final = {name: Verdict(True, "", name) for name in SCHEMES}  # made once, not per request

# DER DigestInfo prefixes for SHA-256 (RFC 8017 section 9.2, note 1), with and without the NULL
# parameters: pycryptodome's pkcs1_15 accepts both, and so do we.
SHA256_DIGEST_INFOS: Final = (
    bytes.fromhex("3031300d060960864801650304020105000420"),
    bytes.fromhex("302f300b0609608648016503040201" "0420"),
)


class VerifiedSignatures:
    """Signatures a key has verified, by their exact text: (their bytes, the data under their
    padding, the scheme and the message they verified), at most ``size`` of them, the oldest
    forgotten first.

    What is kept depends on the key and the signature's text alone (base64 decoding and the RSA
    operation are functions of them), and every request's own message is still built and
    compared: with the message remembered (equal text, equal digest) or, when it differs, by its
    digest under every scheme in order, as without the cache. So a hit accepts exactly what a
    fresh verification would; another message, another signature, another base64 spelling of the
    same bytes (another text: verified afresh) get the answer they would get without it. Only
    signatures that verified under a scheme without reqnum (url-only, where the same signature
    comes with every request routed to a worker) go in: a flood of forged ones costs their RSA
    operations and cannot push the good one out. It lives on its ``PublicKey``, so a new key
    starts with none.
    """

    def __init__(self, size: int = VERIFIED_CACHE_SIZE):
        if size < 1:
            raise ValueError("the verified-signature cache holds at least 1 signature")
        self.size = size
        self.entries: dict[str, tuple[bytes, bytes, str, str]] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, signature: str) -> tuple[bytes, bytes, str, str] | None:
        return self.entries.get(signature)

    def remember(self, signature: str, raw: bytes, recovered: bytes, scheme: str,
                 message: str) -> None:
        entries = self.entries
        if signature in entries:
            return
        while len(entries) >= self.size:
            del entries[next(iter(entries))]
        entries[signature] = (raw, recovered, scheme, message)


class PublicKey:
    """The autoscaler's RSA public key, parsed once and prepared for the request path.

    Verifying costs one RSA public operation per signature whatever the number of schemes tried
    (none for one in ``verified``): the data under the recovered EMSA-PKCS1-v1_5 padding is
    compared with the DigestInfo and digest of each scheme's message.
    """

    def __init__(self, key: rsa.RSAPublicKey, cache_size: int = VERIFIED_CACHE_SIZE):
        if not isinstance(key, rsa.RSAPublicKey):
            raise ValueError(f"not an RSA public key: {type(key).__name__}")
        self.key = key
        self.size_bytes = (key.key_size + 7) // 8
        self.modulus = key.public_numbers().n
        # what an operator compares with the autoscaler's /pubkey/ when signatures fail
        der = key.public_bytes(serialization.Encoding.DER,
                               serialization.PublicFormat.SubjectPublicKeyInfo)
        self.fingerprint = "sha256:" + hashlib.sha256(der).hexdigest()[:16]
        self.verified = VerifiedSignatures(cache_size)

    @classmethod
    def from_pem(cls, pem: str | bytes, cache_size: int = VERIFIED_CACHE_SIZE) -> "PublicKey":
        """Parse a PEM public key (SubjectPublicKeyInfo or PKCS#1); ValueError with a readable
        message when it is not one."""
        data = pem.encode("ascii", "replace") if isinstance(pem, str) else pem
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise ValueError(f"not an RSA public key in PEM form: {exc}") from None
        if not isinstance(key, rsa.RSAPublicKey):
            raise ValueError(f"not an RSA public key in PEM form: a {type(key).__name__}")
        return cls(key, cache_size)

    @classmethod
    def of(cls, key: object) -> "PublicKey":
        """A ``PublicKey`` for a key object: a ``cryptography`` RSA key (public or private), or
        anything with pycryptodome's ``public_key().export_key("PEM")``."""
        if isinstance(key, PublicKey):
            return key
        if isinstance(key, rsa.RSAPrivateKey):
            return cls(key.public_key())
        if isinstance(key, rsa.RSAPublicKey):
            return cls(key)
        try:
            pem = key.public_key().export_key("PEM")  # type: ignore[attr-defined]
        except AttributeError:
            raise ValueError(f"not an RSA key: {type(key).__name__}") from None
        return cls.from_pem(pem)

    @property
    def pem(self) -> str:
        return self.key.public_bytes(serialization.Encoding.PEM,
                                     serialization.PublicFormat.SubjectPublicKeyInfo
                                     ).decode("ascii")

    def recover(self, raw_signature: bytes) -> bytes | None:
        """The data under the signature's PKCS#1 v1.5 padding (of a signature: a DigestInfo and
        digest), by one RSA public operation; None when it is no signature block under this key
        (>= the modulus, or not padded as a signature)."""
        try:
            return self.key.recover_data_from_signature(raw_signature, PKCS1V15, None)
        except (InvalidSignature, ValueError):
            return None

    @staticmethod
    def signs(recovered: bytes, message: str) -> bool:
        """Whether ``recovered`` is the DigestInfo and SHA-256 digest of the UTF-8 ``message``."""
        digest = hashlib.sha256(message.encode("utf-8")).digest()
        return recovered[:-32] in SHA256_DIGEST_INFOS and \
            hmac.compare_digest(recovered[-32:], digest)


# -- canonical messages ----------------------------------------------------------------------
# The autoscaler signs json.dumps(obj, indent=4[, sort_keys=True]). That encoder is Python code
# (indent turns the C one off) and costs several µs a message; for JSON scalars (all the fields
# ever are) the same text is written directly, and anything else goes through json.dumps.
# tests/test_auth.py checks the two agree.

_MISSING = object()
_LINE_BREAK: Final = ",\n"


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


def _scalar_text(value: object) -> str | None:
    """``value`` as json.dumps writes it (ensure_ascii) when it is a plain JSON string, integer,
    finite float, boolean or null; None for anything else."""
    kind = type(value)
    if kind is str:
        return encode_basestring_ascii(str(value))
    if kind is int:
        number = int(value)  # type: ignore[call-overload]
        if -10**18 < number < 10**18:  # far from int's str() digit limit
            return str(number)
        return None
    if kind is float:
        real = float(value)  # type: ignore[arg-type]
        if real - real == 0.0:  # finite: json.dumps writes repr
            return repr(real)
        return None
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    return None


def _message(auth_data: Mapping, fields: tuple[str, ...], sort_keys: bool) -> str:
    """json.dumps({name: auth_data[name] for name in fields}, indent=4, sort_keys=sort_keys),
    ``fields`` already in the order the message has them."""
    lines = []
    for name in fields:
        if name not in auth_data:
            _pick(auth_data, fields)  # raises, naming every missing field
        text = _scalar_text(auth_data[name])
        if text is None:
            return _dumps(_pick(auth_data, fields), sort_keys)
        lines.append(f'    "{name}": {text}')
    return f"{{\n{_LINE_BREAK.join(lines)}\n}}"


def full_message(auth_data: Mapping) -> str:
    """The full scheme: cost, endpoint, reqnum, request_idx, url, sorted, JSON types as received.
    Every request has its own, so the usual one (all five fields JSON scalars) is written in one
    go; anything else is ``_message``'s."""
    if "cost" in auth_data and "endpoint" in auth_data and "reqnum" in auth_data \
            and "request_idx" in auth_data and "url" in auth_data:
        cost = _scalar_text(auth_data["cost"])
        endpoint = _scalar_text(auth_data["endpoint"])
        reqnum = _scalar_text(auth_data["reqnum"])
        request_idx = _scalar_text(auth_data["request_idx"])
        url = _scalar_text(auth_data["url"])
        if cost is not None and endpoint is not None and reqnum is not None \
                and request_idx is not None and url is not None:
            return (f'{{\n    "cost": {cost},\n    "endpoint": {endpoint},\n    "reqnum": {reqnum},'
                    f'\n    "request_idx": {request_idx},\n    "url": {url}\n}}')
    return _message(auth_data, FULL_FIELDS, True)


def url_message(auth_data: Mapping) -> str:
    """The url-only scheme (2026): ``{"url": ...}``, the same for every request to a worker."""
    url = auth_data.get("url", _MISSING)
    if isinstance(url, str) and type(url) is str:
        return '{\n    "url": ' + encode_basestring_ascii(url) + "\n}"
    return _message(auth_data, URL_FIELDS, True)


def legacy_message(auth_data: Mapping) -> str:
    """The 2024 scheme: cost, endpoint, reqnum, url in that order, not sorted."""
    return _message(auth_data, LEGACY_FIELDS, False)


MESSAGE_BUILDERS: Final = {"full": full_message, "url": url_message, "legacy": legacy_message}


def signed_message(auth_data: Mapping, scheme: str) -> str:
    """The exact text the autoscaler signs under ``scheme``; AuthDataError if it cannot be made."""
    if scheme not in MESSAGE_BUILDERS:
        raise ValueError(f"unknown signature scheme {scheme!r}: expected one of {SCHEMES}")
    return MESSAGE_BUILDERS[scheme](auth_data)


# -- signing and verifying -------------------------------------------------------------------

def sign(private_key: rsa.RSAPrivateKey, auth_data: Mapping, scheme: str = "full") -> str:
    """Sign auth_data as the autoscaler does (for the emulator and tests): standard base64."""
    message = signed_message(auth_data, scheme).encode("utf-8")
    return base64.b64encode(private_key.sign(message, PKCS1V15, hashes.SHA256())).decode("ascii")


def decode_signature(signature: object, key: PublicKey) -> bytes | str:
    """The signature's bytes, or a reason (str) why it cannot be one for this key.

    Base64 ignores the unused low bits of a last character before padding: several spellings
    decode to the same bytes. The bytes are the signature (the replay window and the cache key
    on them), never the spelling."""
    if not isinstance(signature, str):
        return "signature must be a base64 string"
    try:
        # base64.b64decode(validate=True) is this call from Python 3.11 on, behind two
        # Python-level steps that cost more than the decoding (3.10 has no strict mode)
        if sys.version_info >= (3, 11):
            raw = binascii.a2b_base64(signature, strict_mode=True)
        else:
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


def verify(auth_data: Mapping, public_key: PublicKey | object, scheme: str = "auto", *,
           expected_url: str | None = None, replay: ReplayWindow | None = None) -> Verdict:
    """Check a request's auth_data; never raises on bad input, returns a failed Verdict instead.

    ``scheme`` is auto|full|url|legacy (auto accepts any scheme that verifies). With
    ``expected_url`` the signed url must be this worker's. With ``replay`` a verified (reqnum,
    signature bytes) under the full or legacy scheme is recorded and a replay of it refused.
    ``public_key`` is a ``PublicKey`` (or a key object ``PublicKey.of`` takes).
    """
    if not isinstance(auth_data, dict) and not isinstance(auth_data, Mapping):
        return Verdict(False, "auth_data must be a JSON object")
    key = public_key if isinstance(public_key, PublicKey) else PublicKey.of(public_key)
    tried: tuple[str, ...]
    if scheme == "auto":
        tried = SCHEMES
    elif scheme in MESSAGE_BUILDERS:
        tried = (scheme,)
    else:
        return Verdict(False, f"unknown signature scheme {scheme!r}")
    if "signature" not in auth_data:
        return Verdict(False, "auth_data is missing signature")
    signature = auth_data["signature"]
    remembered = key.verified.get(signature) if isinstance(signature, str) else None
    if remembered is not None:
        raw, recovered, seen_scheme, seen_message = remembered
        found = _same_message(auth_data, seen_scheme, seen_message, tried) or \
            _first_verified(auth_data, recovered, tried)
    else:
        decoded = decode_signature(signature, key)
        if isinstance(decoded, str):
            return Verdict(False, decoded)
        raw = decoded
        recovered_or_none = key.recover(raw)
        found = _first_verified(auth_data, recovered_or_none, tried)
        recovered = recovered_or_none or b""
    verified, message, unbuildable = found
    if verified is None:
        return Verdict(False, _refusal(unbuildable, tried),
                       mismatch=len(unbuildable) < len(tried))
    if expected_url is not None and not urls_match(auth_data.get("url"), expected_url):
        signed_url = repr(auth_data.get("url"))[:200]
        return Verdict(False, f"signed for another worker: url {signed_url} is not this worker's "
                              f"{expected_url!r}; route the request again", verified)
    if verified in REPLAY_SCHEMES:
        if replay is not None:
            reason = replay.admit(auth_data.get("reqnum"), raw)
            if reason:
                return Verdict(False, reason, verified)
    elif remembered is None and isinstance(signature, str):
        key.verified.remember(signature, raw, recovered, verified, message)
    return ACCEPTED[verified]


Found = tuple[str | None, str, list[str]]  # (the scheme that verified, its message, why not)


def _same_message(auth_data: Mapping, scheme: str, message: str,
                  tried: tuple[str, ...]) -> Found | None:
    """The remembered signature's scheme and message, when this request's message under that
    scheme is that very message; None otherwise (then every scheme is tried in order)."""
    if scheme not in tried:
        return None
    try:
        if MESSAGE_BUILDERS[scheme](auth_data) != message:
            return None
    except AuthDataError:
        return None
    return scheme, message, []


def _first_verified(auth_data: Mapping, recovered: bytes | None, tried: tuple[str, ...]) -> Found:
    """The first scheme whose message verifies (and that message), and why each message that
    could not be made could not."""
    unbuildable = []
    for name in tried:
        try:
            message = MESSAGE_BUILDERS[name](auth_data)
        except AuthDataError as exc:
            unbuildable.append(str(exc))
            continue
        if recovered is not None and PublicKey.signs(recovered, message):
            return name, message, unbuildable
    return None, "", unbuildable


def _refusal(unbuildable: list[str], tried: tuple[str, ...]) -> str:
    if len(unbuildable) == len(tried):
        return unbuildable[0]  # the widest message's complaint names every missing field
    under = "any scheme (full, url, legacy)" if len(tried) > 1 else f"the {tried[0]} scheme"
    return (f"signature does not verify under {under}: auth_data was altered, signed with "
            f"another autoscaler key, or VESPA_SIGNATURE_SCHEME does not match the autoscaler")
