"""The command line of ``client.py``: flags, environment, key files, the interactive prompt.

Keys, strongest first: ``--api-key``/``--account-key``, then ``VAST_API_KEY``/``VAST_ACCOUNT_KEY``,
then the Vast CLI's key file (an account key). With something missing and a terminal attached it
asks; without a terminal it says what to pass. Everything here runs before the event loop, except
the short ``asyncio.run`` calls that list endpoints.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import aiohttp

from .keys import EndpointInfo, KeyLookupError, home_dir, list_endpoints, read_account_key_file
from .options import AUTOSCALER_URL, CONSOLE_URL, DEFAULT_COST, DEFAULT_HOST, DEFAULT_PORT, \
    ClientOptions
from .service import VastClient
from .tls import TLSSetupError


class UsageError(Exception):
    """Something the user must pass is missing or wrong; exit 2 with the message."""


@dataclass
class Keys:
    api_key: str | None = None
    api_key_source: str = ""
    account_key: str | None = None
    account_key_source: str = ""


@dataclass
class Prompter:
    """How the user is asked (injectable for tests)."""

    ask: Callable[[str], str] = input
    ask_secret: Callable[[str], str] = getpass.getpass
    say: Callable[[str], None] = print


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="client.py", description="Local proxy to a Vast.ai serverless endpoint: send plain "
        "HTTP (OpenAI SDK, curl) to http://127.0.0.1:8010 and it is routed to a worker.")
    add = parser.add_argument
    add("--endpoint", help="endpoint name (env VAST_ENDPOINT)")
    add("--api-key", help="the endpoint's API key (env VAST_API_KEY)")
    add("--account-key", help="your Vast account API key; the endpoint key is looked up with it "
        "(env VAST_ACCOUNT_KEY, else ~/.config/vastai/vast_api_key or ~/.vast_api_key)")
    add("--list", action="store_true", help="list the account's endpoints and exit")
    add("--autoscaler-url", default=AUTOSCALER_URL, help="autoscaler serving /route/ (default "
        "%(default)s; e.g. the local emulator)")
    add("--console-url", default=CONSOLE_URL, help="Vast API for the endpoint list "
        "(default %(default)s)")
    add("--host", default=DEFAULT_HOST, help="listen address (default %(default)s)")
    add("--port", type=int, default=DEFAULT_PORT, help="listen port (default %(default)s)")
    add("--route-timeout", type=float, default=300.0, help="seconds to wait for a ready worker "
        "during a cold start before answering 503 (default %(default)s)")
    add("--request-timeout", type=float, default=None, help="seconds for one worker answer "
        "(default: no limit)")
    add("--max-attempts", type=int, default=5, help="worker attempts per request on 429/502/503 "
        "or connection errors (default %(default)s)")
    add("--default-cost", type=float, default=DEFAULT_COST, help="workload of a request nothing "
        "else tells (default %(default)s)")
    add("--ca-file", help="Vast's root CA for HTTPS workers (env VAST_CA_FILE; default: "
        "downloaded once from Vast and cached)")
    add("--debug", action="store_true", help="log every route and worker attempt")
    return parser


def find_keys(args: argparse.Namespace, env: Mapping[str, str], home: Path) -> Keys:
    """The keys from flags, then environment, then the Vast CLI's key file."""
    keys = Keys()
    for value, source in ((args.api_key, "--api-key"), (env.get("VAST_API_KEY"), "VAST_API_KEY")):
        if value and value.strip():
            keys.api_key, keys.api_key_source = value.strip(), source
            break
    for value, source in ((args.account_key, "--account-key"),
                          (env.get("VAST_ACCOUNT_KEY"), "VAST_ACCOUNT_KEY")):
        if value and value.strip():
            keys.account_key, keys.account_key_source = value.strip(), source
            break
    if keys.account_key is None:
        found = read_account_key_file(env, home)
        if found is not None:
            keys.account_key, keys.account_key_source = found
    return keys


def fetch_endpoints(console_url: str, account_key: str) -> list[EndpointInfo]:
    """The endpoint list, in a short event loop of its own (before the proxy's loop)."""
    async def fetch() -> list[EndpointInfo]:
        async with aiohttp.ClientSession() as session:
            return await list_endpoints(session, console_url, account_key)
    return asyncio.run(fetch())


