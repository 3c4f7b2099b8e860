"""The client proxy: a local HTTP server that routes every request to a Vast serverless worker.

``python client.py --endpoint NAME --api-key KEY`` serves on 127.0.0.1:8010; in code,
``async with VastClient(endpoint=NAME, api_key=KEY) as client:`` and send requests to
``client.url``. Rooms: keys, routing, wrapping (pure), tls, proxy, service, cli.
"""

from .options import ClientOptions
from .routing import RoutePolicy
from .service import VastClient

__all__ = ["ClientOptions", "RoutePolicy", "VastClient"]
