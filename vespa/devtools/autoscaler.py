"""Local autoscaler emulator: a real aiohttp server playing the Vast autoscaler of PROTOCOL.md.

Serves /pubkey/ and /route/ (signing with the url-only scheme, as Vast's current autoscaler does,
or the full or legacy one), records /worker_status/ and /delete_requests/ for tests, validates
every reported field's type, and shows the fleet at /. For Vast's own client (``vastai``) it also
serves the console's endpoint rows (/api/v0/endptjobs/) and /get_endpoint_workers/.
Run: ``python -m vespa.devtools.autoscaler --port 8081 [--scheme url|full|legacy]``.
"""

from __future__ import annotations

import argparse
import asyncio
import html
import math
import time
import uuid
from dataclasses import dataclass

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from vespa.corridor import auth
from vespa.devtools.signing import DEFAULT_ENDPOINT, Signer

JSON_FAULT = {"error": "emulated autoscaler fault"}
ENDPOINT_LIST_PATH = "/api/v0/endptjobs/"
DEFAULT_SCHEME = "url"  # Vast's current autoscaler signs {"url": ...} only


# -- field checks (one predicate and its description per field, as Vast's worker sends it) -----

def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


INTEGER = (is_int, "an integer")
COUNT = (lambda v: is_int(v) and v >= 0, "an integer >= 0")
NUMBER = (is_number, "a finite number")
AMOUNT = (lambda v: is_number(v) and v >= 0, "a finite number >= 0")
STRING = (lambda v: isinstance(v, str), "a string")
BOOLEAN = (lambda v: isinstance(v, bool), "a boolean")
INT_LIST = (lambda v: isinstance(v, list) and all(map(is_int, v)), "a list of integers")
MESSAGE = (lambda v: isinstance(v, str) and v != "", "a non-empty string")
# Vast's worker sends time.time() floats, and 0.0 (never null) for a step that never happened
TIMESTAMP = (lambda v: isinstance(v, float) and math.isfinite(v) and v >= 0,
             "a float >= 0 (0.0 when it never happened)")
RECORD_STATUSES = ("Success", "Error", "Cancelled", "Rejected")
RECORD_STATUS = (lambda v: v in RECORD_STATUSES, "one of " + ", ".join(RECORD_STATUSES))

# The fields of Vast's current worker (vastai 1.9.1), all required.
WORKER_STATUS_FIELDS = {
    "id": INTEGER, "mtoken": STRING, "version": STRING, "loadtime": AMOUNT, "cur_load": AMOUNT,
    "rej_load": AMOUNT, "new_load": AMOUNT, "error_msg": STRING, "max_perf": AMOUNT,
    "cur_perf": AMOUNT, "cur_capacity": AMOUNT, "max_capacity": AMOUNT,
    "num_requests_working": COUNT, "num_requests_recieved": COUNT,
    "additional_disk_usage": NUMBER, "disk_usage": AMOUNT, "working_request_idxs": INT_LIST,
    "url": STRING,
}
# What Vast's start_server.sh sends when the worker cannot start: these five fields only.
STARTUP_ERROR_FIELDS = {"id": INTEGER, "mtoken": STRING, "version": STRING,
                        "error_msg": MESSAGE, "url": STRING}
DELETE_COMMON_FIELDS = {"worker_id": INTEGER, "mtoken": STRING}
DELETE_LEGACY_FIELDS = {"request_idxs": INT_LIST, "success": BOOLEAN}
DELETE_RECORD_FIELDS = {
    "request_idx": INTEGER, "success": BOOLEAN, "status": RECORD_STATUS,
    "entered_queue_at": TIMESTAMP, "work_started_at": TIMESTAMP, "work_completed_at": TIMESTAMP,
}


def field_errors(body: dict, fields: dict, where: str) -> list[str]:
    """One message per missing or mistyped field."""
    errors = []
    for name, (accepts, expected) in fields.items():
        if name not in body:
            errors.append(f"{where}: {name} is missing")
        elif not accepts(body[name]):
            errors.append(f"{where}: {name} must be {expected}, got {body[name]!r:.80}")
    return errors


def worker_status_errors(body: dict, where: str) -> list[str]:
    """A full worker_status, or start_server.sh's start-up error body (exactly its 5 fields)."""
    if set(body) == set(STARTUP_ERROR_FIELDS):
        return field_errors(body, STARTUP_ERROR_FIELDS, f"{where} (start-up error)")
    return field_errors(body, WORKER_STATUS_FIELDS, where)


# -- the fleet ---------------------------------------------------------------------------------

