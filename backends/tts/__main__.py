"""Command line: `python -m backends.tts --port 8000`, run from the repository root in `.venvs/tts`.

Settings come from `VESPA_TTS_*` variables (see settings.py); --engine and --voice override them.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import sys
from dataclasses import replace

from .engines import choose_engine, default_engine, load_engine
from .server import create_app, serve
from .settings import Settings, settings_from_env


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m backends.tts", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--engine", help="piper | chatterbox | espeak (overrides VESPA_TTS_ENGINE)")
    parser.add_argument("--voice", help="default voice (overrides VESPA_TTS_VOICE)")
    return parser.parse_args(argv)


def load_chosen_engine(settings: Settings):
    """Pick the engine (may run nvidia-smi) and load it; runs on the engine thread."""
    name = default_engine(settings.engine)
    return load_engine(name, settings.voice, settings.model_dir, settings.device)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = settings_from_env(os.environ)
        settings = replace(settings, engine=args.engine or settings.engine,
                           voice=args.voice or settings.voice)
        if settings.engine:
            choose_engine(settings.engine, False, False)  # an unknown name fails here, at once
    except ValueError as error:
        print(f"backends.tts: {error}", file=sys.stderr)
        return 2
    app = create_app(functools.partial(load_chosen_engine, settings), settings.max_chars,
                     settings.voice_aliases)
    return asyncio.run(serve(app, args.host, args.port))


if __name__ == "__main__":
    sys.exit(main())
