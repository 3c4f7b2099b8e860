"""``POST /pyworker/update``: Vast's platform asks the instance to update the worker's code.

As Vast's own worker, the route only writes a flag file (Vast's is ``/.force_update``); on a Vast
instance ``start_server.sh`` watches it, fetches the configured ref, drains the worker and starts
it again from the new code. Unlike Vast's worker, it needs ``Authorization: Bearer
<MASTER_TOKEN>`` exactly (compared in constant time): a raw token, or any request at all while
the instance has no master token, is refused with 401.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os

from ..corridor.answer import Answer, json_answer, json_error
from ..corridor.request_ids import request_id
from ..http.messages import Request

log = logging.getLogger("vespa")


def write_flag(path: str) -> None:
    """An empty file at ``path`` (made anew, or emptied)."""
    with open(path, "wb"):
        pass


class UpdateRoute:
    def __init__(self, master_token: str, flag_path: str):
        self.expected = b"Bearer " + master_token.encode() if master_token else None
        self.flag_path = flag_path

    def authorized(self, request: Request) -> bool:
        given = request.fields.get(b"authorization")
        if self.expected is None or given is None:
            return False
        return hmac.compare_digest(given, self.expected)

    async def __call__(self, request: Request) -> Answer:
        rid = request_id(request.header(b"x-request-id"))
        if request.method != "POST":
            return json_error(405, "/pyworker/update takes POST only", rid, {"Allow": "POST"})
        if not self.authorized(request):
            log.info("/pyworker/update refused: no valid Authorization: Bearer <MASTER_TOKEN>")
            return json_error(401, "unauthorized: send Authorization: Bearer <MASTER_TOKEN>", rid)
        try:
            await asyncio.to_thread(write_flag, self.flag_path)
        except OSError as exc:
            log.error("/pyworker/update: could not write %s: %s", self.flag_path, exc)
            return json_error(500, f"failed to write file: {exc}", rid)
        log.warning("/pyworker/update: wrote %s; on a Vast instance start_server.sh updates the "
                    "worker and restarts it", os.path.abspath(self.flag_path))
        return json_answer(200, {"ok": True})
