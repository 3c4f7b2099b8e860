"""``python -m vespa``: run the worker."""

from .main import main

main()
