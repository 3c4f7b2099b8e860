"""Autoscaler-side signing for development and tests: one RSA key, fresh reqnums, signed auth_data.

The local autoscaler emulator signs with it; tests use it directly to make requests a worker
must accept (or, altered, refuse) without routing through a server.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from vespa.corridor import auth

DEFAULT_ENDPOINT = "vespa-dev"


class Signer:
    """Hands out auth_data signed the way an autoscaler of the chosen generation signs it."""

    def __init__(self, private_key: rsa.RSAPrivateKey | None = None, scheme: str = "full",
                 endpoint: str = DEFAULT_ENDPOINT):
        if scheme not in auth.SCHEMES:
            raise ValueError(f"scheme must be one of {auth.SCHEMES}, not {scheme!r}")
        self.private_key = private_key
        self.scheme = scheme
        self.endpoint = endpoint
        self.last_reqnum = 0
        self.last_request_idx = 0

    def ensure_key(self) -> rsa.RSAPrivateKey:
        """The private key, made on first use (2048 bits, e = 65537; a tenth of a second)."""
        if self.private_key is None:
            self.private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return self.private_key

    @property
    def public_pem(self) -> str:
        return self.ensure_key().public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode("ascii")

    @property
    def public_key(self) -> auth.PublicKey:
        return auth.PublicKey(self.ensure_key().public_key())

    def next_request_idx(self) -> int:
        self.last_request_idx += 1
        return self.last_request_idx

    def auth_data(self, url: str, cost: float = 1.0, request_idx: int | None = None,
                  endpoint: str | None = None) -> dict:
        """Fresh auth_data for the worker at ``url``: a new reqnum, signed under ``scheme``."""
        self.last_reqnum += 1
        if request_idx is None:
            request_idx = self.next_request_idx()
        auth_data = {"cost": cost, "endpoint": endpoint or self.endpoint,
                     "reqnum": self.last_reqnum, "request_idx": request_idx, "url": url}
        auth_data["signature"] = auth.sign(self.ensure_key(), auth_data, self.scheme)
        return auth_data
