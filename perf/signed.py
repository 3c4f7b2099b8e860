"""The signed side of the perf harness: the autoscaler's key, a minimal autoscaler, signed bodies.

    python perf/signed.py autoscaler --port 8081 --key KEY.pem   # what run.py starts

Every request Vast routes to a worker is signed. The harness measures that path the way Vast's
client sends it (``POST {url}{route}?api_key=...``, ``Authorization: Bearer ...``, the envelope
``{"auth_data": <the /route/ answer>, "session_id": null, "payload": ...}``), with each scheme
Vast's autoscalers use:

- url-only (Vast's current autoscaler): the signature is the same for every request to a worker,
  so one signed body serves the whole run (wrk sends it as a static body);
- full (cost, endpoint, reqnum, request_idx, url): every request needs its own reqnum and its own
  signature, or the worker's replay window refuses it. A ``Pool`` of pre-signed reqnums is made
  once (signing costs about a millisecond each), kept under perf/results/signing/ with the key,
  and read by wrk line by line (``pool_script``); the harness restarts that worker, whose replay
  window then starts empty, whenever the next run could need more lines than are left.

``Autoscaler`` is the smallest autoscaler a signed worker needs on loopback: ``GET /pubkey/``,
and ``POST /worker_status/`` and ``/delete_requests/`` answered 200 without parsing the body (the
emulator in vespa/devtools validates every report, which would take CPU from the measurement);
``GET /_perf/ready/{id}`` answers 200 once worker ``id`` has reported itself loaded (Vast's own
worker has no readiness route). All signing uses the same key, so Vespa and Vast's worker verify
the same signatures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

PERF_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(PERF_DIR.parent))  # this checkout's vespa (its message builders)
from vespa.corridor import auth  # noqa: E402

SIGNING_DIR = PERF_DIR / "results" / "signing"  # gitignored with the rest of perf/results/
ENDPOINT = "perf-endpoint"
ENDPOINT_KEY = "perf-endpoint-key"  # what Vast's client adds as ?api_key= and a Bearer header
PUBLIC_URL = "http://perf-worker.invalid:3000"  # the URL the signed Vespa workers are told is theirs
COST = 16  # the chat request's max_tokens: its workload
REQUEST_ID = "0b4c2f3e-perf-4b7e-9d52-3f0a8c1e2d6b"  # the /route/ answer's __request_id


# -- the key ------------------------------------------------------------------------------------

def autoscaler_key(directory: Path = SIGNING_DIR) -> tuple[rsa.RSAPrivateKey, Path]:
    """The harness's autoscaler key (2048 bits, made once) and the file holding it."""
    path = directory / "autoscaler-key.pem"
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        assert isinstance(key, rsa.RSAPrivateKey)
        return key, path
    directory.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return key, path


def public_pem(key: rsa.RSAPrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()


# -- what the client sends ----------------------------------------------------------------------

def auth_data(url: str, reqnum: int, signature: str = "") -> dict:
    """The /route/ answer Vast's client puts in the envelope whole (request_idx = reqnum here)."""
    return {"cost": COST, "endpoint": ENDPOINT, "reqnum": reqnum, "request_idx": reqnum,
            "signature": signature, "url": url, "__request_id": REQUEST_ID}


def envelope(auth: dict, payload: dict) -> bytes:
    """The body as Vast's client writes it (aiohttp's json=: json.dumps' default separators)."""
    return json.dumps({"auth_data": auth, "session_id": None, "payload": payload}).encode()


def url_signed_body(key: rsa.RSAPrivateKey, url: str, payload: dict) -> bytes:
    """The one body a url-only run sends again and again (Vast's current autoscaler)."""
    fields = auth_data(url, 1)
    fields["signature"] = auth.sign(key, fields, "url")
    return envelope(fields, payload)


def client_path(route: str) -> str:
    return f"{route}?api_key={ENDPOINT_KEY}"


CLIENT_HEADERS = {"Content-Type": "application/json", "Authorization": f"Bearer {ENDPOINT_KEY}",
                  "User-Agent": "vastai-sdk/1.9.1"}


# -- the full scheme's pool of pre-signed reqnums -------------------------------------------------

def _sign_range(key_path: str, url: str, first: int, count: int) -> list[str]:
    """Lines ``reqnum signature`` for reqnums first..first+count-1 (run in a worker process)."""
    key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return [f"{reqnum} {auth.sign(key, auth_data(url, reqnum), 'full')}\n"
            for reqnum in range(first, first + count)]


class Pool:
    """Pre-signed full-scheme requests, one ``reqnum signature`` line each, reqnums 1, 2, ...

    ``cursor`` is the next unused line for the worker as it is now; ``grow`` signs more lines
    (between runs, never while one is measured); the offsets let wrk start at any line.
    """

    def __init__(self, key_path: Path, url: str, directory: Path = SIGNING_DIR):
        self.key_path = key_path
        self.url = url
        fingerprint = auth.PublicKey.from_pem(
            public_pem(serialization.load_pem_private_key(key_path.read_bytes(), None))
        ).fingerprint.split(":")[1]
        self.path = directory / f"full-pool-{fingerprint}.txt"
        self.offsets: list[int] = []  # byte offset of each line, and of the end
        self.cursor = 0
        self._index()

    def _index(self) -> None:
        offsets = [0]
        if self.path.exists():
            with open(self.path, "rb") as pool:
                header = pool.readline()
                if json.loads(header) != {"url": self.url, "endpoint": ENDPOINT, "cost": COST}:
                    raise ValueError(f"{self.path} was signed for other requests: delete it")
                offsets = [len(header)]
                for line in pool:
                    offsets.append(offsets[-1] + len(line))
        self.offsets = offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def left(self) -> int:
        return len(self) - self.cursor

    def grow(self, size: int, processes: int = 2) -> float:
        """Sign lines until there are ``size``; returns the seconds it took (0 when none)."""
        if len(self) >= size:
            return 0.0
        started = time.monotonic()
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"url": self.url, "endpoint": ENDPOINT,
                                             "cost": COST}) + "\n")
        chunk = 2000
        firsts = range(len(self) + 1, size + 1, chunk)
        with ProcessPoolExecutor(processes) as signers, open(self.path, "a") as pool:
            for lines in signers.map(_sign_range, [str(self.key_path)] * len(firsts),
                                     [self.url] * len(firsts), firsts,
                                     [min(chunk, size + 1 - first) for first in firsts]):
                pool.writelines(lines)
        self._index()
        return time.monotonic() - started

    def take(self, payload: dict) -> bytes:
        """The next line's body (a single request outside wrk, e.g. the sanity check)."""
        with open(self.path, "rb") as pool:
            pool.seek(self.offsets[self.cursor])
            reqnum, signature = pool.readline().decode().split()
        self.cursor += 1
        return envelope(auth_data(self.url, int(reqnum), signature), payload)


