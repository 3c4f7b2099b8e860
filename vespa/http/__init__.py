"""HTTP/1.1 on both sides of the worker: the public front server (messages, connection, limits),
the keep-alive pool and proxy to the backend, request-body reading and the one flow-control
mechanism they share. Knows nothing of Vast, signatures or load."""

from ..compiled import build_first as _build_first

_build_first(__name__, __path__)  # the compiled modules, when in use (vespa/compiled.py)
