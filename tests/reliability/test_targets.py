"""The request target: path traversal, absolute URIs and odd forms reach the backend verbatim or
are refused with a 400, never turned into a request for another host; blocked paths cannot be
reached by spelling them differently."""

from __future__ import annotations

from collections import Counter

from .rawhttp import raw_exchange, raw_request

TARGETS = [b"/../../etc/passwd", b"/echo/../../../etc/passwd", b"/echo/%2e%2e/%2e%2e/etc/passwd",
           b"/echo/..%2f..%2fetc/passwd", b"/echo/%252e%252e/x", b"//evil.example/echo",
           b"/echo/./x/.", b"/echo//x", b"/echo/%00", b"/echo?next=http://evil.example/",
           b"/echo/;jsessionid=1", b"/echo#fragment", b"/echo/\\..\\..\\windows"]
ABSOLUTE = [b"http://evil.example/echo", b"https://evil.example:8443/echo?x=1",
            b"http://127.0.0.1:1/echo", b"http://user:pass@evil.example/echo",
            b"HTTP://EVIL.EXAMPLE/echo"]
ODD = [b"*", b"evil.example:443", b"echo", b"", b"%2fecho"]


async def test_path_traversal_and_absolute_uris_reach_the_backend_verbatim_or_400(astack,
                                                                                  measure):
    stack = await astack(signed=False, recording=True)
    wrong, statuses = [], Counter()
    for target in TARGETS + ABSOLUTE + ODD:
        for method in (b"GET", b"OPTIONS", b"CONNECT") if target in ODD else (b"GET",):
            before = len(stack.recording.real_requests())
            responses, raw = await raw_exchange(stack.port, raw_request(target, method=method),
                                                read_timeout=3)
            status = responses[0].status if responses else None
            statuses[status] += 1
            seen = [r.target for r in stack.recording.real_requests()[before:]]
            label = f"{method.decode()} {target.decode('latin-1')}"
            if status is None or status >= 500:
                wrong.append(f"{label}: answered {status!r}")
            elif seen and target in ABSOLUTE:
                if seen[0].lower().startswith((b"http:", b"https:")):
                    wrong.append(f"{label}: the backend was sent the absolute-form target "
                                 f"{seen[0]!r} (a request for another host)")
            elif seen and seen != [target]:
                wrong.append(f"{label}: the backend saw {seen!r}")
            elif not seen and status == 200:
                wrong.append(f"{label}: 200 without reaching the backend")
    await stack.check_serving()
    five_xx = sum(n for s, n in statuses.items() if s and s >= 500)
    measure(inputs=sum(statuses.values()), **{"5xx": five_xx})
    assert not wrong, "\n".join(wrong)


BYPASSES = [b"/admin/../admin/reset", b"/echo/../admin/reset", b"/echo/%2e%2e/admin/reset",
            b"/./admin/reset", b"//admin/reset", b"/admin//reset", b"/admin/./reset",
            b"/%61dmin/reset", b"/admin%2freset", b"/echo/%2E%2E/admin/reset"]


async def test_blocked_paths_cannot_be_bypassed_with_dot_segments_or_slashes(astack, measure):
    """VESPA_BLOCKED_PATHS=/admin/*: every spelling that a backend may normalize to /admin/...
    must be refused (403) or rejected (400), not forwarded."""
    stack = await astack(signed=False, recording=True, VESPA_BLOCKED_PATHS="/admin/*")
    forwarded = []
    for target in BYPASSES:
        before = len(stack.recording.real_requests())
        responses, _ = await raw_exchange(stack.port, raw_request(target), read_timeout=3)
        status = responses[0].status if responses else None
        if stack.recording.real_requests()[before:]:
            forwarded.append(f"{target.decode()} -> {status} (forwarded)")
        else:
            assert status in (400, 403), (target, status)
    measure(inputs=len(BYPASSES), forwarded=len(forwarded))
    assert not forwarded, "blocked path reached the backend:\n" + "\n".join(forwarded)
