"""The client proxy's settings: one frozen value built by the command line or by module users.

Defaults live here and nowhere else; ``cli.py`` fills the keys from flags, environment and files.
"""

from __future__ import annotations

from dataclasses import dataclass

AUTOSCALER_URL = "https://run.vast.ai"
CONSOLE_URL = "https://console.vast.ai"
DEFAULT_PORT = 8010
DEFAULT_HOST = "127.0.0.1"
# The Vast SDK's default request cost; used when nothing in the request tells the workload.
DEFAULT_COST = 100.0


@dataclass(frozen=True)
class ClientOptions:
    """Everything a ``VastClient`` needs. ``api_key`` is the endpoint key; without it the
    endpoint key is looked up with ``account_key`` at start, the way the Vast SDK does."""

    endpoint: str
    api_key: str | None = None
    account_key: str | None = None
    api_key_source: str = "api_key"  # where the keys came from, for error messages
    account_key_source: str = "account_key"
    autoscaler_url: str = AUTOSCALER_URL
    console_url: str = CONSOLE_URL
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    route_timeout: float = 300.0  # seconds to wait for a ready worker (cold start)
    request_timeout: float | None = None  # seconds for one worker answer; None: no limit
    max_attempts: int = 5  # worker attempts per request (429/502/503/connection errors)
    default_cost: float = DEFAULT_COST
    ca_file: str | None = None  # Vast's root CA for HTTPS workers; None: cached or downloaded
    max_body_bytes: int = 100 * 1024 * 1024

    def __post_init__(self) -> None:
        if not self.endpoint:
            raise ValueError("an endpoint name is required")
        if not (self.api_key or self.account_key):
            raise ValueError("an endpoint key (api_key) or an account key is required")
        if self.route_timeout <= 0 or self.max_attempts < 1 or self.default_cost < 0:
            raise ValueError("route_timeout must be > 0, max_attempts >= 1, default_cost >= 0")
        object.__setattr__(self, "autoscaler_url", self.autoscaler_url.rstrip("/"))
        object.__setattr__(self, "console_url", self.console_url.rstrip("/"))

    @property
    def secrets(self) -> tuple[str, ...]:
        """Values that must never reach a worker."""
        return tuple(key for key in (self.api_key, self.account_key) if key)
