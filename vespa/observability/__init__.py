"""What the worker tells people: metrics (counters on the hot path, families at scrape time),
request records (off the loop), logs and their redaction, status, and the /_vespa/ routes."""

from ..compiled import build_first as _build_first

_build_first(__name__, __path__)  # the compiled modules, when in use (vespa/compiled.py)
