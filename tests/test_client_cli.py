"""The client's command line, key sources, prompt and TLS set-up; the endpoint list comes from
the autoscaler emulator on loopback (the proxy itself is tested end to end in test_client.py)."""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from vespa.client.cli import (Prompter, UsageError, build_parser, choose_endpoint, complete,
                              find_keys, format_endpoints, options_from)
from vespa.client.keys import (EndpointInfo, KeyLookupError, parse_endpoint_list,
                               read_account_key_file, refused_key_message)
from vespa.client.options import ClientOptions
from vespa.client.tls import TLSSetupError, worker_ssl_context

from .conftest import PYTHON, REPO, free_port, worker_env

ENDPOINTS = [EndpointInfo(5, "llama", "k1", "active"), EndpointInfo(9, "tts", "k2", "suspended")]


def args(*argv: str):
    return build_parser().parse_args(list(argv))


class Scripted(Prompter):
    """A prompter that answers from a list and records what it was asked and told."""

    def __init__(self, *answers: str):
        self.answers, self.asked, self.said = list(answers), [], []
        super().__init__(ask=self.answer, ask_secret=self.answer, say=self.said.append)

    def answer(self, question: str) -> str:
        self.asked.append(question)
        return self.answers.pop(0)


def test_key_precedence_flags_then_environment_then_key_file(tmp_path):
    key_file = tmp_path / ".config" / "vastai" / "vast_api_key"
    key_file.parent.mkdir(parents=True)
    key_file.write_text("file-account-key\n")
    env = {"VAST_API_KEY": "env-endpoint-key", "VAST_ACCOUNT_KEY": "env-account-key"}
    keys = find_keys(args("--api-key", "flag-endpoint-key"), env, tmp_path)
    assert (keys.api_key, keys.api_key_source) == ("flag-endpoint-key", "--api-key")
    assert (keys.account_key, keys.account_key_source) == ("env-account-key", "VAST_ACCOUNT_KEY")
    keys = find_keys(args(), {}, tmp_path)
    assert keys.api_key is None
    assert (keys.account_key, keys.account_key_source) == ("file-account-key", str(key_file))


def test_legacy_key_file_and_xdg_config_home(tmp_path):
    (tmp_path / ".vast_api_key").write_text("legacy")
    assert read_account_key_file({}, tmp_path) == ("legacy", str(tmp_path / ".vast_api_key"))
    xdg = tmp_path / "xdg" / "vastai"
    xdg.mkdir(parents=True)
    (xdg / "vast_api_key").write_text(" newer ")
    assert read_account_key_file({"XDG_CONFIG_HOME": str(tmp_path / "xdg")}, tmp_path)[0] == \
        "newer"
    assert read_account_key_file({}, tmp_path / "nowhere") is None


def test_without_a_terminal_missing_things_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="--api-key ENDPOINT_KEY or --account-key"):
        options_from(args("--endpoint", "llama"), {}, tmp_path, None)
    with pytest.raises(UsageError, match="--endpoint NAME"):
        options_from(args("--api-key", "k"), {}, tmp_path, None)


def test_environment_fills_endpoint_and_ca_file(tmp_path):
    options = options_from(args("--port", "0"), {"VAST_ENDPOINT": "llama", "VAST_API_KEY": "k",
                                                 "VAST_CA_FILE": "/ca.pem"}, tmp_path, None)
    assert options == ClientOptions(endpoint="llama", api_key="k", api_key_source="VAST_API_KEY",
                                    account_key_source="", port=0, ca_file="/ca.pem")
    assert options.secrets == ("k",)


@pytest.fixture(scope="module")
def vast_api():
    """The autoscaler emulator as a process: its endpoint list answers the account key "ak"."""
    port = free_port()
    process = subprocess.Popen([PYTHON, "-m", "vespa.devtools.autoscaler", "--port", str(port),
                                "--endpoint", "tts", "--api-key", "ek", "--account-key", "ak"],
                               cwd=REPO, env=worker_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    process.kill()
    process.wait(10)


def test_prompt_asks_the_key_then_offers_the_endpoints(tmp_path, vast_api):
    prompter = Scripted("ak", "7", "tts")
    options = options_from(args("--console-url", vast_api), {}, tmp_path, prompter)
    assert options.endpoint == "tts" and options.account_key == "ak"
    assert options.account_key_source == "the prompt" and options.api_key is None
    assert "hidden" in prompter.asked[0]
    assert "  1. tts  id 1  active" in prompter.said
    assert any("no endpoint '7'" in line for line in prompter.said)
    with pytest.raises(KeyLookupError, match="refused the account key"):
        options_from(args("--console-url", vast_api), {}, tmp_path, Scripted("ek"))


def test_prompt_by_number_and_by_name_without_account_key():
    assert choose_endpoint(ENDPOINTS, Scripted("1")) == "llama"
    keys = find_keys(args("--api-key", "endpoint-key"), {}, Path("/nonexistent"))
    assert complete(None, keys, "https://console", Scripted("typed-name")) == "typed-name"


def test_endpoint_listing_format():
    text = format_endpoints(ENDPOINTS)
    assert text.splitlines() == ["  1. llama  id 5  active", "  2. tts    id 9  suspended"]
    assert format_endpoints([]) == "no endpoints on this account"


def test_endpoint_list_answers():
    rows = '{"success": true, "results": [{"id": 3, "endpoint_name": "a", "api_key": "k"}]}'
    assert parse_endpoint_list("u", 200, rows) == [EndpointInfo(3, "a", "k", "")]
    with pytest.raises(KeyLookupError, match="answered 200: not yours"):
        parse_endpoint_list("u", 200, '{"success": false, "msg": "not yours"}')
    with pytest.raises(KeyLookupError, match="answered 500"):
        parse_endpoint_list("u", 500, "<html>")


def test_refused_key_message_names_the_key_types():
    message = refused_key_message("llama", "https://run.vast.ai", 401, "--api-key", False)
    assert "endpoint's own API key" in message and "not your account key" in message
    assert "--api-key" in message and "--account-key" in message
    looked_up = refused_key_message("llama", "https://run.vast.ai", 401, "VAST_ACCOUNT_KEY", True)
    assert "looked up with your account key" in looked_up


def test_worker_tls_keeps_verification_and_drops_only_strict_flags(tmp_path):
    ca = make_ca(tmp_path)
    context = worker_ssl_context(ca.read_bytes())
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert not context.verify_flags & ssl.VERIFY_X509_STRICT
    with pytest.raises(TLSSetupError):
        worker_ssl_context(b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")


def make_ca(tmp_path: Path) -> Path:
    """A root CA without a keyUsage extension, like Vast's."""
    cert = tmp_path / "ca.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=Test Root", "-keyout", str(tmp_path / "ca.key"), "-out",
                    str(cert)], check=True, capture_output=True)
    return cert
