"""start_server.sh's helpers for the local stack. Standard library only: the port check runs
before the worker's env exists, with any python3.

  ports NAME=HOST:PORT ...        one line for each port that cannot be bound (taken, or set twice),
                                  then exit 2; NAME is the setting that moves it
  listening HOST:PORT --pid P     wait until something accepts connections there; exit 1 if P
                                  ends (or --timeout passes) first
  ready URL --pid P --block TEXT  once URL answers 200, print a ready line and TEXT; if it says the
                                  worker is errored, print why; ends when P does
  progress --pid P --label TEXT   "TEXT: Ns" every --every seconds while P runs
  models URL                      print the first model id of URL/v1/models; exit 1 when there is
                                  none (not an OpenAI-compatible server, or not up)

Every line goes to stderr with start_server.sh's "[start_server] " prefix.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request

PREFIX = "[start_server] "


def say(line: str) -> None:
    try:
        print(PREFIX + line, file=sys.stderr, flush=True)
    except OSError:  # the terminal is gone (SIGHUP): nobody to tell
        pass


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, exited but not yet waited for, counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def split_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


def bind_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on now (None when it can). SO_REUSEADDR as the
    servers themselves set it: a closed connection in TIME_WAIT does not count, a listener does."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "taken"
            return f"cannot be bound ({exc.strerror or exc})"
    return None


def check_ports(specs: list[str]) -> int:
    """``NAME=HOST:PORT`` each: one line per port that is taken or named twice; 2 if any."""
    seen: dict[int, str] = {}
    bad = 0
    for spec in specs:
        name, _, address = spec.partition("=")
        host, port = split_address(address)
        if port in seen:
            say(f"port {port} is set for both {seen[port]} and {name}: set one of them to "
                "another port")
            bad += 1
            continue
        seen[port] = name
        problem = bind_problem(host, port)
        if problem == "taken":
            say(f"port {port} is taken (something already listens there, an earlier "
                f"start_server.sh?): stop it, or set {name} to a free port")
            bad += 1
        elif problem:
            say(f"port {port} {problem}: set {name} to another port")
            bad += 1
    return 2 if bad else 0


def wait_listening(address: str, pid: int, timeout: float) -> int:
    host, port = split_address(address)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive(pid):
        try:
            socket.create_connection((host, port), timeout=1).close()
            return 0
        except OSError:
            time.sleep(0.1)
    return 1


def get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """Status and body of GET ``url``; (0, b"") when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as answer:
        return answer.code, answer.read()
    except (OSError, ValueError):
        return 0, b""


def watch_ready(url: str, pid: int, block: str, interval: float = 0.5) -> int:
    started = time.monotonic()
    while alive(pid):
        status, body = get(url)
        if status == 200:
            say(f"READY after {time.monotonic() - started:.0f}s: the worker takes requests")
            for line in block.splitlines():
                say(line)
            return 0
        try:
            answer = json.loads(body) if body else {}
        except ValueError:
            answer = {}
        if isinstance(answer, dict) and answer.get("phase") == "errored":
            say(f"the worker is errored: {answer.get('error') or 'see its log above'}")
            say("it stays up so that an autoscaler is told why; fix that, then stop the stack "
                "(Ctrl-C, or kill the start_server.sh pid) and start it again")
            return 1
        time.sleep(interval)
    return 1


def progress(pid: int, label: str, every: float) -> int:
    started = time.monotonic()
    next_line = started + every
    while alive(pid):
        time.sleep(0.2)
        if time.monotonic() >= next_line and alive(pid):
            say(f"{label}: {time.monotonic() - started:.0f}s")
            next_line += every
    return 0


def first_model(url: str) -> int:
    status, body = get(url.rstrip("/") + "/v1/models", timeout=5)
    try:
        model = json.loads(body)["data"][0]["id"] if status == 200 else None
    except (ValueError, KeyError, IndexError, TypeError):
        model = None
    if not isinstance(model, str) or not model:
        return 1
    print(model)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    ports = commands.add_parser("ports")
    ports.add_argument("specs", nargs="+")
    listening = commands.add_parser("listening")
    listening.add_argument("address")
    listening.add_argument("--pid", type=int, required=True)
    listening.add_argument("--timeout", type=float, default=60.0)
    ready = commands.add_parser("ready")
    ready.add_argument("url")
    ready.add_argument("--pid", type=int, required=True)
    ready.add_argument("--block", default="")
    ticker = commands.add_parser("progress")
    ticker.add_argument("--pid", type=int, required=True)
    ticker.add_argument("--label", required=True)
    ticker.add_argument("--every", type=float, default=5.0)
    models = commands.add_parser("models")
    models.add_argument("url")
    args = parser.parse_args(argv)
    try:
        if args.command == "ports":
            return check_ports(args.specs)
        if args.command == "listening":
            return wait_listening(args.address, args.pid, args.timeout)
        if args.command == "ready":
            return watch_ready(args.url, args.pid, args.block)
        if args.command == "progress":
            return progress(args.pid, args.label, args.every)
        return first_model(args.url)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