@dataclass
class WorkerView:
    """What the emulator knows of one worker: its latest report and what it routed there since."""

    worker_id: object
    report: dict
    last_seen: float
    routed_load: float = 0.0

    def state(self, now: float, stale_after: float) -> str:
        if now - self.last_seen > stale_after:
            return "stale"
        if self.report.get("error_msg"):
            return "error"
        if is_number(self.report.get("max_perf")) and self.report["max_perf"] > 0 \
                and self.report.get("url"):
            return "ready"
        return "loading"

    def expected_wait(self) -> float:
        """Seconds of queued work: reported load plus what was routed since, over max_perf."""
        cur_load = self.report.get("cur_load")
        cur_load = cur_load if is_number(cur_load) else 0.0
        return (cur_load + self.routed_load) / self.report["max_perf"]


class AutoscalerEmulator:
    """The emulator: ``await start()``, use ``url``, inspect the records, ``await stop()``.

    Records: ``reports`` (worker_status bodies), ``deleted`` (one dict per finished request, both
    delete_requests formats), ``delete_bodies``, ``routes`` (signed auth_data handed out),
    ``route_requests`` (every /route/ body received, routed or not) and ``validation_errors``
    (should stay empty). Faults: ``fail_reports``, ``fail_deletes``,
    ``fail_routes``, ``fail_pubkey`` answer 500 without recording; ``delay`` seconds precede
    every answer (a body that arrives is recorded even if its sender gave up waiting).
    ``signer`` holds the key (``signer.public_pem``, ``signer.public_key``) and signs auth_data.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, scheme: str = DEFAULT_SCHEME,
                 endpoint: str = DEFAULT_ENDPOINT, api_key: str | None = None,
                 private_key: rsa.RSAPrivateKey | None = None, stale_after: float = 30.0):
        self.signer = Signer(private_key, scheme, endpoint)
        self.host, self.port = host, port
        self.endpoint, self.api_key, self.stale_after = endpoint, api_key, stale_after
        self.workers: dict[object, WorkerView] = {}
        self.reports: list[dict] = []
        self.delete_bodies: list[dict] = []
        self.deleted: list[dict] = []
        self.routes: list[dict] = []
        self.route_requests: list[dict] = []
        self.validation_errors: list[str] = []
        self.fail_reports = self.fail_deletes = self.fail_routes = self.fail_pubkey = False
        self.delay = 0.0
        self.runner: web.AppRunner | None = None
        # The Vast API's endpoint list (account key -> endpoint key), for client tests.
        self.account_key: str | None = None
        self.endpoint_id = 1
        self.user_id = 1
        self.created_at = time.time()

    # -- serving -----------------------------------------------------------------------------
    @property
    def app(self) -> web.Application:
        self.signer.ensure_key()
        app = web.Application(middlewares=[self.faults])
        app.router.add_get("/", self.handle_status_page)
        app.router.add_get("/pubkey/", self.handle_pubkey)
        app.router.add_post("/route/", self.handle_route)
        app.router.add_post("/worker_status/", self.handle_worker_status)
        app.router.add_post("/delete_requests/", self.handle_delete_requests)
        app.router.add_get(ENDPOINT_LIST_PATH, self.handle_endpoint_list)
        app.router.add_get(ENDPOINT_LIST_PATH + "{id}/", self.handle_endpoint_row)
        app.router.add_post("/get_endpoint_workers/", self.handle_endpoint_workers)
        return app

    async def start(self) -> None:
        await asyncio.to_thread(self.signer.ensure_key)
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def __aenter__(self) -> "AutoscalerEmulator":
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @web.middleware
    async def faults(self, request: web.Request, handler):
        if self.delay:
            await request.read()  # take the body first: a sender that gives up still delivered it
            await asyncio.sleep(self.delay)
        failing = {"/pubkey/": self.fail_pubkey, "/route/": self.fail_routes,
                   "/worker_status/": self.fail_reports, "/delete_requests/": self.fail_deletes}
        if failing.get(request.path):
            return web.json_response(JSON_FAULT, status=500)
        return await handler(request)

    # -- handlers ----------------------------------------------------------------------------
    async def handle_pubkey(self, request: web.Request) -> web.Response:
        return web.Response(text=self.signer.public_pem, content_type="application/x-pem-file")

    async def handle_route(self, request: web.Request) -> web.Response:
        body = await read_json_object(request)
        if isinstance(body, web.Response):
            return body
        self.route_requests.append(body)
        if not self.api_key_ok(request, body):
            return error_response(401, "missing or wrong endpoint api key (Authorization: Bearer)")
        problem = self.route_problem(body)
        if problem:
            return error_response(404 if problem.startswith("no endpoint") else 400, problem)
        request_idx = body.get("request_idx") or self.signer.next_request_idx()
        worker = self.least_loaded_worker(time.monotonic())
        if worker is None:
            return web.json_response({"endpoint": self.endpoint, "status": self.state_counts(),
                                      "request_idx": request_idx})
        auth_data = self.signer.auth_data(worker.report["url"], body["cost"], request_idx)
        worker.routed_load += body["cost"]
        self.routes.append(dict(auth_data, worker_id=worker.worker_id))
        return web.json_response(dict(auth_data, __request_id=uuid.uuid4().hex))

    def api_key_ok(self, request: web.Request, body: dict) -> bool:
        if self.api_key is None:
            return True
        header = request.headers.get("Authorization", "")
        return header == f"Bearer {self.api_key}" or body.get("api_key") == self.api_key

    def route_problem(self, body: dict) -> str:
        if body.get("endpoint") != self.endpoint:
            return f"no endpoint named {body.get('endpoint')!r:.80}; this one is {self.endpoint!r}"
        if not is_number(body.get("cost")) or body["cost"] < 0:
            return "cost must be a finite number >= 0"
        if "request_idx" in body and not COUNT[0](body["request_idx"]):
            return "request_idx must be an integer >= 0"
        return ""

    def least_loaded_worker(self, now: float) -> WorkerView | None:
        ready = [w for w in self.workers.values() if w.state(now, self.stale_after) == "ready"]
        return min(ready, key=WorkerView.expected_wait, default=None)

    def state_counts(self) -> dict[str, int]:
        now = time.monotonic()
        counts = {"ready": 0, "loading": 0, "error": 0, "stale": 0}
        for worker in self.workers.values():
            counts[worker.state(now, self.stale_after)] += 1
        return counts

    async def handle_worker_status(self, request: web.Request) -> web.Response:
        body = await read_json_object(request)
        if isinstance(body, web.Response):
            self.validation_errors.append("worker_status: body is not a JSON object")
            return body
        worker_id = body["id"] if is_int(body.get("id")) else str(body.get("url", "?"))
        self.validation_errors += worker_status_errors(body,
                                                       f"worker_status from {worker_id!r:.80}")
        self.reports.append(body)
        self.workers[worker_id] = WorkerView(worker_id, body, time.monotonic())
        return web.json_response({"ok": True})

    async def handle_delete_requests(self, request: web.Request) -> web.Response:
        body = await read_json_object(request)
        if isinstance(body, web.Response):
            self.validation_errors.append("delete_requests: body is not a JSON object")
            return body
        self.delete_bodies.append(body)
        self.validation_errors += field_errors(body, DELETE_COMMON_FIELDS, "delete_requests")
        if "requests" in body:
            self.record_deleted_2026(body)
        else:
            self.record_deleted_legacy(body)
        return web.json_response({"ok": True})

    def record_deleted_2026(self, body: dict) -> None:
        if not isinstance(body["requests"], list):
            self.validation_errors.append("delete_requests: requests must be a list")
            return
        for n, record in enumerate(body["requests"]):
            if not isinstance(record, dict):
                self.validation_errors.append(f"delete_requests: requests[{n}] is not an object")
                continue
            self.validation_errors += field_errors(record, DELETE_RECORD_FIELDS,
                                                   f"delete_requests requests[{n}]")
            self.deleted.append(dict(record, worker_id=body.get("worker_id"), format="requests"))

    def record_deleted_legacy(self, body: dict) -> None:
        errors = field_errors(body, DELETE_LEGACY_FIELDS, "delete_requests")
        self.validation_errors += errors
        if errors:
            return
        for request_idx in body["request_idxs"]:
            self.deleted.append({"request_idx": request_idx, "success": body["success"],
                                 "worker_id": body.get("worker_id"), "format": "legacy"})

    def deleted_request_idxs(self) -> list[int]:
        return [record.get("request_idx") for record in self.deleted]

    # -- the Vast API's endpoint list (what `vastai show endpoints` reads) ----------------------
    def endpoint_row(self) -> dict:
        """This endpoint as the console lists it; Vast's client requires every field here."""
        return {"id": self.endpoint_id, "endpoint_name": self.endpoint,
                "api_key": self.api_key or "", "user_id": self.user_id,
                "created_at": self.created_at, "endpoint_state": "active"}

    def account_key_ok(self, given: str | None) -> bool:
        return self.account_key is not None and given == self.account_key

    async def handle_endpoint_list(self, request: web.Request) -> web.Response:
        """``GET /api/v0/endptjobs/``: this endpoint and its key, for the account key only."""
        if not self.account_key_ok(bearer(request)):
            return account_key_refused()
        return web.json_response({"success": True, "results": [self.endpoint_row()]})

    async def handle_endpoint_row(self, request: web.Request) -> web.Response:
        """``GET /api/v0/endptjobs/{id}/``: one endpoint (Vast's client refreshes it every 3 days)."""
        if not self.account_key_ok(bearer(request)):
            return account_key_refused()
        if request.match_info["id"] != str(self.endpoint_id):
            return error_response(404, f"no endpoint with id {request.match_info['id']!r:.80}")
        return web.json_response({"success": True, "result": self.endpoint_row()})

    async def handle_endpoint_workers(self, request: web.Request) -> web.Response:
        """``POST /get_endpoint_workers/`` ``{"id", "api_key": <account key>}`` (in the body, no
        header): one row per reporting worker with an integer id, in the fields Vast's client
        reads."""
        body = await read_json_object(request)
        if isinstance(body, web.Response):
            return body
        if not self.account_key_ok(body.get("api_key")):
            return account_key_refused()
        if body.get("id") != self.endpoint_id:
            return web.json_response({"error_msg": f"no endpoint with id {body.get('id')!r:.80}"})
        now = time.monotonic()
        return web.json_response([self.worker_row(w, now) for w in self.workers.values()
                                  if is_int(w.worker_id)])

    def worker_row(self, worker: WorkerView, now: float) -> dict:
        report = worker.report
        row = {"id": worker.worker_id, "status": worker.state(now, self.stale_after)}
        for name, field in (("cur_load", "cur_load"), ("new_load", "new_load"),
                            ("cur_perf", "cur_perf"), ("perf", "max_perf"),
                            ("measured_perf", "max_perf"), ("disk_usage", "disk_usage"),
                            ("reqs_working", "num_requests_working")):
            if is_number(report.get(field)):
                row[name] = report[field]
        return row

    async def handle_status_page(self, request: web.Request) -> web.Response:
        return web.Response(text=self.status_page(), content_type="text/html")

    def status_page(self) -> str:
        now = time.monotonic()
        head = "".join(f"<th>{name}</th>" for name in
                       ["worker", "state", "last seen", *WORKER_STATUS_FIELDS])
        rows = "".join(
            "<tr>" + cell(w.worker_id) + cell(w.state(now, self.stale_after))
            + cell(f"{now - w.last_seen:.1f} s ago")
            + "".join(cell(w.report.get(name, "")) for name in WORKER_STATUS_FIELDS) + "</tr>"
            for w in self.workers.values())
        errors = "".join(f"<li>{html.escape(e)}</li>" for e in self.validation_errors[-20:])
        return (f"<!doctype html><meta http-equiv=refresh content=2><title>Vespa autoscaler "
                f"emulator</title><h1>Endpoint {html.escape(self.endpoint)} ({self.signer.scheme} "
                f"signatures)</h1><p>{len(self.reports)} reports, {len(self.routes)} routes, "
                f"{len(self.deleted)} finished requests, {len(self.validation_errors)} "
                f"validation errors</p><table border=1><tr>{head}</tr>{rows}</table>"
                f"<ul>{errors}</ul>")


