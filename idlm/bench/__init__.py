"""Benchmarks: `offline` (engine throughput and per-request speed vs concurrency) and `latency`
(per-forward latency vs query tokens and batch size). Each prints one JSON object as its last line."""
