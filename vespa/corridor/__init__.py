"""The corridor a request walks: envelope, signature, the door, admission, the ledger and the
proxy step, with one refusal model. Pure cores (envelope, auth, admission, ledger) and a handler
that composes them; no environment, no sockets of its own."""
