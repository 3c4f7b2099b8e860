"""``python -m vespa``: run the worker."""

from .app import main

main()