def cell(value) -> str:
    return f"<td>{html.escape(str(value))}</td>"


def bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    return header[len("Bearer "):] if header.startswith("Bearer ") else None


def account_key_refused() -> web.Response:
    return web.json_response({"success": False, "error": "auth_error",
                              "msg": "invalid or missing account api key"}, status=401)


def error_response(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def read_json_object(request: web.Request) -> dict | web.Response:
    """The request's JSON object body, or a 400 answer saying why not."""
    try:
        body = await request.json()
    except ValueError:
        return error_response(400, "body is not JSON")
    if not isinstance(body, dict):
        return error_response(400, "body must be a JSON object")
    return body


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="listen address (loopback default)")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--scheme", choices=auth.SCHEMES, default=DEFAULT_SCHEME,
                        help=f"how /route/ signs (default {DEFAULT_SCHEME}: Vast's current)")
    parser.add_argument("--endpoint", default=DEFAULT_ENDPOINT, help="endpoint name to serve")
    parser.add_argument("--api-key", default=None, help="require this Bearer key on /route/")
    parser.add_argument("--account-key", default=None,
                        help=f"serve the endpoint list at {ENDPOINT_LIST_PATH} to this key")
    parser.add_argument("--stale-after", type=float, default=30.0,
                        help="seconds without a report before a worker is no longer routed to")
    args = parser.parse_args(argv)
    emulator = AutoscalerEmulator(args.host, args.port, scheme=args.scheme,
                                  endpoint=args.endpoint, api_key=args.api_key,
                                  stale_after=args.stale_after)
    emulator.account_key = args.account_key
    print(f"autoscaler emulator on http://{args.host}:{args.port} (endpoint {args.endpoint!r}, "
          f"{args.scheme} signatures); set REPORT_ADDR=http://{args.host}:{args.port}")
    web.run_app(emulator.app, host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
