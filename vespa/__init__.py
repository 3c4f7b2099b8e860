"""Vespa: the serverless GPU worker for Vast.ai."""

from .compiled import activate as _activate

__version__ = "0.1.0"

# The mypyc build of the request path, when it was compiled from exactly this source
# (vespa/compiled.py); HOT_PATH says which one runs, for the start-up log and /_vespa/status.
COMPILED, HOT_PATH = _activate(__path__)
