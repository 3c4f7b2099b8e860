"""Talking to Vast's autoscaler: load reports (worker_status, delete_requests, exactly once)
and its public key."""
