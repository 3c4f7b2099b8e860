"""Vespa's text-to-speech backend: an aiohttp server in front of a speech engine (piper, chatterbox,
espeak), run in its own virtual env `.venvs/tts` as `python -m backends.tts --port 8000`."""
