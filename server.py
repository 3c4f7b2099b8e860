"""Vespa worker entry point: ``python server.py`` is the same as ``python -m vespa``."""

from vespa.main import main

if __name__ == "__main__":
    main()