def lua_string(text: str) -> str:
    assert "]==]" not in text
    return "[==[" + text + "]==]"


def pool_script(url: str, payload: dict, header_lines: str, done: str) -> str:
    """A wrk script sending one pool line per request, from the byte offset in its arguments
    (``-- FILE OFFSET``), and counting the lines it used (``made``, for ``done`` to print)."""
    template = envelope(auth_data(url, 0, "SIG"), payload).decode()
    head, rest = template.split('"reqnum": 0, "request_idx": 0', 1)
    middle, tail = rest.split("SIG", 1)
    return (f'wrk.method = "POST"\n{header_lines}'
            f"local head, middle, tail = {lua_string(head)}, {lua_string(middle)}, "
            f"{lua_string(tail)}\n"
            "local pool\nmade = 0\nlocal threads = {}\n"
            "setup = function(thread) table.insert(threads, thread) end\n"
            "init = function(args)\n"
            "  pool = assert(io.open(args[1], 'rb'))\n"
            "  pool:seek('set', tonumber(args[2]))\n"
            "end\n"
            "request = function()\n"
            "  local line = pool:read('*l')\n"
            "  if line == nil then pool:seek('set', 0); pool:read('*l'); line = pool:read('*l') end\n"
            "  local reqnum, signature = line:match('^(%d+) (%S+)$')\n"
            "  made = made + 1\n"
            "  return wrk.format(nil, nil, nil, head .. '\"reqnum\": ' .. reqnum .. "
            "', \"request_idx\": ' .. reqnum .. middle .. signature .. tail)\n"
            "end\n" + done)



# -- the autoscaler -------------------------------------------------------------------------------

def serve_autoscaler(port: int, key_path: Path) -> None:
    """GET /pubkey/, POST /worker_status/ and /delete_requests/ (200, body not parsed beyond a
    loaded worker's id), GET /_perf/ready/{id}."""
    from aiohttp import web

    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    pem = public_pem(key)
    loaded: set[str] = set()

    async def pubkey(request: web.Request) -> web.Response:
        return web.Response(text=pem)

    async def worker_status(request: web.Request) -> web.Response:
        report = await request.json()
        if report.get("loadtime") or report.get("max_perf"):
            loaded.add(str(report.get("id")))
        return web.json_response({})

    async def delete_requests(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({})

    async def ready(request: web.Request) -> web.Response:
        return web.Response(status=200 if request.match_info["id"] in loaded else 503)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.add_routes([web.get("/pubkey/", pubkey), web.post("/worker_status/", worker_status),
                    web.post("/delete_requests/", delete_requests),
                    web.get("/_perf/ready/{id}", ready)])
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("autoscaler", help="serve the minimal autoscaler")
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--key", type=Path, required=True, help="the private key's PEM file")
    args = parser.parse_args()
    if args.command == "autoscaler":
        serve_autoscaler(args.port, args.key)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
