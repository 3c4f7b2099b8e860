"""What the worker tells people: metrics (counters on the hot path, families at scrape time),
request records (off the loop), logs and their redaction, status, and the /_vespa/ routes."""
