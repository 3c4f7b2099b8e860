"""Microseconds per signed request spent verifying its signature, the way vespa/corridor/auth.py
does it against the public APIs.

    python perf/rsa_verify.py                    # ~20 s
    python perf/rsa_verify.py --number 500 --repeat 40

With ``VESPA_SIGNATURE_SCHEME=auto`` (the default) a request is checked under the full, url and
legacy schemes in that order until one verifies. Vespa does one RSA public operation per request
(pycryptodome's private ``RsaKey._encrypt``) and compares the recovered EMSA-PKCS1-v1_5 block with
each scheme's expected block. Through pycryptodome's public API
(``pkcs1_15.new(key).verify(SHA256.new(message), signature)``) each scheme tried is one RSA
operation. The rows:

- vespa: ``auth.verify`` as the worker calls it (private ``_encrypt``, one RSA operation), and
  with the fallback it would use if ``_encrypt`` went away (Python's ``pow``);
- pycryptodome public: the same loop over the schemes, ``pkcs1_15`` verify for each;
- cryptography (when installed; it is not one of Vespa's dependencies): OpenSSL's PKCS#1 v1.5
  verify for each scheme, and ``recover_data_from_signature`` once with the blocks compared as
  Vespa does (one RSA operation, public API).

Columns are the cases: the full scheme verifies (first tried), url (second), legacy (third), and a
signature that verifies under none (altered auth_data, another key: all three tried). Each cell
is the best of ``--repeat`` runs of ``--number`` calls (the runs of all cells interleaved),
base64 decoding and message building included. 2048-bit key, as the autoscaler's.
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

from Crypto import __version__ as pycryptodome_version
from Crypto.Hash import SHA256
from Crypto.PublicKey import RSA
from Crypto.Signature import pkcs1_15

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's vespa
from vespa.corridor import auth  # noqa: E402

AUTH = {"cost": 256, "endpoint": "my-endpoint", "reqnum": 123456, "request_idx": 98765,
        "url": "https://203.0.113.7:41234"}
CASES = ("full", "url", "legacy", "none")


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


def cryptography_public(pem: bytes):
    """OpenSSL through ``cryptography``: (verify per scheme, recover once), or None."""
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import padding
    except ImportError:
        return None
    key = serialization.load_pem_public_key(pem)
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

    import cryptography
    return cryptography.__version__, verify_each, recover_once


def requests(private_key: RSA.RsaKey) -> dict[str, dict]:
    """One signed auth_data per case; "none" is signed by another key."""
    signed = {scheme: dict(AUTH, signature=auth.sign(private_key, AUTH, scheme))
              for scheme in auth.SCHEMES}
    signed["none"] = dict(AUTH, signature=auth.sign(RSA.generate(2048), AUTH, "full"))
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
    args = parser.parse_args()

    private_key = RSA.generate(2048)
    pem = private_key.public_key().export_key("PEM")
    key = auth.PublicKey.from_pem(pem)
    fallback = auth.PublicKey.from_pem(pem)  # what auth.PublicKey does without _encrypt
    fallback.raw_rsa = lambda value: pow(value, int(fallback.rsa_key.e), fallback.modulus)
    rows = [("vespa: private _encrypt, 1 RSA op", "pycryptodome",
             lambda auth_data: auth.verify(auth_data, key).scheme),
            ("vespa's fallback: Python pow, 1 RSA op", "(none)",
             lambda auth_data: auth.verify(auth_data, fallback).scheme),
            ("pycryptodome public pkcs1_15, 1 op/scheme", "pycryptodome",
             pycryptodome_public(RSA.import_key(pem)))]
    openssl = cryptography_public(pem)
    if openssl is not None:
        version, verify_each, recover_once = openssl
        rows += [("cryptography verify, 1 op/scheme", f"cryptography {version}", verify_each),
                 ("cryptography recover, 1 RSA op", f"cryptography {version}", recover_once)]
    else:
        print("cryptography is not installed here: its rows are left out")

    cases = requests(private_key)
    for name, _, verify in rows:  # every way agrees on every case before anything is timed
        got = [verify(cases[case]) for case in CASES]
        if got != ["full", "url", "legacy", None]:
            raise SystemExit(f"{name} gave {got}")

    print(f"Python {platform.python_version()}, pycryptodome {pycryptodome_version}, "
          f"{platform.machine()}; best of {args.repeat} x {args.number} calls; µs per request")
    header = f"{'way':44} {'library':20}" + "".join(f"{c:>9}" for c in CASES)
    print(header)
    print("-" * len(header))
    calls = [lambda verify=verify, auth_data=cases[case]: verify(auth_data)
             for _, _, verify in rows for case in CASES]
    best = best_microseconds(calls, args.number, args.repeat)
    for index, (name, library, _) in enumerate(rows):
        cells = best[index * len(CASES):(index + 1) * len(CASES)]
        print(f"{name:44} {library:20}" + "".join(f"{cell:9.1f}" for cell in cells))
    print("cases: the scheme that verifies (tried in the order full, url, legacy); none: "
          "no scheme verifies, all three tried")


if __name__ == "__main__":
    main()
