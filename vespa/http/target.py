"""Request targets: what path and query a request is forwarded with, and the paths a backend
may read it as (for VESPA_BLOCKED_PATHS); pure.

Only origin-form targets (``/path?query``) are forwarded, byte for byte. An absolute-form target
(``http://host/path?query``, RFC 9112 §3.2.2) is forwarded as its path and query: the worker is
the origin, it never asks the backend for another host. Anything else (``*``, ``host:port``,
``path``) is not a target the worker serves. A blocked-path check must see every spelling a
backend may turn into the blocked path, so it matches the path as sent (percent-decoded) and its
normal form (percent-decoded, dot segments removed, repeated slashes collapsed).
"""

from __future__ import annotations

import re
from urllib.parse import unquote

_ABSOLUTE = re.compile(r"(?i)https?://[^/?#]*")


def origin_form(raw_target: str) -> str | None:
    """The path and query to forward for ``raw_target``; None when it has no path to serve."""
    if raw_target.startswith("/"):
        return raw_target
    absolute = _ABSOLUTE.match(raw_target)
    if absolute is None:
        return None
    rest = raw_target[absolute.end():]
    if rest.startswith("#"):
        rest = ""
    return rest if rest.startswith("/") else "/" + rest


def path_of(target: str) -> str:
    """The percent-encoded path of an origin-form target: without its query or fragment."""
    end = len(target)
    for mark in ("?", "#"):
        at = target.find(mark)
        if at != -1:
            end = min(end, at)
    return target[:end]


def normal_path(path: str) -> str:
    """``path`` percent-decoded, with ``.`` and ``..`` segments resolved (RFC 3986 §5.2.4) and
    empty segments (``//``) dropped; ``/a/%2e%2e//b/./c/`` is ``/b/c/``.

    Decoding comes first, so ``%2e%2e`` counts as ``..`` and ``%2f`` as ``/``: a backend that
    decodes before routing sees it that way. Decoding is done once, as a backend does."""
    segments: list[str] = []
    parts = unquote(path, errors="surrogateescape").split("/")
    for part in parts:
        if part == "..":
            if segments:
                segments.pop()
        elif part and part != ".":
            segments.append(part)
    trailing = len(parts) > 1 and parts[-1] in ("", ".", "..") and bool(segments)
    return "/" + "/".join(segments) + ("/" if trailing else "")


def spellings(target: str) -> tuple[str, ...]:
    """The paths a backend may route an origin-form ``target`` to: as sent (decoded) and its
    normal form; one when they agree."""
    path = path_of(target)
    decoded = unquote(path, errors="surrogateescape")
    normal = normal_path(path)
    return (decoded,) if decoded == normal else (decoded, normal)


# query parameters whose values are credentials (an endpoint key, a token, a signature)
_CREDENTIAL_PARAMS = re.compile(
    r"(?i)((?:^|[?&;])(?:api_key|apikey|access_token|token|key|serverless_signature|signature)"
    r"=)[^&;#]*")
REDACTED = "[redacted]"


def redacted(target: str) -> str:
    """``target`` (or a query) with the values of credential query parameters (``api_key``,
    ``token``, ``signature``, ...) replaced by ``[redacted]``: what logs and records show."""
    if "=" not in target:
        return target
    return _CREDENTIAL_PARAMS.sub(rf"\g<1>{REDACTED}", target)


def without_params(target: str, names: frozenset[str]) -> str:
    """The origin-form ``target`` without the query parameters named in ``names``; the others
    stay byte for byte, in order (a query left empty loses its ``?``)."""
    path, mark, query = target.partition("?")
    if not mark:
        return target
    kept = [part for part in query.split("&") if part.partition("=")[0] not in names]
    return f"{path}?{'&'.join(kept)}" if kept else path
