"""Microseconds per signed request spent verifying its signature: vespa/corridor/auth.py's way
against the public APIs of pycryptodome and cryptography.

    python perf/rsa_verify.py                    # ~30 s
    python perf/rsa_verify.py --number 500 --repeat 40
    python perf/rsa_verify.py --output perf/results/DATE-rsa-verify.json   # + a results file

With ``VESPA_SIGNATURE_SCHEME=auto`` (the default) a request is checked under the full, url and
legacy schemes in that order until one verifies. The rows:

- vespa: ``auth.verify`` as the worker calls it: cryptography's public
  ``recover_data_from_signature`` (one RSA operation, OpenSSL), its result compared with each
  scheme's DigestInfo and digest; with nothing remembered (the key's verified-signature cache
  emptied before each call), and with the url-only signature remembered (what every request
  but the first to a worker costs under Vast's current autoscaler: no RSA operation);
- pycryptodome public: ``pkcs1_15.new(key).verify(SHA256.new(message), signature)`` for each
  scheme tried (one RSA operation each), the public API the design first named;
- pycryptodome private: ``RsaKey._encrypt`` once, the blocks compared (what Vespa did before:
  one RSA operation through a private method);
- cryptography public: ``verify`` for each scheme tried (one RSA operation each), and
  ``recover_data_from_signature`` once (the same call Vespa makes, without auth.verify around it).

Columns are the cases: the full scheme verifies (first tried), url (second), legacy (third), and a
signature that verifies under none (altered auth_data, another key: all three tried). Each cell
is the best of ``--repeat`` runs of ``--number`` calls (the runs of all cells interleaved),
base64 decoding and message building included. 2048-bit key, as the autoscaler's. ``--output``
also writes the table as JSON with the commit, date and machine (perf/provenance.py).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import platform
import sys
import timeit
from pathlib import Path

import cryptography
from Crypto import __version__ as pycryptodome_version
from Crypto.Hash import SHA256
from Crypto.PublicKey import RSA
from Crypto.Signature import pkcs1_15
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's vespa
sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402
from vespa.corridor import auth  # noqa: E402

AUTH = {"cost": 256, "endpoint": "my-endpoint", "reqnum": 123456, "request_idx": 98765,
        "url": "https://203.0.113.7:41234"}
CASES = ("full", "url", "legacy", "none")
# what each row is, by a key the README's generator (perf/figures.py) names
ROW_KEYS = ("vespa_fresh", "vespa_remembered", "pycryptodome_public", "pycryptodome_private",
            "cryptography_verify", "cryptography_recover")


def vespa_fresh(key: auth.PublicKey):
    def verify(auth_data: dict) -> str | None:
        key.verified.entries.clear()  # nothing remembered: one RSA operation
        return auth.verify(auth_data, key).scheme
    return verify


def vespa_remembered(key: auth.PublicKey):
    def verify(auth_data: dict) -> str | None:  # the url-only signature is remembered after once
        return auth.verify(auth_data, key).scheme
    return verify


def pycryptodome_public(key: RSA.RsaKey):
    verifier = pkcs1_15.new(key)

    def verify(auth_data: dict) -> str | None:
        raw = base64.b64decode(auth_data["signature"], validate=True)
        for scheme in auth.SCHEMES:
            digest = SHA256.new(auth.signed_message(auth_data, scheme).encode("utf-8"))
            try:
                verifier.verify(digest, raw)
            except ValueError:
                continue
            return scheme
        return None
    return verify


def pycryptodome_private(key: RSA.RsaKey):
    size = key.size_in_bytes()
    n = int(key.n)

    def verify(auth_data: dict) -> str | None:
        raw = base64.b64decode(auth_data["signature"], validate=True)
        value = int.from_bytes(raw, "big")
        if value >= n:
            return None
        block = int(key._encrypt(value)).to_bytes(size, "big")
        for scheme in auth.SCHEMES:
            digest = hashlib.sha256(auth.signed_message(auth_data, scheme).encode()).digest()
            for info in auth.SHA256_DIGEST_INFOS:
                expected = b"\x00\x01" + b"\xff" * (size - 3 - len(info) - 32) + b"\x00" + info
                if hmac.compare_digest(block, expected + digest):
                    return scheme
        return None
    return verify


def cryptography_public(pem: bytes):
    """OpenSSL through ``cryptography``: (verify per scheme, recover once)."""
    key = serialization.load_pem_public_key(pem)
    assert isinstance(key, rsa.RSAPublicKey)
    pkcs1v15, sha256 = padding.PKCS1v15(), hashes.SHA256()

    def verify_each(auth_data: dict) -> str | None:
        raw = base64.b64decode(auth_data["signature"], validate=True)
        for scheme in auth.SCHEMES:
            try:
                key.verify(raw, auth.signed_message(auth_data, scheme).encode("utf-8"),
                           pkcs1v15, sha256)
            except InvalidSignature:
                continue
            return scheme
        return None

    def recover_once(auth_data: dict) -> str | None:
        raw = base64.b64decode(auth_data["signature"], validate=True)
        try:  # the DigestInfo and digest, padding checked, DigestInfo not (algorithm None)
            recovered = key.recover_data_from_signature(raw, pkcs1v15, None)
        except InvalidSignature:
            return None
        for scheme in auth.SCHEMES:
            digest = hashlib.sha256(auth.signed_message(auth_data, scheme).encode("utf-8")).digest()
            if any(hmac.compare_digest(recovered, info + digest)
                   for info in auth.SHA256_DIGEST_INFOS):
                return scheme
        return None

    return verify_each, recover_once


def requests(private_key: rsa.RSAPrivateKey) -> dict[str, dict]:
    """One signed auth_data per case; "none" is signed by another key."""
    signed = {scheme: dict(AUTH, signature=auth.sign(private_key, AUTH, scheme))
              for scheme in auth.SCHEMES}
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    signed["none"] = dict(AUTH, signature=auth.sign(other, AUTH, "full"))
    return signed


def best_microseconds(calls: list, number: int, repeat: int) -> list[float]:
    """Each call's best run, in µs per call; the runs interleave, so a busy moment on a shared
    machine slows one run of every call rather than all the runs of one."""
    timers = [timeit.Timer(call) for call in calls]
    best = [float("inf")] * len(calls)
    for _ in range(repeat):
        for index, timer in enumerate(timers):
            best[index] = min(best[index], timer.timeit(number) / number * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--number", type=int, default=200, help="calls per run (default 200)")
    parser.add_argument("--repeat", type=int, default=25, help="runs per cell (default 25)")
    parser.add_argument("--output", type=Path, default=None,
                        help="also write the table, commit, date and machine as JSON here")
    args = parser.parse_args()
    started_at, machine = provenance.timestamp(), provenance.machine()

    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key = auth.PublicKey(private_key.public_key())
    pem = key.pem.encode()
    pycryptodome_key = RSA.import_key(pem)
    verify_each, recover_once = cryptography_public(pem)
    crypto = f"cryptography {cryptography.__version__}"
    pycd = f"pycryptodome {pycryptodome_version}"
    rows = [("vespa: nothing remembered, 1 RSA op", crypto, vespa_fresh(key)),
            ("vespa: url-only signature remembered", crypto,
             vespa_remembered(auth.PublicKey(private_key.public_key()))),
            ("pycryptodome public pkcs1_15, 1 op/scheme", pycd,
             pycryptodome_public(pycryptodome_key)),
            ("pycryptodome private _encrypt, 1 RSA op", pycd,
             pycryptodome_private(pycryptodome_key)),
            ("cryptography verify, 1 op/scheme", crypto, verify_each),
            ("cryptography recover, 1 RSA op", crypto, recover_once)]

    cases = requests(private_key)
    for name, _, verify in rows:  # every way agrees on every case before anything is timed
        got = [verify(cases[case]) for case in CASES]
        if got != ["full", "url", "legacy", None]:
            raise SystemExit(f"{name} gave {got}")

    print(f"Python {platform.python_version()}, {pycd}, {crypto}, {platform.machine()}; "
          f"best of {args.repeat} x {args.number} calls; µs per request")
    header = f"{'way':44} {'library':22}" + "".join(f"{c:>9}" for c in CASES)
    print(header)
    print("-" * len(header))
    calls = [lambda verify=verify, auth_data=cases[case]: verify(auth_data)
             for _, _, verify in rows for case in CASES]
    best = best_microseconds(calls, args.number, args.repeat)
    measured = []
    for index, (name, library, _) in enumerate(rows):
        cells = best[index * len(CASES):(index + 1) * len(CASES)]
        print(f"{name:44} {library:22}" + "".join(f"{cell:9.1f}" for cell in cells))
        measured.append({"key": ROW_KEYS[index], "way": name, "library": library,
                         "us_per_request": dict(zip(CASES, cells))})
    print("cases: the scheme that verifies (tried in the order full, url, legacy); none: "
          "no scheme verifies, all three tried. Only url-only signatures are remembered: in the "
          "other columns of the 'remembered' row every call verifies afresh.")
    if args.output:
        provenance.write_json(args.output, {
            "tool": "perf/rsa_verify.py", "timestamp": started_at,
            "machine": {**provenance.checkout(), **machine},
            "settings": {"number": args.number, "repeat": args.repeat, "key_bits": 2048,
                         "cases": list(CASES)},
            "rows": measured})
        print(f"results: {args.output}")


if __name__ == "__main__":
    main()
