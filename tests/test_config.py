"""Settings: defaults, Vast's names, .env files, one clear line for a bad value, and the
declarations that the reader and the README's table both come from."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Mapping

import pytest

from vespa.config import DECLARATIONS, ConfigError, environment, load_settings
from vespa.config.readme import END, README, START, rewrite, settings_table, with_table
from vespa.config.settings import DECLARED
from vespa.worker import health_url

from .conftest import PYTHON, REPO, worker_env


def test_defaults():
    settings = load_settings({})
    assert settings.backend_url == "http://localhost:8000"
    assert settings.worker_port == 3000
    assert settings.unsecured is True  # no REPORT_ADDR: nobody signs, dev mode
    assert load_settings({"REPORT_ADDR": "http://127.0.0.1:8081",
                          "VESPA_PUBLIC_URL": "http://1.2.3.4:5"}).unsecured is False
    assert settings.max_wait_time == 10.0
    assert settings.max_throughput is None
    assert settings.concurrency_limit is None


def test_values_and_vast_port_name():
    settings = load_settings({
        "VESPA_BACKEND_URL": "http://127.0.0.1:9000/", "WORKER_PORT": "3005",
        "VESPA_UNSECURED": "yes", "VESPA_MAX_CONCURRENCY": "4", "VESPA_MAX_WAIT_TIME": "2.5",
        "VESPA_MAX_THROUGHPUT": "120", "VESPA_BLOCKED_PATHS": "/admin/*, /debug",
        "VESPA_LOG_LEVEL": "debug"})
    assert settings.backend_url == "http://127.0.0.1:9000"
    assert settings.worker_port == 3005
    assert settings.unsecured is True
    assert settings.concurrency_limit == 4
    assert settings.max_wait_time == 2.5
    assert settings.max_throughput == 120.0
    assert settings.blocked_paths == ("/admin/*", "/debug")
    assert settings.log_level == "DEBUG"
    assert load_settings({"VESPA_WORKER_PORT": "4000", "WORKER_PORT": "3005"}).worker_port == 4000


@pytest.mark.parametrize("value,unsecured", [("true", True), ("t", True), ("y", True),
                                              ("1", True), ("false", False), ("f", False),
                                              ("n", False), ("0", False)])
def test_vasts_unsecured_is_read_as_vasts_worker_reads_it(value, unsecured):
    """UNSECURED (Vast's start-up exports it; its worker reads it with strtobool);
    VESPA_UNSECURED wins."""
    vast = {"REPORT_ADDR": "http://127.0.0.1:8081", "UNSECURED": value,
            "VESPA_PUBLIC_URL": "http://1.2.3.4:5"}
    assert load_settings(vast).unsecured is unsecured
    assert load_settings({**vast, "VESPA_UNSECURED": str(not unsecured)}).unsecured \
        is (not unsecured)
    with pytest.raises(ConfigError, match="REPORT_ADDR"):  # signed, with nobody to sign
        load_settings({"UNSECURED": "false"})


def test_vasts_model_health_endpoint_is_the_health_check():
    assert load_settings({"MODEL_HEALTH_ENDPOINT": "/ping"}).healthcheck_endpoint == "/ping"
    given = load_settings({"MODEL_HEALTH_ENDPOINT": "http://127.0.0.1:9000/ready/",
                           "VESPA_HEALTHCHECK_ENDPOINT": "/health2"})
    assert given.healthcheck_endpoint == "/health2"
    url = load_settings({"MODEL_HEALTH_ENDPOINT": "http://127.0.0.1:9000/ready/"})
    assert url.healthcheck_endpoint == "http://127.0.0.1:9000/ready/"
    with pytest.raises(ConfigError, match="MODEL_HEALTH_ENDPOINT"):
        load_settings({"MODEL_HEALTH_ENDPOINT": "ready"})
    assert health_url("http://127.0.0.1:8000", "/ping") == "http://127.0.0.1:8000/ping"
    assert health_url("http://127.0.0.1:8000", "http://127.0.0.1:9000/ready/") == \
        "http://127.0.0.1:9000/ready/"


def test_tls_follows_vasts_default_on_a_vast_instance():
    """On a Vast instance (CONTAINER_ID) HTTPS unless USE_SSL=false, as Vast's start-up; off it,
    plain HTTP unless asked."""
    vast = {"CONTAINER_ID": "42", "PUBLIC_IPADDR": "1.2.3.4", "VAST_TCP_PORT_3000": "40000",
            "REPORT_ADDR": "http://127.0.0.1:8081"}
    on_vast = load_settings(vast)
    assert on_vast.use_ssl is True and on_vast.public_url == "https://1.2.3.4:40000"
    off = load_settings({**vast, "USE_SSL": "false"})
    assert off.use_ssl is False and off.public_url == "http://1.2.3.4:40000"
    assert load_settings({**vast, "USE_SSL": "false", "VESPA_USE_SSL": "true"}).use_ssl is True
    assert load_settings({}).use_ssl is False
    assert load_settings({"USE_SSL": "true"}).use_ssl is True


def test_the_backends_own_key():
    """VESPA_BACKEND_API_KEY, else for a launched vLLM the VLLM_API_KEY it reads; a secret."""
    assert load_settings({}).backend_api_key is None
    given = load_settings({"VESPA_BACKEND_API_KEY": "bk-123456"})
    assert given.backend_api_key == "bk-123456" and "bk-123456" in given.log_secrets
    vllm = load_settings({"VESPA_BACKEND": "vllm", "VLLM_API_KEY": "vk-1"})
    assert vllm.backend_api_key == "vk-1"
    assert load_settings({"VESPA_BACKEND": "vllm", "VLLM_API_KEY": "vk-1",
                          "VESPA_BACKEND_API_KEY": "bk-1"}).backend_api_key == "bk-1"
    assert load_settings({"VLLM_API_KEY": "vk-1"}).backend_api_key is None  # not vLLM's worker
    with pytest.raises(ConfigError, match="VESPA_BACKEND_API_KEY.*visible ASCII"):
        load_settings({"VESPA_BACKEND_API_KEY": "two words"})


def test_the_update_settings():
    assert load_settings({}).update_flag == "/.force_update"  # Vast's
    assert load_settings({"VESPA_UPDATE_FLAG": "/tmp/f"}).update_flag == "/tmp/f"
    # start_server.sh's own: not settings of the worker, and not unknown either
    assert load_settings({"VESPA_UPDATE_REF": "main", "VESPA_UPDATE_REMOTE": "origin"}
                         ).unknown_settings == ()


def test_body_read_timeout_default_and_value():
    assert load_settings({}).body_read_timeout == 30.0
    assert load_settings({"VESPA_BODY_READ_TIMEOUT": "2.5"}).body_read_timeout == 2.5


def test_parallel_off_means_one_at_a_time():
    assert load_settings({"VESPA_ALLOW_PARALLEL": "false",
                          "VESPA_MAX_CONCURRENCY": "8"}).concurrency_limit == 1


@pytest.mark.parametrize("name,value,accepts", [
    ("VESPA_WORKER_PORT", "abc", "whole number from 1 to 65535"),
    ("VESPA_WORKER_PORT", "70000", "whole number from 1 to 65535"),
    ("VESPA_UNSECURED", "maybe", "true or false"),
    ("VESPA_MAX_WAIT_TIME", "-1", "a number > 0"),
    ("VESPA_MAX_THROUGHPUT", "nan", "a number > 0"),
    ("VESPA_MAX_CONCURRENCY", "0", "whole number from 1"),
    ("VESPA_BACKEND_URL", "localhost:8000", "http:// or https:// URL"),
    ("VESPA_HEALTHCHECK_ENDPOINT", "health", "path starting with /"),
    ("VESPA_LOG_LEVEL", "LOUD", "one of DEBUG"),
    ("VESPA_BODY_READ_TIMEOUT", "0", "a number > 0"),
    ("VESPA_BODY_READ_TIMEOUT", "soon", "a number > 0"),
    ("VESPA_BACKEND_LOG_READY", "[ready", "a regular expression"),
    ("VESPA_BACKEND_COMMAND", "serve 'unclosed", "a command line"),
    ("VAST_TCP_PORT_3000", "0", "whole number from 1 to 65535"),
])
def test_bad_values_name_the_variable_and_what_it_accepts(name, value, accepts):
    with pytest.raises(ConfigError) as caught:
        load_settings({name: value})
    assert name in str(caught.value) and accepts in str(caught.value)


def test_dotenv_file_is_read_and_environment_wins(tmp_path, monkeypatch):
    dotenv = tmp_path / ".env"
    dotenv.write_text("VESPA_MAX_WAIT_TIME=3\nVESPA_DEFAULT_COST=7\n")
    monkeypatch.setenv("VESPA_DEFAULT_COST", "9")
    merged = environment(str(dotenv))
    settings = load_settings(merged)
    assert settings.max_wait_time == 3.0
    assert settings.default_cost == 9.0


@pytest.mark.parametrize("entry", [["server.py"], ["-m", "vespa"]])
def test_bad_value_stops_process_with_one_line_and_exit_2(entry, tmp_path):
    result = subprocess.run([PYTHON, *[str(REPO / e) if e.endswith(".py") else e for e in entry]],
                            env=worker_env(VESPA_MAX_WAIT_TIME="soon"), cwd=tmp_path,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["vespa: invalid VESPA_MAX_WAIT_TIME='soon': expected a number > 0"]


def test_a_bad_secret_stops_the_process_without_showing_its_value(tmp_path):
    """The line goes to the terminal (Vast's instance log) before the log's masking is set up."""
    result = subprocess.run([PYTHON, "-m", "vespa"], cwd=tmp_path, capture_output=True,
                            env=worker_env(VESPA_BACKEND_API_KEY="bk-0123456789 abcdef"),
                            text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "vespa: invalid VESPA_BACKEND_API_KEY (a secret: its value is not shown): expected a "
        "token of visible ASCII characters, without spaces"]


def test_a_launched_backend_and_another_backend_url_is_a_clear_error():
    """VESPA_BACKEND launches the backend on VESPA_BACKEND_PORT: a URL elsewhere would be
    silently ignored, so it is refused with what to do instead."""
    with pytest.raises(ConfigError) as refused:
        load_settings({"VESPA_BACKEND": "vllm", "VESPA_BACKEND_URL": "http://gpu-box:9000"})
    assert str(refused.value) == (
        "invalid VESPA_BACKEND_URL='http://gpu-box:9000': expected unset or "
        "http://127.0.0.1:8000, where VESPA_BACKEND=vllm launches the backend "
        "(VESPA_BACKEND=none fronts a backend you run)")


def test_an_unknown_vespa_setting_is_named_with_the_closest_real_one():
    settings = load_settings({"VESPA_MAX_WAITTIME": "5", "VESPA_HEALTHCHECK_POLL_INTERVAL": "1",
                              "VESPA_VENV": "/v", "VESPA_TTS_VOICE": "joe", "VLLM_ARGS": "--x",
                              "VESPA_MAX_WAIT_TIME": "3", "VESPA_NOTHING_LIKE_IT": "1"})
    assert settings.unknown_settings == (
        "VESPA_HEALTHCHECK_POLL_INTERVAL is not a Vespa setting and is ignored "
        "(did you mean VESPA_HEALTHCHECK_INTERVAL?)",
        "VESPA_MAX_WAITTIME is not a Vespa setting and is ignored "
        "(did you mean VESPA_MAX_WAIT_TIME?)",
        "VESPA_NOTHING_LIKE_IT is not a Vespa setting and is ignored")
    assert load_settings({"VESPA_MAX_WAIT_TIME": "3"}).unknown_settings == ()


def test_backend_none_fronts_the_backend_url():
    settings = load_settings({"VESPA_BACKEND": "none", "VESPA_BACKEND_URL": "http://gpu-box:9000"})
    assert settings.backend is None and settings.backend_url == "http://gpu-box:9000"


def test_launched_backend_settings():
    settings = load_settings({"VESPA_BACKEND": "tts", "VESPA_BACKEND_PORT": "8100",
                              "VESPA_BACKEND_URL": "http://localhost:8100/", "VLLM_ARGS": "--x",
                              "VESPA_TTS_VOICE": "joe", "PATH": "/bin"})
    assert settings.backend_url == "http://127.0.0.1:8100"
    assert settings.benchmark == "benchmarks.tts:benchmark"
    assert settings.backend_env == {"VLLM_ARGS": "--x", "VESPA_TTS_VOICE": "joe"}
    assert settings.backend_log.endswith("logs/tts.log")
    assert load_settings({"VESPA_BACKEND": "vllm"}).benchmark == "benchmarks.openai_chat:benchmark"
    with pytest.raises(ConfigError, match="VESPA_BACKEND"):
        load_settings({"VESPA_BACKEND": "ollama"})


def test_secrets_to_keep_out_of_logs_are_collected_from_their_variables():
    settings = load_settings({"MASTER_TOKEN": "mt-123456", "HF_TOKEN": "hf_abc", "VLLM_API_KEY": " ",
                              "VESPA_LOGS_TOKEN": "lt-1"})
    assert set(settings.log_secrets) == {"mt-123456", "hf_abc", "lt-1"}
    assert load_settings({}).log_secrets == ()


def test_the_readme_settings_table_is_made_from_the_declarations():
    readme = README.read_text(encoding="utf-8")
    assert f"{START}\n{settings_table()}\n{END}" in readme, \
        "README.md's settings table is out of date: run python -m vespa.config --readme"
    assert with_table(readme) == readme


def test_the_readme_command_checks_and_rewrites_the_table(tmp_path):
    check = subprocess.run([PYTHON, "-m", "vespa.config", "--check"], cwd=REPO,
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    readme = tmp_path / "README.md"
    readme.write_text(f"# Vespa\n\n{START}\n| old | table |\n{END}\n\nmore\n")
    assert rewrite(readme) is True and rewrite(readme) is False
    assert readme.read_text() == f"# Vespa\n\n{START}\n{settings_table()}\n{END}\n\nmore\n"
    with pytest.raises(ValueError, match="settings:start"):
        with_table("# Vespa without the markers\n")


def test_each_variable_is_declared_once_and_every_setting_documented():
    variables = [s.variable for s in DECLARATIONS]
    assert len(variables) == len(set(variables))
    assert all(s.doc and "\n" not in s.doc for s in DECLARATIONS)


def test_an_unset_variable_gives_the_declared_default_or_says_otherwise():
    """A default derived from other settings is the declared one's only with no other set:
    the README says how it is derived instead."""
    settings = load_settings({})
    derived = {s.variable for name, s in DECLARED.items() if getattr(settings, name) != s.default}
    assert derived == {"VESPA_UNSECURED"}  # true without REPORT_ADDR
    assert all(DECLARED[name].shown for name in ("unsecured", "benchmark", "backend_log",
                                                  "public_url"))


class _Watched(Mapping):
    """An environment that notes every variable looked up by name."""

    def __init__(self, env: dict[str, str]):
        self.env, self.looked_up = env, set()

    def __getitem__(self, name):
        self.looked_up.add(name)
        return self.env[name]

    def get(self, name, default=None):
        self.looked_up.add(name)
        return self.env.get(name, default)

    def __iter__(self):
        return iter(self.env)

    def items(self):  # a scan by prefix, not a look-up
        return self.env.items()

    def __len__(self):
        return len(self.env)


@pytest.mark.parametrize("env", [{}, {"VESPA_BACKEND": "vllm", "MODEL_NAME": "m"},
                                 {"REPORT_ADDR": "http://127.0.0.1:8081", "USE_SSL": "1",
                                  "VESPA_CHECK_SIGNED_URL": "false"}])
def test_every_variable_the_worker_reads_is_declared(env):
    watched = _Watched(env)
    load_settings(watched)
    undeclared = {name for name in watched.looked_up
                  if not any(s.matches(name) or s.vast == name for s in DECLARATIONS)
                  and not re.fullmatch(r"VAST_TCP_PORT_\d+", name)}
    assert undeclared == set()


def test_configurations_that_would_fail_open_refuse_to_start():
    """Issue #17 item 10: signed with no public URL would serve a request signed for another
    worker; on a Vast instance with no REPORT_ADDR the worker would serve unsigned requests."""
    with pytest.raises(ConfigError, match="VESPA_PUBLIC_URL.*VESPA_CHECK_SIGNED_URL=false"):
        load_settings({"REPORT_ADDR": "http://127.0.0.1:8081"})
    told = load_settings({"REPORT_ADDR": "http://127.0.0.1:8081",
                          "VESPA_CHECK_SIGNED_URL": "false"})
    assert told.unsecured is False and told.public_url == ""
    with pytest.raises(ConfigError, match="REPORT_ADDR.*VESPA_UNSECURED=true"):
        load_settings({"CONTAINER_ID": "42"})  # Vast's platform always sets REPORT_ADDR
    assert load_settings({"CONTAINER_ID": "42", "UNSECURED": "true"}).unsecured is True
    assert load_settings({}).unsecured is True  # a laptop: dev mode, as before
