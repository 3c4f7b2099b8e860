"""The model server behind the worker: launch, supervise, watch its log and health, benchmark
it (cached), read vLLM's own queue. Never touches a request."""