def format_endpoints(endpoints: list[EndpointInfo]) -> str:
    if not endpoints:
        return "no endpoints on this account"
    width = max(len(e.name) for e in endpoints)
    return "\n".join(f"{n:>3}. {e.name:<{width}}  id {e.id}  {e.state}".rstrip()
                     for n, e in enumerate(endpoints, 1))


def choose_endpoint(endpoints: list[EndpointInfo], prompter: Prompter) -> str:
    """Ask for an endpoint by number or name until the answer names one."""
    prompter.say(format_endpoints(endpoints))
    names = [e.name for e in endpoints]
    while True:
        answer = prompter.ask("Endpoint (number or name): ").strip()
        if answer.isdigit() and 1 <= int(answer) <= len(names):
            return names[int(answer) - 1]
        if answer in names or (answer and not names):
            return answer
        prompter.say(f"no endpoint {answer!r}; pick a number from 1 to {len(names)}")


def complete(endpoint: str | None, keys: Keys, console_url: str,
             prompter: Prompter | None) -> str:
    """Ask for what is missing (key, then endpoint) when a prompter is given; else explain."""
    if keys.api_key is None and keys.account_key is None:
        if prompter is None:
            raise UsageError("no key: pass --api-key ENDPOINT_KEY or --account-key ACCOUNT_KEY "
                             "(or set VAST_API_KEY / VAST_ACCOUNT_KEY)")
        keys.account_key = prompter.ask_secret("Vast account API key (hidden): ").strip()
        keys.account_key_source = "the prompt"
        if not keys.account_key:
            raise UsageError("no key given")
    if endpoint:
        return endpoint
    if prompter is None:
        raise UsageError("no endpoint: pass --endpoint NAME (or set VAST_ENDPOINT); "
                         "--list shows the account's endpoints")
    if keys.account_key:
        return choose_endpoint(fetch_endpoints(console_url, keys.account_key), prompter)
    return prompter.ask("Endpoint name: ").strip()


def options_from(args: argparse.Namespace, env: Mapping[str, str], home: Path,
                 prompter: Prompter | None) -> ClientOptions:
    keys = find_keys(args, env, home)
    endpoint = complete(args.endpoint or env.get("VAST_ENDPOINT"), keys, args.console_url,
                        prompter)
    try:
        return ClientOptions(
            endpoint=endpoint, api_key=keys.api_key, account_key=keys.account_key,
            api_key_source=keys.api_key_source, account_key_source=keys.account_key_source,
            autoscaler_url=args.autoscaler_url, console_url=args.console_url, host=args.host,
            port=args.port, route_timeout=args.route_timeout,
            request_timeout=args.request_timeout, max_attempts=args.max_attempts,
            default_cost=args.default_cost, ca_file=args.ca_file or env.get("VAST_CA_FILE"))
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def list_command(args: argparse.Namespace, env: Mapping[str, str], home: Path,
                 prompter: Prompter | None) -> None:
    keys = find_keys(args, env, home)
    if keys.account_key is None:
        if prompter is None:
            raise UsageError("--list needs your account key: --account-key, VAST_ACCOUNT_KEY "
                             "or ~/.config/vastai/vast_api_key (an endpoint key cannot list)")
        keys.account_key = prompter.ask_secret("Vast account API key (hidden): ").strip()
    print(format_endpoints(fetch_endpoints(args.console_url, keys.account_key)))


async def serve(options: ClientOptions) -> None:
    """Run the proxy until SIGINT/SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with VastClient(options) as client:
        print(f"Vast endpoint {options.endpoint!r} on {client.url} - use it as your API base "
              f"URL (OpenAI SDK: base_url={client.url}/v1). Ctrl-C stops.", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.debug:
        logging.getLogger("aiohttp").setLevel(logging.WARNING)
    prompter = Prompter() if sys.stdin.isatty() else None
    env, home = os.environ, home_dir()
    try:
        if args.list:
            list_command(args, env, home, prompter)
            return 0
        asyncio.run(serve(options_from(args, env, home, prompter)))
    except UsageError as exc:
        print(f"client.py: {exc}", file=sys.stderr)
        return 2
    except (KeyLookupError, TLSSetupError, OSError) as exc:
        print(f"client.py: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, EOFError):
        return 130
    return 0
