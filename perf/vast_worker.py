"""Vast's own worker (PyPI ``vastai`` 1.9.1, ``vastai.serverless.server``) in front of the perf
backend, set up the way Vast's documentation sets up a worker for an OpenAI-compatible server:
one ``HandlerConfig`` per route, parallel requests allowed, the workload counted from
``max_tokens``, a benchmark on the chat route, readiness from a line in the model server's log.

    python perf/vast_worker.py --backend http://127.0.0.1:PORT      # what run.py starts

run.py starts it in a directory of its own (Vast's worker keeps its benchmark result in
``.has_benchmark`` in the working directory and tails ``model.log`` from there) with the
environment the platform gives a worker: ``WORKER_PORT``, ``WORKER_HTTP_PORT`` (its second, plain
HTTP port), ``CONTAINER_ID``, ``REPORT_ADDR`` (perf/signed.py's autoscaler, which holds the key
Vespa's signed rows use too), ``PUBLIC_IPADDR``, ``VAST_TCP_PORT_<WORKER_PORT>`` and
``MASTER_TOKEN``; ``USE_SSL`` unset (plain HTTP). It verifies the url-only signature, as Vast's
worker does, with pycryptodome, and logs at DEBUG, its default.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from urllib.parse import urlsplit

READY_LINE = "Application startup complete."  # what the model server prints when it is up
CHAT_SAMPLE = {"model": "perf-model", "max_tokens": 16,
               "messages": [{"role": "user", "content": "Say hello."}]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", required=True, help="the backend's base URL")
    args = parser.parse_args()
    backend = urlsplit(args.backend)

    from vastai.serverless.server.worker import (BenchmarkConfig, HandlerConfig, LogActionConfig,
                                                 Worker, WorkerConfig)

    Path("model.log").write_text(READY_LINE + "\n")  # the backend is already up
    config = WorkerConfig(
        model_server_url=f"{backend.scheme}://{backend.hostname}",
        model_server_port=backend.port,
        model_log_file="model.log",
        model_healthcheck_url="/health",
        handlers=[
            HandlerConfig(
                route="/v1/chat/completions",
                allow_parallel_requests=True,
                max_queue_time=60.0,
                workload_calculator=lambda payload: payload.get("max_tokens", 0),
                benchmark_config=BenchmarkConfig(dataset=[json.loads(json.dumps(CHAT_SAMPLE))],
                                                 concurrency=10, runs=2),
            ),
            HandlerConfig(route="/sse", allow_parallel_requests=True, max_queue_time=60.0,
                          workload_calculator=lambda payload: payload.get("max_tokens", 0)),
            HandlerConfig(route="/sse/stamped", allow_parallel_requests=True,
                          max_queue_time=60.0,
                          workload_calculator=lambda payload: payload.get("max_tokens", 0)),
        ],
        log_action_config=LogActionConfig(on_load=[READY_LINE], on_error=["Traceback"]),
    )
    Worker(config).run(host="127.0.0.1")


if __name__ == "__main__":
    main()
