"""The corridor a request walks: envelope, signature, the door, admission, the ledger and the
proxy step, with one refusal model. Pure cores (envelope, auth, admission, ledger) and a handler
that composes them; no environment, no sockets of its own."""

from ..compiled import build_first as _build_first

_build_first(__name__, __path__)  # the compiled modules, when in use (vespa/compiled.py)
