"""The kinds of value a setting holds: how a variable's text becomes the value, and what a bad
value is told the variable accepts."""

from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass
from typing import Any, Callable

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# what Python's strtobool takes (Vast's worker reads UNSECURED with it), and "" for false
_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f", ""}


@dataclass(frozen=True)
class Kind:
    """``parse`` turns a variable's (stripped, non-empty) text into the value or raises
    ValueError; ``accepts`` completes "expected ..." in the error for a bad value."""

    parse: Callable[[str], Any]
    accepts: str


def text(accepts: str) -> Kind:
    """Any text, taken as it is (``accepts`` says what it is meant to be)."""
    return Kind(str, accepts)


def number(*, zero: bool = False) -> Kind:
    """A finite number above 0 (or from 0 with ``zero``)."""
    def parse(value: str) -> float:
        parsed = float(value)
        if not math.isfinite(parsed) or parsed < 0 or (parsed == 0 and not zero):
            raise ValueError(value)
        return parsed
    return Kind(parse, f"a number {'>=' if zero else '>'} 0")


def whole(minimum: int = 1, maximum: int | None = None) -> Kind:
    """A whole number from ``minimum`` (to ``maximum``)."""
    def parse(value: str) -> int:
        parsed = int(value)
        if parsed < minimum or (maximum is not None and parsed > maximum):
            raise ValueError(value)
        return parsed
    return Kind(parse, f"a whole number from {minimum}" + (f" to {maximum}" if maximum else " up"))


def choice(*options: str) -> Kind:
    """One of ``options``, in any case."""
    def parse(value: str) -> str:
        if value.lower() not in options:
            raise ValueError(value)
        return value.lower()
    return Kind(parse, "one of " + "|".join(options))


def _flag(value: str) -> bool:
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(value)


def _url(value: str) -> str:
    if not value.startswith(("http://", "https://")) or len(value) <= len("https://"):
        raise ValueError(value)
    return value.rstrip("/")


def _urls(value: str) -> tuple[str, ...]:
    return tuple(_url(u.strip()) for u in value.split(",") if u.strip())


def _route_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(value)
    return value


def _path_or_url(value: str) -> str:
    if value.startswith(("http://", "https://")):
        _url(value)  # raises for a bare scheme
        return value  # taken as it is (a trailing / too)
    return _route_path(value)


def _bearer(value: str) -> str:
    """A token sent as ``Authorization: Bearer <token>``: visible ASCII, no spaces."""
    if not all("!" <= char <= "~" for char in value):
        raise ValueError(value)
    return value


def _level(value: str) -> str:
    if value.upper() not in LOG_LEVELS:
        raise ValueError(value)
    return value.upper()


def _patterns(value: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in value.split(",") if p.strip())


def _target(value: str) -> str:
    module, sep, function = value.partition(":")
    if not sep or not module.strip() or not function.strip().isidentifier():
        raise ValueError(value)
    return value.strip()


def _command(value: str) -> tuple[str, ...]:
    words = tuple(shlex.split(value))  # unbalanced quotes raise ValueError
    if not words:
        raise ValueError(value)
    return words


def _regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error:  # not a ValueError
        raise ValueError(value) from None
    return value


NUMBER = number()
FLAG = Kind(_flag, "true or false")
HTTP_URL = Kind(_url, "an http:// or https:// URL")
HTTP_URLS = Kind(_urls, "comma-separated http(s) URLs")
ROUTE_PATH = Kind(_route_path, "a path starting with /")
PATH_OR_URL = Kind(_path_or_url, "a path starting with / or an http(s):// URL")
BEARER = Kind(_bearer, "a token of visible ASCII characters, without spaces")
LEVEL = Kind(_level, "one of " + ", ".join(LOG_LEVELS))
PATTERNS = Kind(_patterns, "comma-separated path patterns")
TARGET = Kind(_target, "module:function")
COMMAND = Kind(_command, "a command line (use {port} for the backend port)")
REGEX = Kind(_regex, "a regular expression")
PORT = whole(1, 65535)
TOKEN = text("a token")
FILE = text("a file path")
DIRECTORY = text("a directory")
